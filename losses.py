"""Training criteria: the base classification loss, and DeiT's distillation around it with its teacher."""
import timm
import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from utils import UserError, load_checkpoint, model_weights


def build_base_criterion(mixup_active, smoothing, bce_loss):
    """DeiT's choice: soft-target CE when mixup/cutmix make soft targets (they carry the smoothing),
    BCE with --bce-loss, label-smoothing CE with --smoothing, else plain CE."""
    if bce_loss:
        # As DeiT III: under mixup every class present in the mix is a positive (targets > 0 become 1).
        if mixup_active:
            return BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
        return BinaryCrossEntropy(smoothing=smoothing)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()


class DistillationLoss(torch.nn.Module):
    """DeiT's loss: the base criterion on the class-token output, plus, for models that also return a
    distillation-token output, a term against a frozen teacher ('soft': KL at temperature tau; 'hard':
    CE against the teacher's argmax), mixed as (1 - alpha) * base + alpha * distillation.
    With distillation_type 'none' it is the base criterion on the (first) output."""

    def __init__(self, base_criterion, teacher=None, distillation_type='none', alpha=0.5, tau=1.0):
        super().__init__()
        if distillation_type not in ('none', 'soft', 'hard'):
            raise ValueError(f'unknown distillation type {distillation_type}')
        self.base_criterion, self.teacher = base_criterion, teacher
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, inputs, outputs, targets):
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, targets)
        if self.distillation_type == 'none':
            return base_loss
        if outputs_kd is None:
            raise ValueError('distillation needs a model that returns (class, distillation) outputs in training')
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.distillation_type == 'soft':
            t = self.tau
            # sum over classes and batch, normalised by the number of logits, as DeiT does
            distillation_loss = torch.nn.functional.kl_div(
                torch.log_softmax(outputs_kd / t, dim=1), torch.log_softmax(teacher_outputs / t, dim=1),
                reduction='sum', log_target=True) * (t * t) / outputs_kd.numel()
        else:
            distillation_loss = torch.nn.functional.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


class CosubLoss(torch.nn.Module):
    """DeiT's co-training of two submodels (Cosub): the model ran on the batch twice (outputs of the doubled batch,
    first half and second half) with independent stochastic depth; each half learns from the targets and from
    the other half's detached sigmoid predictions, four binary cross-entropies weighted 1/4 each.

    Targets are class indices (one-hot, with label smoothing as timm's Mixup applies it) or mixup's soft
    targets; `binarize` makes every class present in a mix a positive, as with DeiT's --bce-loss."""

    def __init__(self, num_classes, smoothing=0.0, binarize=False):
        super().__init__()
        self.num_classes, self.smoothing, self.binarize = num_classes, smoothing, binarize

    def dense_targets(self, targets, dtype):
        if targets.dim() == 1:
            off = self.smoothing / self.num_classes
            targets = torch.nn.functional.one_hot(targets, self.num_classes).to(dtype) * (1 - self.smoothing) + off
        if self.binarize:
            targets = targets.gt(0.0).to(dtype)
        return targets

    def forward(self, inputs, outputs, targets):
        first, second = outputs.float().chunk(2)
        targets = self.dense_targets(targets, first.dtype)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        return 0.25 * (bce(first, targets) + bce(second, targets)
                       + bce(first, second.detach().sigmoid()) + bce(second, first.detach().sigmoid()))


def build_teacher(name, path, num_classes, input_size, device):
    """A frozen teacher in eval mode: timm model `name` with the weights in `path` (file, URL or .safetensors)."""
    if not path:
        raise UserError('distillation needs a teacher: pass --teacher-path FILE_OR_URL with its weights '
                        '(and --teacher-model NAME)')
    if not timm.is_model(name):
        raise UserError(f'unknown --teacher-model {name}; pass a timm model name or one of ours')
    state = model_weights(load_checkpoint(path), path)
    teacher = _create_at_size(name, num_classes, input_size)
    _check_teacher_classes(teacher, state, path, num_classes)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f'--teacher-path {path} does not fit --teacher-model {name} at --input-size {input_size} '
                        f'({str(e).strip().splitlines()[-1].strip()[:120]}); pass the model it was trained as') from e
    return teacher.to(device).eval().requires_grad_(False)


def _create_at_size(name, num_classes, input_size):
    native = timm.get_pretrained_cfg_value(name, 'input_size')
    if native is not None and native[-1] != input_size:
        try:
            return timm.create_model(name, num_classes=num_classes, img_size=input_size)
        except TypeError:  # convnets take any size and have no img_size argument
            pass
    return timm.create_model(name, num_classes=num_classes)


def _check_teacher_classes(teacher, state, path, num_classes):
    classifier = teacher.pretrained_cfg.get('classifier', 'head')
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        weight = state.get(f'{name}.weight')
        if weight is not None and weight.shape[0] != num_classes:
            raise UserError(f'teacher {path} predicts {weight.shape[0]} classes but the data set has '
                            f'{num_classes}; use a teacher trained on the same classes')
