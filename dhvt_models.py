"""DHVT: "Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on Small Datasets"
(Lu et al., NeurIPS 2022), registered in timm's registry on import.

Three changes to a DeiT make it learn from small datasets:
- SOPE patch embedding: a stack of stride-2 3x3 convolutions with BatchNorm between two learnable affines,
  in place of a patchifying linear layer. There is no absolute position embedding; the convolutions in the
  embedding and in DAFF carry position.
- DAFF feed-forward: a depth-wise convolutional inverted bottleneck over the patch grid; the CLS token skips it
  and is instead rescaled by a squeeze-excitation of the patch outputs.
- HI-MHSA attention: one extra "head token" per head, built from that head's channels averaged over all
  tokens, joins the attention so heads can exchange information; their mean is then added to the CLS token.

BatchNorm layers are plain BatchNorm2d so a model runs in one process; under DDP a trainer may convert them
with torch.nn.SyncBatchNorm.convert_sync_batchnorm. The distilled variants add DeiT's distillation token and
head, with the interface of timm's VisionTransformerDistilled.
"""
from collections import namedtuple
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from model_parts import pretrained_cfg, register_layout, renamed, sope_widths, to_our_layout

__all__ = ['DHVT', 'DHVTDistilled', 'DHVT_SIZES', 'PAPER_FIGURES', 'ORIGINAL_CODE_GMACS']


# ---------------------------------------------------------------- SOPE patch embedding

def _pair(size):
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _square_side(patch_size):
    height, width = _pair(patch_size)
    if height != width:
        raise ValueError(f'DHVT patches are square (got patch_size {patch_size}); pass one int such as {height}')
    return height


class Affine(nn.Module):
    """Learnable per-channel scale and shift of a (B, C, H, W) map.

    Stored as 1-D vectors so optimizers treat them like norm weights (no weight decay)."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class SOPE(nn.Module):
    """Sequence of overlapping patch embeddings: (B, in_chans, H, W) -> (B, D, H / patch, W / patch)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=192):
        super().__init__()
        img_size = _pair(img_size)
        self.patch_size = (patch_size, patch_size)
        self.img_size = img_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, channels = [], in_chans
        for i, width in enumerate(sope_widths(patch_size, embed_dim)):
            if i:
                layers.append(nn.GELU())
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width)]
            channels = width
        if len(layers) == 2:
            layers.append(nn.GELU())  # the single-conv (patch 2) stem ends with an activation, as in DHVT's code
        self.pre_affine = Affine(in_chans)
        self.proj = nn.Sequential(*layers)
        self.post_affine = Affine(embed_dim)

    def forward(self, x):
        return self.post_affine(self.proj(self.pre_affine(x)))


# ---------------------------------------------------------------- HI-MHSA and DAFF

class HeadInteractionAttention(nn.Module):
    """Multi-head self-attention joined by one head token per head; the head tokens' outputs are averaged into
    the prefix (CLS, and distillation) tokens and dropped."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0., proj_drop=0., num_prefix_tokens=1,
                 **kwargs):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}; pick a divisor')
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.head_proj = nn.Linear(self.head_dim, dim)
        self.head_norm = nn.LayerNorm(self.head_dim)
        self.head_embed = nn.Parameter(torch.zeros(1, num_heads, dim))

    def head_tokens(self, x):
        """(B, N, C) -> (B, h, C): each head's channel chunk averaged over tokens, projected to C."""
        B, N, C = x.shape
        chunks = x.view(B, N, self.num_heads, self.head_dim).mean(dim=1)  # (B, h, d)
        tokens = self.head_proj(chunks).view(B, self.num_heads, self.num_heads, self.head_dim)  # h groups of d
        tokens = F.gelu(self.head_norm(tokens)).flatten(2)  # (B, h, C)
        return tokens + self.head_embed

    def forward(self, x):
        B, N, C = x.shape
        h, P = self.num_heads, self.num_prefix_tokens
        x = torch.cat([x, self.head_tokens(x)], dim=1)  # (B, N + h, C)
        q, k, v = self.qkv(x).view(B, N + h, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        x = self.proj(x.transpose(1, 2).reshape(B, N + h, C))  # (B, h, N + h, d) -> (B, N + h, C)
        prefix, patches, heads = x.split([P, N - P, h], dim=1)
        x = torch.cat([prefix + heads.mean(dim=1, keepdim=True), patches], dim=1)
        return self.proj_drop(x)


class DAFF(nn.Module):
    """Dynamic aggregation feed-forward on the (H, W) patch grid; prefix tokens are rescaled, not convolved."""

    def __init__(self, dim, hidden_dim, num_prefix_tokens=1, **kwargs):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.conv1 = nn.Conv2d(dim, hidden_dim, 1)  # point-wise expansion
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)  # depth-wise
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.conv3 = nn.Conv2d(hidden_dim, dim, 1)  # point-wise reduction
        self.bn3 = nn.BatchNorm2d(dim)
        self.compress = nn.Linear(dim, dim // 4)
        self.excitation = nn.Linear(dim // 4, dim)

    def forward(self, x, grid_size):
        B, N, C = x.shape
        prefix, patches = x.split([self.num_prefix_tokens, N - self.num_prefix_tokens], dim=1)
        x = patches.transpose(1, 2).reshape(B, C, *grid_size)  # (B, N - P, C) -> (B, C, H, W)
        x = F.gelu(self.bn1(self.conv1(x)))
        x = x + F.gelu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        # squeeze-excitation without a sigmoid: the patch summary scales the prefix tokens channel-wise
        weight = self.excitation(F.gelu(self.compress(x.mean(dim=(2, 3)))))  # (B, C)
        return torch.cat([prefix * weight.unsqueeze(1), x.flatten(2).transpose(1, 2)], dim=1)


class DHVTBlock(nn.Module):
    """Pre-norm block: HI-MHSA then DAFF, each with optional LayerScale and stochastic depth."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=True, proj_drop=0., attn_drop=0., drop_path=0.,
                 init_values=None, num_prefix_tokens=1, **kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = HeadInteractionAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop, num_prefix_tokens)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DAFF(dim, int(dim * mlp_ratio), num_prefix_tokens)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, grid_size):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), grid_size)))
        return x


# ---------------------------------------------------------------- the model

class DHVT(nn.Module):
    """DHVT classifier: SOPE -> [CLS] + patch tokens -> blocks -> LayerNorm -> head on the CLS token.

    Without a position embedding, any input whose sides are multiples of patch_size works; img_size only sets
    the nominal size reported in patch_embed.
    """
    num_prefix_tokens = 1

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192, depth=12,
                 num_heads=3, mlp_ratio=4., qkv_bias=True, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 init_values=None):
        super().__init__()
        img_size, patch_size = _pair(img_size), _square_side(patch_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f'img_size {img_size} is not a multiple of patch_size {patch_size}; '
                             f'pass a multiple such as {max(img_size[0] // patch_size, 1) * patch_size}')
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = SOPE(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # grows with depth
        self.blocks = nn.ModuleList([
            DHVTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate, init_values,
                      self.num_prefix_tokens) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        self.apply(_init_linear)
        tokens = self.no_weight_decay()
        for name, param in self.named_parameters():  # in module order, so a seed gives the same weights
            if name in tokens:
                trunc_normal_(param, std=.02)

    @torch.jit.ignore
    def no_weight_decay(self):
        """The learned tokens: CLS, distillation, and each block's head-token embedding."""
        return {n for n, _ in self.named_parameters() if n.endswith(('cls_token', 'dist_token', 'head_embed'))}

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        if global_pool not in (None, '', 'token'):
            raise ValueError(f'DHVT classifies from the CLS token; global_pool {global_pool!r} is not supported')
        self.num_classes = num_classes
        self.head = _new_head(self, num_classes)

    def prefix_tokens(self, batch_size):
        return self.cls_token.expand(batch_size, -1, -1)

    def forward_features(self, x):
        x = self.patch_embed(x)  # (B, C, H, W)
        grid_size = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, H * W, C)
        x = torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1)  # (B, P + H * W, C)
        for block in self.blocks:
            x = block(x, grid_size)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class DHVTDistilled(DHVT):
    """DHVT with DeiT's distillation token and head.

    The distillation token is a second prefix token: it skips DAFF's convolutions and receives the head-token
    mean and the squeeze-excitation like CLS. forward returns (class, distillation) logits in training after
    set_distilled_training(True), and their mean otherwise.
    """
    num_prefix_tokens = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.dist_token, std=.02)
        self.head_dist = _new_head(self, self.num_classes)
        self.distilled_training = False

    @torch.jit.ignore
    def set_distilled_training(self, enable=True):
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head, self.head_dist

    def reset_classifier(self, num_classes, global_pool=None):
        super().reset_classifier(num_classes, global_pool)
        self.head_dist = _new_head(self, num_classes)

    def prefix_tokens(self, batch_size):
        return torch.cat([self.cls_token, self.dist_token], dim=1).expand(batch_size, -1, -1)

    def forward_head(self, x, pre_logits=False):
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2


def _init_linear(module):
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _new_head(model, num_classes):
    """A fresh classifier on the model's device and dtype, in the model's train / eval mode."""
    if num_classes <= 0:
        return nn.Identity()
    token = model.cls_token
    head = nn.Linear(model.embed_dim, num_classes, device=token.device, dtype=token.dtype)
    _init_linear(head)
    return head.train(model.training)


# ---------------------------------------------------------------- the published checkpoint layout

def is_dhvt_code(state):
    return 'blocks.0.attn.ht_proj.weight' in state


# ArieSeirack/DHVT wraps each stem conv with its BatchNorm in a Sequential, GELUs between: proj.(2k).0 / .1 are
# our proj.(3k) / proj.(3k + 1); its head tokens are ht_*, their embedding attn.pos_embed.
_DHVT_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r'^patch_embed\.proj\.(\d+)\.([01])\.', lambda m: f'patch_embed.proj.{int(m[1]) // 2 * 3 + int(m[2])}.'),
    (r'\.attn\.ht_proj\.', '.attn.head_proj.'),
    (r'\.attn\.ht_norm\.', '.attn.head_norm.'),
    (r'\.attn\.pos_embed$', '.attn.head_embed'),
    (r'_affine\.alpha$', '_affine.scale'),
    (r'_affine\.beta$', '_affine.shift'))]


def from_dhvt_code(state, own=None):
    """ArieSeirack/DHVT's names -> ours; its affines are (1, C, 1, 1), ours (C,)."""
    out = renamed(state, _DHVT_RENAMES)
    return {k: v.flatten() if re.search(r'_affine\.(scale|shift)$', k) else v for k, v in out.items()}


register_layout('DHVT (ArieSeirack/DHVT)', is_dhvt_code, from_dhvt_code)


# ---------------------------------------------------------------- sizes and registration

Size = namedtuple('Size', 'patch img dim depth heads classes distilled', defaults=(False,))

# CIFAR-100 (32 px, 100 classes), DomainNet (224 px, 345 classes), ImageNet (224 px, 1000 classes) from the
# paper; the DIGITS and micro test sizes are ours.
DHVT_SIZES = {
    'dhvt_tiny_patch4_32': Size(4, 32, 192, 12, 4, 100),
    'dhvt_small_patch4_32': Size(4, 32, 384, 12, 8, 100),
    'dhvt_tiny_patch2_32': Size(2, 32, 192, 12, 4, 100),
    'dhvt_small_patch2_32': Size(2, 32, 384, 12, 8, 100),
    'dhvt_tiny_domainnet_patch16_224': Size(16, 224, 192, 12, 4, 345),
    'dhvt_small_domainnet_patch16_224': Size(16, 224, 384, 12, 6, 345),
    'dhvt_tiny_patch16_224': Size(16, 224, 192, 12, 3, 1000),
    'dhvt_small_patch16_224': Size(16, 224, 384, 12, 6, 1000),
    'dhvt_tiny_distilled_patch4_32': Size(4, 32, 192, 12, 4, 100, True),
    'dhvt_small_distilled_patch4_32': Size(4, 32, 384, 12, 8, 100, True),
    'dhvt_tiny_distilled_patch2_32': Size(2, 32, 192, 12, 4, 100, True),
    'dhvt_small_distilled_patch2_32': Size(2, 32, 384, 12, 8, 100, True),
    'dhvt_tiny_distilled_patch16_224': Size(16, 224, 192, 12, 3, 1000, True),
    'dhvt_small_distilled_patch16_224': Size(16, 224, 384, 12, 6, 1000, True),
    # the 8x8 DIGITS upsampled to 16 px: a 4x4 grid after the two-conv stem. 8 epochs at lr 1e-3, batch 32
    # reach 98.6-99.2% val top-1 (3 seeds) in about 40 s of training on 2 shared CPU cores
    'dhvt_digits_patch4_16': Size(4, 16, 64, 4, 4, 10),
    'dhvt_micro_patch2_16': Size(2, 16, 48, 2, 2, 10),  # the test size: seconds on a CPU
}

# The paper's figures: (params in millions, GFLOPs as reported, which are multiply-accumulates; None where
# the paper gives none). Parameters match within 3%. Counted with attention matmuls, the reference code gives
# more MACs than the paper reports for patch 2 (1.71 and 6.20 G); ours match the reference code's counts.
PAPER_FIGURES = {
    'dhvt_tiny_patch4_32': (6.0, 0.4),
    'dhvt_small_patch4_32': (23.4, 1.5),
    'dhvt_tiny_patch2_32': (5.8, 1.4),
    'dhvt_small_patch2_32': (22.8, 5.6),
    'dhvt_tiny_domainnet_patch16_224': (6.1, None),
    'dhvt_small_domainnet_patch16_224': (23.8, None),
    'dhvt_tiny_patch16_224': (6.2, 1.4),
    'dhvt_small_patch16_224': (23.8, 5.1),
}
# The paper's GFLOPs for patch 2 disagree with its own code; these are what that code computes (and we match).
ORIGINAL_CODE_GMACS = {'dhvt_tiny_patch2_32': 1.71, 'dhvt_small_patch2_32': 6.20}


default_cfgs = generate_default_cfgs({
    name: pretrained_cfg(size.img, size.classes, size.distilled, first_conv='patch_embed.proj.0')
    for name, size in DHVT_SIZES.items()})


def _create_dhvt(name, pretrained=False, device=None, dtype=None, **kwargs):
    size = DHVT_SIZES[name]
    model_args = dict(patch_size=size.patch, img_size=size.img, embed_dim=size.dim, depth=size.depth,
                      num_heads=size.heads, num_classes=size.classes)
    model_cls = DHVTDistilled if size.distilled else DHVT
    model = build_model_with_cfg(model_cls, name, pretrained, pretrained_filter_fn=to_our_layout,
                                 **dict(model_args, **kwargs))
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


@register_model
def dhvt_tiny_patch4_32(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_tiny_patch4_32', pretrained, **kwargs)


@register_model
def dhvt_small_patch4_32(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_small_patch4_32', pretrained, **kwargs)


@register_model
def dhvt_tiny_patch2_32(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_tiny_patch2_32', pretrained, **kwargs)


@register_model
def dhvt_small_patch2_32(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_small_patch2_32', pretrained, **kwargs)


@register_model
def dhvt_tiny_domainnet_patch16_224(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_tiny_domainnet_patch16_224', pretrained, **kwargs)


@register_model
def dhvt_small_domainnet_patch16_224(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_small_domainnet_patch16_224', pretrained, **kwargs)


@register_model
def dhvt_tiny_patch16_224(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_tiny_patch16_224', pretrained, **kwargs)


@register_model
def dhvt_small_patch16_224(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_small_patch16_224', pretrained, **kwargs)


@register_model
def dhvt_tiny_distilled_patch4_32(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_tiny_distilled_patch4_32', pretrained, **kwargs)


@register_model
def dhvt_small_distilled_patch4_32(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_small_distilled_patch4_32', pretrained, **kwargs)


@register_model
def dhvt_tiny_distilled_patch2_32(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_tiny_distilled_patch2_32', pretrained, **kwargs)


@register_model
def dhvt_small_distilled_patch2_32(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_small_distilled_patch2_32', pretrained, **kwargs)


@register_model
def dhvt_tiny_distilled_patch16_224(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_tiny_distilled_patch16_224', pretrained, **kwargs)


@register_model
def dhvt_small_distilled_patch16_224(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_small_distilled_patch16_224', pretrained, **kwargs)


@register_model
def dhvt_digits_patch4_16(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_digits_patch4_16', pretrained, **kwargs)


@register_model
def dhvt_micro_patch2_16(pretrained=False, **kwargs):
    return _create_dhvt('dhvt_micro_patch2_16', pretrained, **kwargs)
