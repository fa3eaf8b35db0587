"""EViT: names, DeiT compatibility, token counts, the keep layer against a plain reference, schedule, figures."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import VisionTransformer

import evit_models
from evit_models import EViT, PAPER_FIGURES, keep_rate_at
from scripts.throughput import count_gmacs, main as throughput_main, measure_throughput

MICRO = 'evit_micro_patch2_16'  # 16 px, patch 2: 64 patches, depth 4, keep layers (1, 2)
MICRO_ARGS = dict(patch_size=2, img_size=16, embed_dim=48, depth=4, num_heads=2, num_classes=10)


def micro(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(MICRO, **kwargs)


def expected_token_counts(num_patches, depth, drop_loc, rate, fuse):
    """Tokens (class token included) leaving each block, computed the plain way."""
    counts, n = [], num_patches
    for i in range(depth):
        kept = math.ceil(rate * n)
        if i in drop_loc and kept < n:
            n = kept + int(fuse)
        counts.append(1 + n)
    return counts


def tokens_after_each_block(model, x):
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, out: counts.append(out.shape[1])) for b in model.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return counts


def reference_keep_block(block, x, num_kept, fuse):
    """A keep-layer block written out with the full attention matrix, as EViT's code computes it."""
    B, N, C = x.shape
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)  # (B, H, N, N)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    cls_attn = weights[:, :, 0, 1:].mean(dim=1)
    order = cls_attn.argsort(dim=1, descending=True)
    kept, dropped = order[:, :num_kept], order[:, num_kept:]
    others = x[:, 1:]
    rows = [torch.cat([x[b, :1], others[b, kept[b]]]) for b in range(B)]
    if fuse:
        rows = [torch.cat([r, (others[b, dropped[b]] * cls_attn[b, dropped[b], None]).sum(0, keepdim=True)])
                for b, r in enumerate(rows)]
    x = torch.stack(rows)
    return x + block.mlp(block.norm2(x)), kept


@pytest.mark.parametrize('name', list(evit_models.EVIT_SIZES))
def test_names_build_with_paper_keep_layers(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert isinstance(model, EViT)
    assert model.drop_loc == evit_models.EVIT_SIZES[name][-1]
    assert model.keep_rates == (0.7,) * len(model.drop_loc)
    assert model.no_weight_decay() >= {'pos_embed', 'cls_token'}
    assert model.pretrained_cfg['paper_ids'] == 'arXiv:2202.07800'


@pytest.mark.parametrize('name, deit', [('evit_small_patch16_224', 'deit_small_patch16_224'),
                                        ('evit_base_patch16_224', 'deit_base_patch16_224')])
def test_deit_checkpoints_fit_strictly(name, deit):
    with torch.device('meta'):
        ours, theirs = timm.create_model(name), timm.create_model(deit)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.pretrained_cfg['url'] == theirs.pretrained_cfg['url']  # EViT fine-tunes from DeiT


@pytest.mark.parametrize('fuse', [False, True])
def test_keep_rate_one_is_deit(fuse):
    model = micro(keep_rate=1.0, fuse_token=fuse).eval()
    deit = VisionTransformer(**MICRO_ARGS).eval()
    deit.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), deit(x), atol=1e-5)
        assert torch.allclose(model.forward_features(x), deit.forward_features(x), atol=1e-5)


@pytest.mark.parametrize('rate', [0.5, 0.7, 0.9])
@pytest.mark.parametrize('fuse', [False, True])
def test_exact_tokens_kept_at_each_keep_layer(rate, fuse):
    model = micro(keep_rate=rate, fuse_token=fuse).eval()
    model.record_keep = True
    with torch.no_grad():
        counts = tokens_after_each_block(model, torch.randn(2, 3, 16, 16))
    assert counts == expected_token_counts(64, 4, (1, 2), rate, fuse)
    kept_per_layer = [counts[i] - 1 - int(fuse) for i in model.drop_loc]
    assert [idx.shape for idx in model.kept_indices] == [(2, k) for k in kept_per_layer]


def test_other_image_sizes_interpolate_position_embedding():
    model = micro(keep_rate=0.5, dynamic_img_size=True).eval()
    with torch.no_grad():
        for size in (8, 24):
            counts = tokens_after_each_block(model, torch.randn(1, 3, size, size))
            assert counts == expected_token_counts((size // 2) ** 2, 4, (1, 2), 0.5, False)
    fixed = micro(img_size=24, keep_rate=0.5).eval()
    assert fixed.pos_embed.shape[1] == 1 + 144
    assert fixed(torch.randn(1, 3, 24, 24)).shape == (1, 10)


@pytest.mark.parametrize('fuse', [False, True])
def test_keep_layer_matches_full_attention_reference(fuse):
    block = micro(keep_rate=0.6, fuse_token=fuse).eval().blocks[1]
    block.record = True
    x = torch.randn(2, 65, 48)
    with torch.no_grad():
        expected, kept = reference_keep_block(block, x, math.ceil(0.6 * 64), fuse)
        assert torch.allclose(block(x), expected, atol=1e-5)
    assert torch.equal(block.recorded[0], kept)


def test_cls_attention_row_is_row_zero_of_the_full_attention():
    attn = micro().blocks[1].attn
    q, k = torch.randn(2, 2, 9, 24), torch.randn(2, 2, 9, 24)
    full = F.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)  # (B, H, N, N)
    assert torch.allclose(attn.cls_attention(q, k), full[:, :, 0, 1:].mean(dim=1), atol=1e-6)


@pytest.mark.parametrize('fuse', [False, True])
def test_kept_indices_refer_to_the_patch_grid(fuse):
    model = micro(keep_rate=0.5, fuse_token=fuse).eval()
    model.record_keep = True
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
        first, second = model.kept_indices
        # the first keep layer sees the patches in grid order, so its indices need no translation
        block_input = model.blocks[0](model._pos_embed(model.patch_embed(x)))
        _, reference = reference_keep_block(model.blocks[1], block_input, 32, fuse)
    assert torch.equal(first, reference)
    for b in range(2):
        allowed = set(first[b].tolist()) | ({-1} if fuse else set())
        assert set(second[b].tolist()) <= allowed
        assert len(set(second[b].tolist())) == second.shape[1]


def test_recording_is_off_by_default_and_keeps_all_at_rate_one():
    model = micro(keep_rate=1.0)
    model(torch.randn(1, 3, 16, 16))
    assert model.kept_indices == []
    model.record_keep = True
    model(torch.randn(1, 3, 16, 16))
    assert [idx.tolist() for idx in model.kept_indices] == [[list(range(64))]] * 2


def test_backward_reaches_every_parameter():
    model = micro(keep_rate=0.5, fuse_token=True, drop_path_rate=0.1).train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_set_keep_rate_forms_and_errors():
    model = micro(keep_rate=0.9)
    model.set_keep_rate(0.5)
    assert model.keep_rates == (0.5, 0.5)
    model.set_keep_rate((0.4, 0.8))
    assert model.keep_rates == (0.4, 0.8)
    model.set_keep_rate((1, 0.6, 0.7, 1))  # one per block, as EViT's code writes it
    assert model.keep_rates == (0.6, 0.7)
    for bad in (0, 1.5, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5), 'high', True):
        with pytest.raises(ValueError):
            model.set_keep_rate(bad)
    with pytest.raises(ValueError, match='drop_loc'):
        micro(drop_loc=(1, 4))
    with pytest.raises(ValueError, match='class_token'):
        micro(class_token=False, global_pool='avg')
    with pytest.raises(ValueError, match='init_values'):
        micro(init_values=1e-5)


def test_keep_rate_schedule():
    def at(step):
        return keep_rate_at(step, steps_per_epoch=10, base_keep_rate=0.7, shrink_start_epoch=10, shrink_epochs=100)
    assert at(0) == at(99) == at(100) == 1.0
    assert at(350) == pytest.approx(0.7 + 0.3 * (math.cos(math.pi / 4) + 1) / 2)  # a quarter into the cosine
    assert at(600) == pytest.approx(0.85)
    assert 0.7 < at(1099) < 0.7001
    assert at(1100) == at(10 ** 6) == 0.7
    assert keep_rate_at(5, 10, 0.5, 0, 0) == 0.5
    with pytest.raises(ValueError):
        keep_rate_at(0, 0, 0.7, 10, 100)


@pytest.mark.parametrize('name', list(PAPER_FIGURES))
def test_params_and_gmacs_match_the_paper(name):
    params, gmacs = PAPER_FIGURES[name]
    with torch.device('meta'):
        model = timm.create_model(name, keep_rate=0.7, fuse_token=True)
        measured = count_gmacs(model, 224)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, rel=0.03)
    assert measured == pytest.approx(gmacs, rel=0.03)


def test_throughput_script(capsys):
    assert measure_throughput(micro(), batch_size=2, img_size=16, device='cpu', iters=2, warmup=1) > 0
    throughput_main(['--model', 'deit_micro_patch2_16', '--model', MICRO, '--keep-rate', '0.5', '--fuse-token',
                     '--batch-size', '2', '--iters', '2', '--warmup', '1', '--repeats', '3', '--device', 'cpu'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('device cpu, fp32,')  # the CPU trains in fp32 by default
    assert lines[1].startswith('| model | keep rate | batch | img/s | GMACs |')
    assert lines[3].startswith('| deit_micro_patch2_16 | - | 2 |')
    assert lines[4].startswith(f'| {MICRO} | 0.5 fused | 2 |')
    assert len(lines[4].split('|')[-2].split()) == 3  # every run is shown
    throughput_main(['--model', MICRO, '--batch-size', '2', '--iters', '1', '--warmup', '0', '--device', 'cpu',
                     '--amp', 'bf16'])
    assert capsys.readouterr().out.startswith('device cpu, bf16 autocast,')
    with pytest.raises(SystemExit) as exit_info:
        throughput_main(['--model', 'evit_smal_patch16_224'])
    assert exit_info.value.code == 2
    assert 'evit_small_patch16_224' in capsys.readouterr().err
