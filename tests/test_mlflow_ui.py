"""A finished tiny sweep as users see it: through a real `mlflow server` on loopback, first with its REST API
(what the UI and any script read), then in the MLflow UI rendered by headless Chromium (Debian's `chromium`,
which `.ci/run` installs)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from orchestrator.sweep import TRIALS_FILTER, main
from sweep_checks import KD_ALPHA, TINY, MlflowServer, write_space

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forbid_demo_pretraining")]

N_TASKS = 2


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory):
    """A tiny sweep (a KD cell with 2 trials, the student-alone cell) tracked into a real MLflow server."""
    import ray

    directory = tmp_path_factory.mktemp("ui")
    server = MlflowServer(directory)
    server.start()
    ray.init(num_cpus=2, include_dashboard=False)
    patch = pytest.MonkeyPatch()
    patch.setattr(ray, "init", lambda *args, **kwargs: None)
    patch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
    patch.chdir(directory)
    try:
        space = write_space(directory, "ui", KD_ALPHA, base=TINY | {"data.n_tasks": N_TASKS})
        assert main(["--space", space, "--name", "ui", "--tracking-uri", server.url]) == 0
        yield server
    finally:
        patch.undo()
        ray.shutdown()
        server.stop()


def rest(server: MlflowServer, path: str, body: dict | None = None, **query) -> dict:
    url = f"{server.url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_rest_api_serves_every_trial_with_its_params_per_task_metrics_and_artifacts(served_sweep):
    experiment = rest(served_sweep, "experiments/get-by-name", experiment_name="ui")["experiment"]
    runs = rest(served_sweep, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    by_role: dict[str, list] = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        by_role.setdefault(tags["role"], []).append((run, tags))
    assert len(by_role["sweep"]) == 1 and len(by_role["trial"]) == 3 and len(by_role["teacher"]) == 1
    parent_id = by_role["sweep"][0][0]["info"]["run_id"]
    for run, tags in by_role["trial"]:
        run_id = run["info"]["run_id"]
        assert run["info"]["run_name"] == f"{tags['cell']}#{tags['optuna_trial']}"  # the UI's run name says the cell
        assert tags["mlflow.parentRunId"] == parent_id and tags["status"] == "completed"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["distill.method"] == tags["kd"] and params["prompt.method"] == tags["method"] == "coda"
        assert params["data.n_tasks"] == str(N_TASKS)
        for metric in ("val_avg_acc", "test_avg_acc", "test_forgetting"):
            history = rest(served_sweep, "metrics/get-history", run_id=run_id, metric_key=metric)["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, N_TASKS + 1)), metric
        files = {f["path"] for f in rest(served_sweep, "artifacts/list", run_id=run_id).get("files", [])}
        assert {"config.json", "accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_curve.png"} <= files


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_mlflow_ui_in_headless_chromium_shows_the_sweeps_trials(served_sweep, tmp_path):
    experiment = rest(served_sweep, "experiments/get-by-name", experiment_name="ui")["experiment"]
    # the runs table (not MLflow's GenAI overview), filtered to the trials: what the README tells users to open
    url = (f"{served_sweep.url}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
           f"&searchFilter={urllib.parse.quote(TRIALS_FILTER)}")
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1600,1000", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    ).stdout
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    assert "Runs" in text and "tags.role = 'trial'" in dom, text[:2000]
    # 3 trials match the filter; the UI lists them under their parent sweep run, which it counts too
    shown = re.search(r"(\d+) matching runs", text)
    assert shown and int(shown[1]) == 3 + 1, text[:3000]
    assert "ui" in text.split()  # the sweep's parent run (named after the sweep) is in the table
