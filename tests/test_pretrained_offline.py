"""--pretrained and predict --hub without a network: one attempt at the Hugging Face hub, a one-line error naming the
URL and the hub id, the hub's cached file read without asking the network, and a line saying what was loaded and what
was left newly initialised."""
import os
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import main  # noqa: E402
import model_factory  # noqa: E402
import predict  # noqa: E402
from utils import UserError  # noqa: E402

# Each step of a build that reaches for the hub, printed as 'seconds|error line'; https goes to a closed local port.
TIMED_BUILD = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {root!r})
    import main, model_factory
    args = main.parse_args(['--model', {model!r}, '--pretrained', '--eval'])
    args.nb_classes = 3
    start = time.monotonic()
    try:
        model_factory.build_model(args)
        print('built')
    except Exception as e:
        print(f'{{time.monotonic() - start:.1f}}|{{e}}')
''')


def build_offline(model, tmp_path):
    env = dict(os.environ, https_proxy='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9',
               http_proxy='http://127.0.0.1:9', HTTP_PROXY='http://127.0.0.1:9', NO_PROXY='', no_proxy='',
               HF_HUB_CACHE=str(tmp_path / 'hub'), TORCH_HOME=str(tmp_path / 'torch'), OMP_NUM_THREADS='1')
    env.pop('HF_HUB_OFFLINE', None)  # the network is down, not switched off: the case where the hub retried
    result = subprocess.run([sys.executable, '-c', TIMED_BUILD.format(root=ROOT, model=model)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seconds, _, message = result.stdout.strip().splitlines()[-1].partition('|')
    return float(seconds), message


def test_pretrained_offline_fails_after_one_attempt_naming_the_url_and_the_hub_id(tmp_path):
    seconds, message = build_offline('deit_tiny_patch16_224', tmp_path)
    assert seconds < 15  # the hub's own retries took 55 s here
    assert message.startswith('--pretrained: could not download the deit_tiny_patch16_224 weights from '
                              'https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth (Hugging Face '
                              'hub id timm/deit_tiny_patch16_224.fb_in1k) after one attempt (')
    assert message.endswith('pass --finetune FILE (or --resume FILE with --eval)') and '\n' not in message


def test_a_hub_only_model_names_the_hub_file_url(monkeypatch, tmp_path):
    attempts = []

    def unreachable(url, *args, **kwargs):
        attempts.append(url)
        raise ConnectionError('[Errno 111] Connection refused')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'empty_cache'))
    monkeypatch.setattr(huggingface_hub, 'get_hf_file_metadata', unreachable)
    args = main.parse_args(['--model', 'test_vit', '--pretrained'])
    args.nb_classes = 3
    with pytest.raises(UserError) as info:
        model_factory.build_model(args)
    url = 'https://huggingface.co/timm/test_vit.r160_in1k/resolve/main/model.safetensors'
    assert attempts == [url]
    assert f'from {url} (Hugging Face hub id timm/test_vit.r160_in1k) after one attempt (ConnectionError: ' \
           '[Errno 111] Connection refused); download the file yourself and pass --finetune FILE' in str(info.value)


@pytest.fixture
def cached_test_vit(monkeypatch, tmp_path):
    """test_vit's published file, as the Hugging Face cache holds it once downloaded (random weights here); any
    attempt to reach the hub fails the test. Returns (its path, its weights)."""
    torch.manual_seed(1)
    weights = timm.create_model('test_vit').state_dict()
    snapshot = tmp_path / 'hub' / 'models--timm--test_vit.r160_in1k' / 'snapshots' / 'abc123'
    snapshot.mkdir(parents=True)
    (tmp_path / 'hub' / 'models--timm--test_vit.r160_in1k' / 'refs').mkdir()
    (tmp_path / 'hub' / 'models--timm--test_vit.r160_in1k' / 'refs' / 'main').write_text('abc123')
    save_file(weights, snapshot / 'model.safetensors')

    def no_network(*args, **kwargs):
        raise AssertionError('the hub was asked although its file is cached')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(huggingface_hub, 'get_hf_file_metadata', no_network)
    return str(snapshot / 'model.safetensors'), weights


@pytest.mark.parametrize('classes, initialised', [(3, "['head.weight', 'head.bias']"), (1000, '[]')])
def test_pretrained_reads_the_cached_file_and_says_what_it_left_initialised(cached_test_vit, classes, initialised,
                                                                            capsys):
    path, weights = cached_test_vit
    args = main.parse_args(['--model', 'test_vit', '--pretrained', '--input-size', '160'])
    args.nb_classes = classes
    model = model_factory.build_model(args)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if not k.startswith('head.'))
    assert torch.equal(state['head.weight'], weights['head.weight']) == (classes == 1000)
    assert f'| pretrained: loaded {path}; newly initialised: {initialised}' in capsys.readouterr().out


def test_predict_hub_reads_the_cached_file(cached_test_vit, tmp_path, capsys):
    path, _ = cached_test_vit
    image = tmp_path / 'red.png'
    Image.new('RGB', (40, 40), (200, 30, 30)).save(image)
    predict.main(['--model', 'test_vit', '--hub', str(image), '--topk', '1'])
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == str(image)
    assert f'| --hub: loaded {path}' in err
