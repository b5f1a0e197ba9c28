"""Fake finished sweeps written straight into an MLflow store, as MlflowTracking leaves them, for the report's
tests (test_report.py, test_report_settings.py)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cdl_core.config import BackboneConfig, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from orchestrator.report import main

N_TASKS = 2


@dataclass
class FakeTrial:
    """One trial run as MlflowTracking leaves it; `val`, `acc`, `forg` are the values at the last step logged.

    `forg` is test_forgetting_cdl; test_forgetting_chaudhry is planted as 2 * forg (a monotone 2-task matrix's
    T/(T-1)) so every table number of the one is twice the other's. test_forgetting is the one `shown` names.
    A trial run by older code logged only test_forgetting, Chaudhry's."""

    teacher: str
    student: str
    method: str
    kd: str
    dataset: str
    seed: int
    optuna_trial: int
    status: str  # completed | pruned | failed
    val: float  # val_avg_acc
    acc: float  # test_avg_acc
    forg: float  # test_forgetting_cdl
    steps: int = N_TASKS  # tasks logged (pruned/failed trials stop early)
    config: bool = True  # has a config.json artifact
    teacher_run: bool = False  # tagged with the sweep's teacher run
    shown: str = "cdl"  # RunConfig.forgetting: which definition test_forgetting is
    old_code: bool = False  # logged before the named forgetting metrics existed

    @property
    def row(self) -> tuple[str, str, str, str]:
        return (self.teacher, self.student, self.method, self.kd)

    @property
    def cell(self) -> str:
        return f"{self.teacher}-{self.student}.{self.method}.{self.kd}.{self.dataset}.s{self.seed}"

    def run_config(self) -> dict[str, Any]:
        """A valid tiny RunConfig; lr differs per Optuna trial so every trial's config is distinguishable."""
        return RunConfig(
            data=DataConfig(name=self.dataset if self.dataset in ("synthetic", "fashion_mnist") else "synthetic",
                            n_tasks=N_TASKS, train_per_class=2, test_per_class=2, val_fraction=0.0),
            student=BackboneConfig(self.student, "random"),
            teacher=None if self.teacher == "none" else BackboneConfig(self.teacher, "random"),
            prompt=PromptConfig(self.method),
            distill=DistillConfig(self.kd),
            train=TrainConfig(batch_size=10, eval_batch_size=10, device="cpu", seed=self.seed, lr=0.001 * (1 + self.optuna_trial)),
        ).validate().to_dict()

    @property
    def headline_forg(self) -> float:
        """test_forgetting at the last step."""
        return 2 * self.forg if self.shown == "chaudhry" or self.old_code else self.forg

    def forgetting(self, split: str, cdl: float) -> dict[str, float]:
        chaudhry = 2 * cdl
        if self.old_code:
            return {f"{split}_forgetting": chaudhry}
        shown = cdl if self.shown == "cdl" else chaudhry
        return {f"{split}_forgetting": shown, f"{split}_forgetting_cdl": cdl, f"{split}_forgetting_chaudhry": chaudhry}

    def history(self) -> dict[int, dict[str, float]]:
        """Per-task metrics, step = task. Before the last step the validation accuracy is 100 - val, so a report
        that ranked by the first, the best or any earlier value instead of the final one would pick other trials."""
        a, f, v = self.acc, self.forg, self.val
        out: dict[int, dict[str, float]] = {}
        if self.steps >= 1:
            first_val = v if self.steps == 1 else 100 - v
            first_acc = a if self.steps == 1 else a + f - 1
            out[1] = {"val_avg_acc": first_val, "test_avg_acc": first_acc, **self.forgetting("test", f if self.steps == 1 else 0.0),
                      **self.forgetting("val", 0.0), "test_avg_incremental_acc": first_acc, "test_acc_task1": first_acc}
        if self.steps >= 2:
            out[2] = {"val_avg_acc": v, "test_avg_acc": a, **self.forgetting("test", f), **self.forgetting("val", f / 2),
                      "test_avg_incremental_acc": (out[1]["test_avg_acc"] + a) / 2, "test_acc_task1": a - 1, "test_acc_task2": a + 1}
        return out


BASE = ("none", "demo-s", "coda", "none")
KD = ("demo-t", "demo-s", "coda", "kd")
DKD = ("demo-t", "demo-s", "coda", "dkd")

def _log_trial(client, experiment_id: str, parent_id: str, sweep: str, trial: FakeTrial, teacher_run_id: str | None, scratch: Path) -> str:
    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    tags = {
        MLFLOW_PARENT_RUN_ID: parent_id, "role": "trial", "sweep": sweep, "cell": trial.cell, "teacher": trial.teacher,
        "student": trial.student, "method": trial.method, "kd": trial.kd, "dataset": trial.dataset, "seed": str(trial.seed),
        "status": trial.status, "optuna_study": f"{sweep}.{trial.cell}", "optuna_trial": str(trial.optuna_trial),
        "tune_trial_id": f"t{trial.optuna_trial}_{trial.cell}",
    }
    if teacher_run_id and trial.teacher_run:
        tags |= {"teacher_key": "k" * 16, "teacher_run_id": teacher_run_id}
    run_id = client.create_run(experiment_id, run_name=f"{trial.cell}#{trial.optuna_trial}", tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now + step, step) for step, values in trial.history().items() for k, v in values.items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    if trial.config:
        folder = scratch / run_id
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(trial.run_config(), indent=1))
        client.log_artifact(run_id, str(folder / "config.json"))
    client.set_terminated(run_id, "FAILED" if trial.status == "failed" else "FINISHED")
    return run_id


def make_sweep(client, root: Path, name: str, trials: list[FakeTrial], *, teacher: bool = False) -> dict[str, Any]:
    """An experiment as a finished sweep leaves it: a parent run (role=sweep, param metric), optionally a teacher
    run, and one child run per trial. Returns the ids: experiment_id, parent, teacher and trial run ids in order."""
    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment_id = client.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())
    parent = client.create_run(experiment_id, run_name=name, tags={"role": "sweep", "sweep": name}).info.run_id
    client.log_param(parent, "metric", "val_avg_acc")
    client.log_param(parent, "trials", str(len(trials)))
    teacher_id = None
    if teacher:
        teacher_id = client.create_run(experiment_id, run_name="teacher demo-t", tags={
            MLFLOW_PARENT_RUN_ID: parent, "role": "teacher", "sweep": name, "teacher_key": "k" * 16, "teacher": "demo-t",
            "method": "coda", "dataset": "synthetic", "seed": "0", "status": "completed"}).info.run_id
        client.log_batch(teacher_id, metrics=[Metric("test_avg_acc", v, 0, step) for step, v in ((1, 90.0), (2, 85.0))])
        client.set_terminated(teacher_id, "FINISHED")
    ids = [_log_trial(client, experiment_id, parent, name, t, teacher_id, root / "scratch" / name) for t in trials]
    client.set_terminated(parent, "FINISHED")
    return {"experiment_id": experiment_id, "parent": parent, "teacher": teacher_id, "trials": ids}


@pytest.fixture(autouse=True)
def restore_mlflow_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_trials sets mlflow's global tracking URI (and MLFLOW_TRACKING_URI); undo it after each test."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "MLFLOW_TRACKING_URI" in os.environ:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if hasattr(tracking_utils, "_tracking_uri"):
        monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)


def run_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
