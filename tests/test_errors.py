"""Bad input: exit code 2, one 'error:' line on stderr that names the problem, no traceback, nothing written."""
import os

import pytest

from conftest import TINY, run_main, snapshot


def missing_folder(tmp_path, data):
    return ['--data-set', 'FOLDER', '--data-path', tmp_path / 'no_such_folder'], 'no_such_folder does not exist'


def class_sets_differ(tmp_path, data):
    os.rename(os.path.join(data, 'val', 'fish'), os.path.join(data, 'val', 'whale'))
    return ['--data-set', 'FOLDER', '--data-path', data], "train and val classes differ (only in train: ['fish']"


def unknown_model(tmp_path, data):
    return ['--model', 'deit_tiny_patch16_2244'], 'did you mean deit_tiny_patch16_224'


def unreadable_checkpoint(tmp_path, data):
    path = tmp_path / 'random.pth'
    path.write_bytes(os.urandom(4096))
    return ['--resume', path], 'random.pth is unreadable'


def input_not_multiple_of_patch(tmp_path, data):
    return ['--input-size', '9'], "--input-size 9 is not a multiple of deit_micro_patch2_16's patch size 2"


def fewer_images_than_a_batch(tmp_path, data):
    return ['--data-set', 'FOLDER', '--data-path', data, '--batch-size', '512'], \
        'the training set has 36 images, fewer than one update needs'


def no_cuda(tmp_path, data):
    return ['--device', 'cuda'], 'CUDA is not available'


@pytest.mark.parametrize('case', [missing_folder, class_sets_differ, unknown_model, unreadable_checkpoint,
                                  input_not_multiple_of_patch, fewer_images_than_a_batch, no_cuda])
def test_bad_input_is_a_one_line_error(case, tmp_path, image_folder):
    args, expected = case(tmp_path, image_folder)
    before = snapshot(tmp_path)
    out = tmp_path / 'out'
    result = run_main(TINY + args + ['--output_dir', out])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    assert expected in lines[0]
    assert 'Traceback' not in result.stdout + result.stderr
    assert not out.exists() and snapshot(tmp_path) == before
