"""The train and eval loops, written out step by step. No flag parsing here."""
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

    The device is read only on read steps (read_step): the loss and non-finite counts are summed on the device in
    between, so the host can queue the next update while the device works.

    Returns the averaged metrics and whether after_update asked to stop early.
    """
    model.train(state.train_mode)
    accum = state.accum_iter
    metrics = utils.MetricLogger()
    metrics.load_state_dict(start_metrics or {})
    metrics.update(n=0, skipped_nonfinite=0, skipped_images=0)
    total = state.updates_per_epoch
    num_micro = (len(loader) // accum) * accum
    window = DeviceWindow(device)
    read_each_update = state.skip_nonfinite > 0 and not can_skip_on_device(state)
    epoch_start, stopped = time.time(), False
    speed, update_images, read_images = SteadySpeed(), 0, 0
    state.optimizer.zero_grad(set_to_none=True)
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
            window.add_loss(loss.detach(), batch_size, update)
            state.scaler.scale(loss / accum).backward()
        del outputs, loss  # backward freed the graph; the tensors go too, before the next forward
        update_images += batch_size
        if len(batch) > 2:  # --skip-bad-images: how many unreadable images each sample's loader passed over
            metrics.update(n=0, skipped_images=int(batch[2].sum()))
        if not is_last_micro:
            continue

        _optimizer_step(model, state, window, read_each_update)
        speed.update_done(update_images)
        read_images, update_images = read_images + update_images, 0
        done = update + 1
        lr = state.optimizer.param_groups[0]['lr']
        metrics.update(lr=lr)
        if not (read_each_update or read_step(done, state)):
            continue
        window.read_into(metrics, state, epoch, total)
        if done % state.print_freq == 0 or done == total:
            _print_progress(epoch, done, total, metrics, lr, speed, epoch_start, start_step)
        if state.after_update is not None and state.after_update(epoch, done, metrics, read_images):
            stopped = True
            break
        read_images = 0
    if window.pending:
        window.read_into(metrics, state, epoch, total)
    speed.finish()
    metrics.synchronize(device)
    stats = metrics.averages()
    images, seconds = speed.measured()
    stats['images_per_sec'] = utils.all_reduce_sum([images], device)[0] / max(seconds, 1e-9)
    return stats, stopped


def read_step(done, state):
    """Updates after which the host reads the device: progress lines, the epoch's end and --save-every
    checkpoints (a checkpoint is written only after the losses before it were checked). Stop signals and the
    time budget are checked here too."""
    save_every = getattr(state.after_update, 'save_every', 0)
    return done % state.print_freq == 0 or done == state.updates_per_epoch or (save_every and done % save_every == 0)


def can_skip_on_device(state):
    """GradScaler skips a non-finite step itself; optimizers with a fused kernel (torch's fused AdamW, Adam, SGD)
    take a found_inf tensor and skip on the device."""
    return state.scaler.is_enabled() or getattr(state.optimizer, '_step_supports_amp_scaling', False)


class DeviceWindow:
    """The losses since the last read, kept on the device: the image-weighted loss sum of the finite ones, how many
    updates had a non-finite loss, the first such loss and its update."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.pending = False
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self.loss_sum, self.good_images, self.bad_updates = zero.clone(), zero.clone(), zero.clone()
        self.first_bad, self.first_bad_step = zero.clone(), zero - 1
        self.update_bad = torch.zeros((), device=self.device, dtype=torch.bool)

    def add_loss(self, loss, batch_size, update):
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double() * batch_size, 0.0)
        self.good_images += finite.double() * batch_size
        new = ~finite & (self.first_bad_step < 0)
        self.first_bad = torch.where(new, loss.double(), self.first_bad)
        self.first_bad_step = torch.where(new, float(update), self.first_bad_step)
        self.update_bad |= ~finite
        self.pending = True

    def end_update(self, found_inf=None):
        """Count the update as non-finite when a loss was, or (no GradScaler) when its gradients were: after
        DDP's all-reduce these agree on every rank."""
        bad = self.update_bad if found_inf is None else self.update_bad | (found_inf > 0)
        self.bad_updates += bad.double()
        self.update_bad = torch.zeros_like(self.update_bad)

    def read_into(self, metrics, state, epoch, total):
        """One device read: the window's mean loss into metrics; non-finite updates logged and counted, or past
        --skip-nonfinite of them, NonFiniteLossError."""
        loss_sum, good_images, bad, first_bad, first_step = torch.stack(
            [self.loss_sum, self.good_images, self.bad_updates, self.first_bad, self.first_bad_step]).tolist()
        bad = utils.all_reduce_max([bad], self.device)[0]
        if good_images:
            metrics.update(loss=loss_sum / good_images, n=good_images)
        self.reset()
        if not bad:
            return
        skipped = metrics.meters['skipped_nonfinite'].total
        # this rank saw the loss; else another rank did, or only the gradients were not finite
        what, where = (f'loss is {first_bad}', f'epoch {epoch}, step {int(first_step)}') if first_step >= 0 else \
            ('a loss or gradient is not finite', f'epoch {epoch}')
        if skipped + bad > state.skip_nonfinite:
            raise NonFiniteLossError(f'{what} at {where} (of {total}) after {int(skipped)} skipped; '
                                     'the last checkpoint is kept')
        metrics.update(n=0, skipped_nonfinite=bad)
        more = f' ({int(bad)} updates since the last read)' if bad > 1 else ''
        what = f'loss {first_bad}' if first_step >= 0 else 'update (a loss or gradient)'
        utils.log(f'| skipping non-finite {what} at {where}{more}')


class SteadySpeed:
    """Images trained by this process per second of steady state: from the end of its first update in this call
    (which pays for start-up, the loader's first batches and compilation) to the end of its last one, timed after
    the epoch's last device read; the whole epoch when it had one update. Resumed epochs count only what this call
    trained."""

    def __init__(self):
        self.start, self.first_images, self.images, self.end = time.time(), None, 0, None

    def update_done(self, images):
        if self.first_images is None:
            self.first_images, self.after_first = images, time.time()
        self.images += images
        self.end = time.time()

    def finish(self):
        """The end of the last update: once the device has done it (the caller has just read the device)."""
        if self.first_images is not None:
            self.end = time.time()

    def measured(self):
        """(images, seconds)."""
        if self.first_images is None:
            return 0, 1.0
        if self.images == self.first_images:
            return self.images, self.end - self.start
        return self.images - self.first_images, self.end - self.after_first

    def images_per_second(self):
        images, seconds = self.measured()
        return images / max(seconds, 1e-9)


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


def gradients_nonfinite(optimizer):
    """1.0 on the device when a gradient holds inf or NaN (GradScaler's fused check, with a scale of 1)."""
    grads = [p.grad for group in optimizer.param_groups for p in group['params'] if p.grad is not None]
    found = torch.zeros((), device=grads[0].device)
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    one = torch.ones((), device=grads[0].device)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
    return found


def _optimizer_step(model, state, window, read_each_update):
    """Unscale and clip, optimizer and scaler steps, gradients to None, the EMA's update. A non-finite update is
    skipped: by GradScaler, by a fused optimizer's found_inf on the device, or (other optimizers under
    --skip-nonfinite) after reading the flag; with nothing to skip (--skip-nonfinite 0) the next read stops the run
    before any checkpoint holds the step."""
    optimizer = state.optimizer
    if state.clip_grad:
        state.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), state.clip_grad)
    fused = getattr(optimizer, '_step_supports_amp_scaling', False)
    # Only where it can skip the step: a pass over every gradient costs as much as one of the optimizer's own.
    found_inf = gradients_nonfinite(optimizer) if not state.scaler.is_enabled() and (fused or read_each_update) \
        else None
    window.end_update(found_inf)
    if found_inf is not None and fused:
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif found_inf is not None and read_each_update and found_inf.item():
        pass  # skipped; counted at this update's read
    else:
        state.scaler.step(optimizer)
    state.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if state.model_ema is not None:
        # No step: a constant decay from the first update, as DeiT's ModelEma (with step=, ModelEmaV3 copies the
        # model for the first two updates).
        state.model_ema.update(unwrap(model))


def _print_progress(epoch, done, total, metrics, lr, speed, epoch_start, start_step):
    if utils.is_main_process():
        img_s = speed.images_per_second() * utils.get_world_size()
        per_update = (time.time() - epoch_start) / max(done - start_step, 1)
        eta = utils.format_seconds(per_update * (total - done))
        print(f'Epoch: [{epoch}] [{done}/{total}] loss {metrics.meters["loss"].median:.4f} '
              f'({metrics.meters["loss"].global_avg:.4f}) lr {lr:.3e} img/s {img_s:.1f} eta {eta}', flush=True)


def evaluate(loader, model, device, amp_dtype=None, distributed=False, prefix='', finish_batch=None):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader's images (uint8 ones through
    `finish_batch` on the device)."""
    return evaluate_models(loader, {prefix: model}, device, amp_dtype, distributed, finish_batch)[prefix]


@torch.no_grad()
def evaluate_models(loader, models, device, amp_dtype=None, distributed=False, finish_batch=None):
    """evaluate() for several models ({log prefix: model}, e.g. the model and its EMA) in one pass: each batch is
    decoded and moved once. The sums stay on the device until the end, so the host never waits for a batch.

    With `distributed`, each rank has scored its own share of the images and the sums are combined, so every image
    counts exactly once. Returns {prefix: stats}.
    """
    for model in models.values():
        model.eval()
    sums = {prefix: torch.zeros(3, dtype=torch.float64, device=device) for prefix in models}  # loss, top-1, top-5
    count = 0
    sampler = getattr(loader, 'sampler', None)
    expected = len(sampler) if sampler is not None else None
    for batch in loader:
        if batch is None:  # --skip-bad-images: every image of the batch was unreadable
            continue
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if finish_batch is not None:
            images = finish_batch(images)
        for prefix, model in models.items():
            sums[prefix] += _batch_sums(model, images, targets, device, amp_dtype)
        count += images.shape[0]
    expected = count if expected is None else expected
    prefixes = list(models)
    flat = torch.cat([sums[p] for p in prefixes]).tolist()
    if distributed:
        flat, (count, expected) = utils.all_reduce_sum(flat, device), utils.all_reduce_sum([count, expected], device)
    return {p: _eval_stats(flat[3 * i: 3 * i + 3], count, expected, p) for i, p in enumerate(prefixes)}


def _batch_sums(model, images, targets, device, amp_dtype):
    with autocast(device, amp_dtype):
        output = model(images)
    output = output.float()
    hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(targets[:, None])
    return torch.stack([F.cross_entropy(output, targets, reduction='sum'), hits[:, :1].sum(), hits.sum()]).double()


def _eval_stats(sums, count, expected, prefix):
    loss_sum, correct1, correct5 = sums
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
def measure_throughput(model, batch_size=64, img_size=224, device='cpu', iters=100, warmup=100, amp_dtype=None):
    """Images per second of model.eval() on random (batch_size, 3, img_size, img_size) inputs, fp32 or under
    autocast to amp_dtype."""
    model = model.eval().to(device)
    x = torch.rand(batch_size, 3, img_size, img_size, device=device)
    device = torch.device(device)
    for _ in range(warmup):
        with autocast(device, amp_dtype):
            model(x)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        with autocast(device, amp_dtype):
            model(x)
    _synchronize(device)
    return batch_size * iters / (time.perf_counter() - start)
