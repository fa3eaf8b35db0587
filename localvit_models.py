"""LocalViT and the 24-hour paper's improved LocalViT feed-forward network.

LocalViT ("LocalViT: Bringing Locality to Vision Transformers") keeps DeiT's attention and replaces the MLP by a
convolutional FFN on the patch grid: 1x1 conv -> depth-wise 3x3 conv -> channel attention -> 1x1 conv, with
BatchNorm after every conv, no LayerNorm before it and no drop path on it. Class (prefix) tokens skip the FFN.
The models are timm VisionTransformers with our block, so dynamic image sizes, position-embedding interpolation,
features, LayerScale (`init_values=`) and the distilled head (timm's VisionTransformerDistilled) all come from timm.

The 24-hour paper ("Ours*") keeps DeiT's block (LayerNorm, drop path, optional LayerScale) and swaps its MLP for
Linear -> act -> depth-wise 3x3 -> act -> optional channel attention -> Linear, without biases or BatchNorm:
`improved_local_mlp()` returns it as a timm `mlp_layer`, e.g.

    timm.create_model('deit_small_patch16_224', mlp_layer=improved_local_mlp('hs', num_prefix_tokens=1),
                      init_values=1e-5)

Activation names follow the original code: 'relu' / 'relu6' / 'hs' (h-swish) for the FFN's activations,
'+se' (squeeze-excitation with an h-sigmoid gate), '+eca' / '+ecah' (ECA with a sigmoid / h-sigmoid gate).
"""
from collections import namedtuple
import math
import re
from functools import partial

import torch
import torch.nn as nn
from timm.layers import EcaModule
from timm.models import (VisionTransformer, VisionTransformerDistilled, build_model_with_cfg,
                         generate_default_cfgs, register_model)
from timm.models.vision_transformer import Block, checkpoint_filter_fn

from model_parts import pretrained_cfg, register_layout, renamed, to_our_layout

LOCALVIT_ACTS = ('relu', 'relu6', 'hs', 'hs+se', 'hs+eca', 'hs+ecah')
IMPROVED_LOCALVIT_ACTS = ('relu6', 'hs', 'hs+se', 'hs+eca', 'hs+ecah')  # what `--localvit-act` takes there

# The original code runs ReLU6 for every name without 'hs'; 'relu' here is the plain ReLU its docstring names.
ACTIVATIONS = {'relu': nn.ReLU, 'relu6': nn.ReLU6, 'hs': nn.Hardswish}

# name: (params in millions, GMACs at 224 px or None) as published
PAPER_FIGURES = {
    'localvit_tiny_patch16_224': (5.91, 1.27),
    'localvit_tiny_se4_patch16_224': (9.38, None),
    'localvit_small_patch16_224': (22.43, 4.62),
}
# timm model name + improved_localvit_options(act='hs'): (params in millions, GMACs at 224 px) as published
IMPROVED_PAPER_FIGURES = {'deit_small_patch16_224': (22.23, 4.62)}
# What the 24-hour code's DeiT-S + 'hs' model trains, and what its 22.23M also counts: two BatchNorm1d layers per
# FFN and two head-mixing Linear(6, 6) layers per attention that its forward pass never calls.
IMPROVED_CODE_PARAMS = {'deit_small_patch16_224': (22_179_688, 47_088)}


def parse_act(act, allowed):
    """'hs+se' -> (nn.Hardswish, 'se'); raises ValueError for a name outside `allowed`."""
    if act not in allowed:
        raise ValueError(f"unknown LocalViT activation {act!r}: choose one of {', '.join(allowed)}")
    name, _, attention = act.partition('+')
    return ACTIVATIONS[name], attention


def split_prefix(x, num_prefix_tokens):
    """(B, N, C) -> (B, P, C) prefix tokens, (B, S * S, C) patch tokens and the grid side S."""
    num_patches = x.shape[1] - num_prefix_tokens
    side = math.isqrt(max(num_patches, 0))
    if num_patches < 1 or side * side != num_patches:
        raise ValueError(f'LocalViT FFN needs a square patch grid, got {num_patches} patch tokens '
                         f'({x.shape[1]} tokens, {num_prefix_tokens} prefix): use square images '
                         f'or fix num_prefix_tokens')
    return x[:, :num_prefix_tokens], x[:, num_prefix_tokens:], side


def tokens_to_grid(x, side):
    """(B, S * S, C) -> (B, C, S, S)."""
    B, L, C = x.shape
    return x.transpose(1, 2).reshape(B, C, side, side)


def grid_to_tokens(grid):
    """(B, C, H, W) -> (B, H * W, C)."""
    return grid.flatten(2).transpose(1, 2)


class SqueezeExcite(nn.Module):
    """Channel gate of LocalViT: mean over the grid -> Linear -> ReLU -> Linear -> h-sigmoid."""

    def __init__(self, channels, reduction):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(channels // reduction, channels)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):  # (B, C, H, W)
        weights = self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3))))))  # (B, C)
        return x * weights[:, :, None, None]


def channel_attention(kind, channels, se_reduction):
    """The optional module after the depth-wise conv: '' (none), 'se', 'eca' or 'ecah'."""
    if kind == 'se':
        return SqueezeExcite(channels, se_reduction)
    if kind in ('eca', 'ecah'):
        return EcaModule(channels, gate_layer='sigmoid' if kind == 'eca' else 'hard_sigmoid')
    return nn.Identity()


class PatchGridFFN(nn.Module):
    """An FFN that runs on the patch grid only: prefix (class, distillation) tokens get a zero update.

    Inside a residual block that means they bypass it, as LocalViT's block splits them off before its FFN.
    """

    def __init__(self, num_prefix_tokens):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x):  # (B, N, C) -> (B, N, C)
        prefix, patches, side = split_prefix(x, self.num_prefix_tokens)
        return torch.cat([torch.zeros_like(prefix), self.forward_patches(patches, side)], dim=1)

    def forward_patches(self, patches, side):  # (B, S * S, C) -> (B, S * S, C)
        raise NotImplementedError


class LocalityFeedForward(PatchGridFFN):
    """LocalViT's FFN: 1x1 conv + BN + act -> depth-wise 3x3 + BN + act -> channel attention -> 1x1 conv + BN."""

    def __init__(self, in_features, hidden_features, act='hs+se', se_reduction=4, num_prefix_tokens=1,
                 drop=0., **ignored):
        super().__init__(num_prefix_tokens)
        act_layer, attention = parse_act(act, LOCALVIT_ACTS)
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(hidden_features)
        self.act1 = act_layer()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features, bias=False)
        self.norm2 = nn.BatchNorm2d(hidden_features)
        self.act2 = act_layer()
        self.attn = channel_attention(attention, hidden_features, se_reduction)
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(in_features)
        self.drop = nn.Dropout(drop)

    def forward_patches(self, patches, side):
        x = self.act1(self.norm1(self.fc1(tokens_to_grid(patches, side))))  # (B, hidden, S, S)
        x = self.attn(self.act2(self.norm2(self.dwconv(x))))
        return self.drop(grid_to_tokens(self.norm3(self.fc2(x))))


class ImprovedLocalMlp(PatchGridFFN):
    """The 24-hour paper's FFN: Linear + act -> depth-wise 3x3 + act -> channel attention -> Linear, no biases."""

    def __init__(self, in_features, hidden_features, act='hs', num_prefix_tokens=1, se_reduction=None,
                 drop=0., **ignored):
        super().__init__(num_prefix_tokens)
        act_layer, attention = parse_act(act, IMPROVED_LOCALVIT_ACTS)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act1 = act_layer()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features, bias=False)
        self.act2 = act_layer()
        # the 24-hour code sets the SE reduction to in_features // 4 (a 16-wide SE for mlp_ratio 4)
        self.attn = channel_attention(attention, hidden_features, se_reduction or in_features // 4)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=False)
        self.drop = nn.Dropout(drop)

    def forward_patches(self, patches, side):
        x = tokens_to_grid(self.act1(self.fc1(patches)), side)  # (B, hidden, S, S)
        x = self.attn(self.act2(self.dwconv(x)))
        return self.drop(self.fc2(grid_to_tokens(x)))


def improved_localvit_options(act='hs', num_prefix_tokens=1):
    """timm.create_model keyword arguments for the 24-hour paper's model on a DeiT / ViT: its local FFN, and its
    attention's q, k and v without bias. Apply init_like_24h_code() to the built model."""
    return {'mlp_layer': improved_local_mlp(act=act, num_prefix_tokens=num_prefix_tokens), 'qkv_bias': False}


@torch.no_grad()
def init_like_24h_code(model):
    """The 24-hour code's initialisation: Xavier-normal weights in every linear layer (q, k and v as the three
    separate matrices that code has; the classifiers too) with PyTorch's default biases, a Xavier-normal class token
    and position embedding (truncated normal, std 0.02, for distilled models, as DeiT's), PyTorch's default
    convolutions and unit LayerNorms."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weights = module.weight.chunk(3) if name.endswith('attn.qkv') else (module.weight,)
            for weight in weights:
                nn.init.xavier_normal_(weight)
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if getattr(model, 'cls_token', None) is not None:
        nn.init.xavier_normal_(model.cls_token)
    if getattr(model, 'dist_token', None) is not None:
        nn.init.trunc_normal_(model.dist_token, std=.02)
        nn.init.trunc_normal_(model.pos_embed, std=.02)
    elif getattr(model, 'pos_embed', None) is not None:
        nn.init.xavier_normal_(model.pos_embed)
    return model


def improved_local_mlp(act='hs', num_prefix_tokens=1, se_reduction=None):
    """A timm `mlp_layer` for ViT / DeiT / DeiT III blocks: the 24-hour paper's local FFN.

    num_prefix_tokens: 1 for DeiT / DeiT III, 2 for distilled DeiTs (class + distillation token).
    """
    parse_act(act, IMPROVED_LOCALVIT_ACTS)
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f'num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}')
    return partial(ImprovedLocalMlp, act=act, num_prefix_tokens=num_prefix_tokens, se_reduction=se_reduction)


class LocalViTBlock(Block):
    """timm's pre-norm Block with LocalViT's FFN: no LayerNorm before it and no drop path on it.

    x = x + drop_path(ls1(attn(norm1(x)))); x = x + ls2(FFN(x)) on the patch tokens.
    """

    def __init__(self, dim, num_heads, act='hs+se', se_reduction=4, num_prefix_tokens=1, **kwargs):
        kwargs['mlp_layer'] = partial(
            LocalityFeedForward, act=act, se_reduction=se_reduction, num_prefix_tokens=num_prefix_tokens)
        super().__init__(dim, num_heads, **kwargs)
        self.norm2 = nn.Identity()
        self.drop_path2 = nn.Identity()


# ---------------------------------------------------------------- published checkpoint layouts

# ofsoundof/LocalViT keeps the FFN as one Sequential, blocks.i.conv.conv.j; its modules with weights are, in order:
# 1x1 conv, BN, depth-wise 3x3, BN, the channel attention (absent without '+se' / '+eca'), 1x1 conv, BN.
LOCALVIT_FFN_PARTS = ('fc1', 'norm1', 'dwconv', 'norm2', 'attn', 'fc2', 'norm3')
_LOCALVIT_FFN_KEY = re.compile(r'blocks\.(\d+)\.conv\.conv\.(\d+)\.(.+)')


def is_localvit_release(state):
    return 'blocks.0.conv.conv.1.running_var' in state  # BN after the 1x1 conv; the 24-hour code has none


def from_localvit_release(state, own=None):
    """ofsoundof/LocalViT's names (release v1.0.0: localvit_t, localvit_t_se4, localvit_s) -> ours."""
    matches = {key: _LOCALVIT_FFN_KEY.fullmatch(key) for key in state}
    modules = {}  # block -> indices of its FFN modules that hold weights
    for match in filter(None, matches.values()):
        modules.setdefault(match[1], set()).add(int(match[2]))
    out = {}
    for key, value in state.items():
        match = matches[key]
        order = sorted(modules[match[1]]) if match else ()
        parts = [p for p in LOCALVIT_FFN_PARTS if len(order) == 7 or p != 'attn']
        if match and len(order) == len(parts):
            block, index, rest = match.groups()
            rest = re.sub(r'^fc\.0\.', 'fc1.', re.sub(r'^fc\.2\.', 'fc2.', rest))  # SE: Linear, ReLU, Linear
            key = f'blocks.{block}.mlp.{parts[order.index(int(index))]}.{rest}'
        out[key] = value
    return out


def is_24h_code(state):
    return 'blocks.0.attn.toq.weight' in state


# Weights the 24-hour code saves but never uses (head-mixing Linears, the FFN's BatchNorm1d layers), and second
# names of shared modules (its FFN holds the block's norm2 and gamma_2).
_24H_UNUSED = re.compile(r'blocks\.\d+\.(attn\.proj_[lw]\.|conv\.bn[12]\.|conv\.layernorm\.|conv\.gamma_2$)')
_24H_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r'\.gamma_([12])$', r'.ls\1.gamma'),
    (r'\.conv\.fc([12])\.', r'.mlp.fc\1.'),
    (r'\.conv\.conv\.0\.', '.mlp.dwconv.'),
    (r'\.conv\.conv\.2\.fc\.0\.', '.mlp.attn.fc1.'),
    (r'\.conv\.conv\.2\.fc\.2\.', '.mlp.attn.fc2.'),
    (r'\.conv\.conv\.2\.conv\.', '.mlp.attn.conv.'))]


def from_24h_code(state, own):
    """BorealisAI/efficient-vit-training's DeiT (with --localvit, --layerscale or neither) -> timm's DeiT with
    improved_localvit_options()."""
    merged = _merged_qkv(state, own)
    kept = {key: value for key, value in state.items() if not _24H_UNUSED.match(key)}
    return renamed({**kept, **merged}, _24H_RENAMES)


def _merged_qkv(state, own):
    """Pops the separate bias-free q, k and v weights of each block out of `state` and returns them as one qkv,
    with a zero bias where the model has one (which computes the same)."""
    merged = {}
    for key in [k for k in state if k.endswith('.attn.toq.weight')]:
        attn = key[:-len('toq.weight')]
        names = [f'{attn}{part}.weight' for part in ('toq', 'tok', 'tov')]
        if all(name in state for name in names):
            merged[attn + 'qkv.weight'] = torch.cat([state.pop(name) for name in names])
            if attn + 'qkv.bias' in own:
                merged[attn + 'qkv.bias'] = own[attn + 'qkv.bias'].new_zeros(own[attn + 'qkv.bias'].shape)
    return merged


register_layout('LocalViT (ofsoundof/LocalViT)', is_localvit_release, from_localvit_release)
register_layout('24-hour ViT (BorealisAI/efficient-vit-training)', is_24h_code, from_24h_code)


# ---------------------------------------------------------------- sizes and registration

Size = namedtuple('Size', 'patch img dim depth heads se_reduction distilled')
LOCALVIT_SIZES = {
    'localvit_tiny_patch16_224': Size(16, 224, 192, 12, 4, 192, False),
    'localvit_tiny_se4_patch16_224': Size(16, 224, 192, 12, 4, 4, False),
    'localvit_small_patch16_224': Size(16, 224, 384, 12, 8, 384, False),
    'localvit_tiny_patch4_32': Size(4, 32, 192, 12, 4, 192, False),
    'localvit_micro_patch2_16': Size(2, 16, 48, 2, 2, 48, False),  # the test size: seconds on a CPU
    'localvit_tiny_distilled_patch16_224': Size(16, 224, 192, 12, 4, 192, True),
    'localvit_small_distilled_patch16_224': Size(16, 224, 384, 12, 8, 384, True),
    'localvit_tiny_distilled_patch4_32': Size(4, 32, 192, 12, 4, 192, True),
    'localvit_micro_distilled_patch2_16': Size(2, 16, 48, 2, 2, 48, True),
}
NUM_CLASSES_BY_IMAGE_SIZE = {224: 1000, 32: 100, 16: 10}


# The authors' ImageNet-1k weights (ofsoundof/LocalViT, release v1.0.0): model -> (file, top-1 the authors report).
# Their evaluation is DeiT's: resize to 256, centre crop 224 (0.875), bicubic, ImageNet mean and std.
RELEASE_URL = 'https://github.com/ofsoundof/LocalViT/releases/download/v1.0.0/'
RELEASED_WEIGHTS = {
    'localvit_tiny_patch16_224': ('localvit_t.pth', 74.84),
    'localvit_tiny_se4_patch16_224': ('localvit_t_se4.pth', 75.74),
    'localvit_small_patch16_224': ('localvit_s.pth', 80.78),
}


def _cfg(name, size):
    cfg = pretrained_cfg(size.img, NUM_CLASSES_BY_IMAGE_SIZE[size.img], size.distilled)
    if name not in RELEASED_WEIGHTS:
        return cfg
    file, top1 = RELEASED_WEIGHTS[name]
    return dict(cfg, url=RELEASE_URL + file, origin_url='https://github.com/ofsoundof/LocalViT',
                paper_ids='arXiv:2104.05707', notes=(f'top-1 {top1} on ImageNet-1k val as reported by the authors',))


default_cfgs = generate_default_cfgs({
    name + ('.in1k' if name in RELEASED_WEIGHTS else ''): _cfg(name, size) for name, size in LOCALVIT_SIZES.items()})


def _create_localvit(name, pretrained=False, act='hs+se', se_reduction=None, **kwargs):
    patch, image_size, dim, depth, heads, reduction, distilled = LOCALVIT_SIZES[name]
    parse_act(act, LOCALVIT_ACTS)
    num_prefix_tokens = int(kwargs.get('class_token', True)) + kwargs.get('reg_tokens', 0) + int(distilled)
    block_fn = partial(LocalViTBlock, act=act, se_reduction=se_reduction or reduction,
                       num_prefix_tokens=num_prefix_tokens)
    model_args = dict(patch_size=patch, img_size=image_size, embed_dim=dim, depth=depth, num_heads=heads,
                      block_fn=block_fn)
    model_cls = VisionTransformerDistilled if distilled else VisionTransformer
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter')
    return build_model_with_cfg(model_cls, name, pretrained, feature_cfg=feature_cfg, pretrained_filter_fn=_filter,
                                **dict(model_args, **kwargs))


def _filter(checkpoint, model):
    """A downloaded file under our names, its position embedding resized to the model's grid (timm's filter)."""
    return checkpoint_filter_fn(to_our_layout(checkpoint, model), model)


@register_model
def localvit_tiny_patch16_224(pretrained=False, **kwargs):
    return _create_localvit('localvit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def localvit_tiny_se4_patch16_224(pretrained=False, **kwargs):
    return _create_localvit('localvit_tiny_se4_patch16_224', pretrained, **kwargs)


@register_model
def localvit_small_patch16_224(pretrained=False, **kwargs):
    return _create_localvit('localvit_small_patch16_224', pretrained, **kwargs)


@register_model
def localvit_tiny_patch4_32(pretrained=False, **kwargs):
    return _create_localvit('localvit_tiny_patch4_32', pretrained, **kwargs)


@register_model
def localvit_micro_patch2_16(pretrained=False, **kwargs):
    return _create_localvit('localvit_micro_patch2_16', pretrained, **kwargs)


@register_model
def localvit_tiny_distilled_patch16_224(pretrained=False, **kwargs):
    return _create_localvit('localvit_tiny_distilled_patch16_224', pretrained, **kwargs)


@register_model
def localvit_small_distilled_patch16_224(pretrained=False, **kwargs):
    return _create_localvit('localvit_small_distilled_patch16_224', pretrained, **kwargs)


@register_model
def localvit_tiny_distilled_patch4_32(pretrained=False, **kwargs):
    return _create_localvit('localvit_tiny_distilled_patch4_32', pretrained, **kwargs)


@register_model
def localvit_micro_distilled_patch2_16(pretrained=False, **kwargs):
    return _create_localvit('localvit_micro_distilled_patch2_16', pretrained, **kwargs)
