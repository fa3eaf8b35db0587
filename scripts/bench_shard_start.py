"""Start-up on a large WebDataset shard set: seconds from nothing to the first training batch, as main.py builds
them (--data-set WDS, the pil backend, its sampler and DataLoader workers).

    python scripts/bench_shard_start.py [--shards 1000] [--per-shard 1000] [--workers 2]

The set is faked so that it costs little disk: one real shard of tiny JPEGs, linked --shards times, with its index
and an _info.json that lists every link (a million samples for the defaults). Prints one JSON line.
"""
import argparse
import io
import json
import os
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import loaders  # noqa: E402
import main as training  # noqa: E402
import shards  # noqa: E402


def fake_shard_set(root, count, per_shard, classes=10):
    """One shard of per_shard 8 x 8 JPEGs written for real, and count - 1 links to it (and to its index)."""
    def samples():
        for i in range(per_shard):
            image = io.BytesIO()
            Image.new('RGB', (8, 8), (i % 256, 90, 160)).save(image, 'JPEG')
            yield f'sample{i:07d}', {'jpg': image.getvalue(), 'cls': str(i % classes).encode()}
    [(first, _)] = shards.write_shards(samples(), root, 'train', per_shard)
    names = [f'train-{k:06d}.tar' for k in range(count)]
    for name in names[1:]:
        os.symlink(first, os.path.join(root, name))
        os.symlink(shards.index_path(root, first), shards.index_path(root, name))
    shards.write_info(root, {'train': [(name, per_shard) for name in names],
                             'validation': [(first, per_shard)]})
    with open(os.path.join(root, 'classes.json'), 'w') as f:
        json.dump([str(k) for k in range(classes)], f)


def seconds_to_first_batch(root, workers):
    args = training.parse_args(['--data-set', 'WDS', '--data-path', root, '--model', 'deit_micro_patch2_16',
                            '--input-size', '16', '--batch-size', '64', '--num_workers', str(workers),
                            '--device', 'cpu'])
    args.launcher = 'single'  # what main.py's launch detection says for a plain python run
    start = time.perf_counter()
    dataset, _ = datasets.build_dataset(True, args, uint8=True)
    batch = next(iter(loaders.build_train_loader(args, dataset, args.batch_size)))
    return time.perf_counter() - start, len(dataset), batch[0].shape[0]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shards', type=int, default=1000)
    p.add_argument('--per-shard', type=int, default=1000)
    p.add_argument('--workers', type=int, default=2)
    return p


def main(argv=None):
    p = get_args_parser()
    args = p.parse_args(argv)
    if min(args.shards, args.per_shard) < 1 or args.workers < 0:
        p.error('--shards and --per-shard take 1 or more, --workers 0 or more')
    with tempfile.TemporaryDirectory() as root:
        made = time.perf_counter()
        fake_shard_set(root, args.shards, args.per_shard)
        made = time.perf_counter() - made
        seconds, samples, batch = seconds_to_first_batch(root, args.workers)
    print(json.dumps({'shards': args.shards, 'samples': samples, 'workers': args.workers, 'first_batch': batch,
                      'seconds_to_first_batch': round(seconds, 3), 'seconds_to_make_the_set': round(made, 1)}))


if __name__ == '__main__':
    main()
