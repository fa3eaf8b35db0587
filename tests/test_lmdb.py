"""scripts/folder2lmdb.py and --use-lmdb: an LMDB gives the same samples as the image folder it was built from."""
import errno
import os
import pickle
import re
import sys

import lmdb
import pytest
import torch
from torch.utils.data import DataLoader

import datasets
import main
from conftest import ROOT, TINY, read_log, run_main, write_image_folder
from lmdb_dataset import LMDBDataset, sample_key
from utils import UserError

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import folder2lmdb  # noqa: E402

CLASSES = ['cat', 'dog', 'fish']  # write_image_folder's: 12 train and 4 val images each
BASE = ['--data-set', 'FOLDER', '--input-size', '8']


@pytest.fixture(scope='module')
def folder_and_lmdb(tmp_path_factory):
    root = tmp_path_factory.mktemp('lmdb')
    folder = write_image_folder(str(root / 'images'))
    lmdb_path = str(root / 'images_lmdb')
    folder2lmdb.main([folder, lmdb_path])
    return folder, lmdb_path


def parse(*flags):
    return main.get_args_parser().parse_args([str(f) for f in flags])


def eval_transform():
    return datasets.build_transform(False, parse(*BASE))


def both(folder, lmdb_path, is_train):
    """(folder dataset, LMDB dataset) of one split as build_dataset makes them, both with the eval transform."""
    from_folder, folder_classes = datasets.build_dataset(is_train, parse(*BASE, '--data-path', folder))
    from_lmdb, lmdb_classes = datasets.build_dataset(is_train, parse(*BASE, '--data-path', lmdb_path, '--use-lmdb'))
    assert isinstance(from_lmdb, LMDBDataset)
    assert folder_classes == lmdb_classes == CLASSES
    from_folder.transform = from_lmdb.transform = eval_transform()
    return from_folder, from_lmdb


@pytest.mark.parametrize('is_train', [True, False])
def test_lmdb_and_folder_give_identical_samples(folder_and_lmdb, is_train):
    from_folder, from_lmdb = both(*folder_and_lmdb, is_train)
    assert len(from_lmdb) == len(from_folder) == (36 if is_train else 12)
    for index in range(len(from_folder)):
        (image, label), (expected_image, expected_label) = from_lmdb[index], from_folder[index]
        assert label == expected_label
        assert torch.equal(image, expected_image), f'sample {index} differs'


def test_dataloader_with_two_workers_reads_every_sample(folder_and_lmdb):
    dataset = LMDBDataset(folder_and_lmdb[1], 'val', eval_transform())
    expected = [dataset[i] for i in range(len(dataset))]
    images, labels = zip(*DataLoader(dataset, batch_size=5, num_workers=2))
    assert torch.equal(torch.cat(images), torch.stack([image for image, _ in expected]))
    assert torch.cat(labels).tolist() == [label for _, label in expected]
    copy = pickle.loads(pickle.dumps(dataset))  # how spawn / forkserver workers receive it
    assert torch.equal(copy[3][0], expected[3][0])


def test_train_and_val_of_one_lmdb_read_in_turn(folder_and_lmdb):
    train, val = (LMDBDataset(folder_and_lmdb[1], split) for split in ('train', 'val'))
    assert [train[0][1], val[0][1], train[35][1], val[11][1]] == [0, 0, 2, 2]
    with pytest.raises(IndexError):
        val[12]


def test_bad_image_error_names_the_original_file(tmp_path):
    folder = write_image_folder(str(tmp_path / 'images'), per_class=(2, 1))
    with open(os.path.join(folder, 'val', 'dog', 'broken.jpg'), 'wb') as f:
        f.write(b'not a jpeg')
    lmdb_path = str(tmp_path / 'images_lmdb')
    folder2lmdb.main([folder, lmdb_path])
    from_folder, from_lmdb = both(folder, lmdb_path, is_train=False)
    index = [os.path.basename(path) for path, _ in from_folder.samples].index('broken.jpg')
    with pytest.raises(datasets.BadImageError) as folder_error:
        from_folder[index]
    with pytest.raises(datasets.BadImageError) as lmdb_error:
        from_lmdb[index]
    original = f'unreadable image {from_folder.samples[index][0]} ({folder_error.value.__cause__.__class__.__name__}'
    assert str(folder_error.value).startswith(original)
    assert str(lmdb_error.value).startswith(original)


def script_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        folder2lmdb.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_folder2lmdb_refuses_to_overwrite_and_checks_the_folder(folder_and_lmdb, tmp_path, capsys):
    folder, lmdb_path = folder_and_lmdb
    before = {name: os.path.getmtime(os.path.join(lmdb_path, name)) for name in os.listdir(lmdb_path)}
    assert 'exists' in script_error([folder, lmdb_path], capsys)
    assert before == {name: os.path.getmtime(os.path.join(lmdb_path, name)) for name in os.listdir(lmdb_path)}
    no_val = write_image_folder(str(tmp_path / 'no_val'), per_class=(1, 0))
    os.rmdir(os.path.join(no_val, 'val', 'cat'))
    assert 'class' in script_error([no_val, str(tmp_path / 'out')], capsys)
    assert os.listdir(tmp_path) == ['no_val']


def test_folder2lmdb_names_a_missing_folder(tmp_path, capsys):
    err = script_error([str(tmp_path / 'nowhere'), str(tmp_path / 'out')], capsys)
    assert err == f'error: {tmp_path / "nowhere"} is not a folder; pass an image folder with train/ and val/ class ' \
                  'folders'
    assert os.listdir(tmp_path) == []


def test_folder2lmdb_reads_back_what_it_wrote_and_keeps_nothing_that_differs(tmp_path, capsys, monkeypatch):
    folder = write_image_folder(str(tmp_path / 'images'), per_class=(2, 1))
    fill = folder2lmdb.fill_lmdb

    def fill_then_change_one_byte(path, *args):  # as a disk or memory fault would
        written = fill(path, *args)
        with lmdb.open(path, subdir=True) as env, env.begin(write=True) as txn:
            value = txn.get(sample_key('val', 1))
            txn.put(sample_key('val', 1), value[:-1] + bytes([value[-1] ^ 1]))
        return written

    monkeypatch.setattr(folder2lmdb, 'fill_lmdb', fill_then_change_one_byte)
    output = str(tmp_path / 'out')
    assert script_error([folder, output], capsys) == (
        f'error: record val/000000001 of {output}, read back, is not what was written (a disk or memory fault?); '
        'nothing was kept: check the disk, then run again')
    assert os.listdir(tmp_path) == ['images']


def test_folder2lmdb_full_disk_and_ctrl_c_keep_nothing_and_say_so(tmp_path, capsys, monkeypatch):
    folder = write_image_folder(str(tmp_path / 'images'), per_class=(2, 1))
    output = str(tmp_path / 'out')
    write_split = folder2lmdb.write_split

    def fail_on_val(error):
        def write(env, folder, split, samples):
            if split == 'val':
                raise error
            return write_split(env, folder, split, samples)
        return write

    monkeypatch.setattr(folder2lmdb, 'write_split', fail_on_val(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert script_error([folder, output], capsys) == (
        f'error: could not write {output} (OSError: No space left on device); nothing was kept: free space or '
        'choose another place, then run again')
    assert os.listdir(tmp_path) == ['images']
    monkeypatch.setattr(folder2lmdb, 'write_split', fail_on_val(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as stop:
        folder2lmdb.main([folder, output])
    assert stop.value.code == 130
    assert capsys.readouterr().err == f'interrupted: nothing was kept of {output}; run the same command again\n'
    assert os.listdir(tmp_path) == ['images']
    monkeypatch.setattr(folder2lmdb, 'write_split', write_split)
    monkeypatch.setattr(folder2lmdb, 'map_size', lambda samples: 4096)  # LMDB's own error: its map is full
    err = script_error([folder, output], capsys)
    assert err.startswith(f'error: could not write {output} (MapFullError: ') and 'nothing was kept' in err
    assert os.listdir(tmp_path) == ['images']


def test_use_lmdb_errors_name_the_fix(folder_and_lmdb):
    folder, lmdb_path = folder_and_lmdb
    with pytest.raises(UserError, match='folder2lmdb'):
        datasets.build_dataset(True, parse(*BASE, '--data-path', folder, '--use-lmdb'))
    with pytest.raises(UserError, match='folder2lmdb'):
        datasets.build_dataset(True, parse(*BASE, '--data-path', os.path.join(folder, 'missing'), '--use-lmdb'))
    with pytest.raises(UserError, match='drop --use-lmdb'):
        datasets.build_dataset(True, parse('--data-set', 'CIFAR10', '--data-path', lmdb_path, '--use-lmdb'))


def test_main_trains_one_epoch_from_the_lmdb(folder_and_lmdb, tmp_path):
    result = run_main(TINY + ['--epochs', '1', '--data-set', 'FOLDER', '--data-path', folder_and_lmdb[1],
                              '--use-lmdb', '--num_workers', '2', '--output_dir', tmp_path])
    assert result.returncode == 0, result.stderr
    counts = re.search(r'(\d+) train / (\d+) val images, (\d+) classes', result.stdout)
    assert counts and counts.groups() == ('36', '12', '3'), result.stdout
    _, epochs = read_log(tmp_path)
    assert [line['epoch'] for line in epochs] == [0]
