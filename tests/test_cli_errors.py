"""Bad input through the real command lines (subprocesses): every project user error ends the command with
exit 2 and one `error: ...` line saying what is wrong and what to do, no traceback; anything else is a bug
and keeps its traceback."""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdl_core.cli import run_cli
from cdl_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [\w.]+: ")  # cdl_core.run's logging format
SMALL = ["--dataset", "synthetic", "--student-weights", "random", "--epochs", "1", "--out", "{tmp}/run.json"]
# Sweeps below stop before any trial: their stores live in a folder of their own ({store}), as cases run two at once.
STORES = ["--name", "bad", "--tracking-uri", "sqlite:///{store}/mlflow.db", "--optuna-storage", "sqlite:///{store}/optuna.db",
          "--storage-path", "{store}/results"]


def write_idx(path: Path, array: np.ndarray, cut: int = 0) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes() + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(data[: len(data) - cut])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every bad input file of the table, made once."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "syntax.py").write_text("from orchestrator.space import SweepSpace\nSPACE = SweepSpace(name='x',\n")
    (tmp / "no_space.py").write_text("from orchestrator.space import SweepSpace\nOTHER = 1\n")
    (tmp / "raises.py").write_text("import os\n\nVALUE = undefined_name + 1\n")
    (tmp / "bad_tasks.py").write_text(
        "from orchestrator.space import SweepSpace\n"
        "SPACE = SweepSpace(name='bad_tasks', description='', pairs=[(None, 'demo-s')], methods=['coda'], kd_methods=[],\n"
        "                   datasets=['synthetic'], base={'data.n_tasks': 3, 'student.weights': 'random', 'data.val_fraction': 0.1})\n")
    (tmp / "tiny.py").write_text(
        "from orchestrator.space import SweepSpace\n"
        "SPACE = SweepSpace(name='tiny', description='', pairs=[(None, 'demo-s')], methods=['coda'], kd_methods=[],\n"
        "                   datasets=['synthetic'], base={'student.weights': 'random', 'data.val_fraction': 0.1})\n")
    fmnist = tmp / "fmnist_truncated"
    fmnist.mkdir()
    write_idx(fmnist / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 28)), cut=100)
    write_idx(fmnist / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    write_idx(fmnist / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    write_idx(fmnist / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 10)
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4, depth=6,
                            embed_dim=64, num_heads=2)
    torch.save(vit.state_dict(), tmp / "demo_s.pt")
    data = (tmp / "demo_s.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    for c in range(7):  # an ImageNet-R extraction that stopped after 7 of its 200 class folders
        folder = tmp / "inr" / "imagenet-r" / f"n{c:08d}"
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "a.jpg")
    (tmp / "bad.json").write_text("{not json")
    (tmp / "unknown_field.json").write_text(json.dumps({"train": {"epochs": 1, "warmup": 3}}))
    (tmp / "empty").mkdir()
    return tmp


CASES = {
    # name: (command, expected fragment of the one error line)
    "space file with a syntax error": (["orchestrator.sweep", "--space", "{tmp}/syntax.py", "--dry-run"],
                                       "space file {tmp}/syntax.py, line 2: "),
    "space file without SPACE": (["orchestrator.sweep", "--space", "{tmp}/no_space.py", "--dry-run"],
                                 "must define SPACE = SweepSpace(...)"),
    "space file that raises while importing": (["orchestrator.sweep", "--space", "{tmp}/raises.py", "--dry-run"],
                                               "space file {tmp}/raises.py, line 3 failed to import: NameError"),
    "unknown space name": (["orchestrator.sweep", "--space", "nope", "--dry-run"], "unknown space 'nope'; available: "),
    "task count that does not divide the classes": (["orchestrator.sweep", "--space", "{tmp}/bad_tasks.py", "--dry-run"],
                                                   "data.n_tasks=3 does not divide the 10 classes of synthetic"),
    "Fashion-MNIST missing while the sweep prepares backbones": (
        ["orchestrator.sweep", "--space", "smoke", *STORES], "dataset 'fashion_mnist' not found; looked at: "),
    "bad --optuna-storage URL": (["orchestrator.sweep", "--space", "{tmp}/tiny.py", *STORES, "--optuna-storage", "notaurl"],
                                 "cannot use the Optuna storage notaurl (ArgumentError"),
    "--optuna-storage whose database driver is not installed": (
        ["orchestrator.sweep", "--space", "{tmp}/tiny.py", *STORES, "--optuna-storage", "postgresql://cdl@127.0.0.1:9/optuna"],
        "the database driver for the Optuna storage postgresql://cdl@127.0.0.1:9/optuna is not installed; install psycopg2-binary "
        "(pip install -e '.[cluster]') and name it in the URL: postgresql+psycopg2://cdl@127.0.0.1:9/optuna"),
    "unreachable MLflow for the sweep": (["orchestrator.sweep", "--space", "{tmp}/tiny.py", *STORES, "--tracking-uri", "http://127.0.0.1:9"],
                                         "cannot reach MLflow at http://127.0.0.1:9"),
    "teacher store on an unknown filesystem (sweep)": (
        ["orchestrator.sweep", "--space", "{tmp}/tiny.py", *STORES, "--teacher-store", "nosuchfs://bucket/teachers"],
        "nosuchfs://bucket/teachers"),
    "nothing to resume": (["orchestrator.sweep", "--space", "{tmp}/tiny.py", *STORES, "--resume"], "nothing to resume at "),
    "negative --max-concurrent": (["orchestrator.sweep", "--space", "smoke", "--max-concurrent", "-2", "--dry-run"],
                                  "--max-concurrent=-2 must be >= 0"),
    "unreachable MLflow for report": (["orchestrator.report", "--experiment", "x", "--tracking-uri", "http://127.0.0.1:9"],
                                      "cannot reach MLflow at http://127.0.0.1:9"),
    "report without an MLflow store": (["orchestrator.report", "--experiment", "x", "--tracking-uri", "sqlite:///{tmp}/none.db"],
                                       "no MLflow store at sqlite:///{tmp}/none.db"),
    "teacher store on an unknown filesystem": (["orchestrator.teachers", "--store", "nosuchfs://bucket/teachers", "list"],
                                               "nosuchfs://bucket/teachers"),
    "prune without a selection": (["orchestrator.teachers", "--store", "{tmp}/empty", "prune"], "prune needs a selection"),
    "truncated idx file": (["cdl_core.run", *SMALL, "--dataset", "fashion_mnist", "--data-root", "{tmp}/fmnist_truncated"],
                           "train-images-idx3-ubyte.gz"),
    "truncated weights file": (["cdl_core.run", *SMALL, "--student-weights", "{tmp}/truncated.pt"],
                               "weights file {tmp}/truncated.pt could not be read as a state dict"),
    "weights file that does not fit the preset": (["cdl_core.run", *SMALL, "--backbone", "demo-t", "--student-weights", "{tmp}/demo_s.pt"],
                                                  "does not fit preset demo-t"),
    "ImageNet-R folder with missing classes": (["cdl_core.run", *SMALL, "--dataset", "imagenet_r", "--data-root", "{tmp}/inr"],
                                               "dataset 'imagenet_r' has 7 classes on disk but 200 are expected"),
    "config file that is not JSON": (["cdl_core.run", "--config", "{tmp}/bad.json"], "config file {tmp}/bad.json is not valid JSON"),
    "config file with an unknown field": (["cdl_core.run", "--config", "{tmp}/unknown_field.json"], "unknown field(s) warmup"),
    "unknown prompt method": (["cdl_core.run", *SMALL, "--method", "vpt"], "prompt.method='vpt' is not valid"),
    "prompt layers deeper than the backbone": (["cdl_core.run", *SMALL, "--prompt-param", "layers=[0,8]"],
                                               "layers [8] do not exist in the student demo-s (depth 6)"),
    "teacher store on an unknown filesystem (run)": (
        ["cdl_core.run", *SMALL, "--teacher", "demo-t", "--teacher-weights", "random", "--teacher-store", "nosuchfs://x/t"],
        "nosuchfs://x/t"),
}


def run_case(case: str, inputs: Path) -> tuple[list[str], subprocess.CompletedProcess]:
    command, _ = CASES[case]
    store = inputs / "stores" / re.sub(r"\W+", "_", case)
    store.mkdir(parents=True)
    argv = [part.replace("{tmp}", str(inputs)).replace("{store}", str(store)) for part in command]
    # No Fashion-MNIST anywhere (no system folder, empty caches) and no cached demo weights
    env = dict(os.environ, CDL_FASHION_MNIST_SYSTEM_DIRS="", CDL_DATA_ROOT=str(inputs / "empty"), HOME=str(inputs / "empty"),
               CDL_CACHE_DIR=str(inputs / "empty"), HF_HUB_OFFLINE="1")
    return argv, subprocess.run([sys.executable, "-m", *argv], cwd=inputs, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outcomes(inputs: Path) -> dict[str, tuple[list[str], subprocess.CompletedProcess]]:
    """Every case's command run once, two at a time (each is mostly a Python start-up importing torch or Ray)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(lambda case: run_case(case, inputs), CASES)))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_with_one_error_line_and_exit_2(case, inputs, outcomes):
    argv, done = outcomes[case]
    fragment = CASES[case][1]
    # cdl_core.run logs its progress (timestamped lines) before the error; the orchestrator's CLIs print nothing else
    lines = [line for line in done.stderr.strip().splitlines() if argv[0] != "cdl_core.run" or not PROGRESS_LOG.match(line)]
    assert done.returncode == 2, (case, done.stdout[-2000:], done.stderr[-4000:])
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment.replace("{tmp}", str(inputs)) in lines[0], lines[0]


def test_a_bug_keeps_its_traceback_while_a_user_error_is_one_line(capsys):
    def bug(argv):
        raise KeyError("not a user error")

    def refused(argv):
        raise ConfigError("train.epochs=0 must be at least 1")

    with pytest.raises(KeyError):
        run_cli(bug)
    assert run_cli(refused) == 2
    assert capsys.readouterr().err == "error: train.epochs=0 must be at least 1\n"


def test_user_errors_survive_copy_and_pickle_as_ray_moves_them():
    import copy
    import pickle

    from cdl_core.errors import DatasetNotFoundError

    err = DatasetNotFoundError("fashion_mnist", ["/a", "/b"], "run `make data`")
    for moved in (copy.copy(err), pickle.loads(pickle.dumps(err))):
        assert type(moved) is DatasetNotFoundError and str(moved) == str(err) and moved.looked_at == ("/a", "/b")
