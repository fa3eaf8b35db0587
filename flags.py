"""main.py's flags: the parser, -c/--config recipes (YAML files of flag defaults, timm's convention) and the allowed
range of every numeric flag, checked before anything is built or written."""
import argparse
import copy
import difflib
import math
import os
import re
import sys

import yaml

import localvit_models
from datasets import DATASET_ALIASES, DATASETS
from utils import UserError

# An on/off flag: --name turns it on, --no-name off, so that the command line can undo what a recipe sets.
SWITCH = dict(action=argparse.BooleanOptionalAction, default=False)

class FlagParser(argparse.ArgumentParser):
    """argparse, plus the defaults that depend on other flags (the input size on the model), filled after parsing."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        return with_input_size(parsed), extras


def get_args_parser():
    p = FlagParser('DeiT-style training and evaluation', add_help=False,
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('training')
    g.add_argument('--batch-size', '-b', default=64, type=int, help='images per process per step')
    g.add_argument('--epochs', default=300, type=int, help='epochs of the LR schedule (and of training)')
    g.add_argument('--accum-iter', default=1, type=int, help='micro-batches accumulated per optimizer update')
    g.add_argument('--bce-loss', **SWITCH, help='binary cross-entropy instead of softmax CE')
    g.add_argument('--unscale-lr', **SWITCH, help='do not scale --lr by global batch / 512')
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'],
                   help='autocast precision; auto = bf16 on CUDA, none on CPU')
    g.add_argument('--compile', **SWITCH, help='torch.compile the training model')
    g.add_argument('--compile-backend', default='inductor',
                   help="torch.compile's backend with --compile (aot_eager: the same graphs without code generation, "
                        'to debug recompiles)')
    g.add_argument('--cosub', **SWITCH,
                   help="DeiT's Cosub: co-train two stochastic-depth submodels of the model on each batch (BCE)")
    g.add_argument('--skip-nonfinite', default=0, type=int, metavar='N',
                   help='skip up to N updates whose loss is NaN / inf before stopping; 0 stops at the first')

    g = p.add_argument_group('training on a budget, multi-size training (the 24-hour paper)')
    g.add_argument('--time-budget', type=float, default=None, metavar='HOURS',
                   help='end the run at this wall-clock budget, final evaluation and checkpoint included; the LR '
                        'and size schedules follow the elapsed fraction of it (--epochs then only sets proportions)')
    g.add_argument('--warmup', action=argparse.BooleanOptionalAction, default=True,
                   help='--no-warmup: the same as --warmup-epochs 0')
    g.add_argument('--is-multisize', **SWITCH,
                   help='train at --init-size, growing by 16 x --patch-step px every --epoch-step epochs')
    g.add_argument('--init-size', type=int, default=32, help='first size of --is-multisize')
    g.add_argument('--epoch-step', type=int, default=7,
                   help='epochs per size of --is-multisize (the paper\'s recipe: 5)')
    g.add_argument('--patch-step', type=int, default=1,
                   help='growth of --is-multisize, in 16 px steps (the paper\'s recipe: 2)')
    g.add_argument('--size-schedule', default='', metavar='START:SIZE,...',
                   help="training sizes by epoch ('0:32,5:64') or by fraction of the run ('0:32,0.5:64')")
    g.add_argument('--eval-on-final-size', **SWITCH,
                   help='multi-size: evaluate at --input-size (default: at the current training size)')
    g.add_argument('--multisize-batch', **SWITCH,
                   help='multi-size: scale the batch with (input-size / size)^2, the same pixels per batch')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='NAME',
                   help='any timm model name, or one this repository registers (DHVT, EViT, LocalViT, PatchConvNet, '
                        'the *_micro_* test sizes: scripts/model_table.py lists them)')
    g.add_argument('--input-size', '--img-size', dest='input_size', default=None, type=int,
                   help="image side in pixels (default: a resumed or evaluated checkpoint's, else the model's own: "
                   '224 for DeiT, 16 for the *_micro_* test models)')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    g.add_argument('--drop-path', type=float, default=0.1, metavar='PCT', help='stochastic depth rate')
    g.add_argument('--layer-scale', type=float, default=None, metavar='INIT',
                   help='LayerScale with this initial value (e.g. 1e-5), for ViT-family models')
    g.add_argument('--constant-drop-path', **SWITCH,
                   help='the same --drop-path rate in every block (DeiT III) instead of a linear increase')
    g.add_argument('--patch-embed', default='patch', choices=['patch', 'hmlp'],
                   help="ViT patch embedding: timm's linear patchify, or 3Things' hierarchical-MLP stem")
    g.add_argument('--localvit', **SWITCH,
                   help="the 24-hour paper's improved LocalViT: a DeiT / ViT with a depth-wise conv in each FFN")
    g.add_argument('--localvit-act', default=None, choices=localvit_models.LOCALVIT_ACTS,
                   help='activation (+ channel attention) of the local FFN; default: hs with --localvit, '
                        'hs+se for localvit_* models')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True,
                   help='keep an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.99996, help='EMA decay per update')
    g.add_argument('--model-ema-force-cpu', **SWITCH, help='keep the EMA weights on the CPU')

    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='any timm optimizer name')
    g.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='max gradient norm')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=0.05, help='not applied to norms, biases, '
                   'position embeddings and tokens')
    g.add_argument('--layer-decay', type=float, default=None, metavar='RATE',
                   help="layer-wise LR decay (timm's): each block down from the head trains at RATE x the LR of the "
                        'one above (DeiT III and BEiT fine-tuning)')

    g = p.add_argument_group('learning-rate schedule (stepped every update)')
    g.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER',
                   help='timm scheduler: cosine, tanh, step, multistep, poly')
    g.add_argument('--lr', type=float, default=5e-4, help='for a global batch of 512 (see --unscale-lr)')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                   help='epoch fractions where LR noise starts / ends')
    g.add_argument('--lr-noise-pct', type=float, default=0.67)
    g.add_argument('--lr-noise-std', type=float, default=1.0)
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='LR at the start of the warm-up')
    g.add_argument('--min-lr', type=float, default=1e-5, help='lower bound of the cosine schedule')
    g.add_argument('--decay-epochs', type=float, default=30, help='step schedule period')
    g.add_argument('--warmup-epochs', type=int, default=5, help='0 for no warm-up')
    g.add_argument('--cooldown-epochs', type=int, default=10,
                   help='epochs at --min-lr after the cosine; trained only with --train-cooldown (DeiT stops '
                        'at --epochs, so the cosine spans the whole run)')
    g.add_argument('--train-cooldown', **SWITCH,
                   help="also train the --cooldown-epochs at --min-lr after --epochs, as timm's train.py does")
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, help='step schedule factor')
    g.add_argument('--patience-epochs', type=int, default=10, help='plateau schedule patience (DeiT\'s flag)')

    g = p.add_argument_group('augmentation')
    g.add_argument('--mean', type=float, nargs=3, default=None, metavar='M',
                   help="normalisation mean (timm's flag); default: what the weights were trained with (the "
                        "checkpoint's, or the pretrained cfg's with --pretrained), else ImageNet's")
    g.add_argument('--std', type=float, nargs=3, default=None, metavar='S',
                   help='normalisation standard deviation; default: as --mean')
    g.add_argument('--interpolation', default=None, choices=['bicubic', 'bilinear', 'nearest'],
                   help="resize at evaluation; default: as --mean, else bicubic")
    g.add_argument('--color-jitter', type=float, default=0.3, metavar='PCT',
                   help='colour jitter strength (used when --aa is none)')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                   help='timm auto-augment policy, or "none"')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', type=str, default='bicubic',
                   help='random, bilinear or bicubic')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction, default=True,
                   help='repeated augmentation, under a distributed launch as in DeiT')
    g.add_argument('--three-augment', '--ThreeAugment', dest='ThreeAugment', **SWITCH,
                   help="DeiT III's 3-Augment")
    g.add_argument('--src', **SWITCH, help='simple random crop (with --ThreeAugment)')
    g.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erase probability')
    g.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    g.add_argument('--recount', type=int, default=1, help='random erase count')
    g.add_argument('--resplit', **SWITCH,
                   help="DeiT's flag, accepted and ignored: it splits erasing over augmentation splits, which DeiT's "
                        'recipes never use')

    g = p.add_argument_group('mixup / cutmix')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha; 0 disables')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha; 0 disables')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix ratio bounds')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'])

    g = p.add_argument_group('token reorganisation (EViT models)')
    g.add_argument('--base-keep-rate', '--base_keep_rate', dest='base_keep_rate', type=float, default=None,
                   help="fraction of patch tokens kept at each keep layer; unset: the model's own (0.7)")
    g.add_argument('--fuse-token', '--fuse_token', dest='fuse_token', **SWITCH,
                   help='fuse the dropped tokens into one extra token')
    g.add_argument('--drop-loc', '--drop_loc', dest='drop_loc', default=None, type=str,
                   help="keep layers, e.g. '(3, 6, 9)'; unset: the model's own")
    g.add_argument('--shrink-start-epoch', '--shrink_start_epoch', dest='shrink_start_epoch', default=10, type=int,
                   help='keep every token until this epoch')
    g.add_argument('--shrink-epochs', '--shrink_epochs', dest='shrink_epochs', default=100, type=int,
                   help='epochs of cosine decay of the keep rate from 1 to --base_keep_rate (0: at once)')
    g.add_argument('--test-speed', '--test_speed', dest='test_speed', **SWITCH,
                   help='print inference img/s (batch 64) before training')
    g.add_argument('--only-test-speed', '--only_test_speed', dest='only_test_speed', **SWITCH,
                   help='print inference img/s and exit')

    g.add_argument('--visualize-mask', '--visualize_mask', dest='visualize_mask', **SWITCH,
                   help='EViT: after evaluation, write pictures of the kept / fused patches to output_dir/masks')
    g.add_argument('--n-visualization', '--n_visualization', dest='n_visualization', default=128, type=int,
                   help='how many validation images to draw')

    g = p.add_argument_group('distillation (DeiT)')
    g.add_argument('--teacher-model', default='regnety_160', type=str, metavar='NAME',
                   help='timm name of the teacher')
    g.add_argument('--teacher-path', type=str, default='', help='teacher weights: file, URL or .safetensors')
    g.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'])
    g.add_argument('--distillation-alpha', default=0.5, type=float, help='weight of the distillation term')
    g.add_argument('--distillation-tau', default=1.0, type=float, help='temperature of soft distillation')

    g = p.add_argument_group('fine-tuning')
    g.add_argument('--finetune', '--initial-checkpoint', dest='finetune', default='',
                   help='checkpoint to start from; head and position embedding are adapted to this run')
    g.add_argument('--pretrained', **SWITCH,
                   help="start from the weights the model's authors published (downloaded by timm; see README's "
                        'published-weights table)')
    g.add_argument('--attn-only', **SWITCH,
                   help="3Things: train only the attention weights, position embedding and classifier")
    g.add_argument('--train-mode', action=argparse.BooleanOptionalAction, default=True,
                   help='train in train mode; --no-train-mode: in eval mode, no dropout or drop path, BatchNorm '
                        'statistics frozen (DeiT)')

    g = p.add_argument_group('data')
    g.add_argument('--data-path', default=None, type=str, help='dataset root')
    g.add_argument('--data-set', default=None, choices=DATASETS + tuple(DATASET_ALIASES),
                   help='default: IMNET with --data-path, else the embedded DIGITS; DeiT\'s CIFAR is CIFAR100, '
                        'INAT is INAT18')
    g.add_argument('--train-list', default='', metavar='FILE',
                   help='LIST data set: lines of "image path relative to --data-path, label"')
    g.add_argument('--val-list', default='', metavar='FILE', help='LIST data set: the validation list')
    g.add_argument('--train-split', default='train',
                   help="WDS: the training split's name in _info.json, or a brace pattern of its shards "
                   "('train-{000000..000127}.tar')")
    g.add_argument('--val-split', default='validation', help='WDS: the validation split, as --train-split')
    g.add_argument('--wds-label-key', default='cls', help="WDS: the member that holds a sample's class index")
    g.add_argument('--wds-index-dir', default=None, metavar='DIR',
                   help='WDS: where the shards\' .idx files are (default: beside the shards; made once by '
                   'scripts/prepare_data.py --index)')
    g.add_argument('--inat-category', default='name',
                   choices=['kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'])
    g.add_argument('--download', **SWITCH, help='let CIFAR10/100 download when missing')
    g.add_argument('--use-lmdb', **SWITCH,
                   help='IMNET / FOLDER: --data-path is an LMDB written by scripts/folder2lmdb.py')
    g.add_argument('--skip-bad-images', **SWITCH,
                   help='skip unreadable image files (counted in the log) instead of stopping')
    g.add_argument('--num-classes', default=None, type=int,
                   help="timm's flag: the classes come from the data set; given, it is checked against them")
    g.add_argument('--fake-size', default=1280, type=int, help='FAKE: training images (val gets a fifth)')
    g.add_argument('--fake-classes', default=1000, type=int, help='FAKE: number of classes')
    g.add_argument('--data-backend', default='pil', choices=['pil', 'dali'],
                   help='pil: CPU workers decode, uint8 batches normalised, erased and mixed on the device; dali: '
                        'NVIDIA DALI decodes and augments (on the GPU; its CPU mode without one); see docs/data.md')
    g.add_argument('--num-workers', '--num_workers', '--workers', '-j', dest='num_workers', default=default_workers(),
                   type=int, help="DataLoader worker processes (DALI threads with --data-backend dali); DeiT's 10, or "
                   'the cores there are when fewer')
    g.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=True,
                   help='pin CPU memory in the DataLoader')

    g = p.add_argument_group('run')
    g.add_argument('-c', '--config', default='', metavar='FILE.yaml',
                   help='recipe: a YAML file of flag values (dest: value); flags on the command line override it')
    g.add_argument('--output-dir', '--output_dir', '--output', dest='output_dir', default='',
                   help='where checkpoints and logs go; empty: save nothing')
    g.add_argument('--device', default='auto', help='cuda, cuda:N, cpu, or auto (cuda when available)')
    g.add_argument('--seed', default=0, type=int, help='seed of every RNG; each rank adds its rank')
    g.add_argument('--resume', default='', help='checkpoint path or URL to resume from')
    g.add_argument('--start-epoch', '--start_epoch', dest='start_epoch', default=0, type=int, metavar='N',
                   help='first epoch when not resuming')
    g.add_argument('--eval', **SWITCH, help='evaluate only')
    g.add_argument('--use-ema', **SWITCH, help="with --eval: score the checkpoint's EMA weights (timm's --use-ema)")
    g.add_argument('--eval-crop-ratio', '--crop-pct', dest='eval_crop_ratio', default=None, type=float,
                   help="center-crop ratio at evaluation; default: the weights' own (see --mean), else DeiT's 0.875")
    g.add_argument('--dist-eval', **dict(SWITCH, default=True),
                   help='split evaluation over ranks, each image scored once (--no-dist-eval: every rank scores all, '
                   'as DeiT)')
    g.add_argument('--print-freq', default=10, type=int, help='progress line every N updates')
    g.add_argument('--save-every', default=0, type=int, metavar='N',
                   help='also checkpoint every N updates inside an epoch (0: at epoch ends only)')
    g.add_argument('--checkpoint-hist', default=0, type=int, metavar='N',
                   help='also keep the N best epochs as checkpoint-EPOCH.pth (timm\'s CheckpointSaver; 0: only '
                   'checkpoint.pth and best_checkpoint.pth, as DeiT)')
    g.add_argument('--on-save-error', default='continue', choices=['continue', 'stop'],
                   help='when a checkpoint cannot be written, keep the last good one and go on, or stop')
    g.add_argument('--overwrite', **SWITCH,
                   help='start afresh in an output_dir that holds another run\'s checkpoint')

    g = p.add_argument_group('distributed')
    g.add_argument('--dist-url', '--dist_url', dest='dist_url', default='env://', help='process-group init method')
    g.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    g.add_argument('--dist-timeout', default=30, type=int, help='minutes before a hung collective fails')
    g.add_argument('--world_size', '--world-size', dest='ignored_world_size', type=int, default=None,
                   help="DeiT's flag, accepted and ignored: the launcher (torchrun, Slurm) sets the world size")
    g.add_argument('--distributed', dest='ignored_distributed', **SWITCH,
                   help="DeiT's flag, accepted and ignored: a distributed launch is found from the launcher")

    g = p.add_argument_group('help')
    g.add_argument('-h', '--help', action='help', help='show this message and exit')
    return p


def default_workers():
    """DeiT's 10 workers, capped at the cores this process may use (more only slows a small machine down, and
    torch warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(10, cores)


def parse_args(argv=None, parser=None):
    """Flags, with a -c/--config FILE.yaml recipe (timm's convention) read first and the command line after it.

    The recipe's entries become command-line tokens placed before the user's, so both take one path through the
    parser (types, choices, ranges) and every flag given on the command line overrides the recipe."""
    parser = parser or get_args_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    path = config_path(argv)
    check_known_flags(argv, parser)
    if not path:
        return parser.parse_args(argv)
    recipe = read_config(path, parser)
    args = parser.parse_args([token for tokens in recipe.values() for token in tokens] + argv)
    given = given_on_command_line(argv, parser)
    if 'data_path' in given and 'data_set' not in given and args.data_set in DATA_SETS_WITHOUT_PATH:
        print(f'| --data-path given: {path}\'s data_set {args.data_set} left out; the data set is found from the '
              'path (pass --data-set to choose it)', flush=True)
        args.data_set = None
    return args


def with_input_size(args):
    """--input-size left unset: the model's own (main.py swaps in a resumed or evaluated checkpoint's)."""
    if not hasattr(args, 'input_size'):
        return args
    args.input_size_from = 'the flags'
    if args.input_size is None:
        import model_factory  # here: the model registry is only needed once flags are parsed
        args.input_size, args.input_size_from = model_factory.native_input_size(args.model)
    return args


DATA_SETS_WITHOUT_PATH = ('DIGITS', 'FAKE')


def note_ignored_flags(args):
    """DeiT's flags that this repository accepts and ignores, said once."""
    ignored = [flag for flag, given in (('--world_size', args.ignored_world_size is not None),
                                        ('--distributed', args.ignored_distributed), ('--resplit', args.resplit))
               if given]
    if ignored:
        print(f'| note: {", ".join(ignored)} accepted for DeiT\'s commands and ignored: the launcher sets the world '
              'size and distributed mode, and erasing has no augmentation splits to follow', flush=True)


def check_known_flags(argv, parser):
    """A flag the parser does not know is a usage error that suggests the nearest one it does."""
    _, unknown = parser.parse_known_args(argv)
    flags = [token.split('=')[0] for token in unknown if token.startswith('-')]
    if not flags:
        return
    close = difflib.get_close_matches(flags[0], list(parser._option_string_actions), n=1, cutoff=0.6)
    parser.error(f'unrecognized argument {flags[0]}' + (f'; did you mean {close[0]}?' if close else ''))


def config_path(argv):
    """The -c/--config FILE of the command line ('' if none); given twice is a UserError."""
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument('-c', '--config', action='append', default=[])
    paths = finder.parse_known_args(argv)[0].config
    if len(paths) > 1:
        raise UserError(f'-c/--config is given {len(paths)} times ({", ".join(paths)}); pass one recipe and put '
                        'further values on the command line')
    return os.path.expanduser(paths[0]) if paths else ''


def given_on_command_line(argv, parser):
    """The dests that argv sets itself."""
    given = copy.deepcopy(parser)
    for action in given._actions:
        action.default = argparse.SUPPRESS
    return set(vars(given.parse_known_args(argv)[0]))


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f'the key {key!r} is given twice',
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path):
    try:
        with open(path, encoding='utf-8') as f:
            return yaml.load(f, Loader=UniqueKeyLoader)
    except OSError as e:
        raise UserError(f'--config {path} cannot be read ({e.strerror}); pass a YAML file of flag: value') from e
    except UnicodeDecodeError as e:
        raise UserError(f'--config {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); '
                        'save it as UTF-8') from e
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        problem = getattr(e, 'problem', None) or type(e).__name__
        raise UserError(f'--config {path} is not valid YAML{where}: {problem}; write one "flag: value" per '
                        'line') from e


def read_config(path, parser):
    """{dest: command-line tokens} from a YAML recipe whose keys are flags without the leading dashes (warmup-epochs,
    warmup_epochs, three-augment or ThreeAugment). Each entry is parsed on its own first, so that a bad one is a
    UserError naming file, key and what the flag takes."""
    values = load_yaml(path)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f'--config {path} is not a mapping of flag: value; write one "flag: value" per line')
    options = recipe_options(parser)
    recipe = {}
    for key, value in values.items():
        name = str(key).replace('-', '_')
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=1)
            raise UserError(f'--config {path}: unknown flag {key!r}'
                            f'{f" (did you mean {close[0]!r}?)" if close else ""}; see python main.py --help')
        action, option = options[name]
        if action.dest == 'config':
            raise UserError(f'--config {path}: a recipe cannot name another recipe ({key!r}); merge the two files')
        if action.dest in recipe:
            raise UserError(f'--config {path}: {key!r} sets {action.option_strings[0]}, which another key of the '
                            'file sets too; keep one of them')
        try:
            recipe[action.dest] = recipe_tokens(action, option, value)
            check_recipe_value(parser, action, recipe[action.dest])
        except (ValueError, argparse.ArgumentError) as e:
            raise UserError(f'--config {path}: {key}: {recipe_problem(e)}') from e
    return recipe


def recipe_options(parser):
    """recipe key -> (action, the option string it names): each option without its dashes, and each dest."""
    options = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            options.setdefault(option.lstrip('-').replace('-', '_'), (action, option))
        options.setdefault(action.dest, (action, action.option_strings[0]))
    return options


def recipe_tokens(action, option, value):
    """The command-line tokens that set `action` to a recipe's `value`, or ValueError saying what it takes."""
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f'{value!r} is not true or false; write true or false, unquoted')
        negated = option.startswith('--no-') and '--' + option[5:] in action.option_strings
        on = value != negated
        return [next(o for o in action.option_strings if o.startswith('--no-') != on)]
    if value is None:
        if action.default is None:
            return []
        raise ValueError(f'has no value; give one, or leave the key out for the default {action.default!r}')
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    items = value if many and isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, (list, dict)) or isinstance(item, bool) or item is None:
            kind = {list: 'a list', dict: 'a mapping'}.get(type(item), repr(item))
            takes = 'one or more values' if many else 'one value'
            raise ValueError(f'{kind} is not what {action.option_strings[0]} takes; write {takes}'
                             f'{", as on the command line" if isinstance(item, dict) else ""}')
    words = [os.path.expanduser(i) if isinstance(i, str) else str(i) for i in items]
    return [action.option_strings[0]] + words if many else [f'{action.option_strings[0]}={words[0]}']


def check_recipe_value(parser, action, tokens):
    """Parse one recipe entry alone (argparse's types and choices), then check its range."""
    if not tokens:
        return
    saved = parser.exit_on_error
    parser.exit_on_error = False  # an ArgumentError to catch, not a usage message and exit
    try:
        args, _ = parser.parse_known_args(tokens)
    finally:
        parser.exit_on_error = saved
    problem = range_problem(action, getattr(args, action.dest))
    if problem:
        raise ValueError(problem)


def recipe_problem(error):
    message = error.message if isinstance(error, argparse.ArgumentError) else str(error)
    hints = {'invalid int value': 'write a whole number', 'invalid float value': 'write a number'}
    hint = next((h for text, h in hints.items() if text in message), '')
    return message + (f'; {hint}' if hint else '')


# ---------------------------------------------------------------- ranges

INF = math.inf
# dest: (low, high, brackets); '[' / ']' include the bound, '(' / ')' exclude it. A flag left at None is not checked.
# --clip-grad 0 means no clipping, as does leaving it out.
FLAG_RANGES = {
    'batch_size': (1, INF, '[)'), 'epochs': (1, INF, '[)'), 'accum_iter': (1, INF, '[)'),
    'skip_nonfinite': (0, INF, '[)'), 'time_budget': (0, INF, '()'),
    'init_size': (1, INF, '[)'), 'epoch_step': (1, INF, '[)'), 'patch_step': (1, INF, '[)'),
    'input_size': (1, INF, '[)'), 'drop': (0, 1, '[)'), 'drop_path': (0, 1, '[)'), 'layer_scale': (0, INF, '()'),
    'model_ema_decay': (0, 1, '[]'), 'opt_eps': (0, INF, '()'), 'opt_betas': (0, 1, '[)'),
    'clip_grad': (0, INF, '[)'), 'momentum': (0, 1, '[]'), 'weight_decay': (0, INF, '[)'), 'lr': (0, INF, '()'),
    'lr_noise': (0, INF, '[)'), 'lr_noise_pct': (0, INF, '[)'), 'lr_noise_std': (0, INF, '[)'),
    'warmup_lr': (0, INF, '[)'), 'min_lr': (0, INF, '[)'), 'decay_epochs': (0, INF, '()'),
    'warmup_epochs': (0, INF, '[)'), 'cooldown_epochs': (0, INF, '[)'), 'decay_rate': (0, 1, '(]'),
    'color_jitter': (0, INF, '[)'), 'smoothing': (0, 1, '[)'), 'hflip': (0, 1, '[]'), 'reprob': (0, 1, '[]'),
    'recount': (1, INF, '[)'), 'mixup': (0, INF, '[)'), 'cutmix': (0, INF, '[)'), 'cutmix_minmax': (0, 1, '(]'),
    'mixup_prob': (0, 1, '[]'), 'mixup_switch_prob': (0, 1, '[]'), 'base_keep_rate': (0, 1, '(]'),
    'shrink_start_epoch': (0, INF, '[)'), 'shrink_epochs': (0, INF, '[)'), 'n_visualization': (1, INF, '[)'),
    'distillation_alpha': (0, 1, '[]'), 'distillation_tau': (0, INF, '()'), 'fake_size': (1, INF, '[)'),
    'fake_classes': (1, INF, '[)'), 'num_workers': (0, INF, '[)'), 'seed': (0, 2 ** 31 - 1, '[]'),
    'start_epoch': (0, INF, '[)'), 'eval_crop_ratio': (0, 1, '(]'), 'mean': (0, 1, '[]'), 'std': (0, INF, '()'),
    'print_freq': (1, INF, '[)'),
    'save_every': (0, INF, '[)'), 'checkpoint_hist': (0, INF, '[)'), 'dist_timeout': (1, INF, '[)'), 'layer_decay': (0, 1, '(]'),
    'patience_epochs': (0, INF, '[)'), 'num_classes': (1, INF, '[)'), 'ignored_world_size': (1, INF, '[)'),
}
# list-valued flags: how many values each takes (Adan has three betas; timm's Mixup takes a (min, max) pair).
FLAG_LENGTHS = {'opt_betas': (2, 3), 'cutmix_minmax': (2,), 'lr_noise': (1, 2)}
DEVICE = re.compile(r'(auto|cpu|cuda(:\d+)?)$')


def in_range(value, low, high, brackets):
    if not math.isfinite(value):
        return False
    above = value >= low if brackets[0] == '[' else value > low
    below = value <= high if brackets[1] == ']' else value < high
    return above and below


def describe(low, high, brackets):
    if high == INF:
        return f'a value {">=" if brackets[0] == "[" else ">"} {_number(low)}'
    return f'a value in {brackets[0]}{_number(low)}, {_number(high)}{brackets[1]}'


def _number(x):
    return str(int(x)) if float(x).is_integer() else f'{x:g}'


def check_flag_ranges(args, parser):
    """UserError naming the first flag whose value is out of its range (or is nan / inf, or a list of the wrong
    length), and what it takes."""
    for action in parser._actions:
        problem = range_problem(action, getattr(args, action.dest, None))
        if problem:
            raise UserError(problem)
    if not DEVICE.match(args.device):
        raise UserError(f'--device {args.device} is not a device name; pass auto, cpu, cuda or cuda:N')


def range_problem(action, value):
    """What is wrong with `value` for `action` by FLAG_RANGES and FLAG_LENGTHS, or ''."""
    if action.dest not in FLAG_RANGES or value is None:
        return ''
    flag = action.option_strings[0]
    low, high, brackets = FLAG_RANGES[action.dest]
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if not in_range(item, low, high, brackets):
            return f'{flag} {_number(item)} is out of range; pass {describe(low, high, brackets)}'
    lengths = FLAG_LENGTHS.get(action.dest)
    if lengths and len(value) not in lengths:
        counts = ' or '.join(str(n) for n in lengths)
        return f'{flag} takes {counts} values, not {len(value)}; pass {counts}'
    return ''
