"""A sweep of the `smoke` space never holds more than one copy of a teacher in a trial process (issue 8).

The probe (tests/teacher_probe/cdl_teacher_probe.py) counts, in one process, the copies of a run's teacher by
content: distinct tensor storages among all live tensors whose shape and values equal the teacher's backbone
weights (patch embedding, last block), prompt parameters and head, and the live FrozenViT / timm
VisionTransformer / ContinualModel objects of the teacher's preset and shape. Each must be exactly 1.

The fast tests check the probe itself: it counts 1 for a fresh run, and 2 (for exactly the tensors concerned)
when a second copy is kept alive in a dict, a list, a teacher-store load or a deep-copied module; its hook
writes a line per task and does not change results; `sitecustomize.py` installs it only when asked.

The slow test runs the real sweep CLI (`python -m orchestrator.sweep`, local Ray, default teacher store) on
the smoke space's own teacher cells (demo-t -> demo-s; l2p, dualprompt, coda; kd, cdl_prompt; its tune
function, pruner and 5-task stream), shrunk to 1 trial per cell (each teacher still serves two cells: one
trial trains it, the other loads it from the store) and 10 train / 5 test Fashion-MNIST images per class.
The demo backbones' cached weights files are stood in for by randomly initialised ones, so the trials load
their backbones from a file exactly as the smoke sweep does, without minutes of pretraining. Every Ray trial
process has the probe (a local Ray passes the driver's PYTHONPATH and environment on to its workers, whose
Python then runs the sitecustomize.py found there); it writes one JSON line per trial process, phase and task.
About 100 s on 2 CPU cores: the trials barely overlap, as starting a trial's actor takes as long as its run.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE_DIR = Path(__file__).resolve().parent / "teacher_probe"

import cdl_core  # noqa: E402
import cdl_core.learner  # noqa: E402
from cdl_core.config import BackboneConfig, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig  # noqa: E402
from cdl_core.learner import ContinualRun  # noqa: E402
from cdl_core.teacher_store import TeacherStore  # noqa: E402


def _load_probe():
    """tests/teacher_probe/cdl_teacher_probe.py under the name the trial processes import it by."""
    if "cdl_teacher_probe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cdl_teacher_probe", PROBE_DIR / "cdl_teacher_probe.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["cdl_teacher_probe"] = module
        spec.loader.exec_module(module)
    return sys.modules["cdl_teacher_probe"]


probe = _load_probe()

BACKBONE = {"backbone.patch_embed.proj.weight", "backbone.blocks[-1].attn.qkv.weight", "backbone.blocks[-1].mlp.fc2.weight"}
MODULES = ("frozen_vits", "timm_vits", "continual_models")


def tiny_config(method: str = "coda", kd: str = "cdl_prompt", n_tasks: int = 2) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="synthetic", n_tasks=n_tasks, train_per_class=2, test_per_class=1, val_fraction=0.0,
                        train_augment=False),
        student=BackboneConfig("demo-s", "random"), teacher=BackboneConfig("demo-t", "random"),
        prompt=PromptConfig(method=method), distill=DistillConfig(method=kd),
        train=TrainConfig(epochs=1, batch_size=8, eval_batch_size=64, device="cpu"),
    ).validate()


def copies(counts: dict) -> dict[str, int]:
    """Flat name -> count: every reference tensor's storages and the module counts."""
    return counts["storages"] | {name: counts[name] for name in MODULES}


def all_one(counts: dict) -> bool:
    return set(copies(counts).values()) == {1}


# -- the probe's counting ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["l2p", "dualprompt", "coda"])
def test_the_count_is_one_for_a_run_and_two_while_a_second_copy_is_alive(method, tmp_path):
    run = ContinualRun(tiny_config(method))
    counts = probe.count_teacher_copies(run)
    prompt_names = {n for n in counts["storages"] if n.startswith("prompt.")}
    trainable = set(counts["storages"]) - BACKBONE
    assert prompt_names and BACKBONE <= set(counts["storages"]) and {"head.weight", "head.bias"} <= trainable
    assert all_one(counts), counts

    # a view shares the storage: not a copy
    view = run.teacher.head.weight[:]
    counts = probe.count_teacher_copies(run)
    assert all_one(counts) and counts["tensors"]["head.weight"] == 2
    del view

    # the teacher's trainable state in a dict (a state dict), as the store saves it
    extra = copy.deepcopy(run.teacher.trainable_state_dict())
    assert all(torch.is_tensor(v) and not v.requires_grad for v in extra.values())
    counts = copies(probe.count_teacher_copies(run))
    assert {n: counts[n] for n in trainable} == dict.fromkeys(trainable, 2)
    assert {n: c for n, c in counts.items() if n not in trainable} == dict.fromkeys(BACKBONE | set(MODULES), 1)
    del extra

    # what a teacher-store load returns (torch.load of the stored bytes), kept alive
    entry = TeacherStore(tmp_path / "store").entry("k")
    entry.save(0, run.teacher.trainable_state_dict(), {"test": [0.0]}, {"id": 1}, {})
    loaded, _ = entry.load(0)
    counts = copies(probe.count_teacher_copies(run))
    assert {n: counts[n] for n in trainable} == dict.fromkeys(trainable, 2)
    del loaded

    # backbone weights held in a list (a loaded weights file), and a whole second backbone
    held = [copy.deepcopy(run.teacher_backbone.vit.state_dict())]
    counts = copies(probe.count_teacher_copies(run))
    assert {n: counts[n] for n in BACKBONE} == dict.fromkeys(BACKBONE, 2) and counts["frozen_vits"] == 1
    held = [copy.deepcopy(run.teacher_backbone)]
    counts = copies(probe.count_teacher_copies(run))
    assert {n: counts[n] for n in BACKBONE} == dict.fromkeys(BACKBONE, 2)
    assert (counts["frozen_vits"], counts["timm_vits"], counts["continual_models"]) == (2, 2, 1)
    held = [copy.deepcopy(run.teacher)]
    assert set(copies(probe.count_teacher_copies(run)).values()) == {2}
    del held

    assert all_one(probe.count_teacher_copies(run))  # freed again: back to one


# -- the probe's hook ----------------------------------------------------------------------------------------------
@pytest.fixture
def patched_learner(tmp_path):
    directory = tmp_path / "probe"
    probe.patch_learner(cdl_core.learner, str(directory))
    try:
        yield directory
    finally:
        probe.unpatch_learner(cdl_core.learner)


def probe_lines(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]


def test_the_hook_writes_a_line_per_task_and_sees_a_copy_kept_across_a_task(patched_learner, tmp_path):
    store = tmp_path / "store"
    run = ContinualRun(tiny_config("l2p", "kd"), teacher_store=store)
    run.run_task()
    extra = copy.deepcopy(run.teacher)  # a second teacher model, alive during the next task
    run.run_task()
    lines = probe_lines(patched_learner)
    assert [(line["phase"], line["task"]) for line in lines] == [("init", None), ("task", 0), ("task", 1)]
    assert all("error" not in line and line["pid"] == os.getpid() and line["trial_id"] is None for line in lines)
    assert all(line["teacher_key"] == run.teacher_entry.key and (line["method"], line["kd"]) == ("l2p", "kd") for line in lines)
    assert all(all_one(line["counts"]) for line in lines[:2]) and "counts_after_gc_collect" not in lines[1]
    # task 1 trained the teacher's prompts and head on: the copy of their task-0 values is not the teacher any
    # more, while its frozen backbone still is
    for counts in (lines[2]["counts"], lines[2]["counts_after_gc_collect"]):  # really held, not garbage
        assert {n: c for n, c in copies(counts).items() if c != 1} == dict.fromkeys(BACKBONE | set(MODULES), 2)
    del extra

    # a student without a teacher writes nothing
    ContinualRun(dataclasses.replace(tiny_config("l2p", "none"), teacher=None)).run_task()
    assert len(probe_lines(patched_learner)) == 3


def test_the_probe_does_not_change_results(tmp_path):
    def run_all() -> tuple:
        run = ContinualRun(tiny_config("dualprompt", "cdl_prompt"))
        results = run.run()
        return results["matrices"], run.student.trainable_state_dict(), run.teacher.trainable_state_dict()

    plain = run_all()
    probe.patch_learner(cdl_core.learner, str(tmp_path / "probe"))
    try:
        probed = run_all()
    finally:
        probe.unpatch_learner(cdl_core.learner)
    assert len(probe_lines(tmp_path / "probe")) == 3
    assert probed[0] == plain[0]
    for before, after in zip(plain[1:], probed[1:]):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sitecustomize_installs_the_hook_only_when_asked(tmp_path):
    code = textwrap.dedent("""
        import sys
        print("cdl_teacher_probe" in sys.modules, any(type(f).__name__ == "_LearnerImportHook" for f in sys.meta_path))
    """)
    env = {k: v for k, v in os.environ.items() if k != "CDL_TEACHER_PROBE_DIR"} | {"PYTHONPATH": f"{PROBE_DIR}{os.pathsep}{ROOT}"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert off.stdout.split() == ["False", "False"], off.stderr
    on = subprocess.run([sys.executable, "-c", code], env=env | {probe.ENV: str(tmp_path)}, capture_output=True,
                        text=True, timeout=60)
    assert on.stdout.split() == ["True", "True"], on.stderr


def test_the_import_hook_patches_cdl_core_learner_when_it_is_imported():
    original = sys.modules.pop("cdl_core.learner")
    hook = probe._LearnerImportHook()
    sys.meta_path.insert(0, hook)
    try:
        fresh = importlib.import_module("cdl_core.learner")  # executes the module again, through the hook
        assert fresh is not original and fresh.ContinualRun._teacher_probe_installed
        assert fresh.__spec__.origin == original.__spec__.origin
        assert not getattr(original.ContinualRun, "_teacher_probe_installed", False)
    finally:
        sys.meta_path.remove(hook)
        sys.modules["cdl_core.learner"] = original
        cdl_core.learner = original


# -- the sweep -----------------------------------------------------------------------------------------------------
SHRINK = {"data.train_per_class": 10, "data.test_per_class": 5, "train.batch_size": 8}
SPACE_FILE = """
import dataclasses

from search_spaces.smoke import SPACE as SMOKE

# The smoke space's cells that have a teacher, with its tune function, pruner and resources; one of its prompt
# methods, fewer trials, tiny data.
SPACE = dataclasses.replace(
    SMOKE, name="smoke-teacher-copies", trials_per_cell={trials}, base={{**SMOKE.base, **{shrink!r}}},
    keep=lambda cell: cell.teacher is not None and cell.method in {methods!r} and (SMOKE.keep is None or SMOKE.keep(cell)),
)
"""


def fake_demo_weights(presets: set[str]) -> None:
    """Randomly initialised stand-ins for the demo backbones' pretrained weights files (in $CDL_CACHE_DIR)."""
    import timm

    from cdl_core.backbones import PRESETS
    from cdl_core.catalog.presets import demo_weights_path

    for name in presets:
        preset = PRESETS[name]
        torch.manual_seed(0)
        model = timm.create_model(preset.timm_name, pretrained=False, num_classes=10, **preset.model_kwargs)
        path = demo_weights_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)


@pytest.mark.slow
def test_a_smoke_sweep_never_holds_more_than_one_copy_of_a_teacher_in_a_trial_process(tmp_path, monkeypatch):
    from orchestrator.space import load_space
    from sweep_checks import tune_rows

    trials_per_cell = 1  # each teacher still serves three cells (kd, dcdl, cdl_prompt): one trial trains it, two load it
    space_path = tmp_path / "smoke_teacher_copies.py"
    methods = ("coda",)  # the probe itself is checked on every prompt method above
    space_path.write_text(SPACE_FILE.format(trials=trials_per_cell, shrink=SHRINK, methods=methods))
    monkeypatch.syspath_prepend(str(ROOT))
    smoke, space = load_space("smoke"), load_space(str(space_path))
    cells = space.cells()
    assert [c.key for c in cells] == [c.key for c in smoke.cells() if c.teacher and c.method in methods]  # the smoke space's own cells
    assert {c.method for c in cells} == set(methods) and {c.kd for c in cells} == {"kd", "dcdl", "cdl_prompt"}
    assert all(space.trials_for(c) == trials_per_cell for c in cells)
    n_tasks = RunConfig.from_dict(space.run_config(cells[0])).data.n_tasks or 5
    teachers = {c.teacher for c in cells}

    monkeypatch.setenv("CDL_CACHE_DIR", str(tmp_path / "cdl_cache"))  # the subprocess reads it too
    fake_demo_weights(teachers | {c.student for c in cells})
    probe_dir = tmp_path / "probe"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "PYTHONPATH": f"{PROBE_DIR}{os.pathsep}{ROOT}", probe.ENV: str(probe_dir)}
    log_path = tmp_path / "sweep.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", "--space", str(space_path), "--name", "copies"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:  # never leave the subprocess' Ray behind: it leads its own process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - started
    assert proc.returncode == 0, log_path.read_text()[-5000:]

    rows = tune_rows(tmp_path / "ray_results" / "copies")  # Tune trial id -> the results it reported
    assert len(rows) == sum(space.trials_for(c) for c in cells)
    lines = [json.loads(line) for path in probe_dir.glob("*.jsonl") for line in path.read_text().splitlines()]
    errors = [line["error"] for line in lines if "error" in line]
    assert not errors, errors[0]
    assert all(line["trial_id"] in rows for line in lines)  # only trial processes built a teacher run
    by_trial = defaultdict(list)
    for line in lines:
        by_trial[line["trial_id"]].append(line)

    # the probe ran in every trial, after every task it reported
    assert set(by_trial) == set(rows)
    for trial_id, reported in rows.items():
        probed = by_trial[trial_id]
        assert [r["task"] for r in reported] == list(range(1, len(reported) + 1))
        assert sorted(line["task"] + 1 for line in probed if line["phase"] == "task") == [r["task"] for r in reported]
        assert [line["phase"] for line in probed].count("init") == 1
        assert len({line["pid"] for line in probed}) == 1
        assert {line["teacher_key"] for line in probed} == {reported[0]["teacher_key"]}  # the teacher store is on
        assert (probed[0]["teacher"], probed[0]["method"], probed[0]["kd"]) == (
            reported[0]["config"]["run"]["teacher"]["preset"], reported[0]["config"]["run"]["prompt"]["method"],
            reported[0]["config"]["run"]["distill"]["method"])
    assert {(line["method"], line["kd"]) for line in lines} == {(c.method, c.kd) for c in cells}
    assert any(len(r) == n_tasks for r in rows.values())
    trained = [r["trained_teacher_task"] for reported in rows.values() for r in reported]
    assert 1 in trained and 0 in trained  # probed both after training a teacher task and after loading one

    # exactly one copy of the teacher in every trial process, at every probe
    over = [(line["trial_id"], line["pid"], line["phase"], line["task"], {n: c for n, c in copies(line["counts"]).items() if c != 1},
             {n: c for n, c in copies(line.get("counts_after_gc_collect", line["counts"])).items() if c != 1})
            for line in lines if not all_one(line["counts"])]
    print(f"\nsweep {seconds:.0f} s; {len(rows)} trials in {len({line['pid'] for line in lines})} processes; "
          f"{len(lines)} probes, counts seen {sorted({c for line in lines for c in copies(line['counts']).values()})}; "
          f"probe {sum(line['probe_seconds'] for line in lines):.1f} s in all")
    assert not over, f"(trial, pid, phase, task, counts != 1, after gc.collect()): {over}"
