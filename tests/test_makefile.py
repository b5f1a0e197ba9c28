"""The README's `make` entry points on a machine that cannot hold the environment."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_setup_on_a_disk_too_full_for_the_environment_stops_with_one_clear_line_before_creating_it(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    free_gib = shutil.disk_usage(tmp_path).free / 2**30
    out = subprocess.run(["make", "setup", f"PYTHON={sys.executable}", f"SETUP_GIB={int(free_gib) + 1000}"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0
    (error,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert "GiB free here" in error and "free some disk space and rerun" in error
    assert not (tmp_path / ".venv").exists()  # nothing half-installed left behind

