"""Convert a Google ViT .npz checkpoint into a checkpoint that --finetune and --resume read.

    python scripts/convert_vit_npz.py imagenet21k+imagenet2012_ViT-B_16.npz vit_b16_384.pth --model ViT-B_16
    python main.py --model vit_base_patch16_384 --input-size 384 --finetune vit_b16_384.pth ...

--model takes Google's name (ViT-B_16, ViT-B_32, ViT-L_16, ViT-L_32, ViT-H_14, R50+ViT-B_16) or the name of any
timm or project VisionTransformer. The resolution comes from the file's position embedding (224 px for the
imagenet21k files, 384 px for most imagenet21k+imagenet2012 ones), the class count from its head unless
--num-classes asks for a fresh head of another size. timm's own loader, VisionTransformer.load_pretrained(),
maps the weights.
"""
import argparse
import difflib
import math
import os
import re
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import models  # noqa: E402,F401 - registers the project's models: their ViTs convert too
import utils  # noqa: E402
from utils import UserError  # noqa: E402

GOOGLE_TO_TIMM = {
    'ViT-B_16': 'vit_base_patch16_224',
    'ViT-B_32': 'vit_base_patch32_224',
    'ViT-L_16': 'vit_large_patch16_224',
    'ViT-L_32': 'vit_large_patch32_224',
    'ViT-H_14': 'vit_huge_patch14_224',
    'R50+ViT-B_16': 'vit_base_r50_s16_224',
}
POS_EMBED_KEY = 'Transformer/posembed_input/pos_embedding'
BLOCK_KEY = re.compile(r'^Transformer/encoderblock_(\d+)/')


def resolve_model_name(name):
    """A timm model name from Google's name (any case, '/' or '_') or from a registered model name."""
    google = {key.lower(): value for key, value in GOOGLE_TO_TIMM.items()}
    key = name.lower().replace('/', '_')
    if key in google:
        return google[key]
    if timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, timm.list_models('vit_*') + list(GOOGLE_TO_TIMM), n=3, cutoff=0.6)
    hint = f' (did you mean {", ".join(close)}?)' if close else ''
    raise UserError(f'unknown model {name}{hint}; pass one of Google\'s names ({", ".join(GOOGLE_TO_TIMM)}) '
                    'or a timm ViT name such as vit_base_patch16_224')


def read_npz_layout(path):
    """What the file says about its model: position-grid side, head classes (None: no head), blocks, pre-logits."""
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist; pass a Google ViT .npz file')
    try:
        with np.load(path, allow_pickle=False) as weights:
            keys = set(weights.files)
            missing = [k for k in ('embedding/kernel', 'cls', POS_EMBED_KEY) if k not in keys]
            if missing:
                raise UserError(f'{path} lacks {missing[0]}; pass an original Google ViT .npz '
                                '(ViT-B_16.npz and the like, with a class token)')
            tokens = weights[POS_EMBED_KEY].shape[1]
            head = weights['head/kernel'].shape[-1] if 'head/kernel' in keys else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f'{path} is not a readable .npz file ({type(e).__name__}: {str(e)[:80]}); '
                        'pass a Google ViT .npz file') from e
    grid = math.isqrt(tokens - 1)  # one position belongs to the class token
    if grid * grid != tokens - 1:
        raise UserError(f'{path}: {tokens} positions are not a class token plus a square grid; '
                        'pass a Google ViT .npz with a class token')
    blocks = len({int(m.group(1)) for m in map(BLOCK_KEY.match, keys) if m})
    return {'grid': grid, 'head_classes': head, 'blocks': blocks, 'pre_logits': 'pre_logits/kernel' in keys}


def native_size(name):
    return timm.get_pretrained_cfg_value(name, 'input_size')[-1]


def pixels_per_token(name):
    """Side of the image square one token sees (the patch size, or the backbone's stride for hybrids)."""
    with torch.device('meta'):  # shapes only: no memory, no initialisation cost
        probe = timm.create_model(name, pretrained=False)
    if not isinstance(probe, VisionTransformer):
        raise UserError(f'{name} is a {type(probe).__name__}, not a VisionTransformer that Google ViT weights fit; '
                        f'pass one of {", ".join(GOOGLE_TO_TIMM)} or a vit_* name')
    return probe.patch_embed.img_size[0] // probe.patch_embed.grid_size[0]


def name_at_resolution(name, size):
    """vit_base_patch16_224 -> vit_base_patch16_384 for a 384 px file, when timm registers that name."""
    candidate = re.sub(r'_\d+$', f'_{size}', name)
    if candidate != name and timm.is_model(candidate) and native_size(candidate) == size:
        return candidate
    return name


def build_model(name, size, num_classes):
    kwargs = {'num_classes': num_classes}
    if native_size(name) != size:
        kwargs['img_size'] = size
    return timm.create_model(name, pretrained=False, **kwargs)


def load_npz(model, name, path, layout):
    if len(model.blocks) != layout['blocks']:
        raise UserError(f'{path} has {layout["blocks"]} encoder blocks and {name} has {len(model.blocks)}; '
                        'pass the --model the file was trained as')
    try:
        model.load_pretrained(path)
    except (AttributeError, KeyError, RuntimeError, ValueError) as e:  # missing tensors, other shapes or layers
        reason = str(e).strip().splitlines()[0][:120]
        raise UserError(f'{path} does not fit {name} ({type(e).__name__}: {reason}); '
                        'pass the --model the file was trained as') from e


def report_head(layout, num_classes):
    if layout['head_classes'] != num_classes:
        found = f'a {layout["head_classes"]}-class head' if layout['head_classes'] else 'no head'
        print(f'| the file has {found}: the {num_classes}-class head is freshly initialised')
    elif layout['pre_logits']:
        print('| note: the file\'s pre-logits layer is dropped (as timm does); its head was trained on top of it, '
              'so fine-tune before trusting the logits')


def convert(npz_path, output, model_name, num_classes=None):
    """Write {'model', 'args', 'class_names'} for the .npz; returns (timm name, input size, class count)."""
    if os.path.exists(output):
        raise UserError(f'{output} exists; choose another name or delete it first')
    if num_classes is not None and num_classes < 1:
        raise UserError(f'--num-classes {num_classes} must be 1 or more')
    name = resolve_model_name(model_name)
    layout = read_npz_layout(npz_path)
    num_classes = num_classes or layout['head_classes']
    if num_classes is None:
        raise UserError(f'{npz_path} has no classifier head; pass --num-classes for the head to create')
    size = layout['grid'] * pixels_per_token(name)
    name = name_at_resolution(name, size)
    model = build_model(name, size, num_classes)
    load_npz(model, name, npz_path, layout)
    report_head(layout, num_classes)
    checkpoint = {'model': model.state_dict(),
                  # Google's ViTs take inputs scaled to [-1, 1]: mean and std 0.5, which main.py and predict read
                  'args': {'model': name, 'input_size': size, 'nb_classes': num_classes, 'mean': [0.5] * 3,
                           'std': [0.5] * 3},
                  'class_names': [str(i) for i in range(num_classes)]}
    utils.save_checkpoint(checkpoint, output)
    return name, size, num_classes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('npz', help='a Google ViT checkpoint, e.g. imagenet21k/ViT-B_16.npz')
    p.add_argument('output', help='the .pth checkpoint to write (must not exist yet)')
    p.add_argument('--model', required=True, help=f'Google\'s name ({", ".join(GOOGLE_TO_TIMM)}) or a timm ViT name')
    p.add_argument('--num-classes', type=int, default=None,
                   help='classes of the head to build (default: the file\'s head; another count starts it afresh)')
    args = p.parse_args(argv)
    try:
        name, size, num_classes = convert(args.npz, args.output, args.model, args.num_classes)
    except UserError as e:
        utils.exit_with_error(e)
    print(f'wrote {args.output}: {name} at {size} px, {num_classes} classes; fine-tune with '
          f'python main.py --model {name} --input-size {size} --finetune {args.output} ...')


if __name__ == '__main__':
    main()
