"""Distributed setup, seeding, metric logging and checkpoint I/O. Imports nothing from the project."""
import argparse
import atexit
import datetime
import errno
import fcntl
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: main prints it on one line and exits with code 2."""


# ---------------------------------------------------------------- distributed

def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def launcher_from_env(env):
    """Which launcher started us, from the environment alone: 'submitit', 'torchrun', 'slurm' or 'single' (plain
    python). Any of the first three is a distributed launch, whatever the world size, as in DeiT.

    run_with_submitit.py exports torchrun's variables from the submitit job, so both take the same path.
    """
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return 'submitit' if 'SUBMITIT_EXECUTOR' in env else 'torchrun'
    if 'SLURM_PROCID' in env:
        return 'slurm'
    return 'single'


def init_distributed_mode(args, env=None):
    """Fill args.rank / world_size / gpu / distributed from torchrun or Slurm variables and start DDP.

    The process group uses gloo on CPU and nccl on CUDA unless --dist-backend says otherwise.
    """
    env = os.environ if env is None else env
    launcher = launcher_from_env(env)
    if launcher in ('torchrun', 'submitit'):
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', 0))
    elif launcher == 'slurm':
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env.get('SLURM_NTASKS', '1'))
        args.gpu = int(env.get('SLURM_LOCALID', args.rank % max(torch.cuda.device_count(), 1)))
    else:
        args.rank, args.world_size, args.gpu = 0, 1, 0
    args.launcher, args.distributed = launcher, args.world_size > 1
    if not args.distributed:
        how = 'python' if launcher == 'single' else launcher
        print(f'| launcher: single process ({how}, rank 0 of 1, device {args.device})', flush=True)
        return launcher
    if launcher == 'slurm':
        env.setdefault('MASTER_ADDR', _slurm_master_addr(env))
        env.setdefault('MASTER_PORT', '29500')
    if args.device.startswith('cuda'):
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    backend = args.dist_backend or ('nccl' if args.device.startswith('cuda') else 'gloo')
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank, timeout=datetime.timedelta(minutes=args.dist_timeout))
    if args.rank == 0:
        print(f'| launcher: {launcher} (world size {args.world_size}, backend {backend}, '
              f'init {args.dist_url})', flush=True)
    return launcher


def _slurm_master_addr(env):
    nodelist = env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST') or '127.0.0.1'
    try:
        out = subprocess.check_output(['scontrol', 'show', 'hostnames', nodelist], text=True)
        return out.split()[0]
    except (OSError, subprocess.CalledProcessError):
        return first_host(nodelist)


def first_host(nodelist):
    """The first host of a Slurm node list: 'gpu[003-005,007],cpu1' -> 'gpu003'."""
    match = re.match(r'([^,\[]+)(?:\[([^,\]-]+))?', nodelist)
    return match.group(1) + (match.group(2) or '')


def all_reduce_sum(values, device):
    """Sum a list of numbers over all ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist_avail_and_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values, device):
    """The largest of each number over all ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist_avail_and_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(flags, device):
    """Each flag, True on every rank when it is True on any rank: how ranks agree to skip a step or to stop, so that
    none of them waits in an all-reduce the others never reach."""
    if not is_dist_avail_and_initialized():
        return [bool(f) for f in flags]
    return [v > 0 for v in all_reduce_sum([1.0 if f else 0.0 for f in flags], device)]


def exit_with_error(error, code=2):
    """The one line a person reads when their input is wrong: `error: ...` on stderr, then exit `code`."""
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(code)


def check_output_file(path, flag):
    """Before any work: UserError when a tool cannot write its output file `path` (named by `flag`): it is a folder,
    lies under a file, or its nearest existing folder cannot be written. Missing folders are the writer's to make.
    Returns whether a file is there already, which the tool replaces and says so."""
    if os.path.isdir(path):
        raise UserError(f'{flag} {path} is a folder; pass a file name, such as {os.path.join(path, "out.png")}')
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f'{flag} {path} lies under {existing}, which is a file; pass a path in a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {path} cannot be written ({existing} is not writable); pass a path you can write to')
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        raise UserError(f'{flag} {path} is a read-only file; pass another name')
    return os.path.isfile(path)


def log(message):
    """Print a progress line on rank 0 only."""
    if is_main_process():
        print(message, flush=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    """First SIGTERM / SIGUSR1 / SIGINT (Ctrl-C): checkpoint at the next step boundary and exit cleanly. A signal
    within `window` seconds of the first is the same request: `timeout`, torchrun and job schedulers forward the
    signal the terminal or the scheduler already sent to the whole process group. A later one: exit at once."""

    def __init__(self, signals=STOP_SIGNALS, window=2.0):
        self.requested, self.window, self.first = False, window, None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and time.monotonic() - self.first < self.window:
            return
        if self.requested:
            print(f'| second {name}: exiting now', flush=True)
            os._exit(128 + signum)
        self.requested, self.first = True, time.monotonic()
        print(f'| {name}: will checkpoint at the next step and exit', flush=True)


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: leave the stop signals to the main process, which saves at the next update and
    shuts the workers down. A signal sent to the whole process group (Slurm, systemd, Ctrl-C) reaches them too."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def end_workers():
    """End the DataLoader workers a run leaves behind. They ignore SIGTERM (ignore_stop_signals), so multiprocessing's
    own exit handler, which sends SIGTERM and then waits, would wait for them forever."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join()


def end_workers_at_exit():
    """Call end_workers at interpreter exit, before multiprocessing's handler (handlers run last-registered first)."""
    import multiprocessing.util  # noqa: F401 - registers its exit handler now, so that ours comes after it
    atexit.register(end_workers)


# ---------------------------------------------------------------- FLOPs

def count_flops(run):
    """FLOPs of calling run() (2 per multiply-accumulate, torch's FlopCounterMode), attention's matmuls included:
    scaled-dot-product attention runs as its math version, which the counter sees."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


# ---------------------------------------------------------------- seeding and RNG state

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state():
    """Every global RNG state as weights_only-loadable objects (lists, tensors)."""
    np_state = np.random.get_state(legacy=False)
    return {
        'python': random.getstate(),
        'numpy': {'bit_generator': np_state['bit_generator'], 'key': np_state['state']['key'].tolist(),
                  'pos': int(np_state['state']['pos']), 'has_gauss': np_state['has_gauss'],
                  'gauss': np_state['gauss']},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state['numpy']
    np.random.set_state({'bit_generator': n['bit_generator'], 'has_gauss': n['has_gauss'], 'gauss': n['gauss'],
                         'state': {'key': np.asarray(n['key'], dtype=np.uint32), 'pos': n['pos']}})
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(obj, path):
    """Write atomically: temp file in the same folder, flush, fsync, rename, fsync the folder.

    A crash at any moment leaves either the old file or the new one at `path`, never a partial one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder, names):
    """Delete the temporary files save_checkpoint() made for `names` that a killed process left behind: regular files
    named exactly '.NAME.tmp.PID' whose process is gone, nothing else."""
    pattern = re.compile('|'.join(rf'\.{re.escape(name)}\.tmp\.(\d+)' for name in names))
    for entry in os.scandir(folder):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file(follow_symlinks=False):
            pid = int(next(group for group in match.groups() if group))
            if not process_exists(pid):
                os.remove(entry.path)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


LOCK_FILE = '.lock'
_held_locks = {}  # lock path -> open descriptor: POSIX locks last while the process keeps the file open


def lock_folder(folder):
    """Hold a POSIX lock on folder/.lock for the life of this process, so that one run at a time writes there.

    A POSIX (fcntl) lock belongs to the process: the kernel drops it when the process ends, kill -9 included, and
    forked DataLoader workers do not inherit it. Returns '' when held; the holder's 'pid P on host H' when another
    process holds it; 'unsupported' when the file system has no locks."""
    path = os.path.join(folder, LOCK_FILE)
    if path in _held_locks:
        return ''
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors='replace').strip()
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return holder or 'another process'
        return 'unsupported'
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}\n'.encode(), 0)
    _held_locks[path] = fd
    return ''


def release_folder_locks():
    """Let go of every lock_folder() lock (the end of a run called in-process; a process's end does it anyway)."""
    while _held_locks:
        os.close(_held_locks.popitem()[1])


def load_checkpoint(path, map_location='cpu'):
    """Read a local or http(s) checkpoint with weights_only=True; a bad file is a UserError."""
    if path.startswith(('http://', 'https://')):
        try:
            return torch.hub.load_state_dict_from_url(path, map_location=map_location, check_hash=True,
                                                      weights_only=True)
        except Exception as e:  # noqa: BLE001 - any network / format failure means the same to the user
            raise UserError(f'could not download checkpoint {path} ({type(e).__name__}); '
                            'download it yourself and pass the local file instead') from e
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist; check the path')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return {'model': load_file(path, device=str(map_location))}
        except Exception as e:  # noqa: BLE001
            raise UserError(f'checkpoint {path} is not a readable safetensors file ({e})') from e
    if not written_by_torch_save(path):
        raise UserError(f'{path} is unreadable: not a checkpoint (torch.save did not write it); pass a checkpoint '
                        'written by main.py or torch.save, or a .safetensors file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DeiT stores its args as a Namespace
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle / zip / EOF errors all mean "unreadable"
        raise UserError(refused_load_message(path, e)) from e
    if not isinstance(ckpt, dict):
        raise UserError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a dict of weights; pass a checkpoint '
                        'written by main.py or DeiT, or torch.save(model.state_dict())')
    if isinstance(ckpt.get('args'), argparse.Namespace):
        ckpt['args'] = vars(ckpt['args'])
    return ckpt


LEGACY_MAGIC = b'\x8a\x0a' + 0x1950a86a20f9469cfc6c.to_bytes(10, 'little')  # after the 2 bytes of the pickle protocol


def written_by_torch_save(path):
    """Whether the file starts as torch.save's do: a zip archive (since torch 1.6), else a pickle of its magic
    number."""
    try:
        with open(path, 'rb') as f:
            head = f.read(2 + len(LEGACY_MAGIC))
    except OSError:
        return True  # torch.load names what is wrong with it
    return head.startswith(b'PK\x03\x04') or (head[:1] == b'\x80' and head[2:] == LEGACY_MAGIC)


def refused_load_message(path, error):
    """One line for a file torch.load(weights_only=True) refused, where torch's own text runs to a paragraph: the
    pickled global it blocked, else the unpickler's reason."""
    text = str(error)
    blocked = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", text)
    if blocked:
        return (f'checkpoint {path} holds a pickled {blocked.group(1) or blocked.group(2)}, which a safe '
                '(weights_only) load refuses; save only tensors, plain containers and argparse.Namespace in it')
    detail = text.split('WeightsUnpickler error:')[-1].strip()
    reason = detail.splitlines()[0] if detail else type(error).__name__
    return (f'checkpoint {path} is unreadable or not a safe (weights_only) torch checkpoint ({reason[:120]}); pass a '
            'checkpoint written by torch.save')


def saved_args(path):
    """The 'args' dict a local checkpoint records, read without its tensors (memory-mapped); {} when there is none
    or the file cannot be read that way (load_checkpoint reports real problems later)."""
    if not path or path.startswith(('http://', 'https://')) or path.endswith('.safetensors') or \
            not os.path.isfile(path) or not written_by_torch_save(path):
        return {}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an old or foreign format: no args to read this way
        return {}
    found = ckpt.get('args') if isinstance(ckpt, dict) else None
    return vars(found) if isinstance(found, argparse.Namespace) else found if isinstance(found, dict) else {}


def model_weights(ckpt, path, key='model'):
    """The model state dict of a loaded checkpoint: its `key` entry ('model' in ours and DeiT's, or 'model_ema'), or
    the file itself when it is a plain state dict."""
    state = ckpt.get(key, ckpt)
    if not isinstance(state, dict) or not state:
        raise UserError(f'checkpoint {path} holds no model weights (its {key!r} entry is '
                        f'{type(state).__name__}); pass a checkpoint with a model state dict')
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        where = f'its {key!r} entry' if key in ckpt else f'it has no {key!r} entry and'
        raise UserError(f'checkpoint {path} holds no model weights ({where} {odd!r} is a '
                        f'{type(state[odd]).__name__}, not a tensor); pass a checkpoint with a model state dict')
    return state


# ---------------------------------------------------------------- logging

class SmoothedValue:
    """Running window of a series with its global average."""

    def __init__(self, window_size=20):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n if n else value

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)


class MetricLogger:
    """Named SmoothedValues; update(n=0, name=k) adds k to a counter whose global_avg is its sum."""

    def __init__(self):
        self.meters = defaultdict(SmoothedValue)

    def update(self, n=1, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(float(v), n)

    def averages(self):
        return {k: m.global_avg for k, m in self.meters.items()}

    def state_dict(self):
        return {k: [m.total, m.count] for k, m in self.meters.items()}

    def load_state_dict(self, state):
        for k, (total, count) in state.items():
            self.meters[k].total, self.meters[k].count = total, count

    def synchronized_state(self, device):
        """Totals and counts summed over ranks, without changing this logger."""
        keys = sorted(self.meters)
        flat = all_reduce_sum([x for k in keys for x in (self.meters[k].total, self.meters[k].count)], device)
        return {k: [flat[2 * i], int(flat[2 * i + 1])] for i, k in enumerate(keys)}

    def synchronize(self, device):
        """Make global averages the same on every rank (sum of totals and counts)."""
        self.load_state_dict(self.synchronized_state(device))


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def git_hash():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.check_output(['git', 'rev-parse', 'HEAD'], cwd=here, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.call(['git', 'diff', '--quiet', 'HEAD'], cwd=here, stderr=subprocess.DEVNULL)
        return sha + ('-dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def library_versions():
    import timm
    import torchvision
    return {'python': sys.version.split()[0], 'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'timm': timm.__version__, 'numpy': np.__version__}


def read_log(path):
    """(header lines, epoch lines) of a run's log.txt, in file order; headers carry 'config', epoch lines 'epoch'.
    A line cut short (a crash while writing) is left out. `path`: the log or the run's output_dir."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'log.txt')):
            raise ValueError(f'{path} has no log.txt; pass the output_dir of a main.py run')
        path = os.path.join(path, 'log.txt')
    elif not os.path.isfile(path):
        raise ValueError(f'{path} does not exist; pass the output_dir of a main.py run')
    headers, epochs = [], []
    with open(path) as f:
        for text in f:
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and 'config' in entry:
                headers.append(entry)
            elif isinstance(entry, dict) and 'epoch' in entry:
                epochs.append(entry)
    return headers, epochs


def write_json_atomically(path, obj):
    """path holds the old JSON or the new, never a part: a temporary file renamed over it."""
    temporary = f'{path}.tmp{os.getpid()}'
    try:
        with open(temporary, 'w') as f:
            json.dump(obj, f, indent=1)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def append_json_line(path, obj):
    """Append obj as one JSON line, whole or not at all: a write that fails part-way (a full disk) is cut back off
    before the OSError goes on."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            write_all(fd, (json.dumps(obj) + '\n').encode())
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the torn line is cut at the next start (cut_torn_last_line); readers skip it meanwhile
            raise
    finally:
        os.close(fd)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def cut_torn_last_line(path):
    """Cut a last line without its newline (a write a crash interrupted) off the file; returns the bytes cut."""
    if not os.path.isfile(path):
        return 0
    with open(path, 'rb+') as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        if tail.endswith(b'\n'):
            return 0
        keep = size - len(tail) + tail.rfind(b'\n') + 1
        f.truncate(keep)
        return size - keep


class Timer:
    """Wall-clock seconds since creation."""

    def __init__(self):
        self.start = time.time()

    def elapsed(self):
        return time.time() - self.start
