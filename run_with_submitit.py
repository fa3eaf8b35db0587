"""Run main.py's training on Slurm through submitit: one task per GPU, DDP from the job's environment, and on
timeout or preemption a checkpoint at the next update and a requeue that resumes from it.

    python run_with_submitit.py --nodes 2 --ngpus 8 --model deit_base_patch16_224 --batch-size 64 \
        --data-path /path/to/imagenet --partition PARTITION --timeout 4320

Every main.py flag is accepted; output_dir defaults to the job folder (--job_dir, where %j is the job id).
Without Slurm, `--cluster local` runs the same job on this machine.
"""
import argparse
import copy
import getpass
import os
import shutil
import signal
import sys

import submitit
import torch

import main as training
import utils
from flags import FlagParser, check_flag_ranges
from utils import UserError

HERE = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    parser = FlagParser('Submit DeiT-style training to Slurm with submitit', add_help=False,
                        parents=[training.get_args_parser()], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group('job (submitit / Slurm)')
    g.add_argument('--ngpus', default=8, type=int, help='GPUs per node, one task each (CPU tasks with --device cpu)')
    g.add_argument('--nodes', default=None, type=int, help='nodes to request; default: 2 on Slurm (DeiT\'s), 1 with '
                   'the local executor')
    g.add_argument('--timeout', default=2800, type=int, help='minutes per job; a requeued job gets as many again')
    g.add_argument('--job_dir', default='', help='submitit logs and, unless --output_dir says otherwise, '
                   'checkpoints; %%j is the job id. Empty: $SHARED_DIR/$USER/experiments/%%j, with /checkpoint '
                   '(DeiT\'s) or ./checkpoint when SHARED_DIR is unset')
    g.add_argument('--partition', default='', help='Slurm partition; empty: the cluster\'s default')
    g.add_argument('--constraint', default='', help='Slurm node feature, e.g. volta32gb')
    g.add_argument('--use_volta32', action='store_true', help='same as --constraint volta32gb (DeiT\'s flag)')
    g.add_argument('--comment', default='', help='comment for the scheduler, e.g. a priority reason')
    g.add_argument('--mem-per-gpu', default=40, type=int, metavar='GB', help='host memory per GPU')
    g.add_argument('--cpus-per-task', default=10, type=int, help='CPU cores per task (data loading)')
    g.add_argument('--account', default='', help='Slurm account to charge')
    g.add_argument('--qos', default='', help='Slurm quality of service')
    g.add_argument('--max-requeues', default=30, type=int, help='timeouts a run may requeue after')
    g.add_argument('--cluster', default=None, choices=['slurm', 'local', 'debug'],
                   help='submitit executor; default: slurm, refused where sbatch is not found; local runs the '
                   'job on this machine (no Slurm needed)')
    return parser


def default_job_dir():
    """A folder every node sees: $SHARED_DIR, else DeiT's /checkpoint, else ./checkpoint (single machine)."""
    root = os.environ.get('SHARED_DIR') or ('/checkpoint' if os.path.isdir('/checkpoint') else 'checkpoint')
    return os.path.join(root, getpass.getuser(), 'experiments', '%j')


def check_job_args(args):
    for flag in ('--ngpus', '--nodes', '--timeout', '--mem-per-gpu', '--cpus-per-task'):
        value = getattr(args, flag[2:].replace('-', '_'))
        if value is not None and value < 1:
            raise ValueError(f'{flag} must be at least 1, got {value}; pass a positive number')


def executor_parameters(args):
    """submitit parameters: generic ones for every executor, slurm_* ones only read on Slurm."""
    on_gpu = args.device != 'cpu'
    params = dict(name=args.model, nodes=args.nodes, tasks_per_node=args.ngpus, cpus_per_task=args.cpus_per_task,
                  gpus_per_node=args.ngpus if on_gpu else 0, mem_gb=args.mem_per_gpu * args.ngpus,
                  timeout_min=args.timeout,
                  slurm_signal_delay_s=120)  # time to reach the next update and write the checkpoint
    constraint = 'volta32gb' if args.use_volta32 else args.constraint
    for key, value in (('partition', args.partition), ('constraint', constraint), ('comment', args.comment),
                       ('account', args.account), ('qos', args.qos)):
        if value:
            params['slurm_' + key] = value
    return params


def resolve_cluster(args):
    """Slurm unless --cluster says otherwise; without Slurm a job never starts here unasked."""
    args.cluster = args.cluster or 'slurm'
    if args.cluster == 'slurm' and not shutil.which('sbatch'):
        raise ValueError('Slurm was not found (no sbatch on the PATH); submit from a Slurm login node, or pass '
                         '--cluster local to run the job on this machine')


def resolve_nodes(args, cluster):
    """DeiT's 2 nodes on Slurm; the local and debug executors run on this machine only."""
    if args.nodes is None:
        args.nodes = 2 if cluster == 'slurm' else 1
    elif args.nodes > 1 and cluster != 'slurm':
        raise ValueError(f'--nodes {args.nodes} needs Slurm, and the {cluster} executor runs on this machine; '
                         'pass --nodes 1, or submit from a Slurm login node')


def build_executor(args):
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster,
                                     slurm_max_num_timeout=args.max_requeues)
    params = executor_parameters(args)
    if executor.cluster != 'slurm':
        params = {k: v for k, v in params.items() if not k.startswith('slurm_')}
    executor.update_parameters(**params)
    return executor


def submit(args):
    """Submit a Trainer for args; returns the submitit job."""
    check_job_args(args)
    resolve_cluster(args)
    resolve_nodes(args, args.cluster)
    args.job_dir = os.path.abspath(args.job_dir or default_job_dir())
    args.output_dir = args.output_dir or args.job_dir
    # The job unpickles Trainer by module name: make this folder importable wherever the job starts.
    paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
    if HERE not in paths:
        os.environ['PYTHONPATH'] = os.pathsep.join([HERE] + [p for p in paths if p])
    return build_executor(args).submit(Trainer(args))


def distributed_env(job_env):
    """torch.distributed's env:// variables for this task, from submitit's view of the Slurm job."""
    digits = ''.join(c for c in str(job_env.job_id) if c.isdigit()) or '0'
    return {'RANK': str(job_env.global_rank), 'WORLD_SIZE': str(job_env.num_tasks),
            'LOCAL_RANK': str(job_env.local_rank), 'MASTER_ADDR': job_env.hostnames[0],
            'MASTER_PORT': str(20000 + int(digits) % 20000)}  # the same port again after a requeue


def remove_id_placeholder_folder():
    """submitit's local controller makes the job folder under its literal name (`.../%j`) before the id is known,
    while the job's files go to the folder named by the id: drop that empty placeholder."""
    folder = os.environ.get('SUBMITIT_FOLDER', '')
    if '%j' in folder:
        try:
            os.rmdir(folder)
        except OSError:  # already removed by another task, never made (Slurm), or not empty
            pass


class Trainer:
    """The submitted callable. submitit calls checkpoint() on timeout or preemption and requeues what it returns."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        remove_id_placeholder_folder()
        job_env = submitit.JobEnvironment()
        self.args.output_dir = str(self.args.output_dir).replace('%j', str(job_env.job_id))
        os.environ.update(distributed_env(job_env))
        requeue = self._stop_training_on_preemption()
        try:
            # main scales --lr and resolves --device in place: self.args stays as given, for the requeue.
            training.main(copy.deepcopy(self.args))
        finally:
            if utils.is_dist_avail_and_initialized():
                torch.distributed.destroy_process_group()
        if self.preempted:
            requeue()

    def _stop_training_on_preemption(self):
        """Route submitit's preemption signal to the trainer's graceful stop (SIGUSR1 handler): every rank writes
        the checkpoint at the next update and main returns. Returns submitit's handler, which calls checkpoint()
        and requeues; before training has started it is called at once, as there is nothing to save yet."""
        self.preempted = False
        preempt_signal = getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG)
        submitit_handler = signal.getsignal(preempt_signal)

        def on_preemption(signum, frame):
            graceful_stop = signal.getsignal(signal.SIGUSR1)
            if not callable(graceful_stop) or graceful_stop is on_preemption:
                submitit_handler(signum, frame)
                return
            self.preempted = True
            graceful_stop(signal.SIGUSR1, frame)

        signal.signal(preempt_signal, on_preemption)
        return lambda: submitit_handler(preempt_signal, None)

    def checkpoint(self):
        """A fresh Trainer resuming from output_dir/checkpoint.pth, when there is one (submitit requeues it)."""
        path = os.path.join(self.args.output_dir, training.CHECKPOINT)
        if os.path.isfile(path):
            self.args.resume = path
        print(f'| requeueing; the next job resumes from {self.args.resume or "the start"}', flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def cli(argv=None):
    parser = get_args_parser()
    try:
        args = training.parse_args(argv, parser)
        check_flag_ranges(args, parser)
        job = submit(args)
    except (ValueError, UserError) as e:
        utils.exit_with_error(e)
    print(f'submitted job {job.job_id}: logs in {job.paths.folder}, checkpoints in '
          f'{args.output_dir.replace("%j", str(job.job_id))}')


if __name__ == '__main__':
    cli()
