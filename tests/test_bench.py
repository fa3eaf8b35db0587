"""scripts/bench.py: our training loop against a plain timm loop, on the CPU with the test-size model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, write_image_folder

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import bench  # noqa: E402

SCRIPT = os.path.join(ROOT, 'scripts', 'bench.py')
KEYS = {'model', 'input_size', 'batch_size', 'device', 'amp', 'compile', 'ours_img_s', 'plain_img_s', 'ratio',
        'flops_per_image', 'peak_flops', 'mfu', 'peak_memory_mb'}
TINY = ['--model', 'deit_micro_patch2_16', '--input-size', '16', '--batch-size', '8', '--device', 'cpu',
        '--steps', '3', '--warmup', '1', '--repeats', '2', '--num-classes', '10', '--matmul-size', '128']


def run_bench(*args):
    return subprocess.run([sys.executable, SCRIPT, *TINY, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))


def forward_flops_micro_16():
    """deit_micro_patch2_16 at 16 px, 10 classes, counted by hand: 64 patches + CLS, width 48, depth 2."""
    tokens, dim, depth, patches = 65, 48, 2, 64
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * 4 * dim
    return 2 * (patches * (3 * 2 * 2) * dim + depth * block + dim * 10)


def test_last_line_is_json_with_every_figure(tmp_path):
    folder = write_image_folder(str(tmp_path / 'images'))
    result = run_bench('--data-folder', folder, '--workers', '0,1', '--data-backend', 'pil,dali')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert not any(line.startswith('Epoch:') for line in lines)  # the engine's progress lines stay quiet
    figures = json.loads(lines[-1])
    assert KEYS <= set(figures)
    assert figures['model'] == 'deit_micro_patch2_16' and figures['batch_size'] == 8
    assert figures['amp'] == 'none' and figures['compile'] is False and figures['device'] == 'cpu'
    assert figures['ours_img_s'] > 0 and figures['plain_img_s'] > 0
    assert figures['ratio'] == pytest.approx(figures['ours_img_s'] / figures['plain_img_s'])
    assert len(figures['ours_runs']) == len(figures['plain_runs']) == 2
    assert figures['peak_flops'] > 0 and figures['peak_memory_mb'] > 0
    assert 0 < figures['epoch_start_s'] < 60  # a figure, not a goal: 0.05 s measured on the 2-core machine
    assert figures['mfu'] == pytest.approx(figures['flops_per_image'] * figures['ours_img_s'] / figures['peak_flops'])
    assert figures['mfu_against'] == 'measured peak' and figures['datasheet_peak_flops'] is None  # the CPU
    assert figures['loader_batches'] == {'0': 50, '1': 50}
    assert 'loader clock: from the iterator\'s creation' in result.stdout
    for backend in ('pil', 'dali'):
        speeds = figures['loader_img_s'][backend]
        assert set(speeds) == {'0', '1'} and min(speeds.values()) > 0
        for workers, speed in speeds.items():
            assert figures['feed_ratio'][backend][workers] == pytest.approx(speed / figures['ours_img_s'])


def test_training_flops_are_about_three_forwards():
    model = bench.timm.create_model('deit_micro_patch2_16', num_classes=10)
    flops = bench.training_flops_per_image(model, 16, torch.device('cpu'))
    assert 2.9 < flops / forward_flops_micro_16() < 3.1
    assert all(p.grad is None for p in model.parameters())


def test_ours_uses_main_builders_and_fp16_only_scales():
    args = bench.parse_args(TINY + ['--amp', 'bf16'])
    ours = bench.OursLoop(args, torch.device('cpu'))
    assert ours.state.amp_dtype == torch.bfloat16 and not ours.state.scaler.is_enabled()
    assert ours.state.mixup_fn is None and ours.state.model_ema is None
    assert len(ours.state.optimizer.param_groups) == 2  # timm's factory: no weight decay on norms and biases
    batches = bench.synthetic_batches(2, 8, 16, 10, torch.device('cpu'))
    before = [p.detach().clone() for p in ours.model.parameters()]
    ours.run(batches)
    assert any(not torch.equal(a, b) for a, b in zip(before, ours.model.parameters()))


def test_bad_workers_list_is_a_usage_error():
    result = run_bench('--workers', 'two')
    assert result.returncode == 2 and 'comma-separated list of worker counts' in result.stderr


def test_bench_photos_writes_natural_photo_jpegs(tmp_path):
    import bench_photos
    paths = bench_photos.write_photos(str(tmp_path), count=3, width=50, height=40, quality=90)
    assert [os.path.basename(p) for p in paths] == ['00000.jpg', '00001.jpg', '00002.jpg']
    sizes = {Image.open(p).size for p in paths}
    assert sizes == {(50, 40)}
    first, second = (np.asarray(Image.open(p)).astype(float) for p in paths[:2])
    assert first.std() > 5 and np.abs(first - second).mean() > 5  # photo content, windows of two photos
    with pytest.raises(ValueError, match='larger than the sample photographs'):
        bench_photos.write_photos(str(tmp_path), count=1, width=700, height=40, quality=90)


def test_mfu_is_against_the_datasheet_peak_when_the_gpu_is_known():
    assert bench.datasheet_peak_flops('NVIDIA H100 80GB HBM3', torch.bfloat16) == 989e12
    assert bench.datasheet_peak_flops('NVIDIA H100 PCIe', torch.float16) == 756e12
    assert bench.datasheet_peak_flops('NVIDIA H200', torch.bfloat16) == 989e12
    assert bench.datasheet_peak_flops('NVIDIA A100-SXM4-80GB', torch.bfloat16) == 312e12
    assert bench.datasheet_peak_flops('Tesla V100-SXM2-32GB', torch.bfloat16) is None  # V100 has no bf16
    assert bench.datasheet_peak_flops('NVIDIA L4', torch.float16) == 121e12
    assert bench.datasheet_peak_flops('NVIDIA GeForce RTX 4090', torch.bfloat16) is None
    known = {'peak_flops': 700e12, 'peak_flops_dtype': 'bfloat16', 'datasheet_peak_flops': 989e12,
             'gpu': 'NVIDIA H100 80GB HBM3', 'mfu': 0.40, 'mfu_plain': 0.41, 'mfu_measured_peak': 0.565}
    assert 'datasheet peak (989 TFLOP/s bfloat16 dense): ours 40.0%' in bench.mfu_line(known)
    assert 'measured peak 700000.0 GFLOP/s (bfloat16 matmul): ours 56.5%' in bench.mfu_line(known)
    unknown = dict(known, datasheet_peak_flops=None, gpu='NVIDIA GeForce RTX 4090')
    assert 'no datasheet peak for this GPU' in bench.mfu_line(unknown)


def test_the_loader_clock_covers_the_workers_head_start():
    """Timed from the iterator's creation, over at least 20x the batches the workers hold ready."""
    assert bench.loader_batches(50, 0) == 50 and bench.loader_batches(50, 14) == 20 * 14 * bench.PREFETCH_FACTOR
    clock = [0.0]
    bench.time.perf_counter, real = (lambda: clock[0]), bench.time.perf_counter
    try:
        def slow_start():
            clock[0] += 10.0  # the workers' start-up: before the first batch arrives
            for _ in range(4):
                clock[0] += 1.0
                yield torch.zeros(8, 3, 2, 2), 0
        assert bench.loader_images_per_sec(slow_start()) == pytest.approx(32 / 14)
    finally:
        bench.time.perf_counter = real


def test_the_loader_timing_reads_a_shard_folder(tmp_path):
    folder = write_image_folder(str(tmp_path / 'folder'), per_class=(12, 2))
    made = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'prepare_data.py'), folder,
                           str(tmp_path / 'shards'), '--shards', '--shard-size', '10'], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'bench.py'), '--model',
                             'deit_micro_patch2_16', '--input-size', '16', '--batch-size', '8', '--device', 'cpu',
                             '--steps', '1', '--warmup', '0', '--repeats', '1', '--data-folder',
                             str(tmp_path / 'shards'), '--workers', '0', '--data-backend', 'pil,dali'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    speeds = json.loads(result.stdout.strip().splitlines()[-1])['loader_img_s']
    assert speeds['pil']['0'] > 0 and speeds['dali']['0'] > 0
