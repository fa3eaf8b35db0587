"""Inference throughput (images/s) and GMACs of timm models, as EViT's speed test measures them, in the precision
training runs in: --amp auto (the default) is main.py's, bf16 autocast on CUDA and fp32 on the CPU; --amp none
gives EViT's fp32 figures (plain fp32, TF32 off, as torch's default).

    python scripts/throughput.py --model deit_small_patch16_224 --model evit_small_patch16_224 \
        --keep-rate 0.7 --fuse-token --batch-size 64 --iters 100 --warmup 100 --device cuda

Random inputs, eval mode, no gradients; on CUDA the clock stops only after a synchronize. --repeats N
measures N times, in turns across the models, and reports the median (use it on a shared machine).
--keep-rate and --fuse-token reach only EViT models. GMACs are FlopCounterMode's total / 2 at batch 1,
attention matmuls included.
"""
import argparse
import difflib
import os
import statistics
import sys

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402, F401 - registers the project's model families in timm
import utils  # noqa: E402
from engine import measure_throughput  # noqa: E402
from evit_models import EViT  # noqa: E402

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@torch.no_grad()
def count_gmacs(model, img_size):
    """Multiply-accumulates (x 1e9) of one image; math attention so that the counter sees its matmuls."""
    device = next(model.parameters()).device
    return utils.count_flops(lambda: model.eval()(torch.rand(1, 3, img_size, img_size, device=device))) / 2 / 1e9


def build(name, keep_rate, fuse_token):
    """The model by timm name; keep_rate / fuse_token only for EViT models (None leaves the default)."""
    if timm.models.get_arch_name(name) not in timm.list_models(module='evit_models'):
        return timm.create_model(name)
    model = timm.create_model(name, fuse_token=fuse_token)
    if keep_rate is not None:
        model.set_keep_rate(keep_rate)
    return model


def keep_label(model):
    if not isinstance(model, EViT):
        return '-'
    return ', '.join(f'{r:g}' for r in sorted(set(model.keep_rates))) + (' fused' if model.fuse_token else '')


def measure_all(args):
    """Table rows: model, keep rate, batch, median img/s, GMACs, every run.

    The repeats go round the models in turns, so that a load that comes and goes on a shared machine
    slows every model alike.
    """
    built = {name: build(name, args.keep_rate, args.fuse_token) for name in args.model}
    sizes = {name: args.img_size or m.pretrained_cfg['input_size'][-1] for name, m in built.items()}
    runs = {name: [] for name in built}
    for _ in range(args.repeats):
        for name, model in built.items():
            runs[name].append(measure_throughput(model, args.batch_size, sizes[name], args.device, args.iters,
                                                 args.warmup, AMP_DTYPES[args.amp]))
    return [[name, keep_label(model), str(args.batch_size), f'{statistics.median(runs[name]):.1f}',
             f'{count_gmacs(model, sizes[name]):.2f}', ' '.join(f'{r:.1f}' for r in runs[name])]
            for name, model in built.items()]


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', action='append', required=True, help='timm model name; repeat for several')
    p.add_argument('--keep-rate', type=float, default=None, help='EViT keep rate (default: the model\'s, 0.7)')
    p.add_argument('--fuse-token', action='store_true', help='EViT: fuse the dropped tokens into one')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--img-size', type=int, default=None, help='default: the model\'s pretrained input size')
    p.add_argument('--iters', type=int, default=100, help='timed iterations')
    p.add_argument('--warmup', type=int, default=100, help='untimed iterations first')
    p.add_argument('--repeats', type=int, default=1, help='measure this many times and report the median')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', default='auto', choices=['auto', *AMP_DTYPES],
                   help='autocast dtype; auto: bf16 on CUDA, none (fp32) on the CPU, as main.py trains')
    args = p.parse_args(argv)
    if args.amp == 'auto':
        args.amp = 'bf16' if torch.device(args.device).type == 'cuda' else 'none'
    if args.amp == 'fp16' and torch.device(args.device).type == 'cpu':
        p.error('--amp fp16 needs --device cuda; use bf16 or none on the CPU')
    for name in args.model:
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            p.error(f'unknown model {name!r}' + (f'; did you mean {", ".join(close)}?' if close else ''))
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda but no CUDA device is visible; use --device cpu')
    if args.keep_rate is not None and not 0 < args.keep_rate <= 1:
        p.error(f'--keep-rate must be in (0, 1], got {args.keep_rate}')
    if min(args.batch_size, args.iters, args.repeats) < 1 or args.warmup < 0:
        p.error('--batch-size, --iters and --repeats must be at least 1 and --warmup at least 0')
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = measure_all(args)
    precision = 'fp32' if args.amp == 'none' else f'{args.amp} autocast'
    print(f'device {args.device}, {precision}, {torch.get_num_threads()} CPU threads, {args.warmup} warm-up + '
          f'{args.iters} timed iterations, median of {args.repeats}')
    print(markdown_table(['model', 'keep rate', 'batch', 'img/s', 'GMACs', 'runs (img/s)'], rows))


if __name__ == '__main__':
    main()
