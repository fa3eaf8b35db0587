"""Train and evaluate DeiT-style vision transformers: flags -> build everything -> epoch loop."""
import argparse
import os
import re
import sys
from typing import NamedTuple

import torch

from timm.utils import ModelEmaV3

import dali_loader
import engine
import evit_models
import losses
import model_factory
import optimization
import schedules
import utils
import visualize
from checkpoints import BEST_CHECKPOINT, CHECKPOINT, CheckpointWriter, check_output_dir, find_resume, resume
from datasets import build_dataset, build_transform, loader_for, resolve_data_set, resolve_preprocessing
from flags import (check_flag_ranges, get_args_parser,  # noqa: F401 - get_args_parser: used by the scripts
                   note_ignored_flags, parse_args)
from loaders import DevicePrefetcher, build_train_loader, build_val_loader, device_finish, sampler_description
from utils import UserError


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


def at_size(args, size):
    """A copy of args with another --input-size, for the transforms of one multi-size stage."""
    return argparse.Namespace(**dict(vars(args), input_size=size))


def report_speed(args, model, device):
    """EViT's speed test: inference images/s at batch 64, fp32, random inputs."""
    warmup, iters = (10, 100) if device.type == 'cuda' else (2, 10)
    speed = engine.measure_throughput(model, 64, args.input_size, device, iters=iters, warmup=warmup)
    utils.log(f'| speed test: {speed:.1f} images/s ({args.model}, batch 64, {args.input_size} px, fp32, '
              f'{iters} timed iterations on {device.type})')


class UpdateHook:
    """Called on the updates where the loop reads the device (engine.read_step): checkpoints every --save-every
    updates, and on a stop signal or the budget's deadline inside an epoch, where it also ends the epoch (returns
    True). It times training for the budget."""

    def __init__(self, writer, stop_signal, budget, train_state, device, save_every, eval_images):
        self.writer, self.stop_signal, self.budget, self.state, self.device = writer, stop_signal, budget, \
            train_state, device
        self.save_every, self.eval_images = save_every, eval_images
        self.timer, self.images = None, 0  # the clock starts at the first call, after start-up

    def __call__(self, epoch, done, metrics, images):
        """`images`: what this process trained since the previous call."""
        if self.budget is not None and self.timer is not None:
            self.images += images * utils.get_world_size()
            self.budget.note_training_speed(self.timer.elapsed() / self.images, self.eval_images)
        self.timer = self.timer or utils.Timer()
        inside = done < self.state.updates_per_epoch
        out_of_time = self.budget is not None and self.budget.over() and inside
        signalled, out_of_time = utils.any_rank([self.stop_signal.requested, out_of_time], self.device)
        stop = signalled or out_of_time
        if stop or (self.save_every > 0 and done % self.save_every == 0 and inside):
            self.writer.save_mid_epoch(epoch, done, metrics.synchronized_state(self.device), signalled)
        return stop


def resolve_config(args):
    """Flags that depend on the machine and the launch, resolved once: device, AMP, ranks, seeds, data set, warm-up,
    the LR scaled to the global batch."""
    resolve_device(args)
    utils.init_distributed_mode(args)
    utils.seed_everything(args.seed + utils.get_rank())
    resolve_data_set(args)
    weights_args = utils.saved_args(weights_file(args))
    model_factory.size_from_checkpoint(args, weights_args, resuming=weights_file(args) not in ('', args.finetune))
    args.preprocessing_from = resolve_preprocessing(args, weights_args)
    if args.data_backend == 'dali':
        dali_loader.check_flags(args)
    if not args.warmup:
        args.warmup_epochs = 0
    optimization.scale_lr(args)
    optimization.warn_warmup_above_lr(args)
    return torch.device(args.device)


def weights_file(args):
    """The checkpoint whose weights the run starts from, by the resume precedence, then --finetune."""
    if args.resume:
        return args.resume
    own = os.path.join(args.output_dir, CHECKPOINT) if args.output_dir else ''
    return own if own and os.path.isfile(own) else args.finetune


def build_models(args, device):
    """The model (with --finetune weights, --attn-only, DeiT's class-head-only rule) and its EMA."""
    model = model_factory.build_model(args)
    if args.finetune:
        model_factory.load_finetune_weights(model, args.finetune)
    if args.attn_only:
        model_factory.attention_only(model, args.model)
    model_factory.train_class_head_only(model, args)
    model.to(device)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
    return model, model_ema


def build_train_state(args, model, model_ema, n_updates, device, stages=()):
    """`stages`: the run plan's (schedules.Stage), whose sizes EViT's keep-rate schedule looks at."""
    optimizer = optimization.build_optimizer(args, model, device)
    state = engine.TrainState(
        optimizer=optimizer, lr_scheduler=optimization.build_scheduler(args, optimizer, n_updates),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16'), amp_dtype=amp_dtype(args),
        mixup_fn=optimization.build_mixup(args), finish_batch=device_finish(args, device, is_train=True),
        model_ema=model_ema, accum_iter=args.accum_iter, clip_grad=args.clip_grad, updates_per_epoch=n_updates,
        print_freq=args.print_freq, batch_size=args.batch_size, skip_nonfinite=args.skip_nonfinite,
        train_mode=args.train_mode, cosub=args.cosub)
    if model_factory.is_evit(args.model):
        state.before_update = evit_models.KeepRateSchedule(
            [model] + ([model_ema.module] if model_ema else []), n_updates,
            base_keep_rate(args, model), args.shrink_start_epoch, args.shrink_epochs,
            patch_counts=patch_counts(model, stages) or None)
    return state


def patch_counts(model, stages):
    """Patches per image at every size the stages train and evaluate at."""
    patch = model.patch_embed.patch_size[0]
    return sorted({(size // patch) ** 2 for stage in stages for size in (stage.size, stage.eval_size)})


def base_keep_rate(args, model):
    """EViT's keep rate at the end of its warm-up."""
    return args.base_keep_rate or min(model.keep_rates)


def compiled_graphs_bound(args, model, stages):
    """At most how many graphs torch.compile makes for the training model: one per stage shape (size and batch);
    for EViT, times one per set of kept-token counts its keep-rate schedule passes through."""
    shapes = len({(stage.size, stage.batch) for stage in stages})
    if not model_factory.is_evit(args.model):
        return shapes
    base = base_keep_rate(args, model)
    changes = sum(a - b for n in patch_counts(model, stages)
                  for a, b in zip(model.kept_token_counts(n, 1.0), model.kept_token_counts(n, base)))
    return shapes * (1 + changes)


def plan_shape(args, sizes, budget=None):
    return schedules.RunPlan(optimization.run_epochs(args), args.input_size, args.batch_size, sizes, budget,
                             args.multisize_batch, args.eval_on_final_size)


def build_plan(args, sizes, clock, train_state, n_updates):
    """The run plan; under a budget or --multisize-batch the LR follows the plan's progress, not the update count."""
    budget = schedules.Budget(args.time_budget, clock) if args.time_budget else None
    plan = plan_shape(args, sizes, budget)
    if budget is not None or args.multisize_batch:
        train_state.lr_scheduler = schedules.ProgressLR(train_state.lr_scheduler, plan.epochs * n_updates,
                                                        plan.lr_progress)
    return plan


def check_something_to_do(args, resume_path):
    if not resume_path and not args.eval and not args.time_budget and args.start_epoch >= optimization.run_epochs(args):
        raise UserError(f'--start_epoch {args.start_epoch} leaves nothing to train in --epochs {args.epochs} and '
                        'there is no checkpoint to resume; lower --start_epoch or raise --epochs')
    if args.eval and not (resume_path or args.finetune or args.pretrained):
        raise UserError('--eval needs weights to score, and there is no checkpoint: pass --resume FILE, an '
                        '--output_dir that holds checkpoint.pth, --finetune FILE or --pretrained')
    if args.use_ema and not (args.eval and resume_path):
        raise UserError("--use-ema scores a checkpoint's EMA weights: use it with --eval and --resume FILE (or an "
                        '--output_dir that holds checkpoint.pth)')


def lock_output_dir(args, device):
    """One run per output folder: rank 0 holds its lock from before the checkpoint is read until the run ends; every
    rank stops when it cannot. A folder not made yet is locked when prepare_output_dir makes it."""
    holder = ''
    if args.output_dir and not args.eval and utils.is_main_process() and os.path.isdir(args.output_dir):
        holder = take_lock(args.output_dir)
    if utils.any_rank([bool(holder)], device)[0]:
        raise folder_in_use(args.output_dir, holder or 'see rank 0')


def folder_in_use(folder, holder):
    return UserError(f'--output_dir {folder} is in use by another run ({holder}); wait for it to end, or pass '
                     'another --output_dir')


def take_lock(folder):
    """'' when this process holds the folder's lock (or the file system has no locks, said in a warning), else who
    holds it."""
    holder = utils.lock_folder(folder)
    if holder == 'unsupported':
        print(f'| warning: {folder} cannot be locked (its file system has no locks); make sure no other run '
              'writes there', flush=True)
        return ''
    return holder


def prepare_output_dir(args):
    if not args.output_dir or not utils.is_main_process():
        return
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f'--output_dir {args.output_dir} cannot be created ({e.strerror}); pass a folder you can '
                        'write to') from e
    holder = take_lock(args.output_dir)
    if holder:
        raise folder_in_use(args.output_dir, holder)
    utils.remove_stale_temp_files(args.output_dir, (CHECKPOINT, BEST_CHECKPOINT))


def wrap_for_training(args, model, device, stages):
    train_model = model
    if args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    if args.compile:
        allow_recompiles(compiled_graphs_bound(args, model, stages))
        train_model = torch.compile(train_model, backend=args.compile_backend)
    return train_model


def report_compiles(args):
    """With --compile: how many graphs dynamo made, and whether any frame ran eagerly past its recompile limit."""
    if not args.compile:
        return
    from torch._dynamo.utils import counters
    eager = sum(n for reason, n in counters['unimplemented'].items() if 'recompile limit' in reason.lower())
    utils.log(f'| torch.compile: {counters["stats"]["unique_graphs"]} graphs compiled, {eager} frames fell back to '
              'eager at the recompile limit')


def allow_recompiles(graphs):
    """Let dynamo keep `graphs` compiled versions of the model: past its limit (8 by default) it would run the
    model eager from then on, silently, as a 13-size schedule would at its 9th size."""
    import torch._dynamo.config as dynamo
    name = 'recompile_limit' if hasattr(dynamo, 'recompile_limit') else 'cache_size_limit'  # torch < 2.6
    setattr(dynamo, name, max(getattr(dynamo, name), graphs + 1))
    if hasattr(dynamo, 'accumulated_recompile_limit'):
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * (graphs + 1))


def print_run_line(args, model, n_parameters, dataset_train, dataset_val, budget, n_updates):
    plan = f'{args.time_budget} h budget' if budget else f'{n_updates} updates per epoch'
    total = sum(p.numel() for p in model.parameters())
    trained = '' if total == n_parameters else f' ({total / 1e6:.2f}M in all)'
    print(f'| {args.model}: {n_parameters / 1e6:.2f}M trained parameters{trained}, {len(dataset_train)} train / '
          f'{len(dataset_val)} val images, {args.nb_classes} classes, {plan}, '
          f'lr {args.lr:.3e}, amp {args.amp}', flush=True)
    print(f'| sampler: {sampler_description(args)}', flush=True)
    print_preprocessing(args)


def print_preprocessing(args):
    utils.log(f'| preprocessing: {args.input_size} px (from {args.input_size_from}), mean {args.mean}, std {args.std}, '
              f'eval crop {args.eval_crop_ratio}, {args.interpolation} resize (from {args.preprocessing_from})')


# ---------------------------------------------------------------- logging

def start_log(args, resumed_from):
    """log.txt's header and the TensorBoard writer (rank 0 with an output_dir, else None). A torn last line that a
    crash left is cut off first; a log that cannot be written at the start is a UserError."""
    if not args.output_dir or not utils.is_main_process():
        return None
    path = os.path.join(args.output_dir, 'log.txt')
    header = {'config': dict(vars(args)), 'git': utils.git_hash(), 'versions': utils.library_versions(),
              'resumed_from': resumed_from or None, 'recipe': args.config or None, 'command': ' '.join(sys.argv)}
    try:
        torn = utils.cut_torn_last_line(path)
        utils.append_json_line(path, header)
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(os.path.join(args.output_dir, 'tb'), purge_step=args.start_epoch)
    except OSError as e:
        raise UserError(f'cannot write the run log in {args.output_dir} ({e.strerror or e}); free space or fix '
                        'permissions, then run again') from e
    if torn:
        print(f'| {path}: cut off a torn last line ({torn} bytes) that an interrupted write left', flush=True)
    return RunLog(path, tb)


class RunLog:
    """The epoch lines of log.txt and TensorBoard. A write that fails (a full disk) is a warning and the run goes on:
    the checkpoints matter more, and log.txt keeps whole lines only."""

    def __init__(self, path, tb):
        self.path, self.tb = path, tb

    def epoch(self, stats):
        try:
            utils.append_json_line(self.path, stats)
        except OSError as e:
            print(f'| warning: could not add epoch {stats["epoch"]} to {self.path} ({e.strerror or e}); training goes '
                  'on', flush=True)
        try:
            for key, value in stats.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, stats['epoch'])
            self.tb.flush()
        except OSError as e:
            print(f'| warning: could not write epoch {stats["epoch"]} to TensorBoard ({e.strerror or e}); training '
                  'goes on', flush=True)


def report_skipped_files(*splits):
    for dataset in splits:
        skipped = getattr(dataset, 'skipped', [])
        if skipped and utils.is_main_process():
            more = f' and {len(skipped) - 5} more' if len(skipped) > 5 else ''
            print(f'| {dataset.root}: skipped {"; ".join(skipped[:5])}{more}', flush=True)


# ---------------------------------------------------------------- main

def main(args):
    if not args.eval:  # evaluation writes nothing it needs: a read-only run folder is fine
        check_output_dir(args.output_dir)
    utils.end_workers_at_exit()
    device = resolve_config(args)
    lock_output_dir(args, device)
    sizes = schedules.size_schedule_from_flags(args)
    if optimization.uses_mixup(args):
        plan_shape(args, sizes).check_even_batches()
    dataset_train, class_names = build_dataset(True, args, uint8=True)
    dataset_val, _ = build_dataset(False, args, uint8=True)
    report_skipped_files(dataset_train, dataset_val)
    args.nb_classes = classes_of_data(args, class_names)
    model, model_ema = build_models(args, device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loader_val = build_val_loader(args, dataset_val)
    n_updates = optimization.updates_per_epoch(args, len(dataset_train))
    stages = plan_shape(args, sizes).stages()
    train_state = build_train_state(args, model, model_ema, n_updates, device, stages)
    criterion = losses.build_criterion(args, model, train_state.mixup_fn is not None, device)
    if args.test_speed or args.only_test_speed:
        report_speed(args, model, device)
        if args.only_test_speed:
            return

    resume_path, found = find_resume(args, class_names)
    start = (args.start_epoch, 0, 0.0, None, 0.0)  # epoch, step in it, best accuracy, metric sums, clock
    if resume_path:
        start = resume(args, resume_path, model, train_state, model_ema, class_names, ckpt=found)
        args.start_epoch = start[0]
    check_something_to_do(args, resume_path)
    eval_kwargs = dict(device=device, amp_dtype=amp_dtype(args), distributed=args.distributed and args.dist_eval,
                       finish_batch=device_finish(args, device, is_train=False))
    if args.eval:
        print_preprocessing(args)
        stats = engine.evaluate(loader_val, model, **eval_kwargs)
        write_eval_results(args, stats, resume_path or args.finetune or 'pretrained')
        save_keep_masks(args, model, dataset_val, device, class_names)
        return
    prepare_output_dir(args)
    run_log = start_log(args, resume_path)
    clock = schedules.Clock(offset=start[4])
    plan = build_plan(args, sizes, clock, train_state, n_updates)
    writer = CheckpointWriter(args, model, train_state, model_ema, class_names, clock, max_accuracy=start[2],
                              resumed=bool(resume_path))
    train_state.after_update = UpdateHook(writer, utils.StopSignal(), plan.budget, train_state, device,
                                          args.save_every, len(dataset_val) * (2 if model_ema else 1))
    if utils.is_main_process():
        print_run_line(args, model, n_parameters, dataset_train, dataset_val, plan.budget, n_updates)
    if plan.over(args.start_epoch):
        utils.log(f'| nothing left to train: the checkpoint finished epoch {args.start_epoch - 1} '
                  f'({utils.format_seconds(clock.elapsed())} of training)')
        engine.evaluate(loader_val, model, **eval_kwargs)
        return
    train_model = wrap_for_training(args, model, device, plan.stages())
    loops = Loops(train_model, model, model_ema, criterion, train_state, eval_kwargs, n_parameters)
    stopped = train(args, plan, loops, writer, (dataset_train, dataset_val, loader_val), start, run_log)
    if stopped:
        return
    report_compiles(args)
    utils.log(f'| training time {utils.format_seconds(clock.elapsed())}; max accuracy {writer.best:.2f}%')
    save_keep_masks(args, model, dataset_val, device, class_names)


def write_eval_results(args, stats, weights):
    """--eval's figures as output_dir/eval.json, where the folder can be written (rank 0); a line says where."""
    if not args.output_dir or not utils.is_main_process():
        return
    path = os.path.join(args.output_dir, 'eval.json')
    result = dict(stats, weights=weights, data_set=args.data_set, data_path=args.data_path,
                  input_size=args.input_size, mean=args.mean, std=args.std, crop_pct=args.eval_crop_ratio,
                  interpolation=args.interpolation)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        utils.write_json_atomically(path, result)
    except OSError as e:
        print(f'| eval.json not written: {args.output_dir} cannot be written ({e.strerror or e})', flush=True)
        return
    print(f'| results in {path}', flush=True)


def save_keep_masks(args, model, dataset_val, device, class_names):
    """EViT's mask pictures (--visualize-mask), drawn from normalised images at the evaluation size."""
    if args.visualize_mask:
        dataset_val.transform = build_transform(False, args)
        visualize.save_keep_masks(model, dataset_val, args.output_dir, args.n_visualization, device, class_names,
                                  mean=args.mean, std=args.std)


def classes_of_data(args, class_names):
    """The class count, from the data set; --num-classes (timm's flag) must agree with it."""
    if args.num_classes is not None and args.num_classes != len(class_names):
        raise UserError(f'--num-classes {args.num_classes}, but the data set has {len(class_names)} classes; leave '
                        '--num-classes out (the classes come from the data) or point --data-path at the right data')
    return len(class_names)


class Loops(NamedTuple):
    """What the train and eval loops run on."""
    train_model: torch.nn.Module  # wrapped in DDP / compiled as asked
    model: torch.nn.Module
    model_ema: object
    criterion: torch.nn.Module
    state: engine.TrainState
    eval_kwargs: dict
    n_parameters: int


def train(args, plan, loops, writer, data, start, run_log):
    """The epoch loop, from `start` until the plan is over. Returns True when a stop signal ended it."""
    dataset_train, dataset_val, loader_val = data
    epoch, step, _, metrics, _ = start
    stage, loader_train = None, None
    while not plan.over(epoch):
        timer = utils.Timer()
        next_stage = plan.stage(epoch)  # once: under a budget it follows the clock
        if next_stage != stage:
            previous, stage = stage, next_stage
            loader_train, loader_val = enter_stage(args, dataset_train, dataset_val, stage, previous, loader_val)
            loops.state.updates_per_epoch = optimization.updates_per_epoch(args, len(dataset_train), stage.batch)
            loops.state.batch_size = stage.batch
        plan.epoch_started(epoch, loops.state.updates_per_epoch)
        loader_train.sampler.set_epoch(epoch, start=step * stage.batch * args.accum_iter)
        train_stats, stopped = engine.train_one_epoch(loops.train_model, loops.criterion,
                                                      DevicePrefetcher(loader_train, loops.eval_kwargs['device']),
                                                      loops.eval_kwargs['device'], epoch, loops.state, start_step=step,
                                                      start_metrics=metrics)
        if stopped and writer.last.get('signalled'):
            utils.log(f'| stopped by signal in epoch {epoch}; checkpoint saved, run the same command to resume')
            return True
        finish = utils.Timer()
        stats = evaluate_and_save(args, loops, loader_val, writer, epoch, stopped)
        if run_log is not None:
            run_log.epoch(epoch_stats(stats, train_stats, loops, timer, writer.clock, stage))
        if plan.budget is not None:
            plan.budget.note_finish_cost(finish.elapsed())
            if stopped:
                break
        step, metrics, epoch = 0, None, epoch + 1
    return False


def enter_stage(args, dataset_train, dataset_val, stage, previous, loader_val):
    """Loaders for a (train size, batch, eval size) stage: the one stage of a plain run, or a multi-size step."""
    train_args, eval_args = at_size(args, stage.size), at_size(args, stage.eval_size)
    dataset_train.transform = build_transform(True, train_args, uint8=True)  # the pil backend's
    if hasattr(dataset_train, 'loader'):  # image files: JPEGs decoded only as far as their crop needs
        dataset_train.loader = loader_for(dataset_train.transform)
    if previous is None or stage.eval_size != previous.eval_size:
        dataset_val.transform = build_transform(False, eval_args, uint8=True)
        loader_val = build_val_loader(eval_args, dataset_val)
    if utils.is_main_process() and (stage.size, stage.batch) != (args.input_size, args.batch_size):
        print(f'| training at {stage.size} px, batch {stage.batch}; evaluating at {stage.eval_size} px', flush=True)
    return build_train_loader(train_args, dataset_train, stage.batch), loader_val


def evaluate_and_save(args, loops, loader_val, writer, epoch, stopped):
    """Evaluate after an epoch (or where the budget stopped it) and checkpoint. Returns the epoch's test entries."""
    models = {'': loops.model, **({'EMA ': loops.model_ema.module} if loops.model_ema is not None else {})}
    scored = engine.evaluate_models(DevicePrefetcher(loader_val, loops.eval_kwargs['device']), models,
                                    **loops.eval_kwargs)
    test_stats = scored['']
    stats = {'test_loss': test_stats['loss'], 'test_acc1': test_stats['acc1'], 'test_acc5': test_stats['acc5'],
             'epoch': epoch, 'skipped_val_images': test_stats['skipped_images']}
    if loops.model_ema is not None:
        stats['test_ema_acc1'], stats['test_ema_loss'] = scored['EMA ']['acc1'], scored['EMA ']['loss']
    best = writer.save_epoch_end(epoch, test_stats['acc1'], stopped)
    if stopped:
        stats['updates_done'] = writer.last['done']
    stats['max_accuracy'] = best
    utils.log(f'| epoch {epoch}: acc1 {test_stats["acc1"]:.2f}% (max {best:.2f}%)')
    return stats


def epoch_stats(stats, train_stats, loops, timer, clock, stage):
    """The epoch's log line: DeiT's keys, then time, speed, size and what was skipped."""
    stats.update(train_lr=train_stats['lr'], train_loss=train_stats['loss'], n_parameters=loops.n_parameters,
                 epoch_seconds=timer.elapsed(), elapsed_seconds=clock.elapsed(),
                 train_images_per_sec=train_stats['images_per_sec'], train_size=stage.size, batch_size=stage.batch,
                 skipped_nonfinite=int(train_stats['skipped_nonfinite']),
                 skipped_images=int(train_stats['skipped_images']))
    if hasattr(loops.model, 'keep_rates'):  # EViT
        stats['keep_rate'] = min(loops.model.keep_rates)
    return stats


def one_line(error):
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback (whose last
    line starts with the exception's qualified name, as in 'datasets.BadImageError: unreadable image ...')."""
    last = [line for line in str(error).strip().splitlines() if line.strip()][-1]
    match = re.match(r'[A-Za-z_][\w.]*(?:Error|Exception): (.*)', last)
    return match.group(1) if match else last


def cli(argv=None):
    parser = get_args_parser()
    try:
        args = parse_args(argv, parser)
        check_flag_ranges(args, parser)
        note_ignored_flags(args)
        main(args)
    except UserError as e:
        utils.exit_with_error(one_line(e))
    except engine.NonFiniteLossError as e:
        utils.exit_with_error(e, code=1)
    except KeyboardInterrupt:  # before training starts; once it has, Ctrl-C saves and stops (utils.StopSignal)
        print('interrupted before training started; nothing was saved', file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        utils.end_workers()  # before exit: a worker still reading would keep the process from ending
        utils.release_folder_locks()
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    cli()
