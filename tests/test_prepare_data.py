"""scripts/prepare_data.py: every image checked, the unreadable ones named, a resized copy that keeps the layout."""
import os
import subprocess
import sys

from PIL import Image

from conftest import ROOT, snapshot, write_image_folder

SCRIPT = os.path.join(ROOT, 'scripts', 'prepare_data.py')


def run(*argv):
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv), '--workers', '2'], capture_output=True,
                          text=True, timeout=300)


def test_a_clean_folder_passes_and_is_copied_byte_for_byte(tmp_path):
    src = write_image_folder(str(tmp_path / 'src'))
    result = run(src, tmp_path / 'dst')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith('48 images, 0 unreadable; 48 written to ' + str(tmp_path / 'dst'))
    assert snapshot(tmp_path / 'dst') == snapshot(src)


def test_unreadable_files_are_named_and_the_exit_is_1(tmp_path):
    src = write_image_folder(str(tmp_path / 'src'))
    bad = os.path.join(src, 'train', 'cat', 'broken.jpg')
    with open(bad, 'w') as f:
        f.write('not an image')
    before = snapshot(src)
    pipe = os.path.join(src, 'val', 'dog', 'pipe.png')
    os.mkfifo(pipe)
    result = run(src)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == '50 images, 2 unreadable'
    assert any(line.startswith(f'unreadable image {bad} (') for line in lines)
    assert any(line.startswith(f'unreadable image {pipe} (not a regular file)') for line in lines)
    os.remove(pipe)  # reading it would block, as it would have blocked a training run
    assert snapshot(src) == before


def test_max_side_shrinks_the_copy_and_keeps_classes_and_aspect(tmp_path):
    src = tmp_path / 'src'
    for split, cls in (('train', 'ant'), ('val', 'ant'), ('train', 'bee')):
        (src / split / cls).mkdir(parents=True)
    Image.new('RGB', (500, 375), (10, 200, 30)).save(src / 'train' / 'ant' / 'wide.jpg')
    Image.new('RGB', (100, 300), (10, 200, 30)).save(src / 'val' / 'ant' / 'tall.png')
    Image.new('RGB', (64, 48), (10, 200, 30)).save(src / 'train' / 'bee' / 'small.jpg')
    result = run(src, tmp_path / 'dst', '--max-side', 160)
    assert result.returncode == 0, result.stderr
    sizes = {rel: Image.open(tmp_path / 'dst' / rel).size for rel in snapshot(tmp_path / 'dst')}
    assert sizes == {os.path.join('train', 'ant', 'wide.jpg'): (160, 120),
                     os.path.join('val', 'ant', 'tall.png'): (53, 160),
                     os.path.join('train', 'bee', 'small.jpg'): (64, 48)}  # never enlarged


def test_bad_destinations_are_one_line_errors(tmp_path):
    src = write_image_folder(str(tmp_path / 'src'), per_class=(1, 1))
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'mine.txt').write_text('keep')
    for argv, message in (((src, tmp_path / 'full'), 'is not an empty folder'),
                          ((src, os.path.join(src, 'copy')), 'overlap'),
                          ((src, '--max-side', 64), 'pass DST'),
                          ((tmp_path / 'nowhere',), 'is not a folder')):
        result = run(*argv)
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / 'full' / 'mine.txt').read_text() == 'keep'


def test_max_side_keeps_the_exif_orientation_tag(tmp_path):
    src = tmp_path / 'src' / 'train' / 'a'
    src.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new('RGB', (400, 300), (200, 30, 30)).save(src / 'turned.jpg', exif=exif.tobytes())
    result = run(tmp_path / 'src', tmp_path / 'dst', '--max-side', '100')
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / 'dst' / 'train' / 'a' / 'turned.jpg') as copy:
        assert copy.size == (100, 75) and copy.getexif().get(0x0112) == 6
