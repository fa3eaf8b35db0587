"""The DataLoaders of a run: DeiT's choice of training sampler, per-sample seeds, workers that leave the stop signals
to the main process, batches that survive unreadable images, and the uint8 batches' last steps on the device."""
import math

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

import dali_loader
import utils
from datasets import preprocessing
from images import BadImageError
from samplers import EvalSampler, RASampler, SeededDataset, collate_skipping_none


def loader_options(args):
    """Every loader has its own generator: without one, each iterator a DataLoader starts draws its base seed from
    the global torch RNG, and how often that happens depends on the worker count (persistent workers start once)
    and on where a run resumed, which would shift erasing, Mixup and drop path after a resume."""
    options = dict(generator=torch.Generator().manual_seed(args.seed), num_workers=args.num_workers,
                   pin_memory=args.pin_mem and args.device.startswith('cuda'), persistent_workers=args.num_workers > 0, collate_fn=collate_skipping_none,
                   worker_init_fn=utils.ignore_stop_signals)
    if args.num_workers > 0:
        options['prefetch_factor'] = 4
    return options


def skipped_errors(args):
    return (BadImageError,) if args.skip_bad_images else ()


def uses_repeated_aug(args):
    """DeiT's rule: repeated augmentation only under a distributed launch (torchrun, Slurm, submitit; any world
    size), a plain shuffle under `python main.py`."""
    return args.repeated_aug and args.launcher != 'single'


def sampler_description(args):
    if uses_repeated_aug(args):
        return f'repeated augmentation (3 repeats, {args.launcher} launch)'
    why = '--no-repeated-aug' if not args.repeated_aug else 'plain python launch, as in DeiT; torchrun turns on RA'
    return f'random shuffle ({why})'


def build_train_loader(args, dataset_train, batch_size):
    """Batches of args.input_size images; the pil backend takes the dataset's transform as it is."""
    sampler = RASampler(len(dataset_train), utils.get_world_size(), utils.get_rank(), shuffle=True,
                        num_repeats=3 if uses_repeated_aug(args) else 1, seed=args.seed)
    if args.data_backend == 'dali':
        return dali_loader.build_train_loader(args, dataset_train, sampler, batch_size)
    return DataLoader(SeededDataset(dataset_train, skipped_errors(args), refill=True), sampler=sampler,
                      batch_size=batch_size, drop_last=True, **loader_options(args))


def build_val_loader(args, dataset_val):
    world, rank = (utils.get_world_size(), utils.get_rank()) if args.dist_eval else (1, 0)
    sampler, batch_size = EvalSampler(len(dataset_val), world, rank), int(1.5 * args.batch_size)
    if args.data_backend == 'dali':
        return dali_loader.build_val_loader(args, dataset_val, sampler, batch_size)
    return DataLoader(SeededDataset(dataset_val, skipped_errors(args)), sampler=sampler, batch_size=batch_size,
                      drop_last=False, **loader_options(args))


class DevicePrefetcher:
    """The loader's batches on the device, each one's host-to-device copy issued before the previous batch is handed
    over, so that it overlaps that batch's step (timm's PrefetchLoader). On CUDA the copies run on a side stream from
    pinned memory; on the CPU the batches pass as they are. `copies` (CudaCopies) is open for tests."""

    def __init__(self, loader, device, copies=None):
        self.loader = loader
        self.copies = copies if copies is not None else (CudaCopies(device) if device.type == 'cuda' else None)

    def __len__(self):
        return len(self.loader)

    @property
    def sampler(self):
        return getattr(self.loader, 'sampler', None)

    def __iter__(self):
        if self.copies is None:
            yield from self.loader
            return
        pending = None
        for batch in self.loader:
            issued = self.copies.issue(batch)
            if pending is not None:
                yield self.copies.hand_over(pending)
            pending = issued
        if pending is not None:
            yield self.copies.hand_over(pending)


class CudaCopies:
    """Copies on a side stream; the compute stream waits for a batch's copy only when it takes the batch."""

    def __init__(self, device):
        self.device, self.stream = device, torch.cuda.Stream(device)

    def issue(self, batch):
        with torch.cuda.stream(self.stream):
            return _map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))

    def hand_over(self, batch):
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        return _map_tensors(batch, lambda t: (t.record_stream(current), t)[1])


def _map_tensors(batch, fn):
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(x, fn) for x in batch)
    return batch  # None: a batch whose images were all unreadable


class DeviceFinish:
    """The end of the input pipeline, run on the device on whole batches (timm's prefetcher pattern): uint8 images
    from the loader to float, normalised with the run's mean and std (ImageNet's unless the weights say otherwise),
    then (training) random erasing with timm's distribution, drawn for the whole batch at once.

    The workers then ship a quarter of the bytes and skip the float work. Erasing draws from the device's torch RNG
    in the main process, which every checkpoint saves, so a resumed run erases exactly as the uninterrupted one."""

    def __init__(self, device, re_prob=0.0, re_mode='pixel', re_count=1, mean=IMAGENET_DEFAULT_MEAN,
                 std=IMAGENET_DEFAULT_STD):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.erasing = BatchRandomErasing(re_prob, mode=re_mode, max_count=re_count) if re_prob > 0 else None

    def __call__(self, images):
        if images.dtype != torch.uint8:
            raise TypeError(f'DeviceFinish takes the uint8 batches of build_transform(..., uint8=True), '
                            f'not {images.dtype}')
        images = images.float().sub_(self.mean).div_(self.std)
        return self.erasing(images) if self.erasing is not None else images


def device_finish(args, device, is_train):
    """DeiT erases after its timm pipeline, not after 3-Augment."""
    stats = dict(mean=preprocessing(args, 'mean'), std=preprocessing(args, 'std'))
    if not is_train or args.ThreeAugment:
        return DeviceFinish(device, **stats)
    return DeviceFinish(device, args.reprob, args.remode, args.recount, **stats)


class BatchRandomErasing:
    """timm's RandomErasing (probability, 1 to max_count boxes sharing the area, areas uniform in [min_area,
    max_area] of the image / count, log-uniform aspect ratios, the first of 10 tries that fits, pixel / rand /
    const fill) drawn for every image of a batch at once on the device: a few kernels per box instead of a Python
    loop over the images (2-4 ms of CPU per batch of 256)."""

    def __init__(self, probability=0.5, min_area=0.02, max_area=1 / 3, min_aspect=0.3, mode='const', min_count=1,
                 max_count=None, tries=10):
        self.probability, self.min_area, self.max_area, self.tries = probability, min_area, max_area, tries
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.min_count, self.max_count = min_count, max_count or min_count
        if mode not in ('pixel', 'rand', 'const', ''):
            raise ValueError(f'random erasing mode {mode!r}: use pixel, rand or const')
        self.mode = mode or 'const'

    def __call__(self, images):
        batch, channels, height, width = images.shape
        device = images.device
        erased = torch.rand(batch, device=device) < self.probability
        count = torch.randint(self.min_count, self.max_count + 1, (batch,), device=device)
        rows = torch.arange(height, device=device).view(1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, width)
        for box in range(self.max_count):
            h, w, fits = self._box_sides(batch, height, width, count, device)
            top = (torch.rand(batch, device=device) * (height - h + 1)).floor().view(-1, 1, 1)
            left = (torch.rand(batch, device=device) * (width - w + 1)).floor().view(-1, 1, 1)
            h, w = h.view(-1, 1, 1), w.view(-1, 1, 1)
            inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
            mask = inside & (erased & fits & (box < count)).view(-1, 1, 1)
            images = torch.where(mask.unsqueeze(1), self._fill(images, batch, channels), images)
        return images

    def _box_sides(self, batch, height, width, count, device):
        """(h, w, fits) of each image's box: the first of `tries` draws that fits inside the image."""
        area = torch.empty(batch, self.tries, device=device).uniform_(self.min_area, self.max_area)
        area = area * (height * width) / count.view(-1, 1)
        aspect = torch.empty(batch, self.tries, device=device).uniform_(*self.log_aspect).exp()
        h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        ok = (h < height) & (w < width)
        first = ok.int().argmax(dim=1, keepdim=True)
        return h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1), ok.any(dim=1)

    def _fill(self, images, batch, channels):
        if self.mode == 'pixel':
            return torch.randn_like(images)
        if self.mode == 'rand':
            return torch.randn(batch, channels, 1, 1, device=images.device, dtype=images.dtype)
        return torch.zeros((), device=images.device, dtype=images.dtype)
