"""Pack an image folder's train/ and val/ splits into one LMDB that --use-lmdb reads.

    python scripts/folder2lmdb.py /data/imagenet /data/imagenet_lmdb
    python main.py --data-set IMNET --data-path /data/imagenet_lmdb --use-lmdb ...

Images are stored as the encoded bytes found on disk, in ImageFolder's order, with their labels, their file
names and the class names: training reads the same samples from the LMDB as from the folder. The folder gets the
same checks as --data-path (matching class folders in both splits, at least one image per class).

The LMDB is written into a temporary folder beside OUTPUT, read back record by record and compared with what was
written, and only then renamed to OUTPUT: a failed, interrupted or mismatching run leaves nothing behind, and says so
in one line.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:  # importing torch takes seconds: a Ctrl-C meanwhile gets one line too
    import lmdb  # noqa: E402

    import datasets  # noqa: E402
    from lmdb_dataset import FORMAT_VERSION, META_KEY, pack_sample, sample_key  # noqa: E402
    import utils  # noqa: E402
    from utils import UserError  # noqa: E402
except KeyboardInterrupt:
    print('interrupted before anything was read or written', file=sys.stderr)
    sys.exit(130)

SPLITS = ('train', 'val')
SAMPLES_PER_COMMIT = 1000
DIGEST_SIZE = 16
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


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


def digest(value):
    return hashlib.blake2b(value, digest_size=DIGEST_SIZE).digest()


def read_source(path):
    if not os.path.isfile(path):  # opening a named pipe would block
        raise UserError(f'{path} is not a regular file; remove it and run again')
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise UserError(f'cannot read {path} ({e.strerror}); fix or remove it and run again') from e


def write_split(env, folder, split, samples):
    """Write one split's samples; returns their digests, one after the other, to compare with what is read back."""
    digests = bytearray()
    for start in range(0, len(samples), SAMPLES_PER_COMMIT):
        with env.begin(write=True) as txn:
            for index in range(start, min(start + SAMPLES_PER_COMMIT, len(samples))):
                path, label = samples[index]
                value = pack_sample(label, os.path.relpath(path, folder), read_source(path))
                txn.put(sample_key(split, index), value)
                digests += digest(value)
    return digests


def write_lmdb(folder, output, splits, classes):
    """Write into a temporary folder beside `output`, check it, then rename: a failed run leaves no LMDB behind."""
    tmp = f'{output}.tmp.{os.getpid()}'
    try:
        difference = first_difference(tmp, *fill_lmdb(tmp, folder, splits, classes))
        if difference:
            raise UserError(f'{difference} of {output}, read back, is not what was written (a disk or memory '
                            'fault?); nothing was kept: check the disk, then run again')
        os.rename(tmp, output)
    except (OSError, lmdb.Error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else ' '.join(str(e).split())[:120]
        raise UserError(f'could not write {output} ({type(e).__name__}: {reason}); nothing was kept: free space or '
                        'choose another place, then run again') from e
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def fill_lmdb(path, folder, splits, classes):
    """Every split's samples, then the meta record: an LMDB that has the meta record is complete.
    Returns ({split: digests of its records}, the meta record)."""
    all_samples = [s for samples in splits.values() for s in samples]
    digests = {}
    with lmdb.open(path, map_size=map_size(all_samples), subdir=True) as env:
        for split, samples in splits.items():
            started = time.time()
            digests[split] = write_split(env, folder, split, samples)
            print(f'| {split}: {len(samples)} images in {time.time() - started:.0f} s', flush=True)
        meta = json.dumps({'format': FORMAT_VERSION, 'source': os.path.abspath(folder), 'classes': classes,
                           'splits': {split: len(samples) for split, samples in splits.items()}}).encode()
        with env.begin(write=True) as txn:
            txn.put(META_KEY, meta)
        env.sync(True)
    return digests, meta


def first_difference(path, digests, meta):
    """Read the closed LMDB back: None when it holds exactly the records written, else what differs."""
    count = 0
    with lmdb.open(path, readonly=True, lock=False, subdir=True) as env, env.begin() as txn:
        if txn.get(META_KEY) != meta:
            return f'record {META_KEY.decode()}'
        for split, split_digests in digests.items():
            for index in range(len(split_digests) // DIGEST_SIZE):
                value = txn.get(sample_key(split, index))
                if value is None or digest(value) != split_digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]:
                    return f'record {sample_key(split, index).decode()}'
                count += 1
        if txn.stat()['entries'] != count + 1:
            return f'the number of records ({txn.stat()["entries"]}, not {count + 1})'
    print(f'| read back and checked {count} images', flush=True)
    return None


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
    except KeyboardInterrupt:
        print(f'interrupted: nothing was kept of {args.output}; run the same command again', file=sys.stderr,
              flush=True)
        sys.exit(INTERRUPTED)
    print(f'wrote {args.output}: {counts["train"]} train / {counts["val"]} val images, {len(classes)} classes')


if __name__ == '__main__':
    main()
