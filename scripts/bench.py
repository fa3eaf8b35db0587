"""Training speed of the project's loop against a plain timm loop, with FLOPs, measured peak FLOP/s, MFU, memory.

    python scripts/bench.py --model deit_tiny_patch16_224 --input-size 224 --batch-size 16 --device cpu
    python scripts/bench.py --model deit_tiny_patch16_224 --input-size 224 --batch-size 16 --device cpu \
        --amp bf16 --compile --baseline fp32
    python scripts/bench.py --model deit_small_patch16_224 --input-size 224 --batch-size 256 --device cuda \
        --amp bf16 --compile --data-folder train_jpegs --workers 0,4,8

Both loops train the same architecture on the same synthetic batches, in the same process, in turns:

  ours   engine.train_one_epoch with an engine.TrainState built as main.py builds it (timm AdamW, the timm
         schedule stepped every update, GradScaler only for fp16, the autocast dtype, DeiT's criterion),
         so every per-step cost of the real loop is in the figure;
  plain  timm.create_model + torch.optim.AdamW + CrossEntropyLoss under the same autocast dtype and compile
         choice (--baseline fp32: eager fp32 instead, to price what bf16 + compile buy); the uint8 batches
         normalised on the device as timm's prefetcher does.

Each figure is the median of --repeats timed runs of --steps updates after --warmup untimed ones.
FLOPs per image are FlopCounterMode's count of one forward + backward (math attention, so its matmuls count);
MFU divides the achieved FLOP/s by the GPU's datasheet peak (dense tensor-core FLOP/s in the benchmark's dtype,
DATASHEET_PEAKS; the usual definition); the peak MEASURED here (the best of a few large square matmuls in that
dtype) is reported beside it, and is the only one on the CPU and on GPUs missing from the table.
Peak memory is torch.cuda.max_memory_allocated on CUDA, the process peak RSS on the CPU.
--data-folder times the loader alone (DeiT train transform) for each --data-backend and --workers count, and
its feed ratio: loader img/s / our step's img/s (above 1, the loader keeps up with the model). Its clock starts
when the iterator is created (worker start-up included) and runs over at least --loader-batches batches, 20 times
the batches the workers buffer ahead, so that their head start is under 5% of the count.
The last line printed is one JSON object with every figure.
"""
import argparse
import contextlib
import copy
import io
import json
import os
import resource
import statistics
import sys
import time

import timm
import torch
from torch.utils.data import DataLoader, Dataset
from timm.utils import ModelEmaV3

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import engine  # noqa: E402
import loaders  # noqa: E402
import main as train_main  # noqa: E402
import losses  # noqa: E402
import optimization  # noqa: E402
import model_factory  # noqa: E402
import utils  # noqa: E402

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a name torch.cuda.get_device_name()
# contains; the first match wins, so the more specific names come first. float32 is the CUDA-core peak.
DATASHEET_PEAKS = [
    ('H100 PCIe', {'bfloat16': 756, 'float16': 756, 'float32': 51}),
    ('H100 NVL', {'bfloat16': 835, 'float16': 835, 'float32': 60}),
    ('H100', {'bfloat16': 989, 'float16': 989, 'float32': 67}),  # SXM5
    ('H200', {'bfloat16': 989, 'float16': 989, 'float32': 67}),
    ('A100', {'bfloat16': 312, 'float16': 312, 'float32': 19.5}),
    ('V100', {'float16': 125, 'float32': 15.7}),  # SXM2; no bfloat16
    ('L4', {'bfloat16': 121, 'float16': 121, 'float32': 30.3}),
]
PREFETCH_FACTOR = 2  # torch's default: batches each worker keeps ready
DISTINCT_BATCHES = 4  # synthetic batches are reused in turn: their content does not change the speed


# ---------------------------------------------------------------- the two loops

def training_config(args):
    """main.py's flags for this benchmark, so its own builders make the optimizer, schedule and criterion."""
    flags = ['--model', args.model, '--input-size', str(args.input_size), '--batch-size', str(args.batch_size),
             '--device', args.device, '--amp', args.amp, '--drop-path', str(args.drop_path)]
    if not args.mixup:
        flags += ['--mixup', '0', '--cutmix', '0']
    config = train_main.get_args_parser().parse_args(flags)
    config.nb_classes, config.print_freq = args.num_classes, args.print_freq  # the device is read at this cadence
    optimization.scale_lr(config)
    return config


class OursLoop:
    """engine.train_one_epoch over the given batches, with everything main.py puts around it."""
    name = 'ours'

    def __init__(self, args, device):
        config = training_config(args)
        self.device = device
        self.model = model_factory.build_model(config).to(device)
        ema = ModelEmaV3(self.model, decay=config.model_ema_decay) if args.model_ema else None
        self.state = train_main.build_train_state(config, self.model, ema, max(args.steps, args.warmup), device)
        self.criterion = losses.build_criterion(config, self.model, self.state.mixup_fn is not None, device)
        self.train_model = torch.compile(self.model, backend=args.compile_backend) if args.compile else self.model

    def run(self, batches):
        # The engine prints one progress line per epoch; it would interleave with the report.
        with contextlib.redirect_stdout(io.StringIO()):
            engine.train_one_epoch(self.train_model, self.criterion, batches, self.device, 0, self.state)


class PlainLoop:
    """The textbook loop: timm model, torch AdamW, cross-entropy, autocast and GradScaler as the AMP recipe says."""
    name = 'plain'

    def __init__(self, args, device, amp_dtype, compile_model):
        backend = args.compile_backend
        self.device, self.amp_dtype = device, amp_dtype
        self.model = model_factory.create_at_size(args.model, args.input_size, num_classes=args.num_classes,
                                                  drop_path_rate=args.drop_path).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-4 * args.batch_size / 512,
                                           weight_decay=0.05)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.train_model = torch.compile(self.model, backend=backend) if compile_model else self.model
        self.mean = torch.tensor(datasets.IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(datasets.IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255

    def run(self, batches):
        self.train_model.train()
        for images, targets in batches:
            images = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
            targets = targets.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.criterion(self.train_model(images), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()


def synthetic_batches(steps, batch_size, input_size, num_classes, device):
    """`steps` (uint8 images, labels) CPU batches, as main.py's DataLoader hands them over (pinned for CUDA)."""
    generator = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(min(steps, DISTINCT_BATCHES)):
        images = torch.randint(0, 256, (batch_size, 3, input_size, input_size), generator=generator,
                               dtype=torch.uint8)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        if device.type == 'cuda':
            images, labels = images.pin_memory(), labels.pin_memory()
        pool.append((images, labels))
    return [pool[i % len(pool)] for i in range(steps)]


def progress(message):
    """On stderr, so that stdout stays the report (compilation can take minutes on a CPU)."""
    print(f'. {message}', file=sys.stderr, flush=True)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(loop, batches, device):
    """Seconds for loop.run(batches), the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    loop.run(batches)
    synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------- FLOPs, peak, memory

def training_flops_per_image(model, input_size, device, batch=2):
    """FLOPs of one forward + backward per image; a copy of the model, so its gradients stay untouched."""
    counted = copy.deepcopy(model).train()
    images = torch.randn(batch, 3, input_size, input_size, device=device)
    def step():
        output = counted(images)
        output = output[0] if isinstance(output, (tuple, list)) else output
        output.float().sum().backward()
    return utils.count_flops(step) / batch


def datasheet_peak_flops(device_name, dtype):
    """FLOP/s of the datasheet for this GPU and dtype; None when the table does not know them."""
    for name, peaks in DATASHEET_PEAKS:
        if name.lower() in device_name.lower():
            value = peaks.get(str(dtype).replace('torch.', ''))
            return value * 1e12 if value is not None else None
    return None


def measure_peak_flops(device, dtype, size, repeats=3):
    """Best FLOP/s of a (size x size) @ (size x size) matmul in dtype on this device."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # first call: library start-up and kernel choice
    best = float('inf')
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def reset_peak_memory(device):
    """Start a fresh CUDA peak; returns what is already held (the other loop's weights and optimizer state)."""
    if device.type != 'cuda':
        return 0.0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2 ** 20


# ---------------------------------------------------------------- data loading alone

class ImageFiles(Dataset):
    """(transformed image, 0) for each path: a DataLoader's load with no label lookup."""

    def __init__(self, paths, transform, loader):
        self.paths, self.transform, self.loader = paths, transform, loader

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(self.loader(self.paths[index])), 0

    @property
    def samples(self):  # the (path, label) pairs the dali backend reads
        return [(path, 0) for path in self.paths]


def image_files(folder):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                  if name.lower().endswith(datasets.IMG_EXTENSIONS))


def shard_set(folder):
    """The training split of a WebDataset shard folder (one with _info.json) as main.py reads it, else None."""
    if not os.path.isfile(os.path.join(folder, '_info.json')):
        return None
    from wds_dataset import ShardDataset, class_names
    return ShardDataset(folder, 'train', class_names(folder, None))


def make_pil_loader(paths, config, batch_size, workers, baseline, batches):
    """main.py's pil loader: uint8 images, JPEGs decoded only as far as the crop needs. `baseline`: the loader as it
    was before both, every JPEG decoded in full, normalised and erased in the worker. It draws `batches` batches,
    going round the files (or a ShardDataset's samples) as often as that takes."""
    transform = datasets.build_transform(True, config, uint8=not baseline)
    loader = datasets.load_rgb if baseline else datasets.loader_for(transform)
    if isinstance(paths, list):
        files = ImageFiles(paths, transform, loader)
    else:
        files, files.transform, files.loader = paths, transform, loader
    sampler = torch.utils.data.RandomSampler(files, num_samples=batches * batch_size)
    return DataLoader(files, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      **({'prefetch_factor': PREFETCH_FACTOR} if workers else {}))


def make_dali_loader(paths, config, batch_size, workers, batches):
    """main.py's dali loader (GPU decoding on cuda, DALI's CPU mode on the CPU) with `workers` DALI threads, over
    `batches` batches. As in main.py's first epoch, pil checks each file once (docs/data.md)."""
    config = argparse.Namespace(**dict(vars(config), num_workers=workers))
    loaders.dali_loader.check_flags(config)
    files = ImageFiles(paths, None, None) if isinstance(paths, list) else paths
    order = torch.randint(len(paths), (batches * batch_size,), generator=torch.Generator().manual_seed(0))
    return loaders.dali_loader.build_train_loader(config, files, order.tolist(), batch_size)


def loader_batches(requested, workers):
    """Batches to time: enough that the workers' buffered head start is under 5% of them."""
    return max(requested, 20 * workers * PREFETCH_FACTOR)


def loader_images_per_sec(loader):
    """Images/s of one pass, the clock started as the iterator is created (worker start-up included)."""
    start, images = time.perf_counter(), 0
    for batch, _ in loader:
        images += batch.shape[0]
    return images / (time.perf_counter() - start)


def loader_speeds(args, config):
    """({backend: {workers: img/s}}, {workers: batches timed})."""
    paths = shard_set(args.data_folder) or image_files(args.data_folder)
    if len(paths) < args.batch_size:
        raise ValueError(f'--data-folder {args.data_folder} holds {len(paths)} images, fewer than one batch of '
                         f'{args.batch_size}; add images or lower --batch-size')
    config.data_set = 'FOLDER' if isinstance(paths, list) else 'WDS'
    config.data_path = args.data_folder
    speeds, counts = {}, {str(w): loader_batches(args.loader_batches, w) for w in args.workers}
    for backend in args.data_backend:
        make = (lambda w, n: make_dali_loader(paths, config, args.batch_size, w, n)) if backend == 'dali' else \
            (lambda w, n: make_pil_loader(paths, config, args.batch_size, w, args.baseline_loader, n))
        speeds[backend] = {str(w): loader_images_per_sec(make(w, counts[str(w)])) for w in args.workers}
    return speeds, counts


# ---------------------------------------------------------------- the report

def build_and_warm_up(args, device, plain_amp, plain_compile):
    """Both loops, each built and warmed up (compiled) alone, so that a CUDA peak memory is its own.

    Returns the loops, their warm-up seconds and their peak memory (MB).
    """
    batches = synthetic_batches(args.warmup, args.batch_size, args.input_size, args.num_classes, device)
    loops, warmup_s, memory = [], {}, {}
    for make in (lambda: OursLoop(args, device),
                 lambda: PlainLoop(args, device, AMP_DTYPES[plain_amp], plain_compile)):
        held = reset_peak_memory(device)
        loop = make()
        warmup_s[loop.name] = timed(loop, batches, device)
        memory[loop.name] = peak_memory_mb(device) - held
        loops.append(loop)
        progress(f'{loop.name}: {args.warmup} warm-up updates in {warmup_s[loop.name]:.1f} s')
    return loops, warmup_s, memory


def time_in_turns(loops, args, device):
    """{loop name: img/s of each run}; the loops take turns, so that a passing load slows both alike."""
    batches = synthetic_batches(args.steps, args.batch_size, args.input_size, args.num_classes, device)
    runs = {loop.name: [] for loop in loops}
    for repeat in range(args.repeats):
        for loop in loops:
            runs[loop.name].append(args.steps * args.batch_size / timed(loop, batches, device))
        progress(f'run {repeat + 1}/{args.repeats}: ' + ', '.join(f'{k} {v[-1]:.2f} img/s' for k, v in runs.items()))
    return runs


def benchmark(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    load_at_start = os.getloadavg()
    plain_amp = 'none' if args.baseline == 'fp32' else args.amp
    plain_compile = args.compile and args.baseline == 'same'
    loops, warmup_s, memory = build_and_warm_up(args, device, plain_amp, plain_compile)
    runs = time_in_turns(loops, args, device)
    ours, plain = (statistics.median(runs[name]) for name in ('ours', 'plain'))

    flops = training_flops_per_image(loops[0].model, args.input_size, device)
    peak_dtype = AMP_DTYPES[args.amp] or torch.float32
    peak = measure_peak_flops(device, peak_dtype, args.matmul_size)
    peak_fp32 = peak if peak_dtype == torch.float32 else measure_peak_flops(device, torch.float32, args.matmul_size)
    gpu_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else None
    datasheet = datasheet_peak_flops(gpu_name, peak_dtype) if gpu_name else None
    result = {
        'model': args.model, 'input_size': args.input_size, 'batch_size': args.batch_size, 'device': args.device,
        'amp': args.amp, 'compile': args.compile, 'baseline': args.baseline, 'plain_amp': plain_amp,
        'plain_compile': plain_compile, 'model_ema': args.model_ema, 'mixup': args.mixup,
        'ours_img_s': ours, 'plain_img_s': plain, 'ratio': ours / plain,
        'ratio_best': max(runs['ours']) / max(runs['plain']),  # best runs: less sensitive to a passing load
        'ours_runs': runs['ours'], 'plain_runs': runs['plain'],
        'flops_per_image': flops, 'peak_flops': peak, 'peak_flops_dtype': str(peak_dtype).replace('torch.', ''),
        'peak_flops_fp32': peak_fp32,
        'datasheet_peak_flops': datasheet, 'gpu': gpu_name,
        'mfu': flops * ours / (datasheet or peak), 'mfu_plain': flops * plain / (datasheet or peak),
        'mfu_measured_peak': flops * ours / peak, 'mfu_against': 'datasheet' if datasheet else 'measured peak',
        'peak_memory_mb': memory['ours'] if device.type == 'cuda' else peak_memory_mb(device),
        'peak_memory_mb_plain': memory['plain'] if device.type == 'cuda' else None,
        'warmup_seconds': warmup_s, 'steps': args.steps, 'warmup': args.warmup, 'repeats': args.repeats,
        'threads': torch.get_num_threads(), 'load_avg_start': [round(x, 2) for x in load_at_start],
        'load_avg': [round(x, 2) for x in os.getloadavg()],
        'torch': torch.__version__, 'timm': timm.__version__,
        'epoch_start_s': epoch_start_seconds(),
    }
    if args.data_folder:
        result['loader_img_s'], result['loader_batches'] = loader_speeds(args, training_config(args))
        result['feed_ratio'] = {backend: {w: speed / ours for w, speed in speeds.items()}
                                for backend, speeds in result['loader_img_s'].items()}
        result['baseline_loader'] = args.baseline_loader
    return result


def epoch_start_seconds(num_items=1_281_167):
    """Seconds from an ImageNet-1k-sized epoch's set_epoch to its first (index, seed) pair: what the GPU waits for at
    every epoch start (the training sampler of one process, repeated augmentation on)."""
    from samplers import RASampler
    sampler = RASampler(num_items, 1, 0, num_repeats=3)
    start = time.perf_counter()
    sampler.set_epoch(1)
    next(iter(sampler))
    return time.perf_counter() - start


def report(r):
    gpu = torch.cuda.get_device_name() if r['device'] == 'cuda' else f'{r["threads"]} CPU threads'
    plain_precision = f'amp {r["plain_amp"]}, compile {"on" if r["plain_compile"] else "off"}'
    lines = [
        f'| {r["model"]}, {r["input_size"]} px, batch {r["batch_size"]}, {r["device"]} ({gpu}, load average '
        f'{r["load_avg_start"][0]} at start, {r["load_avg"][0]} at end), median of {r["repeats"]} runs of '
        f'{r["steps"]} updates after {r["warmup"]} warm-up',
        f'| ours  (engine.train_one_epoch, amp {r["amp"]}, compile {"on" if r["compile"] else "off"}): '
        f'{r["ours_img_s"]:.2f} img/s   runs {" ".join(f"{x:.2f}" for x in r["ours_runs"])}',
        f'| plain (timm + torch AdamW + CE, {plain_precision}): '
        f'{r["plain_img_s"]:.2f} img/s   runs {" ".join(f"{x:.2f}" for x in r["plain_runs"])}',
        f'| ratio ours / plain: {r["ratio"]:.3f} (best runs: {r["ratio_best"]:.3f}); warm-up s: '
        f'ours {r["warmup_seconds"]["ours"]:.1f}, plain {r["warmup_seconds"]["plain"]:.1f}',
        f'| training FLOPs per image: {r["flops_per_image"] / 1e9:.3f} GFLOP (forward + backward)',
        mfu_line(r),
    ]
    if r['peak_flops'] < r['peak_flops_fp32']:
        dtype = r['peak_flops_dtype']
        lines.append(f'| note: {dtype} matmuls are slower than float32 ones here ({r["peak_flops_fp32"] / 1e9:.1f} '
                     f'GFLOP/s): this device has no fast {dtype} path, and MFU against its {dtype} peak can pass 100%')
    lines.append(f'| epoch start: {r["epoch_start_s"]:.3f} s to the first sample of a 1.28 M-image epoch')
    if r['device'] == 'cuda':
        lines.append(f'| peak memory: ours {r["peak_memory_mb"]:.0f} MB, plain {r["peak_memory_mb_plain"]:.0f} MB '
                     '(max_memory_allocated)')
    else:
        lines.append(f'| peak memory: {r["peak_memory_mb"]:.0f} MB (process peak RSS)')
    for backend, speeds in r.get('loader_img_s', {}).items():
        figures = ', '.join(f'{w} workers {s:.1f} (feed ratio {r["feed_ratio"][backend][w]:.2f})'
                            for w, s in speeds.items())
        lines.append(f'| {backend} loader alone (DeiT train transform), img/s: {figures}')
    if 'loader_batches' in r:
        lines.append('| loader clock: from the iterator\'s creation (worker start-up included), over '
                     + ', '.join(f'{n} batches at {w} workers' for w, n in r['loader_batches'].items())
                     + f' (the workers\' buffered head start: under 5% of them, {PREFETCH_FACTOR} batches each)')
    return '\n'.join(lines)


def mfu_line(r):
    measured = f'{r["peak_flops"] / 1e9:.1f} GFLOP/s ({r["peak_flops_dtype"]} matmul)'
    if r['datasheet_peak_flops']:
        return (f'| MFU against the {r["gpu"]} datasheet peak ({r["datasheet_peak_flops"] / 1e12:.0f} TFLOP/s '
                f'{r["peak_flops_dtype"]} dense): ours {100 * r["mfu"]:.1f}%, plain {100 * r["mfu_plain"]:.1f}%; '
                f'against the measured peak {measured}: ours {100 * r["mfu_measured_peak"]:.1f}%')
    why = 'no datasheet peak for this GPU' if r['gpu'] else 'CPU'
    return f'| MFU against the measured peak {measured} ({why}): ours {100 * r["mfu"]:.1f}%, ' \
           f'plain {100 * r["mfu_plain"]:.1f}%'



def parse_workers(text):
    try:
        workers = [int(w) for w in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of worker counts, e.g. 0,2,4')
    if any(w < 0 for w in workers):
        raise argparse.ArgumentTypeError(f'worker counts must be 0 or more, got {text}')
    return workers


def parse_backends(text):
    backends = text.split(',')
    if not backends or any(b not in ('pil', 'dali') for b in backends):
        raise argparse.ArgumentTypeError(f'{text!r}: pass pil, dali or pil,dali')
    return backends


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='timm name, ours included')
    p.add_argument('--input-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    p.add_argument('--amp', default='none', choices=list(AMP_DTYPES), help='autocast dtype of both loops')
    p.add_argument('--compile', action='store_true', help='torch.compile both loops\' models')
    p.add_argument('--compile-backend', default='inductor', help='torch.compile\'s backend (main.py\'s flag)')
    p.add_argument('--baseline', default='same', choices=['same', 'fp32'],
                   help='plain loop in the same precision and compile choice, or eager fp32')
    p.add_argument('--steps', type=int, default=20, help='updates per timed run')
    p.add_argument('--warmup', type=int, default=5, help='untimed updates first (compilation happens here)')
    p.add_argument('--repeats', type=int, default=3, help='timed runs per loop; the median is reported')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth of both models (main.py\'s)')
    p.add_argument('--mixup', action='store_true', help='our loop with main.py\'s mixup / cutmix')
    p.add_argument('--model-ema', action='store_true', help='our loop with the weight EMA main.py keeps by default')
    p.add_argument('--matmul-size', type=int, default=None, help='side of the peak-FLOP/s matmul '
                   '(default 8192 on CUDA, 2048 on CPU)')
    p.add_argument('--data-folder', default=None,
                   help='folder of images (any depth), or of WebDataset shards (with _info.json), to time the '
                   'DataLoader on')
    p.add_argument('--data-backend', type=parse_backends, default=['pil'],
                   help='loaders to time: pil, dali or pil,dali (main.py\'s --data-backend)')
    p.add_argument('--baseline-loader', action='store_true',
                   help='pil: time the loader as it was, every JPEG decoded in full, normalised and erased in the '
                        'workers (for comparison)')
    p.add_argument('--loader-batches', type=int, default=50,
                   help='batches each loader timing runs over at least (more where many workers buffer ahead)')
    p.add_argument('--print-freq', type=int, default=10,
                   help='our loop reads the device every N updates, as main.py\'s --print-freq')
    p.add_argument('--workers', type=parse_workers, default=[0, 2, 4],
                   help='DataLoader workers (pil) or DALI threads (dali), e.g. 0,1,2')
    args = p.parse_args(argv)
    if not timm.is_model(args.model):
        p.error(f'unknown model {args.model!r}; see timm.list_models() or the project\'s model files')
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda but no CUDA device is visible; use --device cpu')
    if args.amp == 'fp16' and args.device == 'cpu':
        p.error('--amp fp16 needs --device cuda; use bf16 or none on the CPU')
    if min(args.input_size, args.batch_size, args.steps, args.repeats, args.loader_batches, args.print_freq) < 1 \
            or args.warmup < 0:
        p.error('--input-size, --batch-size, --steps, --repeats, --loader-batches and --print-freq must be at least '
                '1, --warmup at least 0')
    if args.data_folder and not os.path.isdir(args.data_folder):
        p.error(f'--data-folder {args.data_folder} is not a folder; pass a folder of JPEG images')
    args.matmul_size = args.matmul_size or (8192 if args.device == 'cuda' else 2048)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        result = benchmark(args)
    except (ValueError, train_main.UserError) as e:
        utils.exit_with_error(e)
    print(report(result))
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
    main()
