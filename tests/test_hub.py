"""hubconf.py entry points (local files only: the network is off in these tests) and the scripts/*.sh recipes."""
import glob
import itertools
import os
import re
import socket
import subprocess
import urllib.error

import pytest
import timm
import torch
from safetensors.torch import save_file

import hubconf
import main
from conftest import ROOT

MICRO = 'deit_micro_patch2_16'  # models.py's test size: builds in milliseconds


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails, and torch.hub caches under tmp_path: nothing can download."""
    def refuse(*args, **kwargs):
        raise OSError('network disabled in tests')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))


def hub_entries():
    """What torch.hub.list reports for a hubconf: its public callables."""
    return {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith('_')}


def same_weights(model, state):
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_an_entry_for_every_model_we_register_and_for_deits_published_ones():
    ours = set(timm.list_models(module=['models', 'localvit_models', 'dhvt_models', 'evit_models',
                                        'patchconvnet_models']))
    deit = {'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224', 'deit_base_patch16_384',
            'deit_tiny_distilled_patch16_224', 'deit_small_distilled_patch16_224',
            'deit_base_distilled_patch16_224', 'deit_base_distilled_patch16_384', 'deit3_small_patch16_224'}
    assert {MICRO, 'deit_small_patch4_32'} <= ours
    assert hub_entries() == ours | set(timm.list_models(module='deit'))
    assert deit <= hub_entries()
    assert hubconf.dependencies == ['torch', 'timm']


def test_entries_keep_their_names_and_say_how_to_load_weights():
    entry = getattr(hubconf, 'deit_small_patch16_224')
    assert entry.__name__ == 'deit_small_patch16_224'
    assert 'deit_small_patch16_224' in entry.__doc__ and 'checkpoint_path' in entry.__doc__
    assert f'{MICRO}: a timm model from models.py' in getattr(hubconf, MICRO).__doc__


def test_torch_hub_load_builds_with_create_model_kwargs():
    model = torch.hub.load(ROOT, MICRO, source='local', num_classes=7)
    assert model.head.out_features == 7
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_checkpoint_path_loads_a_training_checkpoints_model_not_its_ema(tmp_path):
    trained, ema = timm.create_model(MICRO).state_dict(), timm.create_model(MICRO).state_dict()
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': trained, 'model_ema': ema, 'epoch': 3}, path)
    model = torch.hub.load(ROOT, MICRO, source='local', checkpoint_path=str(path))
    assert same_weights(model, trained) and not same_weights(model, ema)


def test_checkpoint_path_brings_its_class_count_and_input_size(tmp_path):
    trained = timm.create_model(MICRO, num_classes=3, img_size=8).state_dict()
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': trained, 'args': {'model': MICRO, 'input_size': 8, 'nb_classes': 3}}, path)
    model = torch.hub.load(ROOT, MICRO, source='local', checkpoint_path=str(path))
    assert same_weights(model, trained) and model(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match='num_classes='):  # kwargs still win over the saved args
        torch.hub.load(ROOT, MICRO, source='local', checkpoint_path=str(path), num_classes=5)


def test_checkpoint_path_loads_a_bare_state_dict_and_safetensors(tmp_path):
    state = timm.create_model(MICRO, num_classes=5).state_dict()
    torch.save(state, tmp_path / 'bare.pth')
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / 'weights.safetensors')
    for name in ('bare.pth', 'weights.safetensors'):
        model = getattr(hubconf, MICRO)(checkpoint_path=tmp_path / name, num_classes=5)
        assert same_weights(model, state), name


def test_checkpoint_of_another_shape_or_file_is_a_one_line_error(tmp_path):
    torch.save(timm.create_model(MICRO, num_classes=5).state_dict(), tmp_path / 'five.pth')
    with pytest.raises(ValueError, match=r'does not fit .*head\.weight.*num_classes=') as info:
        getattr(hubconf, MICRO)(checkpoint_path=tmp_path / 'five.pth')
    assert '\n' not in str(info.value)
    with pytest.raises(ValueError, match='does not exist'):
        getattr(hubconf, MICRO)(checkpoint_path=tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match='either'):
        getattr(hubconf, MICRO)(pretrained=True, checkpoint_path=tmp_path / 'five.pth')


def test_pretrained_loads_the_cfg_url(tmp_path):
    state = timm.create_model(MICRO).state_dict()
    weights = tmp_path / 'published' / 'micro-0123abcd.pth'
    weights.parent.mkdir()
    torch.save(state, weights)
    model = getattr(hubconf, MICRO)(pretrained=True, pretrained_cfg_overlay={'url': weights.as_uri()})
    assert same_weights(model, state)


def test_pretrained_without_url_says_to_pass_a_local_file():
    with pytest.raises(ValueError, match=f"{MICRO} has no published weights.*checkpoint_path="):
        getattr(hubconf, MICRO)(pretrained=True)


def test_pretrained_offline_says_to_pass_a_local_file(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    # the DeiT cfg's own url (dl.fbaipublicfiles.com), with the Hugging Face source switched off
    with pytest.raises(RuntimeError, match=r'could not fetch .*fbaipublicfiles.*checkpoint_path=') as info:
        hubconf.deit_tiny_patch16_224(pretrained=True, pretrained_cfg_overlay={'hf_hub_id': None})
    assert '\n' not in str(info.value)


def test_pretrained_from_the_hub_offline_fails_after_one_attempt(monkeypatch):
    import model_factory
    attempts = []
    monkeypatch.setattr(model_factory, 'cached_hub_file', lambda *a: '')  # not downloaded before
    monkeypatch.setattr(model_factory, 'hub_unreachable', lambda *a: attempts.append(a) or 'ConnectError: offline')
    with pytest.raises(RuntimeError, match=r'could not fetch the deit_tiny_patch16_224 weights from https://\S+ '
                                           r'\(Hugging Face hub id timm/deit_tiny_patch16_224\.fb_in1k\) after one '
                                           r'attempt .*checkpoint_path=') as info:
        hubconf.deit_tiny_patch16_224(pretrained=True)
    assert len(attempts) == 1 and '\n' not in str(info.value)


OUR_MODULES = ['models', 'localvit_models', 'dhvt_models', 'evit_models', 'patchconvnet_models']


def test_every_published_cfg_has_a_class_count_and_preprocessing():
    published = [name for name in timm.list_models(module=OUR_MODULES, pretrained=True)
                 if timm.models.get_pretrained_cfg(name).url]
    assert {'localvit_tiny_patch16_224.in1k', 'localvit_small_patch16_224.in1k', 'S60.fb_in1k', 'B120.fb_in1k',
            'S60_multi.fb_scratch_in1k'} <= set(published)
    for name in published:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url.startswith(('https://github.com/', 'https://dl.fbaipublicfiles.com/')), name
        assert cfg.num_classes == 1000 and len(cfg.mean) == len(cfg.std) == 3, name
        assert 0 < cfg.crop_pct <= 1 and cfg.interpolation == 'bicubic', name


@pytest.mark.parametrize('name, url', [
    ('localvit_small_patch16_224', 'https://github.com/ofsoundof/LocalViT/releases/download/v1.0.0/localvit_s.pth'),
    ('S60', 'https://dl.fbaipublicfiles.com/deit/s60_224_1k.pth')])
def test_pretrained_offline_names_the_url_and_checkpoint_path(name, url, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(RuntimeError, match=f'could not fetch the {name} weights from {re.escape(url)} .*'
                                           "checkpoint_path=") as info:
        getattr(hubconf, name)(pretrained=True)
    assert '\n' not in str(info.value)


# ---------------------------------------------------------------- recipes

def is_recipe(path):
    """GPU recipes launch through scripts/_recipe.sh; the other scripts are CPU demos that train right away."""
    with open(path) as f:
        return not os.path.basename(path).startswith('_') and '_recipe.sh' in f.read()


RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, 'scripts', '*.sh')) if is_recipe(p))


def test_recipes_exist_parse_and_open_with_command_hardware_and_accuracy():
    names = {os.path.basename(p) for p in RECIPES}
    assert {'deit_small_imagenet.sh', 'localvit_small_imagenet.sh', 'dhvt_tiny_cifar100.sh',
            'dhvt_small_cifar100.sh', 'evit_small_imagenet.sh'} <= names
    for path in glob.glob(os.path.join(ROOT, 'scripts', '*.sh')):
        assert subprocess.run(['bash', '-n', path]).returncode == 0, path
    for path in RECIPES:
        with open(path) as f:
            config = re.search(r'-c "\$CONFIGS/([\w.]+\.yaml)"', f.read())
        assert config and os.path.isfile(os.path.join(ROOT, 'configs', config.group(1))), path


CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.yaml')))


@pytest.mark.parametrize('config', CONFIGS, ids=os.path.basename)
def test_every_config_opens_with_command_hardware_and_accuracy_and_parses(config):
    with open(config) as f:
        header = ''.join(itertools.takewhile(lambda line: line.startswith('#'), f))
    for word in ('Command', 'main.py', 'Hardware', '% '):
        assert word in header, f'{config} header lacks {word!r}'
    assert 'measured here' in header or 'reported by the paper' in header
    args = main.parse_args(['-c', config])
    assert timm.is_model(args.model) and args.config == config


def launched_args(recipe, tmp_path, nproc=None):
    """The argv a recipe hands to torchrun, captured by a stand-in torchrun on PATH."""
    fake_bin = tmp_path / 'bin'
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / 'torchrun').write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (fake_bin / 'torchrun').chmod(0o755)
    env = dict(os.environ, PATH=f'{fake_bin}{os.pathsep}{os.environ["PATH"]}', ARGS_OUT=str(tmp_path / 'argv'),
               TORCHRUN='torchrun')
    env.pop('LOCAL', None)
    if nproc:
        env['NPROC'] = str(nproc)
    subprocess.run(['bash', recipe, '/data/set', '/runs/out', '--seed', '7'], env=env, check=True,
                   capture_output=True)
    return (tmp_path / 'argv').read_text().splitlines()


@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_command_parses_with_main_and_keeps_the_global_batch(recipe, tmp_path):
    parser = main.get_args_parser()
    first = launched_args(recipe, tmp_path)
    paper_nproc = int(first[0].split('=')[1])
    argv = launched_args(recipe, tmp_path, nproc=1)
    assert argv[0] == '--nproc_per_node=1' and argv[1] == os.path.join(ROOT, 'main.py')
    args = main.parse_args(argv[2:], parser)
    assert timm.is_model(args.model), args.model
    assert (args.data_path, args.output_dir, args.seed) == ('/data/set', '/runs/out', 7)
    first_args = main.parse_args(first[2:], main.get_args_parser())
    assert args.batch_size == first_args.batch_size * paper_nproc


def test_recipes_launch_through_scripts_torchrun_by_default(tmp_path):
    fake_python = tmp_path / 'python'
    fake_python.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake_python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake_python), ARGS_OUT=str(tmp_path / 'argv'))
    env.pop('TORCHRUN', None)
    env.pop('LOCAL', None)
    subprocess.run(['bash', RECIPES[0], '/data/set', '/runs/out'], env=env, check=True, capture_output=True)
    argv = (tmp_path / 'argv').read_text().splitlines()
    assert argv[0] == os.path.join(ROOT, 'scripts', 'torchrun.py') and argv[1].startswith('--nproc_per_node=')
