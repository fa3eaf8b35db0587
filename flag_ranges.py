"""The allowed range of every numeric flag of main.py, checked before anything is built or written."""
import math
import re

from utils import UserError

INF = math.inf
# dest: (low, high, brackets); '[' / ']' include the bound, '(' / ')' exclude it. A flag left at None is not checked.
# --clip-grad 0 means no clipping, as does leaving it out.
FLAG_RANGES = {
    'batch_size': (1, INF, '[)'), 'epochs': (1, INF, '[)'), 'accum_iter': (1, INF, '[)'),
    'skip_nonfinite': (0, INF, '[)'), 'inject_nonfinite': (-1, INF, '[)'), 'time_budget': (0, INF, '()'),
    'init_size': (1, INF, '[)'), 'epoch_step': (1, INF, '[)'), 'patch_step': (1, INF, '[)'),
    'input_size': (1, INF, '[)'), 'drop': (0, 1, '[)'), 'drop_path': (0, 1, '[)'), 'layer_scale': (0, INF, '()'),
    'model_ema_decay': (0, 1, '[]'), 'opt_eps': (0, INF, '()'), 'opt_betas': (0, 1, '[)'),
    'clip_grad': (0, INF, '[)'), 'momentum': (0, 1, '[]'), 'weight_decay': (0, INF, '[)'), 'lr': (0, INF, '()'),
    'lr_noise': (0, INF, '[)'), 'lr_noise_pct': (0, INF, '[)'), 'lr_noise_std': (0, INF, '[)'),
    'warmup_lr': (0, INF, '[)'), 'min_lr': (0, INF, '[)'), 'decay_epochs': (0, INF, '()'),
    'warmup_epochs': (0, INF, '[)'), 'cooldown_epochs': (0, INF, '[)'), 'decay_rate': (0, 1, '(]'),
    'color_jitter': (0, INF, '[)'), 'smoothing': (0, 1, '[)'), 'hflip': (0, 1, '[]'), 'reprob': (0, 1, '[]'),
    'recount': (1, INF, '[)'), 'mixup': (0, INF, '[)'), 'cutmix': (0, INF, '[)'), 'cutmix_minmax': (0, 1, '(]'),
    'mixup_prob': (0, 1, '[]'), 'mixup_switch_prob': (0, 1, '[]'), 'base_keep_rate': (0, 1, '(]'),
    'shrink_start_epoch': (0, INF, '[)'), 'shrink_epochs': (0, INF, '[)'), 'n_visualization': (1, INF, '[)'),
    'distillation_alpha': (0, 1, '[]'), 'distillation_tau': (0, INF, '()'), 'fake_size': (1, INF, '[)'),
    'fake_classes': (1, INF, '[)'), 'num_workers': (0, INF, '[)'), 'seed': (0, 2 ** 31 - 1, '[]'),
    'start_epoch': (0, INF, '[)'), 'eval_crop_ratio': (0, 1, '(]'), 'print_freq': (1, INF, '[)'),
    'save_every': (0, INF, '[)'), 'dist_timeout': (1, INF, '[)'),
}
DEVICE = re.compile(r'(auto|cpu|cuda(:\d+)?)$')


def in_range(value, low, high, brackets):
    if not math.isfinite(value):
        return False
    above = value >= low if brackets[0] == '[' else value > low
    below = value <= high if brackets[1] == ']' else value < high
    return above and below


def describe(low, high, brackets):
    if high == INF:
        return f'a value {">=" if brackets[0] == "[" else ">"} {_number(low)}'
    return f'a value in {brackets[0]}{_number(low)}, {_number(high)}{brackets[1]}'


def _number(x):
    return str(int(x)) if float(x).is_integer() else f'{x:g}'


def check_flag_ranges(args, parser):
    """UserError naming the first flag whose value is out of its range (or is nan / inf), and the range."""
    for action in parser._actions:
        if action.dest not in FLAG_RANGES or getattr(args, action.dest, None) is None:
            continue
        value = getattr(args, action.dest)
        low, high, brackets = FLAG_RANGES[action.dest]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not in_range(item, low, high, brackets):
                raise UserError(f'{action.option_strings[0]} {_number(item)} is out of range; pass '
                                f'{describe(low, high, brackets)}')
    if not DEVICE.match(args.device):
        raise UserError(f'--device {args.device} is not a device name; pass auto, cpu, cuda or cuda:N')
