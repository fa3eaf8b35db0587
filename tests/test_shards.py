"""shards.py and scripts/prepare_data.py --shards / --index: WebDataset shards written byte-identically, indexed in
DALI's format (read by DALI itself), read back with exactly the samples written, and bad shards refused in one line."""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest

import datasets
import shards
from conftest import ROOT, snapshot, write_image_folder

# ---------------------------------------------------------------- shards made by the test


def jpeg_bytes(seed, size=8):
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format='JPEG')
    return out.getvalue()


def published_shard(path, first, count, classes=5):
    """A shard laid out as timm's published ones: KEY.jpg, KEY.cls, KEY.json per sample, written by Python's
    tarfile as webdataset's TarWriter does (a directory entry first, to be skipped). Returns [(key, {ext: bytes})]."""
    samples = []
    with tarfile.open(path, 'w') as tar:
        add(tar, tarfile.TarInfo('meta'), b'', tarfile.DIRTYPE)
        for n in range(first, first + count):
            key = f'n0144{n:04d}_{n}'
            label = n % classes
            members = {'jpg': jpeg_bytes(n), 'cls': str(label).encode(),
                       'json': json.dumps({'filename': f'{key}.JPEG', 'label': label}).encode()}
            for ext, data in members.items():
                add(tar, tarfile.TarInfo(f'{key}.{ext}'), data)
            samples.append((key, members))
    return samples


def add(tar, info, data, kind=tarfile.REGTYPE):
    info.type, info.size, info.mtime = kind, len(data), 1700000000
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def published_set(root, shard_counts=(3, 4, 2)):
    """Shards imagenet1k-train-0000.tar, ... of shard_counts samples; returns {filename: [(key, members)]}."""
    os.makedirs(root, exist_ok=True)
    written, first = {}, 0
    for number, count in enumerate(shard_counts):
        name = f'imagenet1k-train-{number:04d}.tar'
        written[name] = published_shard(os.path.join(root, name), first, count)
        first += count
    return written


def one_line(error):
    text = str(error)
    assert '\n' not in text and text, text
    return text


# ---------------------------------------------------------------- shards.py


def test_index_shard_finds_the_data_offsets_of_a_published_layout_shard(tmp_path):
    path = str(tmp_path / 'imagenet1k-train-0000.tar')
    samples = published_shard(path, 0, 5)
    raw = open(path, 'rb').read()
    entries = shards.index_shard(path)
    assert [entry.key for entry in entries] == [key for key, _ in samples]
    for entry, (_, members) in zip(entries, samples):
        assert list(entry.members) == ['jpg', 'cls', 'json']  # tar order
        for ext, data in members.items():
            offset, size = entry.members[ext]
            assert size == len(data) and raw[offset:offset + size] == data and offset % 512 == 0
            with open(path, 'rb') as f:
                assert shards.read_member(f, offset, size) == data


def test_keys_end_at_the_first_dot_after_the_last_slash():
    assert shards.split_name('a/b.c/n01_1.seg.png') == ('a/b.c/n01_1', 'seg.png')
    assert shards.split_name('x.jpg') == ('x', 'jpg')
    assert shards.split_name('dir/.hidden') == (None, None)
    assert shards.split_name('README') == (None, None)


def test_an_index_round_trips_in_dalis_format(tmp_path):
    path = str(tmp_path / 'train-0000.tar')
    published_shard(path, 0, 3)
    entries = shards.index_shard(path)
    idx = shards.index_path(str(tmp_path), 'train-0000.tar')
    assert idx == str(tmp_path / 'train-0000.idx')
    assert shards.index_path(str(tmp_path), 'train-0000.tar', '/cache') == '/cache/train-0000.idx'
    shards.write_index(entries, idx)
    lines = open(idx).read().splitlines()
    assert lines[0] == 'v1.2 3' and len(lines) == 4
    jpg, cls, meta = entries[0].members['jpg'], entries[0].members['cls'], entries[0].members['json']
    assert lines[1] == (f'jpg {jpg[0]} {jpg[1]} n01440000_0.jpg cls {cls[0]} {cls[1]} n01440000_0.cls '
                        f'json {meta[0]} {meta[1]} n01440000_0.json')
    assert shards.read_index(idx) == entries and shards.index_count(idx) == 3
    assert [name for name in os.listdir(tmp_path) if name.endswith('.tmp')] == []


def test_write_shards_is_byte_identical_and_reads_back(tmp_path):
    samples = [(f'cat_{n}', {'jpg': jpeg_bytes(n), 'cls': b'%d' % (n % 3), 'json': b'{}'}) for n in range(7)]
    first = shards.write_shards(samples, str(tmp_path / 'a'), 'train', 3)
    second = shards.write_shards(iter(samples), str(tmp_path / 'b'), 'train', 3)
    assert first == second == [('train-000000.tar', 3), ('train-000001.tar', 3), ('train-000002.tar', 1)]
    for name in ('train-000000.tar', 'train-000000.idx', 'train-000002.tar', 'train-000002.idx'):
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
    read = []
    for name, _ in first:
        entries = shards.read_index(shards.index_path(str(tmp_path / 'a'), name))
        assert entries == shards.index_shard(str(tmp_path / 'a' / name))
        with open(tmp_path / 'a' / name, 'rb') as f:
            read += [(e.key, {ext: shards.read_member(f, *at) for ext, at in e.members.items()}) for e in entries]
    assert read == samples
    with tarfile.open(tmp_path / 'a' / 'train-000000.tar') as tar:
        member = tar.getmembers()[0]
        assert (member.name, member.mtime, member.mode, member.uid, member.gid) == ('cat_0.cls', 0, 0o644, 0, 0)


def test_keys_that_would_read_back_as_others_are_refused(tmp_path):
    for key in ('a.b', 'a b', '', 'dir/x.y'):
        with pytest.raises(ValueError, match='cannot be written'):
            shards.write_shards([(key, {'jpg': b'x'})], str(tmp_path), 'train', 2)
    assert [name for name in os.listdir(tmp_path) if name.endswith('.tmp')] == []


def test_info_files_in_timms_layout_and_brace_patterns(tmp_path):
    root = str(tmp_path)
    counts = {name: len(samples) for name, samples in published_set(root).items()}
    with pytest.raises(shards.ShardError, match=r'has no _info.json .* run python scripts/prepare_data.py --index'):
        shards.load_split_info(root, 'train')
    with pytest.raises(shards.ShardError, match='has no index .* --index'):
        shards.load_split_info(root, 'imagenet1k-train-{0000..0002}.tar')
    shards.write_info(root, {'train': list(counts.items())})
    shards.write_info(root, {'validation': [('imagenet1k-train-0002.tar', 2)]})  # merged, train kept
    info = json.load(open(tmp_path / '_info.json'))
    assert info['splits']['train'] == {'name': 'train', 'num_samples': 9, 'filenames': list(counts),
                                       'shard_lengths': [3, 4, 2]}
    assert shards.load_split_info(root, 'train') == shards.SplitInfo('train', tuple(counts), (3, 4, 2), 9)
    assert shards.load_split_info(root, 'imagenet1k-train-{0000..0001}.tar') == shards.SplitInfo(
        'train', tuple(counts)[:2], (3, 4), 7)
    with pytest.raises(shards.ShardError, match=r"has no split 'val' \(it has: train, validation\)"):
        shards.load_split_info(root, 'val')
    os.remove(tmp_path / '_info.json')
    for name, samples in counts.items():
        shards.write_index(shards.index_shard(os.path.join(root, name)), shards.index_path(root, name, root + '/c'))
    assert shards.load_split_info(root, 'imagenet1k-train-{0001..0002}.tar', root + '/c').shard_lengths == (4, 2)
    with pytest.raises(shards.ShardError, match='imagenet1k-train-0003.tar .* is missing'):
        shards.load_split_info(root, 'imagenet1k-train-{0000..0003}.tar')
    assert shards.expand_braces('s-{0..1}-{a,b}.tar') == ['s-0-a.tar', 's-0-b.tar', 's-1-a.tar', 's-1-b.tar']
    assert shards.expand_braces('{0008..0010}') == ['0008', '0009', '0010']


def test_a_dali_pipeline_reads_the_samples_through_our_index(tmp_path):
    from nvidia.dali import fn, pipeline_def  # installed wherever the tests run: a missing DALI fails here
    samples = [(f'k{n}', {'jpg': jpeg_bytes(n), 'cls': b'%d' % (n % 4)}) for n in range(5)]
    written = shards.write_shards(samples, str(tmp_path), 'train', 2)
    paths = [str(tmp_path / name) for name, _ in written]
    index_paths = [shards.index_path(str(tmp_path), name) for name, _ in written]

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=['jpg', 'cls'],
                                           missing_component_behavior='error'))

    pipe = read()
    pipe.build()
    assert pipe.epoch_size()['__Webdataset_0'] == len(samples)
    images, labels = pipe.run()
    assert [np.asarray(images[n]).tobytes() for n in range(len(samples))] == [m['jpg'] for _, m in samples]
    assert [np.asarray(labels[n]).tobytes() for n in range(len(samples))] == [m['cls'] for _, m in samples]


@pytest.mark.parametrize('damage, message', [
    ('cut_in_data', r'is truncated in sample n01440001_1: its member n01440001_1.jpg ends past the end'),
    ('cut_at_member', r'is truncated after sample n01440000_0 \(\d+ bytes, no end-of-archive block\)'),
    ('corrupt_header', r'has a corrupt tar header at byte \d+, after sample n01440000_0'),
    ('gzip', r'is gzip-compressed; .* decompress it'),
    ('not_tar', r'is not a tar file'),
])
def test_a_damaged_tar_is_one_line_naming_shard_and_sample(tmp_path, damage, message):
    path = str(tmp_path / 'imagenet1k-train-0000.tar')
    samples = published_shard(path, 0, 3)
    raw = open(path, 'rb').read()
    second = shards.index_shard(path)[1]
    second_header = min(offset for offset, _ in second.members.values()) - 512
    damaged = {'cut_in_data': raw[:second.members['jpg'][0] + 10],
               'cut_at_member': raw[:second_header],
               'corrupt_header': raw[:second_header] + b'\x07' * 512 + raw[second_header + 512:],
               'gzip': __import__('gzip').compress(raw),
               'not_tar': samples[0][1]['jpg'] * 4}[damage]
    open(path, 'wb').write(damaged)
    with pytest.raises(shards.ShardError) as error:
        shards.index_shard(path)
    assert path in one_line(error.value)
    assert __import__('re').search(message, str(error.value)), str(error.value)


def test_a_broken_index_is_one_line(tmp_path):
    idx = tmp_path / 'x.idx'
    for text, message in (('v1.1 1\njpg 0 3\n', 'does not start with "v1.2 COUNT"'),
                          ('v1.2 2\njpg 512 3 a.jpg\n', 'lists 1 samples, but its first line says 2'),
                          ('v1.2 1\njpg 513 3 a.jpg\n', 'line 2 has a broken member entry'),
                          ('v1.2 1\njpg 512 3 a.jpg cls 1024 1 b.cls\n', 'line 2 has a broken member entry'),
                          ('v1.2 1\njpg 512 3\n', 'line 2 is not "EXT OFFSET SIZE NAME" groups')):
        idx.write_text(text)
        with pytest.raises(shards.ShardError, match=message) as error:
            shards.read_index(str(idx))
        assert str(idx) in one_line(error.value)


# ---------------------------------------------------------------- scripts/prepare_data.py --shards and --index

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import prepare_data  # noqa: E402


from test_prepare_data import prepare  # noqa: E402 - the script run in this process


def read_shard_set(root, split):
    """[(key, {ext: bytes})] of a split, read through _info.json and the index files."""
    samples = []
    for filename in shards.load_split_info(str(root), split).filenames:
        with open(os.path.join(root, filename), 'rb') as f:
            for entry in shards.read_index(shards.index_path(str(root), filename)):
                samples.append((entry.key, {ext: shards.read_member(f, *at) for ext, at in entry.members.items()}))
    return samples


@pytest.fixture(scope='module')
def folder_and_shards(tmp_path_factory):
    """write_image_folder's 36 train and 12 val images, and their shards of 5 samples made in one run."""
    root = tmp_path_factory.mktemp('shards')
    src = write_image_folder(str(root / 'src'))
    try:
        assert prepare_data.main([src, str(root / 'wds'), '--shards', '--shard-size', '5', '--workers', '2']) == 0
    except SystemExit as stop:
        raise AssertionError(f'prepare_data.py exited with {stop.code}') from None
    return src, root / 'wds'


def test_a_folder_becomes_shards_that_read_back_as_the_folder(folder_and_shards):
    src, dst = folder_and_shards
    assert json.loads((dst / 'classes.json').read_text()) == ['cat', 'dog', 'fish']
    for folder, split in (('train', 'train'), ('val', 'validation')):
        folder_samples = datasets.ImageFolder(os.path.join(src, folder)).samples  # as IMNET training reads it
        read = read_shard_set(dst, split)
        assert len(read) == len(folder_samples) == len({key for key, _ in read})
        expected = {}
        for path, label in folder_samples:
            rel = os.path.relpath(path, src)
            with open(path, 'rb') as f:
                expected[rel] = (f.read(), label)
        got = {}
        for key, members in read:
            meta = json.loads(members['json'])
            image = members['png' if meta['filename'].endswith('.png') else 'jpg']
            assert set(members) == {'cls', 'json', os.path.splitext(meta['filename'])[1][1:]} and '.' not in key
            assert int(members['cls']) == meta['label'] and meta['class_name'] == ['cat', 'dog', 'fish'][meta['label']]
            got[meta['filename']] = (image, meta['label'])
        assert got == expected  # every image's bytes and label, nothing more
        first_shard = read[:5]
        assert len({json.loads(m['json'])['label'] for _, m in first_shard}) > 1  # shuffled across classes
    info = json.loads((dst / '_info.json').read_text())
    assert info['splits']['train']['shard_lengths'] == [5] * 7 + [1]
    assert info['splits']['validation']['filenames'] == ['validation-000000.tar', 'validation-000001.tar',
                                                         'validation-000002.tar']


def test_shards_are_byte_identical_between_runs_and_a_rerun_does_nothing(folder_and_shards, tmp_path, capsys):
    src, clean = folder_and_shards
    code, out, err = prepare(capsys, src, tmp_path / 'again', '--shards', '--shard-size', 5)
    assert code == 0 and out.splitlines()[-2:] == [
        f'48 images, 0 unreadable; 48 written to {tmp_path / "again"} (train: 36 samples in 8 shards; validation: '
        '12 samples in 3 shards)', f'{tmp_path / "again"} is a complete shard set '
        f'({tmp_path / "again" / "prepare_data.json"})']
    assert snapshot(tmp_path / 'again') == snapshot(clean)
    code, out, _ = prepare(capsys, src, tmp_path / 'again', '--shards', '--shard-size', 5)
    assert code == 0 and out.endswith('48 images in 11 shards; nothing to do\n')
    code, _, err = prepare(capsys, src, tmp_path / 'again', '--shards', '--shard-size', 6)
    assert code == 2 and err == f'error: {tmp_path / "again"} is a shard set of {os.path.realpath(src)} with ' \
                                '--max-side 0, --shard-size 5 and --seed 0 (JPEG quality 95); run with those options ' \
                                'to complete it, or pass a new DST\n'


def test_an_interrupted_shard_set_is_completed_by_a_rerun(folder_and_shards, tmp_path, capsys, monkeypatch):
    src, clean = folder_and_shards
    dst = tmp_path / 'dst'

    def failing_open(path, mode='r', *args, **kwargs):
        if 'w' in mode and 'train-000003.tar' in str(path):
            raise KeyboardInterrupt
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(shards, 'open', failing_open, raising=False)
    code, out, err = prepare(capsys, src, dst, '--shards', '--shard-size', 5)
    assert code == 130
    assert err == f'interrupted: the shard set in {dst} is unfinished; run the same command again to complete it\n'
    assert not any(name.endswith('.tmp') or name.startswith('train-000003') for name in os.listdir(dst))
    assert not json.loads((dst / 'prepare_data.json').read_text())['complete']
    monkeypatch.undo()
    code, out, _ = prepare(capsys, src, dst, '--shards', '--shard-size', 5)
    assert code == 0 and '; 3 shards by an earlier run)' in out
    assert snapshot(dst) == snapshot(clean)


def test_unreadable_images_leave_the_set_unfinished_until_skipped(tmp_path, capsys):
    src = write_image_folder(str(tmp_path / 'src'), per_class=(3, 1))
    broken = tmp_path / 'src' / 'train' / 'dog' / 'broken.jpg'
    broken.write_bytes(b'not a jpeg')
    (tmp_path / 'src' / 'train' / 'notes.txt').write_text('by hand')
    dst = tmp_path / 'dst'
    code, out, err = prepare(capsys, src, dst, '--shards', '--shard-size', 4)
    assert code == 1 and 'Traceback' not in err
    assert any(line.startswith(f'unreadable image {broken} (') for line in out.splitlines())
    assert err.strip() == (f'error: 1 unreadable image not written, so the shard set in {dst} is unfinished; remove '
                           'or replace them in SRC and pass a new DST, or add --skip-bad-images to complete it '
                           'without them')
    code, out, err = prepare(capsys, src, dst, '--shards', '--shard-size', 4, '--skip-bad-images')
    assert code == 0 and '13 images, 1 unreadable; 12 written to' in out
    assert len(read_shard_set(dst, 'train')) == 9 and len(read_shard_set(dst, 'validation')) == 3
    listed = (dst / 'not_copied.txt').read_text().splitlines()
    assert [line.split('\t')[0] for line in listed] == [os.path.join('train', 'dog', 'broken.jpg'),
                                                        os.path.join('train', 'notes.txt')]


def test_index_writes_the_index_files_and_info_of_published_shards(tmp_path, capsys):
    written = published_set(str(tmp_path / 'wds'))
    code, out, err = prepare(capsys, '--index', tmp_path / 'wds', workers=2)
    assert code == 0 and err == ''
    assert out.splitlines()[-2:] == [f'3 shards: 3 indexed now, 0 before, 0 damaged; index files in {tmp_path / "wds"}',
                                     'train: 9 samples in 3 shards']
    for name, samples in written.items():
        entries = shards.read_index(str(tmp_path / 'wds' / name.replace('.tar', '.idx')))
        assert entries == shards.index_shard(str(tmp_path / 'wds' / name))
    assert read_shard_set(tmp_path / 'wds', 'train') == [s for samples in written.values() for s in samples]
    code, out, _ = prepare(capsys, '--index', tmp_path / 'wds')
    assert code == 0 and '3 shards: 0 indexed now, 3 before, 0 damaged' in out
    code, out, _ = prepare(capsys, '--index', tmp_path / 'wds', '--cache-dir', tmp_path / 'cache')
    assert code == 0 and sorted(os.listdir(tmp_path / 'cache')) == [f'imagenet1k-train-000{n}.idx' for n in range(3)]


def test_bad_published_shards_are_named_one_line_each(tmp_path, capsys):
    root = tmp_path / 'wds'
    published_set(str(root))
    bad = {name: str(root / name) for name in ('imagenet1k-train-0000.tar', 'imagenet1k-train-0001.tar',
                                               'imagenet1k-train-0002.tar')}
    raw = open(bad['imagenet1k-train-0000.tar'], 'rb').read()
    open(bad['imagenet1k-train-0000.tar'], 'wb').write(raw[:len(raw) // 2])
    rewrite(bad['imagenet1k-train-0001.tar'], lambda key, ext: ext != 'cls' or not key.endswith('_4'))
    rewrite(bad['imagenet1k-train-0002.tar'], lambda key, ext: True, {'jpg': b'<html>not found</html>'})
    code, out, err = prepare(capsys, '--index', root)
    assert code == 1 and err == ''
    lines = out.splitlines()
    assert any(line.startswith(f'shard {bad["imagenet1k-train-0000.tar"]} is truncated after sample n01440002_2')
               for line in lines), out
    assert f'shard {bad["imagenet1k-train-0001.tar"]}: sample n01440004_4 has no .cls label member' in lines
    assert f"shard {bad['imagenet1k-train-0002.tar']}: sample n01440007_7 has a .jpg member that is not an image " \
           "(it starts with b'<html>no')" in lines
    assert f'{root} has no _info.json, and it is not written while a shard is damaged' in lines
    assert not os.path.exists(root / '_info.json') and not os.path.exists(root / 'imagenet1k-train-0000.idx')
    assert os.path.exists(root / 'imagenet1k-train-0002.idx')  # training can skip its bad sample


def rewrite(path, keep, replace=None):
    """Rewrite a published-layout shard, keeping the members keep(key, ext) allows; its first sample's members
    named in `replace` get those bytes."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    first = shards.split_name(members[0][0].name)[0]
    with tarfile.open(path, 'w') as tar:
        for member, data in members:
            key, ext = shards.split_name(member.name)
            if keep(key, ext):
                data = (replace or {}).get(ext, data) if key == first else data
                add(tar, tarfile.TarInfo(member.name), data)


def test_wrong_flags_and_destinations_are_one_line_errors(folder_and_shards, tmp_path, capsys):
    src, _ = folder_and_shards
    copy = tmp_path / 'copy'
    assert prepare(capsys, src, copy)[0] == 0
    for argv, message in (((src, tmp_path / 'x', '--shard-size', 4), '--shard-size and --seed set how --shards'),
                          ((src, '--cache-dir', tmp_path), '--cache-dir is where --index ROOT writes'),
                          ((src, '--index', tmp_path), '--index ROOT takes no SRC'),
                          ((src, '--shards'), '--shards writes shards; pass DST'),
                          ((src, tmp_path / 'x', '--shards', '--shard-size', 0), '--shard-size must be >= 1'),
                          (('--index', tmp_path / 'none'), 'is not a folder'),
                          (('--index', copy), 'holds no .tar shards'),
                          ((tmp_path / 'copy' / 'train', tmp_path / 'x', '--shards'), 'has no train/ or val/ folder'),
                          ((src, copy, '--shards'), f'{copy} is a copy of {os.path.realpath(src)} with --max-side 0 '
                                                    '(JPEG quality 95); run with those options')):
        code, out, err = prepare(capsys, *argv)
        assert code == 2 and err.startswith('error: ') and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / 'x')


def test_a_changed_source_is_refused_until_dst_is_new(tmp_path, capsys, monkeypatch):
    src = write_image_folder(str(tmp_path / 'src'), per_class=(2, 1))
    dst = tmp_path / 'dst'
    monkeypatch.setattr(shards, 'write_info', lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert prepare(capsys, src, dst, '--shards')[0] == 130
    monkeypatch.undo()
    os.remove(os.path.join(src, 'train', 'cat', 'cat_0.jpg'))
    code, _, err = prepare(capsys, src, dst, '--shards')
    assert code == 2 and err == f'error: {os.path.realpath(src)} has changed since the shard set in {dst} was ' \
                                f'started (images added, removed or renamed); pass a new DST, or remove {dst} to ' \
                                'start again\n'
