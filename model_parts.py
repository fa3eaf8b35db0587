"""What the model families share: timm's pretrained config for a model of ours, the published checkpoint layouts
each family maps onto its parameter names, and the stride-2 convolutional stem widths of DHVT's SOPE and
PatchConvnet."""
import argparse
from collections import namedtuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import utils

# DeiT-style training code saves its args as a Namespace beside the weights: let weights_only loads (timm's
# pretrained download among them) read such files.
torch.serialization.add_safe_globals([argparse.Namespace])


def pretrained_cfg(image_size, num_classes, distilled=False, first_conv='patch_embed.proj', crop_pct=None,
                   fixed_input_size=False, **extra):
    """ImageNet normalisation, bicubic resizing, and DeiT's evaluation crop (0.875 at 224 px and above, none below)
    unless `crop_pct` says otherwise; `extra` adds or overrides entries (url, hf_hub_id, license, ...)."""
    return {'url': '', 'num_classes': num_classes, 'input_size': (3, image_size, image_size), 'pool_size': None,
            'crop_pct': crop_pct if crop_pct is not None else (0.875 if image_size >= 224 else 1.0),
            'interpolation': 'bicubic', 'fixed_input_size': fixed_input_size, 'mean': IMAGENET_DEFAULT_MEAN,
            'std': IMAGENET_DEFAULT_STD, 'first_conv': first_conv,
            'classifier': ('head', 'head_dist') if distilled else 'head', **extra}


def sope_widths(patch_size, embed_dim):
    """Output channels of the stride-2 convolutions of DHVT's SOPE (PatchConvnet's stem has the same):
    patch 16 -> D/8, D/4, D/2, D; patch 4 -> D/2, D; 2 -> D."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f'patch_size must be a power of two >= 2 (got {patch_size}); use 2, 4, 8 or 16')
    num_convs = patch_size.bit_length() - 1
    if embed_dim % 2 ** (num_convs - 1):
        raise ValueError(f'embed_dim {embed_dim} must be divisible by {2 ** (num_convs - 1)} for patch size '
                         f'{patch_size}; pick an embed_dim that is a multiple of it')
    return [embed_dim // 2 ** (num_convs - 1 - i) for i in range(num_convs)]


# ---------------------------------------------------------------- published checkpoint layouts

OWN_LAYOUT = "timm's (ours, DeiT's, EViT's)"
Layout = namedtuple('Layout', 'name detect convert')
LAYOUTS = []


def register_layout(name, detect, convert):
    """A published checkpoint layout: detect(state) says whether a state dict is in it; convert(state, own) returns
    it under our parameter names (own: the model's state dict). Keys convert does not know pass through unchanged,
    so that the fit check names them."""
    LAYOUTS.append(Layout(name, detect, convert))


def read_layout(state, own):
    """(layout name, `state` under our names): as is when every name is ours, else the first registered layout
    that detects it and whose conversion the model holds every name of, else the first that detects it."""
    if all(key in own for key in state):
        return OWN_LAYOUT, state
    converted = [(layout.name, layout.convert(dict(state), own)) for layout in LAYOUTS if layout.detect(state)]
    for name, mapped in converted:
        if all(key in own for key in mapped):
            return name, mapped
    return converted[0] if converted else (OWN_LAYOUT, state)


def to_our_layout(checkpoint, model):
    """timm's pretrained_filter_fn for our families: a downloaded file, in any layout we read, under our names."""
    return read_layout(utils.model_weights(checkpoint, '(downloaded)'), model.state_dict())[1]


def renamed(state, renames):
    """`state` with each key passed through `renames`, a list of (compiled regex, replacement) applied in order."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out
