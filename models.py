"""Model families timm lacks, registered in timm's registry on import.

Small-image DeiTs: DeiT-Ti / DeiT-S shapes with patch 4 for 32 px inputs (CIFAR) and patch 2 for 8-16 px
inputs (DIGITS). They are timm VisionTransformers, so every timm feature (dynamic sizes, features,
no_weight_decay, distilled heads via deit's class) applies unchanged.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

# name: (patch size, native image size, embed dim, depth, heads)
SMALL_DEIT_SIZES = {
    'deit_tiny_patch4_32': (4, 32, 192, 12, 3),
    'deit_small_patch4_32': (4, 32, 384, 12, 6),
    'deit_tiny_patch2_16': (2, 16, 192, 12, 3),
    'deit_small_patch2_16': (2, 16, 384, 12, 6),
    'deit_micro_patch2_16': (2, 16, 48, 2, 2),  # the test size: seconds on a CPU
}


def _cfg(size, num_classes):
    return {'url': '', 'num_classes': num_classes, 'input_size': (3, size, size), 'pool_size': None,
            'crop_pct': 1.0, 'interpolation': 'bicubic', 'fixed_input_size': False,
            'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'first_conv': 'patch_embed.proj',
            'classifier': 'head'}


default_cfgs = generate_default_cfgs({
    name: _cfg(img, 100 if img == 32 else 10) for name, (_, img, _, _, _) in SMALL_DEIT_SIZES.items()})


def _small_deit(name, pretrained=False, **kwargs):
    patch, img, dim, depth, heads = SMALL_DEIT_SIZES[name]
    model_args = dict(patch_size=patch, img_size=img, embed_dim=dim, depth=depth, num_heads=heads)
    return build_model_with_cfg(VisionTransformer, name, pretrained, **dict(model_args, **kwargs))


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
