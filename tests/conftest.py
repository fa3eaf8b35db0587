"""Shared helpers: run main.py as a user would, and write small image datasets to disk."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A seconds-long CPU run: the test-size model on 8 px images, no heavy augmentation.
TINY = ['--model', 'deit_micro_patch2_16', '--input-size', '8', '--batch-size', '32', '--epochs', '2',
        '--num_workers', '0', '--no-model-ema', '--mixup', '0', '--cutmix', '0', '--aa', 'none', '--reprob', '0',
        '--warmup-epochs', '0', '--cooldown-epochs', '0', '--device', 'cpu', '--print-freq', '5']


def run_main(args, timeout=600, env=None, launcher=None):
    """Run main.py in a subprocess; returns CompletedProcess with text stdout / stderr."""
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, 'main.py')] + [str(a) for a in args]
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def write_image_folder(root, classes=('cat', 'dog', 'fish'), per_class=(12, 4), size=12, seed=0):
    """train/ and val/ class folders of real files: JPEG and PNG in RGB, grayscale, RGBA and palette modes.

    Each class has its own mean colour, so a model can learn them apart.
    """
    rng = np.random.default_rng(seed)
    modes = ['RGB', 'L', 'RGBA', 'P']
    for split, count in zip(('train', 'val'), per_class):
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                base = np.zeros((size, size, 3), dtype=np.float64)
                base[..., c % 3] = 200
                pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, 'RGB')
                mode = modes[i % len(modes)]
                img = img.convert(mode) if mode != 'P' else img.convert('P', palette=Image.Palette.ADAPTIVE)
                ext = 'png' if mode in ('RGBA', 'P') or i % 2 else 'jpg'
                img.save(os.path.join(folder, f'{name}_{i}.{ext}'))
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(str(tmp_path / 'data'))


# ---------------------------------------------------------------- helpers for end-to-end tests

SUMMARY = r'\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)'


def read_log(output_dir):
    """log.txt as (header lines, epoch lines): headers carry 'config', epoch lines carry 'epoch'."""
    import utils
    return utils.read_log(str(output_dir))


def snapshot(folder):
    """{relative path: file bytes} of everything under folder ({} when it does not exist), but the run lock: a run
    refused after it took the lock leaves its pid there, which is no file of the user's."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name == '.lock' and dirpath == str(folder):
                continue
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
