"""Schedules that are not the learning rate's own: the run clock, time budgets and multi-size training.

A run's progress is a number in [0, 1]: updates done / updates planned for an epoch-based run, or training seconds
/ budgeted seconds with --time-budget. The learning rate (timm's scheduler, built in updates) and the resolution
schedule are both functions of it, so a budgeted run anneals to --min-lr exactly at its deadline.
"""
import math
import time
from typing import NamedTuple

from utils import UserError


class Clock:
    """Seconds of run time, continued across resumes: checkpoints store elapsed() and pass it back as offset."""

    def __init__(self, offset=0.0):
        self.offset, self.start = offset, time.monotonic()

    def elapsed(self):
        return self.offset + time.monotonic() - self.start


class Budget:
    """A deadline for the whole run, evaluation and checkpoints included.

    Training stops early enough for the final evaluation and checkpoint to end by the deadline: `reserve` seconds
    are kept for them. Until one evaluation + checkpoint has been timed, the reserve is estimated from the training
    speed (an evaluated image costs about a third of a trained one; we keep half); then it is 1.25x the time taken.
    """

    def __init__(self, hours, clock):
        self.seconds, self.clock = hours * 3600.0, clock
        self.reserve, self.measured = 0.05 * self.seconds, False

    def note_training_speed(self, seconds_per_image, eval_images):
        if not self.measured:
            self._set_reserve(0.5 * seconds_per_image * eval_images)

    def note_finish_cost(self, seconds):
        self.measured = True
        self._set_reserve(1.25 * seconds)

    def _set_reserve(self, seconds):
        self.reserve = min(max(seconds, 0.01 * self.seconds), 0.5 * self.seconds)

    def progress(self):
        return min(self.clock.elapsed() / (self.seconds - self.reserve), 1.0)

    def over(self):
        return self.progress() >= 1.0


class EpochProgress:
    """Progress of an epoch-based run whose epochs may have different numbers of updates (--multisize-batch)."""

    def __init__(self, epochs):
        self.epochs, self.epoch, self.updates_in_epoch, self.first_update = epochs, 0, 1, 0

    def start_epoch(self, epoch, updates_in_epoch, first_global_update):
        self.epoch, self.updates_in_epoch, self.first_update = epoch, updates_in_epoch, first_global_update

    def __call__(self, global_update):
        return (self.epoch + (global_update - self.first_update) / self.updates_in_epoch) / self.epochs


class ProgressLR:
    """Steps a timm scheduler built for `total_updates` at progress(global update) x total_updates."""

    def __init__(self, scheduler, total_updates, progress):
        self.scheduler, self.total_updates, self.progress = scheduler, total_updates, progress

    def step_update(self, num_updates):
        self.scheduler.step_update(round(min(self.progress(num_updates), 1.0) * self.total_updates))

    def state_dict(self):
        return self.scheduler.state_dict()


class SizeSchedule:
    """Training resolution by stage: [(start, size), ...] with starts in epochs (ints) or run fractions (floats)."""

    def __init__(self, steps, by_fraction):
        self.steps, self.by_fraction = sorted(steps), by_fraction

    def size_at(self, epoch, progress):
        at = progress if self.by_fraction else epoch
        return [size for start, size in self.steps if start <= at + 1e-9][-1]

    @property
    def final_size(self):
        return self.steps[-1][1]


def parse_size_schedule(text):
    """'0:32,5:64,10:128' (epochs) or '0:32,0.3:64,0.6:128' (fractions of the run) -> SizeSchedule."""
    steps, fractions = [], False
    for part in text.split(','):
        start, sep, size = part.strip().partition(':')
        if not sep or not size.strip().isdigit():
            raise ValueError(f'size-schedule step {part.strip()!r} is not START:SIZE')
        fractions |= '.' in start
        steps.append((float(start) if '.' in start else int(start), int(size)))
    if not steps or min(start for start, _ in steps) != 0:
        raise ValueError('the size schedule must have a step that starts at 0')
    if fractions and any(not 0 <= start < 1 for start, _ in steps):
        raise ValueError('fraction starts must lie in [0, 1)')
    return SizeSchedule(steps, fractions)


def paper_multisize_schedule(init_size, epoch_step, patch_step, final_size):
    """The 24-hour paper's schedule: init_size at epoch 0, then + 16 x patch_step px every epoch_step epochs,
    never past final_size (32, 64, ..., 224 for 32 / 5 / 2 / 224: 224 from epoch 30)."""
    steps, size, epoch = [], init_size, 0
    while size <= final_size:
        steps.append((epoch, size))
        size, epoch = size + 16 * patch_step, epoch + epoch_step
    return SizeSchedule(steps or [(0, final_size)], by_fraction=False)


def batch_for_size(batch_size, size, final_size):
    """--multisize-batch: the same pixels per batch at every size (batch x (final / size)^2, rounded down), and even
    when batch_size is: Mixup and CutMix pair the images of a batch."""
    batch = math.floor(batch_size * (final_size / size) ** 2)
    if batch_size % 2 == 0:
        batch -= batch % 2
    return max(batch, 1)


class Stage(NamedTuple):
    size: int  # training resolution
    batch: int  # images per process per micro-step
    eval_size: int


class RunPlan:
    """What each epoch trains at, and when the run is over: after `epochs`, or at the budget's deadline.

    sizes: a SizeSchedule for multi-size training, or None; multisize_batch keeps pixels per batch constant;
    eval_on_final_size evaluates at `input_size` rather than at the training size.
    """

    def __init__(self, epochs, input_size, batch_size, sizes=None, budget=None, multisize_batch=False,
                 eval_on_final_size=False):
        self.epochs, self.input_size, self.batch_size = epochs, input_size, batch_size
        self.sizes, self.budget = sizes, budget
        self.multisize_batch, self.eval_on_final_size = multisize_batch, eval_on_final_size
        self.epoch_progress = EpochProgress(epochs)

    def epoch_started(self, epoch, updates_in_epoch):
        self.epoch_progress.start_epoch(epoch, updates_in_epoch, epoch * updates_in_epoch)

    def lr_progress(self, global_update):
        """Fraction of the run done at an update: of the budget's time, or of the epochs."""
        return self.budget.progress() if self.budget is not None else self.epoch_progress(global_update)

    def over(self, epoch):
        return self.budget.over() if self.budget is not None else epoch >= self.epochs

    def stage(self, epoch):
        if self.sizes is None:
            return self.stage_at_size(self.input_size)
        return self.stage_at_size(self.sizes.size_at(epoch, self.budget.progress() if self.budget else
                                                     epoch / self.epochs))

    def stage_at_size(self, size):
        batch = batch_for_size(self.batch_size, size, self.sizes.final_size) \
            if self.multisize_batch and self.sizes is not None else self.batch_size
        return Stage(size, batch, self.input_size if self.eval_on_final_size else size)

    def stages(self):
        """Every stage of the plan, in order, whether or not the run gets that far."""
        sizes = [self.input_size] if self.sizes is None else [size for _, size in self.sizes.steps]
        return [self.stage_at_size(size) for size in sizes]

    def check_even_batches(self):
        """UserError, before training, when a stage's batch is odd: Mixup and CutMix pair the images of a batch."""
        for stage in self.stages():
            if stage.batch % 2:
                where = '' if stage.batch == self.batch_size else f' (the multi-size stage at {stage.size} px)'
                raise UserError(f'batch {stage.batch}{where} is odd, and Mixup / CutMix pair the images of a '
                                'batch; pass an even --batch-size, or --mixup 0 --cutmix 0')


def size_schedule_from_flags(args):
    """The resolution schedule of a multi-size run (--size-schedule or --is-multisize), else None."""
    if args.size_schedule:
        try:
            return parse_size_schedule(args.size_schedule)
        except ValueError as e:
            raise UserError(f'--size-schedule {args.size_schedule!r}: {e}; write e.g. 0:32,5:64,10:128') from e
    if args.is_multisize:
        return paper_multisize_schedule(args.init_size, args.epoch_step, args.patch_step, args.input_size)
    return None
