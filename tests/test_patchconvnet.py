"""PatchConvnet: every DeiT name builds, sizes match the paper, the test size trains, the attention map is exposed."""
import os
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import hubconf
import patchconvnet_models
from conftest import ROOT
from patchconvnet_models import PAPER_FIGURES, PATCHCONVNET_SIZES

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import model_table  # noqa: E402

MICRO = 'patchconvnet_micro_patch4_16'
DEIT_NAMES = ('S60', 'S120', 'B60', 'B120', 'L60', 'L120', 'S60_multi')


def images(size=16, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def micro(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(MICRO, **kwargs)


def test_deits_names_are_registered_in_timm_and_torch_hub():
    assert set(timm.list_models(module='patchconvnet_models')) == set(PATCHCONVNET_SIZES) == set(DEIT_NAMES) | {MICRO}
    for name in DEIT_NAMES:
        assert callable(getattr(hubconf, name))
    assert set(PAPER_FIGURES) == {'S60', 'S120', 'B60', 'B120', 'S60_multi'}


@pytest.mark.parametrize('name', DEIT_NAMES)
def test_every_size_builds_on_meta_with_its_shape(name):
    size = PATCHCONVNET_SIZES[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    assert (model.embed_dim, len(model.blocks), model.multi_class) == (size.dim, size.depth, size.multi_class)
    assert model.cls_token.shape == (1, 1000 if size.multi_class else 1, size.dim)
    assert model.pretrained_cfg['input_size'] == (3, 224, 224) and model.pretrained_cfg['num_classes'] == 1000
    widths = [m.out_channels for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert widths == [size.dim // 8, size.dim // 4, size.dim // 2, size.dim]


def test_layer_scale_starts_at_1e_4_for_s60_and_1e_6_for_deeper_or_wider_models():
    for name, expected in (('S60', 1e-4), ('S120', 1e-6), ('B60', 1e-6), ('L120', 1e-6), (MICRO, 1e-4)):
        model = timm.create_model(name, depth=1, embed_dim=32)  # each size's LayerScale init, at a small width
        assert torch.all(model.blocks[0].gamma == expected), name
        assert torch.all(model.aggregation.gamma_1 == expected) and torch.all(model.aggregation.gamma_2 == expected)
    assert torch.all(micro(init_values=1e-2).blocks[1].gamma == 1e-2)


@pytest.mark.parametrize('name', sorted(PAPER_FIGURES))
def test_params_and_gmacs_within_3_percent_of_the_paper(name):
    params, gmacs = model_table.measure(name)  # on the meta device, at 224 px
    paper_params, paper_gmacs = PAPER_FIGURES[name]
    assert abs(params / paper_params - 1) < 0.03, params
    assert abs(gmacs / paper_gmacs - 1) < 0.03, gmacs


@pytest.mark.parametrize('multi_class', [False, True])
def test_micro_forward_backward_every_parameter_gets_a_finite_gradient(multi_class):
    model = micro(drop_path_rate=0.1, multi_class=multi_class).train()
    logits = model(images())
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize('name', DEIT_NAMES)
def test_every_deit_name_trains_a_step_at_a_test_width(name):
    torch.manual_seed(0)
    model = timm.create_model(name, depth=2, embed_dim=32, num_classes=5, drop_path_rate=0.1).train()
    F.cross_entropy(model(images(size=32)), torch.tensor([0, 4])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


def test_one_optimizer_step_lowers_the_loss_on_a_fixed_batch():
    model, x, y = micro(), images(batch=8), torch.arange(8) % 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]


def test_drop_path_is_the_same_rate_in_every_block():
    with torch.device('meta'):
        model = timm.create_model('S60', drop_path_rate=0.2)
    assert {block.drop_path.drop_prob for block in model.blocks} == {0.2}
    assert all(isinstance(block.drop_path, torch.nn.Identity) for block in micro().blocks)


@pytest.mark.parametrize('size', [(16, 16), (32, 32), (16, 32)])
def test_any_multiple_of_the_patch_size_runs(size):
    model = micro().eval()
    x = torch.randn(1, 3, *size)
    features = model.forward_features(x)
    assert features.shape == (1, 1 + size[0] // 4 * size[1] // 4, 32)
    assert model.forward_head(features, pre_logits=True).shape == (1, 32)
    assert model(x).shape == (1, 10)


def test_class_attention_map_covers_the_patch_grid_and_matches_the_logits_path():
    model = micro().eval()
    x = images(size=32)
    maps = model.class_attention_map(x)
    assert maps.shape == (2, 1, 8, 8)
    # one class token attends to itself and the 64 patches: the patch share is positive and below 1
    totals = maps.sum(dim=(-1, -2))
    assert torch.all(totals > 0) and torch.all(totals < 1)
    # the map is the one the forward pass uses: scaling a patch's values changes the output
    cls, patches, attn, grid = model.aggregate(x)
    assert grid == (8, 8) and attn.shape == (2, 1, 1, 65)
    assert torch.allclose(attn[:, 0, 0, 1:].reshape(2, 1, 8, 8), maps)


def test_multi_class_tokens_one_score_per_token():
    torch.manual_seed(0)
    model = timm.create_model(MICRO, multi_class=True, num_classes=5).eval()
    assert model.cls_token.shape == (1, 5, 32)
    x = images(size=16)
    logits = model(x)
    assert logits.shape == (2, 5)
    features = model.forward_features(x)
    tokens = model.forward_head(features, pre_logits=True)  # (B, classes, C)
    assert torch.allclose(logits, (tokens * model.head.weight).sum(-1) + model.head.bias, atol=1e-6)
    maps = model.class_attention_map(x)
    assert maps.shape == (2, 5, 4, 4)
    assert torch.allclose(maps.sum(dim=(-1, -2)), torch.ones(2, 5), atol=1e-5)  # patches only
    with pytest.raises(ValueError, match='one token per class'):
        model.reset_classifier(7)


def test_reset_classifier_and_no_weight_decay():
    model = micro()
    model.reset_classifier(3)
    assert model(images()).shape == (2, 3) and model.get_classifier().out_features == 3
    assert model.no_weight_decay() == {'cls_token'}


def test_checkpoint_round_trip_through_hub(tmp_path):
    model = micro(num_classes=4)
    torch.save({'model': model.state_dict()}, tmp_path / 'pc.pth')
    loaded = torch.hub.load(ROOT, MICRO, source='local', checkpoint_path=str(tmp_path / 'pc.pth'), num_classes=4)
    x = images()
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_patch_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match='power of two'):
        patchconvnet_models.stem_widths(6, 32)
    assert patchconvnet_models.stem_widths(16, 384) == [48, 96, 192, 384]
    assert patchconvnet_models.stem_widths(4, 32) == [16, 32]
