"""--data-set LIST: DomainNet-style list files (image path + label per line), as DHVT uses."""
import os

import pytest

from conftest import TINY, run_main
from datasets import ListDataset
from utils import UserError


def write_lists(root):
    """train.txt / val.txt listing the image folder's files as 'split/class/file LABEL'."""
    lists = {}
    for split in ('train', 'val'):
        lines = []
        for label, name in enumerate(sorted(os.listdir(os.path.join(root, split)))):
            for file in sorted(os.listdir(os.path.join(root, split, name))):
                lines.append(f'{split}/{name}/{file} {label}')
        lists[split] = os.path.join(root, f'{split}.txt')
        with open(lists[split], 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return lists


def test_list_dataset_reads_paths_labels_and_class_names(image_folder):
    lists = write_lists(image_folder)
    dataset = ListDataset(image_folder, lists['train'])
    assert len(dataset) == 36 and dataset.classes == ['cat', 'dog', 'fish']
    image, label = dataset[35]
    assert image.mode == 'RGB' and label == 2


def test_list_classes_fall_back_to_numbers(tmp_path, image_folder):
    mixed = tmp_path / 'mixed.txt'
    mixed.write_text('train/cat/cat_0.jpg 0\ntrain/dog/dog_0.png 0\ntrain/fish/fish_0.jpg 1\n')
    assert ListDataset(image_folder, str(mixed)).classes == ['0', 'fish']


@pytest.mark.parametrize('content, message', [('train/cat/cat_0.jpg\n', 'line 1'),
                                               ('train/cat/cat_0.jpg cat\n', 'line 1'),
                                               ('\n', 'lists no images')])
def test_bad_list_file_is_a_user_error(tmp_path, content, message):
    path = tmp_path / 'bad.txt'
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        ListDataset(str(tmp_path), str(path))


def test_main_trains_on_list_files(image_folder, tmp_path):
    lists = write_lists(image_folder)
    result = run_main(TINY + ['--data-set', 'LIST', '--data-path', image_folder, '--train-list', lists['train'],
                              '--val-list', lists['val'], '--batch-size', '8', '--epochs', '1',
                              '--output_dir', tmp_path / 'out'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert '36 train / 12 val images, 3 classes' in result.stdout


def test_main_reports_a_missing_list_file(image_folder, tmp_path):
    result = run_main(TINY + ['--data-set', 'LIST', '--data-path', image_folder, '--train-list', tmp_path / 'no.txt'])
    assert result.returncode == 2
    assert result.stderr.strip().startswith('error: list file') and len(result.stderr.strip().splitlines()) == 1
