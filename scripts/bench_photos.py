"""Write a folder of natural-photo JPEGs for loader benchmarks, with no download: windows cut at random from the two
photographs that ship with scikit-learn (427 x 640), mirrored at random, saved as JPEG.

    python scripts/bench_photos.py DIR [--count 256] [--width 500] [--height 375] [--quality 90]

The images go to DIR/photos/ (one class folder, as scripts/bench.py --data-folder and ImageFolder expect).
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image


def sample_photos():
    from sklearn.datasets import load_sample_images
    return load_sample_images().images


def write_photos(folder, count, width, height, quality, seed=0):
    """`count` JPEGs of width x height under folder/photos/; returns their paths."""
    photos = sample_photos()
    if any(height > p.shape[0] or width > p.shape[1] for p in photos):
        raise ValueError(f'{width} x {height} is larger than the sample photographs (640 x 427); pass a smaller '
                         '--width / --height')
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'photos'), exist_ok=True)
    paths = []
    for n in range(count):
        photo = photos[n % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - height + 1), rng.integers(0, photo.shape[1] - width + 1)
        window = photo[y:y + height, x:x + width]
        if rng.random() < 0.5:
            window = window[:, ::-1]
        path = os.path.join(folder, 'photos', f'{n:05d}.jpg')
        Image.fromarray(np.ascontiguousarray(window)).save(path, quality=quality)
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder')
    p.add_argument('--count', type=int, default=256)
    p.add_argument('--width', type=int, default=500)
    p.add_argument('--height', type=int, default=375)
    p.add_argument('--quality', type=int, default=90)
    args = p.parse_args(argv)
    if min(args.count, args.width, args.height) < 1 or not 1 <= args.quality <= 100:
        p.error('--count, --width and --height must be at least 1, --quality from 1 to 100')
    try:
        paths = write_photos(args.folder, args.count, args.width, args.height, args.quality)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'wrote {len(paths)} JPEGs of {args.width} x {args.height} to {os.path.join(args.folder, "photos")}')


if __name__ == '__main__':
    main()
