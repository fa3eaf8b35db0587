"""LMDBDataset: an image folder's train / val splits read from one LMDB written by scripts/folder2lmdb.py.

Layout. Key b'__meta__' holds JSON {'format', 'source', 'classes', 'splits': {split: image count}}. Key
b'<split>/<index, 9 digits>' holds one sample: a header (label, name length), the image's path relative to the
source folder, then the image file's bytes exactly as they were on disk. Indices follow torchvision's ImageFolder
order, so sample i of a split is the same image, decoded the same way, whether read from the folder or the LMDB.
"""
import json
import os
import struct

import lmdb
import torch

from images import load_rgb
from utils import UserError

FORMAT_VERSION = 1
META_KEY = b'__meta__'
HEADER = struct.Struct('<IH')  # label, byte length of the relative path that follows


def sample_key(split, index):
    return f'{split}/{index:09d}'.encode()


def pack_sample(label, name, image_bytes):
    encoded = name.encode()
    return HEADER.pack(label, len(encoded)) + encoded + image_bytes


def unpack_sample(value):
    """(label, relative path, image bytes) of a stored sample."""
    label, name_length = HEADER.unpack_from(value)
    start = HEADER.size + name_length
    return label, bytes(value[HEADER.size:start]).decode(), bytes(value[start:])


_open_envs = {}  # real path -> (id of the process that opened it, its read-only environment)


def shared_env(path):
    """This process's read-only environment for the LMDB at `path`, shared by all its datasets.

    LMDB allows one environment per file per process, and an environment must not cross a fork: one inherited
    from the parent process (DataLoader workers) is closed and opened anew. Closing releases only this process's
    copy of the mapping; read-only and lock-free, it shares nothing else with the parent's.
    """
    key = os.path.realpath(path)
    pid, env = _open_envs.get(key, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        _open_envs[key] = (os.getpid(), env)
    return env


def read_meta(path):
    fix = f'write one with scripts/folder2lmdb.py IMAGE_FOLDER {path}, or drop --use-lmdb'
    if not path or not os.path.isdir(path):
        raise UserError(f'--data-path {path!r} is not an LMDB folder; {fix}')
    try:
        env = shared_env(path)
    except lmdb.Error as e:
        raise UserError(f'{path} is not a readable LMDB ({str(e).strip()[:80]}); {fix}') from e
    with env.begin() as txn:
        raw = txn.get(META_KEY)
    if raw is None:
        raise UserError(f'{path} is an LMDB without folder2lmdb\'s {META_KEY.decode()} record; {fix}')
    meta = json.loads(raw)
    if meta.get('format') != FORMAT_VERSION:
        raise UserError(f'{path} has LMDB format {meta.get("format")}, this code reads {FORMAT_VERSION}; '
                        'rebuild it with this version\'s scripts/folder2lmdb.py')
    return meta


class LMDBDataset(torch.utils.data.Dataset):
    """One split of an LMDB image folder: (transformed image, label) samples and the folder's class names.

    Each process (each DataLoader worker) opens the LMDB on its first read, read-only and without locks.
    """

    def __init__(self, path, split, transform=None):
        meta = read_meta(path)
        if split not in meta['splits']:
            raise UserError(f'{path} holds the splits {sorted(meta["splits"])}, not {split}; '
                            'rebuild it from a folder with train/ and val/')
        self.path, self.split, self.transform = path, split, transform
        self.classes, self.source, self.length = meta['classes'], meta['source'], meta['splits'][split]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f'index {index} out of range for {self.length} {self.split} images')
        with shared_env(self.path).begin() as txn:
            value = txn.get(sample_key(self.split, index))
        if value is None:
            raise UserError(f'{self.path} lacks {self.split} image {index}; rebuild it with scripts/folder2lmdb.py')
        label, name, image_bytes = unpack_sample(value)
        img = load_rgb(os.path.join(self.source, name), image_bytes)
        return (self.transform(img) if self.transform else img), label
