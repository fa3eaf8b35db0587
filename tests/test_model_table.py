"""scripts/model_table.py: parameter and GMAC counts against the published figures."""
import os
import subprocess
import sys

import pytest

import models
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import model_table  # noqa: E402

DEIT = ('deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224')


def test_deit_figures_are_in_the_merged_table():
    figures = model_table.paper_figures()
    assert {name: figures[name] for name in DEIT} == {
        'deit_tiny_patch16_224': (5.7, 1.25), 'deit_small_patch16_224': (22.1, 4.60),
        'deit_base_patch16_224': (86.6, 17.6)}


@pytest.mark.parametrize('name', DEIT)
def test_deit_params_and_gmacs_within_3_percent(name):
    params, gmacs = model_table.measure(name)
    paper_params, paper_gmacs = models.PAPER_FIGURES[name]
    assert abs(params / paper_params - 1) < 0.03, params
    assert abs(gmacs / paper_gmacs - 1) < 0.03, gmacs


def test_gmacs_count_every_matmul_attention_included():
    """deit_micro_patch2_16 at 16 px: 64 patches + CLS, width 48, depth 2, 10 classes, counted by hand."""
    tokens, dim, depth, patches = 65, 48, 2, 64
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * 4 * dim
    macs = patches * (3 * 2 * 2) * dim + depth * block + dim * 10
    params, gmacs = model_table.measure('deit_micro_patch2_16')
    assert gmacs * 1e9 == pytest.approx(macs, rel=1e-6)
    assert 0 < params < 0.1


def test_close_allows_3_percent_or_the_papers_rounding():
    row = model_table.Row('m', params=6.01, paper_params=6.0, gmacs=0.39, paper_gmacs=0.4)
    assert row.matches  # 2.5% off
    assert model_table.Row('m', 6.01, 6.0, 0.385, 0.4).matches  # 3.75% off, but rounds to 0.4
    assert not model_table.Row('m', 5.85, 5.8, 1.70, 1.4).matches
    assert not model_table.Row('m', 6.5, 6.2, 1.4, None).matches
    assert model_table.Row('m', 6.27, 6.2, 1.0, None).matches


def test_check_fails_on_a_model_off_its_figures(monkeypatch, capsys):
    monkeypatch.setitem(models.PAPER_FIGURES, 'deit_micro_patch2_16', (0.2, None))
    assert model_table.main(['--model', 'deit_micro_patch2_16']) == 0
    assert model_table.main(['--model', 'deit_micro_patch2_16', '--check']) == 1
    assert 'deit_micro_patch2_16' in capsys.readouterr().err
    assert model_table.main(['--model', 'no_such_model']) == 2


def test_a_model_without_published_figures_gets_dashes_and_passes_the_check(capsys):
    [row] = model_table.table_rows(['deit_micro_patch2_16'])
    assert row.paper_params is None and row.params_diff is None and row.matches
    assert model_table.main(['--model', 'deit_micro_patch2_16', '--check']) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith('| deit_micro_patch2_16 | 0.') and line.endswith('| - | - / - |')


def test_script_prints_a_row_for_every_model_with_figures():
    """The whole table, on whatever families exist: it runs, and the DeiT rows hold our counts."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'model_table.py'), '--check'],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith('| model | params (M) ours | paper | GMACs ours | paper | diff %')
    rows = {line.split(' | ')[0].lstrip('| '): line for line in lines[2:]}
    assert list(rows) == list(model_table.paper_figures()) + ['deit_small_patch16_224 --localvit']
    # the 24-hour code trains 22,179,688 parameters; its paper's 22.23M also counts 47,088 unused ones
    assert rows['deit_small_patch16_224 --localvit'].startswith(
        '| deit_small_patch16_224 --localvit | 22.18 | 22.23 (its code trains: 22.18) | 4.62 | 4.62 |')
    assert rows['deit_tiny_patch16_224'].startswith('| deit_tiny_patch16_224 | 5.72 | 5.7 | 1.25 | 1.25 |')
    assert rows['deit_small_patch16_224'].startswith('| deit_small_patch16_224 | 22.05 | 22.1 | 4.60 | 4.6 |')
