"""Training criteria: the base classification loss (distillation wraps it)."""
import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


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
