"""EViT: a DeiT that keeps only the patch tokens its class token attends to.

"Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations" (Liang et al.,
ICLR 2022). At each keep layer (blocks 3, 6 and 9 by default), between the attention residual and the MLP,
the ceil(rate x (N - 1)) non-class tokens with the highest class-token attention (mean over heads) stay;
with fuse_token=True the others are merged into one extra token, weighted by that attention. Nothing else
changes, so the model is a timm VisionTransformer with these blocks: DeiT checkpoints load into it strictly
and timm's features (dynamic image size, pretrained loading, no_weight_decay) apply unchanged.

    model = timm.create_model('evit_small_patch16_224', keep_rate=0.7, fuse_token=True)
    model.set_keep_rate(keep_rate_at(step, steps_per_epoch, 0.7, 10, 100))  # the warm-up, every step
    model.record_keep = True  # then model.kept_indices after each forward: kept patches per keep layer
"""
from collections import namedtuple
import math
from numbers import Real

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

from model_parts import pretrained_cfg
from timm.models.vision_transformer import checkpoint_filter_fn

Size = namedtuple('Size', 'patch img dim depth heads keep_layers')
EVIT_SIZES = {
    'evit_small_patch16_224': Size(16, 224, 384, 12, 6, (3, 6, 9)),
    'evit_base_patch16_224': Size(16, 224, 768, 12, 12, (3, 6, 9)),
    'evit_micro_patch2_16': Size(2, 16, 48, 4, 2, (1, 2)),  # the test size: seconds on a CPU
}

# name: (params in millions, GMACs) reported for keep rate 0.7 with token fusion
PAPER_FIGURES = {
    'evit_small_patch16_224': (22.1, 3.0),
    'evit_base_patch16_224': (86.6, 11.6),
}

# Block options timm may pass that would change a DeiT block: EViT supports only their DeiT values.
_DEIT_BLOCK_OPTIONS = {'init_values': None, 'qk_norm': False, 'scale_attn_norm': False, 'scale_mlp_norm': False,
                       'proj_bias': True}


def keep_rate_at(step, steps_per_epoch, base_keep_rate, shrink_start_epoch, shrink_epochs):
    """EViT's keep-rate warm-up at a global training step (epoch * steps_per_epoch + step in epoch).

    1.0 before shrink_start_epoch, then a per-step cosine from 1.0 down to base_keep_rate over shrink_epochs
    epochs, then base_keep_rate.
    """
    if steps_per_epoch < 1:
        raise ValueError(f'steps_per_epoch must be at least 1, got {steps_per_epoch}')
    _check_rate(base_keep_rate)
    epoch = step // steps_per_epoch
    if epoch < shrink_start_epoch:
        return 1.0
    if epoch >= shrink_start_epoch + shrink_epochs:
        return float(base_keep_rate)
    progress = (step - shrink_start_epoch * steps_per_epoch) / (shrink_epochs * steps_per_epoch)
    return base_keep_rate + (1 - base_keep_rate) * 0.5 * (1 + math.cos(math.pi * progress))


class KeepRateSchedule:
    """EViT's per-update keep-rate warm-up (keep_rate_at), applied to the model and its EMA before every update.

    With `patch_counts` (the patches per image at every size the run trains and evaluates at), a new rate is set
    only when it keeps other token counts than the rate set before at one of them: the forward pass is the same,
    and torch.compile, which specialises on the rate, compiles once per distinct set of kept-token counts instead
    of at every update."""

    def __init__(self, models, updates_per_epoch, base_keep_rate, shrink_start_epoch, shrink_epochs,
                 patch_counts=None):
        self.models, self.updates_per_epoch, self.base = models, updates_per_epoch, base_keep_rate
        self.start, self.epochs, self.patch_counts = shrink_start_epoch, shrink_epochs, patch_counts

    def __call__(self, step):
        rate = keep_rate_at(step, self.updates_per_epoch, self.base, self.start, self.epochs)
        for model in self.models:
            if self.patch_counts is None or self.kept(model, rate) != self.kept(model, model.keep_rates):
                model.set_keep_rate(rate)

    def kept(self, model, rate):
        return [model.kept_token_counts(n, rate) for n in self.patch_counts]


def kept_tokens(rate, num_tokens):
    """How many of num_tokens non-class tokens a keep layer at `rate` keeps; None when all of them."""
    # round() so that float noise (0.7 * 10 = 7.000000000000001) does not keep one token more
    kept = max(1, math.ceil(round(rate * num_tokens, 6)))
    return kept if kept < num_tokens else None


def _check_rate(rate):
    if isinstance(rate, bool) or not isinstance(rate, Real) or not 0 < rate <= 1:
        raise ValueError(f'keep rate must be a number in (0, 1], got {rate!r}')


class EViTAttention(nn.Module):
    """timm's Attention (same parameter names) that can also return the class token's attention row."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, with_cls_attn=False):
        """x (B, N, C) -> (output (B, N, C), class-token attention (B, N - 1) or None)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, d) each
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return out, self.cls_attention(q, k) if with_cls_attn else None

    def cls_attention(self, q, k):
        """Row 0 of softmax(q k^T * scale) without the full matrix, averaged over heads: (B, N - 1).

        Taken before attention dropout (DeiT trains without it).
        """
        logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        return logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)


class EViTBlock(nn.Module):
    """timm's pre-norm Block; at a keep layer the tokens are reorganised between attention and MLP.

    keep_rate None marks an ordinary block: the model sets keep_rate, fuse_token and record on keep layers.
    Takes timm's block keyword arguments and ignores those that do not change a DeiT block (device, dtype...).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, proj_drop=0., attn_drop=0., drop_path=0.,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, mlp_layer=Mlp, **timm_options):
        super().__init__()
        for name, deit_value in _DEIT_BLOCK_OPTIONS.items():
            if timm_options.get(name, deit_value) != deit_value:
                raise ValueError(f'EViT blocks are DeiT blocks: {name}={timm_options[name]!r} is not supported; '
                                 f'leave it at {deit_value!r}')
        self.norm1 = norm_layer(dim)
        self.attn = EViTAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.keep_rate = None
        self.fuse_token = False
        self.record = False
        self.recorded = None  # (kept indices (B, k) into this block's non-class tokens, fused token added)

    def forward(self, x):
        num_kept = self.num_kept(x.shape[1] - 1)
        attn_out, cls_attn = self.attn(self.norm1(x), with_cls_attn=num_kept is not None)
        x = x + self.drop_path1(attn_out)
        if num_kept is not None:
            x = self.reorganize(x, cls_attn, num_kept)
        elif self.record and self.keep_rate is not None:
            self.recorded = (torch.arange(x.shape[1] - 1, device=x.device).expand(x.shape[0], -1), False)
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def num_kept(self, num_tokens):
        """How many of num_tokens non-class tokens stay; None when all of them do."""
        return None if self.keep_rate is None else kept_tokens(self.keep_rate, num_tokens)

    def reorganize(self, x, cls_attn, num_kept):
        """Keep the class token and the num_kept most attended tokens, optionally fusing the rest into one.

        x (B, N, C), cls_attn (B, N - 1) -> (B, 1 + num_kept [+ 1 fused], C)
        """
        cls_token, others = x[:, :1], x[:, 1:]
        idx = cls_attn.topk(num_kept, dim=1).indices  # (B, k), most attended first as in EViT
        tokens = [cls_token, others.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))]
        if self.fuse_token:
            dropped_weights = cls_attn.scatter(1, idx, 0.)  # (B, N - 1): zero on the kept tokens
            tokens.append(dropped_weights.unsqueeze(1) @ others)  # (B, 1, C)
        if self.record:
            self.recorded = (idx.detach(), self.fuse_token)
        return torch.cat(tokens, dim=1)


class EViT(VisionTransformer):
    """A timm VisionTransformer whose blocks at drop_loc keep the most attended tokens.

    keep_rate: one rate for every keep layer, one per keep layer, or one per block (1.0 off drop_loc).
    fuse_token: merge the dropped tokens into one extra token weighted by their class-token attention.
    drop_loc: indices of the keep layers (0-indexed blocks).
    """

    def __init__(self, keep_rate=0.7, fuse_token=False, drop_loc=(3, 6, 9), **kwargs):
        super().__init__(block_fn=EViTBlock, **kwargs)
        if self.num_prefix_tokens != 1 or not self.has_class_token:
            raise ValueError('EViT ranks tokens by class-token attention: build it with class_token=True and '
                             'no register tokens')
        self.drop_loc = self._checked_drop_loc(drop_loc)
        self.fuse_token = fuse_token
        for i in self.drop_loc:
            self.blocks[i].fuse_token = fuse_token
        self.record_keep = False
        self.kept_indices = []
        self.set_keep_rate(keep_rate)

    def _checked_drop_loc(self, drop_loc):
        depth = len(self.blocks)
        drop_loc = tuple(drop_loc)
        if not all(isinstance(i, int) and 0 <= i < depth for i in drop_loc) or len(set(drop_loc)) < len(drop_loc):
            raise ValueError(f'drop_loc {drop_loc} must list distinct block indices in 0..{depth - 1}')
        return tuple(sorted(drop_loc))

    @property
    def keep_rates(self):
        """The keep rate of each keep layer, in drop_loc order."""
        return tuple(self.blocks[i].keep_rate for i in self.drop_loc)

    def set_keep_rate(self, keep_rate):
        """Change the keep rate at run time: one number, one per keep layer, or one per block."""
        for i, rate in zip(self.drop_loc, self._rates_per_keep_layer(keep_rate)):
            self.blocks[i].keep_rate = float(rate)

    def kept_token_counts(self, num_patches, keep_rate=None):
        """The non-class tokens leaving each keep layer (a fused token included) for num_patches patches, at
        keep_rate (set_keep_rate's forms) or the rates set now."""
        rates = self.keep_rates if keep_rate is None else self._rates_per_keep_layer(keep_rate)
        counts, tokens = [], num_patches
        for rate in rates:
            kept = kept_tokens(rate, tokens)
            tokens = tokens if kept is None else kept + (1 if self.fuse_token else 0)
            counts.append(tokens)
        return tuple(counts)

    def _rates_per_keep_layer(self, keep_rate):
        if isinstance(keep_rate, Real):
            rates = (keep_rate,) * len(self.drop_loc)
        elif len(keep_rate) == len(self.drop_loc):
            rates = tuple(keep_rate)
        elif len(keep_rate) == len(self.blocks):
            if any(rate != 1 for i, rate in enumerate(keep_rate) if i not in self.drop_loc):
                raise ValueError(f'keep_rate {tuple(keep_rate)} drops tokens outside drop_loc {self.drop_loc}; '
                                 'add those blocks to drop_loc or set their rate to 1.0')
            rates = tuple(keep_rate[i] for i in self.drop_loc)
        else:
            raise ValueError(f'keep_rate needs 1, {len(self.drop_loc)} (one per keep layer) or {len(self.blocks)} '
                             f'(one per block) values, got {len(keep_rate)}')
        for rate in rates:
            _check_rate(rate)
        return rates

    @property
    def record_keep(self):
        return self._record_keep

    @record_keep.setter
    def record_keep(self, record):
        self._record_keep = bool(record)
        for i in self.drop_loc:
            self.blocks[i].record = self._record_keep

    def forward_features(self, x):
        x = super().forward_features(x)
        if self.record_keep:
            self.kept_indices = self._kept_on_patch_grid()
        return x

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def _kept_on_patch_grid(self):
        """Per keep layer, the kept tokens as (B, k) indices into the row-major patch grid; -1 is the fused token."""
        kept_indices, origins = [], None  # origins[b, j]: grid index of the keep layer's non-class token j
        for i in self.drop_loc:
            idx, fused = self.blocks[i].recorded
            kept = idx if origins is None else origins.gather(1, idx)
            kept_indices.append(kept)
            origins = torch.cat([kept, kept.new_full((kept.shape[0], 1), -1)], dim=1) if fused else kept
        return kept_indices


def _cfg(size, num_classes, **kwargs):
    return pretrained_cfg(size, num_classes, crop_pct=0.9 if size == 224 else 1.0, fixed_input_size=size == 224,
                          license='apache-2.0', origin_url='https://github.com/youweiliang/evit',
                          paper_name='Not All Patches are What You Need: Expediting Vision Transformers via Token '
                                     'Reorganizations', paper_ids='arXiv:2202.07800', **kwargs)


def _deit_weights(deit_name, checkpoint):
    """DeiT's ImageNet-1k weights (EViT's own are not in a hub): a start for EViT fine-tuning, as its finetune.sh."""
    return dict(hf_hub_id=f'timm/{deit_name}.fb_in1k', url=f'https://dl.fbaipublicfiles.com/deit/{checkpoint}',
                notes=(f'weights of {deit_name} (DeiT, not EViT): a starting point for EViT fine-tuning',))


default_cfgs = generate_default_cfgs({
    'evit_small_patch16_224.deit_in1k': _cfg(224, 1000, **_deit_weights(
        'deit_small_patch16_224', 'deit_small_patch16_224-cd65a155.pth')),
    'evit_base_patch16_224.deit_in1k': _cfg(224, 1000, **_deit_weights(
        'deit_base_patch16_224', 'deit_base_patch16_224-b5f2ef4d.pth')),
    'evit_micro_patch2_16': _cfg(16, 10),
})


def _create_evit(name, pretrained=False, **kwargs):
    patch, img, dim, depth, heads, drop_loc = EVIT_SIZES[name]
    model_args = dict(patch_size=patch, img_size=img, embed_dim=dim, depth=depth, num_heads=heads, drop_loc=drop_loc)
    return build_model_with_cfg(EViT, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **dict(model_args, **kwargs))


@register_model
def evit_small_patch16_224(pretrained=False, **kwargs):
    return _create_evit('evit_small_patch16_224', pretrained, **kwargs)


@register_model
def evit_base_patch16_224(pretrained=False, **kwargs):
    return _create_evit('evit_base_patch16_224', pretrained, **kwargs)


@register_model
def evit_micro_patch2_16(pretrained=False, **kwargs):
    return _create_evit('evit_micro_patch2_16', pretrained, **kwargs)
