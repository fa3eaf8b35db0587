import argparse
import inspect
import os
import re
import subprocess
import sys

import pytest

import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ('main.py', 'checkpoints.py', 'model_factory.py', 'engine.py', 'datasets.py', 'samplers.py', 'losses.py',
           'utils.py', 'models.py', 'run_with_submitit.py', 'hubconf.py', 'flags.py', 'images.py', 'loaders.py',
           'optimization.py', 'schedules.py')


def parser_actions():
    return [a for a in main.get_args_parser()._actions if not isinstance(a, argparse._HelpAction)]


def project_source_without_parser():
    lines, start = inspect.getsourcelines(main.get_args_parser)
    parser_lines = set(range(start, start + len(lines)))
    text = []
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not (name == 'flags.py' and number in parser_lines):
                    text.append(line)
    return ''.join(text)


def test_no_dead_flag():
    source = project_source_without_parser()
    dead = sorted({a.dest for a in parser_actions()
                   if not re.search(r'\bargs\.' + re.escape(a.dest) + r'\b', source)})
    assert dead == []


def test_parser_lines_are_excluded():
    source = project_source_without_parser()
    assert "add_argument('--batch-size'" not in source
    assert 'args.batch_size' in source


DEIT_DEFAULTS = [
    ('--batch-size', 64), ('--epochs', 300), ('--model', 'deit_base_patch16_224'), ('--input-size', 224),
    ('--drop', 0.0), ('--drop-path', 0.1), ('--opt', 'adamw'), ('--opt-eps', 1e-8), ('--opt-betas', None),
    ('--clip-grad', None), ('--momentum', 0.9), ('--weight-decay', 0.05), ('--sched', 'cosine'),
    ('--lr', 5e-4), ('--warmup-lr', 1e-6), ('--min-lr', 1e-5), ('--warmup-epochs', 5),
    ('--cooldown-epochs', 10), ('--decay-rate', 0.1), ('--color-jitter', 0.3),
    ('--aa', 'rand-m9-mstd0.5-inc1'), ('--smoothing', 0.1), ('--train-interpolation', 'bicubic'),
    ('--reprob', 0.25), ('--remode', 'pixel'), ('--recount', 1), ('--mixup', 0.8), ('--cutmix', 1.0),
    ('--cutmix-minmax', None), ('--mixup-prob', 1.0), ('--mixup-switch-prob', 0.5), ('--mixup-mode', 'batch'),
    ('--model-ema-decay', 0.99996), ('--finetune', ''), ('--inat-category', 'name'), ('--output_dir', ''),
    ('--seed', 0), ('--resume', ''), ('--start_epoch', 0), ('--num_workers', 10), ('--eval-crop-ratio', 0.875),
    ('--accum-iter', 1),
]

DEIT_SWITCHES = [
    ('repeated_aug', True, '--repeated-aug', '--no-repeated-aug'), ('model_ema', True, '--model-ema', '--no-model-ema'),
    ('pin_mem', True, '--pin-mem', '--no-pin-mem'), ('eval', False, '--eval', None),
    ('dist_eval', False, '--dist-eval', None), ('ThreeAugment', False, '--ThreeAugment', None),
    ('src', False, '--src', None), ('unscale_lr', False, '--unscale-lr', None),
    ('bce_loss', False, '--bce-loss', None), ('compile', False, '--compile', None),
]


def option(flag):
    parser = main.get_args_parser()
    assert flag in parser._option_string_actions, f'{flag} missing'
    return parser, parser._option_string_actions[flag]


@pytest.mark.parametrize('flag, default', DEIT_DEFAULTS)
def test_deit_flag_default(flag, default):
    parser, action = option(flag)
    value = parser.get_default(action.dest)
    assert value == default and type(value) is type(default)
    assert getattr(parser.parse_args([]), action.dest) == default


@pytest.mark.parametrize('dest, default, on, off', DEIT_SWITCHES)
def test_deit_switch_default(dest, default, on, off):
    parser, action = option(on)
    assert action.dest == dest
    assert getattr(parser.parse_args([]), dest) is default
    assert getattr(parser.parse_args([on]), dest) is True
    if off is not None:
        assert option(off)[1].dest == dest
        assert getattr(parser.parse_args([off]), dest) is False


def test_amp_choices():
    parser, action = option('--amp')
    assert set(action.choices) == {'bf16', 'fp16', 'none', 'auto'}
    assert parser.parse_args(['--amp', 'fp16']).amp == 'fp16'
    with pytest.raises(SystemExit):
        parser.parse_args(['--amp', 'fp32'])


def test_typed_values_parse():
    args = main.get_args_parser().parse_args(['--opt-betas', '0.9', '0.95', '--clip-grad', '1', '--dr', '0.5',
                                             '--accum-iter', '4'])
    assert args.opt_betas == [0.9, 0.95] and args.clip_grad == 1.0
    assert args.decay_rate == 0.5 and args.accum_iter == 4


def test_help_shows_groups():
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), '--help'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    headings = {line[:-1] for line in result.stdout.splitlines() if line and not line[0].isspace()
                and line.endswith(':')}
    assert {'training', 'model', 'optimizer', 'augmentation', 'data', 'run', 'distributed'} <= headings
    assert '--batch-size' in result.stdout and '--ThreeAugment' in result.stdout


# ---------------------------------------------------------------- -c / --config FILE.yaml

QUICK_START = ('--data-set DIGITS --model dhvt_digits_patch4_16 --input-size 16 --batch-size 32 --epochs 8 --lr 1e-3 '
               '--unscale-lr --warmup-epochs 1 --mixup 0 --cutmix 0 --reprob 0 --aa none --hflip 0 --no-repeated-aug '
               '--drop-path 0 --no-model-ema --num_workers 0').split()


def test_the_quick_start_config_is_the_quick_start_flags():
    from_config = vars(main.parse_args(['-c', os.path.join(ROOT, 'configs', 'digits_dhvt.yaml')]))
    from_flags = vars(main.parse_args(QUICK_START))
    assert {k: v for k, v in from_config.items() if k != 'config'} == {k: v for k, v in from_flags.items()
                                                                      if k != 'config'}


def test_config_sets_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / 'r.yaml'
    config.write_text('# a recipe\nmodel: deit_tiny_patch4_32\nwarmup-epochs: 2\nlr: 0.002\nmodel_ema: false\n')
    args = main.parse_args(['-c', str(config), '--lr', '3e-3'])
    assert (args.model, args.warmup_epochs, args.lr, args.model_ema) == ('deit_tiny_patch4_32', 2, 3e-3, False)
    assert main.parse_args(['--config', str(config), '--model-ema']).model_ema is True


@pytest.mark.parametrize('text, message', [('warmup_epoch: 3\n', "unknown flag 'warmup_epoch' (did you mean "
                                                                 "'warmup_epochs'?)"),
                                           ('- just\n- a list\n', 'is not a mapping'),
                                           ('model: [unclosed\n', 'cannot be read')])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    config = tmp_path / 'bad.yaml'
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main.cli(['-c', str(config)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0]
