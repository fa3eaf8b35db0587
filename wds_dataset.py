"""--data-set WDS: WebDataset tar shards (timm's published layout) read as a map-style data set.

Layout. --data-path holds each split's shards (`train-000000.tar`, or timm's `imagenet1k-train-0000.tar`), every
sample a group of tar members that share a key (`KEY.jpg`, `.jpeg`, `.png` or `.webp`; `KEY.cls`, the class index
in ASCII; `KEY.json`), and `_info.json` with each split's shard names and sample counts. A shard's `.idx` (NVIDIA
DALI's webdataset index: each member's offset and size; `scripts/prepare_data.py --index DIR` makes them once)
lets any sample be read with one seek. So sample i of a split is always the same sample, and everything the folder
data sets have holds unchanged: the samplers and repeated augmentation, per-sample seeds, exact mid-epoch resume,
exact evaluation and the DALI backend. Nothing lists the samples at start-up: the counts come from _info.json, and
a shard's index is read when that shard is first touched.
"""
import bisect
import json
import os
from collections import OrderedDict

import numpy as np
import torch

import shards
from images import BadImageError, load_rgb
from utils import UserError

IMAGE_EXTENSIONS = shards.IMAGE_EXTS
CLASSES_FILE = 'classes.json'
OPEN_SHARDS = 64


def class_names(root, num_classes):
    """The classes in index order: ROOT/classes.json (scripts/prepare_data.py --shards writes it), else
    --num-classes names them '0', '1', ...; shards carry labels only, and reading every label would list them."""
    path = os.path.join(root, CLASSES_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            names = json.load(f)
        if not isinstance(names, list) or not names:
            raise UserError(f'{path} is not a JSON list of class names; rewrite it or remove it and pass '
                            '--num-classes')
        if num_classes is not None and num_classes != len(names):
            raise UserError(f'--num-classes {num_classes}, but {path} lists {len(names)} classes; drop the flag or '
                            'fix the file')
        return [str(name) for name in names]
    if num_classes is None:
        raise UserError(f'{root} has no {CLASSES_FILE}: pass --num-classes N (1000 for ImageNet-1k), or write the '
                        'class names there as a JSON list')
    return [str(k) for k in range(num_classes)]


class ShardDataset(torch.utils.data.Dataset):
    """One split of a shard set: (transformed image, label) samples. `loader(name, data)` turns a member's bytes
    into an image (main.py swaps it per stage, as for image folders)."""

    def __init__(self, root, split, classes, transform=None, label_key='cls', index_dir=None):
        info = shards.load_split_info(root, split, cache_dir=index_dir)
        self.root, self.split, self.classes, self.transform = root, split, classes, transform
        self.label_key, self.index_dir, self.loader = label_key, index_dir, load_rgb
        self.filenames, self.lengths = list(info.filenames), list(info.shard_lengths)
        self.starts = [0]
        for length in self.lengths:
            self.starts.append(self.starts[-1] + length)
        self.skipped = []
        self._indexes, self._fds, self._pid = {}, OrderedDict(), None

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, index):
        data, label, name = self.encoded(index)
        img = self.loader(name, data)
        return (self.transform(img) if self.transform else img), label

    def encoded(self, index):
        """(the image member's bytes, label, a name for messages) of sample `index`."""
        shard, position = self.locate(index)
        members = self.index(shard)
        image, (offset, size) = members.image(position)
        name = f'{self.shard_path(shard)}:{members.key(position)}'
        if image is None:
            raise BadImageError(f'unreadable image {name} (the sample has no image member); '
                                'rewrite the shard, or pass --skip-bad-images')
        return self.read(shard, offset, size), self.label(shard, members, position, name), f'{name}.{image}'

    def locate(self, index):
        """(shard, position in it) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} {self.split} samples')
        shard = bisect.bisect_right(self.starts, index) - 1
        position = index - self.starts[shard]
        if position >= len(self.index(shard)):
            raise UserError(f'{self.shard_path(shard)} holds {len(self.index(shard))} samples, but _info.json in '
                            f'{self.root} counts {self.lengths[shard]}; rewrite it with scripts/prepare_data.py '
                            '--index')
        return shard, position

    def label(self, shard, members, position, name):
        offset, size = members.label(position)
        if offset < 0:
            raise BadImageError(f'unreadable image {name} (no .{self.label_key} label member); rewrite the shard, '
                                'choose the label member with --wds-label-key, or pass --skip-bad-images')
        text = self.read(shard, offset, size)
        try:
            label = int(text.decode('ascii').strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
        if not 0 <= label < len(self.classes):
            raise BadImageError(f'unreadable image {name} (label {text[:20]!r} is not a class index below '
                                f'{len(self.classes)}); rewrite the shard, or pass --skip-bad-images')
        return label

    def shard_path(self, shard):
        return os.path.join(self.root, self.filenames[shard])

    def index(self, shard):
        """The shard's sample index, read once per process."""
        if shard not in self._indexes:
            path = shards.index_path(self.root, self.filenames[shard], self.index_dir)
            if not os.path.isfile(path):
                raise UserError(f'{self.shard_path(shard)} has no index {path}; make the indexes once with '
                                f'python scripts/prepare_data.py --index {self.root}'
                                + (f' --cache-dir {self.index_dir}' if self.index_dir else ''))
            self._indexes[shard] = ShardMembers(path, shards.read_index(path), self.label_key)
        return self._indexes[shard]

    def read(self, shard, offset, size):
        """A member's bytes, by pread: no file position is shared between threads or with a forked parent."""
        data = os.pread(self.fd(shard), size, offset)
        if len(data) != size:
            raise BadImageError(f'unreadable image {self.shard_path(shard)} (truncated: {len(data)} of {size} bytes '
                                f'at offset {offset}); download the shard again')
        return data

    def fd(self, shard):
        """The shard's open descriptor; at most OPEN_SHARDS per process, the least recently used closed first
        (random access touches every shard, and a process may hold only so many files)."""
        if self._pid != os.getpid():  # a DataLoader worker: its own descriptors
            self._fds, self._pid = OrderedDict(), os.getpid()
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        if len(self._fds) >= OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        try:
            self._fds[shard] = os.open(self.shard_path(shard), os.O_RDONLY)
        except OSError as e:
            raise UserError(f'cannot read shard {self.shard_path(shard)} ({e.strerror}); check --data-path and '
                            '_info.json') from e
        return self._fds[shard]

    def __getstate__(self):  # descriptors stay in the process that opened them
        return dict(self.__dict__, _fds=OrderedDict(), _pid=None)


class ShardMembers:
    """Where each sample's image and label lie in one shard, and its key, as arrays: a million samples' index would
    take gigabytes as Python objects in every worker."""

    def __init__(self, path, entries, label_key):
        self.path, self.count = path, len(entries)
        self.keys = np.array([entry.key.encode() for entry in entries], dtype=bytes)
        self.image_ext = np.full(self.count, -1, dtype=np.int8)
        self.where = np.full((self.count, 4), -1, dtype=np.int64)  # image offset, size, label offset, size
        for i, entry in enumerate(entries):
            found = next((k for k, ext in enumerate(IMAGE_EXTENSIONS) if ext in entry.members), -1)
            if found >= 0:
                self.image_ext[i] = found
                self.where[i, :2] = entry.members[IMAGE_EXTENSIONS[found]]
            if label_key in entry.members:
                self.where[i, 2:] = entry.members[label_key]

    def __len__(self):
        return self.count

    def image(self, position):
        found = int(self.image_ext[position])
        return (IMAGE_EXTENSIONS[found] if found >= 0 else None), tuple(int(v) for v in self.where[position, :2])

    def label(self, position):
        return tuple(int(v) for v in self.where[position, 2:])

    def key(self, position):
        return self.keys[position].decode()
