"""The DataLoaders of a run: DeiT's choice of training sampler, per-sample seeds, workers that leave the stop signals
to the main process, batches that survive unreadable images, and the uint8 batches' last steps on the device."""
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
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


class DeviceFinish:
    """The end of the input pipeline, run on the device on whole batches (timm's prefetcher pattern): uint8 images
    from the loader to float, normalised with the run's mean and std (ImageNet's unless the weights say otherwise),
    then (training) timm's random erasing.

    The workers then ship a quarter of the bytes and skip the float work. Erasing draws from the main process's
    RNG, which every checkpoint saves, so a resumed run erases exactly as the uninterrupted one."""

    def __init__(self, device, re_prob=0.0, re_mode='pixel', re_count=1, mean=IMAGENET_DEFAULT_MEAN,
                 std=IMAGENET_DEFAULT_STD):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.erasing = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=device) if re_prob > 0 \
            else None

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
