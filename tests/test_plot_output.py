"""scripts/plot_output.py: accuracy against hours and epochs from runs' log.txt files."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import plot_output  # noqa: E402

SCRIPT = os.path.join(ROOT, 'scripts', 'plot_output.py')


def write_log(run_dir, epoch_lines, headers_before=(0,)):
    """log.txt with a config header before the epoch lines at the given indices (a resume adds one)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'log.txt'), 'w') as f:
        for i, line in enumerate(epoch_lines):
            if i in headers_before:
                f.write(json.dumps({'config': {'model': 'deit_micro_patch2_16'}, 'git': None}) + '\n')
            f.write(json.dumps(line) + '\n')
    return run_dir


def run_plot(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


@pytest.fixture
def two_runs(tmp_path):
    timed = write_log(str(tmp_path / 'deit_run'), [
        {'epoch': e, 'test_acc1': 10.0 + 20 * e, 'epoch_seconds': 1800.0, 'elapsed_seconds': 1800.0 * (e + 1)}
        for e in range(3)], headers_before=(0, 2))
    untimed = write_log(str(tmp_path / 'localvit_run'), [
        {'epoch': e, 'test_acc1': 15.0 + 25 * e, 'epoch_seconds': 3600.0} for e in range(2)])
    return timed, untimed


def test_two_runs_make_a_png_in_the_first_run_dir(two_runs):
    result = run_plot(*two_runs)
    assert result.returncode == 0, result.stderr
    path = os.path.join(two_runs[0], 'acc_vs_time.png')
    with Image.open(path) as img:
        img.load()
        assert img.format == 'PNG' and img.size[0] > img.size[1] > 100
    assert 'deit_run' in result.stdout and 'localvit_run' in result.stdout


def test_output_flag_sets_the_file(two_runs, tmp_path):
    out = tmp_path / 'figure.png'
    assert run_plot(two_runs[1], '-o', out).returncode == 0
    with Image.open(out) as img:
        img.verify()


def test_curves_read_hours_from_elapsed_or_summed_epoch_seconds(two_runs):
    timed, untimed = (plot_output.read_run(d) for d in two_runs)
    assert timed.name == 'deit_run' and timed.epochs == [0, 1, 2]
    assert timed.hours == pytest.approx([0.5, 1.0, 1.5])
    assert timed.acc1 == [10.0, 30.0, 50.0]
    assert untimed.hours == pytest.approx([1.0, 2.0])


def test_a_clock_restarted_by_a_resume_continues_and_repeated_epochs_keep_the_last():
    entries = [{'epoch': 0, 'elapsed_seconds': 3600.0}, {'epoch': 1, 'elapsed_seconds': 7200.0},
               {'epoch': 1, 'elapsed_seconds': 1800.0}, {'epoch': 2, 'elapsed_seconds': 5400.0}]
    assert plot_output.elapsed_hours(entries) == pytest.approx([1.0, 2.0, 2.5, 3.5])


def test_truncated_last_line_is_ignored(tmp_path):
    run = write_log(str(tmp_path / 'run'), [{'epoch': 0, 'test_acc1': 5.0, 'elapsed_seconds': 60.0}])
    with open(os.path.join(run, 'log.txt'), 'a') as f:
        f.write('{"epoch": 1, "test_ac')
    assert plot_output.read_run(run).epochs == [0]


def test_folder_without_log_is_a_one_line_error(two_runs, tmp_path):
    empty = tmp_path / 'not_a_run'
    empty.mkdir()
    result = run_plot(two_runs[0], empty)
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0
    assert 'not_a_run has no log.txt' in result.stderr
    assert not os.path.exists(os.path.join(two_runs[0], 'acc_vs_time.png'))


def test_output_into_missing_folders_and_a_replaced_file_is_told(two_runs, tmp_path):
    out = tmp_path / 'figures' / 'new' / 'acc.png'
    first = run_plot(two_runs[0], '-o', out)
    assert first.returncode == 0 and out.is_file() and 'replacing' not in first.stdout
    again = run_plot(two_runs[0], '-o', out)
    assert again.returncode == 0 and again.stdout.rstrip().endswith(', replacing the file that was there')


def test_output_under_a_file_is_refused_before_reading_the_runs(tmp_path):
    blocker = tmp_path / 'results'
    blocker.write_text('a file')
    result = run_plot(tmp_path / 'no_run_here', '-o', blocker / 'acc.png')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f'error: -o {blocker / "acc.png"} lies under {blocker}, which is '
                                                  'a file; pass a path in a folder']
