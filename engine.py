"""The train and eval loops, written out step by step. No flag parsing here."""
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import utils


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    """What the loop needs besides model and data, so train_one_epoch keeps a short signature."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: object                 # anything with step_update(num_updates) -> sets the LR
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype] = None
    mixup_fn: Optional[Callable] = None
    finish_batch: Optional[Callable] = None  # uint8 batches on the device -> normalised, erased (loaders.DeviceFinish)
    model_ema: Optional[torch.nn.Module] = None
    accum_iter: int = 1
    clip_grad: Optional[float] = None
    updates_per_epoch: int = 1
    print_freq: int = 10
    batch_size: int = 1                      # per process; batches that lost unreadable images are smaller
    skip_nonfinite: int = 0                  # non-finite losses skipped (not stepped) before the run stops
    after_update: Optional[Callable] = None  # (epoch, updates_done_in_epoch, metrics) -> True to stop
    before_update: Optional[Callable] = None  # (global update) -> None: per-step model schedules (EViT keep rate)
    train_mode: bool = True                  # False: fine-tune in eval mode (no dropout / drop path, frozen BN)
    cosub: bool = False                      # DeiT's co-training: the model sees each batch twice


def autocast(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def train_one_epoch(model, criterion, loader, device, epoch, state: TrainState, start_step=0, start_metrics=None):
    """Train one epoch from update `start_step` on (a resumed epoch skips what it had done and starts from the
    metric sums it had saved).

    Returns the averaged metrics and whether after_update asked to stop early.
    """
    model.train(state.train_mode)
    optimizer, accum = state.optimizer, state.accum_iter
    metrics = utils.MetricLogger()
    metrics.load_state_dict(start_metrics or {})
    metrics.update(n=0, skipped_nonfinite=0, skipped_images=0)
    total = state.updates_per_epoch
    num_micro = (len(loader) // accum) * accum
    window_start, window_images, stopped = time.time(), 0, False
    epoch_start = time.time()
    speed, update_images = SteadySpeed(), 0
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        samples, targets = batch[0], batch[1]
        if i >= num_micro:
            break
        micro, update = i % accum, start_step + i // accum
        if micro == 0:
            state.lr_scheduler.step_update(epoch * total + update)
            if state.before_update is not None:
                state.before_update(epoch * total + update)
        samples, targets, batch_size = _prepare_batch(samples, targets, device, state)
        is_last_micro = micro == accum - 1
        # Inner micro-steps of an accumulation skip DDP's gradient all-reduce.
        sync_ctx = model.no_sync() if (not is_last_micro and hasattr(model, 'no_sync')) else nullcontext()
        with sync_ctx:
            with autocast(device, state.amp_dtype):
                outputs = model(samples)
                loss = criterion(samples, outputs, targets)
            loss_value = loss.item()
            if _skip_nonfinite(loss_value, metrics, state, device, f'epoch {epoch}, step {update}', total):
                continue
            state.scaler.scale(loss / accum).backward()
        metrics.update(loss=loss_value, n=batch_size)
        update_images += batch_size
        if len(batch) > 2:  # --skip-bad-images: how many unreadable images each sample's loader passed over
            metrics.update(n=0, skipped_images=int(batch[2].sum()))
        window_images += batch_size
        if not is_last_micro:
            continue

        _optimizer_step(model, state, epoch * total + update)
        speed.update_done(update_images)
        update_images = 0
        done = update + 1
        lr = optimizer.param_groups[0]['lr']
        metrics.update(lr=lr)
        if done % state.print_freq == 0 or done == total:
            window_start, window_images = _print_progress(epoch, done, total, metrics, lr, window_start,
                                                          window_images, epoch_start, start_step)
        if state.after_update is not None and state.after_update(epoch, done, metrics):
            stopped = True
            break
    metrics.synchronize(device)
    stats = metrics.averages()
    images, seconds = speed.measured()
    stats['images_per_sec'] = utils.all_reduce_sum([images], device)[0] / max(seconds, 1e-9)
    return stats, stopped


class SteadySpeed:
    """Images trained by this process per second of steady state: from the end of its first update in this call
    (which pays for start-up, the loader's first batches and compilation) to the end of its last one; the whole
    epoch when it had one update. Resumed epochs count only what this call trained."""

    def __init__(self):
        self.start, self.first_images, self.images, self.end = time.time(), None, 0, None

    def update_done(self, images):
        if self.first_images is None:
            self.first_images, self.after_first = images, time.time()
        self.images += images
        self.end = time.time()

    def measured(self):
        """(images, seconds)."""
        if self.first_images is None:
            return 0, 1.0
        if self.images == self.first_images:
            return self.images, self.end - self.start
        return self.images - self.first_images, self.end - self.after_first


def _prepare_batch(samples, targets, device, state):
    """To the device, through Mixup / CutMix; Cosub doubles the batch (one half per stochastic-depth submodel).
    Returns (samples, targets, images in the batch)."""
    samples = samples.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if state.finish_batch is not None:
        samples = state.finish_batch(samples)
    if state.mixup_fn is not None:
        samples, targets = state.mixup_fn(samples, targets)
    batch_size = samples.shape[0]
    if state.cosub:
        samples = torch.cat([samples, samples])
    return samples, targets, batch_size


def _skip_nonfinite(loss_value, metrics, state, device, where, total):
    """True when the loss is not finite on some rank and the step is to be skipped (counted); past
    --skip-nonfinite such steps, NonFiniteLossError."""
    if not utils.any_rank([not math.isfinite(loss_value)], device)[0]:
        return False
    if metrics.meters['skipped_nonfinite'].total >= state.skip_nonfinite:
        raise NonFiniteLossError(f'loss is {loss_value} at {where} (of {total}) after {state.skip_nonfinite} '
                                 'skipped; the last checkpoint is kept')
    metrics.update(n=0, skipped_nonfinite=1)
    state.optimizer.zero_grad(set_to_none=True)
    utils.log(f'| skipping non-finite loss {loss_value} at {where}')
    return True


def _optimizer_step(model, state, global_update):
    """Unscale and clip, optimizer and scaler steps, gradients to None, the EMA's update."""
    if state.clip_grad:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), state.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.model_ema is not None:
        state.model_ema.update(unwrap(model), step=global_update)


def _print_progress(epoch, done, total, metrics, lr, window_start, window_images, epoch_start, start_step):
    now = time.time()
    if utils.is_main_process():
        img_s = window_images * utils.get_world_size() / max(now - window_start, 1e-9)
        per_update = (now - epoch_start) / max(done - start_step, 1)
        eta = utils.format_seconds(per_update * (total - done))
        print(f'Epoch: [{epoch}] [{done}/{total}] loss {metrics.meters["loss"].median:.4f} '
              f'({metrics.meters["loss"].global_avg:.4f}) lr {lr:.3e} img/s {img_s:.1f} eta {eta}', flush=True)
    return now, 0


@torch.no_grad()
def evaluate(loader, model, device, amp_dtype=None, distributed=False, prefix='', finish_batch=None):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader's images (uint8 ones through
    `finish_batch` on the device).

    With `distributed`, each rank has scored its own share of the images and the sums are combined,
    so every image counts exactly once.
    """
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    sampler = getattr(loader, 'sampler', None)
    expected = float(len(sampler)) if sampler is not None else None
    for batch in loader:
        if batch is None:  # --skip-bad-images: every image of the batch was unreadable
            continue
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if finish_batch is not None:
            images = finish_batch(images)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        loss_sum += F.cross_entropy(output, targets, reduction='sum').item()
        top = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, :1].sum().item()
        correct5 += hits.sum().item()
        count += images.shape[0]
    expected = count if expected is None else expected
    if distributed:
        loss_sum, correct1, correct5, count, expected = utils.all_reduce_sum(
            [loss_sum, correct1, correct5, count, expected], device)
    skipped = int(expected - count)
    count = max(count, 1)
    stats = {'acc1': 100.0 * correct1 / count, 'acc5': 100.0 * correct5 / count, 'loss': loss_sum / count,
             'images': int(count), 'skipped_images': skipped}
    note = f' ({skipped} unreadable images skipped, not counted)' if skipped else ''
    utils.log(f'{prefix}* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}{note}')
    return stats


def _synchronize(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_throughput(model, batch_size=64, img_size=224, device='cpu', iters=100, warmup=100):
    """Images per second of model.eval() on random (batch_size, 3, img_size, img_size) fp32 inputs."""
    model = model.eval().to(device)
    x = torch.rand(batch_size, 3, img_size, img_size, device=device)
    for _ in range(warmup):
        model(x)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    _synchronize(device)
    return batch_size * iters / (time.perf_counter() - start)
