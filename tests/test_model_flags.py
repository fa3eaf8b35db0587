"""Family flags of main.py reach the model factory: --layer-scale, --localvit, --localvit-act."""
import argparse

import pytest
import torch

import localvit_models
import main
import model_factory
from utils import UserError


def build(*flags, model='deit_micro_patch2_16'):
    args = main.get_args_parser().parse_args(['--model', model, '--input-size', '16', *flags])
    args.nb_classes = 10
    return model_factory.build_model(args)


def test_layer_scale_sets_the_initial_gammas():
    model = build('--layer-scale', '1e-5')
    gammas = [b.ls1.gamma for b in model.blocks] + [b.ls2.gamma for b in model.blocks]
    assert all(torch.all(g == 1e-5) for g in gammas)
    assert not hasattr(build().blocks[0].ls1, 'gamma')


def test_localvit_puts_the_local_ffn_in_every_block():
    model = build('--localvit')
    assert all(isinstance(b.mlp, localvit_models.ImprovedLocalMlp) and b.mlp.num_prefix_tokens == 1 for b in model.blocks)
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10)


def test_localvit_counts_the_distillation_token():
    args = main.get_args_parser().parse_args(['--model', 'deit_tiny_distilled_patch16_224', '--localvit'])
    assert model_factory.model_options(args)['mlp_layer'].keywords['num_prefix_tokens'] == 2


def test_localvit_act_reaches_localvit_models():
    relu = build('--localvit-act', 'relu', model='localvit_micro_patch2_16')
    default = build(model='localvit_micro_patch2_16')
    assert str(relu.blocks[0].mlp) != str(default.blocks[0].mlp)


@pytest.mark.parametrize('flags, model, message', [
    (['--localvit-act', 'hs'], 'deit_micro_patch2_16', r'applies to localvit_\* models'),
    (['--localvit'], 'localvit_micro_patch2_16', 'already is a LocalViT'),
    (['--localvit', '--localvit-act', 'relu'], 'deit_micro_patch2_16', 'not available with --localvit'),
    (['--layer-scale', '1e-5'], 'resnet18', 'does not support --layer-scale'),
])
def test_family_flag_misuse_is_a_user_error(flags, model, message):
    with pytest.raises(UserError, match=message):
        build(*flags, model=model)


def test_evit_flags_reach_the_model():
    model = build('--base_keep_rate', '0.5', '--fuse_token', '--drop_loc', '(0, 1)', model='evit_micro_patch2_16')
    assert model.drop_loc == (0, 1) and model.fuse_token
    assert model.keep_rates == (0.5, 0.5) or list(model.keep_rates) == [0.5, 0.5]


@pytest.mark.parametrize('flags, message', [(['--fuse_token'], 'apply to EViT models'),
                                            (['--drop_loc', 'x'], 'not a list of block indices')])
def test_evit_flag_misuse_is_a_user_error(flags, message):
    with pytest.raises(UserError, match=message):
        build(*flags, model='deit_micro_patch2_16' if '--fuse_token' in flags else 'evit_micro_patch2_16')


def test_keep_rate_schedule_sets_model_and_ema():
    args = main.get_args_parser().parse_args(['--model', 'evit_micro_patch2_16', '--base_keep_rate', '0.5',
                                              '--shrink_start_epoch', '1', '--shrink_epochs', '2', '--device', 'cpu',
                                              '--amp', 'none'])
    args.nb_classes = 10
    model, ema = model_factory.build_model(args), model_factory.build_model(args)
    set_rate = main.build_train_state(args, model, argparse.Namespace(module=ema), 4, torch.device('cpu')).before_update
    for step, expected in ((0, 1.0), (3, 1.0), (8, 0.75), (12, 0.5), (40, 0.5)):
        set_rate(step)
        assert min(model.keep_rates) == min(ema.keep_rates) == pytest.approx(expected)
    plain = main.get_args_parser().parse_args(['--model', 'deit_micro_patch2_16', '--amp', 'none'])
    plain.nb_classes = 10
    assert main.build_train_state(plain, model_factory.build_model(plain), None, 4,
                                  torch.device('cpu')).before_update is None


def test_finetune_from_a_checkpoint_of_another_width_is_a_user_error(tmp_path):
    other = build(model='deit_micro_patch2_16')
    torch.save({'model': other.state_dict()}, tmp_path / 'micro.pth')
    model = build(model='deit_tiny_patch2_16')
    with pytest.raises(UserError, match=r'cls_token is \(1, 1, 48\) there and \(1, 1, 192\) here'):
        model_factory.load_finetune_weights(model, str(tmp_path / 'micro.pth'))
