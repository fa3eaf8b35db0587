"""The training step as a GPU sees it, counted on CPU: host reads per update, non-finite steps skipped on the
device, a skipped step's graph freed."""
import dataclasses
import gc
import os
import sys
import weakref

import pytest
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import engine
import losses
import model_factory
import main
from loaders import DeviceFinish

UPDATES, PRINT_FREQ = 20, 5


def build_model():
    args = main.get_args_parser().parse_args(['--model', 'deit_micro_patch2_16', '--input-size', '16'])
    args.nb_classes = 10
    torch.manual_seed(0)
    return model_factory.build_model(args)


def batches(n=UPDATES, batch=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(batch) % 10)
            for _ in range(n)]


def train_state(model, optimizer, **kwargs):
    scheduler = type('ConstantLR', (), {'step_update': lambda self, n: None})()
    defaults = dict(optimizer=optimizer, lr_scheduler=scheduler, scaler=torch.amp.GradScaler('cpu', enabled=False),
                    updates_per_epoch=UPDATES, print_freq=PRINT_FREQ, batch_size=4,
                    finish_batch=DeviceFinish(torch.device('cpu')))
    defaults.update(kwargs)
    return engine.TrainState(**defaults)


class HostReads:
    """Counts the reads of a tensor's value by the host (item, tolist, bool, float, int), by update. Not counted:
    torch's optimizers reading their step counters, which torch keeps on the host for every device."""
    METHODS = ('item', 'tolist', '__bool__', '__float__', '__int__')

    def __init__(self, monkeypatch):
        self.update, self.by_update = None, {}
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)

            def counted(tensor, *a, _real=real, **k):
                caller = sys._getframe(1).f_code.co_filename
                if not (os.sep + os.path.join('torch', 'optim') + os.sep) in caller:
                    self.by_update[self.update] = self.by_update.get(self.update, 0) + 1
                return _real(tensor, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)

    def before_update(self, global_update):
        self.update = global_update


def loss_nan_at(updates):
    """DeiT's criterion with the loss turned to NaN at the given (0-based) calls."""
    criterion = losses.DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
    calls = []

    def faulty(*inputs):
        calls.append(None)
        loss = losses.DistillationLoss.forward(criterion, *inputs)
        return loss * float('nan') if len(calls) - 1 in updates else loss
    return faulty


@pytest.mark.parametrize('fused', [False, True])
def test_the_host_reads_the_device_only_every_print_freq_updates(monkeypatch, fused):
    """EMA, clipping, Mixup and erasing on: updates 0-3 of every 5 read nothing; the read step reads a fixed few
    values, whatever the window's length."""
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    reads = HostReads(monkeypatch)
    state = train_state(model, optimizer, model_ema=ModelEmaV3(model, decay=0.9), clip_grad=1.0,
                        mixup_fn=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10),
                        finish_batch=DeviceFinish(torch.device('cpu'), re_prob=0.25),
                        before_update=reads.before_update, skip_nonfinite=1 if fused else 0)
    criterion = losses.DistillationLoss(SoftTargetCrossEntropy(), None, 'none', 0.5, 1.0)
    engine.train_one_epoch(model, criterion, batches(), torch.device('cpu'), 0, state)
    per_update = [reads.by_update.get(u, 0) for u in range(UPDATES)]
    assert per_update[:4] == [0, 0, 0, 0] and per_update[5:9] == [0, 0, 0, 0]
    read_steps = [per_update[u] for u in range(PRINT_FREQ - 1, UPDATES - 1, PRINT_FREQ)]
    assert len(set(read_steps)) == 1 and 0 < read_steps[0] <= 3
    assert sum(per_update) - read_steps[0] * (UPDATES // PRINT_FREQ - 1) <= 6  # the epoch's end: read, sums, speed


def test_a_nonfinite_update_is_skipped_on_the_device_and_counted_at_the_read(monkeypatch):
    """Fused AdamW under --skip-nonfinite: the NaN update leaves weights and optimizer state as they were, no host
    read happens before the window ends, and the read counts it."""
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    reads = HostReads(monkeypatch)
    snapshots = {}

    def before_update(u):
        reads.before_update(u)
        snapshots[u] = [p.detach().clone() for p in model.parameters()]
    state = train_state(model, optimizer, skip_nonfinite=1, before_update=before_update)
    stats, _ = engine.train_one_epoch(model, loss_nan_at({2}), batches(), torch.device('cpu'), 0, state)
    assert stats['skipped_nonfinite'] == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # update 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    assert [reads.by_update.get(u, 0) for u in range(4)] == [0, 0, 0, 0]
    assert int(optimizer.state[next(iter(model.parameters()))]['step']) == UPDATES - 1


@pytest.mark.parametrize('fused', [False, True])
def test_past_skip_nonfinite_the_run_stops_naming_the_update(fused):
    model = build_model()
    state = train_state(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused))
    with pytest.raises(engine.NonFiniteLossError, match=r'^loss is nan at epoch 0, step 7 \(of 20\) after 0 '):
        engine.train_one_epoch(model, loss_nan_at({7}), batches(), torch.device('cpu'), 0, state)


def test_an_optimizer_without_a_fused_skip_reads_each_update_only_under_skip_nonfinite(monkeypatch):
    model = build_model()
    reads = HostReads(monkeypatch)
    state = train_state(model, torch.optim.SGD(model.parameters(), lr=0.01), skip_nonfinite=3,
                        before_update=reads.before_update)
    stats, _ = engine.train_one_epoch(model, loss_nan_at({1, 4}), batches(), torch.device('cpu'), 0, state)
    assert stats['skipped_nonfinite'] == 2
    assert all(reads.by_update.get(u, 0) > 0 for u in range(UPDATES))
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_a_skipped_steps_outputs_are_freed_before_the_next_forward():
    model = build_model()
    state = train_state(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), skip_nonfinite=1)
    outputs, alive_at_forward = [], []

    def keep_weakref(module, inputs, output):
        outputs.append(weakref.ref(output))

    def check_previous(module, inputs):
        gc.collect()
        alive_at_forward.append(any(ref() is not None for ref in outputs))
    model.register_forward_hook(keep_weakref)
    model.register_forward_pre_hook(check_previous)
    engine.train_one_epoch(model, loss_nan_at({1}), batches(n=4), torch.device('cpu'), 0,
                           dataclasses.replace(state, updates_per_epoch=4))
    assert alive_at_forward == [False, False, False, False]


# ---------------------------------------------------------------- evaluation

def test_model_and_ema_are_scored_in_one_pass_with_the_numbers_of_two():
    model, ema = build_model(), build_model()
    torch.nn.init.normal_(ema.head.weight)
    data = batches(n=3)
    passes = []

    class CountedLoader(list):
        def __iter__(self):
            passes.append(None)
            return super().__iter__()
    loader, finish = CountedLoader(data), DeviceFinish(torch.device('cpu'))
    both = engine.evaluate_models(loader, {'': model, 'EMA ': ema}, torch.device('cpu'), finish_batch=finish)
    assert len(passes) == 1
    for prefix, one in (('', model), ('EMA ', ema)):
        alone = engine.evaluate(list(data), one, torch.device('cpu'), finish_batch=finish)
        assert both[prefix] == pytest.approx(alone)
    assert both['']['acc1'] != both['EMA ']['acc1'] or both['']['loss'] != both['EMA ']['loss']


def test_evaluation_is_sharded_by_default_under_a_distributed_launch(monkeypatch):
    import loaders
    import utils
    monkeypatch.setattr(utils, 'get_world_size', lambda: 2)
    monkeypatch.setattr(utils, 'get_rank', lambda: 1)
    dataset = torch.utils.data.TensorDataset(torch.zeros(359, 1))
    for flags, expected in (([], 179), (['--no-dist-eval'], 359)):
        args = main.get_args_parser().parse_args(['--num_workers', '0', '--device', 'cpu'] + flags)
        assert len(loaders.build_val_loader(args, dataset).sampler) == expected


# ---------------------------------------------------------------- torch.compile: graphs counted by dynamo

@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the 'aot_eager' backend: dynamo's guards and recompiles as with inductor (AOT autograd
    specialises on float attributes as inductor does; the plain 'eager' backend does not), minus the minutes of
    code generation. Yields dynamo's counters, cleared; the recompile limits are put back after."""
    import functools
    import torch._dynamo
    import torch._dynamo.config as dynamo
    from torch._dynamo.utils import counters
    limits = {name: getattr(dynamo, name) for name in ('recompile_limit', 'accumulated_recompile_limit')}
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='aot_eager'))
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    for name, value in limits.items():
        setattr(dynamo, name, value)


def compile_args(*flags):
    args = main.get_args_parser().parse_args(['--input-size', '16', '--batch-size', '4', '--device', 'cpu',
                                              '--amp', 'none', '--compile', *flags])
    args.nb_classes, args.distributed = 10, False
    return args


def fell_back_to_eager(counters):
    return any('recompile limit' in reason.lower() for reason in counters['unimplemented'])


def test_compile_makes_one_graph_per_multisize_stage_and_never_falls_back(eager_compile):
    """13 sizes, as many as the default --is-multisize schedule has: dynamo's limit of 8 would run the 9th on
    eagerly."""
    sizes = range(8, 34, 2)
    args = compile_args('--model', 'deit_micro_patch2_16', '--size-schedule',
                        ','.join(f'{epoch}:{size}' for epoch, size in enumerate(sizes)))
    stages = main.plan_shape(args, main.schedules.size_schedule_from_flags(args)).stages()
    assert [s.size for s in stages] == list(sizes)
    model = model_factory.build_model(args)
    train_model = main.wrap_for_training(args, model, torch.device('cpu'), stages)
    for stage in stages + stages[:3]:  # a size seen before is not compiled again
        train_model(torch.randn(stage.batch, 3, stage.size, stage.size)).sum().backward()
    assert eager_compile['stats']['unique_graphs'] == 13
    assert not fell_back_to_eager(eager_compile)


@pytest.mark.parametrize('flags, graphs', [(['--is-multisize'], 13),
                                           (['--is-multisize', '--epoch-step', '5', '--patch-step', '2'], 7)])
def test_the_recompile_limit_covers_the_multisize_schedules(flags, graphs):
    """The default --is-multisize schedule (13 sizes from 32 to 224 px) and the 24-hour paper's (7)."""
    args = compile_args('--model', 'deit_tiny_patch16_224', '--input-size', '224', *flags)
    stages = main.plan_shape(args, main.schedules.size_schedule_from_flags(args)).stages()
    assert len(stages) == graphs
    assert main.compiled_graphs_bound(args, model_factory.build_model(args), stages) == graphs


def test_evit_compiles_once_per_kept_token_count_not_per_update(eager_compile):
    """A shrink over 200 updates from 1.0 to 0.8 on 64 patches: 200 distinct rates, far fewer distinct kept-token
    counts; every one of them compiled once, none run eagerly."""
    args = compile_args('--model', 'evit_micro_patch2_16', '--base_keep_rate', '0.8', '--shrink_start_epoch', '0',
                        '--shrink_epochs', '20')
    model = model_factory.build_model(args)
    stages = main.plan_shape(args, None).stages()
    state = main.build_train_state(args, model, None, 10, torch.device('cpu'), stages)
    train_model = main.wrap_for_training(args, model, torch.device('cpu'), stages)
    seen, rates = set(), set()
    for update in range(204):
        state.before_update(update)
        rates.add(main.evit_models.keep_rate_at(update, 10, 0.8, 0, 20))
        seen.add(model.kept_token_counts(64))
        train_model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert len(rates) > 200 and len(seen) < 30
    assert eager_compile['stats']['unique_graphs'] == len(seen)
    assert not fell_back_to_eager(eager_compile)
    assert len(seen) <= main.compiled_graphs_bound(args, model, stages)


def test_a_kept_rate_set_lazily_keeps_the_tokens_of_the_exact_rate():
    """The schedule skips a new rate only when it keeps the same tokens at every size of the run."""
    args = compile_args('--model', 'evit_micro_patch2_16', '--base_keep_rate', '0.5', '--shrink_start_epoch', '0',
                        '--shrink_epochs', '4', '--size-schedule', '0:8,2:16')
    lazy, exact = model_factory.build_model(args), model_factory.build_model(args)
    stages = main.plan_shape(args, main.schedules.size_schedule_from_flags(args)).stages()
    schedule = main.build_train_state(args, lazy, None, 10, torch.device('cpu'), stages).before_update
    for update in range(44):
        schedule(update)
        exact.set_keep_rate(main.evit_models.keep_rate_at(update, 10, 0.5, 0, 4))
        for patches in (16, 64):
            assert lazy.kept_token_counts(patches) == exact.kept_token_counts(patches)


# ---------------------------------------------------------------- random erasing for the whole batch

def erased_boxes(before, after):
    """Per image: erased pixel fraction and the erased region's bounding box (h, w, top, left), or None."""
    changed = (after != before).any(dim=1)
    out = []
    for mask in changed:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        if len(rows) == 0:
            out.append(None)
            continue
        out.append((mask.float().mean().item(), rows[-1].item() - rows[0].item() + 1,
                    cols[-1].item() - cols[0].item() + 1, rows[0].item(), cols[0].item()))
    return out


def erasing_statistics(erase, n=12000, height=24, width=32):
    """Share of images erased, then the mean of erased fraction, box height, width, top and left, the erased
    fractions' spread and the spread of the boxes' log aspect ratios."""
    images = torch.ones(n, 3, height, width)
    boxes = [b for b in erased_boxes(images, erase(images.clone())) if b is not None]
    columns = torch.tensor(boxes)
    log_aspect = (columns[:, 1] / columns[:, 2]).log()
    return [len(boxes) / n, *columns.mean(0).tolist(), columns[:, 0].std().item(), log_aspect.std().item()]


@pytest.mark.parametrize('mode, count', [('pixel', 1), ('rand', 1), ('const', 3)])
def test_batch_erasing_has_timms_distribution(mode, count):
    """Over 12,000 images each, every figure within 3.5 standard errors of timm's (the share erased within 0.02,
    the rest within 5%; a max_area of 0.3 for 1/3 or a min_aspect of 0.5 for 0.3 fails this); pixel mode fills with
    fresh noise."""
    import random
    from timm.data.random_erasing import RandomErasing
    from loaders import BatchRandomErasing
    random.seed(0)
    torch.manual_seed(0)
    timm_erase = RandomErasing(0.25, mode=mode, max_count=count, device='cpu')
    ours = BatchRandomErasing(0.25, mode=mode, max_count=count)
    theirs, mine = erasing_statistics(timm_erase), erasing_statistics(ours)
    assert mine[0] == pytest.approx(theirs[0], abs=0.02)
    for a, b in zip(mine[1:], theirs[1:]):
        assert a == pytest.approx(b, rel=0.05)
    if mode == 'pixel':
        erased = ours(torch.ones(64, 3, 24, 32))
        assert erased[erased != 1].unique().numel() > 100


def test_erasing_in_device_finish_is_the_batch_version_and_resumes_exactly():
    from loaders import BatchRandomErasing
    finish = DeviceFinish(torch.device('cpu'), re_prob=1.0, re_mode='pixel', re_count=1)
    assert isinstance(finish.erasing, BatchRandomErasing)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    state = torch.get_rng_state()
    first = finish(images)
    torch.set_rng_state(state)
    assert torch.equal(finish(images), first)


# ---------------------------------------------------------------- host-to-device copies ahead of the step

def test_the_next_batchs_copy_is_issued_before_a_batch_is_handed_over():
    from loaders import DevicePrefetcher
    events = []

    class RecordingCopies:
        def issue(self, batch):
            events.append(('copy', int(batch[1][0])))
            return batch

        def hand_over(self, batch):
            events.append(('step', int(batch[1][0])))
            return batch
    loader = [(torch.zeros(2, 3), torch.full((2,), i)) for i in range(4)]
    prefetched = DevicePrefetcher(loader, torch.device('cpu'), copies=RecordingCopies())
    assert len(prefetched) == 4 and [int(b[1][0]) for b in prefetched] == [0, 1, 2, 3]
    assert events == [('copy', 0), ('copy', 1), ('step', 0), ('copy', 2), ('step', 1), ('copy', 3), ('step', 2),
                      ('step', 3)]
    plain = DevicePrefetcher(loader, torch.device('cpu'))  # on the CPU the batches pass as they are
    assert all(a is b for a, b in zip(plain, loader))


def test_the_ema_decays_at_its_rate_from_the_first_update_as_deits():
    """DeiT's ModelEma: ema <- d * ema + (1 - d) * w after every update, starting from the initial weights."""
    model = build_model()
    decay = 0.9
    ema = ModelEmaV3(model, decay=decay)
    expected = [p.detach().clone() for p in model.parameters()]
    weights = []

    def record(u):
        if u > 0:
            weights.append([p.detach().clone() for p in model.parameters()])
    state = train_state(model, torch.optim.SGD(model.parameters(), lr=0.1), model_ema=ema, before_update=record,
                        updates_per_epoch=3)
    engine.train_one_epoch(model, loss_nan_at(set()), batches(n=3), torch.device('cpu'), 0, state)
    weights.append([p.detach().clone() for p in model.parameters()])
    for step in weights:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, step)]
    for e, got in zip(expected, ema.module.parameters()):
        assert torch.allclose(e, got, atol=1e-6)
