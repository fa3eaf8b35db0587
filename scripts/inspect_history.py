"""Summarize and plot the training history of one or more runs from their output_dir/log.txt.

    python scripts/inspect_history.py runs/deit_s runs/evit_s -o history.png

Prints one row per run (model, epochs, best top-1 and its epoch, training time, mean training img/s) and draws
train / test loss, top-1 accuracy and learning rate per epoch (default: history.png in the first run folder).
A resumed run appends a second header to log.txt; an epoch logged twice keeps its last line.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
import visualize  # noqa: E402

LOG_NAME = 'log.txt'


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', metavar='RUN_DIR', help='output_dir of a run, or its log.txt')
    p.add_argument('-o', '--output', default='', metavar='FILE', help='the PNG to write (missing folders are made; a '
                   'file there is replaced, and the tool says so)')
    return p


def read_history(run):
    """(config of the latest header, epoch dicts sorted by epoch, the last line of an epoch winning) of a run."""
    headers, lines = utils.read_log(run)
    epochs = {entry['epoch']: entry for entry in lines}
    if not epochs:
        raise ValueError(f'{run} has no epoch lines yet; wait for the first epoch to finish')
    return (headers[-1]['config'] if headers else {}), [epochs[e] for e in sorted(epochs)]


def summarize(config, epochs):
    """One summary row: best top-1, its epoch, training time and mean training throughput."""
    best = max(epochs, key=lambda e: e.get('test_acc1', float('-inf')))
    speeds = [e['train_images_per_sec'] for e in epochs if e.get('train_images_per_sec')]
    return {'model': config.get('model', '?'), 'epochs': len(epochs), 'best_acc1': best.get('test_acc1'),
            'best_epoch': best['epoch'], 'hours': sum(e.get('epoch_seconds', 0) for e in epochs) / 3600,
            'images_per_sec': sum(speeds) / len(speeds) if speeds else None}


def run_labels(runs):
    """Folder names as labels; the full paths when two runs share a folder name."""
    names = [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r) or '.'))
             for r in runs]
    return names if len(set(names)) == len(names) else list(runs)


def format_table(rows):
    header = ('run', 'model', 'epochs', 'best acc1', 'at epoch', 'time', 'img/s')
    lines = [[label, r['model'], str(r['epochs']), _number(r['best_acc1'], '.2f'), str(r['best_epoch']),
              utils.format_seconds(r['hours'] * 3600), _number(r['images_per_sec'], '.0f')]
             for label, r in rows.items()]
    widths = [max(len(cells[i]) for cells in [header] + lines) for i in range(len(header))]
    return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()
                     for cells in [header] + lines)


def _number(value, spec):
    return '-' if value is None else format(value, spec)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    first = args.runs[0]
    output = args.output or os.path.join(first if os.path.isdir(first) else os.path.dirname(first), 'history.png')
    try:
        replacing = utils.check_output_file(output, '-o')
        histories = dict(zip(run_labels(args.runs), (read_history(r) for r in args.runs)))
    except (ValueError, utils.UserError) as e:
        utils.exit_with_error(e)
    print(format_table({label: summarize(*history) for label, history in histories.items()}))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    visualize.draw_history({label: epochs for label, (_, epochs) in histories.items()}, output)
    print(f'wrote {output}' + (' (replaced the file that was there)' if replacing else ''))


if __name__ == '__main__':
    main()
