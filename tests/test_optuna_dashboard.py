"""The `optuna-dashboard STORAGE` command the sweep prints works on a sweep's storage: one study per cell, named
`<sweep>/<cell key>`, all served by its HTTP API (the endpoint its web page reads)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna

from sweep_checks import stop_process_group

CELLS = ("demo-t-demo-s.coda.kd.fashion_mnist.s0", "none-demo-s.coda.none.fashion_mnist.s0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_optuna_dashboard_serves_every_cell_study_of_a_sweep(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for i, cell in enumerate(CELLS):  # named as orchestrator.pruning.CellStudies names them
        study = optuna.create_study(study_name=f"smoke/{cell}", storage=url, direction="maximize")
        study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions={"lr": lr}, value=50.0 + i))
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w")
    command = [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(port)]
    # its own process group: stopping it stops whatever it started
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "dashboard.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer /api/studies"
                time.sleep(0.2)
    finally:
        stop_process_group(process, timeout=10)
        log.close()
    assert sorted(s["study_name"] for s in studies) == [f"smoke/{cell}" for cell in CELLS]
    assert all(s["directions"] == ["maximize"] for s in studies)
