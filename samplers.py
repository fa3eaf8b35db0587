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
    """A 63-bit seed hashed from (seed, epoch, position).

    Hashed rather than packed: torch's CPU generator keeps only the low 32 bits of a seed, so every bit of the
    three numbers must reach them.
    """
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


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

    def global_order(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g) if self.shuffle else torch.arange(self.num_items)
        order = order.repeat_interleave(self.num_repeats)
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        if total > len(order):  # wrap around, as many times as a tiny dataset needs
            order = order.repeat(math.ceil(total / len(order)))[:total]
        return order.tolist()

    def __iter__(self):
        order = self.global_order()
        positions = range(self.rank, len(order), self.num_replicas)
        positions = list(positions)[:self.num_samples][self.start:]
        return iter([(order[p], sample_seed(self.seed, self.epoch, p)) for p in positions])

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
        tries = len(self.dataset) if self.refill else 1
        for skipped in range(tries):
            try:
                sample = self._load((index + skipped) % len(self.dataset), seed)
            except self.skip:
                if not self.refill:
                    return None
                continue
            return (*sample, skipped) if self.refill else sample
        raise self.skip[0](f'none of the {tries} items of the dataset could be read; check the data')

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


def collate_skipping_none(batch):
    """default_collate over the samples that are not None; None when none is left."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None
