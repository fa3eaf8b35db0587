"""PatchConvnet: "Augmenting Convolutional networks with attention-based aggregation" (Touvron et al., 2021),
registered in timm's registry on import under DeiT's names (S60, S120, B60, B120, L60, L120, S60_multi).

A convolutional trunk on the patch grid, pooled by attention instead of averaging:
- stem: stride-2 3x3 convolutions (no bias) with GELU between them, 3 -> D/8 -> D/4 -> D/2 -> D for patch 16;
- trunk: `depth` residual blocks x + drop_path(gamma * f(LN(x))), f = 1x1 conv -> GELU -> depth-wise 3x3 ->
  GELU -> squeeze-excitation -> 1x1 conv, with LayerScale gamma and the same drop-path rate in every block;
- head: one class-attention block (a class token attends to itself and the patches, one head, then an MLP),
  a final LayerNorm and a linear classifier. The multi-class-token variant has one token per class, each
  attending to the patches only and scored by its own one-output classifier.

The class token's attention over the patches is the model's explanation of its decision:
`model.class_attention_map(images)` returns it as a (B, queries, H / patch, W / patch) map.
"""
from collections import namedtuple
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, SEModule, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from model_parts import pretrained_cfg, register_layout, renamed, sope_widths, to_our_layout

__all__ = ['PatchConvnet', 'PATCHCONVNET_SIZES', 'PAPER_FIGURES']


# The stride-2 conv widths of DHVT's SOPE stem: patch 16 -> D/8, D/4, D/2, D; patch 4 -> D/2, D.
stem_widths = sope_widths


class ConvStem(nn.Module):
    """(B, 3, H, W) -> (B, H / patch, W / patch, D) through stride-2 3x3 convs with GELU between them."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=384):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        layers, width = [], in_chans
        for out in stem_widths(patch_size, embed_dim):
            layers += [nn.Conv2d(width, out, kernel_size=3, stride=2, padding=1, bias=False), nn.GELU()]
            width = out
        self.proj = nn.Sequential(*layers[:-1])  # no activation after the last conv

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class ConvMixer(nn.Module):
    """f of a trunk block on a (B, H, W, C) grid: 1x1 conv, GELU, depth-wise 3x3, GELU, SE, 1x1 conv."""

    def __init__(self, dim):
        super().__init__()
        self.pw1 = nn.Conv2d(dim, dim, kernel_size=1)
        self.dw = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.se = SEModule(dim, rd_ratio=0.25, rd_divisor=1)
        self.pw2 = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)                       # (B, C, H, W)
        x = self.se(F.gelu(self.dw(F.gelu(self.pw1(x)))))
        return self.pw2(x).permute(0, 2, 3, 1)          # (B, H, W, C)


class TrunkBlock(nn.Module):
    def __init__(self, dim, drop_path=0., init_values=1e-4, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim)
        self.mixer = ConvMixer(dim)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.gamma * self.mixer(self.norm(x)))


class ClassAttention(nn.Module):
    """Queries from the class token(s), keys and values from `context`; returns (B, Q, C) and the attention."""

    def __init__(self, dim, num_heads=1, qkv_bias=True, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x):
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, h, N, C / h)

    def forward(self, queries, context):
        q = self.split_heads(self.q(queries))
        k, v = self.split_heads(self.k(context)), self.split_heads(self.v(context))
        attn = self.attn_drop((q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1))  # (B, h, Q, N)
        out = (attn @ v).transpose(1, 2).flatten(2)                                     # (B, Q, C)
        return self.proj_drop(self.proj(out)), attn


class AggregationBlock(nn.Module):
    """CaiT-style class-attention block: only the class token(s) are updated.

    With one class token it attends to [itself, patches]; with one token per class (multi_class) to the patches."""

    def __init__(self, dim, num_heads=1, mlp_ratio=3., qkv_bias=True, drop=0., attn_drop=0., init_values=1e-4,
                 norm_layer=nn.LayerNorm, multi_class=False):
        super().__init__()
        self.multi_class = multi_class
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, cls, patches):
        """cls (B or 1, Q, C), patches (B, N, C) -> updated cls (B, Q, C) and its attention over the context
        (B, h, Q, Q + N or N)."""
        tokens = patches if self.multi_class else torch.cat([cls.expand(patches.shape[0], -1, -1), patches], dim=1)
        tokens = self.norm1(tokens)
        queries = self.norm1(cls) if self.multi_class else tokens[:, :cls.shape[1]]
        update, attn = self.attn(queries, tokens)
        cls = cls + self.gamma_1 * update
        cls = cls + self.gamma_2 * self.mlp(self.norm2(cls))
        return cls, attn


class PatchConvnet(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=60,
                 num_heads=1, mlp_ratio=3., qkv_bias=True, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 init_values=1e-4, multi_class=False, global_pool='token'):
        super().__init__()
        if global_pool != 'token':
            raise ValueError(f'PatchConvnet pools with its class attention (global_pool="token"), not {global_pool!r}')
        norm_layer = lambda dim: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731
        self.num_classes, self.multi_class, self.global_pool = num_classes, multi_class, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.img_size = img_size
        self.patch_embed = ConvStem(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes if multi_class else 1, embed_dim))
        # The paper keeps the drop-path rate constant over depth (not increasing block by block).
        self.blocks = nn.Sequential(*[TrunkBlock(embed_dim, drop_path_rate, init_values, norm_layer)
                                      for _ in range(depth)])
        self.aggregation = AggregationBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                            init_values, norm_layer, multi_class)
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'blocks.{depth - 1}')]
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    def _new_head(self, num_classes):
        if num_classes <= 0:
            return nn.Identity()
        if self.multi_class:
            return ClassWiseLinear(self.embed_dim, num_classes)
        head = nn.Linear(self.embed_dim, num_classes)
        _init_weights(head)
        return head

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'cls_token'}

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        if self.multi_class and num_classes != self.num_classes:
            raise ValueError('the multi-class-token PatchConvnet has one token per class; build it with '
                             f'num_classes={num_classes} instead of resetting its classifier')
        self.num_classes = num_classes
        device = self.cls_token.device
        self.head = self._new_head(num_classes).to(device)

    def forward_trunk(self, x):
        """(B, 3, H, W) -> patch tokens (B, H / patch, W / patch, C)."""
        return self.blocks(self.patch_embed(x))

    def aggregate(self, x):
        """(B, 3, H, W) -> (class token(s) (B, Q, C), patch tokens (B, N, C), attention (B, h, Q, context), grid)."""
        grid = self.forward_trunk(x)
        patches = grid.flatten(1, 2)
        cls, attn = self.aggregation(self.cls_token, patches)  # the (1, Q, C) token broadcasts over the batch
        return cls, patches, attn, grid.shape[1:3]

    def forward_features(self, x):
        """(B, 3, H, W) -> normalised [class token(s), patch tokens], (B, Q + N, C), as timm's ViTs return."""
        cls, patches, _, _ = self.aggregate(x)
        return self.norm(torch.cat([cls, patches], dim=1))

    def forward_head(self, x, pre_logits=False):
        num_queries = self.num_classes if self.multi_class else 1
        x = self.head_drop(x[:, :num_queries] if self.multi_class else x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def class_attention_map(self, x):
        """The aggregation layer's attention from each class token to each patch, (B, Q, H / p, W / p), averaged
        over heads; each map sums to 1 over the patches (and, with one class token, its attention to itself)."""
        cls, _, attn, (h, w) = self.aggregate(x)
        patches_attn = attn.mean(dim=1)[:, :, -h * w:]  # drop the class token's attention to itself
        return patches_attn.reshape(x.shape[0], cls.shape[1], h, w)


class ClassWiseLinear(nn.Module):
    """One 1-output linear classifier per class token: logits[b, c] = <x[b, c], weight[c]> + bias[c]."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        trunc_normal_(self.weight, std=.02)

    def forward(self, x):
        return (x * self.weight).sum(dim=-1) + self.bias  # (B, num_classes, C) -> (B, num_classes)


def _init_weights(module):
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------- DeiT's published layout

def is_deit_patchconvnet(state):
    return 'blocks_token_only.0.attn.q.weight' in state


# facebookresearch/deit's patchconvnet_models.py: stem convs wrapped in a Sequential; each trunk block's f is one
# Sequential qkv_pos (1x1, GELU, depth-wise, GELU, SqueezeExcite, 1x1); the aggregation block is blocks_token_only.0.
_DEIT_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r'^patch_embed\.proj\.(\d+)\.0\.', r'patch_embed.proj.\1.'),
    (r'^(blocks\.\d+)\.norm1\.', r'\1.norm.'),
    (r'^(blocks\.\d+)\.gamma_1$', r'\1.gamma'),
    (r'^(blocks\.\d+)\.attn\.qkv_pos\.0\.', r'\1.mixer.pw1.'),
    (r'^(blocks\.\d+)\.attn\.qkv_pos\.2\.', r'\1.mixer.dw.'),
    (r'^(blocks\.\d+)\.attn\.qkv_pos\.4\.conv_reduce\.', r'\1.mixer.se.fc1.'),
    (r'^(blocks\.\d+)\.attn\.qkv_pos\.4\.conv_expand\.', r'\1.mixer.se.fc2.'),
    (r'^(blocks\.\d+)\.attn\.qkv_pos\.5\.', r'\1.mixer.pw2.'),
    (r'^blocks_token_only\.0\.', 'aggregation.'))]


def from_deit_patchconvnet(state, own=None):
    """DeiT's names -> ours. The multi-class-token model's 1-output heads head.c become the rows of one head."""
    out = renamed(state, _DEIT_RENAMES)
    num_heads = sum(1 for key in out if re.fullmatch(r'head\.\d+\.weight', key))
    parts = {part: [f'head.{c}.{part}' for c in range(num_heads)] for part in ('weight', 'bias')}
    if num_heads and all(key in out for keys in parts.values() for key in keys):
        for part, keys in parts.items():
            out[f'head.{part}'] = torch.cat([out.pop(key) for key in keys])
    return out


register_layout("PatchConvnet (facebookresearch/deit)", is_deit_patchconvnet, from_deit_patchconvnet)


# ---------------------------------------------------------------- sizes and registration

Size = namedtuple('Size', 'dim depth init_values multi_class patch img classes', defaults=(False, 16, 224, 1000))

# DeiT's names and shapes; LayerScale starts at 1e-4 for S60 and 1e-6 for the deeper or wider models.
PATCHCONVNET_SIZES = {
    'S60': Size(384, 60, 1e-4),
    'S120': Size(384, 120, 1e-6),
    'B60': Size(768, 60, 1e-6),
    'B120': Size(768, 120, 1e-6),
    'L60': Size(1024, 60, 1e-6),
    'L120': Size(1024, 120, 1e-6),
    'S60_multi': Size(384, 60, 1e-4, True),
    'patchconvnet_micro_patch4_16': Size(32, 2, 1e-4, False, 4, 16, 10),  # the test size: seconds on a CPU
}

# The paper's ImageNet-1k table at 224 px: (params in millions, GFLOPs, which are multiply-accumulates).
# It gives no figures for L60 / L120.
PAPER_FIGURES = {
    'S60': (25.2, 4.0),
    'S120': (47.7, 7.5),
    'B60': (99.4, 15.8),
    'B120': (188.6, 29.9),
    'S60_multi': (25.6, 5.3),
}


# DeiT's published weights (README_patchconvnet.md), for DeiT's evaluation transform (its default crop ratio 0.875,
# bicubic): tagged name -> (file, top-1 on ImageNet-1k val as the authors report it). in22k_ft_in1k: pretrained on
# ImageNet-21k, fine-tuned on ImageNet-1k. Their 384 and 512 px files state no evaluation crop: load those by file.
WEIGHTS_URL = 'https://dl.fbaipublicfiles.com/deit/'
PUBLISHED_WEIGHTS = {
    'S60.fb_in1k': ('s60_224_1k.pth', 82.1),
    'S60.fb_in22k_ft_in1k': ('s60_224_21k.pth', 83.5),
    'S120.fb_in1k': ('s120_224_1k.pth', 83.2),
    'B60.fb_in1k': ('b60_224_1k.pth', 83.5),
    'B60.fb_in22k_ft_in1k': ('b60_224_21k.pth', 85.4),
    'B120.fb_in1k': ('b120_224_1k.pth', 84.1),
    'B120.fb_in22k_ft_in1k': ('b120_224_21k.pth', 86.0),
    'S60_multi.fb_scratch_in1k': ('s60_multi_scratch_1k.pth', 81.1),
    'S60_multi.fb_finetune_in1k': ('s60_multi_finetune_1k.pth', 82.0),
}


def _cfg(size, file=None, top1=None):
    cfg = pretrained_cfg(size.img, size.classes, first_conv='patch_embed.proj.0')
    if file is None:
        return cfg
    return dict(cfg, url=WEIGHTS_URL + file, license='apache-2.0',
                origin_url='https://github.com/facebookresearch/deit', paper_ids='arXiv:2112.13692',
                notes=(f'top-1 {top1} on ImageNet-1k val as reported by the authors',))


_PUBLISHED_ARCHS = {name.split('.')[0] for name in PUBLISHED_WEIGHTS}
default_cfgs = generate_default_cfgs({
    **{name: _cfg(PATCHCONVNET_SIZES[name.split('.')[0]], *weights) for name, weights in PUBLISHED_WEIGHTS.items()},
    **{name: _cfg(size) for name, size in PATCHCONVNET_SIZES.items() if name not in _PUBLISHED_ARCHS}})


def _create(name, pretrained=False, **kwargs):
    size = PATCHCONVNET_SIZES[name]
    model_args = dict(patch_size=size.patch, img_size=size.img, embed_dim=size.dim, depth=size.depth,
                      init_values=size.init_values, multi_class=size.multi_class, num_classes=size.classes)
    return build_model_with_cfg(PatchConvnet, name, pretrained, pretrained_filter_fn=to_our_layout,
                                **dict(model_args, **kwargs))


@register_model
def S60(pretrained=False, **kwargs):
    return _create('S60', pretrained, **kwargs)


@register_model
def S120(pretrained=False, **kwargs):
    return _create('S120', pretrained, **kwargs)


@register_model
def B60(pretrained=False, **kwargs):
    return _create('B60', pretrained, **kwargs)


@register_model
def B120(pretrained=False, **kwargs):
    return _create('B120', pretrained, **kwargs)


@register_model
def L60(pretrained=False, **kwargs):
    return _create('L60', pretrained, **kwargs)


@register_model
def L120(pretrained=False, **kwargs):
    return _create('L120', pretrained, **kwargs)


@register_model
def S60_multi(pretrained=False, **kwargs):
    return _create('S60_multi', pretrained, **kwargs)


@register_model
def patchconvnet_micro_patch4_16(pretrained=False, **kwargs):
    return _create('patchconvnet_micro_patch4_16', pretrained, **kwargs)
