"""Published checkpoint layouts: each family's official parameter names and shapes, read from the authors' code
for a small configuration and written out here, load strictly into our model through checkpoints.load_weights and
compute what our model computes from the same numbers under our own names. Nothing downloads."""
import argparse
import os
import re
import sys
import urllib.error

import pytest
import timm
import torch
from PIL import Image

import checkpoints
import localvit_models
import main
import model_factory
from conftest import ROOT, TINY, run_main
from utils import UserError


@pytest.fixture(autouse=True)
def own_download_cache(monkeypatch, tmp_path):
    """timm's downloads (file:// URLs here) land in this test's folder, never in the user's cache."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))


X16, X32 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), \
    torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def bn(official, ours, width):
    """A BatchNorm's five entries under the official prefix and ours (None: the model has no use for them)."""
    return [(f'{official}.{name}', ours and f'{ours}.{name}', shape) for name, shape in (
        ('weight', (width,)), ('bias', (width,)), ('running_mean', (width,)), ('running_var', (width,)),
        ('num_batches_tracked', ()))]


def per_block(rows, depth):
    """Rows written for block {i}, repeated for each block."""
    return [(official.format(i=i), ours and ours.format(i=i), shape) for i in range(depth)
            for official, ours, shape in rows]


def random_state(rows, seed=0):
    """The official names filled with random numbers: running variances positive, counters integers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for official, _, shape in rows:
        if official.endswith('num_batches_tracked'):
            state[official] = torch.tensor(7)
        elif official.endswith('running_var'):
            state[official] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[official] = torch.randn(shape, generator=generator) * 0.3
    return state


def under_our_names(rows, state, model):
    """The same numbers under our names (the rows say where each goes; None: a tensor the model has no use for),
    shaped as our tensors."""
    own = model.state_dict()
    return {ours: state[official].reshape(own[ours].shape) for official, ours, _ in rows if ours}


def load_both(name, rows, state, tmp_path, capsys, extra=None, **kwargs):
    """Our model loaded from the official file by load_weights, and our model given the same numbers directly."""
    path = tmp_path / 'official.pth'
    torch.save({'model': state, 'epoch': 299, 'args': argparse.Namespace(model='their_name')}, path)
    from_file = timm.create_model(name, **kwargs).eval()
    checkpoints.load_weights(from_file, str(path), '--resume')
    direct = timm.create_model(name, **kwargs).eval()
    direct.load_state_dict({**under_our_names(rows, state, direct), **(extra or {})}, strict=True)
    return from_file, direct, capsys.readouterr().out


def corrupted_fails(name, state, tmp_path, renamed_from, misshaped, expected_name, **kwargs):
    """A tensor renamed, then a tensor mis-shaped: each is the fit error naming it (the mis-shaped one under our name,
    `expected_name`, and the file's)."""
    model = timm.create_model(name, **kwargs)
    broken = dict(state)
    broken[renamed_from + '_renamed'] = broken.pop(renamed_from)
    torch.save(broken, tmp_path / 'renamed.pth')
    with pytest.raises(UserError, match=f'does not fit .*it holds .*{re.escape(renamed_from)}_renamed'):
        checkpoints.load_weights(model, str(tmp_path / 'renamed.pth'), '--resume')
    broken = dict(state)
    broken[misshaped] = broken[misshaped][:-1]
    torch.save(broken, tmp_path / 'misshaped.pth')
    shown = re.escape(expected_name if expected_name == misshaped else f'{expected_name} ({misshaped} in the file)')
    with pytest.raises(UserError, match=f'does not fit .*: (read as .* layout, )?{shown} is') as info:
        checkpoints.load_weights(model, str(tmp_path / 'misshaped.pth'), '--resume')
    assert '\n' not in str(info.value)


# ---------------------------------------------------------------- LocalViT (ofsoundof/LocalViT, models/localvit.py)

def localvit_rows(dim=48, depth=2, se_hidden=4, tokens=65, patch=2, classes=10):
    """LocalVisionTransformer (timm 0.3.2's VisionTransformer with LocalViT's Block); act 'hs+se'."""
    hidden = 4 * dim
    top = [('cls_token', 'cls_token', (1, 1, dim)), ('pos_embed', 'pos_embed', (1, tokens, dim)),
           ('patch_embed.proj.weight', 'patch_embed.proj.weight', (dim, 3, patch, patch)),
           ('patch_embed.proj.bias', 'patch_embed.proj.bias', (dim,)),
           ('norm.weight', 'norm.weight', (dim,)), ('norm.bias', 'norm.bias', (dim,)),
           ('head.weight', 'head.weight', (classes, dim)), ('head.bias', 'head.bias', (classes,))]
    block = [('blocks.{i}.norm1.weight', 'blocks.{i}.norm1.weight', (dim,)),
             ('blocks.{i}.norm1.bias', 'blocks.{i}.norm1.bias', (dim,)),
             ('blocks.{i}.attn.qkv.weight', 'blocks.{i}.attn.qkv.weight', (3 * dim, dim)),
             ('blocks.{i}.attn.qkv.bias', 'blocks.{i}.attn.qkv.bias', (3 * dim,)),
             ('blocks.{i}.attn.proj.weight', 'blocks.{i}.attn.proj.weight', (dim, dim)),
             ('blocks.{i}.attn.proj.bias', 'blocks.{i}.attn.proj.bias', (dim,)),
             ('blocks.{i}.conv.conv.0.weight', 'blocks.{i}.mlp.fc1.weight', (hidden, dim, 1, 1)),
             *bn('blocks.{i}.conv.conv.1', 'blocks.{i}.mlp.norm1', hidden),
             ('blocks.{i}.conv.conv.3.weight', 'blocks.{i}.mlp.dwconv.weight', (hidden, 1, 3, 3)),
             *bn('blocks.{i}.conv.conv.4', 'blocks.{i}.mlp.norm2', hidden),
             ('blocks.{i}.conv.conv.6.fc.0.weight', 'blocks.{i}.mlp.attn.fc1.weight', (se_hidden, hidden)),
             ('blocks.{i}.conv.conv.6.fc.0.bias', 'blocks.{i}.mlp.attn.fc1.bias', (se_hidden,)),
             ('blocks.{i}.conv.conv.6.fc.2.weight', 'blocks.{i}.mlp.attn.fc2.weight', (hidden, se_hidden)),
             ('blocks.{i}.conv.conv.6.fc.2.bias', 'blocks.{i}.mlp.attn.fc2.bias', (hidden,)),
             ('blocks.{i}.conv.conv.7.weight', 'blocks.{i}.mlp.fc2.weight', (dim, hidden, 1, 1)),
             *bn('blocks.{i}.conv.conv.8', 'blocks.{i}.mlp.norm3', dim)]
    return top + per_block(block, depth)


def test_localvit_release_layout_loads_and_computes_the_same(tmp_path, capsys):
    rows = localvit_rows()
    state = random_state(rows)
    from_file, direct, out = load_both('localvit_micro_patch2_16', rows, state, tmp_path, capsys)
    assert 'LocalViT (ofsoundof/LocalViT) layout' in out
    assert torch.equal(from_file(X16), direct(X16))


@pytest.mark.parametrize('name, dim, se_hidden', [('localvit_tiny_patch16_224', 192, 4),
                                                  ('localvit_tiny_se4_patch16_224', 192, 192),
                                                  ('localvit_small_patch16_224', 384, 4)])
def test_each_released_file_layout_fits_its_model(name, dim, se_hidden, tmp_path):
    """localvit_t (r192), localvit_t_se4 (r4) and localvit_s (r384) at full size: SE widths 768/192, 768/4, 1536/384."""
    rows = localvit_rows(dim=dim, depth=12, se_hidden=se_hidden, tokens=197, patch=16, classes=1000)
    torch.save({'model': random_state(rows)}, tmp_path / 'release.pth')
    checkpoints.load_weights(timm.create_model(name), str(tmp_path / 'release.pth'), '--resume')


def test_localvit_corrupted_layout_is_the_fit_error(tmp_path):
    corrupted_fails('localvit_micro_patch2_16', random_state(localvit_rows()), tmp_path,
                    'blocks.1.conv.conv.7.weight', 'blocks.0.conv.conv.3.weight', 'blocks.0.mlp.dwconv.weight')


def test_localvit_release_loads_through_timms_pretrained_path(tmp_path):
    """timm.create_model(pretrained=True) maps the file too (its pretrained_filter_fn), here at another input size."""
    rows = localvit_rows()
    state = random_state(rows)
    path = tmp_path / 'localvit_t.pth'
    torch.save({'model': state}, path)
    model = timm.create_model('localvit_micro_patch2_16', pretrained=True,
                              pretrained_cfg_overlay={'url': path.as_uri()})
    direct = timm.create_model('localvit_micro_patch2_16')
    direct.load_state_dict(under_our_names(rows, state, direct))
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in model.state_dict().items())
    resized = timm.create_model('localvit_micro_patch2_16', pretrained=True, img_size=32,
                                pretrained_cfg_overlay={'url': path.as_uri()})
    assert resized.pos_embed.shape == (1, 257, 48)


# ---------------------------------------------------------------- the 24-hour code (BorealisAI/efficient-vit-training)

def improved_localvit_rows(dim=48, depth=2, heads=2, se_hidden=16, classes=10):
    """models_vit/vision_transformer_all.py's VisionTransformer with localvit=True, localvit_act='hs+se',
    layerscale=True: separate bias-free q, k, v; its FFN also lists the block's norm2 and gamma_2 under conv.*."""
    hidden = 4 * dim
    top = [('cls_token', 'cls_token', (1, 1, dim)), ('pos_embed', 'pos_embed', (1, 65, dim)),
           ('patch_embed.proj.weight', 'patch_embed.proj.weight', (dim, 3, 2, 2)),
           ('patch_embed.proj.bias', 'patch_embed.proj.bias', (dim,)),
           ('norm.weight', 'norm.weight', (dim,)), ('norm.bias', 'norm.bias', (dim,)),
           ('head.weight', 'head.weight', (classes, dim)), ('head.bias', 'head.bias', (classes,))]
    block = [('blocks.{i}.gamma_1', 'blocks.{i}.ls1.gamma', (dim,)),
             ('blocks.{i}.gamma_2', 'blocks.{i}.ls2.gamma', (dim,)),
             ('blocks.{i}.norm1.weight', 'blocks.{i}.norm1.weight', (dim,)),
             ('blocks.{i}.norm1.bias', 'blocks.{i}.norm1.bias', (dim,)),
             ('blocks.{i}.attn.toq.weight', None, (dim, dim)),
             ('blocks.{i}.attn.tok.weight', None, (dim, dim)),
             ('blocks.{i}.attn.tov.weight', None, (dim, dim)),
             ('blocks.{i}.attn.proj.weight', 'blocks.{i}.attn.proj.weight', (dim, dim)),
             ('blocks.{i}.attn.proj.bias', 'blocks.{i}.attn.proj.bias', (dim,)),
             ('blocks.{i}.attn.proj_l.weight', None, (heads, heads)), ('blocks.{i}.attn.proj_l.bias', None, (heads,)),
             ('blocks.{i}.attn.proj_w.weight', None, (heads, heads)), ('blocks.{i}.attn.proj_w.bias', None, (heads,)),
             ('blocks.{i}.norm2.weight', 'blocks.{i}.norm2.weight', (dim,)),
             ('blocks.{i}.norm2.bias', 'blocks.{i}.norm2.bias', (dim,)),
             ('blocks.{i}.conv.gamma_2', None, (dim,)),
             ('blocks.{i}.conv.conv.0.weight', 'blocks.{i}.mlp.dwconv.weight', (hidden, 1, 3, 3)),
             ('blocks.{i}.conv.conv.2.fc.0.weight', 'blocks.{i}.mlp.attn.fc1.weight', (se_hidden, hidden)),
             ('blocks.{i}.conv.conv.2.fc.0.bias', 'blocks.{i}.mlp.attn.fc1.bias', (se_hidden,)),
             ('blocks.{i}.conv.conv.2.fc.2.weight', 'blocks.{i}.mlp.attn.fc2.weight', (hidden, se_hidden)),
             ('blocks.{i}.conv.conv.2.fc.2.bias', 'blocks.{i}.mlp.attn.fc2.bias', (hidden,)),
             ('blocks.{i}.conv.fc1.weight', 'blocks.{i}.mlp.fc1.weight', (hidden, dim)),
             *bn('blocks.{i}.conv.bn1', None, hidden),
             ('blocks.{i}.conv.fc2.weight', 'blocks.{i}.mlp.fc2.weight', (dim, hidden)),
             *bn('blocks.{i}.conv.bn2', None, dim),
             ('blocks.{i}.conv.layernorm.weight', None, (dim,)), ('blocks.{i}.conv.layernorm.bias', None, (dim,))]
    return top + per_block(block, depth)


def merged_qkv(state, depth=2):
    """Our qkv weight: the 24-hour code's q, k and v weights stacked in that order (timm splits qkv into thirds)."""
    return {f'blocks.{i}.attn.qkv.weight': torch.cat([state[f'blocks.{i}.attn.to{p}.weight'] for p in 'qkv'])
            for i in range(depth)}


IMPROVED = dict(init_values=1e-5, **localvit_models.improved_localvit_options('hs+se'))


def test_24h_code_layout_loads_and_computes_the_same(tmp_path, capsys):
    rows = improved_localvit_rows()
    state = random_state(rows)
    from_file, direct, out = load_both('deit_micro_patch2_16', rows, state, tmp_path, capsys,
                                       extra=merged_qkv(state), **IMPROVED)
    assert '24-hour ViT (BorealisAI/efficient-vit-training) layout' in out
    assert torch.equal(from_file(X16), direct(X16))


def test_24h_code_plain_deit_loads_into_timms_deit_with_a_zero_qkv_bias(tmp_path, capsys):
    """Without --localvit its blocks are DeiT's with bias-free q, k, v: timm's DeiT gets a zero qkv bias."""
    dim, hidden = 48, 192
    rows = [r for r in improved_localvit_rows() if '.conv.' not in r[0] and 'gamma' not in r[0]] + per_block([
        ('blocks.{i}.mlp.fc1.weight', 'blocks.{i}.mlp.fc1.weight', (hidden, dim)),
        ('blocks.{i}.mlp.fc1.bias', 'blocks.{i}.mlp.fc1.bias', (hidden,)),
        ('blocks.{i}.mlp.fc2.weight', 'blocks.{i}.mlp.fc2.weight', (dim, hidden)),
        ('blocks.{i}.mlp.fc2.bias', 'blocks.{i}.mlp.fc2.bias', (dim,))], 2)
    state = random_state(rows)
    zero_bias = {f'blocks.{i}.attn.qkv.bias': torch.zeros(3 * dim) for i in range(2)}
    from_file, direct, _ = load_both('deit_micro_patch2_16', rows, state, tmp_path, capsys,
                                     extra={**merged_qkv(state), **zero_bias})
    assert torch.equal(from_file(X16), direct(X16))


def test_24h_code_corrupted_layout_is_the_fit_error(tmp_path):
    corrupted_fails('deit_micro_patch2_16', random_state(improved_localvit_rows()), tmp_path,
                    'blocks.0.conv.fc2.weight', 'blocks.1.conv.conv.0.weight', 'blocks.1.mlp.dwconv.weight',
                    **IMPROVED)


# ---------------------------------------------------------------- EViT (youweiliang/evit, evit.py)

def evit_rows(dim=48, depth=4, classes=10):
    """EViT keeps DeiT's names: its checkpoints are in timm's layout."""
    top = ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
           'head.weight', 'head.bias']
    shapes = [(1, 1, dim), (1, 65, dim), (dim, 3, 2, 2), (dim,), (dim,), (dim,), (classes, dim), (classes,)]
    block = [('norm1.weight', (dim,)), ('norm1.bias', (dim,)), ('attn.qkv.weight', (3 * dim, dim)),
             ('attn.qkv.bias', (3 * dim,)), ('attn.proj.weight', (dim, dim)), ('attn.proj.bias', (dim,)),
             ('norm2.weight', (dim,)), ('norm2.bias', (dim,)), ('mlp.fc1.weight', (4 * dim, dim)),
             ('mlp.fc1.bias', (4 * dim,)), ('mlp.fc2.weight', (dim, 4 * dim)), ('mlp.fc2.bias', (dim,))]
    return [(name, name, shape) for name, shape in zip(top, shapes)] + per_block(
        [(f'blocks.{{i}}.{name}', f'blocks.{{i}}.{name}', shape) for name, shape in block], depth)


@pytest.mark.parametrize('fuse_token', [False, True])
def test_evit_layout_loads_as_is_with_its_keep_rate(fuse_token, tmp_path, capsys):
    rows = evit_rows()
    state = random_state(rows)
    from_file, direct, out = load_both('evit_micro_patch2_16', rows, state, tmp_path, capsys, keep_rate=0.7,
                                       fuse_token=fuse_token)
    assert 'read as' not in out  # nothing to map
    assert torch.equal(from_file(X16), direct(X16))


def test_evit_corrupted_layout_is_the_fit_error(tmp_path):
    corrupted_fails('evit_micro_patch2_16', random_state(evit_rows()), tmp_path, 'blocks.2.attn.proj.weight',
                    'blocks.3.mlp.fc1.bias', 'blocks.3.mlp.fc1.bias')


# ---------------------------------------------------------------- DHVT (ArieSeirack/DHVT, vision_transformer.py)

def dhvt_rows(stem, dim=48, depth=2, heads=2, classes=10):
    """The DHVT code's VisionTransformer (apply_dhvt=True); `stem`: its SOPE rows for the patch size."""
    hidden, head_dim = 4 * dim, dim // heads
    top = [('cls_token', 'cls_token', (1, 1, dim)),
           ('patch_embed.pre_affine.alpha', 'patch_embed.pre_affine.scale', (1, 3, 1, 1)),
           ('patch_embed.pre_affine.beta', 'patch_embed.pre_affine.shift', (1, 3, 1, 1)),
           ('patch_embed.post_affine.alpha', 'patch_embed.post_affine.scale', (1, dim, 1, 1)),
           ('patch_embed.post_affine.beta', 'patch_embed.post_affine.shift', (1, dim, 1, 1)),
           ('norm.weight', 'norm.weight', (dim,)), ('norm.bias', 'norm.bias', (dim,)),
           ('head.weight', 'head.weight', (classes, dim)), ('head.bias', 'head.bias', (classes,))]
    block = [('blocks.{i}.norm1.weight', 'blocks.{i}.norm1.weight', (dim,)),
             ('blocks.{i}.norm1.bias', 'blocks.{i}.norm1.bias', (dim,)),
             ('blocks.{i}.attn.pos_embed', 'blocks.{i}.attn.head_embed', (1, heads, dim)),
             ('blocks.{i}.attn.qkv.weight', 'blocks.{i}.attn.qkv.weight', (3 * dim, dim)),
             ('blocks.{i}.attn.qkv.bias', 'blocks.{i}.attn.qkv.bias', (3 * dim,)),
             ('blocks.{i}.attn.proj.weight', 'blocks.{i}.attn.proj.weight', (dim, dim)),
             ('blocks.{i}.attn.proj.bias', 'blocks.{i}.attn.proj.bias', (dim,)),
             ('blocks.{i}.attn.ht_proj.weight', 'blocks.{i}.attn.head_proj.weight', (dim, head_dim)),
             ('blocks.{i}.attn.ht_proj.bias', 'blocks.{i}.attn.head_proj.bias', (dim,)),
             ('blocks.{i}.attn.ht_norm.weight', 'blocks.{i}.attn.head_norm.weight', (head_dim,)),
             ('blocks.{i}.attn.ht_norm.bias', 'blocks.{i}.attn.head_norm.bias', (head_dim,)),
             ('blocks.{i}.norm2.weight', 'blocks.{i}.norm2.weight', (dim,)),
             ('blocks.{i}.norm2.bias', 'blocks.{i}.norm2.bias', (dim,)),
             ('blocks.{i}.mlp.conv1.weight', 'blocks.{i}.mlp.conv1.weight', (hidden, dim, 1, 1)),
             ('blocks.{i}.mlp.conv1.bias', 'blocks.{i}.mlp.conv1.bias', (hidden,)),
             ('blocks.{i}.mlp.conv2.weight', 'blocks.{i}.mlp.conv2.weight', (hidden, 1, 3, 3)),
             ('blocks.{i}.mlp.conv2.bias', 'blocks.{i}.mlp.conv2.bias', (hidden,)),
             ('blocks.{i}.mlp.conv3.weight', 'blocks.{i}.mlp.conv3.weight', (dim, hidden, 1, 1)),
             ('blocks.{i}.mlp.conv3.bias', 'blocks.{i}.mlp.conv3.bias', (dim,)),
             *bn('blocks.{i}.mlp.bn1', 'blocks.{i}.mlp.bn1', hidden),
             *bn('blocks.{i}.mlp.bn2', 'blocks.{i}.mlp.bn2', hidden),
             *bn('blocks.{i}.mlp.bn3', 'blocks.{i}.mlp.bn3', dim),
             ('blocks.{i}.mlp.compress.weight', 'blocks.{i}.mlp.compress.weight', (dim // 4, dim)),
             ('blocks.{i}.mlp.compress.bias', 'blocks.{i}.mlp.compress.bias', (dim // 4,)),
             ('blocks.{i}.mlp.excitation.weight', 'blocks.{i}.mlp.excitation.weight', (dim, dim // 4)),
             ('blocks.{i}.mlp.excitation.bias', 'blocks.{i}.mlp.excitation.bias', (dim,))]
    return stem + top + per_block(block, depth)


# patch 2: one conv3x3 (a Sequential of conv and BatchNorm), then GELU
DHVT_STEM_PATCH2 = [('patch_embed.proj.0.0.weight', 'patch_embed.proj.0.weight', (48, 3, 3, 3)),
                    *bn('patch_embed.proj.0.1', 'patch_embed.proj.1', 48)]
# patch 16: four conv3x3 with GELUs between them at proj.1, .3, .5; ours has the BatchNorms flat in the Sequential
DHVT_STEM_PATCH16 = [('patch_embed.proj.0.0.weight', 'patch_embed.proj.0.weight', (6, 3, 3, 3)),
                     *bn('patch_embed.proj.0.1', 'patch_embed.proj.1', 6),
                     ('patch_embed.proj.2.0.weight', 'patch_embed.proj.3.weight', (12, 6, 3, 3)),
                     *bn('patch_embed.proj.2.1', 'patch_embed.proj.4', 12),
                     ('patch_embed.proj.4.0.weight', 'patch_embed.proj.6.weight', (24, 12, 3, 3)),
                     *bn('patch_embed.proj.4.1', 'patch_embed.proj.7', 24),
                     ('patch_embed.proj.6.0.weight', 'patch_embed.proj.9.weight', (48, 24, 3, 3)),
                     *bn('patch_embed.proj.6.1', 'patch_embed.proj.10', 48)]


@pytest.mark.parametrize('stem, patch, x', [(DHVT_STEM_PATCH2, 2, X16), (DHVT_STEM_PATCH16, 16, X32)],
                         ids=['patch2', 'patch16'])
def test_dhvt_code_layout_loads_and_computes_the_same(stem, patch, x, tmp_path, capsys):
    rows = dhvt_rows(stem)
    state = random_state(rows)
    from_file, direct, out = load_both('dhvt_micro_patch2_16', rows, state, tmp_path, capsys, patch_size=patch,
                                       img_size=x.shape[-1])
    assert 'DHVT (ArieSeirack/DHVT) layout' in out
    assert torch.equal(from_file(x), direct(x))


def test_dhvt_corrupted_layout_is_the_fit_error(tmp_path):
    corrupted_fails('dhvt_micro_patch2_16', random_state(dhvt_rows(DHVT_STEM_PATCH2)), tmp_path,
                    'blocks.0.attn.ht_norm.weight', 'blocks.1.attn.ht_proj.weight', 'blocks.1.attn.head_proj.weight')


# ---------------------------------------------------------------- PatchConvnet (facebookresearch/deit)

def patchconvnet_rows(dim=32, depth=2, classes=10, multi=False):
    """deit's patchconvnet_models.PatchConvnet with patch 16 (its only stem): DeiT's S60 recipe at width 32."""
    stem = [('patch_embed.proj.0.0.weight', 'patch_embed.proj.0.weight', (dim // 8, 3, 3, 3)),
            ('patch_embed.proj.2.0.weight', 'patch_embed.proj.2.weight', (dim // 4, dim // 8, 3, 3)),
            ('patch_embed.proj.4.0.weight', 'patch_embed.proj.4.weight', (dim // 2, dim // 4, 3, 3)),
            ('patch_embed.proj.6.0.weight', 'patch_embed.proj.6.weight', (dim, dim // 2, 3, 3))]
    top = [('cls_token', 'cls_token', (1, classes if multi else 1, dim)),
           ('norm.weight', 'norm.weight', (dim,)), ('norm.bias', 'norm.bias', (dim,))]
    head = ([(f'head.{c}.{p}', None, shape) for c in range(classes) for p, shape in (('weight', (1, dim)),
                                                                                     ('bias', (1,)))] if multi else
            [('head.weight', 'head.weight', (classes, dim)), ('head.bias', 'head.bias', (classes,))])
    se = dim // 4
    block = [('blocks.{i}.gamma_1', 'blocks.{i}.gamma', (dim,)),
             ('blocks.{i}.norm1.weight', 'blocks.{i}.norm.weight', (dim,)),
             ('blocks.{i}.norm1.bias', 'blocks.{i}.norm.bias', (dim,)),
             ('blocks.{i}.attn.qkv_pos.0.weight', 'blocks.{i}.mixer.pw1.weight', (dim, dim, 1, 1)),
             ('blocks.{i}.attn.qkv_pos.0.bias', 'blocks.{i}.mixer.pw1.bias', (dim,)),
             ('blocks.{i}.attn.qkv_pos.2.weight', 'blocks.{i}.mixer.dw.weight', (dim, 1, 3, 3)),
             ('blocks.{i}.attn.qkv_pos.2.bias', 'blocks.{i}.mixer.dw.bias', (dim,)),
             ('blocks.{i}.attn.qkv_pos.4.conv_reduce.weight', 'blocks.{i}.mixer.se.fc1.weight', (se, dim, 1, 1)),
             ('blocks.{i}.attn.qkv_pos.4.conv_reduce.bias', 'blocks.{i}.mixer.se.fc1.bias', (se,)),
             ('blocks.{i}.attn.qkv_pos.4.conv_expand.weight', 'blocks.{i}.mixer.se.fc2.weight', (dim, se, 1, 1)),
             ('blocks.{i}.attn.qkv_pos.4.conv_expand.bias', 'blocks.{i}.mixer.se.fc2.bias', (dim,)),
             ('blocks.{i}.attn.qkv_pos.5.weight', 'blocks.{i}.mixer.pw2.weight', (dim, dim, 1, 1)),
             ('blocks.{i}.attn.qkv_pos.5.bias', 'blocks.{i}.mixer.pw2.bias', (dim,))]
    aggregation = [('gamma_1', (dim,)), ('gamma_2', (dim,)), ('norm1.weight', (dim,)), ('norm1.bias', (dim,)),
                   *[(f'attn.{p}.{w}', (dim, dim) if w == 'weight' else (dim,))
                     for p in ('q', 'k', 'v', 'proj') for w in ('weight', 'bias')],
                   ('norm2.weight', (dim,)), ('norm2.bias', (dim,)), ('mlp.fc1.weight', (3 * dim, dim)),
                   ('mlp.fc1.bias', (3 * dim,)), ('mlp.fc2.weight', (dim, 3 * dim)), ('mlp.fc2.bias', (dim,))]
    return stem + top + head + per_block(block, depth) + [
        (f'blocks_token_only.0.{name}', f'aggregation.{name}', shape) for name, shape in aggregation]


def stacked_class_heads(state, classes=10):
    """The multi-class-token model's 1-output heads head.c as the rows of our one head."""
    return {'head.weight': torch.cat([state[f'head.{c}.weight'] for c in range(classes)]),
            'head.bias': torch.cat([state[f'head.{c}.bias'] for c in range(classes)])}


@pytest.mark.parametrize('multi', [False, True], ids=['one_class_token', 'multi_class_tokens'])
def test_patchconvnet_layout_loads_and_computes_the_same(multi, tmp_path, capsys):
    rows = patchconvnet_rows(multi=multi)
    state = random_state(rows)
    from_file, direct, out = load_both('patchconvnet_micro_patch4_16', rows, state, tmp_path, capsys,
                                       extra=stacked_class_heads(state) if multi else None, patch_size=16,
                                       multi_class=multi)
    assert 'PatchConvnet (facebookresearch/deit) layout' in out
    assert torch.equal(from_file(X32), direct(X32))


def test_patchconvnet_corrupted_layout_is_the_fit_error(tmp_path):
    corrupted_fails('patchconvnet_micro_patch4_16', random_state(patchconvnet_rows()), tmp_path,
                    'blocks.1.attn.qkv_pos.5.weight', 'blocks_token_only.0.attn.k.weight',
                    'aggregation.attn.k.weight', patch_size=16)


def test_patchconvnet_published_file_loads_through_timms_pretrained_path(tmp_path):
    rows = patchconvnet_rows(multi=True)
    state = random_state(rows)
    path = tmp_path / 's60_multi_scratch_1k.pth'
    torch.save({'model': state}, path)
    model = timm.create_model('patchconvnet_micro_patch4_16', patch_size=16, multi_class=True, pretrained=True,
                              pretrained_cfg_overlay={'url': path.as_uri()})
    assert torch.equal(model.head.weight, stacked_class_heads(state)['head.weight'])


# ---------------------------------------------------------------- DeiT's own checkpoint.pth, and no layout at all

def test_deit_training_checkpoint_loads_as_is(tmp_path, capsys):
    """DeiT's main.py saves model, optimizer, lr_scheduler, epoch, model_ema, scaler and its args as a Namespace."""
    trained = timm.create_model('deit_micro_patch2_16')
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': trained.state_dict(), 'optimizer': {'state': {}, 'param_groups': []}, 'lr_scheduler': {},
                'epoch': 299, 'model_ema': timm.create_model('deit_micro_patch2_16').state_dict(),
                'scaler': {'scale': 65536.0}, 'args': argparse.Namespace(model='deit_micro_patch2_16', lr=5e-4)}, path)
    model = timm.create_model('deit_micro_patch2_16')
    checkpoints.load_weights(model, str(path), '--resume')
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    assert 'read as' not in capsys.readouterr().out


def test_a_file_of_no_known_layout_gets_the_plain_fit_error(tmp_path):
    state = timm.create_model('deit_micro_patch2_16').state_dict()
    state['blocks.0.mlp.fc3.weight'] = state.pop('blocks.0.mlp.fc2.weight')
    torch.save(state, tmp_path / 'odd.pth')
    with pytest.raises(UserError, match=r'does not fit deit_micro_patch2_16: it holds blocks\.0\.mlp\.fc3\.weight, '
                                        'which the model lacks; pass') as info:
        checkpoints.load_weights(timm.create_model('deit_micro_patch2_16'), str(tmp_path / 'odd.pth'), '--resume')
    assert 'read as' not in str(info.value)


def test_an_official_file_fine_tunes_onto_another_class_count(tmp_path):
    rows = localvit_rows()
    torch.save({'model': random_state(rows)}, tmp_path / 'localvit.pth')
    model = timm.create_model('localvit_micro_patch2_16', num_classes=3)
    _, initialised = checkpoints.load_weights(model, str(tmp_path / 'localvit.pth'), '--finetune', finetune=True)
    assert initialised == ['head.weight', 'head.bias']


def test_predict_reads_an_official_file_under_our_model_name(tmp_path, capsys):
    """The file's own args name the authors' model (LocalViT's localvit_tiny_mlp4_act3_r192): --model names ours."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import predict
    path, image = tmp_path / 'localvit_t.pth', tmp_path / 'red.png'
    their_args = argparse.Namespace(model='localvit_tiny_mlp4_act3_r192')
    torch.save({'model': random_state(localvit_rows()), 'args': their_args}, path)
    Image.new('RGB', (20, 20), (200, 30, 30)).save(image)
    predict.main(['--checkpoint', str(path), '--model', 'localvit_micro_patch2_16', str(image), '--topk', '1'])
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == str(image)
    assert 'read as the LocalViT (ofsoundof/LocalViT) layout' in err


# ---------------------------------------------------------------- main.py --pretrained

def test_pretrained_offline_is_a_user_error_naming_the_url_and_the_fallback(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    args = main.parse_args(['--model', 'localvit_tiny_patch16_224', '--pretrained', '--eval'])
    args.nb_classes = 1000
    with pytest.raises(UserError, match=r'could not download the localvit_tiny_patch16_224 weights from '
                                        r'https://github\.com/ofsoundof/LocalViT/releases/download/v1\.0\.0/'
                                        r'localvit_t\.pth .*--finetune FILE .*--resume FILE') as info:
        model_factory.build_model(args)
    assert '\n' not in str(info.value)


def test_pretrained_without_published_weights_says_so():
    args = main.parse_args(['--model', 'localvit_micro_patch2_16', '--pretrained'])
    args.nb_classes = 10
    with pytest.raises(UserError, match='localvit_micro_patch2_16 has no published weights'):
        model_factory.build_model(args)


def test_main_pretrained_offline_exits_with_one_line(tmp_path):
    """main.py itself, with every https request sent to a closed local port."""
    env = {'https_proxy': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'HF_HUB_OFFLINE': '1',
           'TORCH_HOME': str(tmp_path / 'torch_home')}
    result = run_main(TINY + ['--model', 'S60_multi', '--input-size', '32', '--eval', '--pretrained'], env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'https://dl.fbaipublicfiles.com/deit/s60_multi_scratch_1k.pth' in lines[0], lines
    assert '--finetune FILE' in lines[0]
