"""The orchestrator-overhead benchmark (bench/sweep_overhead.py) at a tiny size, so it cannot rot unnoticed: both
sides run every trial and every report (ours as counted in MLflow, the bare loop in Tune's results), and the
dry-run part measures the planning CLI."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from ray import cloudpickle

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sweep_overhead.py"

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("sweep_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)  # bench/ is no package: Ray's workers could not import it by name
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")  # the bench sets it for the whole process; restored afterwards
    yield module
    cloudpickle.unregister_pickle_by_value(module)


@pytest.mark.slow  # ~25 s: starts Ray and runs both sweeps
def test_both_sides_of_the_overhead_bench_run_every_trial_and_every_report(bench, tmp_path):
    ours, bare = bench.compare_sweeps(trials=4, reports=2, workdir=tmp_path)  # reports = tasks: 2 divides the 10 classes
    assert (ours.trials, ours.reports) == (4, 8)
    assert ours.optuna_trials == 4  # every Optuna trial COMPLETE with both reports
    assert (bare.trials, bare.reports) == (4, 8)
    assert ours.memory[-1][0] == 4 and ours.peak_mb() >= ours.peak_mb(2) > 50  # samples of trials started and RSS
    assert ours.seconds > 0 and bare.seconds > 0


def test_overhead_bench_dry_run_reports_planning_time_and_peak_memory(bench, tmp_path):
    seconds, peak_mb = bench.dry_run(20, tmp_path)
    assert seconds > 0 and peak_mb > 50  # a Python process with torch imported
