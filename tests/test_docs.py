"""The commands in README.md and docs/*.md stay true.

Every shell command of a code block, and every inline `python ...`, `torchrun ...`, `bash ...` or `scripts/...` one,
is checked against the parser it goes through: main.py's (with its -c recipe and a --model timm knows),
run_with_submitit.py's, torchrun's, each script's own. The commands a CPU runs in seconds are then run as written,
the tools on 1-epoch runs of the documented trainings, made once per test session. A command that is not run has its
reason (why_not_run): a full training, an ImageNet path, a GPU, a cluster, a download or a template."""
import argparse
import contextlib
import fcntl
import glob
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import NamedTuple

import pytest
import timm
import torch.distributed.run

from conftest import ROOT, write_image_folder

sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import flags  # noqa: E402
import hubconf  # noqa: E402
import losses  # noqa: E402
import main  # noqa: E402
import models  # noqa: E402, F401 - registers the project's models in timm
import run_with_submitit  # noqa: E402
from checkpoints import load_weights  # noqa: E402
from datasets import DATASETS  # noqa: E402

DOCS = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.yaml')))
PROGRAMS = {'python': 'python', 'python3': 'python', '.venv/bin/python': 'python', 'pip': 'pip',
            '.venv/bin/pip': 'pip', 'torchrun': 'torchrun', 'bash': 'bash'}
PLACEHOLDER = re.compile(r'^[A-Z][A-Z0-9_]*$')  # DIR, SRC, RUN_DIR, PARTITION, ...
NUMBERS = {'N': '160', 'R': '0.7', 'SEED': '0'}  # placeholders standing for a number


# ---------------------------------------------------------------- the commands in the docs

class Command(NamedTuple):
    where: str  # doc:line, every place it is written
    text: str
    program: str  # python, torchrun, bash (a scripts/*.sh also without bash) or pip
    argv: tuple  # after the program: the script (or -m) first


def parse_command(text):
    """A Command for a line that starts a known program (after NAME=value settings), else None."""
    try:
        tokens = shlex.split(text)
    except ValueError:
        return None
    while tokens and re.match(r'^[A-Z_]+=\S*$', tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] in PROGRAMS:
        program, argv = PROGRAMS[tokens[0]], tokens[1:]
    elif re.match(r'^scripts/\w+\.(sh|py)$', tokens[0]) and len(tokens) > 1:  # run without "python" / "bash"
        program, argv = ('bash' if tokens[0].endswith('.sh') else 'python'), tokens
    else:
        return None
    return Command('', text, program, tuple(argv)) if argv else None  # `torchrun` alone: a name in a sentence


def without_fences(text):
    """The doc with its fenced blocks blanked, line numbers kept, and the fenced lines by line number."""
    outside, fenced, inside = [], {}, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith('```'):
            inside = not inside
            outside.append('')
        elif inside:
            fenced[number] = line
            outside.append('')
        else:
            outside.append(line)
    return '\n'.join(outside), fenced


def commands_in(doc):
    with open(os.path.join(ROOT, doc)) as f:
        prose, fenced = without_fences(f.read())
    for number, line in fenced.items():
        line = re.sub(r'\s+#.*$', '', line).strip()  # a comment after the command
        for part in line.split(' && '):
            if not part.startswith('#'):
                yield number, part
    for match in re.finditer(r'`([^`]+)`', prose):
        yield prose.count('\n', 0, match.start()) + 1, ' '.join(match.group(1).split())


def documented_commands():
    """Each command once, with every place it is written."""
    found = {}
    for doc in DOCS:
        for number, text in commands_in(doc):
            command = parse_command(text)
            if command:
                key = (command.program, command.argv)
                where = found[key].where + ', ' if key in found else ''
                found[key] = command._replace(where=f'{where}{doc}:{number}')
    return list(found.values())


COMMANDS = documented_commands()


def command_id(command):
    return command.where.split(',')[0]


def test_the_docs_hold_the_commands_this_test_knows():
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) > 40
    for expected in ('python main.py -c configs/digits_dhvt.yaml', 'scripts/predict.py', 'run_with_submitit.py',
                     'torchrun --nnodes=2', 'scripts/folder2lmdb.py', 'scripts/prepare_data.py SRC'):
        assert any(expected in text for text in texts), expected


# ---------------------------------------------------------------- flags against the real parsers

def unbracket(tokens):
    """Optional parts written [--flag] or [DST --max-side N] kept, brackets dropped."""
    return [t.strip('[]') for t in tokens if t.strip('[]') or not t]  # '' is a value: --output_dir ''


def without_optional(tokens):
    """Optional parts written in brackets left out."""
    kept, depth = [], 0
    for token in tokens:
        depth += token.count('[')
        if depth == 0:
            kept.append(token)
        depth -= token.count(']')
    return kept


def fill(tokens, parser):
    """Placeholders made parseable: a `...` after a flag that takes a value becomes that value, another `...` is
    dropped; N, R and SEED become numbers."""
    filled = []
    for token in tokens:
        if token == '...':
            action = parser._option_string_actions.get(filled[-1]) if filled else None
            if action is not None and action.nargs != 0:
                filled.append('VALUE')
            continue
        filled.append(NUMBERS.get(token, token))
    return filled


@contextlib.contextmanager
def parse_errors_as_failures(command, tolerate_missing_required=False):
    """argparse's usage error (SystemExit 2, message on stderr) or a UserError, as a test failure naming the command.
    `tolerate_missing_required`: a template (`...`) may leave out required arguments."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            yield
    except SystemExit as e:
        message = err.getvalue().strip().splitlines()[-1:] or [f'exit {e.code}']
        if tolerate_missing_required and 'the following arguments are required' in message[0]:
            return
        pytest.fail(f'{command.where}: `{command.text}`: {message[0]}')
    except (main.UserError, ValueError) as e:
        pytest.fail(f'{command.where}: `{command.text}`: {e}')


def recipe_variants(tokens):
    """`-c configs/X.yaml` stands for every recipe."""
    if '-c' in tokens:
        index = tokens.index('-c') + 1
        if PLACEHOLDER.match(os.path.splitext(os.path.basename(tokens[index]))[0]):
            return [tokens[:index] + [path] + tokens[index + 1:] for path in CONFIGS]
    return [tokens]


def in_root(tokens):
    return [os.path.join(ROOT, t) if t.startswith('configs/') else t for t in tokens]


def check_main_flags(command, tokens, parser=None):
    parser = parser or main.get_args_parser()
    if {'-h', '--help'} & set(tokens):
        return None  # the run test prints the help
    for variant in recipe_variants(fill(tokens, parser)):
        with parse_errors_as_failures(command):
            args = main.parse_args(in_root(variant), parser)
            flags.check_flag_ranges(args, parser)
        assert timm.is_model(args.model), f'{command.where}: unknown --model {args.model}'
    return args


def script_parser(module):
    """The parser a script's main() builds: its get_args_parser(), else the first parser main() parses with."""
    if hasattr(module, 'get_args_parser'):
        return module.get_args_parser()

    class Built(Exception):
        pass

    def capture(parser, args=None, namespace=None):
        raise Built(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, 'parse_args', capture)
        with pytest.raises(Built) as built:
            module.main([])
    return built.value.args[0]


def script_module(path):
    return __import__(os.path.splitext(os.path.basename(path))[0])


def check_script_flags(command, script, tokens):
    parser = script_parser(script_module(script))
    template = '...' in tokens or not tokens
    with parse_errors_as_failures(command, tolerate_missing_required=template):
        parser.parse_args(fill(tokens, parser))


def usage_arguments(script):
    """How many positional arguments a CPU demo's usage line (`#   scripts/x.sh [A [B]]`) offers."""
    with open(os.path.join(ROOT, script)) as f:
        usage = next((line for line in f if line.startswith('#') and f'{script} [' in line), '')
    return usage.count('[')


def is_recipe_launcher(script):
    with open(os.path.join(ROOT, script)) as f:
        return '_recipe.sh' in f.read()


def check_shell_script_flags(command, script, tokens):
    assert os.path.isfile(os.path.join(ROOT, script)), f'{command.where}: {script} does not exist'
    if script == 'scripts/gpu_check.sh':  # hands its arguments to gpu_check.py
        check_script_flags(command, 'scripts/gpu_check.py', tokens)
    elif is_recipe_launcher(script):  # DATA_PATH OUTPUT_DIR, then main.py flags over the recipe
        with open(os.path.join(ROOT, script)) as f:
            recipe = re.search(r'-c "\$CONFIGS/([\w.]+\.yaml)"', f.read()).group(1)
        check_main_flags(command, ['-c', f'configs/{recipe}'] + fill(tokens, main.get_args_parser())[2:])
    else:
        assert len(tokens) <= usage_arguments(script) and not any(t.startswith('-') for t in tokens), \
            f'{command.where}: `{command.text}` does not match the usage line of {script}'


def check_torchrun_flags(command, tokens):
    with parse_errors_as_failures(command):
        tokens = fill(tokens, main.get_args_parser())
        launch = torch.distributed.run.get_args_parser().parse_args(tokens + ([] if 'main.py' in tokens else
                                                                              ['main.py']))
    if launch.training_script == 'main.py':
        check_main_flags(command, launch.training_script_args)


def check_python_flags(command, tokens):
    script, rest = tokens[0], tokens[1:]
    if script == '-m':
        assert rest[0] in ('venv', 'pytest', 'pip'), f'{command.where}: python -m {rest[0]}'
    elif script == 'main.py':
        check_main_flags(command, rest)
    elif script == 'run_with_submitit.py':
        args = check_main_flags(command, rest, run_with_submitit.get_args_parser())
        with parse_errors_as_failures(command):
            run_with_submitit.check_job_args(args)
    else:
        assert os.path.isfile(os.path.join(ROOT, script)), f'{command.where}: {script} does not exist'
        check_script_flags(command, script, rest)


@pytest.mark.parametrize('command', COMMANDS, ids=command_id)
def test_documented_command_parses(command):
    tokens = unbracket(command.argv)
    if command.program == 'python':
        check_python_flags(command, tokens)
    elif command.program == 'torchrun':
        check_torchrun_flags(command, tokens)
    elif command.program == 'bash':
        check_shell_script_flags(command, tokens[0], tokens[1:])
    else:  # pip
        if '-r' in tokens:
            assert os.path.isfile(os.path.join(ROOT, tokens[tokens.index('-r') + 1]))


def mentioned_paths():
    """Every `scripts/...`, `configs/...`, `tests/...` or `docs/...` path the docs name, braces expanded."""
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            for span in re.findall(r'`((?:scripts|configs|tests|docs)/[^`\s]+)`', f.read()):
                brace = re.search(r'\{([^}]*)\}', span)
                options = brace.group(1).split(',') if brace else ['']
                for option in options:
                    yield doc, span.replace(brace.group(0), option) if brace else span


def test_every_file_the_docs_name_exists():
    for doc, path in mentioned_paths():
        name = os.path.splitext(os.path.basename(path))[0]
        if not PLACEHOLDER.match(name):
            assert os.path.exists(os.path.join(ROOT, path)), f'{doc} names {path}, which does not exist'


def test_the_hub_entries_the_docs_load_exist():
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            for name in re.findall(r"torch\.hub\.load\('[^']*', '([^']+)'", f.read()):
                assert callable(getattr(hubconf, name, None)), f'{doc}: no hub entry {name}'


def test_the_flag_ranges_are_cited_where_they_live():
    with open(os.path.join(ROOT, 'docs', 'reliability.md')) as f:
        text = f.read()
    assert 'flag_ranges.py' not in text and '`FLAG_RANGES` in `flags.py`' in text
    assert hasattr(flags, 'FLAG_RANGES')


# ---------------------------------------------------------------- running what a CPU runs in seconds

TRAINING_SHRUNK = 'trains {epochs} epochs, longer than this file may take; the tools\' fixture runs it with --epochs 1'
NOT_RUN = {  # script -> why its commands are only checked
    'scripts/gpu_check.sh': 'needs a GPU; --tiny takes about 100 s, and tests/test_gpu_check.py runs it',
    'scripts/bench.py': 'a benchmark timing dozens of steps; tests/test_bench.py runs it at test sizes',
    'scripts/bench_photos.py': "writes the benchmark's 256 photos of 500 x 375; tests/test_bench.py writes a few",
    'scripts/convert_vit_npz.py': "needs Google's ViT-B/16 .npz; tests/test_npz.py converts a synthetic one",
    'scripts/distill_digits.sh': 'three trainings of the quick start: minutes',
    'scripts/vit_budget_digits_cpu.sh': 'two trainings of 60 s each',
    'run_with_submitit.py': 'submits a Slurm job; tests/test_submitit.py runs jobs on the local executor',
    'scripts/torchrun.py': "named in a sentence; torchrun's flags follow it",
    'scripts/throughput.py': 'a benchmark of full-size models; tests/test_evit.py times a test size',
}
INPUTS = {  # placeholder -> what the run gets in its folder
    '/path/to/imagenet': 'images', '/path/to/imagenet_lmdb': 'images_lmdb', 'SRC': 'images', 'DIR': 'images',
    'DST': 'images_copy', 'DIR160': 'images_160', 'CHECKPOINT': 'runs/digits/checkpoint.pth',
    'OUT.safetensors': 'digits.safetensors', 'RUN_DIR': 'runs/digits', 'FILE': 'plot.png', 'N': '160'}


def script_of(command):
    return command.argv[0] if command.argv[0] != '-m' else '-m ' + command.argv[1]


def is_training(command):
    return script_of(command) == 'main.py' and not {'--eval', '--help', '-h'} & set(command.argv)


def why_not_run(command):
    """The reason a command is only checked, or '' when this module runs it."""
    script, text = script_of(command), command.text
    if command.program == 'pip' or script in ('-m pip', '-m venv'):
        return 'installs packages from the package index'
    if script == '-m pytest':
        return 'the whole test suite, this file included'
    if script in NOT_RUN:
        return NOT_RUN[script]
    if command.program == 'torchrun':
        return 'a distributed run on a data set'
    if 'https://' in text or '--pretrained' in command.argv or '--hub' in command.argv:
        return 'downloads published weights'
    if '/path/to/' in text and script not in ('scripts/folder2lmdb.py', 'scripts/prepare_data.py'):
        return 'needs ImageNet at /path/to/imagenet'
    if ' /data/' in f' {text}':
        return 'needs a data set downloaded to /data'
    if is_training(command):
        if command in tool_trainings():
            return TRAINING_SHRUNK.format(epochs=main.parse_args(in_root(list(command.argv[1:]))).epochs)
        return 'a training run'
    if script == 'scripts/model_table.py' and '--model' not in command.argv:
        return 'counts every model with published figures (15 s); tests/test_model_table.py runs it'
    leftover = [t for t in without_optional(command.argv) if t == '...' or is_placeholder(INPUTS.get(t, t))]
    if leftover:
        return f'a template: {leftover[0]} stands for what you pass'
    return ''


def is_placeholder(token):
    return bool(PLACEHOLDER.match(token)) and not timm.is_model(token) and token not in DATASETS


def flag_value(command, flag):
    argv = list(command.argv)
    return argv[argv.index(flag) + 1] if flag in argv else ''


def tool_trainings():
    """The documented trainings on DIGITS whose runs/ folders the tool commands read, one per output folder."""
    found = {}
    for command in COMMANDS:
        out = flag_value(command, '--output_dir')
        if is_training(command) and out.startswith('runs/') and 'configs/digits_dhvt.yaml' in command.argv:
            found.setdefault(out, command)
    return list(found.values())


def digits_images_command():
    return next(c for c in COMMANDS if c.argv[0] == 'scripts/digits_images.sh')


def run_subprocess(argv, cwd, **env):
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable, **env))


def python_argv(tokens):
    """A documented `python SCRIPT ...` as this interpreter runs it from any folder."""
    script = os.path.join(ROOT, tokens[0])
    return [sys.executable, script] + in_root(tokens[1:])


def make_what_the_tools_read(work):
    """What the documented commands before the tools make: the DIGITS trainings (1 epoch each, side by side), the
    digit images, and a small image folder standing in for /path/to/imagenet."""
    work.mkdir()
    processes = [run_subprocess(python_argv(list(c.argv)) + ['--epochs', '1'], work) for c in tool_trainings()]
    digits = digits_images_command()
    processes.append(run_subprocess(['bash', os.path.join(ROOT, digits.argv[0])] + list(digits.argv[1:]), work))
    write_image_folder(str(work / 'images'))
    for process in processes:
        out = process.communicate(timeout=300)[0]
        assert process.returncode == 0, f'{process.args}:\n{out[-3000:]}'


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    """The folder the tool commands run against, made once per pytest session."""
    root = tmp_path_factory.getbasetemp()
    if 'PYTEST_XDIST_WORKER' in os.environ:
        root = root.parent  # this pytest session's folder, shared by its workers
    work = root / 'docs_made'
    with open(root / 'docs_made.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (work / 'done').exists():
            shutil.rmtree(work, ignore_errors=True)  # what a failed attempt left
            make_what_the_tools_read(work)
            (work / 'done').touch()
    return work


@pytest.fixture
def workdir(made, tmp_path, monkeypatch):
    """A fresh folder holding links to what the earlier commands made: outputs of one run stay apart."""
    for name in os.listdir(made):
        os.symlink(made / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_in_process(tokens, capsys):
    module = script_module(tokens[0])
    try:
        code = module.main(tokens[1:])
    except SystemExit as e:
        code = e.code
    output = capsys.readouterr()
    assert code in (None, 0), f'`{" ".join(tokens)}` exited {code}: {output.err[-2000:]}'
    return output.out


def run_main_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.cli(['--help'])
    assert exit_info.value.code == 0
    assert '--data-path' in capsys.readouterr().out


def run_main(tokens, workdir):
    process = run_subprocess(python_argv(tokens), workdir)
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out[-3000:]
    return out


RUN = [command for command in COMMANDS if not why_not_run(command)]


def test_the_commands_not_run_are_the_long_or_unreachable_ones():
    """What is only checked, and why (full trainings, ImageNet paths, GPUs, clusters, downloads, templates)."""
    reasons = [why_not_run(command) for command in COMMANDS if command not in RUN]
    assert len(RUN) >= 15 and all(reason.strip() for reason in reasons)


@pytest.mark.parametrize('command', RUN, ids=command_id)
def test_documented_command_runs(command, request, capsys):
    workdir = request.getfixturevalue('workdir')
    tokens = [INPUTS.get(t, t) for t in without_optional(command.argv)]
    if command == digits_images_command():  # the fixture ran it as written
        folder, count = (tokens[1:] + ['digits', '8'])[:2]
        assert len(os.listdir(workdir / folder)) == int(count)
    elif tokens[:2] == ['main.py', '--help']:
        run_main_help(capsys)
    elif tokens[0] == 'main.py':
        run_main(tokens, workdir)
    else:
        run_in_process(tokens, capsys)
    for flag, value in zip(tokens, tokens[1:]):
        if flag in ('-o', '--output', '--plot', '--output_dir'):
            assert os.path.exists(value), f'{command.where}: nothing written to {value}'


def test_the_tools_read_what_documented_commands_make(made):
    """The tool commands of docs/tools.md read folders the commands before them make."""
    for command in COMMANDS:
        if command.where.startswith('docs/tools.md') and not why_not_run(command):
            for token in command.argv:
                if token.startswith(('runs/', 'digits/')) and token.endswith(('.pth', '.png', '/')):
                    assert (made / token).exists(), f'{command.where}: nothing documented makes {token}'


# ---------------------------------------------------------------- LOCAL=1 of the recipes that need weights

def local_launch(recipe, tmp_path):
    """LOCAL=1 of a recipe with a stand-in python: the main.py argv, and a copy of every .pth it names."""
    keep = tmp_path / 'kept'
    keep.mkdir()
    fake = tmp_path / 'python'
    fake.write_text(f'#!/bin/sh\n[ "$1" = - ] && exec {sys.executable} "$@"\nprintf "%s\\n" "$@" > {tmp_path}/argv\n'
                    f'for a in "$@"; do case "$a" in *.pth) cp "$a" {keep}/;; esac; done\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ('TEACHER_PATH', 'FINETUNE')}
    result = subprocess.run(['bash', os.path.join(ROOT, 'scripts', recipe)], cwd=tmp_path, capture_output=True,
                            text=True, env=dict(env, LOCAL='1', PYTHON=str(fake), OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / 'argv').read_text().splitlines()
    return result.stdout, main.parse_args(argv[1:]), keep


def test_local_distilled_recipe_needs_no_network(tmp_path):
    out, args, kept = local_launch('deit_small_distilled_imagenet.sh', tmp_path)
    assert 'LOCAL=1: a random regnety_002 stands in for the recipe\'s teacher' in out
    assert args.teacher_model == 'regnety_002' and args.data_set == 'FAKE'
    weights = os.path.join(kept, os.path.basename(args.teacher_path))
    teacher = losses.build_teacher(args.teacher_model, weights, args.fake_classes, args.input_size, 'cpu')
    assert not teacher.training
    assert not os.path.exists(os.path.dirname(args.teacher_path))  # the stand-in goes when the launcher ends


def test_local_finetune_recipe_needs_no_earlier_run(tmp_path):
    out, args, kept = local_launch('deit3_small_finetune_384.sh', tmp_path)
    assert 'LOCAL=1: a random deit3_small_patch16_224 stands in for runs/deit3_small_imagenet/checkpoint.pth' in out
    model = timm.create_model(args.model, img_size=args.input_size, num_classes=args.fake_classes)
    load_weights(model, os.path.join(kept, os.path.basename(args.finetune)), '--finetune', finetune=True)
    assert not os.path.exists(os.path.dirname(args.finetune))
