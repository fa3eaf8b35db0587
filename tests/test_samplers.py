import math
import random
from collections import Counter

import pytest
import numpy as np
import torch
from torchvision import transforms

from samplers import EvalSampler, RASampler, SeededDataset, sample_seed

WORLDS = (1, 2, 3, 4)
SIZES = (1, 7, 100, 255, 257)


def items(n, world=1, rank=0, repeats=3, seed=0, epoch=0, start=0, shuffle=True):
    sampler = RASampler(n, world, rank, shuffle=shuffle, num_repeats=repeats, seed=seed)
    sampler.set_epoch(epoch, start=start)
    out = list(sampler)
    assert len(out) == len(sampler)
    return out


@pytest.mark.parametrize('repeats', [1, 3])
@pytest.mark.parametrize('world', WORLDS)
@pytest.mark.parametrize('n', SIZES)
def test_every_rank_yields_ceil_n_over_world(n, world, repeats):
    for rank in range(world):
        out = items(n, world, rank, repeats)
        assert len(out) == math.ceil(n / world) > 0
        assert all(0 <= index < n for index, _ in out)


def test_small_dataset_is_never_empty():
    assert items(1, world=4, rank=3) != []
    assert len(items(10, world=8, rank=7)) == 2


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError):
        RASampler(0)


@pytest.mark.parametrize('n', [3, 7, 100, 257])
def test_repeats_of_an_image_land_on_different_ranks(n):
    per_rank = [[index for index, _ in items(n, 3, rank, repeats=3, epoch=2)] for rank in range(3)]
    for indices in per_rank:
        assert len(set(indices)) == len(indices)
    assert set(per_rank[0]) == set(per_rank[1]) == set(per_rank[2])
    assert len(set(per_rank[0])) == math.ceil(n / 3)


def test_repeats_one_covers_the_dataset_once_per_epoch():
    indices = [index for rank in range(4) for index, _ in items(100, 4, rank, repeats=1)]
    assert sorted(indices) == list(range(100))


def test_without_shuffle_order_is_sequential():
    assert [index for index, _ in items(5, repeats=2, shuffle=False)] == [0, 0, 1, 1, 2]


def test_epoch_and_seed_select_the_order():
    base = items(100, epoch=1, seed=5)
    assert items(100, epoch=1, seed=5) == base
    assert [i for i, _ in items(100, epoch=2, seed=5)] != [i for i, _ in base]
    assert [i for i, _ in items(100, epoch=1, seed=6)] != [i for i, _ in items(100, epoch=1, seed=4)]
    assert [s for _, s in items(100, epoch=1, seed=6)] != [s for _, s in base]


def test_set_epoch_start_skips_the_head():
    sampler = RASampler(100, 2, 1, num_repeats=3, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    for start in (0, 1, 17, 49, 50):
        sampler.set_epoch(4, start=start)
        assert list(sampler) == full[start:]
        assert len(sampler) == len(full) - start
    sampler.set_epoch(4)
    assert list(sampler) == full


@pytest.mark.parametrize('repeats', [1, 3])
def test_sample_seeds_distinct_within_an_epoch(repeats):
    seeds = [s for rank in range(3) for _, s in items(257, 3, rank, repeats, epoch=7)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2 ** 63 for s in seeds)


@pytest.mark.parametrize('repeats', [1, 3])
@pytest.mark.parametrize('n', [2, 100, 256])
def test_seeds_follow_global_position_not_world_size(n, repeats):
    single = items(n, 1, 0, repeats, seed=11, epoch=3)
    for world in (2, 4):
        if n % world:
            continue
        sharded = [pair for rank in range(world) for pair in items(n, world, rank, repeats, seed=11, epoch=3)]
        assert Counter(sharded) == Counter(single)
    rank1 = items(n, 2, 1, repeats, seed=11, epoch=3)
    assert rank1 == [single[p] for p in range(1, n, 2)]


def test_seeds_differ_between_epochs():
    a = {s for _, s in items(50, epoch=0)}
    b = {s for _, s in items(50, epoch=1)}
    assert not a & b


def torch_draw(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.rand(4)


@pytest.mark.parametrize('changed', [(1, 0, 5), (0, 1, 5), (0, 0, 6), (2 ** 20, 0, 5), (0, 2 ** 20, 5)])
def test_every_part_of_the_sample_seed_changes_torch_draws(changed):
    """torch keeps only 32 bits of a seed: run seed, epoch and position must all reach them."""
    assert not torch.equal(torch_draw(sample_seed(0, 0, 5)), torch_draw(sample_seed(*changed)))


@pytest.mark.parametrize('world', [1, 2, 3, 4, 5])
@pytest.mark.parametrize('n', range(21))
def test_eval_sampler_covers_each_index_once(n, world):
    shares = [list(EvalSampler(n, world, rank)) for rank in range(world)]
    assert [len(EvalSampler(n, world, rank)) for rank in range(world)] == [len(s) for s in shares]
    assert sorted(i for share in shares for i in share) == list(range(n))


class Images(torch.utils.data.Dataset):
    def __init__(self, n=4, size=16):
        self.images = [transforms.functional.to_pil_image(torch.rand(3, size, size, generator=torch.Generator().manual_seed(i)))
                       for i in range(n)]
        self.transform = transforms.Compose([transforms.RandomCrop(8), transforms.ToTensor()])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), (random.random(), float(np.random.rand()))


def test_seeded_dataset_is_reproducible_per_seed():
    ds = SeededDataset(Images())
    assert len(ds) == 4
    a, ra = ds[(1, 12345)]
    b, rb = ds[(1, 12345)]
    assert torch.equal(a, b) and ra == rb
    others = [ds[(1, seed)][0] for seed in range(1, 9)]
    assert any(not torch.equal(a, o) for o in others)
    assert ds[(1, 2 ** 63 - 1)][0].shape == (3, 8, 8)


def test_seeded_dataset_seeds_numpy_too():
    """timm's RandAugment picks its ops with np.random: a sample's NumPy draws must follow its seed, whatever the
    worker's NumPy state."""
    ds = SeededDataset(Images())
    np.random.seed(1)
    first = ds[(1, 12345)][1]
    np.random.seed(2)
    assert ds[(1, 12345)][1] == first
    assert ds[(1, 54321)][1][1] != first[1]


def test_seeded_dataset_keeps_global_rng_state():
    ds = SeededDataset(Images())
    random.seed(7)
    torch.manual_seed(7)
    np.random.seed(7)
    py_state, torch_state, np_draw = random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy()
    ds[(0, 99)]
    ds[(2, 3)]
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_draw)


def test_vectorised_seeds_are_seed_sequence_seeds():
    import numpy as np
    from samplers import sample_seeds
    rng = np.random.default_rng(0)
    for seed, epoch in [(0, 0), (1, 5), (2 ** 31 - 1, 299), (12345, 2 ** 32 - 1)]:
        positions = np.concatenate([rng.integers(0, 2 ** 32, 40, dtype=np.uint64),
                                    np.array([0, 1, 2 ** 32 - 1], dtype=np.uint64)])
        expected = [int(np.random.SeedSequence([seed, epoch, int(p)]).generate_state(1, np.uint64)[0] >> 1)
                    for p in positions]
        assert sample_seeds(seed, epoch, positions).tolist() == expected
    assert sample_seed(3, 2, 2 ** 40) == int(np.random.SeedSequence([3, 2, 2 ** 40]).generate_state(1, np.uint64)[0]
                                             >> 1)  # past 32 bits: SeedSequence itself


def test_an_epoch_starts_without_hashing_every_seed(monkeypatch):
    import samplers
    hashed = []
    real = samplers.sample_seeds
    monkeypatch.setattr(samplers, 'sample_seeds', lambda s, e, p: hashed.append(len(p)) or real(s, e, p))
    sampler = RASampler(100_000, 2, 1, num_repeats=3, seed=4)
    sampler.set_epoch(7, start=10)
    pairs = iter(sampler)
    first = next(pairs)
    assert hashed == [4096]  # one chunk, not the epoch's 50,000
    rest = [first] + list(pairs)
    assert len(rest) == len(sampler) == 50_000 - 10
    assert rest[:3] == [(index, sample_seed(4, 7, 2 * (10 + k) + 1)) for k, index in
                        enumerate(sampler.global_order()[[2 * (10 + k) + 1 for k in range(3)]].tolist())]
