"""Prompt methods (cdl_core.prompts): placement, token counts, selection, key losses and CODA's component rules.

Expected values are computed here from DESIGN.md section 2 with explicit loops, not with the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

from cdl_core.backbones import create_backbone
from cdl_core.config import BackboneConfig, ConfigError
from cdl_core.distill.base import TaskClasses
from cdl_core.distill.losses import current_task_cross_entropy
from cdl_core.model import ContinualModel
from cdl_core.prompts import PROMPT_METHODS, build_prompt_method

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")

EMBED, KEY_DIM, DEPTH = 16, 12, 6  # key_dim != embed_dim, so mixing them up fails


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


def scalar(t: torch.Tensor) -> float:
    return float(t.detach())


def build(method: str, params: dict | None = None, n_tasks: int = 10, embed: int = EMBED, key_dim: int = KEY_DIM):
    return build_prompt_method(method, params or {}, embed, key_dim, n_tasks, DEPTH)


def test_registry_holds_the_four_methods():
    assert set(PROMPT_METHODS) == {"l2p", "dualprompt", "coda", "apt", "none"}


# -- placement and token counts with the official defaults ---------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_l2p_prefixes_layer_0_only_with_top_k_times_half_length_tokens(train):
    torch.manual_seed(0)
    method = build("l2p")  # pool 30, length 20, top-k 5, layer 0
    method.begin_task(0)
    out = method(torch.randn(3, KEY_DIM), 0, train)
    assert set(out.prefixes) == {0}
    key, value = out.prefixes[0]
    assert key.shape == value.shape == (3, 5 * 20 // 2, EMBED)


@pytest.mark.parametrize("train", [True, False])
def test_dualprompt_g_prompt_at_layers_0_1_and_e_prompt_at_layers_2_to_4(train):
    torch.manual_seed(0)
    method = build("dualprompt")  # E: pool 10, length 20, layers 2-4; G: length 6, layers 0-1
    method.begin_task(0)
    out = method(torch.randn(3, KEY_DIM), 0, train)
    assert set(out.prefixes) == {0, 1, 2, 3, 4}
    for layer in (0, 1):
        key, value = out.prefixes[layer]
        assert key.shape == value.shape == (3, 6 // 2, EMBED)
    for layer in (2, 3, 4):
        key, value = out.prefixes[layer]
        assert key.shape == value.shape == (3, 20 // 2, EMBED)


@pytest.mark.parametrize("train", [True, False])
def test_coda_prefixes_layers_0_to_4_with_half_length_tokens(train):
    torch.manual_seed(0)
    method = build("coda")  # 100 components, length 8, layers 0-4
    method.begin_task(0)
    out = method(torch.randn(3, KEY_DIM), 0, train)
    assert set(out.prefixes) == {0, 1, 2, 3, 4}
    for key, value in out.prefixes.values():
        assert key.shape == value.shape == (3, 8 // 2, EMBED)


def test_none_gives_no_prefixes_and_zero_loss():
    method = build("none")
    method.begin_task(0)
    out = method(torch.randn(3, KEY_DIM), 0, True)
    assert out.prefixes == {} and method.layers == ()
    assert scalar(out.loss) == 0.0


def test_prompt_layers_outside_the_backbone_are_rejected():
    with pytest.raises(ConfigError, match="do not exist"):
        build("l2p", {"layers": [DEPTH]})


# -- L2P: top-k by cosine, key loss --------------------------------------------------------------------------
def _l2p_case():
    torch.manual_seed(1)
    pool, length, top_k = 6, 4, 2
    method = build("l2p", {"pool_size": pool, "length": length, "top_k": top_k})
    with torch.no_grad():  # keys of very different norms: the dot-product ranking differs from the cosine one
        scales = torch.tensor([1.0, 30.0, 0.1, 5.0, 200.0, 0.5]).unsqueeze(1)
        method.keys["0"].copy_(torch.randn(pool, KEY_DIM) * scales)
    query = torch.randn(5, KEY_DIM)
    return method, query, pool, length, top_k


def _expected_top(query, keys, top_k):
    chosen, cos_values = [], []
    for q in query:
        cos = [cosine(q, k) for k in keys]
        order = sorted(range(len(keys)), key=lambda i: -cos[i])[:top_k]
        chosen.append(order)
        cos_values.append([cos[i] for i in order])
    return chosen, cos_values


def test_l2p_selects_the_top_k_prompts_by_cosine_and_splits_them_into_key_and_value_halves():
    method, query, pool, length, top_k = _l2p_case()
    keys, prompts = method.keys["0"].detach(), method.prompts["0"].detach()
    chosen, _ = _expected_top(query, keys, top_k)
    by_dot = [sorted(range(pool), key=lambda i: -float(q @ keys[i]))[:top_k] for q in query]
    assert any(set(a) != set(b) for a, b in zip(chosen, by_dot)), "test needs a case where cosine != dot ranking"
    for train in (True, False):  # L2P selects the same way in training and evaluation
        key, value = method(query, 0, train).prefixes[0]
        half = length // 2
        for b in range(len(query)):
            key_chunks = key[b].reshape(top_k, half, EMBED)
            value_chunks = value[b].reshape(top_k, half, EMBED)
            found = []
            for kc, vc in zip(key_chunks, value_chunks):
                match = [i for i in range(pool) if torch.equal(kc, prompts[i, :half])]
                assert len(match) == 1
                assert torch.equal(vc, prompts[match[0], half:])  # value half of the same prompt
                found.append(match[0])
            assert sorted(found) == sorted(chosen[b])


def test_l2p_key_loss_is_sum_of_one_minus_cosine_over_batch_and_top_k_and_zero_in_eval():
    method, query, _, _, top_k = _l2p_case()
    _, cos_values = _expected_top(query, method.keys["0"].detach(), top_k)
    expected = sum(1.0 - c for row in cos_values for c in row)
    assert scalar(method(query, 0, True).loss) == pytest.approx(expected, rel=1e-5)
    assert scalar(method(query, 0, False).loss) == 0.0


# -- DualPrompt: task-id E-prompt in training, best key in evaluation ----------------------------------------
def test_dualprompt_training_uses_the_task_id_e_prompt_and_the_shared_g_prompt():
    torch.manual_seed(2)
    method = build("dualprompt")
    method.begin_task(3)
    out = method(torch.randn(4, KEY_DIM), 3, True)
    for layer in (2, 3, 4):
        e = method.e_prompts[str(layer)].detach()
        key, value = out.prefixes[layer]
        for b in range(4):
            assert torch.equal(key[b], e[3, :10]) and torch.equal(value[b], e[3, 10:])
    for layer in (0, 1):
        g = method.g_prompts[str(layer)].detach()
        key, value = out.prefixes[layer]
        for b in range(4):
            assert torch.equal(key[b], g[0, :3]) and torch.equal(value[b], g[0, 3:])


def test_dualprompt_evaluation_picks_the_e_prompt_with_the_best_key_per_sample_and_layer():
    torch.manual_seed(3)
    method = build("dualprompt")  # key_dim 12 >= pool 10: one-hot keys are possible
    targets = [7, 2, 9, 0, 4]
    with torch.no_grad():
        for offset, layer in enumerate((2, 3, 4)):
            # layer-specific permutation of one-hot keys, with arbitrary norms (cosine ignores them)
            perm = torch.roll(torch.arange(10), offset * 3)
            keys = torch.zeros(10, KEY_DIM)
            keys[torch.arange(10), perm] = torch.rand(10) * 10 + 0.1
            method.e_keys[str(layer)].copy_(keys)
    query = torch.zeros(len(targets), KEY_DIM)
    query[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
    query += 0.05 * torch.randn_like(query)
    method.begin_task(9)
    out = method(query, 5, False)  # the task id passed at evaluation must not matter
    assert scalar(out.loss) == 0.0
    bests = set()
    for layer in (2, 3, 4):
        keys, e = method.e_keys[str(layer)].detach(), method.e_prompts[str(layer)].detach()
        key, value = out.prefixes[layer]
        for b, q in enumerate(query):
            best = max(range(10), key=lambda i: cosine(q, keys[i]))
            bests.add(best)
            assert torch.equal(key[b], e[best, :10]) and torch.equal(value[b], e[best, 10:])
    assert len(bests) > 3  # the case really selects different prompts per sample


def test_dualprompt_key_loss_is_sum_over_batch_and_e_layers_of_one_minus_cos_to_the_task_key():
    torch.manual_seed(4)
    method = build("dualprompt")
    query = torch.randn(5, KEY_DIM)
    method.begin_task(6)
    expected = 0.0
    for layer in (2, 3, 4):
        k = method.e_keys[str(layer)].detach()[6]
        expected += sum(1.0 - cosine(q, k) for q in query)
    assert scalar(method(query, 6, True).loss) == pytest.approx(expected, rel=1e-5)
    assert scalar(method(query, 6, False).loss) == 0.0


def test_dualprompt_pool_smaller_than_the_number_of_tasks_is_rejected():
    with pytest.raises(ConfigError, match="pool_size=3 < 5 tasks"):
        build("dualprompt", {"pool_size": 3}, n_tasks=5)


# -- CODA-Prompt ---------------------------------------------------------------------------------------------
def _coda(n_tasks=3, pool=6, length=4, embed=8, key_dim=8, ortho_mu=0.0):
    params = {"pool_size": pool, "length": length, "layers": [0, 2], "ortho_mu": ortho_mu}
    return build("coda", params, n_tasks=n_tasks, embed=embed, key_dim=key_dim)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().flatten(1).double()


def test_coda_prompt_is_the_cosine_attention_weighted_sum_of_the_components_seen_so_far():
    torch.manual_seed(5)
    method = _coda(key_dim=5)
    method.begin_task(0)
    method.begin_task(1)  # components 0..3 are in use, 4..5 belong to task 2
    query = torch.randn(3, 5)
    out = method(query, 1, False)
    for layer in (0, 2):
        K, A, P = (store[str(layer)].detach() for store in (method.keys, method.attention, method.components))
        key, value = out.prefixes[layer]
        for b, q in enumerate(query):
            expected = sum(cosine(q * A[m], K[m]) * P[m] for m in range(4))
            assert torch.allclose(key[b], expected[:2], atol=1e-5)
            assert torch.allclose(value[b], expected[2:], atol=1e-5)


def test_coda_begin_task_makes_new_components_orthonormal_and_orthogonal_to_earlier_ones():
    torch.manual_seed(6)
    method = _coda(n_tasks=3, pool=6, length=4, embed=8, key_dim=8)  # 6 rows fit in 8 (keys) and 32 dims
    for t in range(3):
        method.begin_task(t)
        start, stop = 2 * t, 2 * t + 2
        for store in (method.keys, method.attention, method.components):
            for param in store.values():
                new, old = _flat(param[start:stop]), _flat(param[:start])
                assert torch.allclose(new @ new.T, torch.eye(2, dtype=torch.float64), atol=1e-5)
                if start:
                    assert torch.allclose(new @ old.T, torch.zeros(2, start, dtype=torch.float64), atol=1e-5)


def test_coda_new_components_stay_orthonormal_when_earlier_ones_do_not_all_fit():
    torch.manual_seed(7)
    method = _coda(n_tasks=3, pool=6, length=4, embed=8, key_dim=3)  # keys: 3 dims, 2 new per task
    for t in range(3):
        method.begin_task(t)
        for store in (method.keys, method.attention):
            new = _flat(store["0"][2 * t : 2 * t + 2])
            assert torch.allclose(new @ new.T, torch.eye(2, dtype=torch.float64), atol=1e-5)


def test_coda_begin_task_leaves_earlier_components_untouched():
    torch.manual_seed(8)
    method = _coda()
    method.begin_task(0)
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    method.begin_task(1)
    for name, p in method.named_parameters():
        assert torch.equal(p[:2], before[name][:2]), name
        assert not torch.equal(p[2:4], before[name][2:4]), name  # task 1's slot was re-initialised


def test_coda_future_components_do_not_affect_the_prompt_and_get_no_gradient():
    torch.manual_seed(9)
    method = _coda()
    method.begin_task(0)
    query = torch.randn(4, 8)
    out = method(query, 0, True)
    loss = sum(k.square().sum() + v.square().sum() for k, v in out.prefixes.values())
    loss.backward()
    for name, p in method.named_parameters():
        assert p.grad[2:].abs().max() == 0, name
        assert p.grad[:2].abs().max() > 0, name
    with torch.no_grad():
        for p in method.parameters():
            p[2:] = torch.randn_like(p[2:]) * 100
    again = method(query, 0, True)
    for layer in out.prefixes:
        assert torch.equal(again.prefixes[layer][0], out.prefixes[layer][0])


def _reference_ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(t.shape[0], -1)
    gram = flat @ flat.T
    n = flat.shape[0]
    total = sum((gram[i, j] - (1.0 if i == j else 0.0)) ** 2 for i in range(n) for j in range(n))
    return total / (n * n)  # the official code averages over the Gram matrix entries


def _coda_far_from_orthonormal(ortho_mu: float):
    torch.manual_seed(10)
    method = _coda(ortho_mu=ortho_mu)
    method.begin_task(0)
    method.begin_task(1)
    with torch.no_grad():  # scale the components so the penalty is clearly non-zero
        for p in method.parameters():
            p.mul_(3.0)
    return method


def test_coda_orthogonality_penalty_is_zero_when_mu_is_zero():
    method = _coda_far_from_orthonormal(0.0)
    assert scalar(method(torch.randn(4, 8), 1, True).loss) == 0.0


def test_coda_orthogonality_penalty_with_positive_mu_matches_the_official_formula_in_training_only():
    mu = 0.25
    method = _coda_far_from_orthonormal(mu)
    query = torch.randn(4, 8)
    expected = 0.0
    for layer in ("0", "2"):
        for store in (method.keys, method.attention, method.components):
            expected += mu * float(_reference_ortho_penalty(store[layer].detach()[:4]))  # tasks 0 and 1
    assert expected > 0.1
    assert scalar(method(query, 1, True).loss) == pytest.approx(expected, rel=1e-5)
    assert scalar(method(query, 1, False).loss) == 0.0


@pytest.mark.parametrize("ortho_mu", [0.0, 0.5])
def test_training_task_1_leaves_task_0_components_bit_identical(ortho_mu):
    """A few optimizer steps of a ContinualModel on task 1: task-0 components (and future ones) stay exact."""
    torch.manual_seed(11)
    backbone = create_backbone(BackboneConfig("demo-s", "random"))
    prompt = build_prompt_method(
        "coda", {"pool_size": 6, "length": 4, "layers": [0, 1], "ortho_mu": ortho_mu},
        backbone.embed_dim, backbone.embed_dim, 3, backbone.depth,
    )
    model = ContinualModel(backbone, prompt, n_classes=6)
    prompt.begin_task(0)
    prompt.begin_task(1)
    snapshot = {name: p.detach().clone() for name, p in prompt.named_parameters()}
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([2, 3, 2, 3])
    for _ in range(3):
        out = model(images, backbone.query(images), 1, train=True)
        loss = current_task_cross_entropy(out.logits, targets, TaskClasses(past=2, seen=4)) + out.prompt_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in prompt.named_parameters():
            assert p.grad[:2].abs().max() == 0 and p.grad[4:].abs().max() == 0, name
        optimizer.step()
    for name, p in prompt.named_parameters():
        assert torch.equal(p[:2], snapshot[name][:2]), f"{name}: task-0 components changed"
        assert torch.equal(p[4:], snapshot[name][4:]), f"{name}: future components changed"
        assert not torch.equal(p[2:4], snapshot[name][2:4]), f"{name}: task-1 components did not train"
    assert math.isfinite(float(loss.detach()))
