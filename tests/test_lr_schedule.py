import math

import pytest
import torch

import main
import optimization

N_UPDATES = 7


def schedule(*flags, n_updates=N_UPDATES):
    args = main.get_args_parser().parse_args([str(f) for f in flags])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = optimization.build_scheduler(args, optimizer, n_updates)

    def lr_at(step):
        sched.step_update(step)
        return optimizer.param_groups[0]['lr']
    return args, lr_at


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def cosine(args, t, n_updates=N_UPDATES):
    total = args.epochs * n_updates
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t / total))


DEFAULTS = ('--epochs', 20, '--warmup-epochs', 3, '--cooldown-epochs', 4, '--lr', 2e-3,
            '--warmup-lr', 1e-6, '--min-lr', 1e-5)


def test_warmup_is_linear_from_warmup_lr_to_lr():
    args, lr_at = schedule(*DEFAULTS)
    warm = args.warmup_epochs * N_UPDATES
    assert close(lr_at(0), args.warmup_lr)
    for t in (1, 5, warm // 2, warm - 1):
        assert close(lr_at(t), args.warmup_lr + t * (args.lr - args.warmup_lr) / warm)
    assert close(lr_at(warm), cosine(args, warm))


def test_cosine_middle_matches_timm_formula():
    args, lr_at = schedule(*DEFAULTS)
    total = args.epochs * N_UPDATES
    for t in (3 * N_UPDATES + 1, 50, total // 2, total - 1):
        assert close(lr_at(t), cosine(args, t))
    assert close(cosine(args, total / 2), (args.lr + args.min_lr) / 2)
    assert lr_at(total // 2) < args.lr


def test_cosine_spans_all_epochs_and_cooldown_comes_after_them():
    """As in DeiT: --cooldown-epochs does not shorten the cosine; the LR reaches --min-lr only after --epochs."""
    args, lr_at = schedule(*DEFAULTS)
    total = args.epochs * N_UPDATES
    assert optimization.run_epochs(args) == args.epochs
    assert lr_at(total - 1) > args.min_lr
    args, lr_at = schedule(*DEFAULTS, '--train-cooldown')
    assert optimization.run_epochs(args) == args.epochs + args.cooldown_epochs
    assert lr_at(total - 1) > args.min_lr
    for t in (total, total + 1, optimization.run_epochs(args) * N_UPDATES - 1):
        assert lr_at(t) == args.min_lr


def test_no_warmup_starts_at_lr():
    args, lr_at = schedule('--warmup-epochs', 0, '--epochs', 10, '--cooldown-epochs', 2, '--lr', 3e-4)
    assert lr_at(0) == args.lr
    assert close(lr_at(9), cosine(args, 9))


def test_no_cooldown_decays_over_all_epochs():
    args, lr_at = schedule('--warmup-epochs', 0, '--epochs', 6, '--cooldown-epochs', 0, '--lr', 1e-3,
                           '--min-lr', 0)
    assert close(lr_at(6 * N_UPDATES // 2), 0.5e-3)
    assert close(lr_at(6 * N_UPDATES - 1), cosine(args, 6 * N_UPDATES - 1))


def test_default_flags_schedule():
    args, lr_at = schedule()
    assert close(lr_at(0), 1e-6)
    assert close(lr_at(5 * N_UPDATES), cosine(args, 5 * N_UPDATES))
    assert lr_at(299 * N_UPDATES) > 1e-5


# The LR DeiT's scheduler (timm 0.3.2's create_scheduler, stepped with step(epoch)) gives each epoch, read by running
# that code with DeiT's defaults (warm-up 5 from 1e-6, min 1e-5, cool-down 10) and DeiT-S's scaled LR of 1e-3.
DEIT_S_LR_AT_EPOCH = {0: 1e-06, 1: 0.00020080000000000003, 4: 0.0008002000000000002, 5: 0.000999321619703514,
                      10: 0.0009972883382072953, 100: 0.0007525, 150: 0.000505, 250: 7.631742512670295e-05,
                      299: 1.002714116407149e-05}
# The same code over 30 epochs at --lr 5e-4 (the run whose mean LR the squeezed cosine made 26% lower).
DEIT_30_EPOCH_LRS = [
    1e-06, 0.0001008, 0.0002006, 0.00030040000000000004, 0.0004002, 0.00046717622392718753, 0.00045320916362186214,
    0.0004370704822419616, 0.0004189369985579203, 0.00039900738681165594, 0.0003775, 0.0003546504775535711,
    0.00033070916362186215, 0.00030593836425035103, 0.00028060947350057514, 0.00025500000000000007,
    0.00022939052649942492, 0.00020406163574964895, 0.0001792908363781379, 0.000155349522446429,
    0.00013250000000000005, 0.0001109926131883441, 9.10630014420798e-05, 7.292951775803846e-05,
    5.67908363781379e-05, 4.282377607281251e-05, 3.118136287756276e-05, 2.1991153507687383e-05,
    1.535383782021761e-05, 1.1342135634773018e-05]


@pytest.mark.parametrize('n_updates', [1, 7, 1251])
def test_first_update_of_each_epoch_follows_deit_curve(n_updates):
    _, lr_at = schedule('--lr', 1e-3, n_updates=n_updates)
    for epoch, lr in DEIT_S_LR_AT_EPOCH.items():
        assert math.isclose(lr_at(epoch * n_updates), lr, rel_tol=1e-9), epoch
    _, lr_at = schedule('--lr', 5e-4, '--epochs', 30, n_updates=n_updates)
    ours = [lr_at(epoch * n_updates) for epoch in range(30)]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(ours, DEIT_30_EPOCH_LRS))


def test_lr_noise_applies_in_given_fraction_of_schedule():
    _, plain = schedule('--warmup-epochs', 0, '--epochs', 10, '--cooldown-epochs', 0, '--lr', 1.0)
    _, noisy = schedule('--warmup-epochs', 0, '--epochs', 10, '--cooldown-epochs', 0, '--lr', 1.0,
                        '--lr-noise', 0.5, 1.0)
    total = 10 * N_UPDATES
    assert noisy(total // 4) == plain(total // 4)
    assert any(noisy(t) != plain(t) for t in range(total // 2 + 1, total))


@pytest.mark.parametrize('flags, expected', [
    ([], 5e-4 * 64 / 512),
    (['--batch-size', 128, '--lr', 1e-3], 1e-3 * 128 / 512),
    (['--batch-size', 32, '--accum-iter', 4, '--lr', 1e-3], 1e-3 * 128 / 512),
    (['--batch-size', 32, '--accum-iter', 4, '--lr', 1e-3, '--unscale-lr'], 1e-3),
])
def test_scale_lr(flags, expected):
    args = main.get_args_parser().parse_args([str(f) for f in flags])
    assert close(optimization.scale_lr(args), expected)
    assert close(args.lr, expected)


def test_scale_lr_uses_world_size(monkeypatch):
    monkeypatch.setattr(optimization.utils, 'get_world_size', lambda: 8)
    args = main.get_args_parser().parse_args(['--batch-size', '16', '--accum-iter', '2', '--lr', '1e-3'])
    assert close(optimization.scale_lr(args), 1e-3 * 16 * 8 * 2 / 512)
