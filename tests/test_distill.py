"""Tests of cdl_core.distill: the prompt-mapping module, the KD losses, the KD-method registry and the
CDL-Prompt student (mapped prompts, two heads). Every expected value comes from a small reference written here."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdl_core.attach import Attachment, ModelOutput
from cdl_core.config import BackboneConfig, ConfigError, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.distill import KD_METHODS, KDContext, TaskClasses, TeacherSignal, build_kd_method
from cdl_core.distill.cdl_prompt import CDLPrompt
from cdl_core.distill.dkd import DecoupledKD
from cdl_core.distill.kd import LogitKD
from cdl_core.distill.losses import decoupled_kd, logit_kd
from cdl_core.distill.none import NoDistillation
from cdl_core.distill.prompt_mapping import PromptMapping, teacher_prompt_queries
from cdl_core.learner import ContinualRun
from cdl_core.model import ContinualModel
from cdl_core.prompts import build_prompt_method
from cdl_core.prompts.coda import CodaParams
from cdl_core.prompts.dualprompt import DualPromptParams
from cdl_core.prompts.l2p import L2PParams


# -- small references -------------------------------------------------------------------------------------



def map_prompts(mapping, prefixes):
    """The mapping applied to a teacher's prompts (what the student does with a teacher's output)."""
    return mapping(teacher_prompt_queries(prefixes, max(len(k) for k, _ in prefixes.values())))

def ref_softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def ref_kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with 0 * log 0 = 0."""
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(dim=1)


def ref_logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    kl = ref_kl_rows(ref_softmax(teacher / temperature), ref_softmax(student / temperature))
    return temperature**2 * kl.sum() / student.shape[0]


def ref_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = ref_softmax(logits)
    return -torch.log(p[torch.arange(len(targets)), targets]).mean()


def ref_dkd_terms(student, teacher, targets, temperature):
    """(mean TCKD, mean NCKD), without weights or T^2, written sample by sample."""
    tckd, nckd = [], []
    for s, t, y in zip(student, teacher, targets.tolist()):
        ps, pt = ref_softmax((s / temperature)[None])[0], ref_softmax((t / temperature)[None])[0]
        bs = torch.stack((ps[y], 1 - ps[y]))
        bt = torch.stack((pt[y], 1 - pt[y]))
        tckd.append((bt * torch.log(bt / bs)).sum())
        keep = [c for c in range(len(s)) if c != y]
        qs = ref_softmax((s[keep] / temperature)[None])[0]
        qt = ref_softmax((t[keep] / temperature)[None])[0]
        nckd.append((qt * torch.log(qt / qs)).sum())
    return torch.stack(tckd).mean(), torch.stack(nckd).mean()


def ref_mapping(prefixes, keys, attention, components, active):
    """CDL-Prompt mapping written out: q_t = token mean of [Pk; Pv] (detached), alpha_m = cos(q_t * A_m, K_m),
    P = sum over the first `active` components of alpha_m P_m, split into key / value halves."""
    out = {}
    for layer, (pk, pv) in prefixes.items():
        q = torch.cat((pk, pv), dim=1).detach().mean(dim=1)  # B x D_t
        k, a, p = keys[layer][:active], attention[layer][:active], components[layer][:active]
        batch, length = q.shape[0], p.shape[1]
        mapped = []
        for b in range(batch):
            total = torch.zeros(length, p.shape[2], dtype=p.dtype)
            for m in range(active):
                u = q[b] * a[m]
                alpha = (u * k[m]).sum() / (u.norm() * k[m].norm())
                total = total + alpha * p[m]
            mapped.append(total)
        mapped = torch.stack(mapped)
        out[layer] = (mapped[:, : length // 2], mapped[:, length // 2 :])
    return out


def _ctx(n_classes=6, n_tasks=3, prompt_params=None, layers=(0, 1), student_dim=8, teacher_dim=12, method="coda"):
    return KDContext(
        student_dim=student_dim, teacher_dim=teacher_dim, student_depth=6, teacher_depth=6, n_classes=n_classes,
        n_tasks=n_tasks, prompt_method=method, prompt_params=prompt_params or CodaParams(pool_size=12, length=4),
        teacher_prompt_layers=layers, make_head=lambda dim: nn.Linear(dim, n_classes),
    )


def _out(features: torch.Tensor, logits: torch.Tensor) -> ModelOutput:
    """A model output with these [CLS] features and head logits (no prompts, tokens or taps)."""
    return ModelOutput(features, logits, torch.zeros(()), Attachment(), None, {})


def _sig(teacher_logits: torch.Tensor | None) -> TeacherSignal | None:
    return None if teacher_logits is None else TeacherSignal(teacher_logits)


# -- prompt mapping --------------------------------------------------------------------------------------


def _mapping_inputs(batch=3, teacher_dim=6, requires_grad=True):
    g = torch.Generator().manual_seed(1)
    prefixes = {
        0: (torch.randn(batch, 2, teacher_dim, generator=g), torch.randn(batch, 3, teacher_dim, generator=g)),
        2: (torch.randn(batch, 4, teacher_dim, generator=g), torch.randn(batch, 4, teacher_dim, generator=g)),
    }
    for k, v in prefixes.values():
        k.requires_grad_(requires_grad)
        v.requires_grad_(requires_grad)
    return prefixes


def test_prompt_mapping_matches_reference_shapes_and_values():
    torch.manual_seed(0)
    layers, active, length, d_s = (0, 2), 3, 6, 5
    mapping = PromptMapping(layers, teacher_dim=6, student_dim=d_s, components=7, length=length, active=active)
    with torch.no_grad():  # perturb so the check does not rely on the orthonormal initialisation
        for store in (mapping.keys, mapping.attention, mapping.components):
            for p in store.values():
                p.add_(0.3 * torch.randn_like(p))
    prefixes = _mapping_inputs()
    out = map_prompts(mapping, prefixes)
    ref = ref_mapping(
        prefixes, {l: mapping.keys[str(l)] for l in layers}, {l: mapping.attention[str(l)] for l in layers},
        {l: mapping.components[str(l)] for l in layers}, active,
    )
    assert set(out) == set(layers)
    for layer in layers:
        key, value = out[layer]
        assert key.shape == value.shape == (3, length // 2, d_s)
        torch.testing.assert_close(key, ref[layer][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(value, ref[layer][1], rtol=1e-5, atol=1e-6)


def test_prompt_mapping_gradients_match_reference_and_teacher_prefix_gets_none():
    torch.manual_seed(0)
    layers, active = (0, 2), 3
    mapping = PromptMapping(layers, teacher_dim=6, student_dim=5, components=7, length=6, active=active)
    ref_params = {
        name: {l: store[str(l)].detach().clone().requires_grad_(True) for l in layers}
        for name, store in (("keys", mapping.keys), ("attention", mapping.attention), ("components", mapping.components))
    }
    prefixes = _mapping_inputs()
    weights = {l: (torch.randn(3, 3, 5), torch.randn(3, 3, 5)) for l in layers}

    def weighted(out):
        return sum((out[l][0] * weights[l][0]).sum() + (out[l][1] * weights[l][1]).sum() for l in layers)

    weighted(map_prompts(mapping, prefixes)).backward()
    weighted(ref_mapping(prefixes, ref_params["keys"], ref_params["attention"], ref_params["components"], active)).backward()
    for name, store in (("keys", mapping.keys), ("attention", mapping.attention), ("components", mapping.components)):
        for l in layers:
            got, want = store[str(l)].grad, ref_params[name][l].grad
            assert got is not None, f"{name}[{l}] got no gradient"
            assert want[:active].abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            assert torch.count_nonzero(got[active:]) == 0  # inactive components take no part
    for key, value in prefixes.values():
        assert key.grad is None and value.grad is None  # q_t is detached from the teacher's prompts


def test_prompt_mapping_initialises_active_components_orthonormal():
    torch.manual_seed(0)
    mapping = PromptMapping((0,), teacher_dim=16, student_dim=4, components=10, length=4, active=5)
    for store in (mapping.keys, mapping.attention, mapping.components):
        rows = store["0"][:5].detach().reshape(5, -1)
        torch.testing.assert_close(rows @ rows.T, torch.eye(5), atol=1e-5, rtol=0)
        rest = store["0"][5:]  # untouched uniform init in [0, 1)
        assert rest.min() >= 0 and rest.max() < 1


def test_prompt_mapping_rejects_active_outside_components():
    with pytest.raises(ValueError, match="active components"):
        PromptMapping((0,), 4, 4, components=3, length=2, active=4)


# -- KD losses -------------------------------------------------------------------------------------------


def test_logit_kd_is_t_squared_kl_teacher_to_student_batchmean():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 5, generator=g) * 2, torch.randn(4, 5, generator=g) * 2
    for temperature in (1.0, 2.0):
        torch.testing.assert_close(logit_kd(s, t, temperature), ref_logit_kd(s, t, temperature))
    # the T^2 factor: at T=2 the value is 4x the plain KL of the softened distributions
    plain_kl_t2 = ref_kl_rows(ref_softmax(t / 2), ref_softmax(s / 2)).mean()
    torch.testing.assert_close(logit_kd(s, t, 2.0), 4 * plain_kl_t2)
    # direction: KL(teacher || student), not the reverse
    reverse = ref_kl_rows(ref_softmax(s / 2), ref_softmax(t / 2)).mean() * 4
    assert not torch.isclose(logit_kd(s, t, 2.0), reverse)
    # batchmean: the value of a batch is the mean of per-sample values, not the sum over elements
    per_sample = torch.stack([logit_kd(s[i : i + 1], t[i : i + 1], 2.0) for i in range(4)])
    torch.testing.assert_close(logit_kd(s, t, 2.0), per_sample.mean())


def test_decoupled_kd_matches_hand_tckd_and_nckd_with_weights_and_t_squared():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 4, generator=g) * 2, torch.randn(5, 4, generator=g) * 2
    y = torch.tensor([0, 3, 1, 2, 3])
    for temperature in (1.0, 3.0):
        tckd, nckd = ref_dkd_terms(s, t, y, temperature)
        torch.testing.assert_close(decoupled_kd(s, t, y, 1.0, 0.0, temperature), temperature**2 * tckd)
        torch.testing.assert_close(decoupled_kd(s, t, y, 0.0, 1.0, temperature), temperature**2 * nckd)
        torch.testing.assert_close(
            decoupled_kd(s, t, y, 1.5, 4.0, temperature), temperature**2 * (1.5 * tckd + 4.0 * nckd)
        )


def test_decoupled_kd_gradient_is_finite():
    s = torch.randn(3, 4, requires_grad=True)
    decoupled_kd(s, torch.randn(3, 4), torch.tensor([0, 1, 3]), 1.0, 4.0, 2.0).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


CLASSES = TaskClasses(past=2, seen=4)  # 6 classes: 0-1 past, 2-3 current, 4-5 future


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, generator=g) * 2, torch.randn(4, 6, generator=g) * 2


def _perturb_outside_current(x, seed):
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    x[:, :2] += 5 * torch.randn(len(x), 2, generator=g)
    x[:, 4:] += 5 * torch.randn(len(x), 2, generator=g)
    return x


TARGETS = torch.tensor([2, 3, 3, 2])


def test_logit_kd_method_loss_is_ce_plus_kd_over_current_classes_only():
    alpha, temperature = 0.3, 2.0
    method = build_kd_method(DistillConfig("kd", alpha=alpha, temperature=temperature), _ctx())
    s, t = _logits(5)
    feats = torch.randn(4, 8)
    cur = slice(2, 4)
    expected = (1 - alpha) * ref_ce(s[:, cur], TARGETS - 2) + alpha * ref_logit_kd(s[:, cur], t[:, cur], temperature)
    torch.testing.assert_close(method.loss(_out(feats, s), _sig(t), TARGETS, CLASSES), expected)
    # past/future logits of student or teacher do not enter at all
    same = method.loss(_out(feats, _perturb_outside_current(s, 1)), _sig(_perturb_outside_current(t, 2)), TARGETS, CLASSES)
    torch.testing.assert_close(same, expected)
    # ... while the teacher's current-class logits do (alpha = 1 isolates the KD term)
    pure_kd = build_kd_method(DistillConfig("kd", alpha=1.0, temperature=temperature), _ctx())
    t2 = t.clone()
    t2[:, 2] += 3.0
    assert not torch.isclose(pure_kd.loss(_out(feats, s), _sig(t), TARGETS, CLASSES), pure_kd.loss(_out(feats, s), _sig(t2), TARGETS, CLASSES))
    torch.testing.assert_close(pure_kd.loss(_out(feats, s), _sig(t), TARGETS, CLASSES), ref_logit_kd(s[:, cur], t[:, cur], temperature))


def test_cdl_prompt_loss_is_ce_on_last_plus_kd_on_kd_head_over_current_classes():
    torch.manual_seed(0)
    alpha, temperature = 0.4, 3.0
    method = build_kd_method(DistillConfig("cdl_prompt", alpha=alpha, temperature=temperature), _ctx())
    s, t = _logits(6)
    feats = torch.randn(4, 8)
    w, b = method.kd_head.weight.detach(), method.kd_head.bias.detach()
    kd_logits = feats @ w.T + b
    cur = slice(2, 4)
    expected = (1 - alpha) * ref_ce(s[:, cur], TARGETS - 2) + alpha * ref_logit_kd(kd_logits[:, cur], t[:, cur], temperature)
    torch.testing.assert_close(method.loss(_out(feats, s), _sig(t), TARGETS, CLASSES), expected)
    # past/future logits of `last` and teacher, and the kd head's past/future rows, do not matter
    with torch.no_grad():
        method.kd_head.weight[:2] += 3.0
        method.kd_head.bias[4:] -= 2.0
    same = method.loss(_out(feats, _perturb_outside_current(s, 1)), _sig(_perturb_outside_current(t, 2)), TARGETS, CLASSES)
    torch.testing.assert_close(same, expected)


def test_dkd_method_loss_uses_current_classes_targets_and_weights():
    alpha, temperature = 0.6, 2.0
    cfg = DistillConfig("dkd", alpha=alpha, temperature=temperature, params={"target_weight": 2.0, "non_target_weight": 0.5})
    method = build_kd_method(cfg, _ctx())
    s, t = _logits(7)
    feats = torch.randn(4, 8)
    cur = slice(2, 4)
    tckd, nckd = ref_dkd_terms(s[:, cur], t[:, cur], TARGETS - 2, temperature)
    expected = (1 - alpha) * ref_ce(s[:, cur], TARGETS - 2) + alpha * temperature**2 * (2.0 * tckd + 0.5 * nckd)
    torch.testing.assert_close(method.loss(_out(feats, s), _sig(t), TARGETS, CLASSES), expected)
    same = method.loss(_out(feats, _perturb_outside_current(s, 3)), _sig(_perturb_outside_current(t, 4)), TARGETS, CLASSES)
    torch.testing.assert_close(same, expected)


def test_dkd_default_weights_are_official_one_and_four():
    method = build_kd_method(DistillConfig("dkd", alpha=1.0, temperature=2.0), _ctx())
    s, t = _logits(8)
    cur = slice(2, 4)
    tckd, nckd = ref_dkd_terms(s[:, cur], t[:, cur], TARGETS - 2, 2.0)
    torch.testing.assert_close(method.loss(_out(torch.zeros(4, 8), s), _sig(t), TARGETS, CLASSES), 4.0 * (1.0 * tckd + 4.0 * nckd))


def test_none_method_loss_is_current_task_ce():
    method = build_kd_method(DistillConfig("none"), _ctx())
    s, _ = _logits(9)
    torch.testing.assert_close(method.loss(_out(torch.zeros(4, 8), s), _sig(None), TARGETS, CLASSES), ref_ce(s[:, 2:4], TARGETS - 2))


# -- registry / config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls", [("none", NoDistillation), ("kd", LogitKD), ("dkd", DecoupledKD), ("cdl_prompt", CDLPrompt)]
)
def test_one_config_field_selects_each_baseline(name, cls):
    cfg = RunConfig(teacher=BackboneConfig("demo-t", "random"), student=BackboneConfig("demo-s", "random"),
                    data=DataConfig(name="synthetic"), distill=DistillConfig(method=name))
    assert cfg.validate() is cfg
    assert type(build_kd_method(cfg.distill, _ctx())) is cls
    assert RunConfig.from_dict(cfg.to_dict()).distill.method == name


def test_registry_holds_exactly_the_eight_methods():
    assert set(KD_METHODS) == {"none", "kd", "dkd", "fitnets", "reviewkd", "deit", "dcdl", "cdl_prompt"}


def test_unknown_distill_method_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        DistillConfig(method="fitnet").validate()
    for name in ("none", "kd", "dkd", "cdl_prompt", "fitnets", "reviewkd", "deit", "dcdl"):
        assert name in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_kd_method(DistillConfig(method="fitnet"), _ctx())
    for name in ("none", "kd", "dkd", "cdl_prompt", "fitnets"):
        assert name in str(err.value)
    raw = RunConfig(data=DataConfig(name="synthetic")).to_dict()
    raw["distill"]["method"] = "fitnet"
    with pytest.raises(ConfigError, match="cdl_prompt"):
        RunConfig.from_dict(raw)


@pytest.mark.parametrize(
    "method, bad, valid",
    [("dkd", "temperature", "non_target_weight, target_weight"), ("cdl_prompt", "lenght", "active_components"), ("kd", "beta", "none")],
)
def test_unknown_distill_params_rejected_with_valid_list(method, bad, valid):
    with pytest.raises(ConfigError) as err:
        DistillConfig(method=method, params={bad: 1}).validate()
    assert bad in str(err.value) and valid in str(err.value)


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("cdl_prompt", {"length": 5}, "even"),
        ("cdl_prompt", {"active_components": 0}, "at least 1"),
        ("dkd", {"target_weight": -1.0}, "must not be negative"),
    ],
)
def test_bad_distill_param_values_rejected(method, params, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(method=method, params=params).validate()


def test_dkd_params_reach_the_method():
    method = build_kd_method(DistillConfig("dkd", params={"target_weight": 2.5}), _ctx())
    assert (method.params.target_weight, method.params.non_target_weight) == (2.5, 4.0)


# -- CDL-Prompt student ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, components, length",
    [(CodaParams(), 100, 8), (L2PParams(), 30, 20), (DualPromptParams(), 10, 20)],
)
def test_cdl_prompt_mapping_defaults_to_prompt_method_size(params, components, length):
    method = build_kd_method(DistillConfig("cdl_prompt"), _ctx(n_tasks=5, prompt_params=params, teacher_dim=32))
    assert method.resolved == {"components": components, "length": length, "active_components": components // 5}
    assert method.mapping.components["0"].shape == (components, length, 8)
    assert method.mapping.keys["0"].shape == method.mapping.attention["0"].shape == (components, 32)
    assert method.kd_head.in_features == 8 and method.kd_head.out_features == 6


def test_cdl_prompt_active_components_default_and_override_decide_which_components_are_used():
    torch.manual_seed(0)
    ctx = _ctx(n_tasks=4, prompt_params=CodaParams(pool_size=20, length=4), layers=(0,))
    default = build_kd_method(DistillConfig("cdl_prompt"), ctx)
    assert default.mapping.active == 5  # M // n_tasks
    prefixes = {0: (torch.randn(2, 2, 12), torch.randn(2, 2, 12))}
    before = map_prompts(default.mapping, prefixes)[0][0].detach().clone()
    with torch.no_grad():
        default.mapping.components["0"][5:] += 10.0  # beyond the active ones: no effect
    torch.testing.assert_close(map_prompts(default.mapping, prefixes)[0][0], before)
    with torch.no_grad():
        default.mapping.components["0"][4] += 10.0  # the last active one: changes the prompt
    assert not torch.allclose(map_prompts(default.mapping, prefixes)[0][0], before)

    custom = build_kd_method(DistillConfig("cdl_prompt", params={"active_components": 7, "components": 9, "length": 6}), ctx)
    assert custom.resolved == {"components": 9, "length": 6, "active_components": 7}
    assert custom.mapping.active == 7
    assert map_prompts(custom.mapping, prefixes)[0][0].shape == (2, 3, 8)
    with pytest.raises(ConfigError, match="exceeds"):
        build_kd_method(DistillConfig("cdl_prompt", params={"active_components": 30}), ctx)


def test_cdl_prompt_prediction_is_mean_of_last_and_kd_last():
    torch.manual_seed(0)
    method = build_kd_method(DistillConfig("cdl_prompt"), _ctx())
    feats, logits = torch.randn(3, 8), torch.randn(3, 6)
    kd_last = feats @ method.kd_head.weight.detach().T + method.kd_head.bias.detach()
    torch.testing.assert_close(method.predict(_out(feats, logits)), (logits + kd_last) / 2)
    # the logit baselines predict with their single head
    for name in ("kd", "dkd", "none"):
        torch.testing.assert_close(build_kd_method(DistillConfig(name), _ctx()).predict(_out(feats, logits)), logits)


def _run_cfg(method="coda", kd="cdl_prompt"):
    return RunConfig(
        data=DataConfig(name="synthetic", n_tasks=2, train_per_class=2, test_per_class=1, val_fraction=0.0),
        student=BackboneConfig("demo-s", "random"), teacher=BackboneConfig("demo-t", "random"),
        prompt=PromptConfig(method), distill=DistillConfig(kd),
        train=TrainConfig(batch_size=10, eval_batch_size=16, device="cpu"),
    )


# own key tokens per layer (from the methods' official defaults) and L_m/2
OWN_TOKENS = {
    "coda": {l: 4 for l in range(5)},
    "l2p": {0: 5 * 10},
    "dualprompt": {0: 3, 1: 3, 2: 10, 3: 10, 4: 10},
}
MAPPED_TOKENS = {"coda": 4, "l2p": 10, "dualprompt": 10}


@pytest.mark.parametrize("method", ["coda", "l2p", "dualprompt"])
def test_student_prepends_mapped_prompts_at_every_teacher_prompt_layer(method, monkeypatch):
    run = ContinualRun(_run_cfg(method))
    for model in (run.teacher, run.student):
        model.prompt.begin_task(0)
        model.eval()
    images, _ = next(iter(DataLoader(run.stream.tasks[0].test, batch_size=4)))
    captured = {}
    forward = run.student.backbone.forward

    def spy(imgs, attachment=None):
        captured.update(attachment.prefixes if attachment else {})
        return forward(imgs, attachment)

    monkeypatch.setattr(run.student.backbone, "forward", spy)
    with torch.no_grad():
        student_q, teacher_q = run.frozen.queries(images)
        teacher_out = run.teacher(images, teacher_q, 0, train=False)
        teacher_prefixes = teacher_out.prompts.prefixes
        signal = TeacherSignal(teacher_out.logits, teacher_prompt_queries(teacher_prefixes, 4))
        out = run.student(images, student_q, 0, train=False, teacher=signal)
        own = run.student.prompt(student_q, 0, False).prefixes
        mapped = map_prompts(run.student.kd.mapping, teacher_prefixes)
    d_s = run.student_backbone.embed_dim
    assert set(captured) == set(OWN_TOKENS[method]) == set(run.teacher.prompt.layers)
    for layer, n_own in OWN_TOKENS[method].items():
        n = n_own + MAPPED_TOKENS[method]
        for part in (0, 1):  # keys, values
            tokens = captured[layer][part]
            assert tokens.shape == (4, n, d_s)
            torch.testing.assert_close(tokens[:, :n_own], own[layer][part].expand(4, -1, -1))
            torch.testing.assert_close(tokens[:, n_own:], mapped[layer][part])
    # prediction of the student model = mean of its two heads
    kd_last = out.features @ run.student.kd.kd_head.weight.T + run.student.kd.kd_head.bias
    torch.testing.assert_close(run.student.predict(out), (out.logits + kd_last) / 2)


def test_student_takes_mapped_prompts_at_teacher_layers_it_has_no_prompt_of_its_own():
    torch.manual_seed(0)
    from cdl_core.backbones import create_backbone

    backbone = create_backbone(BackboneConfig("demo-s", "random"))
    prompt = build_prompt_method("l2p", {"layers": [0], "pool_size": 4, "top_k": 1, "length": 2}, 64, 64, 2, 6)
    kd = build_kd_method(DistillConfig("cdl_prompt"), _ctx(layers=(0, 3), student_dim=64, teacher_dim=16,
                                                             prompt_params=prompt.params, n_tasks=2))
    model = ContinualModel(backbone, prompt, 6, kd)
    captured = {}
    forward = backbone.forward
    backbone.forward = lambda imgs, attachment=None: captured.update(attachment.prefixes if attachment else {}) or forward(imgs, attachment)
    images = torch.randn(2, 3, 32, 32)
    teacher_prefixes = {l: (torch.randn(2, 1, 16), torch.randn(2, 1, 16)) for l in (0, 3)}
    model(images, backbone.query(images), 0, train=False, teacher=TeacherSignal(torch.zeros(2, 6), teacher_prompt_queries(teacher_prefixes, 2)))
    assert set(captured) == {0, 3}
    assert captured[0][0].shape == (2, 1 + 1, 64)  # own 1 key token + mapped L_m/2 = 1 (L_m = 2)
    torch.testing.assert_close(captured[3][0], map_prompts(kd.mapping, teacher_prefixes)[3][0])


def test_student_accuracy_uses_teacher_prompts_and_the_mean_of_both_heads(monkeypatch):
    run = ContinualRun(_run_cfg("coda"))
    for model in (run.teacher, run.student):
        model.prompt.begin_task(0)
        model.eval()
    # heads that disagree: `last` alone picks class 0, `kd_last` alone picks class 2, their mean picks class 1
    with torch.no_grad():
        for head in (run.student.head, run.student.kd.kd_head):
            head.weight.zero_()
            head.bias.zero_()
        run.student.head.bias[:2] = torch.tensor([3.0, 2.5])
        run.student.kd.kd_head.bias[1:3] = torch.tensor([2.5, 3.0])
    calls = []
    mapping_forward = run.student.kd.mapping.forward

    def spy(prompt_queries):
        calls.append(sorted(prompt_queries))
        return mapping_forward(prompt_queries)

    monkeypatch.setattr(run.student.kd.mapping, "forward", spy)
    images = torch.stack([run.stream.tasks[0].test[i][0] for i in range(4)])
    for label, expected in ((1, 100.0), (0, 0.0), (2, 0.0)):
        dataset = TensorDataset(images, torch.full((4,), label))
        assert run.accuracy("student", dataset, 0) == expected
    assert calls and all(layers == list(run.teacher.prompt.layers) for layers in calls)
