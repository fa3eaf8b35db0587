"""Top-k classes, with probabilities, of images or folders of images.

    python scripts/predict.py --checkpoint runs/deit_s/best_checkpoint.pth photos/ cat.jpg --topk 5
    python scripts/predict.py --model deit_small_patch16_224 --hub cat.jpg --json

Weights come from a checkpoint written by main.py (model, input size and class names are read from it; --ema
takes the EMA weights), from any state-dict file with --model NAME, or from timm's published weights with
--model NAME --hub (ImageNet class names). Images are read as the validation set reads them and get the
run's evaluation transform. Folders are searched recursively and predicted in batches. --plot FILE also draws
the images with their top-k classes.

An image that cannot be read is named on stderr and skipped; the others are predicted, and the tool ends with
one line counting the skipped files and exit status 1.
"""
import argparse
import json
import os
import sys

import numpy as np
import timm
import torch
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import main as training  # noqa: E402 - its flag defaults complete the config of older checkpoints
import model_factory  # noqa: E402
import utils  # noqa: E402
import visualize  # noqa: E402
from datasets import IMG_EXTENSIONS, build_transform, load_rgb  # noqa: E402
from images import BadImageError  # noqa: E402

PLOT_MAX = 16


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('inputs', nargs='+', metavar='IMAGE_OR_FOLDER')
    add_weight_flags(p)
    p.add_argument('--topk', default=5, type=int, help='classes to show per image')
    p.add_argument('--batch-size', default=64, type=int, help='images per forward pass')
    p.add_argument('--json', action='store_true', help='print one JSON list instead of text')
    p.add_argument('--plot', default='', metavar='FILE', help=f'also draw the first {PLOT_MAX} images with their '
                   'top-k classes into this PNG (missing folders are made; a file there is replaced, and the tool '
                   'says so)')
    return p


def add_weight_flags(p):
    """The flags that choose a model and its weights (shared with visualize_attention.py)."""
    p.add_argument('--checkpoint', default='', metavar='FILE', help='checkpoint from main.py, or a state dict')
    p.add_argument('--model', default='', metavar='NAME', help="timm name; read from --checkpoint when it has it")
    p.add_argument('--hub', action='store_true', help="timm's published weights for --model")
    p.add_argument('--ema', action='store_true', help="the checkpoint's EMA weights instead of the model's")
    p.add_argument('--device', default='auto', help='cpu, cuda, cuda:N or auto (cuda when available)')


# ---------------------------------------------------------------- model, transform and class names

def load_model(checkpoint='', model_name='', hub=False, ema=False):
    """(model in eval mode, evaluation transform, class names) from a checkpoint or timm's published weights."""
    if checkpoint and hub:
        raise ValueError('--checkpoint and --hub both give weights; pass one of them')
    if checkpoint:
        return _from_checkpoint(checkpoint, model_name, ema)
    if model_name and hub:
        return _from_hub(model_name)
    raise ValueError("no weights given: pass --checkpoint FILE, or --model NAME --hub for timm's published weights")


def _from_checkpoint(path, model_name, ema):
    ckpt = utils.load_checkpoint(path)
    state = _state_dict(ckpt, path, ema)
    args = training.get_args_parser().parse_args([])
    saved = ckpt.get('args') or {}
    if saved.get('model') and not timm.is_model(saved['model']):
        saved = {}  # the args of another codebase (LocalViT's, EViT's...), whose model names are not ours
    vars(args).update(saved)
    args.pretrained = False  # the checkpoint holds the weights: the published ones would be downloaded to be replaced
    trained_as = saved.get('model')
    if trained_as and model_name and model_name != trained_as:
        raise ValueError(f'{path} holds a {trained_as}, not a {model_name}; drop --model or pass --model {trained_as}')
    if not (trained_as or model_name):
        raise ValueError(f'{path} does not name its model; pass --model NAME')
    args.model = trained_as or model_name
    if 'nb_classes' not in saved:
        args.nb_classes = _num_classes(state, args.model)
    if 'input_size' not in saved:
        args.input_size = timm.get_pretrained_cfg_value(args.model, 'input_size')[-1]
    model = model_factory.build_model(args)
    try:
        checkpoints.load_weights(model, path, '--checkpoint', key='model_ema' if ema else 'model', ckpt=ckpt,
                                 report=lambda line: print(line, file=sys.stderr),  # stdout holds the predictions
                                 fix=f'pass the --model it was trained as ({args.model} at {args.input_size} px here), '
                                     'or the main.py checkpoint, which records its input size')
    except utils.UserError as e:
        raise ValueError(str(e)) from e
    class_names = list(ckpt.get('class_names') or default_class_names(model, args.nb_classes))
    return model.eval(), build_transform(False, args), class_names


def _state_dict(ckpt, path, ema):
    key = 'model_ema' if ema else 'model'
    if key in ckpt:
        return ckpt[key]
    if ema:
        raise ValueError(f'{path} has no EMA weights; drop --ema')
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise ValueError(f"{path} has no 'model' entry; pass a checkpoint written by main.py or a state dict")


def _num_classes(state, model_name):
    head = state.get('head.weight')
    if head is not None:
        return head.shape[0]
    return timm.get_pretrained_cfg_value(model_name, 'num_classes') or 1000


def _from_hub(name):
    if not timm.is_model(name):
        raise ValueError(f'unknown model {name}; see timm.list_models() for the names')
    try:
        loaded, overlay = model_factory.prepare_published(name)
        model = timm.create_model(name, pretrained=True, **overlay)
    except (OSError, RuntimeError) as e:
        reason = e if isinstance(e, model_factory.HubUnreachable) else type(e).__name__
        raise ValueError(f'could not fetch weights for {name} ({reason}); check the network, '
                         'or download them and pass --checkpoint FILE --model NAME') from e
    print(f'| --hub: loaded {loaded}', file=sys.stderr)  # stdout holds the predictions
    transform = create_transform(**resolve_data_config(model=model))
    return model.eval(), transform, default_class_names(model, model.num_classes)


def default_class_names(model, num_classes):
    """ImageNet's names for a model whose pretrained cfg says ImageNet, else the class numbers."""
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i).split(',')[0] for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def resolve_device(name):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {name} asked for, but CUDA is not available; pass --device cpu')
    return torch.device(name)


# ---------------------------------------------------------------- prediction

def list_images(inputs):
    """Image files named in inputs, folders searched recursively (sorted), in the order given."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                            if name.lower().endswith(IMG_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise ValueError(f'{item} is neither an image file nor a folder; check the path')
    if not paths:
        raise ValueError(f'no images ({", ".join(IMG_EXTENSIONS)}) found in {", ".join(inputs)}; '
                         'pass image files or folders that hold them')
    return paths


def unreadable_reason(error):
    """A BadImageError's message without its last clause, a hint to main.py's --skip-bad-images (these tools skip
    or stop on their own)."""
    return str(error).rsplit('; ', 1)[0]


def read_images(paths, transform, unreadable):
    """(the transformed images, their paths) of those paths that can be read; each that cannot is named on stderr
    and appended to `unreadable`."""
    images, read = [], []
    for path in paths:
        try:
            images.append(transform(load_rgb(path)))
        except BadImageError as e:
            print(f'skipped: {unreadable_reason(e)}', file=sys.stderr, flush=True)
            unreadable.append(path)
            continue
        read.append(path)
    return images, read


@torch.no_grad()
def predict(model, transform, class_names, paths, topk=5, batch_size=64, device=torch.device('cpu'),
            unreadable=None):
    """[{'image': path, 'predictions': [{'class', 'index', 'probability'}, ...]}], most probable first, for each
    image that can be read; the paths of the others are appended to `unreadable` (a list)."""
    if topk < 1 or batch_size < 1:
        raise ValueError(f'--topk {topk} and --batch-size {batch_size} must be at least 1')
    unreadable = [] if unreadable is None else unreadable
    model.to(device)
    results = []
    for start in range(0, len(paths), batch_size):
        images, batch = read_images(paths[start:start + batch_size], transform, unreadable)
        if not images:
            continue
        x = torch.stack(images).to(device)  # (B, 3, H, W)
        probs = model(x).float().softmax(dim=-1).cpu()
        top = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        for path, values, indices in zip(batch, top.values.tolist(), top.indices.tolist()):
            results.append({'image': path, 'predictions': [
                {'class': class_names[i], 'index': i, 'probability': v} for v, i in zip(values, indices)]})
    return results


def format_text(results):
    lines = []
    for result in results:
        lines.append(result['image'])
        lines += [f"  {p['probability'] * 100:6.2f}%  {p['class']}" for p in result['predictions']]
    return '\n'.join(lines)


def plot(results, path):
    """The first PLOT_MAX images as read from disk, each captioned with its top-k classes."""
    shown = results[:PLOT_MAX]
    images = [np.asarray(load_rgb(r['image']), dtype=np.float32) / 255 for r in shown]
    captions = ['\n'.join(f"{p['class']} {p['probability'] * 100:.0f}%" for p in r['predictions']) for r in shown]
    visualize.draw_predictions(images, captions, path)


def unreadable_summary(paths, shown=3):
    """One line: how many files could not be read, the first few named."""
    more = f' and {len(paths) - shown} more' if len(paths) > shown else ''
    return (f'{len(paths)} file{"s" if len(paths) > 1 else ""} could not be read: {", ".join(paths[:shown])}{more} '
            '(each is named above); remove or replace them')


def write_plot(results, path, replacing):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot(results, path)
    print(f'wrote {path}' + (' (replaced the file that was there)' if replacing else ''), file=sys.stderr)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    unreadable = []
    try:
        device = resolve_device(args.device)
        replacing = args.plot and utils.check_output_file(args.plot, '--plot')
        paths = list_images(args.inputs)
        model, transform, class_names = load_model(args.checkpoint, args.model, args.hub, args.ema)
        results = predict(model, transform, class_names, paths, args.topk, args.batch_size, device, unreadable)
    except (ValueError, utils.UserError) as e:
        utils.exit_with_error(e)
    print(json.dumps(results, indent=1) if args.json else format_text(results), flush=True)
    if args.plot and results:
        write_plot(results, args.plot, replacing)
    if unreadable:
        utils.exit_with_error(unreadable_summary(unreadable), code=1)


if __name__ == '__main__':
    main()
