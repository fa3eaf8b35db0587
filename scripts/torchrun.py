"""torchrun, with the stop signals left to main.py's workers: Ctrl-C or SIGTERM ends a run with one line and exit
code 0 once every worker has checkpointed, as a single-process run does.

    python scripts/torchrun.py --nproc_per_node=8 main.py -c configs/deit_small_imagenet.yaml ...

Plain torchrun turns a SIGINT / SIGTERM into an exception in its agent: it sends the signal on, waits for the workers
(which checkpoint and exit 0), then prints that exception's traceback and exits 1. Here the agent forwards the first
signal to its workers and goes on watching them, so the run ends with the workers' own exit codes. A second signal
more than 2 s later is handled as torchrun handles the first: its workers are stopped at once. SIGHUP and SIGQUIT
stay torchrun's.
"""
import os
import signal
import sys
import time

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
SAME_REQUEST_SECONDS = 2.0  # main.py's StopSignal window: a signal forwarded to a worker that already got it


def child_pids(pid):
    """The processes whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


class ForwardStop:
    """The agent's handler for the stop signals: the first is sent on to the workers, which checkpoint and exit."""

    def __init__(self):
        self.first = None

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.first is None:
            self.first = time.monotonic()
            print(f'| torchrun: {name}: the workers checkpoint at their next step and exit; run the same command to '
                  'resume', file=sys.stderr, flush=True)
        elif time.monotonic() - self.first >= SAME_REQUEST_SECONDS:
            raise SignalException(f'Process {os.getpid()} got signal: {name}', sigval=signal.Signals(signum))
        for pid in child_pids(os.getpid()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def main(argv=None):
    args = torchrun.parse_args(argv)
    args.signals_to_handle = 'SIGHUP,SIGQUIT'  # torchrun's handler for these only; ours for the stop signals
    handler = ForwardStop()
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    torchrun.run(args)


if __name__ == '__main__':
    main()
