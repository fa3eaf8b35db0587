"""Mean, std, evaluation crop and resize: the weights' own, for training, evaluation, predict and both backends."""
import os
import sys

import numpy as np
import pytest
import torch
from torchvision import transforms

import datasets
import loaders
import main
from conftest import ROOT, TINY, run_main

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import predict  # noqa: E402


def resolved(*flags, weights_args=None):
    args = main.get_args_parser().parse_args([str(f) for f in flags])
    source = datasets.resolve_preprocessing(args, weights_args)
    return args, source


def test_deits_values_without_weights():
    args, source = resolved('--model', 'deit_tiny_patch16_224')
    assert (args.mean, args.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (args.eval_crop_ratio, args.interpolation, source) == (0.875, 'bicubic', "DeiT's defaults")


def test_pretrained_weights_bring_their_cfg_and_the_command_line_wins():
    args, source = resolved('--model', 'vit_tiny_patch16_224', '--pretrained')  # AugReg: mean 0.5, crop 0.9
    assert (args.mean, args.std, args.eval_crop_ratio) == ([0.5] * 3, [0.5] * 3, 0.9)
    assert source == "vit_tiny_patch16_224's pretrained cfg"
    args, _ = resolved('--model', 'vit_tiny_patch16_224', '--pretrained', '--mean', 0.4, 0.4, 0.4, '--crop-pct', 1.0,
                       '--interpolation', 'bilinear')
    assert (args.mean, args.std, args.eval_crop_ratio, args.interpolation) == ([0.4] * 3, [0.5] * 3, 1.0, 'bilinear')


def test_a_checkpoints_own_values_come_before_the_model_cfg():
    saved = {'mean': [0.5] * 3, 'std': [0.5] * 3}
    args, source = resolved('--model', 'deit_tiny_patch16_224', '--pretrained', weights_args=saved)
    assert (args.mean, args.std, args.eval_crop_ratio, source) == ([0.5] * 3, [0.5] * 3, 0.875, 'the checkpoint')


def test_the_device_finish_and_the_eval_transform_use_them():
    args, _ = resolved('--model', 'vit_tiny_patch16_224', '--pretrained', '--input-size', 224)
    finish = loaders.device_finish(args, torch.device('cpu'), is_train=False)
    batch = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    assert torch.allclose(finish(batch)[0, :, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    steps = datasets.build_transform(False, args).transforms
    assert steps[0].size == int(224 / 0.9) and steps[0].interpolation == transforms.InterpolationMode.BICUBIC
    normalize = [s for s in steps if isinstance(s, transforms.Normalize)][0]
    assert list(normalize.mean) == [0.5] * 3


@pytest.fixture(scope='module')
def run_from_google_weights(tmp_path_factory):
    """A checkpoint saved as convert_vit_npz.py saves Google's weights (mean and std 0.5), fine-tuned by main.py."""
    import timm
    folder = tmp_path_factory.mktemp('google')
    model = timm.create_model('deit_micro_patch2_16', num_classes=10, img_size=8)
    torch.save({'model': model.state_dict(), 'args': {'model': 'deit_micro_patch2_16', 'input_size': 8,
                                                      'nb_classes': 10, 'mean': [0.5] * 3, 'std': [0.5] * 3}},
               folder / 'converted.pth')
    out = folder / 'run'
    result = run_main(TINY + ['--finetune', folder / 'converted.pth', '--epochs', '1', '--output_dir', out])
    assert result.returncode == 0, result.stderr
    return result, out


def test_fine_tuning_converted_google_weights_normalises_as_google(run_from_google_weights):
    result, out = run_from_google_weights
    assert ('| preprocessing: 8 px (from the flags), mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5], eval crop 0.875, bicubic resize (from the '
            'checkpoint)') in result.stdout
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)['args']
    assert (saved['mean'], saved['std'], saved['eval_crop_ratio']) == ([0.5] * 3, [0.5] * 3, 0.875)


def test_eval_and_predict_read_the_same_values(run_from_google_weights):
    _, out = run_from_google_weights
    evaluated = run_main(TINY + ['--eval', '--output_dir', out])
    assert evaluated.returncode == 0, evaluated.stderr
    assert 'mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]' in evaluated.stdout
    _, transform, _ = predict.load_model(str(out / 'checkpoint.pth'))
    normalize = [s for s in transform.transforms if isinstance(s, transforms.Normalize)][0]
    assert np.allclose(normalize.mean, 0.5) and np.allclose(normalize.std, 0.5)
