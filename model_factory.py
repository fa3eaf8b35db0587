"""From flags to the model: family options (--layer-scale, --localvit, EViT), fine-tuning weights, EViT's keep-rate
schedule, and the training criterion with its distillation teacher."""
import ast
import difflib

import huggingface_hub
import timm
from huggingface_hub.errors import HfHubHTTPError
from timm.layers import DropPath

import checkpoints
import localvit_models
import models  # registers our model families in timm
import utils
from utils import UserError


def model_options(args):
    """Keyword arguments for the model factory from the family flags (--layer-scale, --localvit...)."""
    options = {}
    if args.layer_scale is not None:
        options['init_values'] = args.layer_scale
    if args.localvit:
        if args.model.startswith('localvit_'):
            raise UserError(f'--localvit turns a DeiT / ViT into the improved LocalViT; {args.model} already is a '
                            'LocalViT: drop --localvit or pick a deit_* / vit_* model')
        act = args.localvit_act or 'hs'
        if act not in localvit_models.IMPROVED_LOCALVIT_ACTS:
            raise UserError(f'--localvit-act {act} is not available with --localvit; '
                            f'choose one of {", ".join(localvit_models.IMPROVED_LOCALVIT_ACTS)}')
        prefix = 2 if 'distilled' in args.model else 1
        options.update(localvit_models.improved_localvit_options(act=act, num_prefix_tokens=prefix))
    elif args.localvit_act is not None:
        if not args.model.startswith('localvit_'):
            raise UserError(f'--localvit-act applies to localvit_* models or with --localvit; {args.model} is neither')
        options['act'] = args.localvit_act
    if args.patch_embed == 'hmlp':
        options['embed_layer'] = models.HMLPPatchEmbed
    options.update(evit_options(args))
    if args.is_multisize or args.size_schedule:
        options['dynamic_img_size'] = True  # one position embedding, interpolated to each training size
    return options


def is_evit(name):
    return timm.is_model(name) and timm.models.get_arch_name(name) in timm.list_models(module='evit_models')


def evit_options(args):
    given = {'keep_rate': args.base_keep_rate, 'fuse_token': args.fuse_token or None,
             'drop_loc': parse_drop_loc(args.drop_loc)}
    given = {k: v for k, v in given.items() if v is not None}
    if args.visualize_mask and not (is_evit(args.model) and args.output_dir):
        raise UserError('--visualize_mask draws the keep masks of an EViT model into --output_dir; '
                        'use an evit_* model and pass --output_dir')
    if given and not is_evit(args.model):
        raise UserError(f'--base_keep_rate / --fuse_token / --drop_loc apply to EViT models; {args.model} is not one '
                        '(try evit_small_patch16_224)')
    return given


def parse_drop_loc(text):
    if text is None:
        return None
    try:
        value = ast.literal_eval(text)
        return tuple(int(i) for i in (value if isinstance(value, (tuple, list)) else (value,)))
    except (ValueError, SyntaxError, TypeError) as e:
        raise UserError(f"--drop_loc {text!r} is not a list of block indices; write it as '(3, 6, 9)'") from e


def flag_names(options):
    names = {'init_values': '--layer-scale', 'mlp_layer': '--localvit', 'qkv_bias': '--localvit',
             'act': '--localvit-act',
             'keep_rate': '--base_keep_rate', 'fuse_token': '--fuse_token', 'drop_loc': '--drop_loc',
             'dynamic_img_size': '--is-multisize / --size-schedule', 'embed_layer': '--patch-embed hmlp'}
    return ' / '.join(dict.fromkeys(names[k] for k in options))


def native_input_size(name):
    """(the model's own input side from its cfg, 'NAME's cfg'), else (DeiT's 224, "DeiT's default")."""
    native = timm.get_pretrained_cfg_value(name, 'input_size') if timm.is_model(name) else None
    return (native[-1], f"{name}'s cfg") if native else (224, "DeiT's default")


def size_from_checkpoint(args, weights_args, resuming):
    """An --input-size not given takes the size a resumed or evaluated checkpoint of this model was trained at."""
    saved = weights_args.get('input_size') if weights_args.get('model') == args.model else None
    if args.input_size_from != 'the flags' and (resuming or args.eval) and isinstance(saved, int):
        args.input_size, args.input_size_from = saved, 'the checkpoint'


SIZE_OPTIONS = ('dynamic_img_size', 'img_size')  # what models that take any input size (convnets, DHVT) lack


def create_at_size(name, input_size, pretrained=False, **kwargs):
    """timm.create_model at `input_size`: img_size is passed only where it differs from the model's native size,
    and dropped (with dynamic_img_size) for models that take any size as they are (convnets, DHVT)."""
    native = timm.get_pretrained_cfg_value(name, 'input_size')
    if native is not None and native[-1] != input_size:
        kwargs['img_size'] = input_size
    return _create(name, pretrained, kwargs)


def _create(name, pretrained, kwargs):
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        unsupported = [k for k in SIZE_OPTIONS if k in kwargs and f"'{k}'" in str(e)]
        if not unsupported:
            raise
        return _create(name, pretrained, {k: v for k, v in kwargs.items() if k not in unsupported})


def published_weights(name, overlay=None):
    """Where timm takes the weights of `name` from (its pretrained cfg's Hugging Face hub id, URL or file, with
    `overlay` over the cfg), or ''."""
    cfg = timm.models.get_pretrained_cfg(name)
    cfg = {**(cfg.to_dict() if cfg is not None else {}), **(overlay or {})}
    return cfg.get('hf_hub_id') or cfg.get('url') or cfg.get('file') or ''


def fetch_failure(error):
    """The first line of a download's OSError (urllib, Hugging Face hub and missing-file errors all are)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:120]


HUB_FILES = ('model.safetensors', 'pytorch_model.bin')  # what timm asks the hub for, in its order


class HubUnreachable(OSError):
    """The Hugging Face hub could not be reached; the message names the weights' URL and hub id."""


def hub_files(name):
    """(repo id, revision or None, file names) of the Hugging Face hub copy timm reads for `name`, or None."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition('@')
    return repo, revision or None, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES


def cached_hub_file(repo, revision, files):
    """The hub file already in the local Hugging Face cache, or ''."""
    for name in files:
        path = huggingface_hub.try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(path, str):
            return path
    return ''


def hub_unreachable(repo, revision, files):
    """'' when the hub answers about the file (a 'not found' included: timm then asks for the next), else why not.
    One attempt: timm's own download retries each file for about half a minute before it gives up offline."""
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, files[0], revision=revision))
    except HfHubHTTPError:
        return ''
    except Exception as e:  # noqa: BLE001 - every transport error (DNS, proxy, TLS, timeout) means "unreachable"
        return f'{type(e).__name__}: {fetch_failure(e)}'
    return ''


def prepare_published(name):
    """(where the published weights of `name` are read from, timm.create_model keywords that make timm read them
    there): the local Hugging Face cache's file when it holds it (no network); else the hub, once one attempt at
    reaching it has succeeded (HubUnreachable if not); else the cfg's URL, which torch fetches in one attempt."""
    hub = hub_files(name)
    if hub is None:
        return published_weights(name), {}
    repo, revision, files = hub
    cached = cached_hub_file(repo, revision, files)
    if cached:
        return cached, {'pretrained_cfg_overlay': {'file': cached}}
    failure = hub_unreachable(repo, revision, files)
    if failure:
        url = timm.models.get_pretrained_cfg(name).url or huggingface_hub.hf_hub_url(repo, files[0], revision=revision)
        raise HubUnreachable(f'{url} (Hugging Face hub id {repo}) after one attempt ({failure})')
    return repo, {}


def newly_initialised(model, num_classes):
    """The tensors timm leaves as initialised when it loads published weights: the classifier(s), which it drops
    from the file when the class count differs from the cfg's."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if num_classes == cfg.get('num_classes'):
        return []
    heads = cfg.get('classifier') or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return [key for key in model.state_dict() if key.rpartition('.')[0] in heads]


def create_pretrained(args, options):
    """--pretrained: the model with the weights its authors published, downloaded by timm, which drops a classifier
    of another class count and resizes the position embedding to --input-size."""
    source = published_weights(args.model)
    if not source:
        raise UserError(f'--pretrained: {args.model} has no published weights (see README\'s published-weights '
                        'table); pass --finetune FILE with weights you have')
    if args.finetune:
        raise UserError('--pretrained and --finetune both give the starting weights; pass one of them')
    try:
        loaded, overlay = prepare_published(args.model)
        model = create_at_size(args.model, args.input_size, pretrained=True, num_classes=args.nb_classes,
                               drop_rate=args.drop, drop_path_rate=args.drop_path, **options, **overlay)
    except OSError as e:
        where = str(e) if isinstance(e, HubUnreachable) else f'{source} ({fetch_failure(e)})'
        raise UserError(f'--pretrained: could not download the {args.model} weights from {where}; download the '
                        'file yourself and pass --finetune FILE (or --resume FILE with --eval)') from e
    except RuntimeError as e:
        if 'state_dict' not in str(e):
            raise
        flags = flag_names(options) or 'these flags'
        raise UserError(f'--pretrained: the published {args.model} weights do not fit the model built with {flags}; '
                        'drop those flags or train without --pretrained') from e
    utils.log(f'| pretrained: loaded {loaded}; newly initialised: {newly_initialised(model, args.nb_classes)}')
    return model


def build_model(args):
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3, cutoff=0.6)
        hint = f'did you mean {", ".join(close)}?' if close else 'see timm.list_models() for the names'
        raise UserError(f'unknown model {args.model}; {hint}')
    options = model_options(args)
    try:
        if args.pretrained:
            model = create_pretrained(args, options)
        else:
            model = create_at_size(args.model, args.input_size, num_classes=args.nb_classes, drop_rate=args.drop,
                                   drop_path_rate=args.drop_path, **options)
    except TypeError as e:
        if options and 'unexpected keyword' in str(e):
            raise UserError(f'{args.model} does not support {flag_names(options)} ({e}); '
                            'drop the flag or pick a ViT-family model') from e
        raise UserError(f'model {args.model} cannot be built at --input-size {args.input_size} ({e}); '
                        'pass a size the model supports') from e
    except models.StemPatchSizeError as e:
        raise UserError(f'--patch-embed hmlp with {args.model}: {e}; pick a model with patch 16, 8 or 4') from e
    except (AssertionError, ValueError) as e:
        raise UserError(f'model {args.model} cannot be built at --input-size {args.input_size} ({e}); '
                        'pass a size the model supports') from e
    patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    if patch is not None and args.input_size % patch[0]:
        raise UserError(f'--input-size {args.input_size} is not a multiple of {args.model}\'s patch size '
                        f'{patch[0]}; pass a multiple such as {args.input_size // patch[0] * patch[0] or patch[0]}')
    if args.localvit:
        localvit_models.init_like_24h_code(model)
    if args.constant_drop_path and args.drop_path > 0:
        constant_drop_path(model, args.drop_path, args.model)
    return model


def constant_drop_path(model, rate, name):
    """The same stochastic-depth rate in every block (DeiT III, PatchConvnet) instead of timm's linear increase.

    A branch gets drop path where the family puts it: where the last block has a DropPath under that name."""
    blocks = list(getattr(model, 'blocks', ()))
    slots = [k for k, m in blocks[-1].named_children() if isinstance(m, DropPath)] if blocks else []
    if not slots:
        raise UserError(f'--constant-drop-path: {name} has no blocks with drop path; drop the flag or pick a '
                        'ViT-family model')
    for block in blocks:
        for slot in slots:
            setattr(block, slot, DropPath(rate))


def attention_only(model, name):
    """3Things' attention-only fine-tuning, frozen as DeiT freezes: only the attention weights, the position
    embedding and the classifier(s) keep requires_grad; all else, the patch embedding included, is frozen."""
    if not any('.attn.' in n for n, _ in model.named_parameters()):
        raise UserError(f'--attn-only: {name} has no attention blocks (no parameter under blocks.*.attn); '
                        'drop the flag or pick a ViT-family model')
    heads = ('head.', 'head_dist.')
    for param_name, param in model.named_parameters():
        param.requires_grad_('.attn.' in param_name or param_name.startswith(heads) or param_name == 'pos_embed')


def train_class_head_only(model, args):
    """DeiT's distilled models without a teacher: they return (class, distillation) outputs in training and the
    criterion takes the first, so only the class head learns; the distillation head stays as initialised (it is
    frozen here, which DeiT's optimizer amounts to: it never gets a gradient). Evaluation averages the two heads."""
    if args.distillation_type != 'none' or args.cosub or not hasattr(model, 'set_distilled_training'):
        return False
    model.set_distilled_training(True)
    for head in model.get_classifier()[1:]:
        head.requires_grad_(False)
    return True


def load_finetune_weights(model, path):
    """Start from another run's weights: drop a head of another class count, resize the position embedding."""
    _, initialised = checkpoints.load_weights(model, path, '--finetune', finetune=True,
                                              fix='is it a checkpoint of another model?')
    utils.log(f'| finetune: loaded {path}; newly initialised: {initialised}')
