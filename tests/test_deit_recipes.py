"""The rest of DeiT's family in main.py's flags: 3Things (--attn-only, --patch-embed hmlp, parallel blocks),
DeiT III (--constant-drop-path, --no-train-mode) and Cosub (--cosub)."""
import pytest
import timm
import torch
import torch.nn.functional as F

import engine
import losses
import main
import model_factory
import optimization
import models
from conftest import TINY, read_log, run_main
from utils import UserError


def parse(*flags, model='deit_micro_patch2_16', size='16'):
    args = main.get_args_parser().parse_args(['--model', model, '--input-size', size, *flags])
    args.nb_classes = 10
    return args


def build(*flags, model='deit_micro_patch2_16', size='16'):
    torch.manual_seed(0)
    return model_factory.build_model(parse(*flags, model=model, size=size))


def images(batch=4, size=16, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def train_steps(model, criterion, optimizer, batches, **state_kwargs):
    """engine.train_one_epoch over in-memory batches with a constant LR."""
    scheduler = type('ConstantLR', (), {'step_update': lambda self, n: None})()
    state = engine.TrainState(optimizer=optimizer, lr_scheduler=scheduler,
                              scaler=torch.amp.GradScaler('cpu', enabled=False), updates_per_epoch=len(batches),
                              print_freq=10 ** 6, batch_size=batches[0][0].shape[0], **state_kwargs)
    return engine.train_one_epoch(model, criterion, batches, torch.device('cpu'), 0, state)


# ---------------------------------------------------------------- 3Things: attention-only fine-tuning

def test_attn_only_trains_attention_pos_embed_and_head_and_nothing_else():
    args = parse('--attn-only', '--weight-decay', '0.1')
    model = model_factory.build_model(args)
    model_factory.attention_only(model, args.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if '.attn.' in n or n.startswith('head.') or n == 'pos_embed'}
    assert 'blocks.0.attn.qkv.weight' in trainable and 'patch_embed.proj.weight' not in trainable
    optimizer = optimization.build_optimizer(args, model, torch.device('cpu'))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [(images(), torch.tensor([0, 1, 2, 3]))] * 2
    train_steps(model, losses.DistillationLoss(torch.nn.CrossEntropyLoss()), optimizer, batches)
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name  # bit-identical, weight decay included


def test_attn_only_needs_attention_blocks():
    args = parse('--attn-only', model='resnet18', size='32')
    model = model_factory.build_model(args)
    with pytest.raises(UserError, match='no attention blocks'):
        model_factory.attention_only(model, args.model)


# ---------------------------------------------------------------- 3Things: hMLP stem

def test_hmlp_stem_replaces_the_patchify_layer_and_trains():
    model = build('--patch-embed', 'hmlp', model='deit_tiny_patch4_32', size='32')
    assert isinstance(model.patch_embed, models.HMLPPatchEmbed)
    strides = [m.stride for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(1, 1), (2, 2), (2, 2)]  # patch 4 = 1 x 2 x 2
    out = model(images(batch=2, size=32))
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_hmlp_stem_processes_every_patch_on_its_own():
    torch.manual_seed(0)
    stem = models.HMLPPatchEmbed(img_size=64, patch_size=16, embed_dim=32).eval()
    with torch.no_grad():
        for m in stem.proj:
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, still per element in eval mode
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 64, 64)
    changed = x.clone()
    changed[..., 16:32, 32:48] = torch.randn(16, 16)  # the patch at grid row 1, column 2
    tokens, new_tokens = stem(x)[0], stem(changed)[0]  # (16, 32)
    differs = (tokens - new_tokens).abs().amax(dim=-1) > 0
    assert differs.tolist() == [i == 1 * 4 + 2 for i in range(16)]
    assert stem.patch_size == (16, 16) and stem.num_patches == 16


def test_hmlp_strides_and_bad_patch_sizes():
    assert models.hmlp_strides(16) == (4, 2, 2) and models.hmlp_strides(8) == (2, 2, 2)
    with pytest.raises(UserError, match='multiple of 4'):
        build('--patch-embed', 'hmlp')  # deit_micro_patch2_16 has patch 2
    with pytest.raises(UserError, match='does not support --patch-embed hmlp'):
        build('--patch-embed', 'hmlp', model='dhvt_micro_patch2_16')


@pytest.mark.parametrize('name', ['vit_small_patch16_18x2_224', 'vit_base_patch16_18x2_224'])
def test_timms_parallel_block_vits_are_reachable_by_name(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert len(model.blocks) == 18 and len(model.blocks[0].attns) == 2 and len(model.blocks[0].ffns) == 2
    small = build(model=name, size='32')  # a forward and backward at a test size
    F.cross_entropy(small(images(batch=2, size=32)), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in small.parameters())


# ---------------------------------------------------------------- DeiT III: LAMB, constant drop path, train mode

def test_lamb_is_timms_with_the_weight_decay_split():
    args = parse('--opt', 'lamb', '--weight-decay', '0.05', '--lr', '4e-3', '--unscale-lr')
    model = model_factory.build_model(args)
    optimizer = optimization.build_optimizer(args, model, torch.device('cpu'))
    assert isinstance(optimizer, timm.optim.Lamb)
    decays = sorted(group['weight_decay'] for group in optimizer.param_groups)
    assert decays == [0.0, 0.05] and all(group['lr'] == 4e-3 for group in optimizer.param_groups)


def test_constant_drop_path_gives_every_block_the_same_rate():
    linear = build('--drop-path', '0.2', model='deit_tiny_patch4_32', size='32')
    constant = build('--drop-path', '0.2', '--constant-drop-path', model='deit_tiny_patch4_32', size='32')
    assert isinstance(linear.blocks[0].drop_path1, torch.nn.Identity)
    assert linear.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert {b.drop_path1.drop_prob for b in constant.blocks} == {0.2} == {b.drop_path2.drop_prob for b in constant.blocks}


def test_constant_drop_path_keeps_a_familys_branches_without_drop_path():
    model = build('--drop-path', '0.2', '--constant-drop-path', model='localvit_micro_patch2_16')
    assert {b.drop_path1.drop_prob for b in model.blocks} == {0.2}
    assert all(isinstance(b.drop_path2, torch.nn.Identity) for b in model.blocks)  # LocalViT's FFN has none


def test_no_train_mode_trains_with_the_model_in_eval_mode():
    model = build('--drop', '0.5')
    modes = []
    model.blocks[0].register_forward_hook(lambda m, i, o: modes.append(m.training))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(images(), torch.tensor([0, 1, 2, 3]))]
    criterion = losses.DistillationLoss(torch.nn.CrossEntropyLoss())
    train_steps(model, criterion, optimizer, batches, train_mode=False)
    train_steps(model, criterion, optimizer, batches)
    assert modes == [False, True]


# ---------------------------------------------------------------- Cosub

def test_cosub_loss_matches_a_hand_computation():
    outputs = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -2.0], [1.0, 0.0, -1.0], [-0.5, 1.5, 0.0]])
    targets = torch.tensor([0, 1])
    a, b = outputs[:2], outputs[2:]
    onehot = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])

    def bce(logits, target):  # mean over every element of -[t log s + (1 - t) log(1 - s)]
        s = torch.sigmoid(logits)
        return -(target * s.log() + (1 - target) * (1 - s).log()).mean()

    expected = 0.25 * (bce(a, onehot) + bce(b, onehot) + bce(a, torch.sigmoid(b)) + bce(b, torch.sigmoid(a)))
    loss = losses.CosubLoss(num_classes=3)(None, outputs, targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cosub_targets_smoothing_soft_and_binarized():
    loss = losses.CosubLoss(num_classes=4, smoothing=0.2)
    assert torch.allclose(loss.dense_targets(torch.tensor([2]), torch.float32),
                          torch.tensor([[0.05, 0.05, 0.85, 0.05]]))
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    assert torch.equal(loss.dense_targets(soft, torch.float32), soft)
    binarize = losses.CosubLoss(num_classes=4, binarize=True)
    assert torch.equal(binarize.dense_targets(soft, torch.float32), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_cosub_gradient_flows_only_through_each_halfs_own_terms():
    outputs = torch.randn(4, 3, requires_grad=True)
    loss = losses.CosubLoss(num_classes=3)(None, outputs, torch.tensor([0, 2]))
    loss.backward()
    first, second = outputs.detach()[:2], outputs.detach()[2:]
    # d/d first of 0.25 * (bce(first, t) + bce(first, sigmoid(second))): (2 s(first) - t - s(second)) / (4 n)
    t = F.one_hot(torch.tensor([0, 2]), 3).float()
    expected = (2 * first.sigmoid() - t - second.sigmoid()) / (4 * first.numel())
    assert torch.allclose(outputs.grad[:2], expected, atol=1e-7)


def test_engine_doubles_the_batch_for_cosub_and_counts_it_once():
    model = build('--drop-path', '0.1')
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(images(), torch.tensor([0, 1, 2, 3]))] * 2
    stats, _ = train_steps(model, losses.CosubLoss(10), optimizer, batches, cosub=True, accum_iter=2)
    assert seen == [8, 8]  # two micro-batches of 4 images, each seen twice
    assert stats['skipped_images'] == 0  # the 4 images of a batch count once


@pytest.mark.parametrize('flags, message', [
    (['--drop-path', '0'], 'needs --drop-path > 0'),
    (['--no-train-mode'], 'switches off'),
    (['--distillation-type', 'hard', '--teacher-path', 'x.pth'], 'takes no teacher'),
])
def test_cosub_misuse_is_a_user_error(flags, message):
    args = parse('--cosub', *flags)
    with pytest.raises(UserError, match=message):
        losses.build_criterion(args, model_factory.build_model(args), True, torch.device('cpu'))


def test_main_runs_cosub_with_mixup_and_accumulation(tmp_path):
    out = tmp_path / 'cosub'
    flags = TINY + ['--cosub', '--drop-path', '0.1', '--mixup', '0.8', '--cutmix', '1.0', '--accum-iter', '2',
                    '--epochs', '1', '--bce-loss', '--output_dir', out]
    result = run_main(flags)
    assert result.returncode == 0, result.stderr
    _, epochs = read_log(out)
    assert len(epochs) == 1 and epochs[0]['train_loss'] > 0


# ---------------------------------------------------------------- log.txt's images per second

def test_images_per_second_count_each_image_once_and_leave_out_the_first_update(monkeypatch):
    """Two ranks (their sums simulated), 5 updates of 4 images each, 1 s per update after a first that pays 10 s of
    start-up: 2 ranks x 4 images per second."""
    import utils

    class FakeClock:
        now = 0.0

    monkeypatch.setattr(engine.time, 'time', lambda: FakeClock.now)
    monkeypatch.setattr(utils, 'get_world_size', lambda: 2)
    monkeypatch.setattr(utils, 'all_reduce_sum', lambda values, device: [2 * v for v in values])
    model = build()
    forward = model.forward

    def timed_forward(x):
        FakeClock.now += 10.0 if FakeClock.now == 0 else 1.0
        return forward(x)
    monkeypatch.setattr(model, 'forward', timed_forward)
    criterion = losses.DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(images(seed=i), torch.arange(4)) for i in range(5)]
    stats, _ = train_steps(model, criterion, optimizer, batches)
    assert stats['images_per_sec'] == pytest.approx(8.0)
