"""What the model families share: timm's pretrained config for a model of ours, and the stride-2 convolutional stem
widths of DHVT's SOPE and PatchConvnet."""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


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
