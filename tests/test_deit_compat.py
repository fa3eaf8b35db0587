"""Runs and files that cross between DeiT's main.py and ours: DeiT's checkpoints (args as an argparse.Namespace),
ours resumed by DeiT's rules, and DeiT's choice of training sampler."""
import argparse
import fractions

import pytest
import torch

import loaders
import main
import model_factory
import optimization
import utils
from conftest import TINY, read_log, run_main


def deit_checkpoint(path, epoch=0):
    """A checkpoint laid out as DeiT's main.py saves it: model, optimizer, lr_scheduler, epoch, scaler (timm's
    NativeScaler: a GradScaler's state) and args as the argparse.Namespace itself."""
    args = main.get_args_parser().parse_args(TINY)
    args.nb_classes = 10
    torch.manual_seed(0)
    model = model_factory.build_model(args)
    optimizer = optimization.build_optimizer(args, model, torch.device('cpu'))
    scheduler = optimization.build_scheduler(args, optimizer, 44)
    deit_args = argparse.Namespace(model=args.model, input_size=8, data_set='DIGITS', nb_classes=10, lr=5e-4,
                                   epochs=300, output_dir='/output/deit')
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'lr_scheduler': scheduler.state_dict(), 'epoch': epoch,
                'scaler': torch.amp.GradScaler('cpu').state_dict(), 'args': deit_args}, path)
    return model.state_dict()


def test_a_deit_checkpoint_with_a_namespace_loads_and_resumes(tmp_path):
    path = tmp_path / 'deit_checkpoint.pth'
    weights = deit_checkpoint(path)
    loaded = utils.load_checkpoint(str(path))
    assert loaded['args']['model'] == 'deit_micro_patch2_16' and isinstance(loaded['args'], dict)
    assert all(torch.equal(loaded['model'][k], weights[k]) for k in weights)

    out = tmp_path / 'resumed'
    result = run_main(TINY + ['--resume', path, '--output_dir', out])
    assert result.returncode == 0, result.stderr
    assert f'resumed from {path} at epoch 1, step 0' in result.stdout
    _, epochs = read_log(out)
    assert [e['epoch'] for e in epochs] == [1]

    # what we wrote resumes under DeiT's rules: a plain torch.load, and an enabled GradScaler takes its 'scaler'
    ours = torch.load(out / 'checkpoint.pth', map_location='cpu')
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'scaler'} <= set(ours) and ours['epoch'] == 1
    assert ours['scaler']['scale'] == 2.0 ** 16
    torch.amp.GradScaler('cpu', enabled=True).load_state_dict(ours['scaler'])


def test_a_deit_checkpoint_with_a_namespace_fine_tunes(tmp_path):
    path = tmp_path / 'deit_checkpoint.pth'
    deit_checkpoint(path, epoch=299)
    result = run_main(TINY + ['--finetune', path, '--epochs', '1', '--output_dir', tmp_path / 'ft'])
    assert result.returncode == 0, result.stderr
    assert f'finetune: loaded {path}' in result.stdout


def test_other_pickled_globals_are_refused_by_name(tmp_path):
    path = tmp_path / 'odd.pth'
    torch.save({'model': {}, 'epoch': 0, 'args': argparse.Namespace(ratio=fractions.Fraction(1, 3))}, path)
    with pytest.raises(utils.UserError, match=r'holds a pickled fractions\.Fraction, which a safe'):
        utils.load_checkpoint(str(path))


def test_our_checkpoint_stores_a_scaler_state_with_fp16_off(tmp_path):
    import checkpoints
    disabled = torch.amp.GradScaler('cpu', enabled=False)
    assert disabled.state_dict() == {}
    state = checkpoints.scaler_state(disabled)
    torch.amp.GradScaler('cpu', enabled=True).load_state_dict(state)
    enabled = torch.amp.GradScaler('cpu', init_scale=8.0)
    assert checkpoints.scaler_state(enabled)['scale'] == 8.0


def test_deits_epoch_scheduler_resumed_from_our_checkpoint_follows_its_own_curve(tmp_path):
    """DeiT's main.py: create_scheduler(args, optimizer), load_state_dict(checkpoint['lr_scheduler']), then
    step(epoch) after each epoch. Our per-update state froze its LR (4.917e-6 at epochs 3-5); the epoch state we save
    gives the LR a fresh DeiT scheduler gives."""
    out = tmp_path / 'run'
    assert run_main(TINY + ['--epochs', '1', '--warmup-epochs', '5', '--output_dir', out]).returncode == 0
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)
    args = main.get_args_parser().parse_args(TINY + ['--warmup-epochs', '5'])
    optimization.scale_lr(args)

    def deit_scheduler():
        optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=args.lr)
        return optimizer, optimization.create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, cooldown_epochs=args.cooldown_epochs,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs)[0]
    resumed_opt, resumed = deit_scheduler()
    resumed.load_state_dict(saved['lr_scheduler'])
    fresh_opt, fresh = deit_scheduler()
    lrs = []
    for epoch in (3, 4, 5):
        resumed.step(epoch)
        fresh.step(epoch)
        lrs.append(resumed_opt.param_groups[0]['lr'])
        assert lrs[-1] == pytest.approx(fresh_opt.param_groups[0]['lr'])
    assert len(set(lrs)) == 3  # not frozen


@pytest.mark.parametrize('launcher, flags, repeats', [
    ('single', [], 1),  # python main.py: DeiT's RandomSampler
    ('torchrun', [], 3),  # any world size, one process included: DeiT's RASampler
    ('slurm', [], 3),
    ('submitit', [], 3),
    ('torchrun', ['--no-repeated-aug'], 1),
])
def test_repeated_augmentation_only_under_a_distributed_launch(launcher, flags, repeats):
    args = main.get_args_parser().parse_args(TINY + flags)
    args.launcher = launcher
    loader = loaders.build_train_loader(args, list(range(20)), 4)
    assert loader.sampler.num_repeats == repeats
    assert loaders.sampler_description(args).startswith('repeated augmentation' if repeats == 3 else 'random shuffle')
