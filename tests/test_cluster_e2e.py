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

import pytest
from mlflow.tracking import MlflowClient

from sweep_checks import (
    COMPLETE, TINY, check_one_trial_tracked_once, check_optuna_matches_mlflow, check_tracked_sweep, finish, mlflow_runs,
    one_trial_at_task_2, optuna_trials, ray_nodes, rows_so_far, sweep_cli, tune_rows, wait_for, write_space,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forbid_demo_pretraining")]


@pytest.fixture(scope="module")
def cluster():
    with ray_nodes([1, 1]) as nodes:
        yield nodes


# -- a trial's worker process is killed mid-sequence ------------------------------------------------------------
def test_a_trial_whose_worker_is_killed_is_retried_from_its_last_task_and_tracked_once(cluster, tmp_path):
    n_tasks = 5
    driver, before = one_trial_at_task_2(cluster, tmp_path, "workerkill", "cdl_prompt")
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

    check_one_trial_tracked_once(tmp_path, "workerkill", n_tasks)


# -- the driver is killed mid-sweep -----------------------------------------------------------------------------
SLOW_SECOND = """
lr = trial.suggest_float("lr", 1e-3, 1e-2, log=True)
return {"train.lr": lr, "train.epochs": 6 if trial.number == 1 else 1}
"""


def test_a_killed_driver_resumes_without_rerunning_finished_trials_or_duplicating_runs(cluster, tmp_path):
    n_tasks, n_trials = 5, 4
    space = write_space(tmp_path, "driverkill", SLOW_SECOND, pairs=[(None, "demo-s")], kd_methods=[],
                        trials_per_cell=n_trials, pruner="none", pruner_args={}, base=TINY | {"data.train_per_class": 30})
    driver = sweep_cli(cluster, tmp_path, "--space", space, "--name", "driverkill", "--max-concurrent", "2", log="first.log")

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

    finish(sweep_cli(cluster, tmp_path, "--space", space, "--name", "driverkill", "--resume", log="resume.log"), tmp_path, log="resume.log")
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
