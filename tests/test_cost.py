"""The dry run's GPU-hours estimate (orchestrator.cost) against a hand computation on a tiny space, its per-image
model for each kind of run, measured numbers replacing the estimate, and what the dry run prints."""
from __future__ import annotations

import re

import pytest

from cdl_core.catalog.presets import PRESETS
from orchestrator import cost
from orchestrator.space import SweepSpace
from orchestrator.plan import make_plan
from orchestrator.sweep import main

B, S, L = "vit_base_patch16_224", "vit_small_patch16_224", "vit_large_patch16_224"
F_B, F_S = 17.6, 4.6  # forward GMACs per image (DeiT's Table 1)


def tiny_space() -> SweepSpace:
    """ViT-B -> ViT-S with logit KD (2 tuned trials) and ViT-S alone, CODA, CIFAR-100 at 10 training / 5 test images
    per class (1,000 / 500 over 10 tasks), 10% validation, 2 epochs."""
    return SweepSpace(
        name="tiny-cost", description="", pairs=[(B, S), (None, S)], methods=["coda"], kd_methods=["kd"], datasets=["cifar100"],
        tune=lambda trial, cell: {"distill.alpha": trial.suggest_float("alpha", 0.1, 0.9)} if cell.kd != "none" else {},
        trials_per_cell=2, gpus_per_trial=1,
        base={"train.epochs": 2, "data.train_per_class": 10, "data.test_per_class": 5, "data.val_fraction": 0.1},
    ).validate()


# By hand: 900 training images (1,000 less 100 for validation) x 2 epochs = 1,800 steps; after task t of 10 the test
# and validation images of tasks 1..t, (500 + 100) x (1 + ... + 10) / 10 = 3,300 images.
STEPS, EVALUATED = 900 * 2, 600 * 55 / 10
STUDENT_KD = STEPS * (2 * F_S + F_S + F_B) + EVALUATED * (F_S + F_S)  # own fwd+bwd, query, frozen teacher; query + fwd
TEACHER = STEPS * (2 * F_B + F_S) + EVALUATED * (F_B + F_S)  # the teacher selects with the student-size query too
ALONE = STEPS * (2 * F_S + F_S) + EVALUATED * (F_S + F_S)


def hours(gmacs: float, tflops: float = 1.0) -> float:
    return gmacs * 2e9 / (tflops * 1e12) / 3600  # two FLOPs per multiply-add


@pytest.fixture
def one_tflops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cost, "SUSTAINED_TFLOPS", {"fp32": 1.0, "bf16": 1.0})


def test_a_tiny_space_costs_what_the_hand_computation_says(one_tflops):
    space = tiny_space()
    plan = make_plan(space)
    assert cost.run_images(plan.configs[plan.cells[0].key]) == (STEPS, EVALUATED)
    rows = {r.pair: r for r in cost.estimate(space, plan, reuse=True)}
    pair, alone = rows[f"{B} -> {S}"], rows[f"{S} alone"]
    assert (pair.trials, pair.teacher_trainings, alone.trials, alone.teacher_trainings) == (2, 1, 1, 0)
    assert pair.student_hours == pytest.approx(hours(2 * STUDENT_KD))
    assert pair.teacher_hours == pytest.approx(hours(TEACHER))  # one teacher shared by both trials
    assert alone.hours == pytest.approx(hours(ALONE)) and alone.teacher_hours == 0
    without = {r.pair: r for r in cost.estimate(space, plan, reuse=False)}[f"{B} -> {S}"]
    assert without.teacher_trainings == 2 and without.teacher_hours == pytest.approx(hours(2 * TEACHER))


def test_the_assumed_throughput_scales_the_estimate(monkeypatch):
    space = tiny_space()
    plan = make_plan(space)
    monkeypatch.setattr(cost, "SUSTAINED_TFLOPS", {"fp32": 4.0, "bf16": 8.0})
    total = sum(r.hours for r in cost.estimate(space, plan))
    assert total == pytest.approx(hours(2 * STUDENT_KD + TEACHER + ALONE, tflops=4.0))


def test_per_image_costs_follow_what_each_method_runs():
    def cfg(teacher: str, method: str, kd: str) -> dict:
        space = SweepSpace(name="x", description="", pairs=[(teacher, S)], methods=[method], kd_methods=[kd], datasets=["cifar100"])
        return space.run_config(space.cells()[0])

    assert cost.image_gmacs(cfg(B, "coda", "kd"), "student") == pytest.approx((3 * F_S + F_B, 2 * F_S))
    assert cost.image_gmacs(cfg(B, "coda", "dcdl"), "student") == pytest.approx((3 * F_S + F_B, 2 * F_S))  # no teacher at test
    assert cost.image_gmacs(cfg(B, "coda", "cdl_prompt"), "student") == pytest.approx((3 * F_S + F_B, 2 * F_S + F_B))
    assert cost.image_gmacs(cfg(B, "apt", "kd"), "student") == pytest.approx((2 * F_S + F_B, F_S))  # APT has no query
    assert cost.image_gmacs(cfg(B, "apt", "kd"), "teacher") == pytest.approx((2 * F_B, F_B))
    assert cost.image_gmacs(cfg(L, "l2p", "kd"), "teacher") == pytest.approx((2 * 61.6 + F_S, 61.6 + F_S))


def test_measured_numbers_replace_the_estimate_for_their_pair_and_role(monkeypatch, one_tflops):
    space = tiny_space()
    plan = make_plan(space)
    monkeypatch.setattr(cost, "MEASURED_MS", {(B, S): {"student_step": 5.0}})
    rows = {r.pair: r for r in cost.estimate(space, plan)}
    eval_ms = (F_S + F_S) * 2e9 / 1e12 * 1e3
    assert rows[f"{B} -> {S}"].student_hours == pytest.approx(2 * (STEPS * 5.0 + EVALUATED * eval_ms) / 1e3 / 3600)
    assert rows[f"{B} -> {S}"].teacher_hours == pytest.approx(hours(TEACHER))  # not measured: still the estimate
    assert rows[f"{S} alone"].hours == pytest.approx(hours(ALONE))


def test_the_vit_shape_formula_agrees_with_the_published_forward_gmacs():
    for name, gmacs in cost.FORWARD_GMACS.items():
        assert cost.vit_gmacs(PRESETS[name]) == pytest.approx(gmacs, rel=0.04), name
    assert 0 < cost.forward_gmacs("demo-s") < cost.forward_gmacs("demo-t") < 0.1  # the CPU demo backbones


def estimated_total(out: str) -> float:
    found = re.search(r"^estimated GPU-hours: ([\d,]+) on ", out, flags=re.M)
    assert found, out
    return float(found[1].replace(",", ""))


def test_the_paper_dry_run_prints_a_total_and_a_row_per_pair(capsys):
    assert main(["--space", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    total = estimated_total(out)
    assert "not a measurement" in out and "assumed sustained" in out
    rows = re.findall(r"^  (\S+ (?:-> \S+|alone))\s+(\d+)\s+(\d+)\s+([\d,.]+)\s+([\d,.]+)\s+([\d,.]+)$", out, flags=re.M)
    assert len(rows) == 6  # L->B, B->S, B->Ti and the three students alone
    assert sum(int(r[1]) for r in rows) == 136 and sum(int(r[2]) for r in rows) == 22
    assert sum(float(r[5].replace(",", "")) for r in rows) == pytest.approx(total, abs=1)
    assert main(["--space", "paper", "--dry-run", "--no-teacher-reuse"]) == 0
    assert estimated_total(capsys.readouterr().out) > total  # 114 teacher trainings instead of 22


def test_a_cpu_space_gets_no_gpu_estimate(capsys):
    assert main(["--space", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours: none estimated, the space asks for no GPU" in out and "estimated GPU-hours:" not in out
