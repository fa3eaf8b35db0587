"""Train and evaluate DeiT-style vision transformers: flags -> build everything -> epoch loop."""
import argparse
import math
import os
import re
import sys

import torch
from torch.utils.data import DataLoader

from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import engine
import localvit
import model_factory
import schedules
import utils
import visualize

from checkpoints import BEST_CHECKPOINT, CHECKPOINT, CheckpointWriter, check_output_dir, find_resume, resume
from datasets import DATASET_ALIASES, DATASETS, BadImageError, build_dataset, build_transform, resolve_data_set
from flag_ranges import check_flag_ranges
from samplers import EvalSampler, RASampler, SeededDataset, collate_skipping_none
from utils import UserError


def get_args_parser():
    p = argparse.ArgumentParser('DeiT-style training and evaluation', add_help=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('training')
    g.add_argument('--batch-size', default=64, type=int, help='images per process per step')
    g.add_argument('--epochs', default=300, type=int)
    g.add_argument('--accum-iter', default=1, type=int, help='micro-batches accumulated per optimizer update')
    g.add_argument('--bce-loss', action='store_true', help='binary cross-entropy instead of softmax CE')
    g.add_argument('--unscale-lr', action='store_true', help='do not scale --lr by global batch / 512')
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'],
                   help='autocast precision; auto = bf16 on CUDA, none on CPU')
    g.add_argument('--compile', action='store_true', help='torch.compile the training model')
    g.add_argument('--cosub', action='store_true',
                   help="DeiT's Cosub: co-train two stochastic-depth submodels of the model on each batch (BCE)")
    g.add_argument('--skip-nonfinite', default=0, type=int, metavar='N',
                   help='skip up to N steps whose loss is NaN / inf before stopping (default: stop at the first)')
    g.add_argument('--inject-nonfinite', default=-1, type=int, metavar='STEP',
                   help='fault injection for testing the guard: make the loss NaN at this global update')

    g = p.add_argument_group('training on a budget, multi-size training (the 24-hour paper)')
    g.add_argument('--time-budget', type=float, default=None, metavar='HOURS',
                   help='end the run at this wall-clock budget, final evaluation and checkpoint included; the LR '
                        'and size schedules follow the elapsed fraction of it (--epochs then only sets proportions)')
    g.add_argument('--no-warmup', action='store_true', help='same as --warmup-epochs 0')
    g.add_argument('--is-multisize', action='store_true',
                   help='train at --init-size, growing by 16 x --patch-step px every --epoch-step epochs')
    g.add_argument('--init-size', type=int, default=32, help='first size of --is-multisize')
    g.add_argument('--epoch-step', type=int, default=7, help='epochs per size of --is-multisize (the paper\'s recipe: 5)')
    g.add_argument('--patch-step', type=int, default=1, help='growth of --is-multisize, in 16 px steps (the paper\'s recipe: 2)')
    g.add_argument('--size-schedule', default='', metavar='START:SIZE,...',
                   help="training sizes by epoch ('0:32,5:64') or by fraction of the run ('0:32,0.5:64')")
    g.add_argument('--eval-on-final-size', action='store_true',
                   help='multi-size: evaluate at --input-size (default: at the current training size)')
    g.add_argument('--multisize-batch', action='store_true',
                   help='multi-size: scale the batch with (input-size / size)^2, the same pixels per batch')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='NAME',
                   help='any timm model name, or one of ours from models.py')
    g.add_argument('--input-size', default=224, type=int, help='image side in pixels')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    g.add_argument('--drop-path', type=float, default=0.1, metavar='PCT', help='stochastic depth rate')
    g.add_argument('--layer-scale', type=float, default=None, metavar='INIT',
                   help='LayerScale with this initial value (e.g. 1e-5), for ViT-family models')
    g.add_argument('--constant-drop-path', action='store_true',
                   help='the same --drop-path rate in every block (DeiT III) instead of a linear increase')
    g.add_argument('--patch-embed', default='patch', choices=['patch', 'hmlp'],
                   help="ViT patch embedding: timm's linear patchify, or 3Things' hierarchical-MLP stem")
    g.add_argument('--localvit', action='store_true',
                   help="the 24-hour paper's improved LocalViT: a DeiT / ViT with a depth-wise conv in each FFN")
    g.add_argument('--localvit-act', default=None, choices=localvit.LOCALVIT_ACTS,
                   help='activation (+ channel attention) of the local FFN; default: hs with --localvit, '
                        'hs+se for localvit_* models')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (default on)')
    g.add_argument('--no-model-ema', action='store_false', dest='model_ema')
    p.set_defaults(model_ema=True)
    g.add_argument('--model-ema-decay', type=float, default=0.99996)
    g.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA weights on the CPU')

    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='any timm optimizer name')
    g.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='max gradient norm')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=0.05, help='not applied to norms, biases, '
                   'position embeddings and tokens')

    g = p.add_argument_group('learning-rate schedule (stepped every update)')
    g.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER',
                   help='timm scheduler: cosine, tanh, step, multistep, poly')
    g.add_argument('--lr', type=float, default=5e-4, help='for a global batch of 512 (see --unscale-lr)')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                   help='epoch fractions where LR noise starts / ends')
    g.add_argument('--lr-noise-pct', type=float, default=0.67)
    g.add_argument('--lr-noise-std', type=float, default=1.0)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-5)
    g.add_argument('--decay-epochs', type=float, default=30, help='step schedule period')
    g.add_argument('--warmup-epochs', type=int, default=5, help='0 for no warm-up')
    g.add_argument('--cooldown-epochs', type=int, default=10,
                   help='epochs at --min-lr after the cosine; trained only with --train-cooldown (DeiT stops '
                        'at --epochs, so the cosine spans the whole run)')
    g.add_argument('--train-cooldown', action='store_true',
                   help="also train the --cooldown-epochs at --min-lr after --epochs, as timm's train.py does")
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1)

    g = p.add_argument_group('augmentation')
    g.add_argument('--color-jitter', type=float, default=0.3, metavar='PCT')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                   help='timm auto-augment policy, or "none"')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', type=str, default='bicubic',
                   help='random, bilinear or bicubic')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--repeated-aug', action='store_true', help='repeated augmentation (default on)')
    g.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    p.set_defaults(repeated_aug=True)
    g.add_argument('--ThreeAugment', action='store_true', help="DeiT III's 3-Augment")
    g.add_argument('--src', action='store_true', help='simple random crop (with --ThreeAugment)')
    g.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erase probability')
    g.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    g.add_argument('--recount', type=int, default=1, help='random erase count')

    g = p.add_argument_group('mixup / cutmix')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha; 0 disables')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha; 0 disables')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix ratio bounds')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'])

    g = p.add_argument_group('token reorganisation (EViT models)')
    g.add_argument('--base_keep_rate', type=float, default=None,
                   help="fraction of patch tokens kept at each keep layer; unset: the model's own (0.7)")
    g.add_argument('--fuse_token', action='store_true', help='fuse the dropped tokens into one extra token')
    g.add_argument('--drop_loc', default=None, type=str, help="keep layers, e.g. '(3, 6, 9)'; unset: the model's own")
    g.add_argument('--shrink_start_epoch', default=10, type=int, help='keep every token until this epoch')
    g.add_argument('--shrink_epochs', default=100, type=int,
                   help='epochs of cosine decay of the keep rate from 1 to --base_keep_rate (0: at once)')
    g.add_argument('--test_speed', action='store_true', help='print inference img/s (batch 64) before training')
    g.add_argument('--only_test_speed', action='store_true', help='print inference img/s and exit')

    g.add_argument('--visualize_mask', action='store_true',
                   help='EViT: after evaluation, write pictures of the kept / fused patches to output_dir/masks')
    g.add_argument('--n_visualization', default=128, type=int, help='how many validation images to draw')

    g = p.add_argument_group('distillation (DeiT)')
    g.add_argument('--teacher-model', default='regnety_160', type=str, metavar='NAME',
                   help='timm name of the teacher')
    g.add_argument('--teacher-path', type=str, default='', help='teacher weights: file, URL or .safetensors')
    g.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'])
    g.add_argument('--distillation-alpha', default=0.5, type=float, help='weight of the distillation term')
    g.add_argument('--distillation-tau', default=1.0, type=float, help='temperature of soft distillation')

    g = p.add_argument_group('fine-tuning')
    g.add_argument('--finetune', default='', help='checkpoint to start from; head and position embedding '
                   'are adapted to this run')
    g.add_argument('--attn-only', action='store_true',
                   help="3Things: train only the attention weights, position embedding and classifier")
    g.add_argument('--train-mode', action='store_true', help='train in train mode (default)')
    g.add_argument('--no-train-mode', action='store_false', dest='train_mode',
                   help='train in eval mode: no dropout or drop path, BatchNorm statistics frozen (DeiT)')
    p.set_defaults(train_mode=True)

    g = p.add_argument_group('data')
    g.add_argument('--data-path', default=None, type=str, help='dataset root')
    g.add_argument('--data-set', default=None, choices=DATASETS + tuple(DATASET_ALIASES),
                   help='default: IMNET with --data-path, else the embedded DIGITS; DeiT\'s CIFAR is CIFAR100, '
                        'INAT is INAT18')
    g.add_argument('--train-list', default='', metavar='FILE',
                   help='LIST data set: lines of "image path relative to --data-path, label"')
    g.add_argument('--val-list', default='', metavar='FILE', help='LIST data set: the validation list')
    g.add_argument('--inat-category', default='name',
                   choices=['kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'])
    g.add_argument('--download', action='store_true', help='let CIFAR10/100 download when missing')
    g.add_argument('--use-lmdb', action='store_true',
                   help='IMNET / FOLDER: --data-path is an LMDB written by scripts/folder2lmdb.py')
    g.add_argument('--skip-bad-images', action='store_true',
                   help='skip unreadable image files (counted in the log) instead of stopping')
    g.add_argument('--fake-size', default=1280, type=int, help='FAKE: training images (val gets a fifth)')
    g.add_argument('--fake-classes', default=1000, type=int, help='FAKE: number of classes')
    g.add_argument('--num_workers', default=10, type=int)
    g.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the DataLoader (default on)')
    g.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    p.set_defaults(pin_mem=True)

    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default='', help='where checkpoints and logs go; empty: save nothing')
    g.add_argument('--device', default='auto', help='cuda, cuda:N, cpu, or auto (cuda when available)')
    g.add_argument('--seed', default=0, type=int)
    g.add_argument('--resume', default='', help='checkpoint path or URL to resume from')
    g.add_argument('--start_epoch', default=0, type=int, metavar='N', help='first epoch when not resuming')
    g.add_argument('--eval', action='store_true', help='evaluate only')
    g.add_argument('--eval-crop-ratio', default=0.875, type=float, help='center-crop ratio at evaluation')
    g.add_argument('--dist-eval', action='store_true', help='split evaluation over ranks')
    g.add_argument('--print-freq', default=10, type=int, help='progress line every N updates')
    g.add_argument('--save-every', default=0, type=int, metavar='N',
                   help='also checkpoint every N updates inside an epoch (0: at epoch ends only)')
    g.add_argument('--on-save-error', default='continue', choices=['continue', 'stop'],
                   help='when a checkpoint cannot be written, keep the last good one and go on, or stop')
    g.add_argument('--overwrite', action='store_true',
                   help='start afresh in an output_dir that holds another run\'s checkpoint')

    g = p.add_argument_group('distributed')
    g.add_argument('--dist_url', default='env://', help='process-group init method')
    g.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    g.add_argument('--dist-timeout', default=30, type=int, help='minutes before a hung collective fails')

    g = p.add_argument_group('help')
    g.add_argument('-h', '--help', action='help', help='show this message and exit')
    return p


# ---------------------------------------------------------------- building blocks

def resolve_device(args):
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {args.device} asked for, but CUDA is not available; pass --device cpu')
    if args.amp == 'auto':
        args.amp = 'bf16' if args.device.startswith('cuda') else 'none'
    return args


def amp_dtype(args):
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[args.amp]


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
    return DataLoader(SeededDataset(dataset_train, skipped_errors(args), refill=True), sampler=sampler, batch_size=batch_size,
                      drop_last=True, generator=torch.Generator().manual_seed(args.seed), **loader_options(args))


def build_val_loader(args, dataset_val):
    world, rank = (utils.get_world_size(), utils.get_rank()) if args.dist_eval else (1, 0)
    return DataLoader(SeededDataset(dataset_val, skipped_errors(args)), sampler=EvalSampler(len(dataset_val), world, rank),
                      batch_size=int(1.5 * args.batch_size), drop_last=False, **loader_options(args))


def train_size_schedule(args):
    """The resolution schedule of a multi-size run (--size-schedule or --is-multisize), else None."""
    if args.size_schedule:
        try:
            return schedules.parse_size_schedule(args.size_schedule)
        except ValueError as e:
            raise UserError(f'--size-schedule {args.size_schedule!r}: {e}; write e.g. 0:32,5:64,10:128') from e
    if args.is_multisize:
        return schedules.paper_multisize_schedule(args.init_size, args.epoch_step, args.patch_step, args.input_size)
    return None


def at_size(args, size):
    """A copy of args with another --input-size, for the transforms of one multi-size stage."""
    return argparse.Namespace(**dict(vars(args), input_size=size))


def updates_per_epoch(args, num_train_items, batch_size=None):
    batch_size = batch_size or args.batch_size
    world = utils.get_world_size()
    per_rank = math.ceil(num_train_items / world)
    updates = per_rank // batch_size // args.accum_iter
    if updates < 1:
        raise UserError(f'the training set has {num_train_items} images, fewer than one update needs '
                        f'({batch_size} x {world} ranks x {args.accum_iter} accum-iter); '
                        'lower --batch-size or --accum-iter')
    return updates


def scale_lr(args):
    global_batch = args.batch_size * utils.get_world_size() * args.accum_iter
    if not args.unscale_lr:
        args.lr = args.lr * global_batch / 512.0
    return args.lr


def run_epochs(args):
    """Epochs the run trains: --epochs, plus the cool-down with --train-cooldown."""
    return args.epochs + (args.cooldown_epochs if args.train_cooldown else 0)


def build_scheduler(args, optimizer, n_updates):
    """DeiT's schedule (timm's, over --epochs; its cool-down comes after them), stepped every update: the LR at the
    first update of epoch e is the LR DeiT's per-epoch scheduler gives epoch e."""
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, noise=args.lr_noise, noise_pct=args.lr_noise_pct,
        noise_std=args.lr_noise_std, noise_seed=args.seed, step_on_epochs=False, updates_per_epoch=n_updates)
    return scheduler


def build_optimizer(args, model, device):
    """timm's factory; weight decay skips norms, biases and the model's no_weight_decay() names."""
    extra = {}
    if args.opt_betas is not None:
        extra['betas'] = tuple(args.opt_betas)
    if args.opt == 'adamw' and device.type == 'cuda':
        extra['fused'] = True
    return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, eps=args.opt_eps, filter_bias_and_bn=True, **extra)


def build_mixup(args):
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=0.0 if args.bce_loss else args.smoothing, num_classes=args.nb_classes)


def report_speed(args, model, device):
    """EViT's speed test: inference images/s at batch 64, fp32, random inputs."""
    warmup, iters = (10, 100) if device.type == 'cuda' else (2, 10)
    speed = engine.measure_throughput(model, 64, args.input_size, device, iters=iters, warmup=warmup)
    if utils.is_main_process():
        print(f'| speed test: {speed:.1f} images/s ({args.model}, batch 64, {args.input_size} px, fp32, '
              f'{iters} timed iterations on {device.type})', flush=True)


def agreed(flags, device):
    """Each flag True on every rank when it is True on any rank."""
    if not utils.is_dist_avail_and_initialized():
        return list(flags)
    return [v > 0 for v in utils.all_reduce_sum([1.0 if f else 0.0 for f in flags], device)]


def make_after_update(args, writer, stop_signal, budget, train_state, device, max_accuracy, last, eval_images):
    """Checkpoint every --save-every updates, on SIGTERM / SIGUSR1 and when the time budget runs out inside an
    epoch; then stop the epoch. `last` keeps where the epoch stopped, for the final checkpoint of a budget."""
    speed = {}  # the clock starts after the first update, which also pays for start-up

    def after_update(epoch, done, metrics):
        if budget is not None and speed:
            speed['updates'] += 1
            images = speed['updates'] * train_state.batch_size * args.accum_iter * utils.get_world_size()
            budget.note_training_speed(speed['timer'].elapsed() / images, eval_images)
        speed.setdefault('timer', utils.Timer())
        speed.setdefault('updates', 0)
        out_of_time = budget is not None and budget.over() and done < train_state.updates_per_epoch
        signalled, out_of_time = agreed([stop_signal.requested, out_of_time], device)
        stop = signalled or out_of_time
        if stop or (args.save_every > 0 and done % args.save_every == 0 and done < train_state.updates_per_epoch):
            last.update(done=done, metrics=metrics.synchronized_state(device), signalled=signalled)
            writer.write(writer.build(epoch - 1, done, max_accuracy[0], last['metrics']), CHECKPOINT)
        return stop
    return after_update


# ---------------------------------------------------------------- logging

def start_log(args, resumed_from):
    if not args.output_dir or not utils.is_main_process():
        return None
    header = {'config': dict(vars(args)), 'git': utils.git_hash(), 'versions': utils.library_versions(),
              'resumed_from': resumed_from or None, 'command': ' '.join(sys.argv)}
    utils.append_json_line(os.path.join(args.output_dir, 'log.txt'), header)
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(args.output_dir, 'tb'), purge_step=args.start_epoch)


def log_epoch(args, writer, stats):
    if writer is None:
        return
    utils.append_json_line(os.path.join(args.output_dir, 'log.txt'), stats)
    for key, value in stats.items():
        if key != 'epoch' and isinstance(value, (int, float)):
            writer.add_scalar(key, value, stats['epoch'])
    writer.flush()


def report_skipped_files(*splits):
    for dataset in splits:
        skipped = getattr(dataset, 'skipped', [])
        if skipped and utils.is_main_process():
            more = f' and {len(skipped) - 5} more' if len(skipped) > 5 else ''
            print(f'| {dataset.root}: skipped {"; ".join(skipped[:5])}{more}', flush=True)


# ---------------------------------------------------------------- main

def main(args):
    check_output_dir(args.output_dir)
    utils.end_workers_at_exit()
    resolve_device(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    utils.seed_everything(args.seed + utils.get_rank())
    resolve_data_set(args)

    dataset_train, class_names = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args)
    report_skipped_files(dataset_train, dataset_val)
    args.nb_classes = len(class_names)
    model = model_factory.build_model(args)
    if args.finetune:
        model_factory.load_finetune_weights(model, args.finetune)
    if args.attn_only:
        model_factory.attention_only(model, args.model)
    model_factory.train_class_head_only(model, args)
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)

    if args.no_warmup:
        args.warmup_epochs = 0
    sizes = train_size_schedule(args)
    loader_val = build_val_loader(args, dataset_val)
    n_updates = updates_per_epoch(args, len(dataset_train))
    scale_lr(args)
    optimizer = build_optimizer(args, model, device)
    train_state = engine.TrainState(
        optimizer=optimizer, lr_scheduler=build_scheduler(args, optimizer, n_updates),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16'), amp_dtype=amp_dtype(args),
        mixup_fn=build_mixup(args), model_ema=model_ema, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
        updates_per_epoch=n_updates, print_freq=args.print_freq, batch_size=args.batch_size,
        skip_nonfinite=args.skip_nonfinite, inject_nonfinite_at=args.inject_nonfinite, train_mode=args.train_mode,
        cosub=args.cosub)
    train_state.before_update = model_factory.keep_rate_schedule(
        args, [model] + ([model_ema.module] if model_ema else []), n_updates)
    criterion = model_factory.build_criterion(args, model, train_state.mixup_fn is not None, device)
    if args.test_speed or args.only_test_speed:
        report_speed(args, model, device)
        if args.only_test_speed:
            return

    resume_path = find_resume(args, class_names)
    start_step, max_accuracy, start_metrics, elapsed = 0, 0.0, None, 0.0
    if resume_path:
        args.start_epoch, start_step, max_accuracy, start_metrics, elapsed = resume(
            args, resume_path, model, train_state, model_ema, class_names)
    elif not args.eval and not args.time_budget and args.start_epoch >= run_epochs(args):
        raise UserError(f'--start_epoch {args.start_epoch} leaves nothing to train in --epochs {args.epochs} and '
                        'there is no checkpoint to resume; lower --start_epoch or raise --epochs')
    if args.eval and not (resume_path or args.finetune):
        raise UserError('--eval needs weights to score, and there is no checkpoint: pass --resume FILE, an '
                        '--output_dir that holds checkpoint.pth, or --finetune FILE')

    train_model = model
    if args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    if args.compile:
        train_model = torch.compile(train_model)

    eval_kwargs = dict(device=device, amp_dtype=amp_dtype(args), distributed=args.distributed and args.dist_eval)
    if args.eval:
        engine.evaluate(loader_val, model, **eval_kwargs)
        if args.visualize_mask:
            visualize.save_keep_masks(model, dataset_val, args.output_dir, args.n_visualization, device, class_names)
        return

    if args.output_dir and utils.is_main_process():
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f'--output_dir {args.output_dir} cannot be created ({e.strerror}); pass a folder you can '
                            'write to') from e
        utils.remove_stale_temp_files(args.output_dir, (CHECKPOINT, BEST_CHECKPOINT))
    tb_writer = start_log(args, resume_path)
    clock = schedules.Clock(offset=elapsed)
    budget = schedules.Budget(args.time_budget, clock) if args.time_budget else None
    epochs = run_epochs(args)
    epoch_progress = schedules.EpochProgress(epochs)
    if budget is not None or args.multisize_batch:
        progress = (lambda _: budget.progress()) if budget is not None else epoch_progress
        train_state.lr_scheduler = schedules.ProgressLR(train_state.lr_scheduler, epochs * n_updates, progress)
    checkpoints = CheckpointWriter(args, model, train_state, model_ema, class_names, clock)
    best, last = [max_accuracy], {}  # shared with the mid-epoch saver
    stop_signal = utils.StopSignal()
    train_state.after_update = make_after_update(args, checkpoints, stop_signal, budget, train_state, device, best,
                                                 last, len(dataset_val) * (2 if model_ema else 1))
    if utils.is_main_process():
        plan = f'{args.time_budget} h budget' if budget else f'{n_updates} updates per epoch'
        total = sum(p.numel() for p in model.parameters())
        trained = '' if total == n_parameters else f' ({total / 1e6:.2f}M in all)'
        print(f'| {args.model}: {n_parameters / 1e6:.2f}M trained parameters{trained}, {len(dataset_train)} train / '
              f'{len(dataset_val)} val images, {args.nb_classes} classes, {plan}, '
              f'lr {args.lr:.3e}, amp {args.amp}', flush=True)
        print(f'| sampler: {sampler_description(args)}', flush=True)

    finished = budget.over() if budget is not None else args.start_epoch >= epochs
    if finished:
        if utils.is_main_process():
            print(f'| nothing left to train: the checkpoint finished epoch {args.start_epoch - 1} '
                  f'({utils.format_seconds(clock.elapsed())} of training)')
        engine.evaluate(loader_val, model, **eval_kwargs)
        return
    stage, loader_train, epoch = None, None, args.start_epoch
    while budget is not None or epoch < epochs:
        epoch_timer = utils.Timer()
        size = sizes.size_at(epoch, budget.progress() if budget else epoch / epochs) if sizes else args.input_size
        batch = schedules.batch_for_size(args.batch_size, size, sizes.final_size) if args.multisize_batch \
            and sizes else args.batch_size
        eval_size = size if sizes and not args.eval_on_final_size else args.input_size
        if (size, batch, eval_size) != stage:
            loader_train, loader_val = enter_stage(args, dataset_train, dataset_val, (size, batch, eval_size), stage,
                                                   loader_val)
            train_state.updates_per_epoch = updates_per_epoch(args, len(dataset_train), batch)
            train_state.batch_size, stage = batch, (size, batch, eval_size)
        epoch_progress.start_epoch(epoch, train_state.updates_per_epoch, epoch * train_state.updates_per_epoch)
        loader_train.sampler.set_epoch(epoch, start=start_step * batch * args.accum_iter)
        train_stats, stopped = engine.train_one_epoch(train_model, criterion, loader_train, device, epoch,
                                                      train_state, start_step=start_step, start_metrics=start_metrics)
        if stopped and last.get('signalled'):
            if utils.is_main_process():
                print(f'| stopped by signal in epoch {epoch}; checkpoint saved, run the same command to resume',
                      flush=True)
            return
        finish_timer = utils.Timer()
        stats = evaluate_and_save(args, model, model_ema, loader_val, eval_kwargs, checkpoints, best, epoch,
                                  last if stopped else None)
        stats.update(train_lr=train_stats['lr'], train_loss=train_stats['loss'], n_parameters=n_parameters,
                     epoch_seconds=epoch_timer.elapsed(), elapsed_seconds=clock.elapsed(),
                     train_images_per_sec=train_stats['images_per_sec'], train_size=size, batch_size=batch,
                     skipped_nonfinite=int(train_stats['skipped_nonfinite']),
                     skipped_images=int(train_stats['skipped_images']))
        if model_factory.is_evit(args.model):
            stats['keep_rate'] = min(model.keep_rates)
        log_epoch(args, tb_writer, stats)
        if budget is not None:
            budget.note_finish_cost(finish_timer.elapsed())
            if stopped or budget.over():
                break
        start_step, start_metrics, epoch = 0, None, epoch + 1
    if utils.is_main_process():
        print(f'| training time {utils.format_seconds(clock.elapsed())}; max accuracy {best[0]:.2f}%')
    if args.visualize_mask:
        visualize.save_keep_masks(model, dataset_val, args.output_dir, args.n_visualization, device, class_names)


def enter_stage(args, dataset_train, dataset_val, stage, previous, loader_val):
    """Loaders for a (train size, batch, eval size) stage: the one stage of a plain run, or a multi-size step."""
    size, batch, eval_size = stage
    dataset_train.transform = build_transform(True, at_size(args, size))
    if previous is None or eval_size != previous[2]:
        dataset_val.transform = build_transform(False, at_size(args, eval_size))
        loader_val = build_val_loader(args, dataset_val)
    if utils.is_main_process() and (size, batch) != (args.input_size, args.batch_size):
        print(f'| training at {size} px, batch {batch}; evaluating at {eval_size} px', flush=True)
    return build_train_loader(args, dataset_train, batch), loader_val


def evaluate_and_save(args, model, model_ema, loader_val, eval_kwargs, checkpoints, best, epoch, stopped_at):
    """Evaluate after an epoch (or where a budget stopped it: `stopped_at` holds the updates done) and checkpoint.

    Returns the epoch's log entries so far."""
    test_stats = engine.evaluate(loader_val, model, **eval_kwargs)
    stats = {'test_loss': test_stats['loss'], 'test_acc1': test_stats['acc1'], 'test_acc5': test_stats['acc5'],
             'epoch': epoch, 'skipped_val_images': test_stats['skipped_images']}
    if model_ema is not None:
        stats['test_ema_acc1'] = engine.evaluate(loader_val, model_ema.module, prefix='EMA ', **eval_kwargs)['acc1']
    is_best = test_stats['acc1'] > best[0]
    best[0] = max(best[0], test_stats['acc1'])
    if stopped_at:
        ckpt = checkpoints.build(epoch - 1, stopped_at['done'], best[0], stopped_at['metrics'])
        stats['updates_done'] = stopped_at['done']
    else:
        ckpt = checkpoints.build(epoch, 0, best[0])
    checkpoints.write(ckpt, CHECKPOINT, *([BEST_CHECKPOINT] if is_best else []))
    stats['max_accuracy'] = best[0]
    if utils.is_main_process():
        print(f'| epoch {epoch}: acc1 {test_stats["acc1"]:.2f}% (max {best[0]:.2f}%)', flush=True)
    return stats


def one_line(error):
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback (whose last
    line starts with the exception's qualified name, as in 'datasets.BadImageError: unreadable image ...')."""
    last = [line for line in str(error).strip().splitlines() if line.strip()][-1]
    match = re.match(r'[A-Za-z_][\w.]*(?:Error|Exception): (.*)', last)
    return match.group(1) if match else last


def cli(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        check_flag_ranges(args, parser)
        main(args)
    except UserError as e:
        print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
        sys.exit(2)
    except engine.NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:  # before training starts; once it has, Ctrl-C saves and stops (utils.StopSignal)
        print('interrupted before training started; nothing was saved', file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    cli()
