"""MLflow tracking of a sweep, written by the Tune driver only.

One experiment per sweep, one parent run for the sweep, one child run per trial (named after its cell and
Optuna trial) with the whole config as params, cell/status tags, per-task metrics with step = task, and
artifacts (resolved config, accuracy matrix as CSV and heatmap, accuracy curve). A stored teacher, shared by
many trials, gets one teacher run (role=teacher, tagged with its teacher_key) holding its metrics once; each
trial using it carries the teacher_key and teacher_run_id tags. Only the driver writes, so concurrent trials
never contend for the default sqlite store; on resume, runs are found again by tag and steps already logged
are not logged twice.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME  # noqa: E402
from ray.tune import Callback  # noqa: E402

def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return out


def trial_status(last_result: dict[str, Any] | None) -> str:
    """completed if the trial learned every task; a trial our sweep stopped earlier was pruned."""
    if not last_result or "task" not in last_result:
        return "failed"
    return "completed" if last_result["task"] >= last_result["n_tasks"] else "pruned"


def save_matrix_artifacts(matrix: list[list[float]], directory: Path, title: str) -> list[Path]:
    """The accuracy matrix as CSV and heatmap, and the average accuracy after each task as a curve."""
    n = len(matrix)
    csv = directory / "accuracy_matrix.csv"
    csv.write_text("after_task," + ",".join(f"task{j + 1}" for j in range(n)) + "\n" + "\n".join(
        f"{t + 1}," + ",".join(f"{row[j]:.2f}" if j < len(row) else "" for j in range(n)) for t, row in enumerate(matrix)
    ) + "\n")
    grid = [[row[j] if j < len(row) else float("nan") for j in range(n)] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.5 * n))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    ax.set_xlabel("evaluated task"), ax.set_ylabel("after training task"), ax.set_title(title, fontsize=8)
    ax.set_xticks(range(n), [str(j + 1) for j in range(n)]), ax.set_yticks(range(n), [str(t + 1) for t in range(n)])
    for t, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, t, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    heatmap = directory / "accuracy_matrix.png"
    fig.savefig(heatmap, dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(1, n + 1), [sum(row) / len(row) for row in matrix], marker="o")
    ax.set_xlabel("tasks learned"), ax.set_ylabel("average accuracy (%)"), ax.set_ylim(0, 100), ax.set_title(title, fontsize=8)
    curve = directory / "accuracy_curve.png"
    fig.savefig(curve, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [csv, heatmap, curve]


def _numeric(result: dict) -> dict[str, float]:
    """The metrics of a Tune result, without Tune's own bookkeeping."""
    return {
        k: v for k, v in result.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("task", "n_tasks", "timestamp", "pid")
        and not k.startswith(("time_", "timesteps_", "episodes_", "iterations_", "training_iteration", "done"))
    }


class MlflowTracking(Callback):
    def __init__(self, tracking_uri: str, experiment: str, sweep: str, sweep_params: dict[str, Any]) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep = sweep
        self.sweep_params = sweep_params
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self._logged_steps: dict[str, set[int]] = {}
        self._ended: set[str] = set()  # Tune trial ids that completed or failed while this driver ran
        self._teacher_runs: dict[str, str] = {}  # teacher key -> MLflow run id
        self._nodes: dict[str, str] = {}  # MLflow run id -> Ray node id of its latest result
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment state
        return self.__dict__ | {"_client": None, "_runs": {}, "_logged_steps": {}, "_ended": set(), "_teacher_runs": {}, "_nodes": {}}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def setup(self, **info: Any) -> None:
        experiment = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.experiment)
        found = self.client.search_runs(
            [self.experiment_id], f"tags.role = 'sweep' and tags.sweep = '{self.sweep}'", max_results=1
        )
        if found:
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.sweep, tags={"role": "sweep", "sweep": self.sweep})
            self.parent_run_id = run.info.run_id
            self.client.log_batch(self.parent_run_id, params=[Param(k, v) for k, v in flatten(self.sweep_params).items()])

    def run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        # One run per Optuna trial: found again after a resume, also when a killed driver's trial is replayed
        # under a new Tune trial id (see PerCellOptunaSearch._orphan).
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.sweep = '{self.sweep}' and tags.optuna_study = '{trial.config['optuna_study']}' "
            f"and tags.optuna_trial = '{trial.config['optuna_trial']}'", max_results=1,
        )
        if found:  # resumed sweep or restarted trial: keep logging into the same run
            run_id = found[0].info.run_id
            history = self.client.get_metric_history(run_id, "val_avg_acc")
            self._logged_steps[run_id] = {m.step for m in history}
            self.client.update_run(run_id, status="RUNNING")
            if found[0].data.tags.get("tune_trial_id") != trial.trial_id:
                self.client.set_tag(run_id, "tune_trial_id", trial.trial_id)
        else:
            config = trial.config
            run_cfg = config["run"]
            cell = config["cell"]
            name = f"{cell}#{config['optuna_trial']}"
            tags = {
                MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: name, "role": "trial", "sweep": self.sweep,
                "cell": cell, "tune_trial_id": trial.trial_id, "status": "running",
                "teacher": (run_cfg["teacher"] or {}).get("preset", "none"), "student": run_cfg["student"]["preset"],
                "method": run_cfg["prompt"]["method"], "kd": run_cfg["distill"]["method"], "dataset": run_cfg["data"]["name"],
                "seed": str(run_cfg["train"]["seed"]), "optuna_study": config["optuna_study"], "optuna_trial": str(config["optuna_trial"]),
            }
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            params = flatten(run_cfg) | {f"tuned.{k}": str(v) for k, v in config["tuned"].items()}
            items = [Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=items[start : start + 100])
            self._logged_steps[run_id] = set()
        self._runs[trial.trial_id] = run_id
        return run_id

    def teacher_run_id(self, key: str, trial) -> str:
        """The sweep's one MLflow run for the stored teacher `key` (found again by tag after a resume)."""
        if key in self._teacher_runs:
            return self._teacher_runs[key]
        found = self.client.search_runs(
            [self.experiment_id], f"tags.sweep = '{self.sweep}' and tags.role = 'teacher' and tags.teacher_key = '{key}'", max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            self._logged_steps[run_id] = {m.step for m in self.client.get_metric_history(run_id, "val_avg_acc")}
            if found[0].info.status == "KILLED":  # partial in an interrupted sweep; trials may take it further
                self.client.update_run(run_id, status="RUNNING")
        else:
            run_cfg = trial.config["run"]
            teacher, method = run_cfg["teacher"]["preset"], run_cfg["prompt"]["method"]
            dataset, seed = run_cfg["data"]["name"], run_cfg["train"]["seed"]
            name = f"teacher {teacher}.{method}.{dataset}.s{seed} [{key[:8]}]"
            tags = {
                MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: name, "role": "teacher", "sweep": self.sweep,
                "teacher_key": key, "teacher": teacher, "method": method, "dataset": dataset, "seed": str(seed),
                "query_backbone": run_cfg["student"]["preset"] if run_cfg["query"] == "student" else "own", "status": "running",
            }
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            # What the teacher depends on: everything but the student-side distillation settings
            params = [Param(k, v) for k, v in flatten({k: v for k, v in run_cfg.items() if k != "distill"}).items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start : start + 100])
            self._logged_steps[run_id] = set()
        self._teacher_runs[key] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        run_id = self.run_id(trial)
        step = int(result["task"])
        key = result.get("teacher_key")
        if key is not None:
            self._log_teacher(key, trial, result, step)
        if step in self._logged_steps[run_id]:
            return
        if key is not None and step == 1:
            self.client.set_tag(run_id, "teacher_key", key)
            self.client.set_tag(run_id, "teacher_run_id", self._teacher_runs[key])
        if "node_id" in result and self._nodes.get(run_id) != result["node_id"]:  # where it ran (changes on a retry)
            self.client.set_tag(run_id, "node_id", result["node_id"])
            self._nodes[run_id] = result["node_id"]
        metrics = [
            Metric(k, float(v), int(result.get("timestamp", 0)) * 1000, step)
            for k, v in _numeric(result).items() if key is None or not k.startswith("teacher_")  # a stored teacher's are in its own run
        ]
        self.client.log_batch(run_id, metrics=metrics)
        self._logged_steps[run_id].add(step)

    def _log_teacher(self, key: str, trial, result: dict, step: int) -> None:
        """The teacher's metrics after task `step`, once, whichever trial reports them first."""
        run_id = self.teacher_run_id(key, trial)
        if step in self._logged_steps[run_id]:
            return
        timestamp = int(result.get("timestamp", 0)) * 1000
        metrics = [Metric(k.removeprefix("teacher_"), float(v), timestamp, step) for k, v in _numeric(result).items() if k.startswith("teacher_")]
        self.client.log_batch(run_id, metrics=metrics)
        self._logged_steps[run_id].add(step)
        if step == result["n_tasks"]:
            with tempfile.TemporaryDirectory() as tmp:
                for path in save_matrix_artifacts(json.loads(result["teacher_test_matrix"]), Path(tmp), f"teacher [{key[:8]}]"):
                    self.client.log_artifact(run_id, str(path))
            self.client.set_tag(run_id, "status", "completed")
            self.client.set_terminated(run_id, "FINISHED")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        run_id = self.run_id(trial)
        last = trial.last_result or {}
        status = trial_status(last)
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "config.json").write_text(json.dumps(trial.config["run"], indent=1))
            self.client.log_artifact(run_id, str(directory / "config.json"))
            if "test_matrix" in last:
                for path in save_matrix_artifacts(json.loads(last["test_matrix"]), directory, trial.config["cell"]):
                    self.client.log_artifact(run_id, str(path))
        self.client.set_tag(run_id, "status", status)
        if status == "pruned":
            self.client.set_tag(run_id, "pruned_after_task", str(last["task"]))
        self.client.set_terminated(run_id, "FINISHED")
        self._ended.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "status", "failed")
        self.client.set_terminated(run_id, "FAILED")
        self._ended.add(trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        counts = dict.fromkeys(("completed", "pruned", "failed", "interrupted"), 0)  # zeros too: a resume overwrites
        for trial in trials:
            # An interrupt (Ctrl-C) leaves trials pending, and Tune marks the running ones TERMINATED like finished
            # ones: those are the trials this driver ran but never saw end.
            if trial.status not in ("TERMINATED", "ERROR") or (trial.trial_id in self._runs and trial.trial_id not in self._ended):
                status = "interrupted"
            else:
                status = "failed" if trial.status == "ERROR" else trial_status(trial.last_result)
            counts[status] += 1
        now = int(time.time() * 1000)  # a resumed sweep's counts must be the latest values, not tie with the old ones
        self.client.log_batch(self.parent_run_id, metrics=[Metric(f"trials_{k}", v, now, 0) for k, v in counts.items()])
        for run_id in self._teacher_runs.values():  # a teacher whose trials all stopped before the last task
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_tag(run_id, "status", "partial")
                self.client.set_terminated(run_id, "KILLED")
        finished = sum(n for status, n in counts.items() if status != "interrupted")
        self.client.set_terminated(self.parent_run_id, "FINISHED" if finished >= self.sweep_params["trials"] else "KILLED")
