"""scripts/prepare_data.py: every image checked, the unreadable ones named, a resized copy that keeps the layout,
and a copy that finishes or says it did not: one-line errors, no partial file, a rerun that completes it."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, snapshot, write_image_folder

SCRIPT = os.path.join(ROOT, 'scripts', 'prepare_data.py')
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import prepare_data  # noqa: E402


def run(*argv):
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv), '--workers', '2'], capture_output=True,
                          text=True, timeout=300)


def prepare(capsys, *argv, workers=1):
    """(exit code, stdout, stderr) of the script run in this process."""
    try:
        code = prepare_data.main([*map(str, argv), '--workers', str(workers)])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def temporary_files(folder):
    return [rel for rel in snapshot(folder) if rel.endswith('.tmp')]


def marker(dst):
    with open(os.path.join(dst, 'prepare_data.json')) as f:
        return json.load(f)


@pytest.fixture
def src_and_clean_copy(tmp_path, capsys):
    """A folder of 48 images and a copy of it made in one uninterrupted run."""
    src = write_image_folder(str(tmp_path / 'src'))
    assert prepare(capsys, src, tmp_path / 'clean')[0] == 0
    return src, snapshot(tmp_path / 'clean')


def test_a_clean_folder_passes_and_is_copied_byte_for_byte(tmp_path):
    src = write_image_folder(str(tmp_path / 'src'))
    dst = tmp_path / 'dst'
    result = run(src, dst)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-2:] == [f'48 images, 0 unreadable; 48 written to {dst}',
                                                       f'{dst} is a complete copy ({dst / "prepare_data.json"})']
    copy = snapshot(dst)
    assert copy.pop('not_copied.txt') == b''
    assert json.loads(copy.pop('prepare_data.json')) == {
        'made_by': 'scripts/prepare_data.py', 'format': 1, 'complete': True,
        'options': {'source': os.path.realpath(src), 'max_side': 0, 'jpeg_quality': 95},
        'images': 48, 'written': 48, 'unreadable': 0, 'not_images': 0}
    assert copy == snapshot(src)


def test_unreadable_files_are_named_and_the_exit_is_1(tmp_path, capsys):
    src = write_image_folder(str(tmp_path / 'src'))
    bad = os.path.join(src, 'train', 'cat', 'broken.jpg')
    with open(bad, 'w') as f:
        f.write('not an image')
    before = snapshot(src)
    pipe = os.path.join(src, 'val', 'dog', 'pipe.png')
    os.mkfifo(pipe)
    code, out, _ = prepare(capsys, src, workers=2)
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[-1] == '50 images, 2 unreadable'
    assert any(line.startswith(f'unreadable image {bad} (') for line in lines)
    assert any(line.startswith(f'unreadable image {pipe} (not a regular file)') for line in lines)
    os.remove(pipe)  # reading it would block, as it would have blocked a training run
    assert snapshot(src) == before


def test_max_side_shrinks_the_copy_and_keeps_classes_and_aspect(tmp_path, capsys):
    src = tmp_path / 'src'
    for split, cls in (('train', 'ant'), ('val', 'ant'), ('train', 'bee')):
        (src / split / cls).mkdir(parents=True)
    Image.new('RGB', (500, 375), (10, 200, 30)).save(src / 'train' / 'ant' / 'wide.jpg')
    Image.new('RGB', (100, 300), (10, 200, 30)).save(src / 'val' / 'ant' / 'tall.png')
    Image.new('RGB', (64, 48), (10, 200, 30)).save(src / 'train' / 'bee' / 'small.jpg')
    assert prepare(capsys, src, tmp_path / 'dst', '--max-side', 160, workers=2)[0] == 0
    images = [rel for rel in snapshot(tmp_path / 'dst') if rel.endswith(('.jpg', '.png'))]
    sizes = {rel: Image.open(tmp_path / 'dst' / rel).size for rel in images}
    assert sizes == {os.path.join('train', 'ant', 'wide.jpg'): (160, 120),
                     os.path.join('val', 'ant', 'tall.png'): (53, 160),
                     os.path.join('train', 'bee', 'small.jpg'): (64, 48)}  # never enlarged
    assert Image.open(tmp_path / 'dst' / 'train' / 'ant' / 'wide.jpg').format == 'JPEG'
    assert Image.open(tmp_path / 'dst' / 'val' / 'ant' / 'tall.png').format == 'PNG'


def test_bad_sources_and_destinations_are_one_line_errors(tmp_path, capsys):
    src = write_image_folder(str(tmp_path / 'src'), per_class=(1, 1))
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'mine.txt').write_text('keep')
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'prepare_data.json').write_text('{"complete": true}')
    for argv, message in (((src, tmp_path / 'full'), 'is not an empty folder, nor a copy started by prepare_data'),
                          ((src, tmp_path / 'foreign'), 'was not written by this version of prepare_data.py'),
                          ((src, os.path.join(src, 'copy')), 'overlap'),
                          ((src, '--max-side', 64), 'pass DST'),
                          ((tmp_path / 'nowhere', tmp_path / 'dst'), 'is not a folder')):
        code, out, err = prepare(capsys, *argv)
        assert code == 2 and err.startswith('error: ') and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert (tmp_path / 'full' / 'mine.txt').read_text() == 'keep'
    assert sorted(os.listdir(tmp_path)) == ['foreign', 'full', 'src']


def test_max_side_keeps_the_exif_orientation_tag(tmp_path, capsys):
    src = tmp_path / 'src' / 'train' / 'a'
    src.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new('RGB', (400, 300), (200, 30, 30)).save(src / 'turned.jpg', exif=exif.tobytes())
    assert prepare(capsys, tmp_path / 'src', tmp_path / 'dst', '--max-side', '100')[0] == 0
    with Image.open(tmp_path / 'dst' / 'train' / 'a' / 'turned.jpg') as copy:
        assert copy.size == (100, 75) and copy.getexif().get(0x0112) == 6


# ---------------------------------------------------------------- failures, interruptions and reruns

class FailingWrite:
    """A file open for writing whose write() stores half the bytes and then raises `error`, as a full disk or a
    Ctrl-C in the middle of a write would."""

    def __init__(self, file, error):
        self.file, self.error = file, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[:len(data) // 2])
        raise self.error


def fail_writes(monkeypatch, error, where):
    """Every file the script opens for writing whose path contains `where` fails with `error`."""
    def failing_open(path, mode='r', *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return FailingWrite(file, error) if 'w' in mode and where in str(path) else file
    monkeypatch.setattr(prepare_data, 'open', failing_open, raising=False)


def test_a_full_disk_is_one_line_and_a_rerun_completes_the_copy(src_and_clean_copy, tmp_path, capsys, monkeypatch):
    src, clean = src_and_clean_copy
    dst = tmp_path / 'dst'
    fail_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), f'{os.sep}dog{os.sep}')
    code, out, err = prepare(capsys, src, dst, workers=2)  # the error comes back from a worker process
    assert code == 2
    assert err.startswith('error: no space left for the copy (') and 'No space left on device' in err
    assert err.strip().endswith(f'{dst} is unfinished; free space or fix that, then run the same command again to '
                                'complete it')
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    partial = snapshot(dst)
    assert temporary_files(dst) == [] and not marker(dst)['complete']
    assert all(data == clean[rel] for rel, data in partial.items() if rel != 'prepare_data.json')  # none truncated
    monkeypatch.undo()
    code, out, _ = prepare(capsys, src, dst)
    assert code == 0 and 'by an earlier run' in out
    assert snapshot(dst) == clean


def test_a_read_only_dst_is_one_line_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    src = write_image_folder(str(tmp_path / 'src'), per_class=(1, 1))
    (tmp_path / 'dst').mkdir()
    fail_writes(monkeypatch, OSError(errno.EROFS, os.strerror(errno.EROFS)), str(tmp_path / 'dst'))
    code, out, err = prepare(capsys, src, tmp_path / 'dst')
    assert code == 2 and err.startswith(f'error: cannot write to {tmp_path / "dst"} (') and len(err.splitlines()) == 1
    assert err.strip().endswith('Read-only file system); make it writable or pass another DST')
    assert os.listdir(tmp_path / 'dst') == []


def test_ctrl_c_inside_a_write_leaves_no_part_of_the_file(src_and_clean_copy, tmp_path, capsys, monkeypatch):
    src, clean = src_and_clean_copy
    dst = tmp_path / 'dst'
    fail_writes(monkeypatch, KeyboardInterrupt(), 'fish_3')
    code, out, err = prepare(capsys, src, dst)
    assert code == 130
    assert err == f'interrupted: the copy in {dst} is unfinished; run the same command again to complete it\n'
    assert temporary_files(dst) == [] and not marker(dst)['complete']
    assert not any('fish_3' in rel for rel in snapshot(dst))
    monkeypatch.undo()
    assert prepare(capsys, src, dst)[0] == 0
    assert snapshot(dst) == clean


def test_a_complete_copy_is_left_as_it_is(src_and_clean_copy, tmp_path, capsys):
    src, clean = src_and_clean_copy
    dst = tmp_path / 'clean'
    times = {rel: os.stat(dst / rel).st_mtime_ns for rel in clean}
    code, out, err = prepare(capsys, src, dst)
    assert code == 0 and err == ''
    assert out == f'{dst} is already a complete copy of {os.path.realpath(src)} with --max-side 0 (JPEG quality ' \
                  '95): 48 images written, 0 files not copied; nothing to do\n'
    assert {rel: os.stat(dst / rel).st_mtime_ns for rel in clean} == times


def test_a_rerun_with_other_options_is_refused(src_and_clean_copy, tmp_path, capsys, monkeypatch):
    src, _ = src_and_clean_copy
    dst = tmp_path / 'dst'
    fail_writes(monkeypatch, KeyboardInterrupt(), 'cat_5')
    assert prepare(capsys, src, dst, '--max-side', 8)[0] == 130
    monkeypatch.undo()
    before = snapshot(dst)
    other = write_image_folder(str(tmp_path / 'other'), per_class=(1, 1))
    for argv in ((src, dst), (src, dst, '--max-side', 6), (other, dst, '--max-side', 8)):
        code, out, err = prepare(capsys, *argv)
        assert code == 2 and out == ''
        assert err == f'error: {dst} is a copy of {os.path.realpath(src)} with --max-side 8 (JPEG quality 95); run ' \
                      'with those options to complete it, or pass a new DST\n'
    assert snapshot(dst) == before


def test_files_not_copied_are_listed_and_skip_bad_images_completes_the_copy(tmp_path, capsys):
    src = write_image_folder(str(tmp_path / 'src'), per_class=(2, 1))
    (tmp_path / 'src' / 'train' / 'cat' / 'notes.txt').write_text('labels by hand')
    (tmp_path / 'src' / '.DS_Store').write_bytes(b'\0')
    broken = tmp_path / 'src' / 'val' / 'dog' / 'broken.png'
    broken.write_bytes(b'not a png')
    dst = tmp_path / 'dst'
    code, out, err = prepare(capsys, src, dst)
    assert code == 1
    assert f'not images, so not copied: 2 files (.DS_Store, {os.path.join("train", "cat", "notes.txt")}; all in ' \
           f'{dst / "not_copied.txt"})' in out.splitlines()
    assert err.strip().splitlines()[-1] == (
        f'error: 1 unreadable image not copied, so {dst} is unfinished; remove or replace them in SRC and run the '
        'same command again, or add --skip-bad-images to complete the copy without them')
    assert not marker(dst)['complete']
    listed = (dst / 'not_copied.txt').read_text().splitlines()
    assert [line.split('\t')[0] for line in listed] == ['.DS_Store', os.path.join('train', 'cat', 'notes.txt'),
                                                        os.path.join('val', 'dog', 'broken.png')]
    assert listed[2].split('\t')[1].startswith(f'unreadable image {broken} (')
    code, out, err = prepare(capsys, src, dst, '--skip-bad-images')
    assert code == 0 and '10 images, 1 unreadable; 9 written to' in out
    assert {key: marker(dst)[key] for key in ('complete', 'images', 'written', 'unreadable', 'not_images')} == {
        'complete': True, 'images': 10, 'written': 9, 'unreadable': 1, 'not_images': 2}
    assert (dst / 'not_copied.txt').read_text().splitlines() == listed
    assert sorted(rel for rel in snapshot(dst) if rel.endswith(('.jpg', '.png'))) == sorted(
        rel for rel in snapshot(src) if rel.endswith(('.jpg', '.png')) and 'broken' not in rel)


def test_a_check_names_files_that_are_not_images(tmp_path, capsys):
    src = write_image_folder(str(tmp_path / 'src'), per_class=(1, 1))
    (tmp_path / 'src' / 'README').write_text('about the data')
    code, out, err = prepare(capsys, src)
    assert code == 0
    assert out.splitlines()[-2:] == ['not images, so not checked: 1 file (README)', '6 images, 0 unreadable']
