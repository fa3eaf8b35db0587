"""Time budgets and multi-size training: schedule values, and whole runs that end on time and change size."""
import json
import math

import pytest
import torch
from timm.scheduler import create_scheduler_v2

import schedules
from conftest import TINY, read_log, run_main


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def elapsed(self):
        return self.now


@pytest.mark.parametrize('epoch, size', [(0, 32), (4, 32), (5, 64), (9, 64), (10, 96), (29, 192), (30, 224),
                                         (299, 224)])
def test_paper_multisize_schedule(epoch, size):
    assert schedules.paper_multisize_schedule(32, 5, 2, 224).size_at(epoch, 0.0) == size


@pytest.mark.parametrize('epoch, size', [(0, 32), (6, 32), (7, 48), (13, 48), (14, 64), (83, 208), (84, 224),
                                         (299, 224)])
def test_multisize_flag_defaults_are_the_24h_codes(epoch, size):
    """The 24-hour code defaults to --epoch-step 7 --patch-step 1 (its best-config script passes 5 and 2)."""
    import main
    args = main.get_args_parser().parse_args(['--is-multisize'])
    assert (args.epoch_step, args.patch_step, args.init_size) == (7, 1, 32)
    assert schedules.size_schedule_from_flags(args).size_at(epoch, 0.0) == size


def test_paper_schedule_never_passes_the_final_size():
    sizes = schedules.paper_multisize_schedule(32, 5, 2, 200)
    assert sizes.final_size == 192 and sizes.size_at(1000, 1.0) == 192


@pytest.mark.parametrize('text, epoch, progress, size', [('0:32,5:64,10:128', 7, 0.0, 64),
                                                         ('0:32,5:64,10:128', 10, 0.0, 128),
                                                         ('0:32,0.5:64,0.75:96', 99, 0.49, 32),
                                                         ('0:32,0.5:64,0.75:96', 0, 0.5, 64),
                                                         ('0:32,0.5:64,0.75:96', 0, 1.0, 96)])
def test_size_schedule_by_epoch_and_by_fraction(text, epoch, progress, size):
    assert schedules.parse_size_schedule(text).size_at(epoch, progress) == size


@pytest.mark.parametrize('text', ['5:32', '0:32,x', '0:32,1.5:64', '0:a'])
def test_bad_size_schedule(text):
    with pytest.raises(ValueError):
        schedules.parse_size_schedule(text)


def test_multisize_batch_keeps_pixels_per_batch():
    assert schedules.batch_for_size(64, 224, 224) == 64
    assert schedules.batch_for_size(64, 112, 224) == 256
    assert schedules.batch_for_size(64, 32, 224) == 64 * 49
    # DeiT-S's budget recipe on 4, 2 and 1 GPUs at its 160 px stage: 501.76, 1003.52, 2007.04 images
    assert [schedules.batch_for_size(b, 160, 224) for b in (256, 512, 1024)] == [500, 1002, 2006]
    assert schedules.batch_for_size(16, 128, 224) == 48  # LOCAL=1 of that recipe: 49 before
    assert schedules.batch_for_size(17, 128, 224) == 52  # an odd batch stays as computed (no Mixup then)


def test_budget_keeps_time_for_the_final_evaluation():
    clock = FakeClock()
    budget = schedules.Budget(1 / 60, clock)  # 60 s
    assert budget.reserve == pytest.approx(3.0)  # 5% until measured
    budget.note_training_speed(0.01, 100)  # an eval of 100 images: ~0.5 s kept, at least 1% of the budget
    assert budget.reserve == pytest.approx(0.6)
    budget.note_finish_cost(2.0)
    budget.note_training_speed(1.0, 100)  # once measured, the speed estimate no longer applies
    assert budget.reserve == pytest.approx(2.5)
    clock.now = 57.4
    assert not budget.over() and budget.progress() == pytest.approx(57.4 / 57.5)
    clock.now = 57.5
    assert budget.over()


def test_progress_lr_reaches_min_lr_at_the_deadline():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=10, warmup_epochs=1, warmup_lr=0.01,
                                       min_lr=0.001, step_on_epochs=False, updates_per_epoch=100)
    clock = FakeClock()
    budget = schedules.Budget(1.0, clock)
    lr = schedules.ProgressLR(scheduler, 1000, lambda _: budget.progress())
    deadline = budget.seconds - budget.reserve
    def cosine(fraction):  # timm's cosine runs over the whole schedule, warm-up included
        return 0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * fraction))

    for fraction, expected in ((0.0, 0.01), (0.1, cosine(0.1)), (0.55, cosine(0.55)), (1.0, 0.001), (1.5, 0.001)):
        clock.now = fraction * deadline
        lr.step_update(12345)  # the update count is ignored: the clock decides
        assert optimizer.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-3)


def test_a_model_trains_at_two_sizes_in_one_run(tmp_path):
    result = run_main(TINY + ['--input-size', '16', '--size-schedule', '0:8,1:16', '--multisize-batch',
                              '--output_dir', tmp_path])
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = read_log(tmp_path)[1]
    assert [(e['train_size'], e['batch_size']) for e in epochs] == [(8, 128), (16, 32)]
    assert 'training at 8 px, batch 128' in result.stdout


def test_budget_run_ends_on_time_and_resume_keeps_the_clock(tmp_path):
    budget_s = 12.0
    result = run_main(TINY + ['--epochs', '50', '--time-budget', str(budget_s / 3600), '--output_dir', tmp_path])
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = read_log(tmp_path)[1]
    assert 0.6 * budget_s < epochs[-1]['elapsed_seconds'] <= budget_s + 3.0
    assert 'test_acc1' in epochs[-1]  # the final evaluation happened
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert ckpt['optimizer']['param_groups'][0]['lr'] == pytest.approx(1e-5, rel=0.05)  # --min-lr at the deadline
    assert ckpt['elapsed_seconds'] == pytest.approx(epochs[-1]['elapsed_seconds'], abs=1.0)

    result = run_main(TINY + ['--epochs', '50', '--time-budget', str(2 * budget_s / 3600), '--output_dir', tmp_path])
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'resumed' in result.stdout
    later = read_log(tmp_path)[1][len(epochs):]
    assert later and later[0]['elapsed_seconds'] > epochs[-1]['elapsed_seconds']
    assert later[-1]['elapsed_seconds'] <= 2 * budget_s + 3.0
    with open(tmp_path / 'log.txt') as f:
        assert sum('config' in json.loads(line) for line in f) == 2  # one header per start


def recipe_batches():
    """(recipe, per-process batch) for 1, 2, 4 and 8 processes: the launcher's global batch over the processes, or the
    recipe's own batch for a recipe without a launcher."""
    import os
    import re
    from conftest import ROOT
    for name in sorted(os.listdir(os.path.join(ROOT, 'configs'))):
        script = os.path.join(ROOT, 'scripts', name.replace('.yaml', '.sh'))
        if not os.path.exists(script):
            yield name, None
            continue
        with open(script) as f:
            global_batch = int(re.search(r'^launch (\d+)', f.read(), re.M).group(1))
        for nproc in (1, 2, 4, 8):
            if global_batch % nproc == 0:  # the launcher refuses the others
                yield name, global_batch // nproc


@pytest.mark.parametrize('recipe, batch', list(recipe_batches()))
def test_every_recipe_plans_even_batches_on_1_to_8_processes(recipe, batch):
    import os
    import main
    from conftest import ROOT
    argv = ['-c', os.path.join(ROOT, 'configs', recipe)] + (['--batch-size', str(batch)] if batch else [])
    args = main.parse_args(argv)
    plan = main.plan_shape(args, schedules.size_schedule_from_flags(args))
    stages = plan.stages()
    assert stages and all(stage.batch >= args.batch_size for stage in stages)
    if main.optimization.uses_mixup(args):
        assert all(stage.batch % 2 == 0 for stage in stages), stages
    plan.check_even_batches()


def test_an_odd_batch_with_mixup_is_refused_at_start(tmp_path):
    result = run_main(TINY + ['--batch-size', '17', '--mixup', '0.8', '--output_dir', tmp_path / 'out'])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'error: batch 17 is odd, and Mixup / CutMix pair the images of a batch; pass an even --batch-size, or '
        '--mixup 0 --cutmix 0']
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('script', ['deit_small_budget.sh', 'vit_24h_1gpu.sh'])
def test_local_mode_of_a_budget_recipe_runs_a_short_budget(script):
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, LOCAL='1', PYTHON=sys.executable, OMP_NUM_THREADS='1')
    result = subprocess.run(['bash', os.path.join(ROOT, 'scripts', script)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "LOCAL=1: --time-budget 0.005 (18 s) in place of the recipe's budget" in result.stdout
    assert '| training time 0:00:' in result.stdout
