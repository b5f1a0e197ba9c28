"""End-to-end sweeps through real Ray Tune, MLflow and Optuna: tiny spaces on the synthetic stream with random
backbones, one CPU per trial. Ray starts once for the module; `run_sweep`'s own ray.init/ray.shutdown are
turned into no-ops while it runs (the resume test also runs the real CLI, with its own Ray, in a subprocess)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.sweep import main
from sweep_checks import (
    COMPLETE, KD_ALPHA, PRUNED, ROOT, TINY, check_optuna_matches_mlflow, check_tracked_sweep, free_port, mlflow_runs,
    WATCHED, MlflowServer, optuna_trials, reported_tasks, steps, teacher_runs, tune_rows, write_space,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forbid_demo_pretraining")]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    patch = pytest.MonkeyPatch()
    patch.setattr(ray, "init", lambda *args, **kwargs: None)
    patch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
    yield ray
    patch.undo()
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch, ray_cluster) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- 1. a tiny sweep, fully tracked ------------------------------------------------------------------------------
def test_tiny_sweep_runs_concurrent_trials_and_tracks_everything_in_mlflow_and_optuna(workdir, capfd):
    space = write_space(workdir, "tiny", KD_ALPHA)  # cells: demo-t->demo-s kd (2 trials), demo-s alone (1 trial)
    assert main(["--space", space, "--name", "tiny1", "--max-concurrent", "2"]) == 0
    out = capfd.readouterr()
    assert "database is locked" not in out.out + out.err
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    children = check_tracked_sweep(uri, "tiny1", "tiny1", n_tasks=5, expected_trials=3)
    assert sorted(c.data.tags["cell"] for c in children) == [
        "demo-t-demo-s.coda.kd.synthetic.s0", "demo-t-demo-s.coda.kd.synthetic.s0", "none-demo-s.coda.none.synthetic.s0"]
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))  # trials really ran side by side
    kd_runs = [c for c in children if c.data.tags["kd"] == "kd"]
    assert all(0.1 <= float(c.data.params["distill.alpha"]) <= 0.9 for c in kd_runs)
    assert all(c.data.params["distill.alpha"] == c.data.params["tuned.alpha"] for c in kd_runs)
    alone = next(c for c in children if c.data.tags["kd"] == "none")
    assert alone.data.tags["teacher"] == "none" and alone.data.params["teacher"] == "None"
    # the stored teacher's metrics are in its own run, once; the trials using it link to it by tag
    (teacher,) = teacher_runs(MlflowClient(uri), "tiny1")
    assert teacher.info.status == "FINISHED" and "val_avg_acc" in teacher.data.metrics
    assert {c.data.tags["teacher_run_id"] for c in kd_runs} == {teacher.info.run_id}
    assert {c.data.tags["teacher_key"] for c in kd_runs} == {teacher.data.tags["teacher_key"]}
    assert not any(k.startswith("teacher_") for c in children for k in c.data.metrics)
    check_optuna_matches_mlflow(f"sqlite:///{workdir / 'optuna.db'}", "tiny1", MlflowClient(uri), children)
    # a finished trial keeps only its last task's checkpoint (orchestrator.checkpoints), the one its results name
    trial_dirs = [d for d in (workdir / "ray_results" / "tiny1").iterdir() if (d / "result.json").exists()]
    assert len(trial_dirs) == 3
    assert all([c.name for c in d.glob("checkpoint_*")] == ["checkpoint_000004"] for d in trial_dirs)
    # the sweep name is taken: a second run must resume, not silently start over
    assert main(["--space", space, "--name", "tiny1"]) == 2
    assert "already exists" in capfd.readouterr().err


# -- 2. the pruner stops a planted bad setting -------------------------------------------------------------------
# Measured here (synthetic, 2 tasks x 5 classes, 30 train / 10 val images per class, no augmentation, seeds 0-5):
# lr 1e-2 x 4 epochs reaches val accuracy 100% after task 1; lr 1e-9 (the head stays at its init) 20-40%.
PLANTED = """
good = trial.number < 2  # the cell's first two trials are good, the third is planted bad
return {"train.lr": 1e-2 if good else 1e-9, "train.epochs": 4 if good else 1}
"""


def test_a_planted_bad_setting_is_pruned_before_the_last_task_while_good_ones_finish(workdir, capfd):
    n_tasks = 2
    space = write_space(
        workdir, "planted", PLANTED, pairs=[(None, "demo-s")], kd_methods=[], trials_per_cell=3,
        base=TINY | {"data.n_tasks": n_tasks, "data.train_per_class": 40, "data.val_fraction": 0.25},
        pruner="median", pruner_args={"n_startup_trials": 2, "n_warmup_steps": 1},
    )
    assert main(["--space", space, "--name", "planted", "--max-concurrent", "1"]) == 0  # good trials report first
    (trials,) = optuna_trials(f"sqlite:///{workdir / 'optuna.db'}", "planted").values()
    assert [t.state for t in trials] == [COMPLETE, COMPLETE, PRUNED]
    good1, good2, bad = trials
    assert sorted(good1.intermediate_values) == sorted(good2.intermediate_values) == list(range(1, n_tasks + 1))
    assert len(bad.intermediate_values) < n_tasks
    assert max(bad.intermediate_values.values()) < min(good1.intermediate_values[1], good2.intermediate_values[1])
    client, _, children = mlflow_runs(f"sqlite:///{workdir / 'mlflow.db'}", "planted")
    by_trial = {int(c.data.tags["optuna_trial"]): c for c in children}
    assert by_trial[2].data.params["train.lr"] == "1e-09" and by_trial[0].data.params["train.lr"] == "0.01"
    assert by_trial[2].data.tags["status"] == "pruned"
    assert int(by_trial[2].data.tags["pruned_after_task"]) == len(bad.intermediate_values) < n_tasks
    assert steps(client, by_trial[2].info.run_id) == sorted(bad.intermediate_values)
    assert [by_trial[i].data.tags["status"] for i in (0, 1)] == ["completed", "completed"]
    assert all(c.info.status == "FINISHED" for c in children)
    # the summary counts pruned apart from completed: done 2, pruned 1, failed 0
    summary = capfd.readouterr().out
    assert re.search(r"^none-demo-s\.coda\.none\.synthetic\.s0\s+2\s+1\s+0\s", summary, flags=re.M), summary[-2000:]


# -- 3. interrupt and resume -------------------------------------------------------------------------------------
RESUMABLE = """
lr = trial.suggest_float("lr", 1e-3, 1e-2, log=True)
return {"train.lr": lr, "train.epochs": 8 if trial.number == 1 else 1}  # a slow second trial: the interrupt lands in it
"""


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(workdir):
    n_tasks = 5
    space = write_space(workdir, "resumable", RESUMABLE, pairs=[(None, "demo-s")], kd_methods=[], trials_per_cell=3,
                        pruner="none", pruner_args={}, base=TINY | {"data.train_per_class": 40})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)} | WATCHED
    log = (workdir / "first.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", "--space", space, "--name", "resume1", "--max-concurrent", "1"],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    experiment = workdir / "ray_results" / "resume1"
    try:
        deadline = time.monotonic() + 240
        while True:  # one trial finished and the next one part-way
            tasks = sorted(reported_tasks(experiment).values(), key=len, reverse=True)
            if len(tasks) == 2 and len(tasks[0]) == n_tasks and 1 <= len(tasks[1]) < n_tasks - 1:
                break
            assert proc.poll() is None, (workdir / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the sweep did not get there in time: {tasks}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # never leave the subprocess' Ray behind: it leads its own process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    first_log = (workdir / "first.log").read_text()
    assert proc.returncode == 0, first_log[-3000:]
    # the interrupted trial is neither completed nor pruned (Tune marks it TERMINATED all the same)
    assert "sweep interrupted: 2 of 3 trials not finished; rerun the same command with --resume to continue" in first_log
    assert re.search(r"^none-demo-s\.coda\.none\.synthetic\.s0\s+1\s+0\s+0\s", first_log, flags=re.M), first_log[-2000:]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client, parent, before = mlflow_runs(uri, "resume1")
    assert parent.info.status == "KILLED"
    assert (parent.data.metrics["trials_completed"], parent.data.metrics["trials_interrupted"]) == (1, 1)
    assert parent.data.metrics["trials_pruned"] == 0
    statuses = sorted((r.data.tags["status"], r.info.status) for r in before)
    assert statuses == [("completed", "FINISHED"), ("running", "RUNNING")]  # really interrupted mid-trial
    finished = next(r for r in before if r.data.tags["status"] == "completed")
    interrupted = next(r for r in before if r.data.tags["status"] == "running").data.tags["tune_trial_id"]
    tasks_before = reported_tasks(experiment)[interrupted]

    assert main(["--space", space, "--name", "resume1", "--resume"]) == 0
    children = check_tracked_sweep(uri, "resume1", "resume1", n_tasks=n_tasks, expected_trials=3)
    assert all(c.data.tags["status"] == "completed" for c in children)
    after = {c.data.tags["tune_trial_id"]: c for c in children}
    run = after[finished.data.tags["tune_trial_id"]]  # not rerun: the same run, untouched since it finished
    assert run.info.run_id == finished.info.run_id and run.info.end_time == finished.info.end_time
    tasks = reported_tasks(experiment)
    assert tasks[finished.data.tags["tune_trial_id"]] == list(range(1, n_tasks + 1))
    # the interrupted trial continued from its last task checkpoint instead of starting over
    assert tasks[interrupted] == list(range(1, n_tasks + 1)) and len(tasks_before) < n_tasks
    # the trial asked after the restart tried a new setting, not a replay of the first one
    assert len({c.data.params["tuned.lr"] for c in children}) == 3
    check_optuna_matches_mlflow(f"sqlite:///{workdir / 'optuna.db'}", "resume1", client, children)
    parent = mlflow_runs(uri, "resume1")[1]
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["trials_completed"], parent.data.metrics["trials_interrupted"]) == (3, 0)


# -- 4. resources that the cluster cannot give -------------------------------------------------------------------
def test_a_space_asking_for_a_gpu_on_a_cpu_cluster_fails_fast_naming_the_gpu(workdir, capsys):
    space = write_space(workdir, "gpu", KD_ALPHA, gpus_per_trial=1)
    start = time.monotonic()
    assert main(["--space", space]) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: space 'gpu' cannot run here: a trial asks for 1 CPU, 1 GPU on one node but the "
                           "largest node has 2 CPU, 0 GPU.")
    # nothing a rerun would have to --resume: the sweep's folder holds only its log
    assert [p.name for p in (workdir / "ray_results" / "gpu").iterdir()] == ["sweep.log"]


# -- 5. an MLflow tracking server --------------------------------------------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_a_sweep_tracks_into_an_mlflow_tracking_server(workdir, mlflow_server):
    space = write_space(workdir, "served", KD_ALPHA, pairs=[(None, "demo-s")], kd_methods=[],
                        base=TINY | {"data.n_tasks": 2})
    assert main(["--space", space, "--name", "served", "--tracking-uri", mlflow_server]) == 0
    assert not (workdir / "mlflow.db").exists()  # nothing went to the default store
    children = check_tracked_sweep(mlflow_server, "served", "served", n_tasks=2, expected_trials=1)
    assert children[0].data.tags["cell"] == "none-demo-s.coda.none.synthetic.s0"


# -- 6. trials that need the same teacher ------------------------------------------------------------------------
def test_concurrent_trials_needing_one_teacher_train_it_once_and_students_match_a_fresh_teacher(workdir):
    from cdl_core.config import RunConfig
    from cdl_core.learner import ContinualRun, teacher_key
    from cdl_core.teacher_store import TeacherStore
    from orchestrator.space import load_space
    from orchestrator.teachers import TeacherSharing, start_lease_actor

    n_tasks = 2
    base = TINY | {"data.n_tasks": n_tasks}
    # 3 KD cells x 2 trials, half a CPU each: up to 4 trials at once on 2 CPUs, all needing the same teacher
    space = write_space(workdir, "shared", KD_ALPHA, pairs=[("demo-t", "demo-s")], kd_methods=["kd", "dkd", "cdl_prompt"],
                        cpus_per_trial=0.5, pruner="none", pruner_args={}, base=base)
    loaded = load_space(space)
    key = teacher_key(RunConfig.from_dict(loaded.run_config(loaded.cells()[0])))
    # Make the race certain: hold teacher task 1's lease (as a trial training it would) until four trials have
    # started, so they all want it at once; then let them go.
    sharing = TeacherSharing(str(workdir / "ray_results" / "teachers"), "cdl-teacher-leases:shared", lease_ttl=10)
    actor = start_lease_actor(sharing.lease_actor)  # noqa: F841 (the sweep finds it by name)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"

    def hold_until_four_trials_started() -> None:
        with sharing.lock(f"{key}/task_0"):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if len(MlflowClient(uri).search_runs(
                            [MlflowClient(uri).get_experiment_by_name("shared").experiment_id], "tags.role = 'trial'")) >= 4:
                        break
                except Exception:  # the experiment does not exist yet
                    pass
                time.sleep(0.5)
            time.sleep(2.0)  # the fourth trial reaches the lease

    holder = threading.Thread(target=hold_until_four_trials_started)
    holder.start()
    assert main(["--space", space, "--name", "shared"]) == 0
    holder.join()
    rows = tune_rows(workdir / "ray_results" / "shared")
    assert len(rows) == 6 and all([r["task"] for r in trial] == [1, 2] for trial in rows.values())
    keys = {r["teacher_key"] for trial in rows.values() for r in trial}
    assert len(keys) == 1
    (key,) = keys
    # every teacher task was trained by exactly one trial; the other five loaded it
    for task in range(n_tasks):
        assert sum(trial[task]["trained_teacher_task"] for trial in rows.values()) == 1, task
    # the four that wanted teacher task 1 at once waited; one trained it, the three others then loaded it
    waited = [t for t in rows.values() if t[0]["teacher_wait_seconds"] > 1.0]
    assert len(waited) >= 4, {tid: (t[0]["trained_teacher_task"], t[0]["teacher_wait_seconds"]) for tid, t in rows.items()}
    assert sum(t[0]["trained_teacher_task"] for t in waited) == 1
    store = TeacherStore(workdir / "ray_results" / "teachers")
    assert store.keys() == [key] and store.entry(key).committed() == [0, 1]
    assert not [i.base_name for i in store.entry(key).files() if i.base_name.startswith(".tmp-")]

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client, _, children = mlflow_runs(uri, "shared")
    (teacher,) = teacher_runs(client, "shared")  # the teacher's metrics once, in one run
    assert teacher.data.tags["teacher_key"] == key and teacher.info.status == "FINISHED"
    assert steps(client, teacher.info.run_id) == [1, 2] and steps(client, teacher.info.run_id, "test_avg_acc") == [1, 2]
    assert teacher.data.params["teacher.preset"] == "demo-t" and "distill.method" not in teacher.data.params
    teacher_matrix = store.entry(key).matrix("test")
    assert json.loads(rows[next(iter(rows))][-1]["teacher_test_matrix"]) == teacher_matrix
    assert teacher.data.metrics["test_avg_acc"] == pytest.approx(sum(teacher_matrix[-1]) / n_tasks)
    assert "accuracy_matrix.csv" in {a.path for a in client.list_artifacts(teacher.info.run_id)}
    for run in children:
        assert run.data.tags["teacher_key"] == key and run.data.tags["teacher_run_id"] == teacher.info.run_id
        assert not any(k.startswith("teacher_") for k in run.data.metrics)

    # A student that loaded its teacher gives the results of a run that trains its own teacher (same seed).
    loader = next(t for t in waited if t[0]["trained_teacher_task"] == 0)
    cfg = RunConfig.from_dict(loader[0]["config"]["run"])
    assert teacher_key(cfg) == key
    fresh = ContinualRun(cfg).run()  # no store: trains the teacher here
    assert json.loads(loader[-1]["test_matrix"]) == fresh["matrices"]["student"]["test"]
    assert fresh["matrices"]["teacher"]["test"] == teacher_matrix

    # Another sweep over the same store trains no teacher at all.
    again = write_space(workdir, "shared_again", KD_ALPHA, pairs=[("demo-t", "demo-s")], kd_methods=["cdl_prompt"],
                        trials_per_cell=1, pruner="none", pruner_args={}, base=base)
    assert main(["--space", again, "--name", "shared_again"]) == 0
    (trial,) = tune_rows(workdir / "ray_results" / "shared_again").values()
    assert [r["trained_teacher_task"] for r in trial] == [0, 0] and trial[0]["teacher_key"] == key


# -- 7. the MLflow server goes away during a sweep ---------------------------------------------------------------
def run_in_thread(argv: list[str]) -> tuple[threading.Thread, dict]:
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(code=main(argv)), daemon=True)
    thread.start()
    return thread, outcome


def watch_tune_results(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in WATCHED.items():  # see sweep_checks.WATCHED
        monkeypatch.setenv(name, value)


def wait_for_task(experiment: Path, task: int, thread: threading.Thread, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(len(tasks) >= task for tasks in reported_tasks(experiment).values()):
        assert thread.is_alive(), "the sweep ended early"
        assert time.monotonic() < deadline, f"no trial reached task {task}"
        time.sleep(0.2)


OUTAGE_BASE = TINY | {"data.train_per_class": 40, "train.epochs": 2}  # a few seconds per task


def test_trials_keep_training_while_mlflow_is_down_and_every_metric_arrives_once_when_it_is_back(workdir, monkeypatch):
    watch_tune_results(monkeypatch)
    server = MlflowServer(workdir)
    server.start()
    try:
        space = write_space(workdir, "outage", KD_ALPHA, pairs=[(None, "demo-s")], kd_methods=[], trials_per_cell=1,
                            pruner="none", pruner_args={}, base=OUTAGE_BASE)
        thread, outcome = run_in_thread(["--space", space, "--name", "outage", "--tracking-uri", server.url])
        experiment = workdir / "ray_results" / "outage"
        wait_for_task(experiment, 1, thread)
        server.crash()
        wait_for_task(experiment, 3, thread)  # the trial trained on while nothing could be written
        server.start()  # same port, same database
        thread.join(timeout=300)
        assert outcome.get("code") == 0
        (tasks,) = reported_tasks(experiment).values()
        assert tasks == [1, 2, 3, 4, 5]
        check_tracked_sweep(server.url, "outage", "outage", n_tasks=5, expected_trials=1)  # every task once, one run
        _, parent, _ = mlflow_runs(server.url, "outage")
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == 1
    finally:
        server.stop()


def test_a_sweep_whose_mlflow_never_comes_back_ends_with_a_clear_error_and_results_in_tune_storage(workdir, capsys, monkeypatch):
    watch_tune_results(monkeypatch)
    server = MlflowServer(workdir)
    server.start()
    space = write_space(workdir, "gone", KD_ALPHA, pairs=[(None, "demo-s")], kd_methods=[], trials_per_cell=1,
                        pruner="none", pruner_args={}, base=OUTAGE_BASE | {"data.n_tasks": 2})
    thread, outcome = run_in_thread(["--space", space, "--name", "gone", "--tracking-uri", server.url, "--mlflow-wait", "3"])
    experiment = workdir / "ray_results" / "gone"
    try:
        wait_for_task(experiment, 1, thread)
    finally:
        server.crash()
    thread.join(timeout=300)
    assert outcome.get("code") == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert f"MLflow at {server.url} stayed unreachable" in line and str(experiment) in line and "result.json" in line
    (tasks,) = reported_tasks(experiment).values()
    assert tasks == [1, 2]  # training finished; its results are in Tune's storage


def test_a_sweep_with_an_unreachable_tracking_server_stops_before_starting(workdir, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    space = write_space(workdir, "nowhere", KD_ALPHA, pairs=[(None, "demo-s")], kd_methods=[])
    assert main(["--space", space, "--name", "nowhere", "--tracking-uri", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach MLflow at {url}") and len(err.strip().splitlines()) == 1
    assert not (workdir / "ray_results" / "nowhere").exists()
