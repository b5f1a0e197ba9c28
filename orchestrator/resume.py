"""The arguments a sweep started with, recorded beside Tune's experiment, and what `--resume` may change.

A resumed sweep must write into the same space, stores and services it started with: those arguments are
refused when they differ, naming each difference. Concurrency, retries and the MLflow wait may change; Tune
keeps them in its pickled experiment, so a resume sets them on the restored Tuner (see `apply_adjustable`).
The new retry count applies to every trial; the concurrency limit to the trials the search starts after the
resume (Tune restarts the interrupted ones as resources allow).
"""
from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback

from orchestrator.errors import SweepError

RECORD_FILE = "sweep_args.json"
FIXED = ("space", "tracking_uri", "optuna_storage", "storage_path", "teacher_store")
ADJUSTABLE = ("max_concurrent", "max_failures", "mlflow_wait")
FLAGS = {"space": "--space", "tracking_uri": "--tracking-uri", "optuna_storage": "--optuna-storage",
         "storage_path": "--storage-path", "teacher_store": "--teacher-store (or --no-teacher-reuse)",
         "max_concurrent": "--max-concurrent", "max_failures": "--max-failures", "mlflow_wait": "--mlflow-wait"}


def _filesystem(experiment_path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in experiment_path:
        return pafs.FileSystem.from_uri(experiment_path)
    return pafs.LocalFileSystem(), experiment_path


def write_record(experiment_path: str, record: dict[str, Any]) -> None:
    fs, path = _filesystem(experiment_path)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{RECORD_FILE}") as out:
        out.write(json.dumps(record, indent=1, sort_keys=True).encode())


def read_record(experiment_path: str) -> dict[str, Any] | None:
    fs, path = _filesystem(experiment_path)
    try:
        with fs.open_input_stream(f"{path}/{RECORD_FILE}") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def check_resume(recorded: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """Refuse a resume that changes a fixed argument; return what changes among the adjustable ones."""
    if recorded is None:
        return []  # a sweep started before arguments were recorded: nothing to compare with
    fixed = [f"{FLAGS[k]} was {recorded.get(k)!r}, now {now[k]!r}" for k in FIXED if recorded.get(k) != now[k]]
    if fixed:
        raise SweepError(
            f"--resume cannot change where the sweep reads and writes: {'; '.join(fixed)}; rerun with the sweep's own "
            "arguments (they are recorded in its " + RECORD_FILE + ")"
        )
    return [f"{FLAGS[k]} {recorded.get(k)!r} -> {now[k]!r}" for k in ADJUSTABLE if recorded.get(k) != now[k]]


class RetryLimit(Callback):
    """Gives every trial that starts the resumed sweep's retry count: restored trials keep the one they were
    created with otherwise."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial.max_failures = self.max_failures


def apply_adjustable(tuner: Any, now: dict[str, Any], tracking_callback_type: type) -> None:
    """Set the adjustable arguments on a restored Tuner. Tune has no public way to change its pickled
    TuneConfig/RunConfig on restore; its TunerInternal reads these attributes when `fit` starts the run."""
    internal = tuner._local_tuner
    internal._tune_config.max_concurrent_trials = now["max_concurrent"] or None
    internal._run_config.failure_config.max_failures = now["max_failures"]
    callbacks = [c for c in internal._run_config.callbacks or [] if not isinstance(c, RetryLimit)]
    for callback in callbacks:
        if isinstance(callback, tracking_callback_type):
            callback.flush_timeout = now["mlflow_wait"]
    internal._run_config.callbacks = [*callbacks, RetryLimit(now["max_failures"])]
