"""scripts/convert_vit_npz.py: Google ViT .npz files become checkpoints that --finetune and --resume accept."""
import os
import sys

import numpy as np
import pytest
import timm
import torch

from conftest import ROOT, TINY, run_main

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import convert_vit_npz  # noqa: E402

MODEL = 'deit_micro_patch2_16'  # dim 48, depth 2, heads 2, patch 2, 16 px: Google's layout at test size
NUM_CLASSES = 10  # DIGITS' classes, so main.py keeps the head when fine-tuning


def random_vit(img_size=16, seed=0, **overrides):
    """The test model with every weight random: norms and biases too, so a misplaced tensor changes the logits."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=NUM_CLASSES, img_size=img_size, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def google_layout(model):
    """The model's weights under the names and axis orders of Google's ViT .npz files."""
    s = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    w = {'embedding/kernel': s['patch_embed.proj.weight'].transpose(2, 3, 1, 0),  # (C, 3, kh, kw) -> (kh, kw, 3, C)
         'embedding/bias': s['patch_embed.proj.bias'],
         'cls': s['cls_token'],
         'Transformer/posembed_input/pos_embedding': s['pos_embed'],
         'Transformer/encoder_norm/scale': s['norm.weight'],
         'Transformer/encoder_norm/bias': s['norm.bias'],
         'head/kernel': s['head.weight'].T,
         'head/bias': s['head.bias']}
    for i in range(len(model.blocks)):
        b, p = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
        attn = p + 'MultiHeadDotProductAttention_1/'
        qkv_w, qkv_b = np.split(s[b + 'attn.qkv.weight'], 3), np.split(s[b + 'attn.qkv.bias'], 3)
        for name, weight, bias in zip(('query', 'key', 'value'), qkv_w, qkv_b):
            w[attn + name + '/kernel'] = weight.T.reshape(dim, heads, dim // heads)  # (C, heads, head_dim)
            w[attn + name + '/bias'] = bias.reshape(heads, dim // heads)
        w[attn + 'out/kernel'] = s[b + 'attn.proj.weight'].T.reshape(heads, dim // heads, dim)
        w[attn + 'out/bias'] = s[b + 'attn.proj.bias']
        for norm, google in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_2')):
            w[p + google + '/scale'] = s[b + norm + '.weight']
            w[p + google + '/bias'] = s[b + norm + '.bias']
        for fc, dense in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
            w[p + f'MlpBlock_3/{dense}/kernel'] = s[b + f'mlp.{fc}.weight'].T
            w[p + f'MlpBlock_3/{dense}/bias'] = s[b + f'mlp.{fc}.bias']
    return w


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """(random model, its .npz in Google's layout)."""
    model = random_vit()
    path = str(tmp_path_factory.mktemp('npz') / 'ViT-micro.npz')
    np.savez(path, **google_layout(model))
    return model, path


@pytest.fixture(scope='module')
def converted(source, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('converted') / 'micro.pth')
    convert_vit_npz.main([source[1], path, '--model', MODEL])
    return path


def logits(model, seed=1):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_converted_logits_equal_timms_npz_loader_and_the_source(source, converted):
    model, npz = source
    checkpoint = torch.load(converted, map_location='cpu', weights_only=True)
    fresh = timm.create_model(MODEL, num_classes=NUM_CLASSES)
    fresh.load_state_dict(checkpoint['model'])
    by_timm = timm.create_model(MODEL, num_classes=NUM_CLASSES)
    by_timm.load_pretrained(npz)
    assert torch.equal(logits(fresh), logits(by_timm))
    torch.testing.assert_close(logits(fresh), logits(model), rtol=1e-5, atol=1e-5)
    assert checkpoint['args'] == {'model': MODEL, 'input_size': 16, 'nb_classes': NUM_CLASSES, 'mean': [0.5] * 3,
                                  'std': [0.5] * 3}  # Google's inputs: [-1, 1]
    assert checkpoint['class_names'] == [str(i) for i in range(NUM_CLASSES)]


def test_resolution_comes_from_the_position_embedding(tmp_path):
    npz, out = str(tmp_path / 'big.npz'), str(tmp_path / 'big.pth')
    np.savez(npz, **google_layout(random_vit(img_size=32)))
    convert_vit_npz.main([npz, out, '--model', MODEL])
    checkpoint = torch.load(out, map_location='cpu', weights_only=True)
    assert checkpoint['args']['input_size'] == 32
    assert checkpoint['model']['pos_embed'].shape == (1, 1 + 16 * 16, 48)


def test_another_class_count_gets_a_fresh_head(source, tmp_path, capsys):
    out = str(tmp_path / 'five.pth')
    convert_vit_npz.main([source[1], out, '--model', MODEL, '--num-classes', '5'])
    checkpoint = torch.load(out, map_location='cpu', weights_only=True)
    assert checkpoint['model']['head.weight'].shape == (5, 48)
    assert checkpoint['args']['nb_classes'] == 5 and len(checkpoint['class_names']) == 5
    assert torch.equal(checkpoint['model']['blocks.0.attn.qkv.weight'], source[0].blocks[0].attn.qkv.weight)
    assert 'freshly initialised' in capsys.readouterr().out


def test_google_names_map_to_timm():
    assert convert_vit_npz.resolve_model_name('ViT-B_16') == 'vit_base_patch16_224'
    assert convert_vit_npz.resolve_model_name('vit-l/32') == 'vit_large_patch32_224'
    assert convert_vit_npz.resolve_model_name('R50+ViT-B_16') == 'vit_base_r50_s16_224'
    assert convert_vit_npz.name_at_resolution('vit_base_patch16_224', 384) == 'vit_base_patch16_384'
    assert convert_vit_npz.name_at_resolution('vit_base_r50_s16_224', 384) == 'vit_base_r50_s16_384'
    assert convert_vit_npz.pixels_per_token('vit_base_r50_s16_224') == 16
    for name in convert_vit_npz.GOOGLE_TO_TIMM.values():
        assert timm.is_model(name)


def exit_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        convert_vit_npz.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_user_errors_are_one_line_and_write_nothing(source, converted, tmp_path, capsys):
    before = os.path.getmtime(converted)
    assert 'exists' in exit_error([source[1], converted, '--model', MODEL], capsys)
    assert os.path.getmtime(converted) == before
    out = str(tmp_path / 'x.pth')
    err = exit_error([source[1], out, '--model', 'ViT-Q_16'], capsys)
    assert 'ViT-B_16' in err and 'ViT-H_14' in err
    assert 'encoder blocks' in exit_error([source[1], out, '--model', 'deit_tiny_patch2_16'], capsys)
    narrow = str(tmp_path / 'narrow.npz')
    np.savez(narrow, **google_layout(random_vit(embed_dim=32)))
    assert 'does not fit' in exit_error([narrow, out, '--model', MODEL], capsys)
    incomplete = str(tmp_path / 'incomplete.npz')
    weights = google_layout(random_vit())
    del weights['Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias']
    np.savez(incomplete, **weights)
    assert 'does not fit' in exit_error([incomplete, out, '--model', MODEL], capsys)
    assert 'not a VisionTransformer' in exit_error([source[1], out, '--model', 'resnet18'], capsys)
    not_npz = tmp_path / 'weights.npz'
    not_npz.write_bytes(b'not a zip file')
    assert 'not a readable .npz' in exit_error([str(not_npz), out, '--model', MODEL], capsys)
    assert not os.path.exists(out)


def test_main_finetunes_and_resumes_from_the_converted_file(converted, tmp_path):
    result = run_main(TINY + ['--epochs', '1', '--finetune', converted, '--output_dir', tmp_path])
    assert result.returncode == 0, result.stderr
    assert 'position embedding 8x8 -> 4x4' in result.stdout
    assert 'newly initialised: []' in result.stdout
    result = run_main(TINY + ['--input-size', '16', '--eval', '--resume', converted])
    assert result.returncode == 0, result.stderr
    assert f'loaded weights from {converted}' in result.stdout
