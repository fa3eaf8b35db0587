"""From the flags to the optimization: updates per epoch, DeiT's LR scaling, timm's optimizer and LR schedule, and
Mixup / CutMix."""
import math

from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import utils
from utils import UserError


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


def warn_warmup_above_lr(args):
    """A fine-tuning LR scaled to a small batch can fall under --warmup-lr, and the warm-up then lowers the LR."""
    if args.warmup_epochs > 0 and args.warmup_lr > args.lr:
        utils.log(f'| warning: --warmup-lr {args.warmup_lr:g} is above the LR {args.lr:g} (--lr scaled to the global '
                  f'batch), so the warm-up lowers the LR; pass --warmup-lr under {args.lr:g} or --warmup-epochs 0')


def run_epochs(args):
    """Epochs the run trains: --epochs, plus the cool-down with --train-cooldown."""
    return args.epochs + (args.cooldown_epochs if args.train_cooldown else 0)


def build_scheduler(args, optimizer, n_updates):
    """DeiT's schedule (timm's, over --epochs; its cool-down comes after them), stepped every update: the LR at the
    first update of epoch e is the LR DeiT's per-epoch scheduler gives epoch e."""
    scheduler, _ = create_scheduler_v2(optimizer, **schedule_options(args), step_on_epochs=False,
                                       updates_per_epoch=n_updates)
    return scheduler


def schedule_options(args):
    """timm's create_scheduler_v2 arguments from DeiT's schedule flags."""
    return dict(sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
                cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
                warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
                noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
                patience_epochs=args.patience_epochs)


def deit_scheduler_state(args, optimizer):
    """The state DeiT's epoch scheduler would save for this run (timm's, stepped on epochs), for checkpoint.pth's
    lr_scheduler: DeiT's main.py loads it into its own scheduler and then calls step(epoch). Ours is stepped per
    update; its state would switch DeiT's scheduler to updates and freeze its LR. (This run never reads it back: its
    LR is a function of the update count.)"""
    import torch
    shadow = torch.optim.SGD([{'params': [torch.zeros(1)], 'lr': group.get('initial_lr', group['lr'])}
                              for group in optimizer.param_groups])
    scheduler, _ = create_scheduler_v2(shadow, **schedule_options(args))
    return scheduler.state_dict()


def build_optimizer(args, model, device):
    """timm's factory; weight decay skips norms, biases and the model's no_weight_decay() names."""
    extra = {}
    if args.opt_betas is not None:
        extra['betas'] = tuple(args.opt_betas)
    if args.opt == 'adamw' and device.type == 'cuda':
        extra['fused'] = True
    if args.layer_decay is not None:
        extra['layer_decay'] = args.layer_decay
    return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, eps=args.opt_eps, filter_bias_and_bn=True, **extra)


def uses_mixup(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args):
    if not uses_mixup(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=0.0 if args.bce_loss else args.smoothing, num_classes=args.nb_classes)
