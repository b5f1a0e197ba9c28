"""Tests of the feature-distillation students `fitnets` (hint regression on the last block) and `reviewkd` (ABF
chain over the last blocks): which blocks they tap, their loss against references written here, which modules
learn, and that they predict with the main head alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cdl_core.attach import Attachment, ModelOutput
from cdl_core.backbones import create_backbone
from cdl_core.config import BackboneConfig, DistillConfig
from cdl_core.distill import KDContext, TaskClasses, TeacherSignal, build_kd_method
from cdl_core.model import ContinualModel
from cdl_core.prompts import build_prompt_method

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")

N_CLASSES, CLASSES = 6, TaskClasses(past=2, seen=4)  # 0-1 past, 2-3 current, 4-5 future
TARGETS = torch.tensor([2, 3, 3, 2])
D_S, D_T, TOKENS = 8, 12, 5


def _ctx(student_depth=4, teacher_depth=6, student_dim=D_S, teacher_dim=D_T):
    return KDContext(
        student_dim=student_dim, teacher_dim=teacher_dim, student_depth=student_depth, teacher_depth=teacher_depth,
        n_classes=N_CLASSES, n_tasks=3, prompt_method="none", prompt_params=None, teacher_prompt_layers=(),
        make_head=lambda width: nn.Linear(width, N_CLASSES),
    )


def _method(name, ctx=None, alpha=0.5, temperature=None, **params):
    cfg = DistillConfig(method=name, alpha=alpha, temperature=temperature, params=params)
    cfg.validate()
    return build_kd_method(cfg, ctx or _ctx())


# -- small references ----------------------------------------------------------------------------------------


def ref_log_softmax(x):
    shifted = x - x.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def ref_logit_kd_loss(logits, teacher, alpha, temperature):
    """`kd`'s loss written out: (1 - a) CE over the current classes + a T^2 KL(teacher || student) there."""
    cur = slice(CLASSES.past, CLASSES.seen)
    ce = -ref_log_softmax(logits[:, cur])[torch.arange(len(TARGETS)), TARGETS - CLASSES.past].mean()
    log_p, log_q = ref_log_softmax(teacher[:, cur] / temperature), ref_log_softmax(logits[:, cur] / temperature)
    kl = temperature**2 * (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return (1 - alpha) * ce + alpha * kl


def ref_linear(x, layer):
    return x @ layer.weight.T + layer.bias


def ref_layer_norm(x, norm):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_mse(a, b):
    return ((a - b) ** 2).sum() / a.numel()


def ref_abf(abf, f, residual):
    """One ABF step as the official ABF.forward lays it out: features (B, 1, N, D), the pair stacked on dim 1
    before the shared projz/normz, gate i read as z[:, i]."""
    f = f[:, None]
    x = ref_layer_norm(ref_linear(f, abf.proj1), abf.norm1)
    if residual is not None:
        projz, normz = abf.fuse  # the shared W_z and LN_z
        z = ref_layer_norm(ref_linear(torch.cat((x, residual), dim=1), projz), normz)
        x = ref_layer_norm(x * z[:, 0:1] + residual * z[:, 1:2], abf.norm2)
    return ref_linear(x, abf.proj2)[:, 0], x


def ref_review_features(abfs, student_feats, teacher_feats):
    """Deepest first; output i against teacher feature i; the mean of the n MSEs."""
    outputs, residual = [None] * len(abfs), None
    for i in reversed(range(len(abfs))):
        outputs[i], residual = ref_abf(abfs[i], student_feats[i], residual)
    return sum(ref_mse(o, t) for o, t in zip(outputs, teacher_feats)) / len(abfs)


def _randomise(module, seed):
    """Move LayerNorm gains/biases and linear weights off their initial values so a check cannot pass by them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _output(logits, taps):
    return ModelOutput(torch.zeros(len(logits), D_S), logits, torch.zeros(()), Attachment(), None, taps)


def _features(seed, blocks, dim, batch=4):
    g = torch.Generator().manual_seed(seed)
    return {b: torch.randn(batch, TOKENS, dim, generator=g) for b in blocks}


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, N_CLASSES, generator=g) * 2, torch.randn(4, N_CLASSES, generator=g) * 2


def _tiny_student(kd):
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig("demo-s", "random"))
    return ContinualModel(backbone, build_prompt_method("none", {}, 64, 64, 3, 6), N_CLASSES, kd)


# -- what they tap -------------------------------------------------------------------------------------------


def test_fitnets_taps_the_last_student_block_in_training_only_and_reads_the_teachers_last():
    method = _method("fitnets", _ctx(student_depth=4, teacher_depth=6))
    train = method.attachment(4, True, None)
    assert train.taps == frozenset({3}) and train.tokens is None and not train.prefixes
    assert method.attachment(4, False, None) == Attachment()
    assert method.teacher_taps == frozenset({5})
    assert not method.needs_teacher_at_eval


@pytest.mark.parametrize("blocks, student, teacher", [(None, {0, 1, 2, 3}, {2, 3, 4, 5}), (2, {2, 3}, {4, 5})])
def test_reviewkd_taps_the_last_n_blocks_of_each_in_training_only(blocks, student, teacher):
    method = _method("reviewkd", _ctx(student_depth=4, teacher_depth=6), **({} if blocks is None else {"blocks": blocks}))
    assert method.attachment(4, True, None).taps == frozenset(student)
    assert method.attachment(4, False, None) == Attachment()
    assert method.teacher_taps == frozenset(teacher)
    assert not method.needs_teacher_at_eval
    # one ABF per tapped block; every one fuses the deeper residual but the deepest
    assert len(method.abfs) == len(student)
    assert [abf.fuse is not None for abf in method.abfs] == [True] * (len(student) - 1) + [False]


# -- losses --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, temperature, weight", [(0.5, None, None), (0.3, 3.0, 0.7)])
def test_fitnets_loss_is_logit_kd_plus_weighted_mse_of_regressed_last_block(alpha, temperature, weight):
    torch.manual_seed(1)
    method = _method("fitnets", alpha=alpha, temperature=temperature, **({} if weight is None else {"feature_weight": weight}))
    _randomise(method.regressor, 2)
    logits, teacher_logits = _logits(3)
    student, teacher = _features(4, [3], D_S), _features(5, [4, 5], D_T)  # teacher block 4 must not be read
    expected = ref_logit_kd_loss(logits, teacher_logits, alpha, temperature or 2.0) + (weight or 0.1) * ref_mse(
        ref_linear(student[3], method.regressor), teacher[5]
    )
    got = method.loss(_output(logits, student), TeacherSignal(teacher_logits, taps=teacher), TARGETS, CLASSES)
    torch.testing.assert_close(got, expected)


def test_fitnets_regressor_learns_from_the_hint_and_prediction_is_the_main_head():
    method = _method("fitnets", alpha=0.5)
    logits, teacher_logits = _logits(6)
    logits.requires_grad_(True)
    student, teacher = _features(7, [3], D_S), _features(8, [5], D_T)
    method.loss(_output(logits, student), TeacherSignal(teacher_logits, taps=teacher), TARGETS, CLASSES).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.regressor.parameters())
    assert logits.grad.abs().sum() > 0
    out = _output(torch.randn(4, N_CLASSES), student)
    assert method.predict(out) is out.logits


@pytest.mark.parametrize("blocks", [None, 2, 1])
def test_reviewkd_loss_is_logit_kd_plus_weighted_mean_mse_of_the_abf_chain(blocks):
    torch.manual_seed(2)
    method = _method("reviewkd", _ctx(student_depth=4, teacher_depth=6), alpha=0.4, temperature=3.0,
                     feature_weight=0.6, **({} if blocks is None else {"blocks": blocks}))
    _randomise(method.abfs, 3)
    n = blocks or 4
    logits, teacher_logits = _logits(4)
    student, teacher = _features(5, range(4), D_S), _features(6, range(6), D_T)
    student_blocks, teacher_blocks = list(range(4 - n, 4)), list(range(6 - n, 6))
    for f in student.values():
        f.requires_grad_(True)
    feature = ref_review_features(method.abfs, [student[b] for b in student_blocks], [teacher[b] for b in teacher_blocks])
    expected = ref_logit_kd_loss(logits, teacher_logits, 0.4, 3.0) + 0.6 * feature
    got = method.loss(_output(logits, student), TeacherSignal(teacher_logits, taps=teacher), TARGETS, CLASSES)
    torch.testing.assert_close(got, expected)
    # gradients too: each output's error flows back through the residuals into the deeper blocks' ABFs
    inputs = list(method.abfs.parameters()) + [student[b] for b in student_blocks]
    for got_grad, want_grad in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got_grad, want_grad)
    if n > 1:  # the pairing matters: the teacher's first n blocks would give another value
        other = ref_review_features(method.abfs, [student[b] for b in student_blocks], [teacher[b] for b in range(n)])
        assert not torch.isclose(feature, other)


def test_reviewkd_every_abf_parameter_learns_and_prediction_is_the_main_head():
    method = _method("reviewkd", _ctx(student_depth=4, teacher_depth=6), blocks=3)
    logits, teacher_logits = _logits(7)
    student, teacher = _features(8, [1, 2, 3], D_S), _features(9, [3, 4, 5], D_T)
    for f in student.values():
        f.requires_grad_(True)
    method.loss(_output(logits, student), TeacherSignal(teacher_logits, taps=teacher), TARGETS, CLASSES).backward()
    for name, p in method.abfs.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(f.grad.abs().sum() > 0 for f in student.values())  # the features' gradient reaches the prompts
    out = _output(torch.randn(4, N_CLASSES), student)
    assert method.predict(out) is out.logits


# -- in a real student ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, blocks", [("fitnets", [5]), ("reviewkd", [3, 4, 5])])
def test_real_student_returns_the_tapped_blocks_all_tokens_in_training_and_none_in_evaluation(name, blocks):
    kd = _method(name, _ctx(student_depth=6, teacher_depth=6, student_dim=64, teacher_dim=128),
                 **({"blocks": 3} if name == "reviewkd" else {}))
    model = _tiny_student(kd)
    vit = model.backbone.vit
    images = torch.randn(2, 3, 32, 32)
    out = model(images, None, 0, train=True)
    assert sorted(out.taps) == blocks
    with torch.no_grad():  # block outputs before the final norm, [CLS] and every patch token
        x = vit._pos_embed(vit.patch_embed(images))
        for index, block in enumerate(vit.blocks):
            x = block(x)
            if index in blocks:
                torch.testing.assert_close(out.taps[index], x, rtol=1e-4, atol=1e-5)
    teacher = TeacherSignal(torch.randn(2, N_CLASSES), taps={b: torch.randn(2, 65, 128) for b in kd.teacher_taps})
    kd.loss(out, teacher, TARGETS[:2], CLASSES).backward()
    trained = kd.regressor if name == "fitnets" else kd.abfs
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    with torch.no_grad():
        evaluated = model(images, None, 0, train=False)
    assert evaluated.taps == {}
    torch.testing.assert_close(model.predict(evaluated), evaluated.logits)
