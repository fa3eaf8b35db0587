"""--data-set WDS: WebDataset shards made from a test folder (and in timm's published layout), read by both
backends, every sample once per epoch over ranks and workers, exact mid-epoch resume, bad shards in one line."""
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

import main
import samplers
import shards
from conftest import ROOT, SUMMARY, TINY, read_log, run_main, write_image_folder
from test_reliability import EXACT, assert_same_weights, load, start_training, wait_for_progress_lines
from wds_dataset import ShardDataset


def prepare(*args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'prepare_data.py')] + [str(a) for a in args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope='module')
def folder_and_shards(tmp_path_factory):
    """A test image folder (3 classes, 36 train / 12 val images) and its shards, 10 samples to a shard."""
    root = tmp_path_factory.mktemp('wds')
    folder = write_image_folder(str(root / 'folder'))
    prepare(folder, root / 'shards', '--shards', '--shard-size', '10')
    return folder, root / 'shards'


def wds(shard_root, *flags):
    return TINY + ['--data-set', 'WDS', '--data-path', shard_root, '--batch-size', '8'] + [str(f) for f in flags]


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize('backend', ['pil', 'dali'])
def test_the_quick_start_model_trains_on_shards_with_both_backends(folder_and_shards, tmp_path, backend):
    _, shard_root = folder_and_shards
    result = ok(run_main(wds(shard_root, '--data-backend', backend, '--num_workers', '2', '--output_dir', tmp_path)))
    assert '36 train / 12 val images, 3 classes' in result.stdout
    assert [e['epoch'] for e in read_log(tmp_path)[1]] == [0, 1]
    assert load(tmp_path / 'checkpoint.pth')['class_names'] == ['cat', 'dog', 'fish']


def test_shards_hold_the_folders_samples_and_labels(folder_and_shards):
    folder, shard_root = folder_and_shards
    classes = json.loads((shard_root / 'classes.json').read_text())
    for split, name in (('train', 'train'), ('val', 'validation')):
        dataset = ShardDataset(str(shard_root), name, classes)
        read = sorted((bytes(data), label) for data, label, _ in map(dataset.encoded, range(len(dataset))))
        files = sorted((open(os.path.join(folder, split, c, f), 'rb').read(), k)
                       for k, c in enumerate(classes) for f in os.listdir(os.path.join(folder, split, c)))
        assert read == files


@pytest.mark.parametrize('world', [1, 2])
def test_every_sample_once_per_epoch_over_ranks_and_workers(folder_and_shards, world):
    _, shard_root = folder_and_shards
    classes = json.loads((shard_root / 'classes.json').read_text())
    dataset = ShardDataset(str(shard_root), 'train', classes)
    dataset.loader = lambda name, data: name  # the sample's shard and key, not its pixels
    seen = []
    for rank in range(world):
        sampler = samplers.RASampler(len(dataset), num_replicas=world, rank=rank, shuffle=True, num_repeats=1, seed=0)
        sampler.set_epoch(3)
        loader = torch.utils.data.DataLoader(samplers.SeededDataset(dataset), batch_size=4, sampler=sampler,
                                             num_workers=2, collate_fn=lambda batch: batch)
        seen += [item[0] for batch in loader for item in batch]
    assert len(seen) == len(set(seen)) == len(dataset) == 36


def test_a_run_stopped_mid_epoch_resumes_exactly_with_workers(folder_and_shards, tmp_path):
    _, shard_root = folder_and_shards
    flags = EXACT + ['--data-set', 'WDS', '--data-path', shard_root, '--batch-size', '4', '--num_workers', '2']
    ok(run_main(flags + ['--output_dir', tmp_path / 'reference']))
    stopped = tmp_path / 'stopped'
    proc = start_training(flags + ['--output_dir', stopped, '--save-every', '2'])
    assert wait_for_progress_lines(proc, 6)  # inside epoch 0's 9 updates
    proc.kill()
    proc.wait()
    assert load(stopped / 'checkpoint.pth')['step_in_epoch'] > 0
    resumed = ok(run_main(flags + ['--output_dir', stopped, '--save-every', '2']))
    assert 'resumed from' in resumed.stdout
    assert_same_weights(load(tmp_path / 'reference' / 'checkpoint.pth'), load(stopped / 'checkpoint.pth'))


def write_published_shard(path, samples):
    """A tar as timm's published shards are: KEY.jpg, KEY.cls, KEY.json per sample, written by Python's tarfile."""
    with tarfile.open(path, 'w') as tar:
        for key, image, label in samples:
            for ext, data in (('jpg', image), ('cls', str(label).encode()), ('json', json.dumps({'label': label}).encode())):
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def jpeg(colour):
    buffer = io.BytesIO()
    Image.new('RGB', (12, 12), colour).save(buffer, 'JPEG')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """Shards in timm's imagenet-1k-wds naming, without indexes or classes.json; _info.json as timm's."""
    root = tmp_path_factory.mktemp('published')
    colours = [(200, 30, 30), (30, 200, 30)]
    names = {'train': [f'imagenet1k-train-{i:04d}.tar' for i in range(3)],
             'validation': [f'imagenet1k-validation-{i:02d}.tar' for i in range(1)]}
    info = {'name': 'imagenet-1k', 'splits': {}}
    for split, files in names.items():
        for s, name in enumerate(files):
            write_published_shard(root / name, [(f'n0{s}{i:05d}', jpeg(colours[i % 2]), i % 2) for i in range(8)])
        info['splits'][split] = {'name': split, 'num_samples': 8 * len(files), 'filenames': files,
                                 'shard_lengths': [8] * len(files)}
    (root / '_info.json').write_text(json.dumps(info))
    return root


def test_timms_published_layout_trains_once_indexed(published, tmp_path):
    result = run_main(wds(published, '--num-classes', '2', '--output_dir', ''))
    assert result.returncode != 0 and 'prepare_data.py --index' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    prepare('--index', published, '--cache-dir', tmp_path / 'idx')
    result = ok(run_main(wds(published, '--num-classes', '2', '--wds-index-dir', tmp_path / 'idx',
                             '--output_dir', '')))
    assert '24 train / 8 val images, 2 classes' in result.stdout and re.search(SUMMARY, result.stdout)


def test_without_classes_json_or_num_classes_is_one_line(published):
    result = run_main(wds(published, '--output_dir', ''))
    assert result.returncode != 0 and 'pass --num-classes N' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def copy_shards(source, target):
    import shutil
    shutil.copytree(source, target)
    return target


def test_a_truncated_shard_is_one_line_naming_it(folder_and_shards, tmp_path):
    _, shard_root = folder_and_shards
    root = copy_shards(shard_root, tmp_path / 'shards')
    shard = sorted(root.glob('train-*.tar'))[0]
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 3])
    result = run_main(wds(root, '--num_workers', '2', '--output_dir', ''))
    assert result.returncode != 0 and str(shard) in result.stderr and 'truncated' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_sample_without_its_label_is_one_line_or_skipped_and_counted(published, tmp_path):
    root = copy_shards(published, tmp_path / 'shards')
    shard = root / 'imagenet1k-train-0001.tar'
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != 'n0100003.cls']
    with tarfile.open(shard, 'w') as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    indexed = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'prepare_data.py'), '--index', str(root)],
                             capture_output=True, text=True, timeout=300)
    assert indexed.returncode == 1 and f'{shard}: sample n0100003 has no .cls' in indexed.stdout  # indexed, and said
    flags = wds(root, '--num-classes', '2', '--output_dir', '')
    result = run_main(flags)
    assert result.returncode != 0 and f'{shard}:n0100003' in result.stderr and '.cls' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    out = tmp_path / 'skipping'
    ok(run_main(flags[:-2] + ['--skip-bad-images', '--epochs', '1', '--output_dir', out]))
    assert read_log(out)[1][0]['skipped_images'] == 1


def test_start_up_reads_only_the_indexes_of_the_shards_it_touches(folder_and_shards, monkeypatch):
    _, shard_root = folder_and_shards
    reads = []
    read_index = shards.read_index
    monkeypatch.setattr(shards, 'read_index', lambda path: reads.append(path) or read_index(path))
    classes = json.loads((shard_root / 'classes.json').read_text())
    dataset = ShardDataset(str(shard_root), 'train', classes)
    assert len(dataset) == 36 and reads == []  # the counts come from _info.json
    dataset[25]
    assert reads == [shards.index_path(str(shard_root), 'train-000002.tar')]



def test_the_start_up_benchmark_runs_on_a_small_fake_set():
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'bench_shard_start.py'), '--shards', '3',
                             '--per-shard', '40', '--workers', '1'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row['samples'] == 120 and row['first_batch'] == 64 and row['seconds_to_first_batch'] > 0


def test_webp_and_png_members_decode_as_image_files_do(tmp_path):
    def encoded(fmt):
        buffer = io.BytesIO()
        Image.new('RGB', (12, 10), (10, 120, 230)).save(buffer, fmt, **({'lossless': True} if fmt == 'WEBP' else {}))
        return buffer.getvalue()
    samples = [('a', {'webp': encoded('WEBP'), 'cls': b'1'}), ('b', {'png': encoded('PNG'), 'cls': b'0'})]
    written = shards.write_shards(samples, str(tmp_path), 'train', 10)
    shards.write_info(str(tmp_path), {'train': written})
    dataset = ShardDataset(str(tmp_path), 'train', ['x', 'y'])
    for index, label in ((0, 1), (1, 0)):
        image, got = dataset[index]
        assert got == label and image.size == (12, 10) and image.getpixel((3, 3)) == (10, 120, 230)
