"""The cluster as `ray up` leaves it: a head with 0 CPUs and no worker, under Ray's real autoscaler (the fake
multi-node provider: worker nodes are local processes the autoscaler starts and stops). The sweep must start
there, let the autoscaler bring the workers, and survive losing one.

Every sweep runs the real CLI in a subprocess joined through `--address`, as on a cluster's head; the fixture
stops every process it started and checks that none is left.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweep_checks import (
    KD_ALPHA, TINY, alive_nodes, autoscaling_cluster, check_one_trial_tracked_once, check_optuna_matches_mlflow,
    check_tracked_sweep, finish, one_trial_at_task_2, sweep_cli, tune_rows, write_space,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forbid_demo_pretraining")]

WORKER_TYPE = "cpu1"


@pytest.fixture(scope="module")
def cluster():
    with autoscaling_cluster({WORKER_TYPE: {"CPU": 1}}, max_workers=2) as running:
        running.head = alive_nodes(running.address, running.env)
        assert len(running.head) == 1  # the head alone, as right after `ray up`
        yield running


def test_a_trial_no_node_type_holds_is_refused_in_one_line_naming_the_largest_type(cluster, tmp_path):
    space = write_space(tmp_path, "toobig", KD_ALPHA, pairs=[(None, "demo-s")], kd_methods=[], trials_per_cell=1)
    process = sweep_cli(cluster, tmp_path, "--space", space, "--name", "toobig", "--cpus-per-trial", "2")
    process.wait(timeout=120)
    errors = [line for line in (tmp_path / "sweep.log").read_text().splitlines() if line.startswith("error:")]
    assert process.returncode == 2
    assert errors == [
        "error: space 'toobig' cannot run on this cluster: a trial asks for 2 CPU, 0 GPU, and neither a node that is up "
        f"nor a node type the autoscaler can add holds it (the largest type, '{WORKER_TYPE}', has 1 CPU, 0 GPU); add a "
        "node type that does, or lower the request with --cpus-per-trial / --gpus-per-trial"]
    assert not (tmp_path / "ray_results" / "toobig" / "tuner.pkl").exists()  # stopped before Tune saved an experiment


def test_the_smoke_sweep_starts_on_the_head_alone_and_runs_on_the_workers_the_autoscaler_adds(cluster, tmp_path):
    space = tmp_path / "smoke_synthetic.py"
    space.write_text(
        "from dataclasses import replace\n\nfrom search_spaces.smoke import SPACE as SMOKE\n\n"
        f"SPACE = replace(SMOKE, name='smoke_synthetic', datasets=['synthetic'], methods=['l2p'], kd_methods=['kd'], "
        f"trials_per_cell=2, base={TINY!r})\n"
    )
    start = time.monotonic()
    text = finish(sweep_cli(cluster, tmp_path, "--space", str(space), "--name", "autoscaled"), tmp_path)
    minutes = (time.monotonic() - start) / 60
    assert (f"[sweep] waiting for the autoscaler: 3 trials pending, each needs 1 CPU, 0 GPU, which node type "
            f"'{WORKER_TYPE}' holds (1 CPU, 0 GPU a node, up to 2 nodes)") in text
    rows = tune_rows(tmp_path / "ray_results" / "autoscaled")
    assert len(rows) == 3  # the kd cell's 2 trials and the cell alone
    used = {row["node_id"] for trial in rows.values() for row in trial}
    workers = set(alive_nodes(cluster.address, cluster.env)) - set(cluster.head)
    # both workers the sweep asked for at once (request_resources), none of it on the 0-CPU head
    assert len(used) == 2 and used <= workers, (used, workers, cluster.head)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    children = check_tracked_sweep(uri, "autoscaled", "autoscaled", n_tasks=5, expected_trials=3)
    assert {c.data.tags["node_id"] for c in children} == used
    check_optuna_matches_mlflow(f"sqlite:///{tmp_path / 'optuna.db'}", "autoscaled", MlflowClient(uri), children)
    print(f"autoscaled smoke sweep: {minutes:.1f} min")


def node_processes(node_id: str) -> list[int]:
    """Every process of the fake worker node `node_id`: its raylet (the provider starts it with the node id in its
    environment) and all the raylet's descendants (the agents and the workers, the trial's among them)."""
    parents: dict[int, int] = {}
    raylets = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in environ and b"raylet" in (entry / "cmdline").read_bytes():
            raylets.append(int(entry.name))
    assert len(raylets) == 1, f"no single raylet of node {node_id}: {raylets}"
    found, frontier = set(raylets), list(raylets)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return sorted(found)


def test_a_trial_whose_node_is_lost_resumes_on_another_node_from_its_checkpoint_and_is_tracked_once(cluster, tmp_path):
    n_tasks = 5
    driver, before = one_trial_at_task_2(cluster, tmp_path, "nodeloss", "kd")
    lost = before[-1]["node_id"]
    assert lost not in cluster.head
    for pid in node_processes(lost):  # the whole node at once: raylet, agents, workers
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finish(driver, tmp_path)

    (rows,) = tune_rows(tmp_path / "ray_results" / "nodeloss").values()
    assert [r["task"] for r in rows] == list(range(1, n_tasks + 1))  # every task reported once, none lost
    last_before = max(r["task"] for r in rows if r["node_id"] == lost)
    after = [r for r in rows if r["node_id"] != lost]
    assert after and after[0]["task"] == last_before + 1 and after[0]["iterations_since_restore"] == 1  # from its checkpoint
    assert lost not in alive_nodes(cluster.address, cluster.env)
    assert sum(r["trained_teacher_task"] for r in rows) == n_tasks  # each teacher task trained and stored once
    assert after[0]["trained_teacher_task"] == 1  # the teacher task the lost node was training, taken over

    run = check_one_trial_tracked_once(tmp_path, "nodeloss", n_tasks)
    assert run.data.tags["node_id"] == after[-1]["node_id"]
