"""The report's paired comparison: each seed's gain against the baseline of that seed, the Student-t interval over
those gains (expected numbers worked out here from the formula and t quantiles from tables), and the report
printing it per dataset from planted trial rows."""
from __future__ import annotations

import dataclasses
import io
import math
import statistics

import pandas as pd
import pytest

from orchestrator import report
from orchestrator.paired_stats import paired_gain
from orchestrator.report import paper_table, render

# t(0.975, df): closed forms for 1 and 2 degrees of freedom (tables: 12.706, 4.3027), a table's value for 4.
T_975 = {1: math.tan(0.475 * math.pi), 2: 0.95 / math.sqrt(2 * 0.975 * 0.025), 4: 2.776445105}


def _interval(gains: list[float]) -> tuple[float, float, float]:
    """mean, low, high of the 95% t-interval, from the formula."""
    n = len(gains)
    mean = sum(gains) / n
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / (n - 1))
    half = T_975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# -- the statistics --------------------------------------------------------------------------------------------
def test_the_interval_is_the_t_interval_over_the_per_seed_gains():
    got = paired_gain({0: 11.0, 1: 22.0, 2: 33.0}, {0: 10.0, 1: 20.0, 2: 30.0})  # gains 1, 2, 3: mean 2, sd 1
    half = T_975[2] * 1 / math.sqrt(3)
    assert got.seeds == (0, 1, 2) and got.n == 3 and got.has_interval
    assert got.mean == pytest.approx(2.0, abs=1e-12)
    assert got.low == pytest.approx(2 - half, abs=1e-8) and got.high == pytest.approx(2 + half, abs=1e-8)


def test_the_interval_uses_the_sample_sd_and_n_minus_1_degrees_of_freedom():
    gains = [0.5, 3.0, 1.0, 2.5, 4.0]
    got = paired_gain({seed: 50 + g for seed, g in enumerate(gains)}, {seed: 50.0 for seed in range(5)})
    mean, low, high = _interval(gains)
    assert (got.mean, got.low, got.high) == pytest.approx((mean, low, high), abs=1e-8)
    two = paired_gain({0: 2.0, 1: 4.0}, {0: 0.0, 1: 0.0})  # sd sqrt(2), so the half width is t(0.975, 1) itself
    assert (two.low, two.high) == pytest.approx((3 - T_975[1], 3 + T_975[1]), abs=1e-8)


def test_a_gain_whose_interval_covers_zero_is_not_established():
    got = paired_gain({0: 11.0, 1: 22.0, 2: 33.0}, {0: 10.0, 1: 20.0, 2: 30.0})
    assert got.low < 0 < got.high and not got.established


def test_an_interval_on_either_side_of_zero_is_established():
    up = paired_gain({0: 14.0, 1: 25.0, 2: 36.0}, {0: 10.0, 1: 20.0, 2: 30.0})  # gains 4, 5, 6
    assert up.low > 0 and up.established
    down = paired_gain({0: 6.0, 1: 15.0, 2: 24.0}, {0: 10.0, 1: 20.0, 2: 30.0})  # gains -4, -5, -6
    assert down.high < 0 and down.established and down.mean == pytest.approx(-5.0)


def test_one_seed_gives_the_gain_and_no_interval():
    got = paired_gain({3: 47.5}, {3: 45.0})
    assert got.n == 1 and got.mean == pytest.approx(2.5)
    assert not got.has_interval and got.low is None and got.high is None and not got.established


def test_seeds_present_in_only_one_of_the_two_are_left_out_of_the_pairing():
    got = paired_gain({0: 90.0, 1: 51.0, 2: 62.0, 5: 10.0}, {1: 50.0, 2: 60.0, 3: 0.0})
    assert got.seeds == (1, 2) and got.n == 2
    mean, low, high = _interval([1.0, 2.0])
    assert (got.mean, got.low, got.high) == pytest.approx((mean, low, high), abs=1e-8)


def test_no_common_seed_is_no_pairing():
    got = paired_gain({0: 50.0}, {1: 40.0})
    assert got.n == 0 and got.mean is None and not got.has_interval and not got.established
    assert paired_gain({}, {}).n == 0


def test_the_result_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        paired_gain({0: 1.0}, {0: 0.0}).mean = 5.0  # type: ignore[misc]


# -- the report ------------------------------------------------------------------------------------------------
BASE = ("none", "demo-s", "coda", "none")
KD = ("demo-t", "demo-s", "coda", "kd")
DKD = ("demo-t", "demo-s", "coda", "dkd")
# (row, dataset) -> seed -> test accuracy of the cell's best trial (by validation metric)
PLANTED = {
    (BASE, "synthetic"): {0: 40.0, 1: 50.0, 2: 60.0},
    (KD, "synthetic"): {0: 41.0, 1: 52.0, 2: 63.0, 3: 90.0},  # gains 1, 2, 3; seed 3 has no baseline
    (DKD, "synthetic"): {0: 44.0, 1: 55.0, 2: 66.0},  # gains 4, 5, 6
    (BASE, "fashion_mnist"): {0: 20.0, 1: 30.0},
    (KD, "fashion_mnist"): {1: 33.0, 2: 80.0},  # only seed 1 in common with the baseline: gain 3
    (DKD, "fashion_mnist"): {2: 70.0},  # no seed in common
}


def _trials() -> pd.DataFrame:
    """Trial rows as report.load_trials returns them: per cell the planted best trial and a completed one with a
    lower validation metric and the test accuracy 100 - acc, so a pairing of the wrong trials reverses the gains."""
    rows = []
    for (row, dataset), by_seed in PLANTED.items():
        for seed, acc in by_seed.items():
            for optuna_trial, (val, test) in enumerate(((70.0, acc), (60.0, 100 - acc))):
                cell = f"{row[0]}-{row[1]}.{row[2]}.{row[3]}.{dataset}.s{seed}"
                rows.append({
                    "run_id": f"{cell}#{optuna_trial}", "sweep": "planted", "cell": cell,
                    **dict(zip(report.ROW, row)), "dataset": dataset, "status": "completed", "seed": seed,
                    "optuna_trial": optuna_trial, "teacher_run_id": None, "metric": val,
                    **{name: float("nan") for name in report.FINAL_METRICS},
                    "test_avg_acc": test, "val_avg_acc": val, "test_forgetting_cdl": 5.0, "test_forgetting_chaudhry": 10.0,
                })
    return pd.DataFrame(rows)


def _markdown_rows(text: str) -> dict[tuple[str, ...], dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {tuple(r[:4]): dict(zip(header, r)) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def _interval_text(gains: list[float], verdict: str) -> str:
    mean, low, high = _interval(gains)
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] n={len(gains)}{verdict}"


def test_the_report_prints_the_paired_gain_per_dataset():
    text = render(paper_table(_trials()), "markdown")
    rows = _markdown_rows(text)
    kd, dkd, base = rows[KD], rows[DKD], rows[BASE]
    assert kd["synthetic paired Δacc"] == _interval_text([1.0, 2.0, 3.0], " not established")
    assert dkd["synthetic paired Δacc"] == _interval_text([4.0, 5.0, 6.0], "")
    assert kd["fashion_mnist paired Δacc"] == f"{33.0 - 30.0:+.2f} (1 seed: no interval)"
    assert dkd["fashion_mnist paired Δacc"] == "no seed in common"
    assert base["synthetic paired Δacc"] == base["fashion_mnist paired Δacc"] == ""  # the baseline itself
    # the change of the means stays beside it: seed 3 counts there (61.5 - 50), not in the pairing
    mean_kd = statistics.fmean(PLANTED[(KD, "synthetic")].values())
    assert kd["synthetic Δacc"] == f"{mean_kd - 50.0:+.2f}" and kd["synthetic acc"].startswith(f"{mean_kd:.2f} ± ")
    assert dkd["fashion_mnist Δacc"] == f"{70.0 - 25.0:+.2f}"


def test_a_legend_under_the_table_says_what_the_interval_is():
    table = paper_table(_trials())
    for fmt in ("console", "markdown"):
        lines = render(table, fmt).rstrip("\n").split("\n")
        legend = lines[-1]
        assert "95% t-interval" in legend and "per-seed paired gains" in legend and "not established = the interval covers 0" in legend
        assert "|" not in legend
    console = render(table, "console").rstrip("\n").split("\n")
    assert len({len(line) for line in console[:-1]}) == 1  # the table above it stays aligned
    markdown = render(table, "markdown").rstrip("\n").split("\n")
    assert markdown[-2] == ""  # a markdown table ends at a blank line, else the legend would read as a row


def test_csv_has_the_paired_numbers_and_no_legend():
    parsed = pd.read_csv(io.StringIO(render(paper_table(_trials()), "csv")))
    kd = parsed[(parsed["kd"] == "kd") & (parsed["dataset"] == "synthetic")].iloc[0]
    mean, low, high = _interval([1.0, 2.0, 3.0])
    assert kd["acc_paired_n"] == 3 and not kd["acc_paired_established"]
    assert (kd["acc_paired_gain"], kd["acc_paired_low"], kd["acc_paired_high"]) == pytest.approx((mean, low, high), abs=1e-4)
    base = parsed[(parsed["teacher"] == "none") & (parsed["dataset"] == "synthetic")].iloc[0]
    assert base["acc_paired_n"] == 0 and pd.isna(base["acc_paired_gain"])
    assert len(parsed) == len(PLANTED)
