"""scripts/predict.py, scripts/inspect_history.py, scripts/visualize_attention.py and EViT keep-mask pictures."""
import json
import math
import os
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import ROOT, run_main, write_image_folder

sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import export  # noqa: E402
import inspect_history  # noqa: E402
import model_factory  # noqa: E402
import models  # noqa: E402, F401 - registers the project's models in timm
import predict  # noqa: E402
import visualize  # noqa: E402
import visualize_attention  # noqa: E402
from utils import UserError  # noqa: E402

CLASSES = ['cat', 'dog', 'fish']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A main.py-style checkpoint of an untrained deit_micro_patch2_16 for 3 classes at 8 px."""
    torch.manual_seed(0)
    model = timm.create_model('deit_micro_patch2_16', num_classes=3, img_size=8)
    path = str(tmp_path_factory.mktemp('ckpt') / 'checkpoint.pth')
    torch.save({'model': model.state_dict(), 'class_names': CLASSES,
                'args': {'model': 'deit_micro_patch2_16', 'input_size': 8, 'nb_classes': 3}}, path)
    return path


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """The val/ folder: 3 classes x 4 images, in nested class folders, mixed modes and formats."""
    return os.path.join(write_image_folder(str(tmp_path_factory.mktemp('data'))), 'val')


def run_tool(tool, argv, capsys):
    tool.main([str(a) for a in argv])
    return capsys.readouterr().out


# ---------------------------------------------------------------- predict

def test_predict_folder_in_batches_gives_sorted_named_topk(checkpoint, images, tmp_path, capsys):
    plot = str(tmp_path / 'predictions.png')
    out = run_tool(predict, ['--checkpoint', checkpoint, images, '--topk', 2, '--batch-size', 5, '--json',
                             '--device', 'cpu', '--plot', plot], capsys)
    results = json.loads(out)
    assert len(results) == 12  # every image of every class folder, over three batches
    assert sorted(r['image'] for r in results) == sorted(predict.list_images([images]))
    for result in results:
        probs = [p['probability'] for p in result['predictions']]
        assert len(probs) == 2
        assert probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6
        assert all(p['class'] == CLASSES[p['index']] for p in result['predictions'])
    with Image.open(plot) as png:
        png.load()
        assert png.size[0] > png.size[1] > 100  # 12 images: 4 columns, 3 rows


def test_predict_one_image_matches_its_batch_and_topk_caps_at_the_classes(checkpoint, images, capsys):
    model, transform, names = predict.load_model(checkpoint)
    paths = predict.list_images([images])
    batched = predict.predict(model, transform, names, paths, topk=10, batch_size=len(paths))
    alone = predict.predict(model, transform, names, paths[3:4], topk=10, batch_size=1)
    assert [p['class'] for p in alone[0]['predictions']] == [p['class'] for p in batched[3]['predictions']]
    assert np.allclose([p['probability'] for p in alone[0]['predictions']],
                       [p['probability'] for p in batched[3]['predictions']], atol=1e-5)
    assert len(batched[0]['predictions']) == 3
    assert math.isclose(sum(p['probability'] for p in batched[0]['predictions']), 1, abs_tol=1e-5)
    text = run_tool(predict, ['--checkpoint', checkpoint, paths[0], '--topk', 1], capsys)
    assert text.splitlines()[0] == paths[0] and text.splitlines()[1].split()[-1] in CLASSES


def test_predict_from_a_bare_state_dict_and_model_name(images, tmp_path):
    bare = str(tmp_path / 'weights.pth')
    torch.save(timm.create_model('deit_micro_patch2_16', num_classes=3).state_dict(), bare)
    model, transform, names = predict.load_model(bare, 'deit_micro_patch2_16')
    assert names == ['0', '1', '2']  # the head's width; no names stored
    assert transform(Image.new('RGB', (30, 20))).shape == (3, 16, 16)  # the model's default input size
    results = predict.predict(model, transform, names, predict.list_images([images])[:2], topk=3)
    assert all(math.isclose(sum(p['probability'] for p in r['predictions']), 1, abs_tol=1e-5) for r in results)


@pytest.mark.parametrize('argv, message', [
    ([], 'no weights given'),
    (['--checkpoint', 'missing.pth'], 'does not exist'),
    (['--checkpoint', '{ckpt}', '--model', 'deit_tiny_patch16_224'], 'drop --model'),
    (['--checkpoint', '{ckpt}', '--ema'], 'no EMA weights'),
])
def test_predict_bad_input_is_one_line_and_exit_2(checkpoint, images, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        predict.main([a.format(ckpt=checkpoint) for a in argv] + [images])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_predict_names_a_file_that_is_not_a_checkpoint_or_the_global_it_refuses(images, tmp_path, capsys):
    picture = tmp_path / 'photo.pth'
    Image.new('RGB', (4, 4)).save(picture, format='PNG')
    pickled = tmp_path / 'pickled.pth'
    torch.save({'model': {'w': torch.zeros(2)}, 'when': __import__('datetime').date(2024, 1, 1)}, pickled)
    for path, message in [(picture, f'{picture} is unreadable: not a checkpoint'),
                          (pickled, f'checkpoint {pickled} holds a pickled datetime.date, which a safe')]:
        with pytest.raises(SystemExit) as exit_info:
            predict.main(['--checkpoint', str(path), images])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
        assert 'Weights only load failed' not in err[0]


@pytest.fixture(scope='module')
def pretrained_run(tmp_path_factory):
    """The checkpoint of a run trained with --pretrained (timm's test_vit, which has published weights) at 32 px
    for the 3 classes."""
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=3, img_size=32)
    path = str(tmp_path_factory.mktemp('pretrained') / 'checkpoint.pth')
    torch.save({'model': model.state_dict(), 'class_names': CLASSES, 'args': {
        'model': 'test_vit', 'input_size': 32, 'nb_classes': 3, 'pretrained': True}}, path)
    return path


def test_a_pretrained_run_is_rebuilt_from_its_checkpoint_without_a_download(pretrained_run, images, tmp_path,
                                                                            monkeypatch, capsys):
    def download(*args, **kwargs):
        raise AssertionError('the published weights were asked for')
    monkeypatch.setattr(model_factory, 'create_pretrained', download)
    monkeypatch.setattr(model_factory, 'prepare_published', download)
    model, transform, names = predict.load_model(pretrained_run)
    assert names == CLASSES and model.num_classes == 3
    assert transform(Image.new('RGB', (50, 40))).shape == (3, 32, 32)  # the run's size, no --input-size needed
    saved = torch.load(pretrained_run, weights_only=True)['model']
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    output = tmp_path / 'new' / 'folder' / 'attention.png'
    out = run_tool(visualize_attention, ['--checkpoint', pretrained_run, predict.list_images([images])[0],
                                         '-o', output], capsys)
    assert out.strip() == f'wrote {output}' and output.is_file()


def test_predict_weights_of_another_model_name_the_first_misfit(images, tmp_path, capsys):
    bare = tmp_path / 'micro.pth'
    torch.save(timm.create_model('deit_micro_patch2_16', num_classes=3).state_dict(), bare)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(['--checkpoint', str(bare), '--model', 'deit_tiny_patch2_16', images])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert f'--checkpoint {bare} does not fit deit_tiny_patch2_16: cls_token is (1, 1, 48) there' in err[0]


def write_undecodable_files(folder):
    """A .jpg that holds text and an empty .png, beside the good images."""
    (folder / 'cat').mkdir(parents=True, exist_ok=True)
    (folder / 'cat' / 'notes.jpg').write_text('not an image')
    (folder / 'empty.png').write_bytes(b'')
    return [str(folder / 'cat' / 'notes.jpg'), str(folder / 'empty.png')]


def test_predict_skips_unreadable_files_names_them_and_exits_1_at_the_end(checkpoint, images, tmp_path, capsys):
    bad_folder = tmp_path / 'more'
    bad = write_undecodable_files(bad_folder)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(['--checkpoint', checkpoint, images, str(bad_folder), '--json', '--batch-size', '4'])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    assert len(json.loads(out)) == 12  # every readable image, after the unreadable ones
    lines = err.strip().splitlines()
    assert [line.split()[3] for line in lines[:2]] == sorted(bad)  # 'skipped: unreadable image PATH (...)'
    assert lines[-1] == f'error: 2 files could not be read: {", ".join(sorted(bad))} (each is named above); ' \
                        'remove or replace them'
    assert '--skip-bad-images' not in err  # a flag of main.py, not of this tool


def test_visualize_attention_names_an_unreadable_image_in_one_line(checkpoint, tmp_path, capsys):
    [bad, _] = write_undecodable_files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(['--checkpoint', checkpoint, bad, '-o', str(tmp_path / 'a.png')])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert f'unreadable image {bad}' in err[0] and '--skip-bad-images' not in err[0]
    assert not (tmp_path / 'a.png').exists()


# ---------------------------------------------------------------- output files

def test_inspect_history_writes_into_a_missing_folder_and_says_when_it_replaces(tmp_path, capsys):
    history = write_log(str(tmp_path / 'run'), 'deit_micro_patch2_16', [10.0, 20.0])
    figure = tmp_path / 'figures' / 'history.png'
    assert run_tool(inspect_history, [history, '-o', figure], capsys).splitlines()[-1] == f'wrote {figure}'
    assert run_tool(inspect_history, [history, '-o', figure], capsys).splitlines()[-1] == \
        f'wrote {figure} (replaced the file that was there)'


def test_predict_plot_says_when_it_replaces_a_file(checkpoint, images, tmp_path, capsys):
    plot = tmp_path / 'new' / 'predictions.png'
    image = predict.list_images([images])[0]
    predict.main(['--checkpoint', checkpoint, image, '--plot', str(plot)])
    assert capsys.readouterr().err.strip() == f'wrote {plot}'
    predict.main(['--checkpoint', checkpoint, image, '--plot', str(plot)])
    assert capsys.readouterr().err.strip() == f'wrote {plot} (replaced the file that was there)'


@pytest.mark.parametrize('tool', ['predict', 'visualize_attention', 'inspect_history', 'export'])
def test_an_output_under_a_file_is_refused_before_any_work(tool, checkpoint, images, tmp_path, capsys):
    blocker = tmp_path / 'results'
    blocker.write_text('a file, not a folder')
    target = blocker / 'out.png'
    image = predict.list_images([images])[0]
    argv = {'predict': (predict, ['--checkpoint', checkpoint, image, '--plot', target]),
            'visualize_attention': (visualize_attention, ['--checkpoint', checkpoint, image, '-o', target]),
            'inspect_history': (inspect_history, [write_log(str(tmp_path / 'run'), 'm', [1.0]), '-o', target]),
            'export': (export, [checkpoint, target])}
    flag = {'predict': '--plot', 'export': 'output file'}.get(tool, '-o')
    module, args = argv[tool]
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ''  # no predictions, tables or pictures first
    assert err.strip().splitlines() == [f'error: {flag} {target} lies under {blocker}, which is a file; '
                                        'pass a path in a folder']


def test_export_into_a_missing_folder_and_never_over_a_file(checkpoint, tmp_path, capsys):
    target = tmp_path / 'exports' / 'micro.safetensors'
    assert run_tool(export, [checkpoint, target], capsys).startswith('wrote ')
    before = target.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        export.main([checkpoint, str(target)])
    assert exit_info.value.code == 2 and 'exists' in capsys.readouterr().err
    assert target.read_bytes() == before


# ---------------------------------------------------------------- inspect_history

def epoch_line(epoch, acc1):
    return {'train_lr': 1e-4 * (epoch + 1), 'train_loss': 2.0 - 0.1 * epoch, 'test_loss': 2.1 - 0.1 * epoch,
            'test_acc1': acc1, 'test_acc5': acc1 + 10, 'epoch': epoch, 'n_parameters': 58618,
            'epoch_seconds': 1800.0, 'elapsed_seconds': 1800.0 * (epoch + 1), 'train_images_per_sec': 500.0,
            'max_accuracy': acc1}


def write_log(folder, model, acc1s, resumed_at=None):
    """log.txt as main.py writes it. resumed_at: that epoch was logged once (acc1 99), then the run resumed
    from the checkpoint before it and logged the epoch again."""
    header = {'config': {'model': model}}
    lines = [header]
    for epoch, acc1 in enumerate(acc1s):
        if epoch == resumed_at:
            lines += [epoch_line(epoch, 99.0), dict(header, resumed_from='checkpoint.pth')]
        lines.append(epoch_line(epoch, acc1))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'log.txt'), 'w') as f:
        f.write(''.join(json.dumps(line) + '\n' for line in lines))
    return folder


def test_inspect_history_summarizes_each_run_and_draws_a_png(tmp_path, capsys):
    first = write_log(str(tmp_path / 'deit_run'), 'deit_micro_patch2_16', [10.0, 40.0, 30.0])
    second = write_log(str(tmp_path / 'evit_run'), 'evit_micro_patch2_16', [20.0, 25.0, 50.0, 45.0], resumed_at=2)
    out = run_tool(inspect_history, [first, os.path.join(second, 'log.txt')], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert rows['deit_run'][1:5] == ['deit_micro_patch2_16', '3', '40.00', '1']
    assert rows['evit_run'][1:5] == ['evit_micro_patch2_16', '4', '50.00', '2']  # not the pre-resume 99.0
    assert rows['evit_run'][5] == '2:00:00' and rows['evit_run'][6] == '500'
    with Image.open(os.path.join(first, 'history.png')) as png:
        png.load()
        assert png.size == tuple(round(inches * visualize.HISTORY_DPI) for inches in visualize.HISTORY_FIGSIZE)


def test_inspect_history_without_epochs_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / 'fresh'
    folder.mkdir()
    (folder / 'log.txt').write_text(json.dumps({'config': {'model': 'x'}}) + '\n')
    with pytest.raises(SystemExit) as exit_info:
        inspect_history.main([str(folder)])
    assert exit_info.value.code == 2 and 'no epoch lines' in capsys.readouterr().err


# ---------------------------------------------------------------- visualize_attention

def test_visualize_attention_writes_a_png_grid(checkpoint, images, tmp_path, capsys):
    image = predict.list_images([images])[0]
    output = str(tmp_path / 'attention.png')
    run_tool(visualize_attention, ['--checkpoint', checkpoint, image, '-o', output], capsys)
    with Image.open(output) as png:
        png.load()
        assert png.size[0] > 200 and png.size[1] > 100


@pytest.mark.parametrize('name, kwargs, size', [
    ('deit_micro_patch2_16', {}, 16), ('deit_micro_distilled_patch2_16', {}, 16),
    ('localvit_micro_patch2_16', {}, 16), ('evit_micro_patch2_16', {'fuse_token': True}, 16),
    ('evit_micro_patch2_16', {'fuse_token': False}, 16)])
def test_rollout_rows_sum_to_one_and_maps_are_non_negative(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    maps, rollout = visualize_attention.attention_maps(model, torch.randn(1, 3, size, size))
    assert torch.allclose(rollout.sum(dim=-1), torch.ones(rollout.shape[0]), atol=1e-5)
    assert rollout.shape[1] == model.num_prefix_tokens + (size // 2) ** 2
    assert len(maps) == 2 + model.blocks[-1].attn.num_heads
    for title, heat in maps:
        assert heat.shape == (size // 2, size // 2) and heat.min() >= 0, title
    if kwargs.get('fuse_token') is False:  # without a fused token, dropped patches get no attention at all
        dropped = ~visualize.keep_masks(model.kept_indices, (size // 2) ** 2)[0, -1]
        assert dropped.any() and (maps[-1][1].flatten()[dropped] == 0).all()
        assert (maps[-1][1].flatten()[~dropped] > 0).all()


def test_patchconvnet_panels_are_its_class_attention_over_the_patch_grid():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    single = timm.create_model('patchconvnet_micro_patch4_16')
    [(title, heat)] = visualize_attention.aggregation_maps(single, x)
    assert title == 'class attention' and heat.shape == (4, 4) and 0 < heat.sum() < 1
    multi = timm.create_model('patchconvnet_micro_patch4_16', multi_class=True, num_classes=6)
    names = [f'digit{i}' for i in range(6)]
    maps = visualize_attention.aggregation_maps(multi, x, names)
    best = multi(x)[0].argmax().item()
    assert len(maps) == 4 and maps[0][0] == f'digit{best} token'
    assert all(torch.allclose(heat.sum(), torch.tensor(1.0), atol=1e-5) for _, heat in maps)


def test_recomputed_attention_reproduces_timm_fused_attention():
    torch.manual_seed(0)
    attn = timm.create_model('deit_micro_patch2_16').blocks[0].attn.eval()
    x = torch.randn(2, 65, 48)  # (B, N, C)
    probs = visualize_attention.attention_probs(attn, x)  # (B, H, N, N)
    v = attn.qkv(x).reshape(2, 65, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]  # (B, H, N, d)
    manual = attn.proj((probs @ v).transpose(1, 2).reshape(2, 65, 48))
    assert torch.allclose(manual, attn(x), atol=1e-5)


# ---------------------------------------------------------------- EViT keep-mask pictures

def evit_and_images(fuse_token, n=5, size=16):
    torch.manual_seed(0)
    model = timm.create_model('evit_micro_patch2_16', fuse_token=fuse_token, keep_rate=0.7)
    dataset = [(torch.randn(3, size, size), i % 10) for i in range(n)]  # (normalized image, label)
    return model, dataset


def test_keep_mask_pictures_one_png_per_image_with_the_keep_rate(tmp_path):
    model, dataset = evit_and_images(fuse_token=False)
    model.train()
    paths = visualize.save_keep_masks(model, dataset, str(tmp_path), 3, torch.device('cpu'))
    assert sorted(os.listdir(tmp_path / 'masks')) == ['0000.png', '0001.png', '0002.png'] == [
        os.path.basename(p) for p in paths]
    for path in paths:
        with Image.open(path) as png:
            png.load()
            assert png.size[0] > 2 * png.size[1]  # the image and one panel per keep layer, in a row
    assert model.training and not model.record_keep  # restored

    model.record_keep = True
    model.eval()(torch.stack([img for img, _ in dataset]))
    masks = visualize.keep_masks(model.kept_indices, 64)  # (B, layers, 64)
    kept = masks.sum(dim=-1)
    assert (kept[:, 0] == math.ceil(0.7 * 64)).all() and (kept[:, 1] == math.ceil(0.7 * 45)).all()
    assert abs(kept[0, 0].item() / 64 - 0.7) < 1 / 64
    assert not (masks[:, 1] & ~masks[:, 0]).any()  # a dropped patch never comes back

    image = np.random.default_rng(0).uniform(0, 0.5, (16, 16, 3))
    painted = visualize.masked_image(image, masks[0, 0].view(8, 8).numpy()) == visualize.DROPPED_FILL
    assert math.isclose(painted.all(axis=-1).mean(), 1 - 45 / 64)


def test_keep_masks_leave_out_the_fused_token():
    model, dataset = evit_and_images(fuse_token=True)
    model.record_keep = True
    model.eval()(torch.stack([img for img, _ in dataset]))
    assert (model.kept_indices[1] == -1).any()
    kept = visualize.keep_masks(model.kept_indices, 64).sum(dim=-1)
    assert (kept[:, 1] == (model.kept_indices[1] >= 0).sum(dim=1)).all()


def test_keep_mask_pictures_need_an_evit_model(tmp_path):
    with pytest.raises(UserError, match='not an EViT model'):
        visualize.save_keep_masks(timm.create_model('deit_micro_patch2_16'), [], str(tmp_path), 2,
                                  torch.device('cpu'))


def test_main_visualize_mask_under_eval(tmp_path):
    weights = tmp_path / 'weights.pth'  # --eval needs weights to score: a plain state dict will do
    torch.save(timm.create_model('evit_micro_patch2_16', num_classes=10, img_size=16).state_dict(), weights)
    out = run_main(['--model', 'evit_micro_patch2_16', '--input-size', '16', '--eval', '--visualize_mask',
                    '--n_visualization', '2', '--output_dir', tmp_path, '--num_workers', '0', '--device', 'cpu',
                    '--resume', weights])
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / 'masks')) == ['0000.png', '0001.png']
