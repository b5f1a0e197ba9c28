"""The Ray Tune function trainable: one trial = one `cdl_core` run, reported and checkpointed task by task.

Thin on purpose: it validates the trial's RunConfig dict, resumes from the last task checkpoint if Tune
restarted the trial, and after every task reports the metrics and saves a checkpoint (a finished trial keeps only
its latest: orchestrator.checkpoints). A config error ends the trial at once with one report naming it, never
retried. A sequential-schedule teacher comes from the sweep's teacher store (trained by the first trial that needs
it); trial checkpoints then hold only the student, and the accuracy artifacts the driver copies into MLflow.
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from cdl_core import metrics
from cdl_core.config import RunConfig
from cdl_core.errors import ConfigError, one_line
from cdl_core.learner import ContinualRun, TaskReport
from orchestrator.artifacts import save_matrix_artifacts
from orchestrator.console import quiet_trial
from orchestrator.errors import CONFIG_ERROR
from orchestrator.teachers import TeacherSharing

STATE_FILE = "run_state.pt"


def task_metrics(run: ContinualRun, report: TaskReport) -> dict[str, Any]:
    """Flat metrics after a task. Optuna tunes on `val_avg_acc` and prunes on `val_acc_area` (validation
    split); test accuracies are reported and logged, never used to choose."""
    out: dict[str, Any] = {"task": report.task_id + 1, "n_tasks": run.n_tasks}
    for role, by_split in run.state.matrices.items():
        prefix = "" if role == "student" else "teacher_"
        for split, matrix in by_split.items():
            # forgetting: the definition the config shows; forgetting_cdl and forgetting_chaudhry: both by name
            summary = metrics.summarize(matrix, shown=run.cfg.forgetting)
            out[f"{prefix}{split}_avg_acc"] = summary.pop("final_avg_acc")
            out |= {f"{prefix}{split}_{name}": value for name, value in summary.items()}
            # Area under the accuracy-after-each-task curve: only grows, unlike the accuracy itself (see pruning.py)
            out[f"{prefix}{split}_acc_area"] = summary["avg_incremental_acc"] * len(matrix)
        for j, acc in enumerate(by_split["test"][-1]):
            out[f"{prefix}test_acc_task{j + 1}"] = acc
    out["test_matrix"] = json.dumps(run.state.matrices["student"]["test"])
    if "teacher" in run.state.matrices:
        out["teacher_test_matrix"] = json.dumps(run.state.matrices["teacher"]["test"])
    out["task_seconds"] = report.seconds["total"]
    if run.teacher_entry is not None:  # the teacher run in MLflow is found by this key
        out["teacher_key"] = run.teacher_entry.key
        out["trained_teacher_task"] = int(report.teacher_trained)  # 1: this trial trained the teacher on this task
        out["teacher_wait_seconds"] = run.teacher_wait_seconds  # so far, waiting while another trial trained it
    return out


def train_cdl(config: dict[str, Any], teachers: TeacherSharing | None = None, log_file: str | None = None) -> None:
    quiet_trial(log_file)  # Ray's per-checkpoint lines and repeated warnings to the sweep's log, not the console
    try:
        _train(config, teachers)
    except ConfigError as err:
        # A setting no retry can fix (Tune retries whatever a trial raises): end the trial now, reporting why.
        # Optuna records it FAIL (no metric), MLflow tags it failed with the message, the summary lists it.
        tune.report({CONFIG_ERROR: one_line(err)})


def _train(config: dict[str, Any], teachers: TeacherSharing | None) -> None:
    cfg = RunConfig.from_dict(config["run"])
    shared = teachers is not None and cfg.teacher is not None and cfg.distill.schedule == "sequential"
    if shared:
        lock = functools.partial(teachers.lock, holder=tune.get_context().get_trial_id())
        run = ContinualRun(cfg, teacher_store=teachers.store, teacher_lock=lock)
    else:
        run = ContinualRun(cfg)
    node_id = ray.get_runtime_context().get_node_id()  # which node ran each task (tagged in MLflow)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # Tune restarted this trial: continue after its last finished task
        with checkpoint.as_directory() as directory:
            run.load_state_dict(torch.load(Path(directory) / STATE_FILE, weights_only=False))
    while run.completed_tasks < run.n_tasks:
        report = run.run_task()
        with tempfile.TemporaryDirectory() as directory:
            torch.save(run.state_dict(), Path(directory) / STATE_FILE)
            save_matrix_artifacts(run.state.matrices["student"]["test"], Path(directory), config["cell"])
            tune.report(task_metrics(run, report) | {"node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(directory))
