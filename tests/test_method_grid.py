"""Every (prompt method, distillation method) pair end to end on the tiny synthetic stream: each learns beyond
chance, one stored teacher serves every distillation method of a prompt method, evaluation needs the teacher only
for CDL-Prompt, APT's frozen teacher signal follows `distill.teacher_merged_prompts`, and pairs that cannot work
are refused before anything is built."""
from __future__ import annotations

import pytest
import torch

from cdl_core import metrics
from cdl_core.catalog.distill import resolve_kd_params
from cdl_core.catalog.presets import BackbonePreset
from cdl_core.config import RunConfig
from cdl_core.errors import ConfigError
from cdl_core.learner import ContinualRun
from cdl_core.model import ContinualModel
from cdl_core.teacher_identity import teacher_key
from cdl_core.teacher_store import TeacherStore

PROMPTS = ("l2p", "dualprompt", "coda", "apt")
DISTILL = ("none", "kd", "dkd", "fitnets", "reviewkd", "deit", "dcdl", "cdl_prompt")


def grid_cfg(prompt: str, kd: str, **distill) -> RunConfig:
    # Random backbones learn the synthetic stream at lr 1e-2 without augmentation (tests/test_learner.py). Measured
    # with these settings (seed 0): task 1 at 40-100% (chance 20%), final average 30-70% (chance 10%) for every pair.
    raw = {
        "data": {"name": "synthetic", "n_tasks": 2, "train_per_class": 8, "test_per_class": 10, "train_augment": False},
        "student": {"preset": "demo-s", "weights": "random"}, "prompt": {"method": prompt},
        "distill": {"method": kd, **distill},
        "train": {"epochs": 2, "batch_size": 8, "eval_batch_size": 64, "lr": 1e-2, "device": "cpu"},
    }
    if kd != "none":
        raw["teacher"] = {"preset": "demo-t", "weights": "random"}
    return RunConfig.from_dict(raw)


def runnable(prompt: str) -> list[str]:
    return [kd for kd in DISTILL if (prompt, kd) != ("apt", "cdl_prompt")]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_distillation_method_learns_beyond_chance_from_one_stored_teacher(prompt, tmp_path):
    store = TeacherStore(tmp_path / "teachers")
    with_teacher = [kd for kd in runnable(prompt) if kd != "none"]
    assert len({teacher_key(grid_cfg(prompt, kd)) for kd in with_teacher}) == 1
    teacher_matrices, trained = [], []
    for kd in runnable(prompt):
        torch.manual_seed(0)
        run = ContinualRun(grid_cfg(prompt, kd), teacher_store=store if kd != "none" else None)
        reports = []
        results = run.run(on_task=reports.append)
        matrix = results["matrices"]["student"]["test"]
        # chance: 20% on the first task's 5 classes, 10% over both tasks' 10
        assert matrix[0][0] >= 30.0 and metrics.final_average_accuracy(matrix) >= 20.0, (kd, matrix)
        if kd != "none":
            teacher_matrices.append(results["matrices"]["teacher"])
            trained.append([r.teacher_trained for r in reports])
    # the first distillation method's run trained and stored the teacher; every other one loaded it
    assert trained == [[True, True]] + [[False, False]] * (len(with_teacher) - 1)
    assert all(m == teacher_matrices[0] for m in teacher_matrices)


def count_forwards(model: ContinualModel, monkeypatch) -> list[int]:
    calls = [0]
    forward = model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return calls


@pytest.mark.parametrize("kd", [kd for kd in DISTILL if kd != "none"])
def test_evaluation_calls_the_teacher_only_for_cdl_prompt(kd, monkeypatch):
    run = ContinualRun(grid_cfg("coda", kd))
    for model in (run.teacher, run.student):
        model.prompt.begin_task(0)
        model.eval()
    teacher_calls, student_calls = count_forwards(run.teacher, monkeypatch), count_forwards(run.student, monkeypatch)
    dataset = run.stream.tasks[0].test
    batches = -(-len(dataset) // run.cfg.train.eval_batch_size)
    run.accuracy("student", dataset, 0)
    assert student_calls[0] == batches  # one student pass per batch
    assert teacher_calls[0] == (batches if kd == "cdl_prompt" else 0)
    assert run.student.kd.needs_teacher_at_eval == (kd == "cdl_prompt")


@pytest.mark.parametrize("kd", ["fitnets", "reviewkd"])
def test_feature_methods_tap_blocks_in_training_only(kd):
    """The student's taps (and the teacher's, in its signal) exist in a training step; evaluation takes the fast
    pass that computes only [CLS] in the last block."""
    run = ContinualRun(grid_cfg("l2p", kd))
    for model in (run.teacher, run.student):
        model.prompt.begin_task(0)
        model.train()
    images = torch.stack([run.stream.tasks[0].train[i][0] for i in range(4)])
    inputs = run.frozen_inputs("student", images, 0)
    assert set(inputs.teacher.taps) == set(run.student.kd.teacher_taps) and inputs.teacher.taps
    depth = run.teacher_backbone.depth
    expected = {depth - 1} if kd == "fitnets" else set(range(depth))
    assert set(run.student.kd.teacher_taps) == expected
    trained = run.student(images, inputs.query, 0, train=True, teacher=inputs.teacher)
    assert set(trained.taps) == expected  # same depth here: the student taps the same block indices
    evaluated = run.student(images, inputs.query, 0, train=False)
    assert evaluated.taps == {}


@pytest.mark.parametrize("protocol,merged", [("official", "previous"), ("timm", "current")])
def test_apt_teacher_signal_uses_the_merged_prompts_the_protocol_names(protocol, merged):
    """The official code queries its frozen APT teacher in eval mode before the task's merge: on task 1 the teacher's
    merged prompts are still zeros. `distill.teacher_merged_prompts` names that choice."""
    cfg = grid_cfg("apt", "kd", **({} if protocol == "official" else {"teacher_merged_prompts": "current"}))
    assert cfg.distill.teacher_merged_prompts == merged
    run = ContinualRun(cfg)
    run.trainer.train_phase("teacher", run.stream.tasks[0])  # trains, then merges (end_task)
    images = torch.stack([run.stream.tasks[0].train[i][0] for i in range(4)])
    signal = run.frozen_inputs("student", images, 0).teacher.logits
    with torch.no_grad():
        expected = run.teacher(images, None, 0, train=False, merged=merged).logits
        other = run.teacher(images, None, 0, train=False, merged="current" if merged == "previous" else "previous").logits
        evaluated = run.teacher.predict(run.teacher(images, None, 0, train=False))
    torch.testing.assert_close(signal, expected)
    assert not torch.allclose(signal, other)
    if merged == "current":
        torch.testing.assert_close(signal, evaluated)  # the teacher as it is evaluated


def _preset(name: str, depth: int, image_size: int = 224, patch_size: int = 16) -> BackbonePreset:
    return BackbonePreset(name, "vit_base_patch16_224", "hub", 768, depth, 12, image_size, patch_size)


def test_pairs_that_cannot_work_are_refused_with_one_line():
    def refused(raw_update: dict, match: str) -> None:
        raw = grid_cfg("coda", "kd").to_dict()
        for section, values in raw_update.items():
            raw[section] = {**(raw[section] or {}), **values}
        with pytest.raises(ConfigError, match=match) as err:
            RunConfig.from_dict(raw)
        assert "\n" not in str(err.value)

    # ReviewKD pairs the student's last n blocks with the teacher's: a shallower teacher cannot serve
    refused({"student": {"preset": "vit_large_patch16_224"}, "teacher": {"preset": "vit_base_patch16_224"},
             "distill": {"method": "reviewkd"}}, r"teacher vit_base_patch16_224 has only 12; set distill.params.blocks <= 12")
    refused({"distill": {"method": "reviewkd", "params": {"blocks": 7}}}, r"blocks=7 exceeds the student demo-s's 6 blocks")
    refused({"prompt": {"method": "apt"}, "distill": {"method": "cdl_prompt"}}, r"maps the teacher's prefix prompts, but prompt.method='apt'")
    refused({"distill": {"method": "dcdl", "params": {"length": 5}}}, r"distill.params.length=5 must be an even number")
    # FitNets / ReviewKD compare tokens one to one: a different patch grid is refused
    for kd in ("fitnets", "reviewkd"):
        with pytest.raises(ConfigError, match="same image and patch size"):
            resolve_kd_params(kd, {}).check_backbones(_preset("s", 12, patch_size=16), _preset("t", 12, patch_size=32))
    resolve_kd_params("fitnets", {}).check_backbones(_preset("s", 12), _preset("t", 24))  # same grid: fine


def test_teacher_prompt_params_keep_a_tuned_student_setting_off_the_teacher_and_its_key():
    """A space tunes the student's APT ema; `prompt.teacher_params` keeps the teacher's, so every trial's teacher key
    is the same, and the built models use their own ema."""
    def cfg(student_ema: float, teacher_params: dict) -> RunConfig:
        raw = grid_cfg("apt", "kd").to_dict()
        raw["prompt"]["params"] = {"ema": student_ema}
        raw["prompt"]["teacher_params"] = teacher_params
        return RunConfig.from_dict(raw)

    fixed = {teacher_key(cfg(ema, {"ema": 0.7})) for ema in (0.3, 0.5, 0.9)}
    assert len(fixed) == 1 and fixed == {teacher_key(cfg(0.7, {}))}
    assert len({teacher_key(cfg(ema, {})) for ema in (0.3, 0.5)}) == 2  # without it the teacher follows the student
    run = ContinualRun(cfg(0.3, {"ema": 0.7}))
    assert (run.student.prompt.params.ema, run.teacher.prompt.params.ema) == (0.3, 0.7)
    with pytest.raises(ConfigError, match=r"prompt.params.ema=1.5 must be in \[0, 1\]"):
        cfg(0.3, {"ema": 1.5})
    with pytest.raises(ConfigError, match="unknown pool_size"):
        cfg(0.3, {"pool_size": 3})
