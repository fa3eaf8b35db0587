"""Whole runs of main.py as a user starts them: outputs, learning, evaluation, resume and fine-tuning."""
import glob
import json
import os
import re

import pytest
import torch

from conftest import SUMMARY, TINY, read_log, run_main, snapshot

EPOCH_KEYS = {'train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters',
              'epoch_seconds', 'train_images_per_sec'}
CHECKPOINT_KEYS = {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'class_names', 'max_accuracy', 'rng'}
# Learns DIGITS in seconds. The small-image pipeline's +-1 px random crop of 8 px digits slows this tiny ViT a lot
# (4 epochs at lr 2e-3 and batch 32 reach only 13-22%), so: batch 16, 10 epochs, no flips or repeated augmentation.
LEARN = TINY + ['--batch-size', '16', '--epochs', '10', '--lr', '1e-3', '--unscale-lr', '--no-repeated-aug',
                '--hflip', '0', '--drop-path', '0', '--smoothing', '0']
# Resume must be exact with every source of randomness on; a step schedule does not depend on --epochs,
# so a 2-epoch run continued to 3 epochs has the same learning rates as a 3-epoch run.
EXACT = TINY + ['--mixup', '0.8', '--cutmix', '1.0', '--reprob', '0.25', '--drop-path', '0.1', '--model-ema',
                '--sched', 'step']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def updates_per_epoch(stdout):
    return int(re.search(r'(\d+) updates per epoch', stdout).group(1))


def trained_epochs(stdout):
    return sorted({int(e) for e in re.findall(r'^Epoch: \[(\d+)\]', stdout, re.M)})


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('digits')
    return ok(run_main(TINY + ['--output_dir', out])), out


@pytest.fixture(scope='module')
def learned(tmp_path_factory):
    out = tmp_path_factory.mktemp('learned')
    return ok(run_main(LEARN + ['--output_dir', out])), out


@pytest.fixture(scope='module', params=[0, 2], ids=['0-workers', '2-workers'])
def resume_runs(tmp_path_factory, request):
    """An uninterrupted 3-epoch run without DataLoader workers, and a 2-epoch run continued (auto-resumed) to 3
    epochs with request.param workers."""
    full, part = tmp_path_factory.mktemp('full'), tmp_path_factory.mktemp('part')
    workers = ['--num_workers', request.param]
    ok(run_main(EXACT + ['--epochs', '3', '--output_dir', full]))
    ok(run_main(EXACT + workers + ['--epochs', '2', '--output_dir', part]))
    continued = ok(run_main(EXACT + workers + ['--epochs', '3', '--output_dir', part]))
    return full, part, continued


def check_outputs(result, out, class_names):
    assert re.search(SUMMARY, result.stdout)
    for name in ('checkpoint.pth', 'best_checkpoint.pth'):
        ckpt = load(os.path.join(out, name))
        assert CHECKPOINT_KEYS <= set(ckpt)
        assert type(ckpt['args']) is dict and ckpt['args']['output_dir'] == str(out)
        assert ckpt['class_names'] == class_names
    assert load(os.path.join(out, 'checkpoint.pth'))['epoch'] == 1
    headers, epochs = read_log(out)
    with open(os.path.join(out, 'log.txt')) as f:
        assert 'config' in f.readline()  # the header comes first
    assert len(headers) == 1 and {'config', 'git', 'versions'} <= set(headers[0])
    assert [e['epoch'] for e in epochs] == [0, 1]
    for stats in epochs:
        assert EPOCH_KEYS <= set(stats)
    assert glob.glob(os.path.join(out, 'tb', 'events.out.tfevents.*'))


def test_digits_outputs(digits_run):
    result, out = digits_run
    check_outputs(result, out, [str(i) for i in range(10)])


def test_fake_outputs(tmp_path):
    result = ok(run_main(TINY + ['--data-set', 'FAKE', '--fake-size', '64', '--fake-classes', '4',
                                 '--output_dir', tmp_path]))
    check_outputs(result, tmp_path, ['0', '1', '2', '3'])


def test_folder_outputs(image_folder, tmp_path):
    out = tmp_path / 'out'
    result = ok(run_main(TINY + ['--data-set', 'FOLDER', '--data-path', image_folder, '--batch-size', '8',
                                 '--output_dir', out]))
    assert '36 train / 12 val images, 3 classes' in result.stdout
    check_outputs(result, out, ['cat', 'dog', 'fish'])


def test_learns_digits(learned):
    _, out = learned
    epochs = read_log(out)[1]
    assert epochs[-1]['test_acc1'] > 20  # chance is 10% (1.6% std. dev. on 359 images); measured 30-32% over seeds 0-1
    assert epochs[-1]['test_loss'] < 2.2  # a uniform guess scores log(10) = 2.303


def test_eval_reproduces_logged_accuracy_and_writes_only_its_results(learned, tmp_path):
    _, out = learned
    before = snapshot(out)
    result = ok(run_main(LEARN + ['--eval', '--resume', out / 'checkpoint.pth', '--output_dir', tmp_path / 'eval']))
    acc1 = float(re.findall(SUMMARY, result.stdout)[-1][0])
    last = read_log(out)[1][-1]
    assert load(out / 'checkpoint.pth')['epoch'] == last['epoch']
    assert acc1 == round(last['test_acc1'], 3)
    assert os.listdir(tmp_path / 'eval') == ['eval.json']
    assert json.loads((tmp_path / 'eval' / 'eval.json').read_text())['acc1'] == pytest.approx(last['test_acc1'])
    assert snapshot(out) == before
    assert trained_epochs(result.stdout) == []


def test_auto_resume_trains_only_the_missing_epoch(resume_runs):
    _, part, continued = resume_runs
    assert 'resumed' in continued.stdout
    assert trained_epochs(continued.stdout) == [2]
    assert [e['epoch'] for e in read_log(part)[1]] == [0, 1, 2]


def test_other_model_in_same_output_dir_is_refused(digits_run):
    _, out = digits_run
    before = snapshot(out)
    result = run_main(TINY + ['--model', 'deit_tiny_patch2_16', '--epochs', '3', '--output_dir', out])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and 'another run' in lines[0]
    assert snapshot(out) == before


def test_resume_is_exact(resume_runs):
    full, part, _ = resume_runs
    a, b = load(full / 'checkpoint.pth'), load(part / 'checkpoint.pth')
    for weights in ('model', 'model_ema'):
        assert a[weights].keys() == b[weights].keys()
        for key in a[weights]:
            assert torch.equal(a[weights][key], b[weights][key]), f'{weights}.{key}'
    assert read_log(full)[1][2]['train_loss'] == read_log(part)[1][2]['train_loss']


def test_finetune_at_another_resolution(learned, image_folder, tmp_path):
    _, source = learned
    out = tmp_path / 'out'
    result = ok(run_main(TINY + ['--finetune', source / 'checkpoint.pth', '--input-size', '16', '--epochs', '1',
                                 '--data-set', 'FOLDER', '--data-path', image_folder, '--batch-size', '8',
                                 '--output_dir', out]))
    assert 'position embedding 4x4 -> 8x8' in result.stdout
    model = load(out / 'checkpoint.pth')['model']
    assert model['pos_embed'].shape == (1, 1 + 64, 48)
    assert model['head.weight'].shape == (3, 48) and model['head.bias'].shape == (3,)


def test_accum_iter_keeps_updates_per_epoch(digits_run):
    result = ok(run_main(TINY + ['--batch-size', '16', '--accum-iter', '2', '--epochs', '1']))
    assert updates_per_epoch(result.stdout) == updates_per_epoch(digits_run[0].stdout) == 1438 // 32
    assert trained_epochs(result.stdout) == [0] and '[44/44]' in result.stdout


def test_resume_with_more_epochs_stretches_the_schedule(tmp_path):
    """A cosine run of 2 epochs continued to 4 follows the 4-epoch cosine, not the finished 2-epoch one."""
    short, fresh = tmp_path / 'short', tmp_path / 'fresh'
    ok(run_main(TINY + ['--epochs', '2', '--output_dir', short]))
    ok(run_main(TINY + ['--epochs', '4', '--output_dir', short]))
    ok(run_main(TINY + ['--epochs', '4', '--output_dir', fresh]))
    continued, uninterrupted = read_log(short)[1], read_log(fresh)[1]
    assert [e['epoch'] for e in continued] == [0, 1, 2, 3]
    assert continued[2]['train_lr'] == pytest.approx(uninterrupted[2]['train_lr'], rel=1e-9)
    assert continued[2]['train_lr'] > continued[1]['train_lr']  # the 2-epoch cosine had decayed to near min-lr


def test_use_ema_scores_the_checkpoints_ema_weights(tmp_path):
    out = tmp_path / 'run'
    ok(run_main(TINY + ['--model-ema', '--model-ema-decay', '0.99', '--lr', '5e-3', '--unscale-lr', '--epochs', '1',
                        '--output_dir', out]))
    last = read_log(out)[1][-1]
    assert abs(last['test_ema_loss'] - last['test_loss']) > 1e-3  # the two weights differ, and the test can tell
    scored = {}
    for flags in ([], ['--use-ema']):
        result = ok(run_main(TINY + ['--eval', '--resume', out / 'checkpoint.pth', '--output_dir', ''] + flags))
        scored[bool(flags)] = float(re.findall(SUMMARY, result.stdout)[-1][2])
    assert scored[True] == pytest.approx(last['test_ema_loss'], abs=1e-3)
    assert scored[False] == pytest.approx(last['test_loss'], abs=1e-3)
    assert 'loaded EMA weights from' in result.stdout


def test_use_ema_without_ema_weights_or_without_eval_is_one_line(learned):
    _, out = learned
    result = run_main(LEARN + ['--eval', '--use-ema', '--resume', out / 'checkpoint.pth', '--output_dir', ''])
    assert result.returncode != 0 and 'holds no EMA weights' in result.stderr
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_main(LEARN + ['--use-ema', '--resume', out / 'checkpoint.pth', '--output_dir', ''])
    assert result.returncode != 0 and '--use-ema scores' in result.stderr


def best_epochs(out, n):
    ranked = sorted(read_log(out)[1], key=lambda e: (-e['test_acc1'], e['epoch']))
    return sorted(e['epoch'] for e in ranked[:n])


def test_checkpoint_hist_keeps_the_n_best_epochs_across_a_resume(tmp_path):
    flags = LEARN + ['--checkpoint-hist', '2', '--output_dir', tmp_path]
    ok(run_main(flags + ['--epochs', '4']))
    ok(run_main(flags + ['--epochs', '6']))  # resumed: the history goes on from the file
    kept = sorted(int(re.match(r'checkpoint-(\d+)\.pth$', name).group(1))
                  for name in os.listdir(tmp_path) if name.startswith('checkpoint-'))
    assert kept == best_epochs(tmp_path, 2)
    for epoch in kept:
        assert load(tmp_path / f'checkpoint-{epoch}.pth')['epoch'] == epoch
    assert sorted(e['epoch'] for e in json.loads((tmp_path / 'checkpoint_hist.json').read_text())) == kept
    assert not [name for name in os.listdir(tmp_path) if '.tmp' in name]


def test_eval_takes_the_input_size_from_the_checkpoint(learned):
    _, out = learned
    at = LEARN.index('--input-size')
    result = ok(run_main(LEARN[:at] + LEARN[at + 2:] + ['--eval', '--resume', out / 'checkpoint.pth',
                                                        '--output_dir', '']))
    assert '| preprocessing: 8 px (from the checkpoint)' in result.stdout
    assert float(re.findall(SUMMARY, result.stdout)[-1][0]) == round(read_log(out)[1][-1]['test_acc1'], 3)
