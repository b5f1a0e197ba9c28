"""Tests of the KD-token students `dcdl` (D-CDL: KD token + KD prefixes) and `deit` (one zero-initialised token):
what they attach, their loss and prediction, which parameters learn, and a hand-written ViT forward with the
token in the sequence. Every expected value comes from a small reference written here."""
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


def _ctx(student_dim=8, student_depth=6, n_classes=N_CLASSES):
    return KDContext(
        student_dim=student_dim, teacher_dim=12, student_depth=student_depth, teacher_depth=8, n_classes=n_classes,
        n_tasks=3, prompt_method="none", prompt_params=None, teacher_prompt_layers=(),
        make_head=lambda width: nn.Linear(width, n_classes),
    )


def _method(name, ctx=None, alpha=0.5, temperature=None, prediction=None, **params):
    cfg = DistillConfig(method=name, alpha=alpha, temperature=temperature, params=params, prediction=prediction)
    cfg.validate()
    return build_kd_method(cfg, ctx or _ctx())


# -- small references ----------------------------------------------------------------------------------------


def ref_log_softmax(x):
    shifted = x - x.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def ref_ce(logits, targets):
    return -ref_log_softmax(logits)[torch.arange(len(targets)), targets].mean()


def ref_kl_t(student, teacher, temperature):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch."""
    log_p, log_q = ref_log_softmax(teacher / temperature), ref_log_softmax(student / temperature)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def ref_linear(x, layer):
    return x @ layer.weight.T + layer.bias


def ref_attention(attn, x, extra_k=None, extra_v=None):
    """Multi-head attention written out; extra key/value tokens appended after the tokens' own (the official
    code's order for KD prefixes), explicit softmax over all keys."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    hd = dim // heads
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ w[i * dim : (i + 1) * dim].T + b[i * dim : (i + 1) * dim] for i in range(3))
    if extra_k is not None:
        k = torch.cat((k, extra_k.expand(batch, -1, -1)), dim=1)
        v = torch.cat((v, extra_v.expand(batch, -1, -1)), dim=1)
    out = []
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        scores = q[:, :, cols] @ k[:, :, cols].transpose(1, 2) * hd**-0.5
        weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        out.append(weights @ v[:, :, cols])
    return ref_linear(torch.cat(out, dim=2), attn.proj)


def ref_vit_with_kd_prompts(vit, images, token, prefixes):
    """The ViT forward from timm's parts, the KD token appended at the END of the sequence (as the official code
    does) and each layer's (key, value) prefix appended to its keys/values. Returns ([CLS], KD token) after the
    final norm."""
    patches = vit.patch_embed(images)
    x = torch.cat((vit.cls_token.expand(len(images), -1, -1), patches), dim=1) + vit.pos_embed
    x = torch.cat((x, token.expand(len(images), -1, -1)), dim=1)  # no position embedding on it
    for index, block in enumerate(vit.blocks):
        x = x + ref_attention(block.attn, block.norm1(x), *prefixes.get(index, (None, None)))
        x = x + block.mlp(block.norm2(x))
    x = vit.norm(x)
    return x[:, 0], x[:, -1]


def _output(logits, tokens):
    return ModelOutput(tokens[:, 0], logits, torch.zeros(()), Attachment(), tokens, {})


def _outputs(seed, batch=4, dim=8):
    g = torch.Generator().manual_seed(seed)
    logits, teacher = torch.randn(batch, N_CLASSES, generator=g) * 2, torch.randn(batch, N_CLASSES, generator=g) * 2
    return logits, torch.randn(batch, 1, dim, generator=g), teacher


def _outside_current(x, seed):
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    x[:, :2] += 5 * torch.randn(len(x), 2, generator=g)
    x[:, 4:] += 5 * torch.randn(len(x), 2, generator=g)
    return x


def _tiny_student(kd):
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig("demo-s", "random"))
    return ContinualModel(backbone, build_prompt_method("none", {}, 64, 64, 3, 6), N_CLASSES, kd)


def _demo_ctx():
    return _ctx(student_dim=64, student_depth=6)


# -- what they attach ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, depth, prefixed", [(12, 6, [1, 2, 3, 4, 5]), (3, 6, [1, 2]), (1, 6, []), (4, 4, [1, 2, 3])])
def test_dcdl_attaches_one_kd_token_and_split_prefixes_at_layers_1_to_n_minus_1_capped_at_depth(layers, depth, prefixed):
    torch.manual_seed(0)
    method = _method("dcdl", _ctx(student_depth=depth), layers=layers, length=6)
    for train in (True, False):  # the same in evaluation: no teacher needed
        attachment = method.attachment(4, train, None)
        assert attachment.tokens.shape == (1, 1, 8)
        assert sorted(attachment.prefixes) == prefixed
        assert attachment.taps == frozenset() and not attachment.cls_kv
    assert not method.needs_teacher_at_eval and method.teacher_taps == frozenset()
    attachment = method.attachment(4, True, None)
    prompts = [p for name, p in method.named_parameters() if not name.startswith("kd_head.")]
    assert len(prompts) == 1 + len(prefixed)  # one token plus one 6-token prompt per prefixed layer
    assert all((p >= 0).all() and (p < 1).all() and p.std() > 0 for p in prompts)  # U[0, 1) init
    seen = set()
    for layer in prefixed:
        key, value = attachment.prefixes[layer]
        assert key.shape == value.shape == (1, 3, 8)
        # key and value are the first and second halves of one 6-token prompt of this layer alone
        whole = torch.cat((key, value), dim=1)
        owner = [i for i, p in enumerate(prompts) if p.shape == whole.shape and torch.equal(p, whole)]
        assert len(owner) == 1 and owner[0] not in seen
        seen.add(owner[0])
    assert sum(attachment.tokens is p for p in prompts) == 1  # the token is a prompt of its own, not a prefix's


def test_dcdl_prefix_length_param_sets_key_and_value_tokens():
    attachment = _method("dcdl", layers=2, length=4).attachment(2, True, None)
    assert [t.shape for t in attachment.prefixes[1]] == [(1, 2, 8), (1, 2, 8)]


def test_deit_attaches_one_zero_token_and_no_prefixes():
    method = _method("deit")
    for train in (True, False):
        attachment = method.attachment(4, train, None)
        assert attachment.tokens.shape == (1, 1, 8) and torch.count_nonzero(attachment.tokens) == 0
        assert not attachment.prefixes and not attachment.cls_kv and attachment.taps == frozenset()
    assert isinstance(method.token, nn.Parameter)
    assert not method.needs_teacher_at_eval and method.teacher_taps == frozenset()


# -- loss and prediction -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dcdl", "deit"])
@pytest.mark.parametrize("alpha, temperature", [(0.5, None), (0.3, 3.0)])
def test_loss_is_ce_on_cls_head_plus_kd_of_kd_token_head_over_current_classes(name, alpha, temperature):
    torch.manual_seed(1)
    method = _method(name, alpha=alpha, temperature=temperature)
    logits, tokens, teacher = _outputs(2)
    cur, t = slice(2, 4), temperature or 2.0  # None: the methods' default T = 2
    z_kd = ref_linear(tokens[:, 0], method.kd_head)
    expected = (1 - alpha) * ref_ce(logits[:, cur], TARGETS - 2) + alpha * ref_kl_t(z_kd[:, cur], teacher[:, cur], t)
    got = method.loss(_output(logits, tokens), TeacherSignal(teacher), TARGETS, CLASSES)
    torch.testing.assert_close(got, expected)
    # past and future logits of the main head and the teacher do not enter
    same = method.loss(_output(_outside_current(logits, 3), tokens), TeacherSignal(_outside_current(teacher, 4)), TARGETS, CLASSES)
    torch.testing.assert_close(same, expected)
    # the KD term reads the KD token's head, not the main head: at alpha = 1 the main logits do not matter
    pure = _method(name, alpha=1.0, temperature=temperature)
    pure.load_state_dict(method.state_dict())
    out = _output(logits, tokens)
    torch.testing.assert_close(pure.loss(out, TeacherSignal(teacher), TARGETS, CLASSES), ref_kl_t(z_kd[:, cur], teacher[:, cur], t))
    torch.testing.assert_close(
        pure.loss(_output(logits + torch.randn_like(logits), tokens), TeacherSignal(teacher), TARGETS, CLASSES),
        ref_kl_t(z_kd[:, cur], teacher[:, cur], t),
    )


@pytest.mark.parametrize("name", ["dcdl", "deit"])
def test_prediction_is_alpha_weighted_mix_of_heads_or_their_mean(name):
    torch.manual_seed(2)
    logits, tokens, _ = _outputs(5)
    weighted = _method(name, alpha=0.3, prediction="weighted")
    z_kd = ref_linear(tokens[:, 0], weighted.kd_head)
    torch.testing.assert_close(weighted.predict(_output(logits, tokens)), 0.7 * logits + 0.3 * z_kd)
    mean = _method(name, alpha=0.3, prediction="mean")
    mean.load_state_dict(weighted.state_dict())
    torch.testing.assert_close(mean.predict(_output(logits, tokens)), (logits + z_kd) / 2)
    assert _method(name, alpha=0.3).kd_share() == 0.3  # the official protocol's default: weighted


def test_kd_head_comes_from_the_contexts_head_factory():
    made = []

    def make_head(width):
        made.append(width)
        return nn.Linear(width, N_CLASSES)

    ctx = KDContext(8, 12, 6, 8, N_CLASSES, 3, "none", None, (), make_head)
    for name in ("dcdl", "deit"):
        assert isinstance(_method(name, ctx).kd_head, nn.Linear)
    assert made == [8, 8]


# -- in a real student ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dcdl", "deit"])
def test_training_step_gives_gradients_to_kd_prompts_and_both_heads_not_the_backbone(name):
    kd = _method(name, _demo_ctx(), **({"layers": 4} if name == "dcdl" else {}))
    model = _tiny_student(kd)
    images = torch.randn(4, 3, 32, 32)
    out = model(images, None, 0, train=True)
    assert out.tokens.shape == (4, 1, 64)
    kd.loss(out, TeacherSignal(torch.randn(4, N_CLASSES)), TARGETS, CLASSES).backward()
    prompts = [kd.token] + (list(kd.prefixes) if name == "dcdl" else [])
    assert len(prompts) == (4 if name == "dcdl" else 1)
    for p in prompts + list(kd.kd_head.parameters()) + list(model.head.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    assert {id(p) for p in kd.parameters()} <= {id(p) for p in model.trainable_parameters()}


def test_dcdl_kd_token_output_equals_hand_written_vit_forward_with_token_and_prefixes():
    kd = _method("dcdl", _demo_ctx(), layers=4, length=6)
    model = _tiny_student(kd)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for train in (True, False):
            out = model(images, None, 0, train=train)
            prefixes = {layer + 1: (p[:, :3], p[:, 3:]) for layer, p in enumerate(kd.prefixes)}
            cls, token = ref_vit_with_kd_prompts(model.backbone.vit, images, kd.token, prefixes)
            torch.testing.assert_close(out.tokens[:, 0], token, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.features, cls, rtol=1e-4, atol=1e-5)
        # the reference itself is sensitive to which layers get prefixes: dropping one changes the KD token
        _, shifted = ref_vit_with_kd_prompts(model.backbone.vit, images, kd.token, {k: v for k, v in prefixes.items() if k != 3})
        assert not torch.allclose(out.tokens[:, 0], shifted, atol=1e-3)


def test_deit_kd_token_output_equals_hand_written_vit_forward_with_token():
    kd = _method("deit", _demo_ctx())
    model = _tiny_student(kd)
    with torch.no_grad():
        kd.token.normal_()
        images = torch.randn(2, 3, 32, 32)
        out = model(images, None, 0, train=False)
        cls, token = ref_vit_with_kd_prompts(model.backbone.vit, images, kd.token, {})
    torch.testing.assert_close(out.tokens[:, 0], token, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.features, cls, rtol=1e-4, atol=1e-5)


def test_dcdl_kd_prompts_reach_cls_through_attention_and_prediction_uses_the_kd_token():
    kd = _method("dcdl", _demo_ctx(), alpha=0.3, layers=3, prediction="weighted")
    model = _tiny_student(kd)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images, None, 0, train=False)
        torch.testing.assert_close(model.predict(before), 0.7 * before.logits + 0.3 * ref_linear(before.tokens[:, 0], kd.kd_head))
        kd.token.add_(torch.randn_like(kd.token))
        after_token = model(images, None, 0, train=False)
        kd.prefixes[1].add_(torch.randn_like(kd.prefixes[1]))  # layer 2's prefix
        after_prefix = model(images, None, 0, train=False)
    assert not torch.allclose(before.features, after_token.features, atol=1e-4)
    assert not torch.allclose(before.tokens, after_token.tokens, atol=1e-4)
    assert not torch.allclose(after_token.features, after_prefix.features, atol=1e-4)
