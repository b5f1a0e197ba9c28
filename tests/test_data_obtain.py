"""Tests of `cdl_core.data.obtain` (found -> apt-get -> download -> one error line) and of corrupt idx files.

Nothing here reaches the network or runs the real apt-get: the system folder, the caches, `shutil.which`,
`os.geteuid`, `subprocess.run` and torchvision's FashionMNIST are replaced by fakes that write tiny idx files.
"""
from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets

import cdl_core.data
import cdl_core.errors
from cdl_core.cli import run_cli
from cdl_core.data import base, imagenet_r, obtain
from cdl_core.data import fashion_mnist as fm
from cdl_core.errors import DatasetCorruptError, DatasetNotFoundError

ROOT = Path(__file__).resolve().parents[1]
UPDATE = ["apt-get", "update", "-qq"]
INSTALL = ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for images_file, labels_file in fm.FILES.values():
        _write_idx(folder / images_file, np.arange(n * 28 * 28).reshape(n, 28, 28) % 256)
        _write_idx(folder / labels_file, np.arange(n) % 10)


class Machine:
    """The fakes: which programs exist, the user id, what apt-get and the download do, and what was run."""

    def __init__(self, system: Path) -> None:
        self.system = system
        self.programs = {"apt-get"}
        self.euid = 0
        self.apt_status = 0
        self.download_error: Exception | None = None
        self.commands: list[list[str]] = []
        self.frontends: list[str | None] = []
        self.downloads: list[tuple[str, bool]] = []

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.programs else None

    def run(self, cmd, env=None, check=False, **kw):
        self.commands.append(list(cmd))
        self.frontends.append((env or {}).get("DEBIAN_FRONTEND"))
        if self.apt_status == 0 and list(cmd[-len(INSTALL):]) == INSTALL:
            _write_fashion_mnist(self.system)  # what the package installs
        return subprocess.CompletedProcess(cmd, self.apt_status)

    def torchvision_fashion_mnist(self, root: str, train: bool = True, download: bool = False, **kw) -> None:
        self.downloads.append((root, download))
        if self.download_error is not None:
            raise self.download_error
        _write_fashion_mnist(Path(root) / "FashionMNIST" / "raw")


@pytest.fixture
def machine(tmp_path, monkeypatch, caplog) -> Machine:
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    system.mkdir()  # empty: the Debian folder without the package
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (system,))
    monkeypatch.setenv("CDL_DATA_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fake = Machine(system)
    monkeypatch.setattr(obtain.shutil, "which", fake.which)
    monkeypatch.setattr(obtain.os, "geteuid", lambda: fake.euid)
    monkeypatch.setattr(obtain.subprocess, "run", fake.run)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake.torchvision_fashion_mnist)
    caplog.set_level(logging.INFO, logger=obtain.__name__)
    return fake


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == obtain.__name__]


def test_files_already_present_are_used_without_apt_or_download(machine, tmp_path, caplog):
    _write_fashion_mnist(tmp_path / "mine")
    assert obtain.obtain_fashion_mnist(str(tmp_path / "mine")) == tmp_path / "mine"
    assert machine.commands == [] and machine.downloads == [] and _messages(caplog) == []


def test_as_root_apt_get_installs_the_debian_package_and_its_folder_is_returned(machine, tmp_path, caplog):
    machine.programs.add("sudo")  # present, but root needs no sudo
    assert obtain.obtain_fashion_mnist(str(tmp_path / "empty")) == machine.system
    assert machine.commands == [UPDATE, INSTALL]
    assert machine.frontends == ["noninteractive", "noninteractive"]
    assert machine.downloads == []
    (said,) = _messages(caplog)  # one line, before apt-get ran, saying what it installs and where
    assert "dataset-fashion-mnist" in said and "/usr/share/datasets/fashion-mnist" in said and "\n" not in said


def test_a_user_with_sudo_runs_apt_get_through_sudo(machine, caplog):
    machine.euid, machine.programs = 1000, {"apt-get", "sudo"}
    assert obtain.obtain_fashion_mnist() == machine.system
    assert machine.commands == [["sudo", *UPDATE], ["sudo", *INSTALL]]
    assert "sudo apt-get install -y -qq dataset-fashion-mnist" in _messages(caplog)[0]


@pytest.mark.parametrize("programs, euid", [(set(), 0), ({"apt-get"}, 1000)], ids=["no-apt-get", "no-root-no-sudo"])
def test_without_usable_apt_get_torchvision_downloads_into_the_cache_where_the_loader_finds_it(
    machine, tmp_path, caplog, programs, euid
):
    machine.programs, machine.euid = programs, euid
    raw = tmp_path / "cache" / "FashionMNIST" / "raw"
    assert obtain.obtain_fashion_mnist() == raw
    assert machine.commands == [] and machine.downloads == [(str(tmp_path / "cache"), True)]
    (said,) = _messages(caplog)
    assert "download" in said and str(raw) in said
    train_x, train_y, test_x, test_y = fm.load_fashion_mnist()  # no data.root: the cache is searched
    assert train_x.shape == (3, 1, 28, 28) and list(test_y) == [0, 1, 2]


def test_a_failed_apt_get_falls_back_to_the_download(machine, tmp_path, caplog):
    machine.apt_status = 100
    assert obtain.obtain_fashion_mnist() == tmp_path / "cache" / "FashionMNIST" / "raw"
    assert machine.commands == [UPDATE]  # stopped at the failed update
    assert len(machine.downloads) == 1
    apt_failed = [m for m in _messages(caplog) if "apt-get did not give the files" in m]
    assert len(apt_failed) == 1 and "status 100" in apt_failed[0] and "download" in apt_failed[0]


@pytest.mark.parametrize("allowed", [True, False], ids=["both-fail", "both-disabled"])
def test_when_nothing_works_one_error_line_names_the_apt_get_command_and_the_download(machine, allowed):
    machine.apt_status, machine.download_error = 100, RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    with pytest.raises(DatasetNotFoundError) as err:
        obtain.obtain_fashion_mnist(use_apt=allowed, use_download=allowed)
    message = str(err.value)
    assert "\n" not in message and "fashion_mnist" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "when online" in message and "python -m cdl_core.data.obtain" in message
    assert str(machine.system) in message  # where it looked
    if allowed:
        assert "status 100" in message and "Error downloading" in message
    else:
        assert machine.commands == [] and machine.downloads == []


def test_the_cli_prints_the_folder(machine, tmp_path, capsys):
    _write_fashion_mnist(tmp_path / "mine")
    assert run_cli(obtain.main, ["--root", str(tmp_path / "mine"), "--no-apt"]) == 0
    assert capsys.readouterr().out == f"Fashion-MNIST: {tmp_path / 'mine'}\n"


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


CORRUPT = {
    "truncated-gzip": lambda: _gz(bytes([0, 0, 8, 1]) + np.asarray([50], ">i4").tobytes() + bytes(50))[:-12],
    "not-gzip": lambda: b"<html>404 Not Found</html>",
    "bad-magic": lambda: _gz(bytes([0, 0, 0x0D, 1]) + np.asarray([4], ">i4").tobytes() + bytes(16)),
    "too-few-values": lambda: _gz(bytes([0, 0, 8, 2]) + np.asarray([3, 4], ">i4").tobytes() + bytes(5)),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_idx_file_is_one_line_naming_the_file_and_how_to_fetch_it_again(tmp_path, kind):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(CORRUPT[kind]())
    with pytest.raises(DatasetCorruptError) as err:
        fm.read_idx(path)
    message = cdl_core.errors.one_line(err.value)
    assert str(err.value) == message and str(path) in message
    assert "delete it" in message and "make data" in message and "python -m cdl_core.data.obtain" in message


def test_a_valid_idx_file_still_reads(tmp_path):
    _write_idx(tmp_path / "x.gz", np.arange(6).reshape(2, 3))
    assert fm.read_idx(tmp_path / "x.gz").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_data_errors_are_the_classes_of_cdl_core_errors():
    assert cdl_core.data.DatasetNotFoundError is base.DatasetNotFoundError is cdl_core.errors.DatasetNotFoundError
    assert cdl_core.data.SplitFileError is imagenet_r.SplitFileError is cdl_core.errors.SplitFileError
    assert cdl_core.data.DatasetCorruptError is cdl_core.errors.DatasetCorruptError
    assert issubclass(DatasetCorruptError, cdl_core.errors.UserError)


def _python(code_or_args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_importing_the_module_and_its_help_import_neither_torch_nor_torchvision():
    out = _python(["-c", "import sys, cdl_core.data.obtain as o\n"
                         "try:\n    o.main(['--help'])\nexcept SystemExit:\n    pass\n"
                         "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


def test_the_cli_without_data_apt_or_download_exits_2_with_one_error_line(tmp_path):
    system = tmp_path / "system"  # stands in for /usr/share/datasets/fashion-mnist, which may exist here
    system.mkdir()
    (tmp_path / "empty").mkdir()
    out = _python(["-m", "cdl_core.data.obtain", "--no-apt", "--no-download", "--root", str(tmp_path / "empty")],
                  env={"CDL_FASHION_MNIST_SYSTEM_DIRS": str(system), "CDL_DATA_ROOT": str(tmp_path / "cache"),
                       "HOME": str(tmp_path / "home")})
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("error: dataset 'fashion_mnist' not found")
    looked_at = line.split("; to get it:")[0]
    assert str(system) in looked_at and str(fm.DEBIAN_DIR) not in looked_at  # the override reached the subprocess
    assert "apt-get install dataset-fashion-mnist" in line and out.stdout == ""
