"""No lost progress: kills, signals, non-finite losses, bad images and failed saves."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, read_log, run_main, write_image_folder

# Defaults kept on purpose (mixup, cutmix, RandAugment, random erasing, drop path, EMA): resume must be exact
# with every source of randomness in play.
EXACT = ['--model', 'deit_micro_patch2_16', '--input-size', '8', '--batch-size', '16', '--epochs', '2',
         '--num_workers', '0', '--device', 'cpu', '--print-freq', '1']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_weights(a, b):
    for part in ('model', 'model_ema'):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f'{part}.{key} differs'


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp('reference')
    result = run_main(EXACT + ['--output_dir', out])
    assert result.returncode == 0, result.stderr
    return load(os.path.join(out, 'checkpoint.pth'))


def start_training(args):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py')] + [str(a) for a in args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_progress_lines(proc, count):
    """Read the child's output until `count` progress lines have passed; False if it ended first."""
    seen = 0
    for line in proc.stdout:
        if line.startswith('Epoch:'):
            seen += 1
            if seen >= count:
                return True
    return False


# The reference run loads in the main process; resumed runs with DataLoader workers must still match it.
WORKERS = pytest.mark.parametrize('workers', [0, 2])


@WORKERS
def test_kill_9_at_random_moments_then_resume_is_bit_identical(reference, tmp_path, workers):
    rng = random.Random(1)
    args = EXACT + ['--output_dir', tmp_path, '--save-every', '1', '--num_workers', workers]  # saves at every step: kills land in saves too
    kills = 0
    while kills < 6:
        proc = start_training(args)
        if not wait_for_progress_lines(proc, rng.randint(1, 12)):
            proc.wait()
            break
        time.sleep(rng.uniform(0, 0.05))
        proc.kill()
        proc.wait()
        kills += 1
    assert kills >= 5
    result = run_main(args)
    assert result.returncode == 0, result.stderr
    assert 'resumed from' in result.stdout
    assert_same_weights(reference, load(tmp_path / 'checkpoint.pth'))
    assert not [name for name in os.listdir(tmp_path) if '.tmp.' in name]  # a kill's leftovers are cleaned


@WORKERS
def test_sigterm_checkpoints_exits_cleanly_and_resumes_exactly(reference, tmp_path, workers):
    args = EXACT + ['--output_dir', tmp_path, '--num_workers', workers]
    proc = start_training(args)
    assert wait_for_progress_lines(proc, 30)  # step 30 of epoch 0's 89
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0
    assert 'checkpoint saved' in rest
    ckpt = load(tmp_path / 'checkpoint.pth')
    assert ckpt['step_in_epoch'] > 0
    result = run_main(args)
    assert result.returncode == 0, result.stderr
    assert f"step {ckpt['step_in_epoch']}" in result.stdout
    assert_same_weights(reference, load(tmp_path / 'checkpoint.pth'))


@WORKERS
def test_save_every_checkpoint_resumes_exactly(reference, tmp_path, workers):
    """A run that stopped right after a --save-every checkpoint continues to the same weights and losses."""
    first = tmp_path / 'first'
    args = EXACT + ['--output_dir', first, '--save-every', '7', '--num_workers', workers]
    proc = start_training(args)
    assert wait_for_progress_lines(proc, 60)
    proc.kill()
    proc.wait()
    ckpt = load(first / 'checkpoint.pth')
    assert ckpt['step_in_epoch'] % 7 == 0 and ckpt['step_in_epoch'] > 0
    result = run_main(args)
    assert result.returncode == 0, result.stderr
    assert_same_weights(reference, load(first / 'checkpoint.pth'))


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': {'w': torch.ones(3)}}, path)
    before = path.read_bytes()
    child = (
        'import os, sys, torch\n'
        f'sys.path.insert(0, {ROOT!r})\n'
        'import utils\n'
        'def dying_save(obj, f):\n'
        '    f.write(b"partial checkpoint bytes")\n'
        '    f.flush()\n'
        '    os._exit(9)\n'
        'torch.save = dying_save\n'
        f'utils.save_checkpoint({{"model": {{"w": torch.zeros(3)}}}}, {str(path)!r})\n')
    result = subprocess.run([sys.executable, '-c', child], capture_output=True)
    assert result.returncode == 9
    assert path.read_bytes() == before
    assert torch.equal(load(path)['model']['w'], torch.ones(3))


def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import utils
    path = tmp_path / 'checkpoint.pth'
    utils.save_checkpoint({'v': torch.ones(1)}, str(path))

    def disk_full(obj, f):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(OSError):
        utils.save_checkpoint({'v': torch.zeros(1)}, str(path))
    assert torch.equal(load(path)['v'], torch.ones(1))
    assert os.listdir(tmp_path) == ['checkpoint.pth']


def test_unwritable_checkpoint_warns_or_stops_as_asked(tmp_path):
    blocker = tmp_path / 'checkpoint.pth' / 'in-the-way'  # a folder where the checkpoint should go
    blocker.mkdir(parents=True)
    args = TINY + ['--output_dir', tmp_path]
    go_on = run_main(args + ['--on-save-error', 'continue'])
    assert go_on.returncode == 0, go_on.stderr
    assert 'warning: could not write' in go_on.stdout
    stop = run_main(args + ['--on-save-error', 'stop'])
    assert stop.returncode == 2
    assert stop.stderr.startswith('error: could not write')


def run_cli(argv, capsys):
    """main.cli in this process; returns (exit code, stdout, stderr). The signal handlers a run installs are put
    back afterwards."""
    import main
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        main.cli([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_with_nan_loss_at(calls, argv, monkeypatch, capsys):
    """run_cli with the criterion's output turned to NaN at the given calls (0 = its first in this run)."""
    import losses
    seen = []
    forward = losses.DistillationLoss.forward

    def faulty(self, *inputs):
        seen.append(None)
        loss = forward(self, *inputs)
        return loss * float('nan') if len(seen) - 1 in calls else loss
    monkeypatch.setattr(losses.DistillationLoss, 'forward', faulty)
    return run_cli(argv, capsys)


def test_nonfinite_loss_stops_with_epoch_step_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    args = TINY + ['--output_dir', tmp_path]
    assert run_main(args).returncode == 0
    before = (tmp_path / 'checkpoint.pth').read_bytes()
    code, _, err = run_with_nan_loss_at({12}, args + ['--epochs', '4'], monkeypatch, capsys)  # resumes at epoch 2
    assert code == 1
    assert err.strip().splitlines() == [
        'error: loss is nan at epoch 2, step 12 (of 44) after 0 skipped; the last checkpoint is kept']
    assert (tmp_path / 'checkpoint.pth').read_bytes() == before


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch, capsys):
    code, out, err = run_with_nan_loss_at({3}, TINY + ['--output_dir', tmp_path, '--skip-nonfinite', '2'],
                                          monkeypatch, capsys)
    assert code == 0, err
    assert 'skipping non-finite loss nan at epoch 0, step 3' in out
    assert [e['skipped_nonfinite'] for e in read_log(tmp_path)[1]] == [1, 0]


def corrupt_folder(root):
    write_image_folder(root)
    with open(os.path.join(root, 'train', 'dog', 'broken.jpg'), 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    return os.path.join(root, 'train', 'dog', 'broken.jpg')


def test_corrupt_image_stops_with_its_name(tmp_path):
    bad = corrupt_folder(str(tmp_path / 'data'))
    out = tmp_path / 'out'
    result = run_main(TINY + ['--data-set', 'FOLDER', '--data-path', tmp_path / 'data', '--batch-size', '37',
                              '--no-repeated-aug', '--output_dir', out, '--num_workers', '1'])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: unreadable image {bad}')
    assert not (out / 'checkpoint.pth').exists()


def test_skip_bad_images_counts_them(tmp_path):
    corrupt_folder(str(tmp_path / 'data'))
    result = run_main(TINY + ['--data-set', 'FOLDER', '--data-path', tmp_path / 'data', '--batch-size', '37',
                              '--output_dir', tmp_path / 'out', '--skip-bad-images', '--no-repeated-aug'])
    assert result.returncode == 0, result.stderr
    import json
    epochs = [json.loads(line) for line in (tmp_path / 'out' / 'log.txt').read_text().splitlines()[1:]]
    assert [e['skipped_images'] for e in epochs] == [1, 1]  # 37 images, one batch of 37: the broken one


def test_mixed_mode_images_are_converted(tmp_path):
    root = tmp_path / 'data'
    write_image_folder(str(root))
    extra = root / 'train' / 'cat'
    Image.new('CMYK', (12, 12), (10, 20, 30, 0)).save(extra / 'cmyk.jpg')
    Image.new('I;16', (12, 12), 40000).save(extra / 'deep.png')
    Image.new('LA', (12, 12), (100, 128)).save(extra / 'gray_alpha.png')
    result = run_main(TINY + ['--data-set', 'FOLDER', '--data-path', root, '--batch-size', '8'])
    assert result.returncode == 0, result.stderr


def test_weights_only_round_trip_and_unsafe_pickle_refused(tmp_path):
    import utils
    good = tmp_path / 'good.pth'
    utils.save_checkpoint({'model': {'w': torch.arange(4.0)}, 'args': {'model': 'x', 'lr': 1e-3},
                           'rng': utils.get_rng_state()}, str(good))
    state = utils.load_checkpoint(str(good))
    assert torch.equal(state['model']['w'], torch.arange(4.0)) and state['args']['lr'] == 1e-3
    utils.set_rng_state(state['rng'])

    class Payload:
        def __reduce__(self):
            return (os.system, ('echo unsafe',))
    evil = tmp_path / 'evil.pth'
    torch.save({'model': Payload()}, evil, _use_new_zipfile_serialization=True)
    with pytest.raises(utils.UserError, match='weights_only'):
        utils.load_checkpoint(str(evil))


def test_export_safetensors_then_finetune_from_it(tmp_path):
    out = tmp_path / 'run'
    assert run_main(TINY + ['--output_dir', out, '--epochs', '1']).returncode == 0
    exported = tmp_path / 'weights.safetensors'
    script = [sys.executable, os.path.join(ROOT, 'scripts', 'export.py')]
    result = subprocess.run(script + [out / 'checkpoint.pth', exported], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file
    weights = load_file(exported)
    ckpt = load(out / 'checkpoint.pth')
    assert all(torch.equal(weights[k], ckpt['model'][k]) for k in ckpt['model'])
    again = subprocess.run(script + [out / 'checkpoint.pth', exported], capture_output=True, text=True)
    assert again.returncode == 2 and 'exists' in again.stderr
    tuned = run_main(TINY + ['--finetune', exported, '--epochs', '1', '--input-size', '16'])
    assert tuned.returncode == 0, tuned.stderr
    assert 'position embedding 4x4 -> 8x8' in tuned.stdout


def test_checkpoint_of_another_model_is_refused(tmp_path):
    out = tmp_path / 'run'
    assert run_main(TINY + ['--output_dir', out, '--epochs', '1']).returncode == 0
    result = run_main(TINY + ['--model', 'deit_tiny_patch2_16', '--eval', '--resume', out / 'checkpoint.pth'])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'does not fit' in lines[0]


def test_empty_class_folder_is_a_one_line_error(tmp_path):
    root = tmp_path / 'data'
    write_image_folder(str(root))
    (root / 'train' / 'zebra').mkdir()
    (root / 'val' / 'zebra').mkdir()
    result = run_main(TINY + ['--data-set', 'FOLDER', '--data-path', root, '--batch-size', '8'])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'zebra' in lines[0]


def torchrun_children(pid):
    """PIDs of the worker processes a torchrun agent started."""
    out = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_two_process_run_survives_sigterm_to_one_rank(tmp_path):
    port = 29000 + os.getpid() % 1000
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}']
    args = TINY + ['--output_dir', tmp_path, '--batch-size', '8', '--dist-eval']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(launcher + [os.path.join(ROOT, 'main.py')] + [str(a) for a in args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert wait_for_progress_lines(proc, 3)
    children = torchrun_children(proc.pid)
    assert len(children) == 2
    os.kill(children[1], signal.SIGTERM)
    rest = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, rest
    ckpt = load(tmp_path / 'checkpoint.pth')
    assert ckpt['step_in_epoch'] > 0
    result = run_main(args, launcher=launcher)
    assert result.returncode == 0, result.stderr
    assert 'resumed from' in result.stdout
    assert load(tmp_path / 'checkpoint.pth')['epoch'] == 1


class Killed(BaseException):
    """Stands for kill -9: the process stops here, and the disk keeps what was written so far."""


def tiny_writer(out, max_accuracy=0.0, on_save_error='continue'):
    import engine
    import main
    import schedules
    from checkpoints import CheckpointWriter
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = engine.TrainState(optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                              scaler=torch.amp.GradScaler('cpu', enabled=False))
    args = main.get_args_parser().parse_args(['--output_dir', str(out), '--on-save-error', on_save_error])
    return CheckpointWriter(args, model, state, None, ['a', 'b'], schedules.Clock(), max_accuracy=max_accuracy)


# The file-system steps of one save, counted by kill_at: the file's fsync, the rename, the folder's fsync.
STEPS_PER_SAVE = 3


def kill_at(monkeypatch, point):
    """Patch os.fsync / os.replace so that the point-th call of either (1-based) kills the 'process'."""
    calls = []
    for name in ('fsync', 'replace'):
        real = getattr(os, name)

        def step(*a, _real=real):
            calls.append(None)
            if len(calls) == point:
                raise Killed
            return _real(*a)
        monkeypatch.setattr(os, name, step)


def best_invariant(out):
    """A file holding the max accuracy that checkpoint.pth records always exists."""
    ckpt = load(out / 'checkpoint.pth')
    if ckpt['max_accuracy'] > 0:
        assert load(out / 'best_checkpoint.pth')['max_accuracy'] >= ckpt['max_accuracy']
    return ckpt['max_accuracy']


@pytest.mark.parametrize('point', range(1, 2 * STEPS_PER_SAVE + 1))
def test_the_best_accuracy_is_in_a_file_after_a_kill_at_any_point_of_the_save(tmp_path, monkeypatch, point):
    tiny_writer(tmp_path).save_epoch_end(0, 10.0, stopped=False)  # epoch 0: best 10%
    with monkeypatch.context() as patch:
        kill_at(patch, point)
        with pytest.raises(Killed):
            tiny_writer(tmp_path, 10.0).save_epoch_end(1, 20.0, stopped=False)  # epoch 1: best 20%, killed
    saved_max = best_invariant(tmp_path)
    resumed = tiny_writer(tmp_path, saved_max)  # the resumed run evaluates epoch 1 again (or it was saved)
    if load(tmp_path / 'checkpoint.pth')['epoch'] == 0:
        resumed.save_epoch_end(1, 20.0, stopped=False)
    assert best_invariant(tmp_path) == 20.0
    assert load(tmp_path / 'best_checkpoint.pth')['max_accuracy'] == 20.0


def test_a_failed_best_write_is_retried_until_a_file_holds_the_max(tmp_path, monkeypatch, capsys):
    writer = tiny_writer(tmp_path)
    writer.save_epoch_end(0, 10.0, stopped=False)
    real = utils_module().save_checkpoint

    def best_fails(obj, path):
        if path.endswith('best_checkpoint.pth'):
            raise OSError(28, 'No space left on device')
        return real(obj, path)
    with monkeypatch.context() as patch:
        patch.setattr(utils_module(), 'save_checkpoint', best_fails)
        assert writer.save_epoch_end(1, 20.0, stopped=False) == 10.0
    assert 'warning: could not write' in capsys.readouterr().out
    assert best_invariant(tmp_path) == 10.0
    assert writer.save_epoch_end(2, 15.0, stopped=False) == 15.0  # beats the max a file holds: written
    assert load(tmp_path / 'best_checkpoint.pth')['max_accuracy'] == 15.0


def test_a_missing_best_file_is_written_again_after_resume(tmp_path, capsys):
    tiny_writer(tmp_path).save_epoch_end(0, 10.0, stopped=False)
    os.remove(tmp_path / 'best_checkpoint.pth')
    resumed = tiny_writer(tmp_path, 10.0)
    assert 'is missing' in capsys.readouterr().out
    resumed.save_epoch_end(1, 5.0, stopped=False)
    assert load(tmp_path / 'best_checkpoint.pth')['max_accuracy'] == 5.0


def utils_module():
    import utils
    return utils


def test_a_second_run_on_a_live_output_dir_is_refused(tmp_path):
    import socket
    import utils
    args = TINY + ['--output_dir', tmp_path, '--epochs', '50', '--print-freq', '1']
    first = start_training(args)  # long enough to be alive when the second starts; stopped by SIGTERM below
    assert wait_for_progress_lines(first, 2)
    second = run_main(args)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f'error: --output_dir {tmp_path} is in use by another run (pid {first.pid} on host {socket.gethostname()}); '
        'wait for it to end, or pass another --output_dir']
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert len(read_log(tmp_path)[0]) == 1  # one header: the second run wrote nothing
    assert utils.lock_folder(str(tmp_path)) == ''  # the lock ended with its run
    utils.release_folder_locks()


def test_under_torchrun_every_rank_stops_when_the_output_dir_is_in_use(tmp_path):
    import socket
    import utils
    utils.lock_folder(str(tmp_path))  # this test process stands for the live run
    try:
        port = 29000 + (os.getpid() + 7) % 1000
        launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}']
        result = run_main(TINY + ['--output_dir', tmp_path, '--batch-size', '8'], launcher=launcher)
    finally:
        utils.release_folder_locks()
    assert result.returncode != 0
    assert (f'error: --output_dir {tmp_path} is in use by another run (pid {os.getpid()} on host '
            f'{socket.gethostname()})') in result.stderr
    assert sorted(os.listdir(tmp_path)) == ['.lock']


def enospc_after(monkeypatch, calls_ok, partial=True):
    """utils.write_all writes its first `calls_ok` lines, then half of the next one before ENOSPC, as a full disk
    does."""
    import utils
    real, seen = utils.write_all, []

    def full_disk(fd, data):
        seen.append(None)
        if len(seen) <= calls_ok:
            return real(fd, data)
        if partial:
            real(fd, data[:len(data) // 2])
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(utils, 'write_all', full_disk)


def test_a_full_disk_during_the_run_is_a_warning_and_the_log_keeps_whole_lines(tmp_path, monkeypatch, capsys):
    enospc_after(monkeypatch, 2)  # the header and epoch 0's line, then the disk is full
    code, out, err = run_cli(TINY + ['--output_dir', tmp_path, '--epochs', '3'], capsys)
    assert code == 0, err
    assert out.count('| warning: could not add epoch') == 2 and 'No space left on device' in out
    lines = (tmp_path / 'log.txt').read_bytes().split(b'\n')
    assert lines[-1] == b'' and len(lines) == 3  # header, epoch 0, and the newline that ends it
    assert load(tmp_path / 'checkpoint.pth')['epoch'] == 2


def test_a_full_disk_at_the_start_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    enospc_after(monkeypatch, 0)
    code, _, err = run_cli(TINY + ['--output_dir', tmp_path], capsys)
    assert code == 2
    assert err.strip().splitlines() == [f'error: cannot write the run log in {tmp_path} (No space left on device); '
                                        'free space or fix permissions, then run again']
    assert (tmp_path / 'log.txt').read_bytes() == b''


def test_a_torn_last_line_is_cut_on_resume(tmp_path, capsys):
    args = TINY + ['--output_dir', tmp_path, '--epochs', '1']
    assert run_cli(args, capsys)[0] == 0
    with open(tmp_path / 'log.txt', 'ab') as f:
        f.write(b'{"train_lr": 0.001, "train_lo')  # a crash in the middle of a write
    code, out, err = run_cli(TINY + ['--output_dir', tmp_path, '--epochs', '2'], capsys)
    assert code == 0, err
    assert 'cut off a torn last line (29 bytes)' in out
    import json
    entries = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert ['config' in e for e in entries] == [True, False, True, False]


def test_a_tensorboard_write_that_fails_is_a_warning(tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def full_disk(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(SummaryWriter, 'flush', full_disk)
    code, out, err = run_cli(TINY + ['--output_dir', tmp_path], capsys)
    assert code == 0, err
    assert out.count('| warning: could not write epoch') == 2
    assert len(read_log(tmp_path)[1]) == 2


def test_a_signal_forwarded_by_a_wrapper_is_the_same_stop_request(tmp_path):
    """Ctrl-C under `timeout`: the terminal's SIGINT reaches both, and timeout forwards its own to main.py."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    for attempt in range(2):
        out = tmp_path / str(attempt)
        cmd = ['timeout', '600', sys.executable, os.path.join(ROOT, 'main.py')] + \
            [str(a) for a in TINY + ['--output_dir', out, '--epochs', '5', '--print-freq', '1']]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        assert wait_for_progress_lines(proc, 3)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, rest
        assert 'exiting now' not in rest and 'checkpoint saved' in rest
        assert load(out / 'checkpoint.pth')['step_in_epoch'] > 0


def test_a_second_signal_after_the_window_exits_at_once():
    child = ('import os, signal, sys, time\n'
             f'sys.path.insert(0, {ROOT!r})\n'
             'import utils\n'
             'stop = utils.StopSignal(window=0.2)\n'
             'os.kill(os.getpid(), signal.SIGTERM)\n'
             'os.kill(os.getpid(), signal.SIGTERM)\n'
             'assert stop.requested\n'
             'print("one request", flush=True)\n'
             'time.sleep(0.3)\n'
             'os.kill(os.getpid(), signal.SIGINT)\n'
             'time.sleep(5)\n')
    result = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGINT
    assert result.stdout.splitlines() == ['| SIGTERM: will checkpoint at the next step and exit', 'one request',
                                          '| second SIGINT: exiting now']


@pytest.mark.parametrize('how', ['ctrl-c', 'sigterm-to-torchrun'])
def test_scripts_torchrun_ends_a_stop_with_one_line_and_exit_0(tmp_path, how):
    port = 29000 + (os.getpid() + 13) % 1000
    args = TINY + ['--output_dir', tmp_path, '--batch-size', '8', '--epochs', '5', '--print-freq', '1']
    cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'torchrun.py'), '--nproc_per_node=2',
           f'--master_port={port}', os.path.join(ROOT, 'main.py')] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    assert wait_for_progress_lines(proc, 3)
    if how == 'ctrl-c':
        os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the agent and its workers
    else:
        proc.send_signal(signal.SIGTERM)  # the agent alone: it forwards the signal
    rest = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, rest
    assert 'Traceback' not in rest and 'checkpoint saved' in rest
    assert load(tmp_path / 'checkpoint.pth')['step_in_epoch'] > 0


def test_an_fp16_run_resumes_a_checkpoint_saved_without_a_scale():
    """DeiT's checkpoints made on the CPU hold `scaler: {}`; ours of a bf16 / fp32 run hold a disabled scaler's."""
    from checkpoints import restore_scaler, scaler_state
    scaler = torch.amp.GradScaler('cpu', enabled=True, init_scale=1024.0)
    restore_scaler(scaler, {})
    assert scaler.get_scale() == 1024.0
    saved = torch.amp.GradScaler('cpu', enabled=True, init_scale=8.0)
    restore_scaler(scaler, scaler_state(saved))
    assert scaler.get_scale() == 8.0
    restore_scaler(torch.amp.GradScaler('cpu', enabled=False), scaler_state(saved))  # a bf16 run ignores it


def test_eval_writes_eval_json_and_needs_no_writable_folder(tmp_path):
    import json
    run = tmp_path / 'run'
    assert run_main(TINY + ['--epochs', '1', '--output_dir', run]).returncode == 0
    scored = run_main(TINY + ['--eval', '--output_dir', run])
    assert scored.returncode == 0, scored.stderr
    results = json.loads((run / 'eval.json').read_text())
    assert f'* Acc@1 {results["acc1"]:.3f}' in scored.stdout and results['weights'] == str(run / 'checkpoint.pth')
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    elsewhere = run_main(TINY + ['--eval', '--resume', run / 'checkpoint.pth', '--output_dir', blocker / 'sub'])
    assert elsewhere.returncode == 0, elsewhere.stderr  # training would refuse this folder; evaluation need not
    assert f'eval.json not written: {blocker / "sub"} cannot be written' in elsewhere.stdout
