"""The DataLoaders of a run: DeiT's choice of training sampler, per-sample seeds, workers that leave the stop signals
to the main process, and batches that survive unreadable images."""
import torch
from torch.utils.data import DataLoader

import utils
from images import BadImageError
from samplers import EvalSampler, RASampler, SeededDataset, collate_skipping_none


def loader_options(args):
    options = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith('cuda'),
                   persistent_workers=args.num_workers > 0, collate_fn=collate_skipping_none,
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
    sampler = RASampler(len(dataset_train), utils.get_world_size(), utils.get_rank(), shuffle=True,
                        num_repeats=3 if uses_repeated_aug(args) else 1, seed=args.seed)
    return DataLoader(SeededDataset(dataset_train, skipped_errors(args), refill=True), sampler=sampler,
                      batch_size=batch_size, drop_last=True, generator=torch.Generator().manual_seed(args.seed),
                      **loader_options(args))


def build_val_loader(args, dataset_val):
    world, rank = (utils.get_world_size(), utils.get_rank()) if args.dist_eval else (1, 0)
    return DataLoader(SeededDataset(dataset_val, skipped_errors(args)),
                      sampler=EvalSampler(len(dataset_val), world, rank),
                      batch_size=int(1.5 * args.batch_size), drop_last=False, **loader_options(args))
