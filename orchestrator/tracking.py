"""MLflow tracking of a sweep, written by the Tune driver only.

One experiment per sweep, one parent run for the sweep, one child run per trial (named after its cell and Optuna
trial) with the whole config as params, cell/status tags, per-task metrics with step = task, and artifacts
(resolved config; accuracy matrix as CSV and heatmap and accuracy curve, drawn by the trial itself and copied
from its last checkpoint). A stored teacher, shared by many trials, gets one teacher run (role=teacher, tagged
with its teacher_key) holding its metrics once; each trial using it carries the teacher_key and teacher_run_id
tags. Only the driver writes, so concurrent trials never contend for the default sqlite store; on resume, runs
are found again by tag and steps already logged are not logged twice.

Writes go through an outbox drained in order by one thread: Tune's loop never waits on MLflow, and while the
tracking server is unreachable the writes wait and are retried (each one is idempotent: find-or-create runs,
steps logged once), so trials keep training and nothing is lost or duplicated when it is back. If it is still
down when the sweep ends, `unwritten` says how many writes are missing (the sweep reports it as an error;
every result is in Tune's storage either way).
"""
from __future__ import annotations

import collections
import copy
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from orchestrator.artifacts import ARTIFACT_FILES, save_matrix_artifacts
from orchestrator.errors import CONFIG_ERROR

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
    if not last_result or "task" not in last_result or CONFIG_ERROR in last_result:
        return "failed"
    return "completed" if last_result["task"] >= last_result["n_tasks"] else "pruned"


log = logging.getLogger(__name__)

# The tracking callback of each sweep running in this process, by sweep name. Tune unpickles its own copy of
# the callback when a sweep is resumed, so the driver finds the live one here to ask what stayed unwritten.
LIVE: dict[str, "MlflowTracking"] = {}


def unreachable(err: Exception) -> bool:
    """A write that failed because the tracking server is down or overloaded (worth retrying), not a bad request."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or ("API request to" in str(err) and "failed with exception" in str(err))
    return type(err).__module__.startswith(("requests", "urllib3"))


class Outbox:
    """Writes done in order by one background thread; a write that fails because the server is unreachable is
    retried (backing off up to `max_wait` seconds) until it succeeds, so later writes never overtake it."""

    def __init__(self, max_wait: float = 10.0) -> None:
        self.max_wait = max_wait
        self.jobs: collections.deque[Callable[[], None]] = collections.deque()
        self.changed = threading.Condition()
        self.busy = False
        self.down_since: float | None = None  # when the server stopped answering (None: it answers)
        self.thread = threading.Thread(target=self._drain_forever, name="mlflow-outbox", daemon=True)
        self.thread.start()

    def put(self, job: Callable[[], None]) -> None:
        with self.changed:
            self.jobs.append(job)
            self.changed.notify_all()

    def pending(self) -> int:
        with self.changed:
            return len(self.jobs) + self.busy

    def flush(self, timeout: float) -> bool:
        """Wait until every write is done; False if some are still waiting after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.jobs or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
        return True

    def _drain_forever(self) -> None:
        while True:
            with self.changed:
                while not self.jobs:
                    self.changed.wait()
                job, self.busy = self.jobs[0], True
            wait = 1.0
            while True:
                try:
                    job()
                    break
                except Exception as err:  # noqa: BLE001 - one bad write must not stop tracking
                    if not unreachable(err):
                        log.error("MLflow rejected a write, skipping it: %s", err)
                        break
                    if self.down_since is None:
                        self.down_since = time.time()
                        log.warning("MLflow is unreachable (%s); trials keep training, writes wait and are retried", type(err).__name__)
                    time.sleep(wait)
                    wait = min(2 * wait, self.max_wait)
            if self.down_since is not None:
                log.warning("MLflow is reachable again after %.0f s; writing what waited", time.time() - self.down_since)
                self.down_since = None
            with self.changed:
                self.jobs.popleft()
                self.busy = False
                self.changed.notify_all()


def _snapshot(trial, with_last_result: bool = True) -> SimpleNamespace:
    """What the writes need of a Tune trial, copied now: the trial object keeps changing while writes wait.
    A result's own write gets the result itself, so it skips copying the trial's last result again."""
    last = copy.deepcopy(trial.last_result) if with_last_result else None
    checkpoint = trial.checkpoint if with_last_result else None  # its latest task's, with the trial's artifacts
    return SimpleNamespace(trial_id=trial.trial_id, config=trial.config, status=trial.status, last_result=last, checkpoint=checkpoint)


def _numeric(result: dict) -> dict[str, float]:
    """The metrics of a Tune result, without Tune's own bookkeeping."""
    return {
        k: v for k, v in result.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("task", "n_tasks", "timestamp", "pid")
        and not k.startswith(("time_", "timesteps_", "episodes_", "iterations_", "training_iteration", "done"))
    }


def copy_artifacts(checkpoint, directory: Path) -> None:
    """The accuracy artifacts the trial saved with its latest checkpoint (on any storage Tune uses) into `directory`."""
    if checkpoint is None:
        return
    for name in ARTIFACT_FILES:
        try:
            with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as stream:
                (directory / name).write_bytes(stream.read())
        except FileNotFoundError:  # a trial that stopped before its first task
            continue


class MlflowTracking(Callback):
    def __init__(
        self, tracking_uri: str, experiment: str, sweep: str, sweep_params: dict[str, Any], flush_timeout: float = 120.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.flush_timeout = flush_timeout
        self._outbox: Outbox | None = None
        self.unwritten = 0  # writes still missing when the sweep ended (server down)
        self.experiment = experiment
        self.sweep = sweep
        self.sweep_params = sweep_params
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self._logged_steps: dict[str, set[int]] = {}
        self._ended: set[str] = set()  # Tune trial ids that completed or failed while this driver ran
        self._teacher_runs: dict[str, str] = {}  # teacher key -> MLflow run id
        self._nodes: dict[str, str] = {}  # MLflow run id -> Ray node id of its latest result
        self._finished: set[str] = set()  # MLflow runs found already FINISHED (after a driver restart)
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment state
        return self.__dict__ | {"_client": None, "_outbox": None, "_runs": {}, "_logged_steps": {}, "_ended": set(),
                                "_teacher_runs": {}, "_nodes": {}, "_finished": set()}

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox()
        return self._outbox

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def setup(self, **info: Any) -> None:
        LIVE[self.sweep] = self
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
        config = trial.config
        params = flatten(config["run"]) | {f"tuned.{k}": str(v) for k, v in config["tuned"].items()}
        if found:  # resumed sweep or restarted trial: keep logging into the same run
            run_id = found[0].info.run_id
            self._log_missing_params(found[0], params)
            history = self.client.get_metric_history(run_id, "val_avg_acc")
            self._logged_steps[run_id] = {m.step for m in history}
            if found[0].info.status == "FINISHED":
                # Finished before a killed driver's last snapshot recorded it: Tune restarts it from its final
                # checkpoint and it ends at once. Its run stays as it is.
                self._finished.add(run_id)
            else:
                self.client.update_run(run_id, status="RUNNING")
            if found[0].data.tags.get("tune_trial_id") != trial.trial_id:
                self.client.set_tag(run_id, "tune_trial_id", trial.trial_id)
        else:
            run_cfg = config["run"]
            cell = config["cell"]
            name = f"{cell}#{config['optuna_trial']}"
            tags = {
                MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: name, "role": "trial", "sweep": self.sweep,
                "cell": cell, "tune_trial_id": trial.trial_id, "status": "running",
                "teacher": (run_cfg["teacher"] or {}).get("preset", "none"), "student": run_cfg["student"]["preset"],
                "method": run_cfg["prompt"]["method"], "kd": run_cfg["distill"]["method"], "dataset": run_cfg["data"]["name"],
                "seed": str(run_cfg["train"]["seed"]), "optuna_study": config["optuna_study"], "optuna_trial": str(config["optuna_trial"]),
                "setting": config.get("setting", "tuned"),  # "default": the cell's first trial, at the methods' defaults
            }
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            self._log_params(run_id, params)
            self._logged_steps[run_id] = set()
        self._runs[trial.trial_id] = run_id
        return run_id

    def _log_missing_params(self, run, params: dict[str, str]) -> None:
        """A run found again may have been created just before the server went down, its params not yet
        logged (the retried write then finds the run): log what it lacks."""
        missing = {k: v for k, v in params.items() if k not in run.data.params}
        if missing:
            self._log_params(run.info.run_id, missing)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start : start + 100])

    def teacher_run_id(self, key: str, trial) -> str:
        """The sweep's one MLflow run for the stored teacher `key` (found again by tag after a resume)."""
        if key in self._teacher_runs:
            return self._teacher_runs[key]
        found = self.client.search_runs(
            [self.experiment_id], f"tags.sweep = '{self.sweep}' and tags.role = 'teacher' and tags.teacher_key = '{key}'", max_results=1,
        )
        # What the teacher depends on: everything but the student-side distillation settings
        params = flatten({k: v for k, v in trial.config["run"].items() if k != "distill"})
        if found:
            run_id = found[0].info.run_id
            self._log_missing_params(found[0], params)
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
            self._log_params(run_id, params)
            self._logged_steps[run_id] = set()
        self._teacher_runs[key] = run_id
        return run_id

    # Tune's hooks only queue the writes (see Outbox); the methods after them do the writing.
    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        snapshot = _snapshot(trial, with_last_result=False)
        self.outbox.put(lambda: self.run_id(snapshot))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        snapshot, result = _snapshot(trial, with_last_result=False), copy.deepcopy(result)
        self.outbox.put(lambda: self._write_result(snapshot, result))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        snapshot = _snapshot(trial)
        self._ended.add(trial.trial_id)
        self.outbox.put(lambda: self._write_complete(snapshot))

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        snapshot = _snapshot(trial)
        self._ended.add(trial.trial_id)
        self.outbox.put(lambda: self._write_error(snapshot))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        snapshots = [_snapshot(trial) for trial in trials]
        self.outbox.put(lambda: self._write_experiment_end(snapshots))
        if not self.outbox.flush(self.flush_timeout):
            self.unwritten = self.outbox.pending()
            log.error("MLflow stayed unreachable: %d writes not done", self.unwritten)

    def _write_result(self, trial, result: dict) -> None:
        run_id = self.run_id(trial)
        if CONFIG_ERROR in result:
            self.client.set_tag(run_id, "error", result[CONFIG_ERROR])
            return
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
        if run_id in self._finished:  # a new task after all: the run continues
            self._finished.discard(run_id)
            self.client.update_run(run_id, status="RUNNING")
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

    def _write_complete(self, trial) -> None:
        run_id = self.run_id(trial)
        if run_id in self._finished:  # completed and tracked before the driver restarted
            return
        last = trial.last_result or {}
        status = trial_status(last)
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "config.json").write_text(json.dumps(trial.config["run"], indent=1))
            copy_artifacts(trial.checkpoint, directory)
            self.client.log_artifacts(run_id, str(directory))
        self.client.set_tag(run_id, "status", status)
        if status == "pruned":
            self.client.set_tag(run_id, "pruned_after_task", str(last["task"]))
        self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")

    def _write_error(self, trial) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "status", "failed")
        self.client.set_terminated(run_id, "FAILED")

    def _write_experiment_end(self, trials: list) -> None:
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
