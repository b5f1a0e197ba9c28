"""MLflow and Optuna on one real PostgreSQL, as `ray_cluster.yaml` runs them on the head: a PostgreSQL server started
here (Debian's `postgresql`, installed by `.ci/run`), an `mlflow server` whose backend store is its `mlflow`
database, and the sweep's Optuna storage in its `optuna` database. A sweep of 8 near-no-op trials, all at once,
must leave every trial's metrics in MLflow once per step, every Optuna trial in a final state, and no lock,
serialization or duplicate-key error in any log."""
from __future__ import annotations

import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from ray import cloudpickle

from postgres import PostgresServer
from sweep_checks import (
    KD_ALPHA, TINY, MlflowServer, check_optuna_matches_mlflow, check_tracked_sweep, mlflow_runs, write_space,
)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sweep_overhead.py"
SWEEP, CONCURRENT, PER_CELL, N_TASKS = "pg", 8, 4, 5  # 2 cells x 4 trials, all 8 at once, 5 reports each
# What a lock, a serialization failure or a write raced by another writer prints, in PostgreSQL's log, MLflow's
# server log (psycopg2's exception names) or the sweep's log.
TROUBLE = re.compile(r"deadlock|could not serialize|database is locked|UniqueViolation|duplicate key|SerializationFailure"
                     r"|lock timeout|LockNotAvailable|IntegrityError|OperationalError", re.I)
# The one expected: Optuna's create_study(load_if_exists=True) inserts the study and, when it exists, catches the
# duplicate key; the sweep reopens each cell's study that way once after the trials (its summary).
REOPENED_STUDY = 'duplicate key value violates unique constraint "ix_studies_study_name"'

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """bench/sweep_overhead.py, whose fake_metrics are the keys a real trial reports, with values that never prune."""
    spec = importlib.util.spec_from_file_location("sweep_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)  # bench/ is no package: Ray's workers could not import it by name
    yield module
    cloudpickle.unregister_pickle_by_value(module)


def barrier_trial(fake_metrics):
    """bench/sweep_overhead.py's no-op trial (reporting `fake_metrics`), held at its start until CONCURRENT trials
    have started (so they run at once, not one after another), recording its time span; its last checkpoint holds
    the accuracy artifacts (tiny stand-ins) that the tracking copies into MLflow, as train_cdl's does. A closure, so
    Ray's workers get it by value (tests/ is no package)."""

    def barrier_noop(config, teachers=None, log_file=None):
        import ray
        from ray import tune

        folder = Path(config["run"]["data"]["root"])
        label = f"{config['cell']}.{config['optuna_trial']}"
        start = time.time()
        (folder / f"start-{label}").write_text(str(start))
        while len(list(folder.glob("start-*"))) < CONCURRENT and time.time() < start + 60:
            time.sleep(0.05)
        n_tasks = config["run"]["data"]["n_tasks"]
        node_id = ray.get_runtime_context().get_node_id()
        for task in range(1, n_tasks + 1):
            with tempfile.TemporaryDirectory() as name:
                directory = Path(name)
                (directory / "run_state.pt").write_bytes(bytes(1024))
                if task == n_tasks:
                    for artifact in ("accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_curve.png"):
                        (directory / artifact).write_bytes(b"stand-in")
                tune.report(fake_metrics(task, n_tasks) | {"node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(str(directory)))
        (folder / f"span-{label}").write_text(f"{start} {time.time()}")

    return barrier_noop


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # an end before a start at a tie
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


@pytest.fixture
def postgres():
    server = PostgresServer(databases=("mlflow", "optuna"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.slow  # ~75 s on a busy 2-core machine: PostgreSQL, an MLflow server (tables created), a local Ray
def test_a_sweep_of_8_concurrent_trials_on_mlflow_and_optuna_in_one_postgresql(postgres, bench, tmp_path, monkeypatch):
    import ray

    from orchestrator.space import load_space
    from orchestrator.plan import make_plan
    from orchestrator.sweep import build_parser, run_sweep

    for name, value in {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
                        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", "MLFLOW_CONFIGURE_LOGGING": "false",
                        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
        monkeypatch.setenv(name, value)  # what run_sweep sets for its process, undone after this test
    spans = tmp_path / "spans"
    spans.mkdir()
    mlflow_server = MlflowServer(tmp_path, postgres.url("mlflow"), workers=2)
    space_file = write_space(tmp_path, SWEEP, KD_ALPHA, pairs=[("demo-t", "demo-s")], kd_methods=["kd", "dkd"],
                             trials_per_cell=PER_CELL, cpus_per_trial=0.25,
                             base=TINY | {"data.n_tasks": N_TASKS, "data.root": str(spans)})
    optuna_url = postgres.url("optuna")
    args = build_parser().parse_args([
        "--space", space_file, "--name", SWEEP, "--tracking-uri", mlflow_server.url, "--optuna-storage", optuna_url,
        "--storage-path", str(tmp_path / "results"), "--no-teacher-reuse", "--max-concurrent", str(CONCURRENT),
    ])
    space = load_space(args.space)
    plan = make_plan(space)
    assert plan.total_trials == 2 * PER_CELL
    try:
        mlflow_server.launch()  # creating its tables while Ray starts
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)  # 8 trials of 0.25 CPU
        mlflow_server.wait()
        try:
            assert run_sweep(space, plan, args, trainable=barrier_trial(bench.fake_metrics)) == 0
        finally:
            ray.shutdown()

        # 8 trials ran at once: each of the first 8 waited at the barrier until all 8 had started
        times = [tuple(map(float, path.read_text().split())) for path in spans.glob("span-*")]
        assert len(times) == plan.total_trials
        assert most_at_once(times) == CONCURRENT, times

        # MLflow: every trial FINISHED and completed, each metric once per task, through the API and (below) in the
        # database itself
        children = check_tracked_sweep(mlflow_server.url, SWEEP, SWEEP, n_tasks=N_TASKS, expected_trials=plan.total_trials)
        assert {(c.info.status, c.data.tags["status"]) for c in children} == {("FINISHED", "completed")}
        client, parent, _ = mlflow_runs(mlflow_server.url, SWEEP)
        assert parent.data.metrics["trials_completed"] == plan.total_trials and parent.data.metrics["trials_failed"] == 0
        check_optuna_matches_mlflow(optuna_url, SWEEP, client, children)
    finally:
        mlflow_server.stop()
    reported = {k for k in bench.fake_metrics(N_TASKS, N_TASKS) if k not in ("task", "n_tasks", "test_matrix")}
    rows = postgres.query("mlflow", "SELECT m.run_uuid, m.key, array_agg(m.step ORDER BY m.step) FROM metrics m "
                                    "JOIN tags t ON t.run_uuid = m.run_uuid AND t.key = 'role' AND t.value = 'trial' "
                                    "GROUP BY m.run_uuid, m.key")
    by_run: dict[str, set[str]] = {}
    for run, key, logged in rows:
        first = int(key.removeprefix("test_acc_task")) if key.startswith("test_acc_task") else 1  # a task's accuracy from its task on
        assert logged == list(range(first, N_TASKS + 1)), (run, key, logged)
        by_run.setdefault(run, set()).add(key)
    assert len(by_run) == plan.total_trials
    assert all(keys >= reported for keys in by_run.values()), [reported - keys for keys in by_run.values()]

    # Optuna: every trial of every study in a final state, COMPLETE here (the stand-in metrics never prune)
    studies = optuna.get_all_study_summaries(optuna_url)
    assert sorted(s.study_name for s in studies) == sorted(f"{SWEEP}/{c.key}" for c in plan.cells)  # the probe study is gone
    states = [t.state for s in studies for t in optuna.load_study(study_name=s.study_name, storage=optuna_url).trials]
    assert len(states) == plan.total_trials and set(states) == {optuna.trial.TrialState.COMPLETE}, states
    assert postgres.query("optuna", "SELECT state::text, count(*) FROM trials GROUP BY state") == [("COMPLETE", plan.total_trials)]

    # no lock, serialization or duplicate-key error anywhere
    logs = {"PostgreSQL": postgres.log.read_text(), "MLflow server": mlflow_server.log.read_text(),
            "sweep": (tmp_path / "results" / SWEEP / "sweep.log").read_text()}
    trouble = {name: [line for line in text.splitlines() if TROUBLE.search(line)] for name, text in logs.items()}
    reopened = [line for line in trouble["PostgreSQL"] if REOPENED_STUDY in line]
    assert len(reopened) <= len(plan.cells), reopened
    trouble["PostgreSQL"] = [line for line in trouble["PostgreSQL"] if line not in reopened]
    assert trouble == {name: [] for name in logs}, trouble
