"""--data-backend pil / dali: the batches each one gives, the same samplers behind both, DALI's CPU mode end to end."""
import os
from pathlib import Path
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, read_log, run_main, write_image_folder

import dali_loader
import datasets
import loaders
import main

CLASSES = ('cat', 'dog', 'fish')


def parse(*flags):
    args = main.get_args_parser().parse_args([str(f) for f in flags])
    datasets.resolve_data_set(args)
    args.launcher, args.device = 'single', 'cpu'
    return args


def photo_folder(root, per_class=(6, 3), size=(80, 60)):
    """JPEG photos of smooth colour gradients, one hue per class."""
    rng = np.random.default_rng(0)
    for split, count in zip(('train', 'val'), per_class):
        for c, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                y, x = np.mgrid[0:size[1], 0:size[0]]
                pixels = np.stack([(x * 3 + 40 * c) % 256, (y * 4 + i * 10) % 256, (x + y) % 256], -1)
                pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f'{i}.jpg'), quality=95)
    return root


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    return photo_folder(str(tmp_path_factory.mktemp('photos')))


def loaders_for(backend, root, size=48, *flags):
    args = parse('--data-path', root, '--data-backend', backend, '--input-size', size, '--batch-size', 4,
                 '--num-workers', 0, *flags)
    train, _ = datasets.build_dataset(True, args, uint8=True)
    val, _ = datasets.build_dataset(False, args, uint8=True)
    return args, train, val, loaders.build_train_loader(args, train, 4), loaders.build_val_loader(args, val)


@pytest.mark.parametrize('backend', ['pil', 'dali'])
@pytest.mark.parametrize('size', [24, 48])
def test_batches_have_the_right_shape_dtype_range_and_labels(backend, size, photos):
    args, train, val, train_loader, val_loader = loaders_for(backend, photos, size)
    train_loader.sampler.set_epoch(1)
    order = [index for index, _ in train_loader.sampler]
    batches = list(train_loader)
    assert len(batches) == len(train_loader) == len(train) // 4
    for b, (images, labels) in enumerate(batches):
        assert images.dtype == torch.uint8 and images.shape == (4, 3, size, size)
        assert labels.dtype == torch.int64
        expected = [train.samples[i][1] for i in order[4 * b:4 * b + 4]]
        assert labels.tolist() == expected  # the sampler's order, in both backends
    assert torch.cat([img for img, _ in batches]).float().std() > 10  # real pixels, not a constant fill
    seen = torch.cat([labels for _, labels in val_loader])
    assert seen.tolist() == [label for _, label in val.samples]  # every image once, in order
    finished = loaders.DeviceFinish('cpu')(batches[0][0])  # ImageNet-normalised: 0 -> -2.118, 255 -> 2.640
    assert finished.dtype == torch.float32 and -2.12 < finished.min() < finished.max() < 2.65


def test_dali_resumes_mid_epoch_on_the_remaining_samples(photos):
    _, train, _, loader, _ = loaders_for('dali', photos)
    loader.sampler.set_epoch(2)
    full = torch.cat([labels for _, labels in loader])
    loader.sampler.set_epoch(2, start=8)
    assert len(loader) == len(full) // 4 - 2
    assert torch.cat([labels for _, labels in loader]).tolist() == full[8:].tolist()


def test_dali_builds_its_pipeline_once_and_feeds_each_pass_its_order(photos):
    """Epochs, a pass left after one batch (a stop inside an epoch) and a mid-epoch resume share one pipeline, and
    none gets another pass's batches."""
    _, train, val, loader, val_loader = loaders_for('dali', photos)
    labels_of = lambda order: [train.samples[i][1] for i in order]  # noqa: E731
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        order = [index for index, _ in loader.sampler]
        assert torch.cat([labels for _, labels in loader]).tolist() == labels_of(order)[:len(loader) * 4]
    loader.sampler.set_epoch(2)
    next(iter(loader))  # abandoned after one batch
    loader.sampler.set_epoch(3, start=4)
    order = [index for index, _ in loader.sampler]
    assert torch.cat([labels for _, labels in loader]).tolist() == labels_of(order)[:len(loader) * 4]
    assert loader.builds == 1
    for _ in range(2):
        assert torch.cat([labels for _, labels in val_loader]).tolist() == [label for _, label in val.samples]
    assert val_loader.builds == 1


def test_a_file_pil_refuses_stops_a_dali_run_with_the_pil_backends_line(photos, tmp_path):
    import shutil
    root = tmp_path / 'photos'
    shutil.copytree(photos, root)
    bad = root / 'val' / CLASSES[0] / 'not_a_photo.jpg'  # evaluation reads every file
    bad.write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    result = run_main(['--model', 'deit_micro_patch2_16', '--data-path', root, '--data-backend', 'dali',
                       '--input-size', 16, '--epochs', 1, '--batch-size', 4, '--num-workers', 1, '--device', 'cpu',
                       '--no-model-ema'])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f'error: unreadable image {bad} (OSError: Truncated File Read); remove '
                     'or replace it, or pass --skip-bad-images'], result.stderr


def test_a_file_gone_during_a_dali_run_is_named(photos, tmp_path):
    import shutil
    root = tmp_path / 'photos'
    shutil.copytree(photos, root)
    _, _, val, _, val_loader = loaders_for('dali', str(root))
    gone = val.samples[0][0]  # evaluation reads every file
    os.remove(gone)
    with pytest.raises(main.UserError, match=f'^unreadable image {gone} '):
        list(val_loader)


def jpeg_segments(data):
    """(marker, offset) of each segment of a JPEG up to its first scan, and the offset where the scan's data starts."""
    i, found = 2, []
    while data[i + 1] != 0xDA:
        found.append((data[i + 1], i))
        i += 2 + int.from_bytes(data[i + 2:i + 4], 'big')
    return found, i + 2 + int.from_bytes(data[i + 2:i + 4], 'big')


def damaged_jpegs(good):
    """Two damaged copies of a JPEG on which the decoders disagree: libjpeg (pil) stops at an unknown marker in the
    scan data, which DALI's decoder fills in; DALI's parser stops at a Huffman table whose marker is wiped, which
    libjpeg passes over."""
    segments, scan = jpeg_segments(good)
    middle = (scan + len(good)) // 2
    dht = [offset for marker, offset in segments if marker == 0xC4][-1]
    return {'pil_refuses': good[:middle] + b'\xff\x6a' + good[middle:],
            'dali_refuses': good[:dht] + b'\x00\x00' + good[dht + 2:]}


def decoders_verdicts(data):
    """(pil reads it, DALI's decoder reads it alone)."""
    from images import BadImageError, load_rgb
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        return fn.decoders.image(fn.external_source(name='e', dtype=types.UINT8, ndim=1), output_type=types.RGB)
    pipe = decode()
    pipe.build()
    pipe.feed_input('e', [np.frombuffer(data, dtype=np.uint8)])
    try:
        load_rgb('x.jpg', data)
        pil = True
    except BadImageError:
        pil = False
    try:
        pipe.run()
        return pil, True
    except RuntimeError:
        return pil, False


@pytest.fixture
def damaged(photos, tmp_path):
    """A copy of the photos whose val/cat folder also holds the two damaged JPEGs."""
    import shutil
    root = tmp_path / 'photos'
    shutil.copytree(photos, root)
    for name, data in damaged_jpegs((root / 'val' / CLASSES[0] / '0.jpg').read_bytes()).items():
        (root / 'val' / CLASSES[0] / f'{name}.jpg').write_bytes(data)
    return root


def test_the_damaged_jpegs_split_the_two_decoders(damaged):
    folder = damaged / 'val' / CLASSES[0]
    assert decoders_verdicts((folder / 'pil_refuses.jpg').read_bytes()) == (False, True)
    assert decoders_verdicts((folder / 'dali_refuses.jpg').read_bytes()) == (True, False)


@pytest.mark.parametrize('backend', ['pil', 'dali'])
def test_both_backends_refuse_what_pil_refuses_with_one_line(backend, damaged):
    _, _, val, _, loader = loaders_for(backend, str(damaged))
    with pytest.raises(main.UserError) as refused:
        list(loader)
    bad = damaged / 'val' / CLASSES[0] / 'pil_refuses.jpg'
    assert str(refused.value) == (f'unreadable image {bad} (OSError: broken data stream when reading image file); '
                                  'remove or replace it, or pass --skip-bad-images')


def test_both_backends_skip_the_same_files_and_dali_reads_what_only_pil_reads(damaged, capsys):
    """--skip-bad-images leaves out the file pil refuses in both; the file DALI's decoder refuses is given to DALI
    as pil decodes it, so both backends score the same images with the same pixels."""
    batches = {}
    for backend in ('pil', 'dali'):
        _, _, val, _, loader = loaders_for(backend, str(damaged), 48, '--skip-bad-images')
        kept = [batch for batch in loader if batch is not None]
        batches[backend] = [torch.cat([images for images, _ in kept]).float(),
                            torch.cat([labels for _, labels in kept]).tolist()]
    names = [os.path.basename(path) for path, _ in val.samples]
    assert batches['pil'][1] == batches['dali'][1] and len(batches['pil'][1]) == len(names) - 1
    differences = (batches['pil'][0] - batches['dali'][0]).abs().mean(dim=(1, 2, 3))
    assert differences.max() < 1.0
    kept_names = [name for name in names if name != 'pil_refuses.jpg']
    assert differences[kept_names.index('dali_refuses.jpg')] < 1.0
    note = f"note: DALI cannot decode {damaged / 'val' / CLASSES[0] / 'dali_refuses.jpg'}, which pil reads"
    assert note in capsys.readouterr().out


def test_dali_training_passes_over_an_unreadable_file_like_the_pil_backend(damaged):
    """Training under --skip-bad-images: the next readable sample takes the bad one's place and each batch counts
    the samples passed over, in both backends."""
    import shutil
    shutil.rmtree(damaged / 'train')
    shutil.copytree(damaged / 'val', damaged / 'train')
    counts, labels = {}, {}
    for backend in ('pil', 'dali'):
        _, train, _, loader, _ = loaders_for(backend, str(damaged), 48, '--skip-bad-images')
        loader.sampler.set_epoch(0)
        batches = list(loader)
        assert all(len(batch) == 3 and batch[0].shape[0] == 4 for batch in batches)
        counts[backend] = sum(int(batch[2].sum()) for batch in batches)
        labels[backend] = torch.cat([batch[1] for batch in batches]).tolist()
    order = [index for index, _ in loader.sampler][:len(loader) * 4]
    bad = [path for path, _ in train.samples].index(str(damaged / 'train' / CLASSES[0] / 'pil_refuses.jpg'))
    assert counts['pil'] == counts['dali'] == order.count(bad) and labels['pil'] == labels['dali']


def test_dali_asks_pil_once_per_file_and_not_in_a_set_prepare_data_wrote(photos, tmp_path, monkeypatch):
    from test_prepare_data import prepare_data
    judged = []
    real = dali_loader.load_rgb
    monkeypatch.setattr(dali_loader, 'load_rgb', lambda name, data: judged.append(name) or real(name, data))
    _, _, val, _, loader = loaders_for('dali', photos)
    for _ in range(2):
        list(loader)
    assert sorted(judged) == sorted(path for path, _ in val.samples)
    copy = tmp_path / 'copy'
    assert prepare_data.main([photos, str(copy), '--workers', '1']) == 0
    judged.clear()
    _, _, _, _, loader = loaders_for('dali', str(copy))
    list(loader)
    assert judged == []


def test_dali_shards_evaluation_by_rank_like_the_pil_backend(photos):
    args = parse('--data-path', photos, '--data-backend', 'dali', '--input-size', 48, '--dist-eval', '--num-workers', 0)
    val, _ = datasets.build_dataset(False, args, uint8=True)
    seen = []
    for rank in range(2):
        sampler = loaders.EvalSampler(len(val), 2, rank)
        loader = dali_loader.build_val_loader(args, val, sampler, 2)
        seen += torch.cat([labels for _, labels in loader]).tolist()
    assert sorted(seen) == sorted(label for _, label in val.samples)


def test_evaluation_images_agree_between_backends(photos):
    """Resize + center crop: the same pixels up to the two libraries' bicubic resampling."""
    _, _, _, _, pil = loaders_for('pil', photos, 48)
    _, _, _, _, dali = loaders_for('dali', photos, 48)
    a = torch.cat([images for images, _ in pil]).float()
    b = torch.cat([images for images, _ in dali]).float()
    assert a.shape == b.shape
    assert (a - b).abs().mean() < 4, (a - b).abs().mean()


@pytest.mark.parametrize('size', [24, 64])
def test_training_statistics_agree_between_backends(size, photos):
    """Crop, flip and RandAugment drawn by each library: the normalised batches' mean and spread agree."""
    stats = {}
    for backend in ('pil', 'dali'):
        args, _, _, loader, _ = loaders_for(backend, photos, size, '--reprob', 0)
        finish = loaders.device_finish(args, 'cpu', is_train=True)
        images = torch.cat([finish(img) for epoch in range(6) for img, _ in epoch_batches(loader, epoch)])
        stats[backend] = (images.mean().item(), images.std().item())
    (mean_pil, std_pil), (mean_dali, std_dali) = stats['pil'], stats['dali']
    assert abs(mean_pil - mean_dali) < 0.15 and abs(std_pil - std_dali) / std_pil < 0.15, stats


def epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


# timm's RandAugment ops ('inc1') and the DALI op that does each, with timm's magnitude range at m = 10
TIMM_TO_DALI = {'AutoContrast': ('auto_contrast', None), 'Equalize': ('equalize', None), 'Invert': ('invert', None),
                'Rotate': ('rotate', (0, 30)), 'PosterizeIncreasing': ('posterize', (4, 0)),
                'SolarizeIncreasing': ('solarize', (256, 0)), 'SolarizeAdd': ('solarize_add', (0, 110)),
                'ColorIncreasing': ('color', (0, 0.9)), 'ContrastIncreasing': ('contrast', (0, 0.9)),
                'BrightnessIncreasing': ('brightness', (0, 0.9)), 'SharpnessIncreasing': ('sharpness', (0, 0.9)),
                'ShearX': ('shear_x', (0, 0.3)), 'ShearY': ('shear_y', (0, 0.3)),
                'TranslateXRel': ('translate_x', (0, 0.45)), 'TranslateYRel': ('translate_y', (0, 0.45))}


def test_dali_rand_augment_has_timms_ops_and_ranges_each_applied_half_the_time():
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, rand_augment_transform
    ops = dali_loader.timm_rand_augment_ops()
    assert [op.name for op in ops].count('identity') == len(ops) // 2  # timm: each picked op runs with p = 0.5
    assert {op.name: op.mag_range for op in ops if op.name != 'identity'} == dict(
        TIMM_TO_DALI[name] for name in _RAND_INCREASING_TRANSFORMS)
    assert all(op.prob == 0.5 for op in rand_augment_transform('rand-m9-mstd0.5-inc1', {}).ops)


def test_dali_rand_augment_follows_deits_n_and_m():
    assert dali_loader.rand_augment_n_m('rand-m9-mstd0.5-inc1') == (2, 9.0)
    assert dali_loader.rand_augment_n_m('rand-n3-m7') == (3, 7.0)
    assert dali_loader.rand_augment_n_m('rand-m15') == (2, 10.0)  # timm clips at 10 without mmax


def test_dali_takes_every_rand_augment_magnitude_pil_takes(photos):
    _, _, _, loader, _ = loaders_for('dali', photos, 48, '--aa', 'rand-m15-mstd0.5')
    loader.sampler.set_epoch(0)
    images, _ = next(iter(loader))
    assert images.shape == (4, 3, 48, 48)
    with pytest.raises(main.UserError, match=r'magnitudes above 10'):
        dali_loader.check_flags(parse('--data-backend', 'dali', '--data-path', photos, '--aa', 'rand-m15-mmax20'))


@pytest.mark.parametrize('flags, named', [
    (['--ThreeAugment'], '--ThreeAugment'),
    (['--aa', 'v0'], '--aa v0'),
    (['--data-set', 'DIGITS'], '--data-set DIGITS'),
    (['--train-interpolation', 'random'], '--train-interpolation random'),
])
def test_dali_refuses_what_it_cannot_do_in_one_line(flags, named, photos):
    result = run_main(['--data-path', photos, '--data-backend', 'dali', '--device', 'cpu', *flags])
    assert result.returncode != 0
    assert f'--data-backend dali does not support {named}' in result.stderr
    assert 'use --data-backend pil' in result.stderr and 'Traceback' not in result.stderr


def test_without_dali_installed_the_error_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, 'nvidia.dali', None)
    with pytest.raises(main.UserError, match=r'pip install nvidia-dali-cuda\d+0'):
        dali_loader.check_flags(parse('--data-backend', 'dali', '--data-path', '.'))


def test_dali_wheel_matches_torchs_cuda():
    if torch.version.cuda:
        assert dali_loader.dali_wheel() == f'nvidia-dali-cuda{torch.version.cuda.split(".")[0]}0'


@pytest.mark.parametrize('backend', ['pil', 'dali'])
def test_both_backends_train_the_quick_start_model_on_a_folder(backend, tmp_path):
    root = write_image_folder(str(tmp_path / 'data'), size=24)
    out = tmp_path / 'out'
    result = run_main(['-c', 'configs/digits_dhvt.yaml', '--data-set', 'FOLDER', '--data-path', root,
                       '--data-backend', backend, '--epochs', 2, '--batch-size', 8, '--num-workers', 1,
                       '--output_dir', out])
    assert result.returncode == 0, result.stderr
    _, epochs = read_log(out)
    assert [e['epoch'] for e in epochs] == [0, 1]
    assert all(e['train_size'] == 16 and np.isfinite(e['train_loss']) for e in epochs)
    assert os.path.isfile(out / 'checkpoint.pth')


def test_dali_multi_size_training_rebuilds_the_pipeline_at_each_size(photos, tmp_path):
    out = tmp_path / 'out'
    result = run_main(['--model', 'deit_micro_patch2_16', '--data-path', photos, '--data-backend', 'dali',
                       '--input-size', 16, '--size-schedule', '0:8,1:16', '--epochs', 2, '--batch-size', 4,
                       '--num-workers', 1, '--device', 'cpu', '--no-model-ema', '--output_dir', out])
    assert result.returncode == 0, result.stderr
    _, epochs = read_log(out)
    assert [e['train_size'] for e in epochs] == [8, 16]


def test_dali_run_stopped_mid_epoch_resumes_the_same_schedule(photos, tmp_path):
    """SIGTERM inside epoch 1, then the same command: the same epochs, updates and learning rates as a run left
    alone (DALI's augmentations differ, so the weights may; docs/data.md)."""
    flags = ['--model', 'deit_micro_patch2_16', '--data-path', photos, '--data-backend', 'dali', '--input-size', 16,
             '--batch-size', 4, '--num-workers', 1, '--device', 'cpu', '--no-model-ema', '--epochs', 2,
             '--print-freq', 1]
    alone = tmp_path / 'alone'
    assert run_main(flags + ['--output_dir', alone]).returncode == 0
    stopped = tmp_path / 'stopped'
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py')] + [str(f) for f in flags] +
                            ['--output_dir', str(stopped)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    for line in proc.stdout:
        if line.startswith('Epoch: [1] [1/'):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    assert torch.load(stopped / 'checkpoint.pth', weights_only=True)['step_in_epoch'] > 0  # inside epoch 1
    result = run_main(flags + ['--output_dir', stopped])
    assert result.returncode == 0, result.stderr
    expected, resumed = read_log(alone)[1], read_log(stopped)[1]
    assert [e['epoch'] for e in resumed] == [e['epoch'] for e in expected] == [0, 1]
    for key in ('train_lr', 'train_size', 'batch_size'):
        assert [e[key] for e in resumed] == pytest.approx([e[key] for e in expected]), key


def special_files(root):
    """One folder of the files the backends once read differently: an EXIF-rotated JPEG and PNGs with alpha (fully
    transparent on the left half, whose stored colours differ from any background)."""
    folder = os.path.join(root, 'val', 'a')
    os.makedirs(folder)
    os.makedirs(os.path.join(root, 'train', 'a'))
    y, x = np.mgrid[0:60, 0:80]
    pixels = np.stack([x * 3 % 256, y * 4 % 256, (x + y) % 256], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(os.path.join(folder, 'exif6.jpg'), quality=95, exif=exif.tobytes())
    rgba = Image.fromarray(np.dstack([pixels, np.where(x < 40, 0, 255).astype(np.uint8)]), 'RGBA')
    rgba.save(os.path.join(folder, 'rgba.png'))
    rgba.convert('LA').save(os.path.join(folder, 'la.png'))
    Image.fromarray(pixels).convert('P', palette=Image.Palette.ADAPTIVE).save(os.path.join(folder, 'p.png'),
                                                                              transparency=0)
    for name in os.listdir(folder):
        os.link(os.path.join(folder, name), os.path.join(root, 'train', 'a', name))
    return sorted(os.listdir(folder))


@pytest.mark.parametrize('size', [24, 48])
def test_both_backends_read_exif_rotated_and_alpha_images_alike(tmp_path, size):
    """The pixels as stored, as DeiT's loader reads them: no EXIF rotation, alpha dropped."""
    names = special_files(str(tmp_path))
    batches = {}
    for backend in ('pil', 'dali'):
        _, _, val, _, loader = loaders_for(backend, str(tmp_path), size)
        assert [os.path.basename(path) for path, _ in val.samples] == names
        batches[backend] = torch.cat([images for images, _ in loader]).float()
    unrotated = np.asarray(Image.open(tmp_path / 'val' / 'a' / 'exif6.jpg').convert('RGB'))
    assert unrotated.shape == (60, 80, 3)  # PIL applies no orientation on its own
    differences = (batches['pil'] - batches['dali']).abs().mean(dim=(1, 2, 3))
    assert differences.max() < 1.0, dict(zip(names, differences.tolist()))  # 80 and 129 of 255 before
