"""Training criteria: the base classification loss, and DeiT's distillation around it with its teacher."""
import timm
import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from checkpoints import load_weights
from model_factory import create_at_size
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
    teacher = create_at_size(name, input_size, num_classes=num_classes)
    ckpt = load_checkpoint(path)
    _check_teacher_classes(teacher, model_weights(ckpt, path), path, num_classes)
    load_weights(teacher, path, '--teacher-path', ckpt=ckpt,
                 fix=f'pass the --teacher-model it was trained as, at --input-size {input_size}')
    return teacher.to(device).eval().requires_grad_(False)


def _check_teacher_classes(teacher, state, path, num_classes):
    classifier = teacher.pretrained_cfg.get('classifier', 'head')
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        weight = state.get(f'{name}.weight')
        if weight is not None and weight.shape[0] != num_classes:
            raise UserError(f'teacher {path} predicts {weight.shape[0]} classes but the data set has '
                            f'{num_classes}; use a teacher trained on the same classes')


# ---------------------------------------------------------------- from the flags

def build_criterion(args, model, mixup_active, device):
    """The base criterion, wrapped in DeiT's distillation loss with its teacher when one is asked for."""
    if args.cosub:
        return cosub_criterion(args)
    base = build_base_criterion(mixup_active, args.smoothing, args.bce_loss)
    if args.distillation_type == 'none':
        return DistillationLoss(base)
    if args.finetune:
        raise UserError('fine-tuning with distillation is not supported (as in DeiT); '
                        'drop --finetune or set --distillation-type none')
    if not hasattr(model, 'set_distilled_training'):
        raise UserError(f'{args.model} has no distillation token for --distillation-type {args.distillation_type}; '
                        'pick a *_distilled_* model, e.g. deit_small_distilled_patch16_224')
    model.set_distilled_training(True)
    teacher = build_teacher(args.teacher_model, args.teacher_path, args.nb_classes, args.input_size, device)
    return DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha,
                                   args.distillation_tau)


def cosub_criterion(args):
    """DeiT's co-training loss; the two submodels differ only by their stochastic-depth draws."""
    if args.distillation_type != 'none':
        raise UserError('--cosub replaces the loss (as in DeiT) and takes no teacher; '
                        'drop --cosub or set --distillation-type none')
    if args.drop_path <= 0:
        raise UserError('--cosub co-trains two stochastic-depth submodels and needs --drop-path > 0 '
                        '(DeiT uses 0.05-0.5)')
    if not args.train_mode:
        raise UserError('--cosub needs stochastic depth, which --no-train-mode switches off; drop one of the two')
    return CosubLoss(args.nb_classes, smoothing=0.0 if args.bce_loss else args.smoothing,
                            binarize=args.bce_loss)
