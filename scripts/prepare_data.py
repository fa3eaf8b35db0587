"""Check an ImageNet-style folder before training on it, and optionally write a pre-resized copy.

    python scripts/prepare_data.py /data/imagenet                               # check every image
    python scripts/prepare_data.py /data/imagenet /data/imagenet-256 --max-side 256 --workers 16

Every image file under SRC is decoded in full, in parallel (as training would read it: any colour mode, 16-bit and
alpha converted to RGB), with a progress line. Files that cannot be decoded are listed, each with its reason, and the
exit code is 1. With DST, the readable images are copied there under the same relative paths, so class folders and
their names stay; with --max-side N the copy is shrunk (bicubic, aspect kept) so that its longer side is at most N
pixels, which saves decoding time in budget runs at low resolution. Nothing in SRC is changed, and DST must be new
or empty.
"""
import argparse
import os
import shutil
import sys
import time
from multiprocessing import Pool

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from datasets import IMG_EXTENSIONS  # noqa: E402
from images import BadImageError, load_rgb  # noqa: E402
from utils import UserError  # noqa: E402

JPEG_QUALITY = 95


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='the data set folder (train/ and val/ with class folders, or any folder of images)')
    p.add_argument('dst', nargs='?', default='', help='where to write the checked (and resized) copy')
    p.add_argument('--max-side', type=int, default=0, metavar='N', help='shrink the copy to at most N px per side')
    p.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='processes decoding in parallel')
    return p


def image_files(src):
    """Relative paths of the image files under src, sorted; links are not followed out of it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        found += [os.path.relpath(os.path.join(dirpath, name), src) for name in filenames
                  if name.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


def check_folders(src, dst, max_side, workers):
    if not os.path.isdir(src):
        raise UserError(f'{src} is not a folder; pass the data set folder')
    if max_side < 0 or workers < 1:
        raise UserError('--max-side must be >= 0 and --workers >= 1')
    if max_side and not dst:
        raise UserError('--max-side writes a resized copy; pass DST, the folder to write it to')
    if dst:
        real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
        if os.path.commonpath([real_src, real_dst]) in (real_src, real_dst):
            raise UserError(f'{dst} and {src} overlap; pass a DST outside SRC (SRC is never changed)')
        if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
            raise UserError(f'{dst} exists and is not an empty folder; pass a new DST')


def process(job):
    """Decode one image; copy or shrink it into dst. Returns (relative path, None) or (relative path, reason)."""
    src, dst, max_side, rel = job
    path = os.path.join(src, rel)
    try:
        img = load_rgb(path)
    except BadImageError as e:
        return rel, str(e)
    if dst:
        out = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if max_side and max(img.size) > max_side:
            scale = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
            options = {'quality': JPEG_QUALITY} if out.lower().endswith(('.jpg', '.jpeg')) else {}
            if img.info.get('exif'):  # the pixels stay as stored, so the orientation tag keeps its meaning
                options['exif'] = img.info['exif']
            img.save(out, **options)
        else:
            shutil.copyfile(path, out)
    return rel, None


def run(src, dst, max_side, workers, progress=sys.stderr):
    """(number of files, [(relative path, reason) of the unreadable ones])."""
    files = image_files(src)
    bad, start = [], time.time()
    with Pool(workers) as pool:
        jobs = [(src, dst, max_side, rel) for rel in files]
        for done, (rel, reason) in enumerate(pool.imap_unordered(process, jobs, chunksize=16), 1):
            if reason:
                bad.append((rel, reason))
            if done % 500 == 0 or done == len(files):
                rate = done / max(time.time() - start, 1e-9)
                print(f'\r{done}/{len(files)} images checked, {len(bad)} unreadable, {rate:.0f} img/s',
                      end='' if done < len(files) else '\n', file=progress, flush=True)
    return len(files), sorted(bad)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        check_folders(args.src, args.dst, args.max_side, args.workers)
    except UserError as e:
        utils.exit_with_error(e)
    total, bad = run(args.src, args.dst, args.max_side, args.workers)
    for _, reason in bad:
        print(reason)  # names the file and why
    copied = f'; {total - len(bad)} written to {args.dst}' if args.dst else ''
    print(f'{total} images, {len(bad)} unreadable{copied}')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
