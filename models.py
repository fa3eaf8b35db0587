"""Model families timm lacks, registered in timm's registry on import.

Small-image DeiTs: DeiT-Ti / DeiT-S shapes with patch 4 for 32 px inputs (CIFAR) and patch 2 for 8-16 px
inputs (DIGITS). They are timm VisionTransformers, so every timm feature (dynamic sizes, features,
no_weight_decay) applies unchanged; the distilled sizes are timm's VisionTransformerDistilled (DeiT's
distillation token and head).
"""
from collections import namedtuple
import torch.nn as nn
from timm.layers import PatchEmbed, to_2tuple
from timm.models import (VisionTransformer, VisionTransformerDistilled, build_model_with_cfg, generate_default_cfgs,
                         register_model)

import dhvt_models  # noqa: F401 - each family module registers its models in timm on import
import evit_models  # noqa: F401
import localvit_models  # noqa: F401
import patchconvnet_models  # noqa: F401
from model_parts import pretrained_cfg

# timm's DeiTs as published: name -> (params in millions, GMACs at 224 px); scripts/model_table.py checks them
PAPER_FIGURES = {
    'deit_tiny_patch16_224': (5.7, 1.25),
    'deit_small_patch16_224': (22.1, 4.60),
    'deit_base_patch16_224': (86.6, 17.6),
}

Size = namedtuple('Size', 'patch img dim depth heads distilled')
SMALL_DEIT_SIZES = {
    'deit_tiny_patch4_32': Size(4, 32, 192, 12, 3, False),
    'deit_small_patch4_32': Size(4, 32, 384, 12, 6, False),
    'deit_tiny_patch2_16': Size(2, 16, 192, 12, 3, False),
    'deit_small_patch2_16': Size(2, 16, 384, 12, 6, False),
    'deit_micro_patch2_16': Size(2, 16, 48, 2, 2, False),  # the test size: seconds on a CPU
    'deit_tiny_distilled_patch4_32': Size(4, 32, 192, 12, 3, True),
    'deit_small_distilled_patch4_32': Size(4, 32, 384, 12, 6, True),
    'deit_tiny_distilled_patch2_16': Size(2, 16, 192, 12, 3, True),
    'deit_micro_distilled_patch2_16': Size(2, 16, 48, 2, 2, True),
}


default_cfgs = generate_default_cfgs({
    name: pretrained_cfg(size[1], 100 if size[1] == 32 else 10, size[5]) for name, size in SMALL_DEIT_SIZES.items()})


def _small_deit(name, pretrained=False, **kwargs):
    patch, img, dim, depth, heads, distilled = SMALL_DEIT_SIZES[name]
    model_args = dict(patch_size=patch, img_size=img, embed_dim=dim, depth=depth, num_heads=heads)
    model_cls = VisionTransformerDistilled if distilled else VisionTransformer
    return build_model_with_cfg(model_cls, name, pretrained, **dict(model_args, **kwargs))


@register_model
def deit_tiny_patch4_32(pretrained=False, **kwargs):
    return _small_deit('deit_tiny_patch4_32', pretrained, **kwargs)


@register_model
def deit_small_patch4_32(pretrained=False, **kwargs):
    return _small_deit('deit_small_patch4_32', pretrained, **kwargs)


@register_model
def deit_tiny_patch2_16(pretrained=False, **kwargs):
    return _small_deit('deit_tiny_patch2_16', pretrained, **kwargs)


@register_model
def deit_small_patch2_16(pretrained=False, **kwargs):
    return _small_deit('deit_small_patch2_16', pretrained, **kwargs)


@register_model
def deit_micro_patch2_16(pretrained=False, **kwargs):
    return _small_deit('deit_micro_patch2_16', pretrained, **kwargs)


@register_model
def deit_tiny_distilled_patch4_32(pretrained=False, **kwargs):
    return _small_deit('deit_tiny_distilled_patch4_32', pretrained, **kwargs)


@register_model
def deit_small_distilled_patch4_32(pretrained=False, **kwargs):
    return _small_deit('deit_small_distilled_patch4_32', pretrained, **kwargs)


@register_model
def deit_tiny_distilled_patch2_16(pretrained=False, **kwargs):
    return _small_deit('deit_tiny_distilled_patch2_16', pretrained, **kwargs)


@register_model
def deit_micro_distilled_patch2_16(pretrained=False, **kwargs):
    return _small_deit('deit_micro_distilled_patch2_16', pretrained, **kwargs)


# ---------------------------------------------------------------- the hMLP stem ("Three things everyone should know")

class StemPatchSizeError(ValueError):
    pass


def hmlp_strides(patch_size):
    """Strides of the hMLP stem's three convolutions: 16 -> (4, 2, 2), 8 -> (2, 2, 2), 4 -> (1, 2, 2)."""
    if patch_size % 4 or patch_size < 4:
        raise StemPatchSizeError(f'the hMLP stem needs a patch size that is a multiple of 4 (got {patch_size})')
    return patch_size // 4, 2, 2


class HMLPPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with the hierarchical-MLP stem as its projection: conv (k = s) -> norm -> GELU ->
    conv 2x2 stride 2 -> norm -> GELU -> conv 2x2 stride 2 -> norm. Kernels equal strides, so every patch is
    processed on its own (as a patchifying linear layer would be), which keeps the stem compatible with masking.
    BatchNorm as in the paper; in training mode it shares statistics over the batch, in eval mode it does not.

    Pass it to any timm VisionTransformer: timm.create_model('deit_small_patch16_224', embed_layer=HMLPPatchEmbed).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        first, second, third = hmlp_strides(self.patch_size[0])
        hidden = embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, hidden, kernel_size=first, stride=first), nn.BatchNorm2d(hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=second, stride=second), nn.BatchNorm2d(hidden), nn.GELU(),
            nn.Conv2d(hidden, embed_dim, kernel_size=third, stride=third, bias=bias), nn.BatchNorm2d(embed_dim))

    def set_input_size(self, img_size=None, patch_size=None):
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError('the hMLP stem cannot change its patch size after it is built')
        super().set_input_size(img_size=img_size)
