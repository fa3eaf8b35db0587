"""Test top-1 accuracy against training hours (left) and epochs (right) for one or several runs.

    python scripts/plot_output.py output/deit_tiny output/deit_tiny_localvit -o acc_vs_time.png

Reads each RUN_DIR/log.txt as main.py writes it: header lines carry 'config', epoch lines carry 'epoch',
'test_acc1' and 'elapsed_seconds' (the run's training clock). Logs without elapsed_seconds are placed on the clock
by adding up 'epoch_seconds'. An epoch logged twice (a run resumed before its checkpoint) keeps its last line.
The legend names each run by its folder. The figure goes to acc_vs_time.png in the first RUN_DIR unless -o says.
"""
import argparse
import os
import sys
from typing import List, NamedTuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402


class Curve(NamedTuple):
    name: str
    epochs: List[int]
    hours: List[float]
    acc1: List[float]


def elapsed_hours(entries):
    """Training clock in hours at the end of each epoch line: elapsed_seconds, else the running sum of
    epoch_seconds (for either, a clock that starts again from zero after a resume is continued)."""
    hours, offset, previous, summed = [], 0.0, 0.0, 0.0
    for entry in entries:
        summed += entry.get('epoch_seconds', 0.0)
        seconds = entry.get('elapsed_seconds', summed)
        if seconds + offset < previous:
            offset = previous
        previous = seconds + offset
        hours.append(previous / 3600)
    return hours


def read_run(run_dir):
    entries = [e for e in utils.read_log(run_dir)[1] if 'test_acc1' in e]
    if not entries:
        raise ValueError(f'{run_dir} has no epoch lines yet; plot it after the first epoch has finished')
    hours = elapsed_hours(entries)
    last = {entry['epoch']: (h, entry['test_acc1']) for entry, h in zip(entries, hours)}  # later lines win
    epochs = sorted(last)
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    return Curve(name, epochs, [last[e][0] for e in epochs], [last[e][1] for e in epochs])


def plot(curves, out_path):
    fig, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for curve in curves:
        by_time.plot(curve.hours, curve.acc1, marker='.', label=curve.name)
        by_epoch.plot(curve.epochs, curve.acc1, marker='.', label=curve.name)
    by_time.set_xlabel('training time (hours)')
    by_epoch.set_xlabel('epoch')
    by_time.set_ylabel('test top-1 accuracy (%)')
    for ax in (by_time, by_epoch):
        ax.grid(alpha=0.3)
    by_epoch.legend(loc='lower right', fontsize='small')
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='output_dir of a run (holds log.txt)')
    p.add_argument('-o', '--output', default=None, help='PNG to write (default: RUN_DIR/acc_vs_time.png of the '
                   'first run; missing folders are made; a file there is replaced, and the tool says so)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out_path = args.output or os.path.join(args.run_dirs[0], 'acc_vs_time.png')
    try:
        replacing = utils.check_output_file(out_path, '-o')
        curves = [read_run(run_dir) for run_dir in args.run_dirs]
    except (ValueError, utils.UserError) as e:
        utils.exit_with_error(e)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    plot(curves, out_path)
    summary = '; '.join(f'{c.name}: best {max(c.acc1):.2f}%, {len(c.epochs)} epochs, {c.hours[-1]:.2f} h'
                        for c in curves)
    print(f'wrote {out_path} ({summary})' + (', replacing the file that was there' if replacing else ''))


if __name__ == '__main__':
    main()
