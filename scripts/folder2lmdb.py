"""Pack an image folder's train/ and val/ splits into one LMDB that --use-lmdb reads.

    python scripts/folder2lmdb.py /data/imagenet /data/imagenet_lmdb
    python main.py --data-set IMNET --data-path /data/imagenet_lmdb --use-lmdb ...

Images are stored as the encoded bytes found on disk, in ImageFolder's order, with their labels, their file
names and the class names: training reads the same samples from the LMDB as from the folder. The folder gets the
same checks as --data-path (matching class folders in both splits, at least one image per class).
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmdb  # noqa: E402

import datasets  # noqa: E402
from lmdb_dataset import FORMAT_VERSION, META_KEY, pack_sample, sample_key  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402

SPLITS = ('train', 'val')
SAMPLES_PER_COMMIT = 1000


def scan_split(folder, split):
    """ImageFolder's [(path, label)] and class names for the split, with the checks --data-path gets."""
    layout = argparse.Namespace(data_path=folder, data_set='FOLDER', use_lmdb=False)
    dataset, classes = datasets._image_folder(split == 'train', layout, transform=None)
    return dataset.samples, classes


def map_size(samples):
    """Bytes the LMDB may grow to (the file itself only grows as it is written).

    Large values take whole pages, so twice the image bytes plus two pages per image is ample.
    """
    total = sum(os.path.getsize(path) for path, _ in samples)
    return 2 * total + 2 * 4096 * len(samples) + (64 << 20)


def write_split(env, folder, split, samples):
    for start in range(0, len(samples), SAMPLES_PER_COMMIT):
        with env.begin(write=True) as txn:
            for index in range(start, min(start + SAMPLES_PER_COMMIT, len(samples))):
                path, label = samples[index]
                with open(path, 'rb') as f:
                    value = pack_sample(label, os.path.relpath(path, folder), f.read())
                txn.put(sample_key(split, index), value)


def write_lmdb(folder, output, splits, classes):
    """Write into a temporary folder beside `output`, then rename: an interrupted run leaves no LMDB behind."""
    tmp = f'{output}.tmp.{os.getpid()}'
    try:
        fill_lmdb(tmp, folder, splits, classes)
        os.rename(tmp, output)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def fill_lmdb(path, folder, splits, classes):
    """Every split's samples, then the meta record: an LMDB that has the meta record is complete."""
    all_samples = [s for samples in splits.values() for s in samples]
    with lmdb.open(path, map_size=map_size(all_samples), subdir=True) as env:
        for split, samples in splits.items():
            started = time.time()
            write_split(env, folder, split, samples)
            print(f'| {split}: {len(samples)} images in {time.time() - started:.0f} s', flush=True)
        meta = {'format': FORMAT_VERSION, 'source': os.path.abspath(folder), 'classes': classes,
                'splits': {split: len(samples) for split, samples in splits.items()}}
        with env.begin(write=True) as txn:
            txn.put(META_KEY, json.dumps(meta).encode())
        env.sync(True)


def convert(folder, output):
    output = os.path.normpath(output)
    if not os.path.isdir(folder):
        raise UserError(f'{folder} is not a folder; pass an image folder with train/ and val/ class folders')
    if os.path.exists(output):
        raise UserError(f'{output} exists; choose another name or delete it first')
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise UserError(f'the folder {parent} for {output} does not exist; create it first')
    splits, classes = {}, None
    for split in SPLITS:
        splits[split], classes = scan_split(folder, split)
    write_lmdb(folder, output, splits, classes)
    return {split: len(samples) for split, samples in splits.items()}, classes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', help='an image folder with train/ and val/, one sub-folder per class in each')
    p.add_argument('output', help='the LMDB folder to write (must not exist yet)')
    args = p.parse_args(argv)
    try:
        counts, classes = convert(args.folder, args.output)
    except UserError as e:
        utils.exit_with_error(e)
    print(f'wrote {args.output}: {counts["train"]} train / {counts["val"]} val images, {len(classes)} classes')


if __name__ == '__main__':
    main()
