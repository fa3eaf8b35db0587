"""Two CPU processes under torchrun (gloo) train the same model as one process with the same global batch."""
import os
import sys

import torch

from conftest import TINY, free_port, read_log, run_main

COMMON = TINY + ['--device', 'cpu', '--drop-path', '0', '--unscale-lr']  # --dist-eval is the default


def test_two_ranks_match_one_process(tmp_path):
    one, two = tmp_path / 'one', tmp_path / 'two'
    def torchrun(n):  # one process under torchrun uses repeated augmentation too, as in DeiT
        return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={n}', f'--master_port={free_port()}']
    single = run_main(COMMON + ['--batch-size', '32', '--output_dir', one], launcher=torchrun(1))
    assert single.returncode == 0, single.stderr[-3000:]
    dist = run_main(COMMON + ['--batch-size', '16', '--output_dir', two], launcher=torchrun(2))
    assert dist.returncode == 0, dist.stdout[-2000:] + dist.stderr[-3000:]
    assert 'world size 2, backend gloo' in dist.stdout
    assert 'launcher: single process (torchrun' in single.stdout
    for run in (single, dist):
        assert '| sampler: repeated augmentation (3 repeats, torchrun launch)' in run.stdout
    assert '44 updates per epoch' in single.stdout and '44 updates per epoch' in dist.stdout

    a = torch.load(one / 'checkpoint.pth', weights_only=True)['model']
    b = torch.load(two / 'checkpoint.pth', weights_only=True)['model']
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-4, diff  # measured 7e-6: gradients are summed in another order

    # Both evaluate each of the 359 validation images once: the same correct count, the same mean loss.
    for x, y in zip(read_log(one)[1], read_log(two)[1]):
        assert x['test_acc1'] == y['test_acc1'] and abs(x['test_loss'] - y['test_loss']) < 1e-4
        correct = y['test_acc1'] * 359 / 100
        assert abs(correct - round(correct)) < 1e-6

    # --no-dist-eval (DeiT's default: every rank scores all 359 images) gives the numbers of the sharded default.
    scores = []
    for extra in ([], ['--no-dist-eval']):
        scored = run_main(TINY + ['--device', 'cpu', '--eval', '--resume', two / 'checkpoint.pth'] + extra,
                          launcher=torchrun(2))
        assert scored.returncode == 0, scored.stderr[-3000:]
        scores.append([line for line in scored.stdout.splitlines() if line.startswith('* Acc@1')])
    assert len(scores[0]) == 1 and scores[0] == scores[1]

    # Only rank 0 writes: one log header, one line per epoch, one events file, no stray files.
    assert sorted(os.listdir(two)) == ['.lock', 'best_checkpoint.pth', 'checkpoint.pth', 'log.txt', 'tb']
    headers, epochs = read_log(two)
    assert len(headers) == 1 and [e['epoch'] for e in epochs] == [0, 1]
    assert len(os.listdir(two / 'tb')) == 1


def test_multi_node_style_rendezvous(tmp_path):
    """torchrun's c10d rendezvous, as multi-node runs start (one node here): the ranks meet and train, here with
    DeiT's Cosub, whose doubled batch goes through DDP."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2',
                '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{free_port()}']
    cosub = ['--cosub', '--drop-path', '0.1', '--bce-loss']
    result = run_main(COMMON + cosub + ['--batch-size', '16', '--epochs', '1', '--output_dir', tmp_path],
                      launcher=launcher)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert 'launcher: torchrun (world size 2, backend gloo' in result.stdout
    assert [e['epoch'] for e in read_log(tmp_path)[1]] == [0]
