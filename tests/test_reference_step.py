"""The official-style reference step in bench/ and the step benchmark built on it: the reference computes the
product's math (same loss and gradients), its check can fail, the product never imports it, and the
benchmark runs end to end."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
reference_step = importlib.import_module("reference_step")
step_throughput = importlib.import_module("step_throughput")

TINY = ["--batch-size", "6", "--steps", "1", "--repeats", "1"]


@pytest.mark.parametrize("method, kd", [("coda", "cdl_prompt"), ("l2p", "cdl_prompt"), ("dualprompt", "cdl_prompt"), ("coda", "kd"), ("l2p", "kd")])
def test_reference_gives_the_product_loss_and_gradients(method, kd):
    run, images, targets, classes = step_throughput.build(step_throughput.parse_args(TINY + ["--kd", kd]), method)
    assert classes.past > 0  # a later task: past classes masked, earlier CODA components frozen
    reference = reference_step.OfficialStyleStep(run)
    largest = reference_step.check_same_step(run, reference, images, targets, step_throughput.TASK, classes)
    assert largest < 1e-5
    # the reference really computes weight gradients for its (unfrozen) backbones, the product none
    assert any(p.grad is not None for p in reference.student.backbone.parameters())
    assert all(p.grad is None for p in run.student.backbone.parameters())


def test_the_check_fails_when_the_math_differs():
    run, images, targets, classes = step_throughput.build(step_throughput.parse_args(TINY), "coda")
    reference = reference_step.OfficialStyleStep(run)
    with torch.no_grad():
        reference.student.kd.mapping.components[str(run.teacher.prompt.layers[-1])].add_(0.1)
    with pytest.raises(AssertionError):
        reference_step.check_same_step(run, reference, images, targets, step_throughput.TASK, classes)


def test_reference_works_on_copies_and_leaves_the_product_models_alone():
    run, images, targets, classes = step_throughput.build(step_throughput.parse_args(TINY), "l2p")
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    reference = reference_step.OfficialStyleStep(run)
    reference.step(images, targets, step_throughput.TASK, classes, reference.optimizer())
    assert all(torch.equal(before[k], v) for k, v in run.student.state_dict().items())
    assert all(not p.requires_grad for p in run.student_backbone.parameters())


def test_product_never_imports_bench_code():
    for package in ("cdl_core", "orchestrator"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    assert not name.startswith(("bench", "reference_step", "step_throughput")), f"{path} imports {name}"


def test_step_benchmark_prints_both_rates_and_their_ratio(capsys):
    rows = step_throughput.main(TINY + ["--methods", "dualprompt", "--no-memory", "--table", "reference"])
    assert [row["method"] for row in rows] == ["dualprompt"]
    row = rows[0]
    assert row["ours"] > 0 and row["reference"] > 0 and row["ours_cached"] > 0
    assert row["ratio"] == pytest.approx(row["ours"] / row["reference"])  # one repeat: the median is that ratio
    out = capsys.readouterr().out
    assert "demo-t -> demo-s" in out and f"{row['ratio']:.2f}x" in out


def test_methods_table_times_each_step_beside_a_revision_and_marks_the_new_ones(capsys):
    """--against HEAD: the working tree's step beside the committed one's, each in its own process importing its own
    tree (the worker checks which cdl_core it imported); a method the revision lacks is marked new."""
    head_methods = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:cdl_core/distill/__init__.py"], capture_output=True, text=True).stdout
    new = next((kd for kd in ("dcdl", "fitnets") if kd not in head_methods), None)
    kds = ["kd"] + ([new] if new else [])
    rows = step_throughput.main(TINY + ["--table", "methods", "--prompts", "l2p", "--kd-methods", *kds, "--against", "HEAD"])
    assert [(row["prompt"], row["kd"]) for row in rows] == [("l2p", kd) for kd in kds]
    assert rows[0]["ours"] > 0 and rows[0]["old"] > 0 and rows[0]["ratio"] == pytest.approx(rows[0]["ours"] / rows[0]["old"])
    out = capsys.readouterr().out
    assert f"{rows[0]['ratio']:.2f}x" in out
    if new:
        assert "old" not in rows[1] and "new" in out.splitlines()[-1]


@pytest.mark.slow
def test_step_memory_is_measured_in_a_fresh_process():
    args = step_throughput.parse_args(TINY + ["--threads", "1"])
    ours = step_throughput.peak_step_mib(args, "coda", "ours")
    reference = step_throughput.peak_step_mib(args, "coda", "reference")
    assert 0 < ours < 2000 and 0 < reference < 2000
