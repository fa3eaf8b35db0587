"""run_with_submitit.py on submitit's local executor (no Slurm needed): a whole job, a preempted job that
checkpoints, requeues and resumes exactly, the Slurm request, and how init_distributed_mode reads launchers."""
import argparse
import datetime
import os
import signal
import subprocess
import time

import pytest
import submitit
import torch

import run_with_submitit
import utils

# One epoch of 44 updates with every source of randomness left on (mixup, RandAugment, erasing, EMA).
EXACT = ['--model', 'deit_micro_patch2_16', '--input-size', '8', '--batch-size', '32', '--epochs', '1',
         '--num_workers', '0', '--device', 'cpu', '--print-freq', '1']
LOCAL_JOB = ['--cluster', 'local', '--ngpus', '1', '--nodes', '1', '--timeout', '10']


def parse(flags):
    return run_with_submitit.get_args_parser().parse_args([str(f) for f in flags])


def submit(job_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('OMP_NUM_THREADS', '1')
        mp.setenv('PYTHONPATH', os.environ.get('PYTHONPATH', ''))  # submit() extends it; restore afterwards
        return run_with_submitit.submit(parse(EXACT + LOCAL_JOB + ['--job_dir', job_dir / '%j']))


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    job = submit(tmp_path_factory.mktemp('uninterrupted'))
    job.result()
    return job


def test_local_job_trains_into_its_job_folder(uninterrupted):
    out = str(uninterrupted.paths.folder)
    assert out.endswith(str(uninterrupted.job_id))  # %j became the job id
    assert os.listdir(os.path.dirname(out)) == [str(uninterrupted.job_id)]  # no literal %j folder beside it
    assert {'checkpoint.pth', 'log.txt'} <= set(os.listdir(out))
    assert load(os.path.join(out, 'checkpoint.pth'))['epoch'] == 0
    log = uninterrupted.stdout()
    assert '| launcher: single process' in log and '44 updates per epoch' in log
    assert 'requeue' not in log


def wait_for_updates(job, count, timeout=120):
    """Pid of the job's task once its log shows `count` progress lines."""
    deadline = time.time() + timeout
    while (job.stdout() or '').count('Epoch: [0]') < count:
        assert time.time() < deadline, job.stdout()
        assert not job.done(), job.stdout()
        time.sleep(0.1)
    children = subprocess.run(['pgrep', '-P', str(job.job_id)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children  # the local controller's one task
    return int(children[0])


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(uninterrupted, tmp_path):
    job = submit(tmp_path)
    task = wait_for_updates(job, 5)
    os.kill(task, getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG))  # what Slurm sends before a timeout
    job.result()

    log = job.stdout()
    assert 'stopped by signal in epoch 0; checkpoint saved' in log
    checkpoint = os.path.join(str(job.paths.folder), 'checkpoint.pth')
    assert f'requeueing; the next job resumes from {checkpoint}' in log
    step = int(log.split(f'resumed from {checkpoint} at epoch 0, step ')[1].split()[0])
    assert 5 <= step < 44
    requeued = job.submission().function  # the Trainer that checkpoint() handed to submitit
    assert requeued.args.resume == checkpoint
    assert requeued.args.lr == 5e-4  # main's LR scaling happened on a copy, not twice

    reference, resumed = load(os.path.join(str(uninterrupted.paths.folder), 'checkpoint.pth')), load(checkpoint)
    for part in ('model', 'model_ema'):
        assert reference[part].keys() == resumed[part].keys()
        for key in reference[part]:
            assert torch.equal(reference[part][key], resumed[part][key]), f'{part}.{key} differs'


def test_checkpoint_requeues_a_fresh_trainer_from_the_latest_checkpoint(tmp_path):
    trainer = run_with_submitit.Trainer(parse(EXACT + ['--output_dir', tmp_path]))
    assert trainer.checkpoint().function.args.resume == ''  # nothing saved yet: start again
    (tmp_path / 'checkpoint.pth').write_bytes(b'')
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is not trainer
    assert delayed.function.args.resume == str(tmp_path / 'checkpoint.pth')


def test_slurm_request_has_one_task_per_gpu_and_the_job_flags():
    args = parse(['--nodes', '2', '--ngpus', '8', '--partition', 'learnfair', '--use_volta32', '--comment', 'paper',
                  '--account', 'vision', '--qos', 'high', '--mem-per-gpu', '32', '--timeout', '4320'])
    params = run_with_submitit.executor_parameters(args)
    assert params['nodes'] == 2 and params['tasks_per_node'] == 8 and params['gpus_per_node'] == 8
    assert params['mem_gb'] == 256 and params['timeout_min'] == 4320
    assert {params[f'slurm_{k}'] for k in ('partition', 'constraint', 'comment', 'account', 'qos')} == \
        {'learnfair', 'volta32gb', 'paper', 'vision', 'high'}
    cpu = run_with_submitit.executor_parameters(parse(['--device', 'cpu', '--ngpus', '2']))
    assert cpu['tasks_per_node'] == 2 and cpu['gpus_per_node'] == 0
    assert 'slurm_constraint' not in cpu and 'slurm_account' not in cpu


def test_bad_job_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_with_submitit.cli(['--nodes', '0'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == 'error: --nodes must be at least 1, got 0; pass a positive number'


def test_default_job_dir_is_under_the_shared_folder(monkeypatch):
    monkeypatch.setenv('SHARED_DIR', '/shared')
    monkeypatch.setenv('USER', 'alice')
    monkeypatch.setenv('LOGNAME', 'alice')
    assert run_with_submitit.default_job_dir() == '/shared/alice/experiments/%j'


def test_distributed_env_comes_from_the_job_environment():
    job_env = argparse.Namespace(job_id='4242_3', global_rank=11, num_tasks=16, local_rank=3,
                                 hostnames=['node07', 'node08'])
    assert run_with_submitit.distributed_env(job_env) == {
        'RANK': '11', 'WORLD_SIZE': '16', 'LOCAL_RANK': '3', 'MASTER_ADDR': 'node07',
        'MASTER_PORT': str(20000 + 42423 % 20000)}


# ---------------------------------------------------------------- init_distributed_mode from prepared environments

SLURM_2x4 = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '1', 'SLURM_JOB_NODELIST': 'gpu[007-008]'}
TORCHRUN = {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '3', 'MASTER_ADDR': 'host0', 'MASTER_PORT': '29400'}


def no_scontrol(*args, **kwargs):
    raise FileNotFoundError('scontrol')


@pytest.mark.parametrize('env, launcher, rank, world, gpu', [
    ({}, 'single', 0, 1, 0),
    ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}, 'slurm', 0, 1, 0),  # sbatch with one task: no process group
    (SLURM_2x4, 'slurm', 5, 8, 1),  # srun, one task per GPU
    (dict(SLURM_2x4, **TORCHRUN), 'torchrun', 3, 4, 3),  # torchrun inside a Slurm allocation
    (dict(SLURM_2x4, SUBMITIT_EXECUTOR='slurm', **TORCHRUN), 'submitit', 3, 4, 3),
])
def test_init_distributed_mode_chooses_the_launcher(monkeypatch, capsys, env, launcher, rank, world, gpu):
    calls = []
    monkeypatch.setattr(utils.dist, 'init_process_group', lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(utils.subprocess, 'check_output', no_scontrol)
    args = argparse.Namespace(device='cpu', dist_backend=None, dist_url='env://', dist_timeout=30)
    env = dict(env)
    assert utils.init_distributed_mode(args, env) == launcher
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (rank, world, gpu, world > 1)
    assert args.launcher == launcher
    if world == 1:
        assert not calls and '| launcher: single process' in capsys.readouterr().out
        return
    assert calls == [dict(backend='gloo', init_method='env://', world_size=world, rank=rank,
                          timeout=datetime.timedelta(minutes=30))]
    if launcher == 'slurm':  # without scontrol the first node of the compact list is the master
        assert (env['MASTER_ADDR'], env['MASTER_PORT']) == ('gpu007', '29500')
    assert capsys.readouterr().out == ''  # only rank 0 prints the launcher line


def test_rank_zero_prints_which_launcher_it_chose(monkeypatch, capsys):
    monkeypatch.setattr(utils.dist, 'init_process_group', lambda **kwargs: None)
    args = argparse.Namespace(device='cpu', dist_backend='gloo', dist_url='env://', dist_timeout=5)
    utils.init_distributed_mode(args, dict(TORCHRUN, RANK='0', SUBMITIT_EXECUTOR='local'))
    assert capsys.readouterr().out.strip() == \
        '| launcher: submitit (world size 4, backend gloo, init env://)'



def test_nodes_default_to_deits_two_on_slurm_and_one_here(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('SHARED_DIR', raising=False)
    args = parse([])
    run_with_submitit.resolve_nodes(args, 'slurm')
    assert args.nodes == 2
    args = parse([])
    run_with_submitit.resolve_nodes(args, 'local')
    assert args.nodes == 1
    with pytest.raises(SystemExit) as exit_info:
        run_with_submitit.cli(['--cluster', 'local', '--nodes', '2', '--device', 'cpu', '--ngpus', '1'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ('error: --nodes 2 needs Slurm, and the local executor runs on this '
                                               'machine; pass --nodes 1, or submit from a Slurm login node')
    assert os.listdir(tmp_path) == []  # refused before any job folder is made


def test_without_slurm_the_job_is_refused_unless_local_is_asked_for(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('SHARED_DIR', raising=False)
    monkeypatch.setattr(run_with_submitit.shutil, 'which', lambda name: None)
    for cluster in ([], ['--cluster', 'slurm']):
        with pytest.raises(SystemExit) as exit_info:
            run_with_submitit.cli(cluster + ['--nodes', '1', '--ngpus', '1', '--data-path', '/path/to/imagenet'])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == (
            'error: Slurm was not found (no sbatch on the PATH); submit from a Slurm login node, or pass '
            '--cluster local to run the job on this machine')
    assert os.listdir(tmp_path) == []


def test_a_failed_local_job_leaves_no_literal_job_id_folder(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('PYTHONPATH', os.environ.get('PYTHONPATH', ''))
        job = run_with_submitit.submit(parse(LOCAL_JOB + ['--device', 'cpu', '--data-path', tmp_path / 'missing',
                                                          '--job_dir', tmp_path / 'jobs' / '%j']))
    with pytest.raises(submitit.core.utils.FailedJobError, match='--data-path .*missing does not exist'):
        job.result()
    assert os.listdir(tmp_path / 'jobs') == [str(job.job_id)]
