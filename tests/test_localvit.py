"""LocalViT and the 24-hour paper's improved local FFN: build, train, shapes, paper figures, token bypass."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import localvit_models
import main
import model_factory
import models  # noqa: F401 - registers deit_micro_patch2_16
from localvit_models import (IMPROVED_LOCALVIT_ACTS, IMPROVED_PAPER_FIGURES, LOCALVIT_ACTS, LOCALVIT_SIZES, PAPER_FIGURES,
                      improved_local_mlp)

MICRO = 'localvit_micro_patch2_16'
MICRO_DISTILLED = 'localvit_micro_distilled_patch2_16'


def images(size=16, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def params_millions(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


def meta_params_and_gmacs(name, **kwargs):
    """Parameter count (M) and GMACs at 224 px, batch 1, without allocating memory."""
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    return params_millions(model), counter.get_total_flops() / 2 / 1e9


def after_attention(block, x):
    """The block's input plus its attention branch: what a token that skips the FFN leaves the block with."""
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))


def test_registered_names_are_ours_and_build_on_meta():
    assert set(timm.list_models(module='localvit_models')) == set(LOCALVIT_SIZES)
    for name, (patch, image, dim, depth, heads, _, distilled) in LOCALVIT_SIZES.items():
        with torch.device('meta'):
            model = timm.create_model(name)
        assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (dim, depth, heads)
        assert model.patch_embed.patch_size == (patch, patch)
        assert model.pretrained_cfg['input_size'] == (3, image, image)
        assert model.num_prefix_tokens == (2 if distilled else 1)
        assert all(block.mlp.num_prefix_tokens == model.num_prefix_tokens for block in model.blocks)


@pytest.mark.parametrize('name', [MICRO, MICRO_DISTILLED])
def test_micro_forward_backward_every_parameter_gets_a_finite_gradient(name):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.1).train()
    logits = model(images())
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


def test_block_layout_follows_the_paper():
    block = timm.create_model(MICRO).blocks[0]
    ffn = block.mlp
    assert isinstance(block.norm2, torch.nn.Identity) and isinstance(block.drop_path2, torch.nn.Identity)
    assert ffn.fc1.bias is None and ffn.dwconv.bias is None and ffn.fc2.bias is None
    assert ffn.dwconv.groups == ffn.dwconv.in_channels == 4 * 48 and ffn.dwconv.kernel_size == (3, 3)
    assert isinstance(ffn.act1, torch.nn.Hardswish) and isinstance(ffn.attn, localvit_models.SqueezeExcite)
    assert ffn.attn.fc1.out_features == 4  # SE reduction = embed dim: a 4-wide squeeze
    se4 = timm.create_model('localvit_tiny_se4_patch16_224', img_size=32).blocks[0].mlp.attn
    assert se4.fc1.out_features == 768 // 4


def test_shapes_at_two_resolutions():
    dynamic = timm.create_model(MICRO, dynamic_img_size=True).eval()
    for size in (16, 24):
        tokens = (size // 2) ** 2
        assert dynamic.forward_features(images(size)).shape == (2, 1 + tokens, 48)
        assert dynamic(images(size)).shape == (2, 10)
    fixed = timm.create_model(MICRO, img_size=24).eval()
    assert fixed.pos_embed.shape == (1, 1 + 144, 48)
    assert fixed(images(24)).shape == (2, 10)
    features = timm.create_model(MICRO, features_only=True, out_indices=(0, 1))(images(16))
    assert [f.shape for f in features] == [(2, 48, 8, 8)] * 2


@pytest.mark.parametrize('act', LOCALVIT_ACTS)
def test_every_activation_option_builds_and_runs(act):
    model = timm.create_model(MICRO, act=act).eval()
    assert torch.isfinite(model(images())).all()
    name = act.partition('+')[0]
    assert isinstance(model.blocks[0].mlp.act2, localvit_models.ACTIVATIONS[name])


def test_bad_activation_and_non_square_grid_are_value_errors():
    with pytest.raises(ValueError, match='hs\\+se'):
        timm.create_model(MICRO, act='gelu')
    with pytest.raises(ValueError, match='relu6'):
        improved_local_mlp(act='relu')
    with pytest.raises(ValueError, match='num_prefix_tokens'):
        improved_local_mlp(act='hs', num_prefix_tokens=-1)
    model = timm.create_model(MICRO, dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match='square patch grid'):
        model(torch.randn(1, 3, 16, 24))


@pytest.mark.parametrize('name', [MICRO, MICRO_DISTILLED])
def test_prefix_tokens_bypass_the_local_ffn(name):
    model = timm.create_model(name).eval()
    block, prefix = model.blocks[0], model.num_prefix_tokens
    x = torch.randn(2, prefix + 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, skipped = block(x), after_attention(block, x)
        torch.nn.init.normal_(block.mlp.fc2.weight)  # a different FFN changes the patches, not the prefix
        out_changed = block(x)
    assert torch.allclose(out[:, :prefix], skipped[:, :prefix])
    assert not torch.allclose(out[:, prefix:], skipped[:, prefix:])
    assert torch.equal(out_changed[:, :prefix], out[:, :prefix])
    assert not torch.allclose(out_changed[:, prefix:], out[:, prefix:])


def test_distilled_returns_two_heads_in_training_and_their_mean_in_eval():
    model = timm.create_model(MICRO_DISTILLED)
    model.set_distilled_training(True)
    model.train()
    cls_logits, dist_logits = model(images())
    assert cls_logits.shape == dist_logits.shape == (2, 10)
    model.eval()
    x = images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_layer_scale_from_timm_covers_both_branches():
    block = timm.create_model(MICRO, init_values=1e-5).blocks[0]
    assert torch.allclose(block.ls1.gamma, torch.full((48,), 1e-5))
    assert torch.allclose(block.ls2.gamma, torch.full((48,), 1e-5))


@pytest.mark.parametrize('name', sorted(PAPER_FIGURES))
def test_params_and_gmacs_match_the_paper(name):
    paper_params, paper_gmacs = PAPER_FIGURES[name]
    params, gmacs = meta_params_and_gmacs(name)
    assert math.isclose(params, paper_params, rel_tol=0.03), (params, paper_params)
    if paper_gmacs is not None:
        assert math.isclose(gmacs, paper_gmacs, rel_tol=0.03), (gmacs, paper_gmacs)


def test_improved_ffn_on_deit_small_matches_the_paper():
    paper_params, paper_gmacs = IMPROVED_PAPER_FIGURES['deit_small_patch16_224']
    params, gmacs = meta_params_and_gmacs(
        'deit_small_patch16_224', mlp_layer=improved_local_mlp(act='hs', num_prefix_tokens=1), init_values=1e-5)
    assert math.isclose(params, paper_params, rel_tol=0.03), (params, paper_params)
    assert math.isclose(gmacs, paper_gmacs, rel_tol=0.03), (gmacs, paper_gmacs)


def test_improved_ffn_layout():
    ffn = improved_local_mlp(act='hs+se')(in_features=48, hidden_features=192, act_layer=torch.nn.GELU,
                                          norm_layer=None, bias=True, drop=0., device=None, dtype=None)
    assert ffn.fc1.bias is None and ffn.dwconv.bias is None and ffn.fc2.bias is None
    assert isinstance(ffn.act1, torch.nn.Hardswish) and isinstance(ffn.act2, torch.nn.Hardswish)
    assert ffn.attn.fc1.out_features == 192 // (48 // 4)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ffn.modules())


@pytest.mark.parametrize('act', IMPROVED_LOCALVIT_ACTS)
def test_improved_ffn_trains_a_step_on_micro_deit(act):
    torch.manual_seed(0)
    model = timm.create_model('deit_micro_patch2_16', mlp_layer=improved_local_mlp(act=act, num_prefix_tokens=1),
                              init_values=1e-5, drop_path_rate=0.1).train()
    block = model.blocks[0]
    assert isinstance(block.mlp, localvit_models.ImprovedLocalMlp) and not isinstance(block.norm2, torch.nn.Identity)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = block.mlp.dwconv.weight.detach().clone()
    F.cross_entropy(model(images()), torch.tensor([3, 4])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    optimizer.step()
    assert not torch.equal(before, block.mlp.dwconv.weight)


def test_improved_ffn_prefix_tokens_bypass_it():
    model = timm.create_model('deit_micro_patch2_16', mlp_layer=improved_local_mlp('hs', 1)).eval()
    block = model.blocks[0]
    x = torch.randn(2, 1 + 64, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, skipped = block(x), after_attention(block, x)
    assert torch.allclose(out[:, :1], skipped[:, :1])
    assert not torch.allclose(out[:, 1:], skipped[:, 1:])


def test_improved_ffn_on_distilled_and_deit3():
    distilled = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32,
                                  mlp_layer=improved_local_mlp('hs', num_prefix_tokens=2)).eval()
    assert distilled(images(32)).shape == (2, 1000)
    wrong_prefix = timm.create_model('deit_tiny_distilled_patch16_224', img_size=48,
                                     mlp_layer=improved_local_mlp('hs', num_prefix_tokens=1)).eval()
    with pytest.raises(ValueError, match='square patch grid'):
        wrong_prefix(images(48))
    params, _ = meta_params_and_gmacs('deit3_small_patch16_224', mlp_layer=improved_local_mlp('hs', 1))
    assert math.isclose(params, IMPROVED_PAPER_FIGURES['deit_small_patch16_224'][0], rel_tol=0.03)


def improved_deit_small(**kwargs):
    args = main.get_args_parser().parse_args(['--model', 'deit_small_patch16_224', '--localvit', *kwargs.pop('flags', [])])
    args.nb_classes = 1000
    return model_factory.build_model(args)


def test_localvit_flag_builds_the_24h_code_model():
    """--localvit on DeiT-S trains what the 24-hour code's DeiT-S + 'hs' model trains: 22,179,688 parameters, no
    bias on q, k and v (its paper's 22.23M adds 47,088 parameters its forward pass never uses)."""
    torch.manual_seed(0)
    model = improved_deit_small()
    trained, unused = localvit_models.IMPROVED_CODE_PARAMS['deit_small_patch16_224']
    assert sum(p.numel() for p in model.parameters()) == trained == 22_179_688
    assert round((trained + unused) / 1e6, 2) == IMPROVED_PAPER_FIGURES['deit_small_patch16_224'][0]
    assert all(block.attn.qkv.bias is None for block in model.blocks)
    assert model.blocks[0].attn.proj.bias is not None


def test_localvit_flag_initialises_as_the_24h_code():
    torch.manual_seed(0)
    model = improved_deit_small()
    dim, classes = 384, 1000
    qkv = model.blocks[0].attn.qkv.weight
    for third in qkv.chunk(3):  # the official q, k, v are separate (384, 384) Xavier-normal matrices
        assert math.isclose(third.std().item(), math.sqrt(2 / (dim + dim)), rel_tol=0.02)
    fc1 = model.blocks[0].mlp.fc1.weight
    assert math.isclose(fc1.std().item(), math.sqrt(2 / (dim + 4 * dim)), rel_tol=0.02)
    assert math.isclose(model.head.weight.std().item(), math.sqrt(2 / (dim + classes)), rel_tol=0.02)
    bias = model.blocks[0].attn.proj.bias  # PyTorch's default: uniform within 1 / sqrt(fan_in)
    assert bias.abs().max() <= 1 / math.sqrt(dim) and bias.std() > 0.5 / math.sqrt(3 * dim)
    assert math.isclose(model.pos_embed.std().item(), math.sqrt(2 / (197 * dim + dim)), rel_tol=0.05)
    assert math.isclose(model.cls_token.std().item(), math.sqrt(2 / (2 * dim)), rel_tol=0.2)
    plain = timm.create_model('deit_small_patch16_224')  # timm's own init differs: std 0.02, zero biases
    assert plain.blocks[0].attn.proj.bias.abs().max() == 0
