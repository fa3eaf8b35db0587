"""Checkpoints of a run: what they hold, where a run resumes from, and how they are written (rank 0 only)."""
import json
import math
import os
import shutil
import time

import torch
from timm.layers import resample_abs_pos_embed

import engine
import model_parts
import models  # noqa: F401 - each family registers the published checkpoint layouts it reads
import optimization
import utils
from utils import UserError

CHECKPOINT = 'checkpoint.pth'
BEST_CHECKPOINT = 'best_checkpoint.pth'
# Config entries that must agree before a checkpoint in output_dir is taken as this run's own.
RUN_IDENTITY = ('model', 'data_set', 'input_size', 'nb_classes')


def check_output_dir(path):
    """UserError, before anything is written, when --output_dir cannot be a writable folder: it is a file, lies under
    a file, or its nearest existing folder cannot be written."""
    if not path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        under = '' if existing == os.path.abspath(path) else f' lies under {existing}, which'
        raise UserError(f'--output_dir {path}{under} is a file, not a folder; pass a folder path')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'--output_dir {path} cannot be written ({existing} is not writable); pass a folder you '
                        'can write to')


def find_resume(args, class_names):
    """Resume precedence: --resume, else output_dir/checkpoint.pth of this same run, else a fresh start.

    Returns (path or '', the checkpoint when it was read here, else None), so that resume() need not read it again."""
    if args.resume:
        return args.resume, None
    if not args.output_dir:
        return '', None
    path = os.path.join(args.output_dir, CHECKPOINT)
    if not os.path.isfile(path):
        return '', None
    if args.eval:
        return path, None
    try:
        ckpt = utils.load_checkpoint(path)
    except UserError as e:
        if not args.overwrite:
            raise UserError(f'{e}; to start afresh, add --overwrite (the file is kept aside)') from e
        aside = f'{path}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}'
        if utils.is_main_process():
            os.replace(path, aside)
        utils.log(f'| --overwrite: {path} is unreadable; kept aside as {aside}, starting afresh')
        return '', None
    config = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    difference = identity_difference(config, vars(args), ckpt.get('class_names'), class_names)
    if not difference:
        return path, ckpt
    if args.overwrite:
        utils.log(f'| --overwrite: starting afresh; {path} will be replaced')
        return '', None
    raise UserError(f'{args.output_dir} holds the checkpoint of another run ({difference}); '
                    'choose another --output_dir, pass --resume to continue that run, or add --overwrite')


def identity_difference(saved, current, saved_classes, classes):
    """What makes a checkpoint another run's: the first differing identity entry or class names; '' if none."""
    for key in RUN_IDENTITY:
        if saved.get(key) != current.get(key):
            return f'{key} {saved.get(key)!r} there, {current.get(key)!r} here'
    return class_names_difference(saved_classes, classes)


def class_names_difference(saved, current):
    if saved is None or list(saved) == list(current):
        return ''
    pairs = [(a, b) for a, b in zip(saved, current) if a != b][:3]
    return 'other class names: ' + ', '.join(f'{a!r} there, {b!r} here' for a, b in pairs)


def load_weights(model, path, role, key='model', finetune=False, fix='pass a checkpoint of this model', ckpt=None,
                 report=utils.log):
    """Load the weights in `path` into `model`, the one reader behind --resume, --finetune, --teacher-path, the hub's
    checkpoint_path and predict: our checkpoints and DeiT's, plain state dicts, .safetensors files and URLs, all read
    with weights_only, in our layout or in a family's published one (model_parts.read_layout; `report` gets one line
    naming a published layout it read).
    With `finetune`, a classifier of another class count stays newly initialised and the position embedding is
    resized to the model's grid. One fit check, one message: `role PATH does not fit MODEL: the first tensor that
    does not fit; fix`. `ckpt`: the file's contents when the caller has read them already. Returns (the checkpoint
    dict, the names left newly initialised)."""
    ckpt = utils.load_checkpoint(path) if ckpt is None else ckpt
    saved = dict(utils.model_weights(ckpt, path, key))
    layout, state = model_parts.read_layout(saved, model.state_dict())
    if finetune:
        state = adapt_for_finetune(model, state)
    problem = fit_problem(model.state_dict(), state, allow_missing=finetune, file_names=renames(saved, state))
    name = getattr(model, 'default_cfg', {}).get('architecture') or type(model).__name__
    if problem:
        read_as = '' if layout == model_parts.OWN_LAYOUT else f'read as the {layout} layout, '
        raise UserError(f'{role} {path} does not fit {name}: {read_as}{problem}; {fix}')
    result = model.load_state_dict(state, strict=not finetune)
    if layout != model_parts.OWN_LAYOUT:
        report(f'| {role} {path}: read as the {layout} layout, mapped onto {name}')
    return ckpt, result.missing_keys


def fit_problem(own, state, allow_missing=False, file_names=None):
    """The first reason `state` does not load into a model whose state dict is `own`, or ''. file_names: the name in
    the file of each tensor the layout renamed, told beside ours."""
    def named(key):
        return f'{key} ({file_names[key]} in the file)' if key in (file_names or {}) else key
    for key, value in state.items():
        if key not in own:
            return f'it holds {named(key)}, which the model lacks'
        if tuple(value.shape) != tuple(own[key].shape):
            return f'{named(key)} is {tuple(value.shape)} there and {tuple(own[key].shape)} here'
    missing = [key for key in own if key not in state]
    if missing and not allow_missing:
        return f'it lacks {missing[0]}' + (f' and {len(missing) - 1} more' if len(missing) > 1 else '')
    return ''


def renames(saved, state):
    """Our name -> the file's, for each tensor of `saved` that `state` holds under another name."""
    file_name = {id(value): key for key, value in saved.items()}
    return {key: file_name[id(value)] for key, value in state.items()
            if id(value) in file_name and file_name[id(value)] != key}


def adapt_for_finetune(model, state):
    """Drop a classifier of another class count; match a distillation token; resize the position embedding to the
    model's patch grid."""
    own = model.state_dict()
    state = match_distillation_token(own, state)
    for key in [k for k in state if k.startswith(('head.', 'head_dist.'))]:
        if key in own and state[key].shape != own[key].shape:
            utils.log(f'| finetune: dropping {key} {tuple(state[key].shape)} (model has {tuple(own[key].shape)})')
            del state[key]
    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape:
        prefix = 0 if getattr(model, 'no_embed_class', False) else model.num_prefix_tokens
        new_grid = model.patch_embed.grid_size
        old_side = int(math.sqrt(state['pos_embed'].shape[1] - prefix))
        state['pos_embed'] = resample_abs_pos_embed(state['pos_embed'], new_size=list(new_grid),
                                                    old_size=[old_side, old_side], num_prefix_tokens=prefix)
        utils.log(f'| finetune: position embedding {old_side}x{old_side} -> {new_grid[0]}x{new_grid[1]}')
    return state


def match_distillation_token(own, state):
    """Fine-tuning between DeiT and distilled DeiT: the file's distillation token (second of the prefix tokens, with its
    position embedding and head) is dropped for a plain model; a distilled model fed a plain file gets the class
    token's position embedding for its new token, whose vector and head start afresh."""
    has_own, has_file = 'dist_token' in own, 'dist_token' in state
    if has_own == has_file or 'pos_embed' not in state or 'cls_token' not in state:
        return state
    pos = state['pos_embed']
    if has_file:
        state = {k: v for k, v in state.items() if k != 'dist_token' and not k.startswith('head_dist.')}
        state['pos_embed'] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        utils.log('| finetune: dropping the distillation token, its position embedding and head (the model has none)')
    else:
        state = dict(state, pos_embed=torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1))
        utils.log('| finetune: the model\'s distillation token starts afresh, at the class token\'s position '
                  'embedding')
    return state


def resume(args, path, model, train_state, model_ema, class_names, ckpt=None):
    """Restore everything a checkpoint holds (`ckpt`: its contents, when find_resume has read them).

    Returns (start_epoch, start_step, max_accuracy, epoch_metrics, elapsed_seconds of the run clock).
    """
    ckpt, _ = load_weights(model, path, 'checkpoint', ckpt=ckpt,
                           fix='pass the --model, data set and size it was trained with')
    if args.eval and args.use_ema:
        load_ema_for_eval(model, path, ckpt)
    if args.eval or 'optimizer' not in ckpt:
        utils.log(f'| loaded {"EMA " if args.eval and args.use_ema else ""}weights from {path}')
        return args.start_epoch, 0, 0.0, None, 0.0
    if not isinstance(ckpt.get('epoch'), int):
        raise UserError(f'checkpoint {path} has an optimizer state but no epoch number; pass --finetune {path} '
                        'to start a new run from its weights')
    difference = class_names_difference(ckpt.get('class_names'), class_names)
    if difference:
        raise UserError(f'checkpoint {path} was trained on {difference}; pass --finetune {path} to train its '
                        'weights on this data set')
    train_state.optimizer.load_state_dict(ckpt['optimizer'])
    # The LR is a function of the update count and this run's flags, so the saved scheduler state is kept for
    # the record but not restored: a resume with a longer --epochs stretches the schedule to the new length.
    restore_scaler(train_state.scaler, ckpt.get('scaler'))
    if model_ema is not None and 'model_ema' in ckpt:
        model_ema.module.load_state_dict(ckpt['model_ema'])
    if 'rng' in ckpt:
        utils.set_rng_state(ckpt['rng'])
    epoch, step = ckpt['epoch'] + 1, ckpt.get('step_in_epoch', 0)
    utils.log(f'| resumed from {path} at epoch {epoch}, step {step}')
    metrics = ckpt.get('epoch_metrics') if utils.is_main_process() else None
    return epoch, step, ckpt.get('max_accuracy', 0.0), metrics, ckpt.get('elapsed_seconds', 0.0)


def load_ema_for_eval(model, path, ckpt):
    """--eval --use-ema (timm's validate.py): the checkpoint's EMA weights in place of its model's."""
    if not isinstance(ckpt.get('model_ema'), dict):
        raise UserError(f'checkpoint {path} holds no EMA weights (it was trained with --no-model-ema); evaluate '
                        'its model without --use-ema')
    model.load_state_dict(ckpt['model_ema'])


HISTORY = 'checkpoint_hist.json'


def history_name(epoch):
    return f'checkpoint-{epoch}.pth'


def read_history(folder):
    """The kept epochs of --checkpoint-hist whose files are still there."""
    try:
        with open(os.path.join(folder, HISTORY)) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        return []
    return [e for e in kept if os.path.isfile(os.path.join(folder, history_name(e['epoch'])))]


def link_or_copy(source, target):
    if os.path.exists(target):
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def restore_scaler(scaler, state):
    """The saved loss scale, for a run that scales (--amp fp16). A checkpoint made without one (DeiT's on the CPU
    saves `{}`) leaves the scale at its start value."""
    if not scaler.is_enabled():
        return
    if state:
        scaler.load_state_dict(state)
    else:
        utils.log('| the checkpoint holds no loss scale (it was trained without fp16): the scale starts afresh')


def scaler_state(scaler):
    """The GradScaler's state, or a fresh enabled one's when fp16 is off: DeiT's resume loads it into an enabled
    scaler, which refuses the empty state of a disabled one."""
    return scaler.state_dict() or torch.amp.GradScaler('cpu', enabled=True).state_dict()


class CheckpointWriter:
    """Builds checkpoint dicts and writes them (rank 0 only), honouring --on-save-error."""

    def __init__(self, args, model, train_state, model_ema, class_names, clock, max_accuracy=0.0, resumed=False):
        self.args, self.model, self.state, self.ema, self.class_names = args, model, train_state, model_ema, class_names
        self.clock, self.best = clock, max_accuracy
        # a fresh start (--overwrite) does not rank its epochs against the history of the run the folder held
        self.history = read_history(args.output_dir) if resumed and args.output_dir else []
        best_path = os.path.join(args.output_dir, BEST_CHECKPOINT) if args.output_dir else ''
        if max_accuracy > 0 and best_path and utils.is_main_process() and not os.path.isfile(best_path):
            utils.log(f'| {best_path} is missing: the best accuracy starts again from 0 so that it is rewritten')
            self.best = 0.0
        self.last = {}  # where the last mid-epoch checkpoint was taken: updates done, metric sums, signalled

    def save_mid_epoch(self, epoch, done, metrics, signalled):
        """Checkpoint `done` updates into `epoch` (--save-every, a stop signal or the budget's deadline)."""
        self.last = {'done': done, 'metrics': metrics, 'signalled': signalled}
        self.write(self.build(epoch - 1, done, self.best, metrics), CHECKPOINT)

    def save_epoch_end(self, epoch, acc1, stopped):
        """Checkpoint after an epoch's evaluation (or where the budget stopped it), and best_checkpoint.pth when
        `acc1` is the best so far. Returns the best accuracy that a file holds.

        The best file is written first, and the max accuracy that checkpoint.pth records is only ever one that
        best_checkpoint.pth holds: a kill at any point, or a failed best write, leaves the resumed run a max it
        will beat again rather than a max no file holds."""
        is_best = acc1 > self.best
        if stopped:
            ckpt = self.build(epoch - 1, self.last['done'], max(self.best, acc1), self.last['metrics'])
        else:
            ckpt = self.build(epoch, 0, max(self.best, acc1))
        if is_best and self.write(ckpt, BEST_CHECKPOINT):
            self.best = acc1
        ckpt['max_accuracy'] = self.best
        if self.write(ckpt, CHECKPOINT) and not stopped and self.args.checkpoint_hist:
            self.keep_in_history(epoch, acc1)
        return self.best

    def keep_in_history(self, epoch, acc1):
        """--checkpoint-hist N: checkpoint-EPOCH.pth for the N best epochs, listed best first in checkpoint_hist.json
        (which a resumed run reads). A kept file is a hard link to the checkpoint.pth just written, whose later
        replacement (a rename) leaves it as it is."""
        if not self.args.output_dir or not utils.is_main_process():
            return
        folder = self.args.output_dir
        ranked = sorted(self.history + [{'epoch': epoch, 'acc1': acc1}], key=lambda e: (-e['acc1'], e['epoch']))
        if {'epoch': epoch, 'acc1': acc1} not in ranked[:self.args.checkpoint_hist]:
            return
        try:
            link_or_copy(os.path.join(folder, CHECKPOINT), os.path.join(folder, history_name(epoch)))
            utils.write_json_atomically(os.path.join(folder, HISTORY), ranked[:self.args.checkpoint_hist])
        except OSError as e:
            print(f'| warning: could not keep epoch {epoch} as {history_name(epoch)} ({e.strerror or e})', flush=True)
            return
        self.history = ranked[:self.args.checkpoint_hist]
        for dropped in ranked[self.args.checkpoint_hist:]:
            path = os.path.join(folder, history_name(dropped['epoch']))
            if os.path.isfile(path):
                os.remove(path)

    def build(self, epoch, step_in_epoch, max_accuracy, epoch_metrics=None):
        """epoch: the last completed epoch (DeiT's meaning); step_in_epoch: updates done in epoch + 1."""
        ckpt = {'model': engine.unwrap(self.model).state_dict(), 'optimizer': self.state.optimizer.state_dict(),
                'lr_scheduler': optimization.deit_scheduler_state(self.args, self.state.optimizer),
                'scaler': scaler_state(self.state.scaler),
                'epoch': epoch, 'step_in_epoch': step_in_epoch, 'max_accuracy': max_accuracy,
                'epoch_metrics': epoch_metrics or {}, 'rng': utils.get_rng_state(),
                'elapsed_seconds': self.clock.elapsed(),
                'args': dict(vars(self.args)), 'class_names': list(self.class_names)}
        if self.ema is not None:
            ckpt['model_ema'] = self.ema.module.state_dict()
        return ckpt

    def write(self, ckpt, name):
        """Write ckpt as output_dir/name on rank 0; False when the write failed (and --on-save-error continue)."""
        if not self.args.output_dir or not utils.is_main_process():
            return True
        path = os.path.join(self.args.output_dir, name)
        try:
            utils.save_checkpoint(ckpt, path)
        except OSError as e:
            message = f'could not write {path} ({e.strerror or e}); the previous checkpoint is kept'
            if self.args.on_save_error == 'stop':
                raise UserError(message + '; free space or fix permissions, then run again to resume') from e
            print(f'| warning: {message}', flush=True)
            return False
        return True
