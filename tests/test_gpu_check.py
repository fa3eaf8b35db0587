"""scripts/gpu_check.sh --tiny: every check of the GPU command runs on the CPU with a test-size model, so that its
flags and paths stay right until a GPU runs it for real."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def dali_installed():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def test_gpu_check_prints_every_figure_as_json_lines(tmp_path):
    result = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh'), '--tiny', '--work-dir',
                             str(tmp_path)], capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert not [r for r in rows if 'error' in r]
    steps = {(r['size'], r['compile']) for r in rows if r['check'] == 'step'}
    assert steps == {(16, False), (16, True), (8, False), (8, True)}
    assert all(r['ours_img_s'] > 0 and r['plain_img_s'] > 0 and r['mfu'] > 0 for r in rows if r['check'] == 'step')
    feeds = {(r['backend'], r['size']) for r in rows if r['check'] == 'feed'}
    assert feeds == {(b, s) for b in ('pil', 'dali') for s in (16, 8)}
    parity, = [r for r in rows if r['check'] == 'parity']
    assert parity['max_loss_diff'] == 0 and parity['max_weight_diff'] == 0  # CPU against CPU here
    budgets = {r['backend']: r for r in rows if r['check'] == 'budget'}
    assert set(budgets) == {'pil', 'dali'}
    if 'skipped' in budgets['dali']:  # a machine without DALI (the GPU machine may lack it): the row says so
        assert budgets.pop('dali')['skipped'] == 'DALI is not installed' and not dali_installed()
    for run in budgets.values():
        assert run['finished'] and run['epochs'] >= 1 and run['eager_fallbacks'] == 0
        assert 1 <= run['graphs_compiled'] <= 3 and run['img_s_per_stage']
    assert not os.listdir(tmp_path)  # the photos and runs are cleaned up


def test_gpu_check_without_a_gpu_says_how_to_run_it():
    result = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh')], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES=''))
    assert result.returncode == 2 and 'pass --tiny' in result.stderr


def test_a_failing_check_is_one_error_row_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import gpu_check

    def broken(*args):
        raise RuntimeError('bench.py failed (1): out of memory')
    monkeypatch.setattr(gpu_check, 'step_and_feed', broken)
    monkeypatch.setattr(gpu_check, 'failures', [])
    failures = gpu_check.main(['--tiny', '--checks', 'step,parity', '--work-dir', str(tmp_path)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    errors = [r for r in rows if 'error' in r]
    assert len(errors) == 4 and errors[0] == {'check': 'step', 'error': 'RuntimeError: bench.py failed (1): out of memory'}
    assert [r['check'] for r in rows if 'error' not in r] == ['parity'] and failures == ['step'] * 4


def test_an_unknown_check_is_refused():
    result = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh'), '--tiny', '--checks', 'speed'],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 2 and "unknown check 'speed'" in result.stderr
