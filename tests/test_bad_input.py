"""Hostile input, class by class: every bad value, file or signal gets one line and exit 2 (or a clean stop), and
no file of the user's is lost."""
import io
import os
import signal
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image

import checkpoints
import datasets
import main
import utils
from conftest import ROOT, TINY, read_log, run_main, write_image_folder
from flags import FLAG_RANGES
from samplers import SeededDataset, collate_skipping_none

FOLDER_RUN = TINY + ['--data-set', 'FOLDER', '--batch-size', '8', '--epochs', '1']


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
    return lines[0]


def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.cli([str(a) for a in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    return lines[0]


# ---------------------------------------------------------------- bad image files name themselves

def png_bomb_header(side=100_000):
    """A PNG whose header claims side x side pixels: PIL refuses it as a decompression bomb."""
    ihdr = struct.pack('>IIBBBBB', side, side, 8, 2, 0, 0, 0)
    chunk = b'IHDR' + ihdr
    return b'\x89PNG\r\n\x1a\n' + struct.pack('>I', len(ihdr)) + chunk + struct.pack('>I', zlib.crc32(chunk))


def truncated_jpeg():
    buffer = io.BytesIO()
    Image.new('RGB', (64, 64), (200, 10, 10)).save(buffer, 'JPEG')
    return buffer.getvalue()[:200]


BAD_FILES = {'text.jpg': b'just some words, not an image', 'truncated.jpg': truncated_jpeg(), 'empty.png': b'',
             'bomb.png': png_bomb_header()}


@pytest.mark.parametrize('name', sorted(BAD_FILES))
def test_every_kind_of_bad_image_names_its_full_path(tmp_path, name):
    path = tmp_path / ('a-long-folder-name-that-would-not-fit-in-eighty-characters' * 2) / name
    path.parent.mkdir()
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(datasets.BadImageError) as error:
        datasets.load_rgb(str(path))
    line = main.one_line(error.value)
    assert line.startswith(f'unreadable image {path} (') and '<_io' not in line and 'the file' not in line and '\n' not in line
    # as a DataLoader worker re-raises it: the traceback text, its last line prefixed with the exception's name
    worker_text = f'Caught BadImageError in DataLoader worker process 0.\nTraceback ...\n' \
                  f'datasets.BadImageError: {error.value}'
    assert main.one_line(RuntimeError(worker_text)) == line


@pytest.mark.parametrize('workers', ['0', '2'])
def test_a_bad_image_stops_the_run_with_its_path_whatever_the_workers(tmp_path, workers):
    root = write_image_folder(str(tmp_path / 'data'))
    bad = os.path.join(root, 'train', 'cat', 'x.jpg')
    with open(bad, 'w') as f:
        f.write('not an image')
    result = run_main(FOLDER_RUN + ['--data-path', root, '--num_workers', workers, '--output_dir', tmp_path / 'o'])
    assert one_error_line(result).startswith(f'error: unreadable image {bad} (UnidentifiedImageError')


# ---------------------------------------------------------------- special files and link loops

def test_named_pipe_is_skipped_and_never_read(tmp_path):
    root = write_image_folder(str(tmp_path / 'data'))
    pipe = os.path.join(root, 'train', 'cat', 'pipe.jpg')
    os.mkfifo(pipe)
    with pytest.raises(datasets.BadImageError, match='not a regular file'):
        datasets.load_rgb(pipe)  # returns at once: a FIFO is never opened
    result = run_main(FOLDER_RUN + ['--data-path', root, '--output_dir', tmp_path / 'o'], timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'skipped {pipe} (not a regular file)' in result.stdout


def test_link_loops_count_each_file_once_under_its_class(tmp_path):
    root = write_image_folder(str(tmp_path / 'data'))
    os.symlink('.', os.path.join(root, 'val', 'cat', 'loop'))
    os.symlink('..', os.path.join(root, 'val', 'dog', 'up'))
    os.makedirs(os.path.join(root, 'val', 'fish', 'deeper'))
    os.symlink('../deeper', os.path.join(root, 'val', 'fish', 'deeper', 'again'))
    args = main.get_args_parser().parse_args(['--data-set', 'FOLDER', '--data-path', root, '--input-size', '8'])
    dataset, classes = datasets.build_dataset(False, args)
    assert len(dataset) == 12  # 3 classes x 4 images, none repeated
    for path, label in dataset.samples:
        assert os.path.relpath(path, os.path.join(root, 'val')).split(os.sep)[0] == classes[label]
    assert len(dataset.skipped) == 3 and all('link' in s for s in dataset.skipped)


def test_links_to_image_files_elsewhere_are_read(tmp_path):
    root = write_image_folder(str(tmp_path / 'data'))
    outside = tmp_path / 'pool.png'
    Image.new('RGB', (12, 12), (1, 2, 3)).save(outside)
    os.symlink(outside, os.path.join(root, 'train', 'cat', 'linked.png'))
    files, skipped = datasets.scan_class_folder(os.path.join(root, 'train', 'cat'))
    assert os.path.join(root, 'train', 'cat', 'linked.png') in files and not skipped


# ---------------------------------------------------------------- --skip-bad-images keeps batches valid

class Flaky(torch.utils.data.Dataset):
    """Items 0..n-1; those in `bad` raise BadImageError."""

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if index in self.bad:
            raise datasets.BadImageError(f'unreadable image {index}')
        return torch.full((2,), float(index)), index


def test_training_refills_a_bad_sample_with_the_next_readable_one():
    dataset = SeededDataset(Flaky(6, bad={1, 2, 5}), skip=(datasets.BadImageError,), refill=True)
    samples = [dataset[(i, 7)] for i in range(6)]
    assert [(target, skipped) for _, target, skipped in samples] == [(0, 0), (3, 2), (3, 1), (3, 0), (4, 0), (0, 1)]
    batch = collate_skipping_none(samples[:4])
    assert batch[0].shape == (4, 2) and batch[2].sum() == 3
    with pytest.raises(datasets.BadImageError, match='none of the 3 items'):
        SeededDataset(Flaky(3, bad={0, 1, 2}), skip=(datasets.BadImageError,), refill=True)[(0, 1)]


def test_evaluation_drops_bad_samples_and_a_batch_of_only_bad_ones():
    dataset = SeededDataset(Flaky(4, bad={0, 1}), skip=(datasets.BadImageError,))
    assert collate_skipping_none([dataset[0], dataset[1]]) is None
    assert collate_skipping_none([dataset[1], dataset[2]])[1].tolist() == [2]


def test_skip_bad_images_with_mixup_counts_train_and_val(tmp_path):
    root = write_image_folder(str(tmp_path / 'data'))
    for split, names in (('train', ['b1.jpg', 'b2.jpg', 'b3.jpg']), ('val', ['v1.jpg', 'v2.jpg'])):
        for name in names:
            with open(os.path.join(root, split, 'dog', name), 'wb') as f:
                f.write(b'\xff\xd8 not a jpeg')
    flags = ['--model', 'deit_micro_patch2_16', '--input-size', '8', '--batch-size', '4', '--epochs', '1',
             '--num_workers', '0', '--device', 'cpu', '--no-model-ema', '--data-set', 'FOLDER', '--data-path', root,
             '--skip-bad-images', '--output_dir', tmp_path / 'o']  # Mixup / CutMix on (DeiT's defaults)
    result = run_main(flags)
    assert result.returncode == 0, result.stderr[-2000:]
    [epoch] = read_log(tmp_path / 'o')[1]
    assert epoch['skipped_images'] >= 1 and epoch['skipped_val_images'] == 2
    assert '2 unreadable images skipped, not counted' in result.stdout


# ---------------------------------------------------------------- every numeric flag has a range

def out_of_range(low, high, brackets, is_int):
    if low != -float('inf'):
        value = low if brackets[0] == '(' else low - (1 if is_int else 0.5)
    else:
        value = high if brackets[1] == ')' else high + 1
    return int(value) if is_int else value


def numeric_actions():
    return [a for a in main.get_args_parser()._actions if a.type in (int, float)]


def test_every_numeric_flag_has_a_range():
    assert sorted(a.dest for a in numeric_actions()) == sorted(FLAG_RANGES)


@pytest.mark.parametrize('action', numeric_actions(), ids=lambda a: a.option_strings[0])
def test_an_out_of_range_value_is_one_line_naming_the_flag(action, capsys, tmp_path):
    low, high, brackets = FLAG_RANGES[action.dest]
    value = out_of_range(low, high, brackets, action.type is int)
    flag = action.option_strings[0]
    others = [str(low if brackets[0] == '[' else high)] * (action.nargs - 1) if isinstance(action.nargs, int) else []
    line = cli_error([flag, value, *others, '--output_dir', tmp_path / 'o'], capsys)
    assert line.startswith(f'error: {flag} {value} is out of range; pass a value')
    if action.type is float:
        assert cli_error([flag, 'nan', *others], capsys).startswith(f'error: {flag} nan is out of range')
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('flags', [['--time-budget', '0'], ['--time-budget', '-1'], ['--clip-grad', '-1'],
                                   ['--device', 'gpu'], ['--device', 'cuda:x'], ['--opt-betas', '0.9', '1.2']])
def test_the_reported_bad_values(flags, capsys):
    assert flags[0] in cli_error(flags, capsys)


# ---------------------------------------------------------------- what a run needs before it starts

def test_eval_without_weights_is_an_error(tmp_path, capsys):
    line = cli_error(TINY + ['--eval', '--output_dir', tmp_path / 'o'], capsys)
    assert '--eval needs weights' in line and not (tmp_path / 'o').exists()


def test_start_epoch_past_the_end_without_a_checkpoint(tmp_path, capsys):
    line = cli_error(TINY + ['--start_epoch', '5', '--output_dir', tmp_path / 'o'], capsys)
    assert '--start_epoch 5 leaves nothing to train in --epochs 2 and there is no checkpoint' in line
    assert not (tmp_path / 'o').exists()


def test_output_dir_that_is_or_lies_under_a_file(tmp_path, capsys):
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('mine')
    assert 'is a file' in cli_error(TINY + ['--output_dir', a_file], capsys)
    assert 'lies under' in cli_error(TINY + ['--output_dir', a_file / 'run'], capsys)
    assert a_file.read_text() == 'mine'


# ---------------------------------------------------------------- the user's files and checkpoints not ours

def test_only_our_own_temporaries_of_ended_processes_are_cleaned(tmp_path):
    import subprocess
    ended = subprocess.Popen(['true'])
    ended.wait()
    out = tmp_path / 'o'
    out.mkdir()
    (out / '.notes.tmp.txt').write_text('keep me')
    (out / '.checkpoint.pth.tmp.folder').mkdir()
    (out / f'.checkpoint.pth.tmp.{ended.pid}').write_bytes(b'half a checkpoint')
    (out / f'.best_checkpoint.pth.tmp.{ended.pid}').write_bytes(b'half a checkpoint')
    (out / f'.checkpoint.pth.tmp.{os.getpid()}').write_bytes(b'a live process writing')
    utils.remove_stale_temp_files(str(out), (checkpoints.CHECKPOINT, checkpoints.BEST_CHECKPOINT))
    assert sorted(os.listdir(out)) == [f'.checkpoint.pth.tmp.{os.getpid()}', '.checkpoint.pth.tmp.folder',
                                       '.notes.tmp.txt']


@pytest.mark.parametrize('content', [[1, 2], torch.ones(3), {'model': None, 'epoch': 0},
                                     {'model': {'w': 'not a tensor'}}], ids=['list', 'tensor', 'none', 'str'])
def test_checkpoints_that_are_not_ours_are_one_line_errors(tmp_path, content):
    path = tmp_path / 'odd.pth'
    torch.save(content, path)
    with pytest.raises(utils.UserError, match=f'checkpoint {path} holds'):
        utils.model_weights(utils.load_checkpoint(str(path)), str(path))


def test_resume_finetune_teacher_and_auto_resume_on_odd_checkpoints(tmp_path):
    weights = {'w': torch.zeros(2)}
    no_epoch = tmp_path / 'no_epoch.pth'
    torch.save({'model': weights, 'optimizer': {}}, no_epoch)
    a_list = tmp_path / 'list.pth'
    torch.save([weights], a_list)
    for flags in (['--resume', no_epoch], ['--resume', a_list], ['--finetune', a_list],
                  ['--distillation-type', 'hard', '--teacher-model', 'deit_micro_patch2_16', '--teacher-path', a_list,
                   '--model', 'deit_micro_distilled_patch2_16']):
        result = run_main(TINY + ['--epochs', '1'] + flags)
        line = one_error_line(result)
        assert str(flags[1] if flags[0] != '--distillation-type' else a_list) in line
    out = tmp_path / 'auto'
    out.mkdir()
    torch.save({'model': weights, 'epoch': 0, 'args': None}, out / 'checkpoint.pth')
    assert 'another run' in one_error_line(run_main(TINY + ['--output_dir', out]))


def test_overwrite_keeps_a_corrupt_checkpoint_aside(tmp_path):
    out = tmp_path / 'o'
    out.mkdir()
    (out / 'checkpoint.pth').write_bytes(b'garbage')
    assert '--overwrite' in one_error_line(run_main(TINY + ['--epochs', '1', '--output_dir', out]))
    result = run_main(TINY + ['--epochs', '1', '--output_dir', out, '--overwrite'])
    assert result.returncode == 0, result.stderr[-2000:]
    aside = [name for name in os.listdir(out) if name.startswith('checkpoint.pth.unreadable-')]
    assert len(aside) == 1 and (out / aside[0]).read_bytes() == b'garbage'


def test_resume_refuses_other_class_names(tmp_path):
    out = tmp_path / 'o'
    first = write_image_folder(str(tmp_path / 'a'), classes=('cat', 'dog', 'fish'))
    assert run_main(FOLDER_RUN + ['--data-path', first, '--output_dir', out]).returncode == 0
    second = write_image_folder(str(tmp_path / 'b'), classes=('ant', 'dog', 'fish'))
    line = one_error_line(run_main(FOLDER_RUN + ['--data-path', second, '--output_dir', out, '--epochs', '2']))
    assert "other class names: 'cat' there, 'ant' here" in line


# ---------------------------------------------------------------- stop signals, with DataLoader workers

def start(args, **popen):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py')] + [str(a) for a in args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def wait_for_progress(proc, count=3):
    seen = 0
    for line in proc.stdout:
        seen += line.startswith('Epoch:')
        if seen >= count:
            return True
    return False


@pytest.mark.parametrize('sig, to_group', [(signal.SIGTERM, True), (signal.SIGINT, True), (signal.SIGINT, False)],
                         ids=['sigterm-group', 'sigint-group', 'sigint'])
def test_stop_signal_with_workers_saves_and_resumes(tmp_path, sig, to_group):
    args = TINY + ['--epochs', '3', '--batch-size', '8', '--print-freq', '1', '--num_workers', '2',
                   '--output_dir', tmp_path]
    proc = start(args, start_new_session=True)
    assert wait_for_progress(proc)
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest[-3000:]
    assert 'checkpoint saved' in rest and 'Traceback' not in rest and 'killed by signal' not in rest
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert ckpt['step_in_epoch'] > 0  # stopped inside epoch 0, at the next update
    result = run_main(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'resumed from' in result.stdout
    assert [e['epoch'] for e in read_log(tmp_path)[1]][-1] == 2
