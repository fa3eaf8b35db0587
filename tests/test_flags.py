import argparse
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

import main
from flags import parse_args

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
    ('--batch-size', 64), ('--epochs', 300), ('--model', 'deit_base_patch16_224'),
    ('--drop', 0.0), ('--drop-path', 0.1), ('--opt', 'adamw'), ('--opt-eps', 1e-8), ('--opt-betas', None),
    ('--clip-grad', None), ('--momentum', 0.9), ('--weight-decay', 0.05), ('--sched', 'cosine'),
    ('--lr', 5e-4), ('--warmup-lr', 1e-6), ('--min-lr', 1e-5), ('--warmup-epochs', 5),
    ('--cooldown-epochs', 10), ('--decay-rate', 0.1), ('--color-jitter', 0.3),
    ('--aa', 'rand-m9-mstd0.5-inc1'), ('--smoothing', 0.1), ('--train-interpolation', 'bicubic'),
    ('--reprob', 0.25), ('--remode', 'pixel'), ('--recount', 1), ('--mixup', 0.8), ('--cutmix', 1.0),
    ('--cutmix-minmax', None), ('--mixup-prob', 1.0), ('--mixup-switch-prob', 0.5), ('--mixup-mode', 'batch'),
    ('--model-ema-decay', 0.99996), ('--finetune', ''), ('--inat-category', 'name'), ('--output_dir', ''),
    ('--seed', 0), ('--resume', ''), ('--start_epoch', 0), ('--accum-iter', 1),
]
# --input-size (the model's own: 224 for DeiT's default model) and --num-workers (10, or the cores when fewer) are
# resolved from the model and the machine: rows of the table of differences, tested below.

DEIT_SWITCHES = [
    ('repeated_aug', True, '--repeated-aug', '--no-repeated-aug'), ('model_ema', True, '--model-ema', '--no-model-ema'),
    ('pin_mem', True, '--pin-mem', '--no-pin-mem'), ('eval', False, '--eval', None),
    ('dist_eval', True, '--dist-eval', '--no-dist-eval'), ('ThreeAugment', False, '--ThreeAugment', None),
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


def test_deits_default_model_trains_at_224_and_workers_are_10_where_there_are_the_cores():
    import flags
    args = main.get_args_parser().parse_args([])
    assert args.input_size == 224 and args.num_workers == min(10, flags.default_workers())


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
    entries = {}  # flag -> its help text, joined over lines
    for line in result.stdout.split('\n\n', 1)[1].splitlines():
        flag = line.split()[0] if line.startswith('  -') else None
        if flag:
            entries[flag.rstrip(',')] = line
            current = flag.rstrip(',')
        elif line.startswith('    ') and entries:
            entries[current] += ' ' + line.strip()
    import flags
    for flag, default in (('--epochs', '300'), ('--seed', '0'), ('--num-workers', str(flags.default_workers())),
                          ('--min-lr', '1e-05'),
                          ('--warmup-lr', '1e-06'), ('--color-jitter', '0.3'), ('--model-ema-decay', '0.99996'),
                          ('--skip-nonfinite', '0')):
        assert f'(default: {default})' in entries[flag], entries[flag]
    assert entries['--skip-nonfinite'].count('default') == 1
    assert 'models.py' not in entries['--model']


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


@pytest.mark.parametrize('text, message', [
    ('warmup_epoch: 3\n', "unknown flag 'warmup_epoch' (did you mean 'warmup_epochs'?)"),
    ('- just\n- a list\n', 'is not a mapping'),
    ('lr: 1\nmodel: [unclosed\n', 'is not valid YAML at line 3, column 1'),
    ('lr: 1\n  bad: indent\n', 'is not valid YAML at line 2, column 6'),
    ('lr: 1\nepochs: 3\nlr: 2\n', "line 3, column 1: the key 'lr' is given twice"),
    ('batch-size: 16\nbatch_size: 32\n', "'batch_size' sets --batch-size, which another key of the file sets too"),
    ('three-augment: true\nThreeAugment: false\n', "sets --three-augment, which another key"),
    ('config: other.yaml\n', 'a recipe cannot name another recipe'),
    ('data-backend: DALI\n', "data-backend: invalid choice: 'DALI' (choose from 'pil', 'dali')"),
    ('patch-embed: HMLP\n', "invalid choice: 'HMLP' (choose from 'patch', 'hmlp')"),
    ('model-ema: "false"\n', "model-ema: 'false' is not true or false; write true or false, unquoted"),
    ('bce-loss: "false"\n', "bce-loss: 'false' is not true or false"),
    ('epochs: 1.5\n', "epochs: invalid int value: '1.5'; write a whole number"),
    ('mixup-mode: foo\n', "invalid choice: 'foo' (choose from 'batch', 'pair', 'elem')"),
    ('amp: fp32\n', "amp: invalid choice: 'fp32'"),
    ('data-set: foo\n', "data-set: invalid choice: 'foo'"),
    ('batch-size: 16.0\n', "batch-size: invalid int value: '16.0'"),
    ('batch-size: [16]\n', 'batch-size: a list is not what --batch-size takes; write one value'),
    ('batch-size: null\n', 'batch-size: has no value; give one, or leave the key out for the default 64'),
    ('seed: 1.5\n', "seed: invalid int value: '1.5'"),
    ('opt-betas: 0.9\n', 'opt-betas: --opt-betas takes 2 or 3 values, not 1'),
    ('cutmix-minmax: 0.3\n', 'cutmix-minmax: --cutmix-minmax takes 2 values, not 1'),
    ('size-schedule: {0: 16}\n', 'size-schedule: a mapping is not what --size-schedule takes'),
    ('epochs: 0\n', 'epochs: --epochs 0 is out of range; pass a value >= 1'),
    ('lr: .inf\n', 'lr: --lr inf is out of range'),
])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    config = tmp_path / 'bad.yaml'
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main.cli(['-c', str(config)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0]


def test_a_config_problem_names_the_file(tmp_path, capsys):
    config = tmp_path / 'bad.yaml'
    config.write_text('amp: fp32\n')
    with pytest.raises(SystemExit):
        main.cli(['-c', str(config)])
    assert capsys.readouterr().err.startswith(f'error: --config {config}: amp:')


def test_non_utf8_and_two_configs_are_one_line_errors(tmp_path, capsys):
    config = tmp_path / 'latin1.yaml'
    config.write_bytes('model: d\xe9it\n'.encode('latin-1'))
    for argv, message in [(['-c', str(config)], 'is not UTF-8 text (byte 0xe9 at offset 8); save it as UTF-8'),
                          (['-c', str(config), '--config', str(config)], '-c/--config is given 2 times')]:
        with pytest.raises(SystemExit) as exit_info:
            main.cli(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0]


def test_config_values_take_the_command_line_path(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    config = tmp_path / 'r.yaml'
    config.write_text('data-path: ~/imagenet\nlr: 1e-3\nopt-betas: [0.9, 0.95]\nlayer-scale: null\n'
                      'no_warmup: true\nThreeAugment: true\ncutmix-minmax: [0.2, 0.8]\n')
    args = main.parse_args(['-c', '~/r.yaml'])
    assert args.data_path == str(tmp_path / 'imagenet')
    assert (args.lr, args.opt_betas, args.layer_scale) == (1e-3, [0.9, 0.95], None)
    assert (args.warmup, args.ThreeAugment, args.cutmix_minmax) == (False, True, [0.2, 0.8])
    assert main.parse_args(['-c', str(config), '--warmup', '--no-ThreeAugment']).warmup is True


def test_every_switch_can_be_turned_off():
    parser = main.get_args_parser()
    for action in parser._actions:
        if action.nargs == 0 and not isinstance(action, argparse._HelpAction):
            assert isinstance(action, argparse.BooleanOptionalAction), action.option_strings
            negative = [o for o in action.option_strings if o.startswith('--no-')]
            assert negative and getattr(parser.parse_args([negative[0]]), action.dest) is False


def other_value(action, value):
    """A value for `action` that differs from `value`, as command-line words."""
    if isinstance(action, argparse.BooleanOptionalAction):
        on = [o for o in action.option_strings if not o.startswith('--no-')][0]
        off = [o for o in action.option_strings if o.startswith('--no-')][0]
        return [off if value else on], not value
    if action.choices:
        other = [c for c in action.choices if c != value][0]
        return [action.option_strings[0], other], other
    if isinstance(value, list):
        other = list(reversed(value)) + [value[0]] if len(value) == 1 else list(reversed(value))
        return [action.option_strings[0]] + [str(v) for v in other], other
    if isinstance(value, (int, float)):
        return [action.option_strings[0], str(value + 1)], value + 1
    return [action.option_strings[0], str(value) + 'x'], str(value) + 'x'


@pytest.mark.parametrize('recipe', sorted(os.listdir(os.path.join(ROOT, 'configs'))))
def test_the_command_line_overrides_every_key_of_every_recipe(recipe):
    import yaml
    path = os.path.join(ROOT, 'configs', recipe)
    with open(path) as f:
        keys = yaml.safe_load(f)
    parser = main.get_args_parser()
    from_recipe = main.parse_args(['-c', path])
    options = {o.lstrip('-').replace('-', '_'): a for a in parser._actions for o in a.option_strings}
    for key in keys:
        action = options.get(key) or next(a for a in parser._actions if a.dest == key)
        words, expected = other_value(action, getattr(from_recipe, action.dest))
        assert getattr(main.parse_args(['-c', path] + words), action.dest) == expected, (recipe, key, words)


def test_a_data_path_wins_over_a_recipe_data_set_without_one(tmp_path, capsys):
    recipe = os.path.join(ROOT, 'configs', 'digits_dhvt.yaml')
    args = main.parse_args(['-c', recipe, '--data-path', str(tmp_path)])
    assert args.data_set is None and args.model == 'dhvt_digits_patch4_16'
    assert "data_set DIGITS left out" in capsys.readouterr().out
    assert main.parse_args(['-c', recipe, '--data-path', str(tmp_path), '--data-set', 'DIGITS']).data_set == 'DIGITS'
    assert main.parse_args(['-c', recipe]).data_set == 'DIGITS'


# ---------------------------------------------------------------- timm's spellings and DeiT's remaining flags

@pytest.mark.parametrize('flags, dest, value', [
    (['-b', '32'], 'batch_size', 32), (['-j', '3'], 'num_workers', 3), (['--workers', '3'], 'num_workers', 3),
    (['--img-size', '64'], 'input_size', 64), (['--output', 'runs/x'], 'output_dir', 'runs/x'),
    (['--initial-checkpoint', 'w.pth'], 'finetune', 'w.pth'), (['--crop-pct', '0.9'], 'eval_crop_ratio', 0.9),
    (['--num-classes', '10'], 'num_classes', 10), (['--layer-decay', '0.65'], 'layer_decay', 0.65),
    (['--patience-epochs', '3'], 'patience_epochs', 3)])
def test_timm_spellings_reach_the_same_flags(flags, dest, value):
    assert getattr(parse_args(flags), dest) == value


def test_an_unknown_flag_suggests_the_nearest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(['--lr-decay', '0.65'])
    assert exit_info.value.code == 2
    assert 'unrecognized argument --lr-decay; did you mean --layer-decay?' in capsys.readouterr().err


def test_deits_launcher_flags_are_accepted_and_ignored_with_a_note(capsys):
    import flags
    args = parse_args(['--world_size', '8', '--distributed', '--resplit'])
    flags.note_ignored_flags(args)
    assert 'note: --world_size, --distributed, --resplit accepted' in capsys.readouterr().out
    assert not hasattr(args, 'world_size') and not hasattr(args, 'distributed')  # the launcher sets these


def test_layer_decay_scales_the_lr_of_each_block_and_the_schedule_keeps_it():
    import model_factory
    import optimization
    args = parse_args(['--model', 'deit_micro_patch2_16', '--input-size', '16', '--layer-decay', '0.5'])
    args.nb_classes = 10
    model = model_factory.build_model(args)
    optimizer = optimization.build_optimizer(args, model, torch.device('cpu'))
    scheduler = optimization.build_scheduler(args, optimizer, 10)
    scheduler.step_update(60)  # past the warm-up
    scales = sorted({g['lr_scale'] for g in optimizer.param_groups})
    assert scales == [0.5 ** k for k in range(len(scales) - 1, -1, -1)] and len(scales) == len(model.blocks) + 2
    top = max(optimizer.param_groups, key=lambda g: g['lr_scale'])
    for group in optimizer.param_groups:
        assert group['lr'] == pytest.approx(top['lr'] * group['lr_scale'])


def test_num_classes_must_agree_with_the_data():
    from conftest import run_main
    result = run_main(['--data-set', 'DIGITS', '--model', 'deit_micro_patch2_16', '--input-size', '16',
                       '--num-classes', '5', '--epochs', '1', '--device', 'cpu', '--num-workers', '0'])
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: --num-classes 5, but the data set has 10 classes; leave --num-classes '
                                     'out (the classes come from the data) or point --data-path at the right data')


def test_docs_name_the_help_groups_in_order():
    from flags import get_args_parser
    parser = get_args_parser()
    groups = [re.sub(r' \(.*\)$', '', g.title) for g in parser._action_groups
              if g._group_actions and g.title not in ('positional arguments', 'options', 'optional arguments', 'help')]
    with open(os.path.join(ROOT, 'docs', 'flags.md')) as f:
        listed = re.search(r'grouped: ([^.]*)\.', f.read()).group(1).replace('\n', ' ')
    assert [re.sub(r' \(.*\)$', '', g.strip()) for g in listed.split(';')] == groups


@pytest.mark.parametrize('model, size', [('deit_micro_patch2_16', 16), ('deit_small_patch16_224', 224),
                                         ('deit_base_patch16_384', 384), ('dhvt_tiny_patch4_32', 32)])
def test_input_size_defaults_to_the_models_own(model, size):
    args = parse_args(['--model', model])
    assert (args.input_size, args.input_size_from) == (size, f"{model}'s cfg")
    assert parse_args(['--model', model, '--img-size', '48']).input_size == 48


def test_num_workers_default_is_deits_10_capped_at_the_cores(monkeypatch):
    import flags
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
    assert flags.get_args_parser().parse_args([]).num_workers == 2
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(64)))
    assert flags.get_args_parser().parse_args([]).num_workers == 10


def test_a_warmup_lr_above_the_scaled_lr_is_warned_about(capsys):
    import optimization
    args = parse_args(['--lr', '5e-6', '--batch-size', '32'])  # DeiT's fine-tuning LR on a small batch
    optimization.scale_lr(args)
    optimization.warn_warmup_above_lr(args)
    assert '--warmup-lr 1e-06 is above the LR 3.125e-07' in capsys.readouterr().out
    args = parse_args(['--lr', '5e-4', '--batch-size', '32'])
    optimization.scale_lr(args)
    optimization.warn_warmup_above_lr(args)
    assert 'warning' not in capsys.readouterr().out
