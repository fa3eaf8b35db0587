"""DHVT: every size builds, sizes match the paper, the test size trains on a CPU in one process."""
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import dhvt_models

# GMACs (FlopCounterMode total / 2, attention matmuls included) of DHVT's reference code at the native
# resolution; the paper's printed GFLOPs are in dhvt_models.PAPER_FIGURES (its patch-2 figures are lower).
REFERENCE_GMACS = {
    'dhvt_tiny_patch4_32': 0.39,
    'dhvt_small_patch4_32': 1.53,
    'dhvt_tiny_patch2_32': 1.71,
    'dhvt_small_patch2_32': 6.20,
    'dhvt_tiny_patch16_224': 1.36,
    'dhvt_small_patch16_224': 5.03,
}


def meta_model(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def gmacs(model, img_size):
    with torch.device(next(model.parameters()).device):
        x = torch.empty(1, 3, img_size, img_size)
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() / 2 / 1e9


def micro(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('dhvt_micro_patch2_16', **kwargs)


def tiny_distilled():
    torch.manual_seed(0)
    return timm.create_model('dhvt_tiny_distilled_patch4_32', embed_dim=48, depth=1, num_heads=2, num_classes=5)


# ---------------------------------------------------------------- registry and sizes

def test_every_size_is_registered_without_colliding_with_timm():
    registered = set(timm.list_models('dhvt_*'))
    assert registered == set(dhvt_models.DHVT_SIZES) == set(timm.list_models(module='dhvt_models'))
    assert set(dhvt_models.PAPER_FIGURES) <= registered


@pytest.mark.parametrize('name', sorted(dhvt_models.DHVT_SIZES))
def test_every_size_builds_on_meta_with_its_config(name):
    size = dhvt_models.DHVT_SIZES[name]
    model = meta_model(name)
    assert isinstance(model, dhvt_models.DHVTDistilled) == size.distilled
    assert model.num_classes == size.classes and model.embed_dim == size.dim and len(model.blocks) == size.depth
    assert model.blocks[0].attn.num_heads == size.heads
    assert model.patch_embed.patch_size == (size.patch, size.patch)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, size.img, size.img) and cfg['num_classes'] == size.classes
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg['crop_pct'] == (0.875 if size.img == 224 else 1.0)


def test_dataset_class_counts_in_configs():
    classes = {name: timm.get_pretrained_cfg_value(name, 'num_classes') for name in dhvt_models.DHVT_SIZES}
    assert all(classes[n] == 100 for n in classes if n.endswith('_32'))
    assert all(classes[n] == 345 for n in classes if 'domainnet' in n)
    assert all(classes[n] == 1000 for n in classes if n.endswith('_224') and 'domainnet' not in n)


@pytest.mark.parametrize('name', sorted(dhvt_models.PAPER_FIGURES))
def test_params_match_the_paper(name):
    paper_millions, _ = dhvt_models.PAPER_FIGURES[name]
    measured = count_params(meta_model(name)) / 1e6
    assert measured == pytest.approx(paper_millions, rel=0.03)


@pytest.mark.parametrize('name', sorted(REFERENCE_GMACS))
def test_gmacs_match_the_reference_code(name):
    measured = gmacs(meta_model(name), dhvt_models.DHVT_SIZES[name].img)
    assert measured == pytest.approx(REFERENCE_GMACS[name], rel=0.03)


def test_distillation_token_and_head_add_only_their_parameters():
    plain = count_params(meta_model('dhvt_tiny_patch16_224'))
    distilled = count_params(meta_model('dhvt_tiny_distilled_patch16_224'))
    assert distilled - plain == 192 + 192 * 1000 + 1000


# ---------------------------------------------------------------- the test size on a CPU

def test_micro_forward_backward_gives_every_parameter_a_finite_gradient():
    model = micro(num_classes=7).train()
    logits = model(torch.randn(4, 3, 16, 16))
    assert logits.shape == (4, 7)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    broken = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    silent = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert missing == [] and broken == [] and silent == []


@pytest.mark.parametrize('height, width', [(16, 16), (32, 32), (8, 8), (16, 32)])
def test_micro_takes_any_multiple_of_the_patch_size(height, width):
    model = micro().eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, height, width))
        logits = model(torch.randn(2, 3, height, width))
    assert tokens.shape == (2, 1 + (height // 2) * (width // 2), 48)
    assert logits.shape == (2, 10)


def test_tiny_patch4_32_forward_shape():
    model = timm.create_model('dhvt_tiny_patch4_32').eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_forward_head_pre_logits_and_reset_classifier():
    model = micro().eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 16, 16))
        assert model.forward_head(features, pre_logits=True).shape == (2, 48)
        model.reset_classifier(3)
        assert model.get_classifier().out_features == 3
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
        model.reset_classifier(0)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 48)


def test_img_size_argument_builds_other_resolutions():
    model = timm.create_model('dhvt_micro_patch2_16', img_size=24).eval()
    assert model.patch_embed.grid_size == (12, 12)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 24, 24)).shape == (1, 10)


def test_in_chans_and_no_position_embedding():
    model = micro(in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert not [n for n, _ in model.named_parameters() if n.endswith('pos_embed')]


def test_sope_stems_follow_the_patch_size():
    def conv_widths(name):
        stem = meta_model(name).patch_embed.proj
        return [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert conv_widths('dhvt_tiny_patch16_224') == [24, 48, 96, 192]
    assert conv_widths('dhvt_tiny_patch4_32') == [96, 192]
    assert conv_widths('dhvt_tiny_patch2_32') == [192]


def test_head_tokens_join_attention_and_their_mean_is_added_to_cls():
    attn = dhvt_models.HeadInteractionAttention(dim=8, num_heads=2).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        before = attn(x)
        attn.head_embed.add_(1.0)
        changed = (attn(x) - before).abs().amax(dim=(0, 2))
        assert before.shape == x.shape and torch.all(changed > 0)  # every token attends to the head tokens
        # with zero values every token's output is the projection bias; CLS also gets the head tokens' mean
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        out = attn(x)
    bias = attn.proj.bias.expand(3, 4, 8)
    assert torch.allclose(out[:, 1:], bias) and torch.allclose(out[:, 0], 2 * attn.proj.bias.expand(3, 8))


def test_daff_bypasses_cls_through_squeeze_excitation():
    daff = dhvt_models.DAFF(dim=8, hidden_dim=32).eval()
    x = torch.randn(2, 1 + 16, 8)
    with torch.no_grad():
        out = daff(x, (4, 4))
        x_cls_changed = x.clone()
        x_cls_changed[:, 0] += 1.0
        out_cls_changed = daff(x_cls_changed, (4, 4))
    assert out.shape == x.shape
    assert torch.allclose(out[:, 1:], out_cls_changed[:, 1:])  # patches do not see CLS
    ratio = out[:, 0] / x[:, 0]  # CLS is only rescaled channel-wise by a function of the patches
    assert torch.allclose(out_cls_changed[:, 0], x_cls_changed[:, 0] * ratio, atol=1e-5)


def test_drop_path_layer_scale_and_dropout_options():
    model = micro(drop_path_rate=0.2, init_values=1e-5, drop_rate=0.1)
    assert [b.drop_path1.drop_prob for b in model.blocks[1:]] == [pytest.approx(0.2)]
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)  # the first block keeps its path
    assert torch.allclose(model.blocks[0].ls1.gamma, torch.full((48,), 1e-5))
    assert model.head_drop.p == 0.1
    assert not any('ls1' in n for n, _ in micro().named_parameters())


def test_no_weight_decay_names_the_learned_tokens():
    assert tiny_distilled().no_weight_decay() == {'cls_token', 'dist_token', 'blocks.0.attn.head_embed'}
    assert micro().no_weight_decay() == {'cls_token', 'blocks.0.attn.head_embed', 'blocks.1.attn.head_embed'}


def test_a_seed_gives_the_same_weights_in_every_process():
    code = ('import torch, timm, dhvt_models; torch.manual_seed(0); '
            'print(sum(p.double().sum().item() for p in timm.create_model("dhvt_micro_patch2_16").parameters()))')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sums = {subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(seed), OMP_NUM_THREADS='1')).stdout
            for seed in (1, 2)}
    assert len(sums) == 1


def test_create_model_honours_device_and_dtype():
    model = timm.create_model('dhvt_micro_patch2_16', device='meta', dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {('meta', torch.bfloat16)}


def test_bad_sizes_raise_one_clear_value_error():
    with pytest.raises(ValueError, match='multiple of patch_size'):
        dhvt_models.DHVT(img_size=30, patch_size=4, embed_dim=48, depth=1, num_heads=2)
    with pytest.raises(ValueError, match='power of two'):
        dhvt_models.DHVT(img_size=24, patch_size=3, embed_dim=48, depth=1, num_heads=2)
    with pytest.raises(ValueError, match='num_heads'):
        dhvt_models.DHVT(img_size=16, patch_size=2, embed_dim=48, depth=1, num_heads=5)


# ---------------------------------------------------------------- distillation and single-process use

def test_distilled_returns_two_heads_in_distilled_training_and_their_mean_otherwise():
    model = tiny_distilled()
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert isinstance(model(x), torch.Tensor)  # distilled training is off by default, as in timm's DeiT
    model.set_distilled_training(True)
    cls_logits, dist_logits = model(x)
    assert cls_logits.shape == dist_logits.shape == (2, 5)
    assert not torch.allclose(cls_logits, dist_logits)
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        mean = model(x)
    expected = (model.head(features[:, 0]) + model.head_dist(features[:, 1])) / 2
    assert torch.allclose(mean, expected, atol=1e-6)
    assert len(model.get_classifier()) == 2


def test_distilled_backward_reaches_the_distillation_token():
    model = tiny_distilled().train()
    model.set_distilled_training(True)
    cls_logits, dist_logits = model(torch.randn(2, 3, 32, 32))
    (cls_logits.sum() + dist_logits.sum()).backward()
    assert model.dist_token.grad.abs().sum() > 0 and model.head_dist.weight.grad.abs().sum() > 0


def test_runs_in_one_process_with_plain_batch_norm():
    assert not (dist.is_available() and dist.is_initialized())
    model = micro().train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = norms[0].running_mean.clone()
    loss = model(torch.randn(4, 3, 16, 16)).logsumexp(dim=1).mean()
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and not torch.equal(before, norms[0].running_mean)


def test_sync_batch_norm_conversion_is_possible_from_outside():
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(micro())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == 2 * 3 + 1
