"""Helpers shared by the end-to-end sweep tests: tiny space files, and checks of what a finished sweep left in
MLflow, Optuna and Tune's result files."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import optuna
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
TINY = {"student.weights": "random", "teacher.weights": "random", "data.n_tasks": 5, "data.train_per_class": 10,
        "data.test_per_class": 5, "data.train_augment": False, "train.batch_size": 8, "train.device": "cpu",
        "data.val_fraction": 0.1}
COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
RAY = str(Path(sys.executable).parent / "ray")


def write_space(directory: Path, name: str, tune: str, **fields) -> str:
    """A space file: `tune` is the body of tune(trial, cell); fields are SweepSpace arguments (as values)."""
    args = dict(name=name, description="e2e test", pairs=[("demo-t", "demo-s"), (None, "demo-s")], methods=["coda"],
                kd_methods=["kd"], datasets=["synthetic"], trials_per_cell=2, base=TINY, cpus_per_trial=1,
                pruner="median", pruner_args={"n_startup_trials": 1, "n_warmup_steps": 1}) | fields
    path = directory / f"{name}.py"
    path.write_text("from orchestrator.space import SweepSpace\n\n\ndef tune(trial, cell):\n"
                    + textwrap.indent(textwrap.dedent(tune).strip(), "    ")
                    + f"\n\n\nSPACE = SweepSpace(tune=tune, {', '.join(f'{k}={v!r}' for k, v in args.items())})\n")
    return str(path)


KD_ALPHA = """
if cell.kd == "none":
    return {}
return {"distill.alpha": trial.suggest_float("alpha", 0.1, 0.9)}
"""


def mlflow_runs(uri: str, experiment: str) -> tuple[MlflowClient, object, list]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    assert len(parents) == 1
    assert {r.data.tags.get("role") for r in runs} <= {"sweep", "trial", "teacher"}
    return client, parents[0], [r for r in runs if r.data.tags.get("role") == "trial"]


def teacher_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.role = 'teacher'", max_results=1000)


def steps(client: MlflowClient, run_id: str, metric: str = "val_avg_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def optuna_trials(storage: str, sweep: str) -> dict[str, list]:
    studies = {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
               for s in optuna.get_all_study_summaries(storage)}
    assert all(name.startswith(f"{sweep}/") for name in studies)
    return {name.removeprefix(f"{sweep}/"): trials for name, trials in studies.items()}


def check_tracked_sweep(uri: str, experiment: str, sweep: str, n_tasks: int, expected_trials: int) -> list:
    """Everything MLflow holds about a finished sweep; returns the child runs."""
    client, parent, children = mlflow_runs(uri, experiment)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == sweep
    assert len(children) == expected_trials
    assert len({c.data.tags["tune_trial_id"] for c in children}) == expected_trials
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED", run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["role"] == "trial"
        assert {"teacher", "student", "method", "kd", "dataset", "cell", "status"} <= set(tags)
        assert tags["status"] in ("completed", "pruned")
        config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json")).read_text())
        assert params["data.n_tasks"] == str(n_tasks) == str(config["data"]["n_tasks"])
        assert params["student.preset"] == tags["student"] == config["student"]["preset"]
        assert params["distill.method"] == tags["kd"] and params["prompt.method"] == tags["method"]
        assert tags["teacher"] == (config["teacher"] or {}).get("preset", "none")
        assert tags["cell"] == f"{tags['teacher']}-{tags['student']}.{tags['method']}.{tags['kd']}.{tags['dataset']}.s0"
        last = n_tasks if tags["status"] == "completed" else int(tags["pruned_after_task"])
        assert last <= n_tasks and (last < n_tasks) == (tags["status"] == "pruned")
        assert steps(client, run.info.run_id) == list(range(1, last + 1))  # every task once
        assert steps(client, run.info.run_id, "test_avg_acc") == list(range(1, last + 1))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_curve.png"} <= artifacts
    return children


def check_optuna_matches_mlflow(storage: str, sweep: str, client: MlflowClient, children: list) -> None:
    studies = optuna_trials(storage, sweep)
    assert set(studies) == {c.data.tags["cell"] for c in children}
    for run in children:
        tags = run.data.tags
        assert tags["optuna_study"] == f"{sweep}/{tags['cell']}"
        trial = studies[tags["cell"]][int(tags["optuna_trial"])]
        assert trial.state == {"completed": COMPLETE, "pruned": PRUNED}[tags["status"]]
        assert sorted(trial.intermediate_values) == steps(client, run.info.run_id)  # pruner saw every task
    assert sum(len(trials) for trials in studies.values()) == len(children)


def reported_tasks(experiment: Path) -> dict[str, list[int]]:
    """Tune trial id -> the tasks its result.json holds, in order."""
    out = {}
    for result in experiment.glob("*/result.json"):
        rows = []
        for line in result.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line Tune is still writing
                break
        if rows:
            out[rows[0]["trial_id"]] = [row["task"] for row in rows]
    return out


def finish(process: subprocess.Popen, workdir: Path, log: str = "sweep.log", timeout: float = 400) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = (workdir / log).read_text()
    assert process.returncode == 0, text[-4000:]
    return text


def wait_for(condition, process: subprocess.Popen, workdir: Path, what: str, timeout: float = 300, log: str = "sweep.log"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert process.poll() is None, f"the sweep ended before {what}: " + (workdir / log).read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def rows_so_far(workdir: Path, name: str) -> dict[str, list[dict]]:
    try:
        return tune_rows(workdir / "ray_results" / name)
    except (json.JSONDecodeError, IndexError):  # a line being written, or a result file not yet started
        return {}


# Tune copies each trial's result.json into the sweep's storage, where these tests watch a running sweep, when it
# snapshots the experiment: on its own period (10 s and more) short test trials would be done before a test saw the
# report it waits for. Snapshotting at every step of Tune's loop shows each report at once.
WATCHED = {"TUNE_GLOBAL_CHECKPOINT_S": "0"}


def sweep_cli(cluster, workdir: Path, *args: str, log: str = "sweep.log") -> subprocess.Popen:
    """The sweep's CLI in its own process group, joined to `cluster` (.address, .env) as on a cluster's head."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", "--address", cluster.address, *args],
        cwd=workdir, env=cluster.env | WATCHED, stdout=(workdir / log).open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def one_trial_at_task_2(cluster, workdir: Path, name: str, kd: str) -> tuple[subprocess.Popen, list[dict]]:
    """A sweep of one demo-t -> demo-s trial (5 tasks, its teacher trained through the store), started and waited
    on until it has reported task 2: (the driver, the trial's rows so far)."""
    space = write_space(workdir, name, KD_ALPHA, pairs=[("demo-t", "demo-s")], kd_methods=[kd], trials_per_cell=1,
                        pruner="none", pruner_args={}, base=TINY | {"data.train_per_class": 30, "train.epochs": 2})
    driver = sweep_cli(cluster, workdir, "--space", space, "--name", name)

    def reported_task_2():
        return next((rows for rows in rows_so_far(workdir, name).values() if len(rows) >= 2), None)

    return driver, wait_for(reported_task_2, driver, workdir, "task 2 of the trial")


def check_one_trial_tracked_once(workdir: Path, name: str, n_tasks: int):
    """The sweep's one trial, after a failure it survived: one MLflow run, FINISHED, every task once, and one
    Optuna trial, COMPLETE, with every task's intermediate value. Returns the run."""
    client, _, (run,) = mlflow_runs(f"sqlite:///{workdir / 'mlflow.db'}", name)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert steps(client, run.info.run_id) == list(range(1, n_tasks + 1))
    assert steps(client, run.info.run_id, "test_avg_acc") == list(range(1, n_tasks + 1))
    ((_, trials),) = optuna_trials(f"sqlite:///{workdir / 'optuna.db'}", name).items()
    assert [t.state for t in trials] == [COMPLETE]
    assert sorted(trials[0].intermediate_values) == list(range(1, n_tasks + 1))
    return run

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tune_rows(experiment: Path) -> dict[str, list[dict]]:
    """Tune trial id -> the results it reported, in order (complete lines of its result.json)."""
    out = {}
    for result in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = rows
    return out




class MlflowServer:
    """A real `mlflow server` on loopback over `backend_store_uri` (default: a sqlite store in `directory`) with
    `workers` server processes; stop() and start() again keep its port and its data (an outage and a recovery).
    `log` is its output."""

    def __init__(self, directory: Path, backend_store_uri: str | None = None, workers: int = 1) -> None:
        self.directory = directory
        self.backend_store_uri = backend_store_uri or f"sqlite:///{directory / 'srv.db'}"
        self.workers = workers
        self.log = directory / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        self.launch()
        self.wait(timeout)

    def launch(self) -> None:
        """Start the server without waiting for it (it creates its tables first): wait() waits."""
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend_store_uri, "--default-artifact-root", str(self.directory / "art"),
             "--workers", str(self.workers)],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not answer /health"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server's workers share its process group
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def crash(self) -> None:
        """An outage: the server and its workers gone at once. SIGTERM's graceful shutdown may go on serving the
        requests in flight for seconds, long enough for a short trial to finish its logging."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group a test started (start_new_session=True), SIGKILL it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)


def alive_nodes(address: str, env: dict[str, str]) -> list[str]:
    probe = "import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
    out = subprocess.run([sys.executable, "-c", probe % address], env=env, capture_output=True, text=True, timeout=120)
    # the last JSON line: under an autoscaler the driver also prints its events ("(autoscaler +2s) Adding 1 node")
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    return json.loads(lines[-1]) if out.returncode == 0 and lines else []


@contextmanager
def ray_nodes(cpus: list[int]):
    """Ray nodes started the way the cluster launcher starts them: `ray start --head`, then `ray start --address`,
    one process group and temp dir each, `cpus[i]` CPUs on node i, with Ray's token authentication (`.env`: the
    environment a driver needs to join). Stops every process it started and fails if any is left."""
    base = Path(tempfile.mkdtemp(prefix="cdl-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (base / "auth_token").write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(base / "auth_token")}  # as `ray up` sets it up
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | auth | {
        "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    address = f"127.0.0.1:{free_port()}"
    nodes = []
    try:
        deadline = time.monotonic() + 120
        for i, n_cpus in enumerate(cpus):
            join = ["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"] if i == 0 else [f"--address={address}"]
            nodes.append(subprocess.Popen(
                [RAY, "start", *join, f"--temp-dir={base / f'n{i}'}", "--node-ip-address=127.0.0.1", f"--num-cpus={n_cpus}",
                 "--num-gpus=0", "--disable-usage-stats", "--block"],
                env=env, stdout=(base / f"node{i}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            ))
            while len(node_ids := alive_nodes(address, env)) < i + 1:
                assert nodes[i].poll() is None and time.monotonic() < deadline, (base / f"node{i}.log").read_text()[-3000:]
                time.sleep(1)
        yield SimpleNamespace(address=address, env=env, node_ids=set(node_ids))
    finally:
        for node in reversed(nodes):
            # `ray start --block` and everything it started; it often outlasts a SIGTERM (SIGKILL of the group then)
            stop_process_group(node, timeout=10)
        time.sleep(2)
        left = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True).stdout.split()
        for pid in left:  # fail the test, but never leave processes behind
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the test cluster were still running: {left}"


def fake_autoscaling_config(worker_types: dict[str, dict[str, float]], max_workers: int) -> dict:
    """A cluster config for Ray's fake multi-node provider (worker nodes are local processes that the real
    autoscaler starts and stops): a 0-CPU head as in ray_cluster.yaml, and `worker_types` with min_workers 0."""
    return {
        "cluster_name": "cdl-fake", "max_workers": max_workers, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": max_workers}
               for name, resources in worker_types.items()},
        },
        "head_node_type": "ray.head.default",
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files")},
        "file_mounts": {},
    }


@contextmanager
def autoscaling_cluster(worker_types: dict[str, dict[str, float]], max_workers: int = 2):
    """A head with no worker, as `ray up` leaves one, under Ray's real autoscaler with the fake multi-node
    provider (DESIGN.md section 3: Ray's AutoscalingCluster helper kills every Ray process on the machine, so the
    head is started here in its own process group). The provider joins workers to GCS port 6379, so the head
    uses it. `.config` is the autoscaling config file; stops every process it started and fails if any is left."""
    import yaml

    base = Path(tempfile.mkdtemp(prefix="cdl-as-", dir="/tmp"))
    (base / "auth_token").write_text(secrets.token_hex(32))
    config = base / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_autoscaling_config(worker_types, max_workers)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(base / "auth_token"),
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    address = "127.0.0.1:6379"
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--autoscaling-config={config}", "--num-cpus=0", "--num-gpus=0",
         "--port=6379", f"--temp-dir={base / 'ray'}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=(base / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not alive_nodes(address, env):
            assert head.poll() is None and time.monotonic() < deadline, (base / "head.log").read_text()[-3000:]
            time.sleep(1)
        yield SimpleNamespace(address=address, env=env, config=config, base=base)
    finally:
        stop_process_group(head, timeout=10)  # the head, its monitor and the worker nodes its provider started
        time.sleep(2)
        left = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True).stdout.split()
        for pid in left:
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the autoscaling test cluster were still running: {left}"
