"""A fixed multi-node Ray cluster on this machine, and the sweep surviving a killed trial worker and a killed
driver. (A sweep across nodes the autoscaler adds, and the loss of a whole node: test_autoscaling_e2e.py.)

The fixture starts the nodes the way the cluster launcher does: `ray start --head` and `ray start --address`
as separate processes, each with its own temp dir and one CPU, with Ray's token authentication (as `ray up`
sets it up). Every sweep runs the real CLI in a subprocess joined to that cluster through `--address`; the
fixture stops every process it started and checks that none is left.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep_checks import (
    COMPLETE, KD_ALPHA, TINY, check_optuna_matches_mlflow, check_tracked_sweep, finish, mlflow_runs,
    optuna_trials, ray_nodes, rows_so_far, steps, tune_rows, wait_for, write_space,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forbid_demo_pretraining")]


@pytest.fixture(scope="module")
def cluster():
    with ray_nodes([1, 1]) as nodes:
        yield nodes


def sweep(cluster, workdir: Path, *args: str, log: str = "sweep.log") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", "--address", cluster.address, *args],
        cwd=workdir, env=cluster.env, stdout=(workdir / log).open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


# -- a trial's worker process is killed mid-sequence ------------------------------------------------------------
def test_a_trial_whose_worker_is_killed_is_retried_from_its_last_task_and_tracked_once(cluster, tmp_path):
    n_tasks = 5
    space = write_space(tmp_path, "workerkill", KD_ALPHA, pairs=[("demo-t", "demo-s")], kd_methods=["cdl_prompt"],
                        trials_per_cell=1, pruner="none", pruner_args={},
                        base=TINY | {"data.train_per_class": 30, "train.epochs": 2})
    driver = sweep(cluster, tmp_path, "--space", space, "--name", "workerkill")

    def reported_task_2():
        trials = rows_so_far(tmp_path, "workerkill")
        return next((rows for rows in trials.values() if len(rows) >= 2), None)

    before = wait_for(reported_task_2, driver, tmp_path, "task 2 of the trial")
    killed = before[-1]["pid"]
    os.kill(killed, signal.SIGKILL)  # the Ray worker process running the trial
    finish(driver, tmp_path)

    (rows,) = tune_rows(tmp_path / "ray_results" / "workerkill").values()
    assert [r["task"] for r in rows] == list(range(1, n_tasks + 1))  # every task reported once, none lost
    last_before = max(r["task"] for r in rows if r["pid"] == killed)
    after = [r for r in rows if r["pid"] != killed]
    assert after and after[0]["task"] == last_before + 1  # continued after its last checkpointed task
    assert after[0]["iterations_since_restore"] == 1  # ... in a restored trial, not from scratch
    assert sum(r["trained_teacher_task"] for r in rows) == n_tasks  # each teacher task stored once

    client, _, (run,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "workerkill")
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert steps(client, run.info.run_id) == list(range(1, n_tasks + 1))
    assert steps(client, run.info.run_id, "test_avg_acc") == list(range(1, n_tasks + 1))
    ((cell, trials),) = optuna_trials(f"sqlite:///{tmp_path / 'optuna.db'}", "workerkill").items()
    assert [t.state for t in trials] == [COMPLETE]
    assert sorted(trials[0].intermediate_values) == list(range(1, n_tasks + 1))


# -- the driver is killed mid-sweep -----------------------------------------------------------------------------
SLOW_SECOND = """
lr = trial.suggest_float("lr", 1e-3, 1e-2, log=True)
return {"train.lr": lr, "train.epochs": 6 if trial.number == 1 else 1}
"""


def test_a_killed_driver_resumes_without_rerunning_finished_trials_or_duplicating_runs(cluster, tmp_path):
    n_tasks, n_trials = 5, 4
    space = write_space(tmp_path, "driverkill", SLOW_SECOND, pairs=[(None, "demo-s")], kd_methods=[],
                        trials_per_cell=n_trials, pruner="none", pruner_args={}, base=TINY | {"data.train_per_class": 30})
    driver = sweep(cluster, tmp_path, "--space", space, "--name", "driverkill", "--max-concurrent", "2", log="first.log")

    def one_done_one_midway():
        trials = rows_so_far(tmp_path, "driverkill")
        done = [rows for rows in trials.values() if len(rows) == n_tasks]
        midway = [rows for rows in trials.values() if 1 <= len(rows) < n_tasks - 1]
        return (done, midway) if done and midway else None

    wait_for(one_done_one_midway, driver, tmp_path, "a finished trial and one midway", log="first.log")
    os.kill(driver.pid, signal.SIGKILL)  # the driver only: the cluster and its storage stay
    driver.wait()
    before = rows_so_far(tmp_path, "driverkill")
    finished_before = {tid for tid, rows in before.items() if len(rows) == n_tasks}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, _, runs_before = mlflow_runs(client.tracking_uri, "driverkill")
    ended = {r.data.tags["tune_trial_id"]: r.info.end_time for r in runs_before if r.info.status == "FINISHED"}

    finish(sweep(cluster, tmp_path, "--space", space, "--name", "driverkill", "--resume", log="resume.log"), tmp_path, log="resume.log")
    after = tune_rows(tmp_path / "ray_results" / "driverkill")
    for tid in finished_before:  # not rerun: no row added
        assert after[tid] == before[tid]
    for tid, rows in after.items():
        tasks = [r["task"] for r in rows]
        assert sorted(set(tasks)) == list(range(1, n_tasks + 1)), (tid, tasks)

    children = check_tracked_sweep(client.tracking_uri, "driverkill", "driverkill", n_tasks=n_tasks, expected_trials=n_trials)
    assert len({c.data.tags["optuna_trial"] for c in children}) == n_trials  # one run per Optuna trial
    for run in children:
        if run.data.tags["tune_trial_id"] in ended:
            assert run.info.end_time == ended[run.data.tags["tune_trial_id"]]  # finished runs untouched
    check_optuna_matches_mlflow(f"sqlite:///{tmp_path / 'optuna.db'}", "driverkill", client, children)
    (trials,) = optuna_trials(f"sqlite:///{tmp_path / 'optuna.db'}", "driverkill").values()
    assert [t.state for t in trials] == [COMPLETE] * n_trials
    parent = mlflow_runs(client.tracking_uri, "driverkill")[1]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == n_trials
