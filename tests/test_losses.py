import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import losses


@pytest.mark.parametrize('mixup, smoothing, bce, expected', [
    (True, 0.1, False, SoftTargetCrossEntropy),
    (True, 0.0, False, SoftTargetCrossEntropy),
    (False, 0.1, False, LabelSmoothingCrossEntropy),
    (False, 0.0, False, torch.nn.CrossEntropyLoss),
    (False, 0.1, True, BinaryCrossEntropy),
    (True, 0.1, True, BinaryCrossEntropy),
])
def test_base_criterion_choice(mixup, smoothing, bce, expected):
    assert type(losses.build_base_criterion(mixup, smoothing, bce)) is expected


def test_base_criterion_carries_smoothing():
    assert losses.build_base_criterion(False, 0.2, False).smoothing == 0.2
    assert losses.build_base_criterion(False, 0.2, True).smoothing == 0.2
    assert losses.build_base_criterion(True, 0.2, True).smoothing == 0.0


def test_label_smoothing_value():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 0])
    logp = F.log_softmax(logits, dim=1)
    expected = (0.9 * -logp.gather(1, targets[:, None]).squeeze(1) - 0.1 * logp.mean(dim=1)).mean()
    assert math.isclose(losses.build_base_criterion(False, 0.1, False)(logits, targets).item(), expected.item(),
                        rel_tol=1e-6)


def data(batch=6, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, generator=g)
    cls = torch.randn(batch, classes, generator=g)
    kd = torch.randn(batch, classes, generator=g)
    targets = torch.randint(0, classes, (batch,), generator=g)
    teacher = torch.nn.Linear(3, classes)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(classes, 3, generator=g))
        teacher.bias.copy_(torch.randn(classes, generator=g))
    return inputs, cls, kd, targets, teacher


def test_none_is_the_base_criterion():
    inputs, cls, kd, targets, _ = data()
    base = torch.nn.CrossEntropyLoss()
    loss = losses.DistillationLoss(base)
    assert torch.equal(loss(inputs, cls, targets), base(cls, targets))
    assert torch.equal(loss(inputs, (cls, kd), targets), base(cls, targets))


def test_unknown_type_and_missing_kd_output():
    with pytest.raises(ValueError):
        losses.DistillationLoss(torch.nn.CrossEntropyLoss(), distillation_type='medium')
    inputs, cls, _, targets, teacher = data()
    with pytest.raises(ValueError):
        losses.DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'hard')(inputs, cls, targets)


@pytest.mark.parametrize('alpha', [0.0, 0.3, 0.5, 1.0])
def test_hard_distillation(alpha):
    inputs, cls, kd, targets, teacher = data()
    base = torch.nn.CrossEntropyLoss()
    loss = losses.DistillationLoss(base, teacher, 'hard', alpha=alpha, tau=3.0)(inputs, (cls, kd), targets)
    teacher_labels = teacher(inputs).argmax(dim=1)
    expected = (1 - alpha) * F.cross_entropy(cls, targets) + alpha * F.cross_entropy(kd, teacher_labels)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)


def soft_by_hand(kd, teacher_logits, t):
    p = F.softmax(teacher_logits / t, dim=1)
    kl = (p * (F.log_softmax(teacher_logits / t, dim=1) - F.log_softmax(kd / t, dim=1))).sum()
    return kl * t * t / kd.numel()


@pytest.mark.parametrize('tau', [1.0, 2.5])
@pytest.mark.parametrize('alpha', [0.0, 0.5, 1.0])
def test_soft_distillation(alpha, tau):
    inputs, cls, kd, targets, teacher = data(seed=1)
    base = torch.nn.CrossEntropyLoss()
    loss = losses.DistillationLoss(base, teacher, 'soft', alpha=alpha, tau=tau)(inputs, (cls, kd), targets)
    with torch.no_grad():
        distill = soft_by_hand(kd, teacher(inputs), tau)
    expected = (1 - alpha) * F.cross_entropy(cls, targets) + alpha * distill
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    assert distill > 0


def test_limits_of_alpha():
    inputs, cls, kd, targets, teacher = data(seed=2)
    base = torch.nn.CrossEntropyLoss()
    for kind in ('soft', 'hard'):
        only_base = losses.DistillationLoss(base, teacher, kind, alpha=0.0)(inputs, (cls, kd), targets)
        assert torch.allclose(only_base, base(cls, targets))
        only_kd = losses.DistillationLoss(base, teacher, kind, alpha=1.0)
        assert torch.allclose(only_kd(inputs, (cls, kd), targets), only_kd(inputs, (cls + 5.0, kd), targets))


def test_soft_distillation_is_zero_when_student_matches_teacher():
    inputs, cls, _, targets, teacher = data(seed=3)
    with torch.no_grad():
        kd = teacher(inputs)
    loss = losses.DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'soft', alpha=1.0, tau=2.0)
    assert abs(loss(inputs, (cls, kd), targets).item()) < 1e-6


def test_teacher_gets_no_gradient():
    inputs, cls, kd, targets, teacher = data(seed=4)
    kd.requires_grad_(True)
    loss = losses.DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'soft', alpha=0.5, tau=2.0)
    loss(inputs, (cls, kd), targets).backward()
    assert kd.grad is not None and teacher.weight.grad is None
