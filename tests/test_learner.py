"""The continual learner (cdl_core.learner / cdl_core.model): masked cross-entropy, frozen backbone, determinism,
and tiny end-to-end runs on the synthetic stream with random backbones."""
from __future__ import annotations

import math

import pytest
import torch

from cdl_core import metrics
from cdl_core.distill.base import TaskClasses
from cdl_core.distill.losses import current_task_cross_entropy
from cdl_core.learner import ContinualRun

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")

PROMPTED = ["l2p", "dualprompt", "coda"]
SMALL_PARAMS = {"l2p": {"pool_size": 10, "top_k": 3}, "dualprompt": {}, "coda": {"pool_size": 10}}


# -- past-task masking -----------------------------------------------------------------------------------------
def reference_masked_ce(logits: torch.Tensor, targets: torch.Tensor, past: int, seen: int) -> torch.Tensor:
    """DESIGN: past-task logits set to -inf, future classes absent, then cross-entropy (batch mean)."""
    masked = logits[:, :seen].clone()
    masked[:, :past] = -math.inf
    losses = [torch.logsumexp(row, dim=0) - row[t] for row, t in zip(masked, targets)]
    return torch.stack(losses).mean()


def test_current_task_cross_entropy_masks_past_logits_and_drops_future_ones():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, requires_grad=True)
    targets = torch.tensor([4, 5, 6, 4, 6, 5])
    classes = TaskClasses(past=4, seen=7)
    loss = current_task_cross_entropy(logits, targets, classes)
    assert torch.allclose(loss, reference_masked_ce(logits.detach(), targets, 4, 7), atol=1e-6)
    loss.backward()
    assert logits.grad[:, :4].abs().max() == 0 and logits.grad[:, 7:].abs().max() == 0
    assert logits.grad[:, 4:7].abs().min() > 0
    with torch.no_grad():  # changing past or future logits does not change the loss
        changed = logits.detach().clone()
        changed[:, :4] += 50 * torch.randn(6, 4)
        changed[:, 7:] -= 50
    assert torch.equal(current_task_cross_entropy(changed, targets, classes), loss.detach())


def test_training_a_task_gives_no_gradient_to_past_or_future_class_head_rows(make_config):
    run = ContinualRun(make_config("l2p", prompt_params=SMALL_PARAMS["l2p"]))  # 2 tasks x 5 classes
    head = run.student.head
    run.run_task()  # task 0: classes 0-4
    assert head.weight.grad[5:].abs().max() == 0 and head.bias.grad[5:].abs().max() == 0
    assert head.weight.grad[:5].abs().max() > 0
    past_rows = (head.weight.detach()[:5].clone(), head.bias.detach()[:5].clone())
    run.run_task()  # task 1: classes 5-9
    assert head.weight.grad[:5].abs().max() == 0 and head.bias.grad[:5].abs().max() == 0
    assert head.weight.grad[5:].abs().max() > 0
    assert torch.equal(head.weight[:5], past_rows[0]) and torch.equal(head.bias[:5], past_rows[1])


# -- frozen backbone -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", PROMPTED)
def test_training_leaves_the_backbone_without_gradients_and_unchanged(method, make_config):
    run = ContinualRun(make_config(method, prompt_params=SMALL_PARAMS[method]))
    model = run.student
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable_before = model.trainable_state_dict()
    assert not any(n.startswith("backbone.") for n in trainable_before)
    assert {id(p) for p in model.trainable_parameters()}.isdisjoint(id(p) for p in model.backbone.parameters())
    run.run_task()
    for name, p in model.backbone.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[name]), name
    after = model.trainable_state_dict()
    changed = {k for k in after if not torch.equal(after[k], trainable_before[k])}
    assert {"head.weight", "head.bias"} <= changed
    assert any(k.startswith("prompt.") for k in changed), "no prompt parameter trained"


# -- determinism -----------------------------------------------------------------------------------------------
def _run(make_config, seed: int) -> tuple[dict, dict]:
    cfg = make_config("coda", prompt_params={"pool_size": 10}, seed=seed, val_fraction=0.2, train_per_class=10)
    run = ContinualRun(cfg)  # train_augment on: random crops and flips draw from the seeded torch RNG
    results = run.run()
    return results["matrices"], run.student.trainable_state_dict()


def test_same_seed_gives_identical_accuracies_and_trainable_state_and_another_seed_does_not(make_config):
    matrices_a, state_a = _run(make_config, seed=0)
    matrices_b, state_b = _run(make_config, seed=0)
    assert set(matrices_a["student"]) == {"test", "val"}
    assert matrices_a == matrices_b
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    _, state_c = _run(make_config, seed=1)
    assert any(not torch.equal(state_a[name], state_c[name]) for name in state_a)


# -- end to end ------------------------------------------------------------------------------------------------
# Measured on this machine (2 tasks x 5 synthetic classes, random demo-s backbone, 20 train images per class,
# 4 epochs, batch 8, lr 1e-2, no augmentation; train seeds 0-12): final average accuracy was 30-75% for l2p,
# 40-70% for dualprompt and 40-70% for coda (seed 0: 50, 50, 54), and R[0][0] was 100% in every run. Chance is
# 10% (10 classes), and 20% on task 0 alone (5 classes). Class-incremental forgetting on random features caps
# the final average near 50-60%; with the official lr 1e-3 and one epoch the runs stayed at chance.
@pytest.mark.parametrize("method", PROMPTED)
def test_tiny_end_to_end_run_beats_chance_clearly(method, make_config):
    cfg = make_config(method, n_tasks=2, train_per_class=20, test_per_class=20, epochs=4, lr=1e-2, train_augment=False)
    results = ContinualRun(cfg).run()
    matrix = results["matrices"]["student"]["test"]
    assert [len(row) for row in matrix] == [1, 2]
    assert matrix[0][0] >= 60.0, matrix  # chance on the first task's 5 classes: 20%
    final = metrics.final_average_accuracy(matrix)
    assert final >= 25.0, matrix  # chance: 10%
    assert results["summary"]["student_test_final_avg_acc"] == pytest.approx(final)
