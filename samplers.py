"""Samplers: repeated augmentation across ranks, exact distributed evaluation, per-sample seeds.

Every training sample carries its own seed, derived from (seed, epoch, position in the epoch's global order).
Its augmentation is then the same whatever the number of ranks or DataLoader workers, and a run resumed in
the middle of an epoch draws exactly the augmentations the uninterrupted run would have drawn.
"""
import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate


def sample_seed(seed, epoch, position):
    """A 63-bit seed hashed from (seed, epoch, position): NumPy's SeedSequence([seed, epoch, position]), first
    64-bit word of its state, shifted right by one.

    Hashed rather than packed: torch's CPU generator keeps only the low 32 bits of a seed, so every bit of the
    three numbers must reach them.
    """
    return int(sample_seeds(seed, epoch, np.array([position]))[0])


# numpy.random.SeedSequence's constants (its pool holds 4 words)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43b0d7e5, 0x931e8875, 0x8b51f9dd, 0x58f38ded
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT, _POOL = 0xca01f9dd, 0x4973f715, 16, 4
_MASK = 0xFFFFFFFF


def sample_seeds(seed, epoch, positions):
    """sample_seed for an array of positions at once: SeedSequence's hash written out on uint32 arrays, so that an
    epoch's 1.28 M seeds take milliseconds, not the 35 s of one SeedSequence each. seed, epoch, positions < 2 ** 32
    (one entropy word each, as SeedSequence splits them)."""
    positions = np.asarray(positions, dtype=np.uint64)
    if seed >= 2 ** 32 or epoch >= 2 ** 32 or (positions.size and positions.max() >= 2 ** 32):
        return np.array([int(np.random.SeedSequence([seed, epoch, int(p)]).generate_state(1, np.uint64)[0] >> 1)
                         for p in positions], dtype=np.int64)
    words = [np.full(positions.shape, seed, np.uint64), np.full(positions.shape, epoch, np.uint64), positions,
             np.zeros(positions.shape, np.uint64)]
    hash_const = [_INIT_A]

    def hashmix(value):
        value = (value ^ hash_const[0]) & _MASK
        hash_const[0] = (hash_const[0] * _MULT_A) & _MASK
        value = (value * hash_const[0]) & _MASK
        return value ^ (value >> _XSHIFT)

    def mix(x, y):
        result = ((_MIX_MULT_L * x) - (_MIX_MULT_R * y)) & _MASK
        return result ^ (result >> _XSHIFT)

    pool = [hashmix(word) for word in words]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    state, hash_const_b = [], _INIT_B
    for i in range(2):  # two uint32 words make the first uint64
        value = (pool[i] ^ hash_const_b) & _MASK
        hash_const_b = (hash_const_b * _MULT_B) & _MASK
        value = (value * hash_const_b) & _MASK
        state.append(value ^ (value >> _XSHIFT))
    return ((state[0] | (state[1] << np.uint64(32))) >> np.uint64(1)).astype(np.int64)


class RASampler(Sampler):
    """Training sampler with DeiT's repeated augmentation, sharded over ranks.

    Each epoch shuffles the dataset with a generator seeded from (seed, epoch), repeats every index `num_repeats` times in a row,
    pads the list by wrapping to a multiple of `num_replicas` and gives rank r every num_replicas-th entry
    starting at r; so the repeats of one image land on different ranks. Each rank yields ceil(N / replicas)
    samples per epoch (DeiT rounds N down to a multiple of 256, which empties epochs of small datasets).
    `num_repeats=1` is a plain shuffled distributed sampler. Yields (index, sample_seed) pairs.
    """

    def __init__(self, num_items, num_replicas=1, rank=0, shuffle=True, num_repeats=3, seed=0):
        if num_items < 1:
            raise ValueError('RASampler needs a non-empty dataset')
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.shuffle, self.num_repeats, self.seed = shuffle, num_repeats, seed
        self.num_samples = math.ceil(num_items / num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """Select the epoch's order; skip the first `start` samples of this rank (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def permutation(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        return (torch.randperm(self.num_items, generator=g) if self.shuffle else torch.arange(self.num_items)).numpy()

    def global_order(self):
        """The epoch's order over all ranks: each index repeated num_repeats times in a row, wrapped around to a
        multiple of num_replicas. Entry p is permutation()[(p mod N x repeats) // repeats]."""
        total = math.ceil(self.num_items * self.num_repeats / self.num_replicas) * self.num_replicas
        return self._at(self.permutation(), np.arange(total, dtype=np.uint64))

    def _at(self, permutation, positions):
        return permutation[(positions.astype(np.int64) % (self.num_items * self.num_repeats)) // self.num_repeats]

    def __iter__(self):
        positions = np.arange(self.rank + self.start * self.num_replicas,
                              self.rank + self.num_samples * self.num_replicas, self.num_replicas, dtype=np.uint64)
        return self._pairs(self.permutation(), positions)

    def _pairs(self, permutation, positions, chunk=4096):
        """(index, seed) pairs, computed a chunk at a time as the loader draws them: an epoch starts at once."""
        for begin in range(0, len(positions), chunk):
            part = positions[begin:begin + chunk]
            yield from zip(self._at(permutation, part).tolist(), sample_seeds(self.seed, self.epoch, part).tolist())

    def __len__(self):
        return self.num_samples - self.start


class EvalSampler(Sampler):
    """Rank r scores indices r, r + R, r + 2R, ...: every image exactly once over all ranks, no padding."""

    def __init__(self, num_items, num_replicas=1, rank=0):
        self.indices = list(range(rank, num_items, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SeededDataset(Dataset):
    """Wraps a dataset so that item (index, seed) is loaded and augmented under its own seed; a plain
    index is loaded as it is.

    Python's, NumPy's and torch's global RNG states are restored afterwards, so loading in the main process
    (num_workers=0) does not disturb the training RNG. Exceptions of the types in `skip` are handled in one of two
    ways. With `refill` (training), the next items of the dataset are tried in turn under the same seed, and the
    sample becomes (image, target, number of items skipped): batches keep their size, which Mixup and DDP need.
    Without it (evaluation), the sample becomes None, which collate_skipping_none drops from its batch.
    """

    def __init__(self, dataset, skip=(), refill=False):
        self.dataset, self.skip, self.refill = dataset, tuple(skip), refill and bool(skip)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        found = first_readable(lambda i: self._load(i, seed), index, len(self.dataset), self.skip, self.refill)
        if found is None:
            return None
        sample, skipped = found
        return (*sample, skipped) if self.refill else sample

    def _load(self, index, seed):
        if seed is None:
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2 ** 32)  # timm's RandAugment picks its ops with NumPy
                torch.manual_seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def first_readable(load, index, size, skip, refill):
    """(load(i), items passed over) for the first i of index, index + 1, ... (wrapping at size) whose load raises
    none of the exception types in `skip`. Without `refill` only `index` is tried, and None stands for it when it
    raises one of them: the rule of both backends for unreadable images."""
    for skipped in range(size if refill else 1):
        try:
            return load((index + skipped) % size), skipped
        except skip:
            continue
    if refill:
        raise skip[0](f'none of the {size} items of the dataset could be read; check the data')
    return None


def collate_skipping_none(batch):
    """default_collate over the samples that are not None; None when none is left."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None
