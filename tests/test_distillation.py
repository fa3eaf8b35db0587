"""DeiT's distillation end to end: the student's two tokens, the frozen teacher, the flags and their errors."""

import pytest
import timm
import torch

import losses
import main
import model_factory
import models  # noqa: F401
from conftest import TINY, read_log, run_main
from utils import UserError

STUDENT = 'deit_micro_distilled_patch2_16'
TEACHER = 'deit_micro_patch2_16'


def args_for(*flags, model=STUDENT):
    args = main.get_args_parser().parse_args(['--model', model, '--input-size', '8', *flags])
    args.nb_classes = 10
    return args


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    teacher = timm.create_model(TEACHER, num_classes=10, img_size=8)
    torch.save({'model': teacher.state_dict()}, path)
    return str(path)


def test_gradients_reach_both_tokens_and_not_the_teacher(teacher_file):
    args = args_for('--distillation-type', 'hard', '--teacher-model', TEACHER, '--teacher-path', teacher_file)
    student = model_factory.build_model(args)
    criterion = losses.build_criterion(args, student, False, torch.device('cpu'))
    teacher_before = {k: v.clone() for k, v in criterion.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    student.train()
    images, targets = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        criterion(images, student(images), targets).backward()
        for name in ('cls_token', 'dist_token', 'head.weight', 'head_dist.weight'):
            grad = dict(student.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, name
        optimizer.step()
    assert not criterion.teacher.training
    assert all(not p.requires_grad for p in criterion.teacher.parameters())
    for key, value in criterion.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_each_token_learns_from_its_own_target(teacher_file):
    """alpha 1: only the distillation head is trained; alpha 0: only the class head."""
    for alpha, trained, untouched in ((1.0, 'head_dist.weight', 'head.weight'), (0.0, 'head.weight', 'head_dist.weight')):
        args = args_for('--distillation-type', 'soft', '--distillation-alpha', str(alpha),
                        '--teacher-model', TEACHER, '--teacher-path', teacher_file)
        student = model_factory.build_model(args)
        criterion = losses.build_criterion(args, student, False, torch.device('cpu'))
        student.train()
        images = torch.randn(4, 3, 8, 8)
        criterion(images, student(images), torch.randint(0, 10, (4,))).backward()
        grads = dict(student.named_parameters())
        assert grads[trained].grad.abs().sum() > 0
        assert grads[untouched].grad is None or grads[untouched].grad.abs().sum() == 0


@pytest.mark.parametrize('flags, model, message', [
    (['--distillation-type', 'hard', '--teacher-path', 'x.pth'], TEACHER, 'has no distillation token'),
    (['--distillation-type', 'hard'], STUDENT, 'needs a teacher'),
    (['--distillation-type', 'soft', '--teacher-path', 'missing.pth', '--teacher-model', TEACHER], STUDENT,
     'does not exist'),
    (['--distillation-type', 'soft', '--teacher-path', 'x.pth', '--finetune', 'y.pth'], STUDENT,
     'fine-tuning with distillation'),
    (['--distillation-type', 'soft', '--teacher-path', 'x.pth', '--teacher-model', 'no_such_net'], STUDENT,
     'unknown --teacher-model'),
])
def test_distillation_misuse_is_a_user_error(flags, model, message):
    args = args_for(*flags, model=model)
    with pytest.raises(UserError, match=message):
        losses.build_criterion(args, model_factory.build_model(args), False, torch.device('cpu'))


def test_teacher_with_other_classes_is_refused(tmp_path):
    path = tmp_path / 'teacher.pth'
    torch.save({'model': timm.create_model(TEACHER, num_classes=7, img_size=8).state_dict()}, path)
    with pytest.raises(UserError, match='predicts 7 classes but the data set has 10'):
        losses.build_teacher(TEACHER, str(path), 10, 8, torch.device('cpu'))


def test_distillation_run_on_digits(tmp_path):
    """A teacher trained by main.py, then a student distilled from its checkpoint for 2 epochs."""
    teacher_dir, student_dir = tmp_path / 'teacher', tmp_path / 'student'
    result = run_main(TINY + ['--epochs', '1', '--output_dir', teacher_dir])
    assert result.returncode == 0, result.stderr[-2000:]
    teacher_bytes = (teacher_dir / 'checkpoint.pth').read_bytes()
    result = run_main(TINY + ['--model', STUDENT, '--distillation-type', 'hard', '--teacher-model', TEACHER,
                              '--teacher-path', teacher_dir / 'checkpoint.pth', '--output_dir', student_dir])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (teacher_dir / 'checkpoint.pth').read_bytes() == teacher_bytes
    epochs = read_log(student_dir)[1]
    assert [e['epoch'] for e in epochs] == [0, 1] and all(e['train_loss'] > 0 for e in epochs)
    saved = torch.load(student_dir / 'checkpoint.pth', weights_only=True)
    assert 'head_dist.weight' in saved['model'] and not any('teacher' in k for k in saved)
    assert set(saved['model']) == set(timm.create_model(STUDENT, num_classes=10, img_size=8).state_dict())


def test_distilled_model_without_teacher_trains_the_class_head_only():
    """DeiT: a distilled model with --distillation-type none returns both heads in training, the criterion takes the
    first, so the class head learns and the distillation head keeps its initial weights."""
    args = args_for()
    student = model_factory.build_model(args)
    assert model_factory.train_class_head_only(student, args)
    criterion = losses.build_criterion(args, student, False, torch.device('cpu'))
    head_dist, head = student.head_dist.weight.clone(), student.head.weight.clone()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    student.train()
    images, targets = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    outputs = student(images)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    loss = criterion(images, outputs, targets)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(outputs[0], targets, label_smoothing=0.1))
    loss.backward()
    optimizer.step()
    assert torch.equal(student.head_dist.weight, head_dist)
    assert not torch.equal(student.head.weight, head)
    assert student.dist_token.grad is not None  # the token still shapes the class token through attention
    student.eval()
    with torch.no_grad():
        features = student.forward_features(images)
        mean = (student.head(features[:, 0]) + student.head_dist(features[:, 1])) / 2
        assert torch.allclose(student(images), mean, atol=1e-6)


def test_plain_model_and_teacher_runs_are_left_alone(teacher_file):
    assert not model_factory.train_class_head_only(timm.create_model(TEACHER, num_classes=10, img_size=8),
                                                   args_for(model=TEACHER))
    args = args_for('--distillation-type', 'hard', '--teacher-model', TEACHER, '--teacher-path', teacher_file)
    student = model_factory.build_model(args)
    assert not model_factory.train_class_head_only(student, args)
    assert student.head_dist.weight.requires_grad


def test_finetune_between_distilled_and_plain_deit(tmp_path, capsys):
    """DeiT's distilled checkpoints fine-tuned into a plain DeiT (and back): the extra token is dropped or added."""
    import timm
    import checkpoints
    distilled = timm.create_model('deit_micro_distilled_patch2_16', num_classes=10)
    plain = timm.create_model('deit_micro_patch2_16', num_classes=10)
    torch.save({'model': distilled.state_dict()}, tmp_path / 'distilled.pth')
    torch.save({'model': plain.state_dict()}, tmp_path / 'plain.pth')
    checkpoints.load_weights(plain, str(tmp_path / 'distilled.pth'), 'finetune', finetune=True)
    pos = distilled.pos_embed.detach()
    assert torch.equal(plain.pos_embed.detach(), torch.cat([pos[:, :1], pos[:, 2:]], dim=1))
    assert torch.equal(plain.cls_token, distilled.cls_token)
    assert 'dropping the distillation token' in capsys.readouterr().out
    again = timm.create_model('deit_micro_distilled_patch2_16', num_classes=10)
    _, fresh = checkpoints.load_weights(again, str(tmp_path / 'plain.pth'), 'finetune', finetune=True)
    assert sorted(fresh) == ['dist_token', 'head_dist.bias', 'head_dist.weight']
    saved = torch.load(tmp_path / 'plain.pth', weights_only=True)['model']['pos_embed']
    assert torch.equal(again.pos_embed[:, :2].detach(), saved[:, [0, 0]])
    assert torch.equal(again.pos_embed[:, 2:].detach(), saved[:, 1:])
    assert "distillation token starts afresh" in capsys.readouterr().out


def test_main_finetunes_a_distilled_checkpoint_into_a_plain_deit_at_another_size(tmp_path):
    import timm
    torch.save({'model': timm.create_model('deit_micro_distilled_patch2_16', num_classes=10).state_dict()},
               tmp_path / 'distilled.pth')
    result = run_main(TINY + ['--finetune', tmp_path / 'distilled.pth', '--epochs', '1'])
    assert result.returncode == 0, result.stderr
    assert 'dropping the distillation token' in result.stdout and 'position embedding 8x8 -> 4x4' in result.stdout
