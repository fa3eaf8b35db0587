"""The figures only a GPU can give, in one command (scripts/gpu_check.sh), printed as one JSON line per figure:

  step     DeiT-S, bf16, batch 256, at 224 and 64 px: our training step against a plain timm loop, eager and
           compiled, with MFU against the datasheet peak (scripts/bench.py)
  feed     loader img/s and feed ratio (loader / our step) of the pil and dali backends at 224 and 64 px with 14
           workers over 40,000 photo paths (DALI absent: its rows say so)
  parity   the same 3 fp32 steps on the CPU and on CUDA: largest loss and weight differences
  budget   a 60 s --time-budget multi-size run (the DeiT-S budget recipe) on each backend: whether it finished,
           whether the loss fell, img/s per stage, graphs compiled and frames that fell back to eager

It needs no internet and no package index: the machine's own torch (2.11 or later) and timm, and synthetic photos
made here. --tiny runs every check on the CPU with a test-size model, so that the flags and paths stay right.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = dict(model='deit_small_patch16_224', sizes=(224, 64), batch=256, device='cuda', workers=14, paths=40_000,
            distinct=2_000, photo=(500, 375), classes=10, val_paths=1_000, steps=20, warmup=5, repeats=3,
            compile_backend='inductor', budget_s=60, schedule=None, budget_batch=256, budget_size=224)
TINY = dict(model='deit_micro_patch2_16', sizes=(16, 8), batch=8, device='cpu', workers=1, paths=48, distinct=48,
            photo=(40, 30), classes=2, val_paths=8, steps=2, warmup=1, repeats=1, compile_backend='aot_eager',
            budget_s=15, schedule='0:8,0.5:12,0.8:16', budget_batch=4, budget_size=16)


def emit(row):
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- synthetic photos

def photo(args):
    """A JPEG of smooth colour gradients, soft blobs and sensor-like noise (natural-photo statistics, roughly: most
    energy at low frequencies, JPEG sizes of real photos)."""
    path, seed, (width, height) = args
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        field = rng.uniform(0, 255) + rng.uniform(-120, 120) * x + rng.uniform(-120, 120) * y
        for _ in range(4):
            cx, cy, r, a = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3), rng.uniform(-90, 90)
            field = field + a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(field)
    pixels = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_photos(root, split, count, cfg, pool):
    """`count` paths in `classes` class folders: `distinct` photos written, the other paths links to them (which the
    loader timing reads as files; a training set counts each photo once)."""
    folders = [os.path.join(root, split, f'c{k}') for k in range(cfg['classes'])]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    distinct = min(cfg['distinct'], count)
    originals = [os.path.join(folders[i % len(folders)], f'{split}{i}.jpg') for i in range(distinct)]
    pool.map(photo, [(path, i + (0 if split == 'train' else 10 ** 6), cfg['photo']) for i, path in enumerate(originals)])
    for i in range(distinct, count):
        os.symlink(originals[i % distinct], os.path.join(folders[i % len(folders)], f'{split}{i}.jpg'))
    return os.path.join(root, split)


# ---------------------------------------------------------------- the checks

def run(command, timeout):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f'{" ".join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}')
    return result.stdout


def dali_installed():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def step_and_feed(cfg, photos, size, compiled):
    backends = 'pil,dali' if dali_installed() else 'pil'
    command = [sys.executable, 'scripts/bench.py', '--model', cfg['model'], '--input-size', str(size),
               '--batch-size', str(cfg['batch']), '--device', cfg['device'], '--amp', 'bf16',
               '--steps', str(cfg['steps']), '--warmup', str(cfg['warmup']), '--repeats', str(cfg['repeats'])]
    if compiled:
        command += ['--compile', '--compile-backend', cfg['compile_backend']]
    else:  # the loaders are timed once per size, beside the eager step
        command += ['--data-folder', photos, '--workers', str(cfg['workers']), '--data-backend', backends]
    r = json.loads(run(command, timeout=600).strip().splitlines()[-1])
    emit({'check': 'step', 'model': cfg['model'], 'size': size, 'batch': cfg['batch'], 'compile': compiled,
          'ours_img_s': r['ours_img_s'], 'plain_img_s': r['plain_img_s'], 'ratio': r['ratio'], 'mfu': r['mfu'],
          'mfu_against': r['mfu_against'], 'mfu_measured_peak': r['mfu_measured_peak'], 'gpu': r['gpu'],
          'warmup_seconds': r['warmup_seconds']})
    for backend, speeds in r.get('loader_img_s', {}).items():
        for workers, speed in speeds.items():
            emit({'check': 'feed', 'backend': backend, 'size': size, 'workers': int(workers), 'loader_img_s': speed,
                  'feed_ratio': r['feed_ratio'][backend][workers], 'batches': r['loader_batches'][workers]})
    if not compiled and not dali_installed():
        emit({'check': 'feed', 'backend': 'dali', 'size': size, 'skipped': 'DALI is not installed'})


def parity(cfg, steps=3):
    """The same fp32 steps (same initial weights, same batches, TF32 off) on the CPU and on cfg's device."""
    import timm
    import models  # noqa: F401 - the project's model names
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    size = cfg['sizes'][1]
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, size, size, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(steps)]
    torch.manual_seed(0)
    start = timm.create_model(cfg['model'], num_classes=10, img_size=size, drop_path_rate=0.0).state_dict()
    results = {}
    for device in ('cpu', cfg['device']):
        model = timm.create_model(cfg['model'], num_classes=10, img_size=size, drop_path_rate=0.0).to(device)
        model.load_state_dict(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for images, labels in batches:
            loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results[device] = (losses, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    (cpu_losses, cpu_weights), (dev_losses, dev_weights) = results['cpu'], results[cfg['device']]
    emit({'check': 'parity', 'device': cfg['device'], 'steps': steps, 'size': size,
          'max_loss_diff': max(abs(a - b) for a, b in zip(cpu_losses, dev_losses)),
          'max_weight_diff': max((cpu_weights[k] - dev_weights[k]).abs().max().item() for k in cpu_weights)})


def budget_run(cfg, data_root, backend, work):
    """The DeiT-S budget recipe (size schedule, --multisize-batch, evaluation at the final size) for budget_s
    seconds, compiled."""
    if backend == 'dali' and not dali_installed():
        emit({'check': 'budget', 'backend': 'dali', 'skipped': 'DALI is not installed'})
        return
    out = os.path.join(work, f'budget_{backend}')
    command = [sys.executable, 'main.py', '-c', 'configs/deit_small_budget.yaml', '--data-set', 'FOLDER',
               '--data-path', data_root, '--data-backend', backend, '--time-budget', str(cfg['budget_s'] / 3600),
               '--model', cfg['model'], '--input-size', str(cfg['budget_size']), '--batch-size',
               str(cfg['budget_batch']), '--device', cfg['device'], '--num_workers', str(cfg['workers']),
               '--compile', '--compile-backend', cfg['compile_backend'], '--print-freq', '10', '--output_dir', out]
    if cfg['schedule']:
        command += ['--size-schedule', cfg['schedule']]
    stdout = run(command, timeout=cfg['budget_s'] * 6 + 120)
    with open(os.path.join(out, 'log.txt')) as f:
        epochs = [json.loads(line) for line in f.read().splitlines()[1:]]
    per_stage = {}
    for e in epochs:
        per_stage.setdefault(str(e['train_size']), []).append(e['train_images_per_sec'])
    graphs = re.search(r'torch\.compile: (\d+) graphs compiled, (\d+) frames fell back', stdout)
    emit({'check': 'budget', 'backend': backend, 'finished': True, 'epochs': len(epochs),
          'loss_first': epochs[0]['train_loss'], 'loss_last': epochs[-1]['train_loss'],
          'loss_fell': epochs[-1]['train_loss'] < epochs[0]['train_loss'],
          'img_s_per_stage': {size: sum(v) / len(v) for size, v in per_stage.items()},
          'elapsed_seconds': epochs[-1]['elapsed_seconds'],
          'graphs_compiled': int(graphs.group(1)) if graphs else None,
          'eager_fallbacks': int(graphs.group(2)) if graphs else None})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tiny', action='store_true', help='every check on the CPU with a test-size model')
    p.add_argument('--work-dir', default=None, help='where the photos and runs go (default: a temporary folder)')
    p.add_argument('--checks', default='parity,step,budget',
                   help='which checks, in this order (feed is timed with the eager step); default: all')
    args = p.parse_args(argv)
    checks = args.checks.split(',')
    unknown = sorted(set(checks) - {'parity', 'step', 'budget'})
    if unknown:
        p.error(f'unknown check {unknown[0]!r}: choose from parity, step, budget')
    cfg = TINY if args.tiny else FULL
    if cfg['device'] == 'cuda' and not torch.cuda.is_available():
        p.error('no CUDA device is visible; run on a GPU machine, or pass --tiny for the CPU check of the script')
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        with Pool(os.cpu_count()) as pool:
            photos = make_photos(os.path.join(work, 'photos'), 'train', cfg['paths'], cfg, pool)
            make_photos(os.path.join(work, 'photos'), 'val', cfg['val_paths'], cfg, pool)
        for check in checks:
            if check == 'parity':
                guarded('parity', parity, cfg)
            elif check == 'step':
                for size in cfg['sizes']:
                    for compiled in (False, True):
                        guarded('step', step_and_feed, cfg, photos, size, compiled)
            else:
                for backend in ('pil', 'dali'):
                    guarded('budget', budget_run, cfg, os.path.join(work, 'photos'), backend, work)
    return failures


failures = []


def guarded(name, check, *args):
    """One failing check is one error line; the others still run (a lent GPU's minutes are few)."""
    try:
        check(*args)
    except Exception as error:  # noqa: BLE001 - reported as a row, and in the exit status
        failures.append(name)
        emit({'check': name, 'error': f'{type(error).__name__}: {str(error)[-1500:]}'})


if __name__ == '__main__':
    sys.exit(1 if main() else 0)
