"""`python -m orchestrator.report` on fake finished sweeps written straight into an MLflow sqlite store (no Ray):
the table's math (best trial per cell by the validation metric, mean/std/n over seeds, delta against the
no-teacher baseline, pruned/failed counts), the three output formats, `--compare paper`, the Parquet export,
the best-config export (and rerunning one with cdl_core.run), the plots, and the error exits."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cdl_core.config import RunConfig
from orchestrator import report
from orchestrator.report import (
    RUNS_SCHEMA, ReportError, best_per_cell, compare_with_paper, load_paper, load_trials, paper_table, render,
)
from report_checks import (  # noqa: F401 - restore_mlflow_tracking_uri is autouse: undoes load_trials' global tracking URI
    BASE, KD, FakeTrial, make_sweep, restore_mlflow_tracking_uri, run_main,
)

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row_trials(row: tuple[str, str, str, str], dataset: str, seed: int, *specs: tuple) -> list[FakeTrial]:
    """specs: (optuna_trial, status, val, acc, forg[, steps])"""
    return [FakeTrial(*row, dataset, seed, *spec, teacher_run=row[0] != "none") for spec in specs]


# The main sweep: 2 datasets x 2 seeds, a baseline row and a KD row (numbers chosen so the table is easy by hand).
MAIN_TRIALS = [
    # baseline, synthetic: s0 best is #0 (val 50) although #1 has the higher test acc; s1 #1 is pruned with val 70
    *_row_trials(BASE, "synthetic", 0, (0, "completed", 50, 40, 10), (1, "completed", 45, 60, 5)),
    *_row_trials(BASE, "synthetic", 1, (0, "completed", 55, 44, 12), (1, "pruned", 70, 90, 1, 1)),
    # KD, synthetic: s0 best #1 (val 65), #2 failed with a high val; s1 best #0 (val 62) although #1 has test 70
    *_row_trials(KD, "synthetic", 0, (0, "completed", 60, 50, 8), (1, "completed", 65, 48, 6), (2, "failed", 99, 99, 0, 1)),
    *_row_trials(KD, "synthetic", 1, (0, "completed", 62, 52, 4), (1, "completed", 58, 70, 2)),
    # baseline, fashion_mnist: one trial per seed
    *_row_trials(BASE, "fashion_mnist", 0, (0, "completed", 30, 20, 15)),
    *_row_trials(BASE, "fashion_mnist", 1, (0, "completed", 32, 26, 17)),
    # KD, fashion_mnist: s0 best #0 (val 40); s1 has only a pruned and a failed trial, so n=1
    *_row_trials(KD, "fashion_mnist", 0, (0, "completed", 40, 30, 9), (1, "completed", 38, 35, 1)),
    *_row_trials(KD, "fashion_mnist", 1, (0, "pruned", 45, 60, 3, 1), (1, "failed", 80, 80, 0, 1)),
]
for _t in MAIN_TRIALS:
    if _t.status == "failed":
        _t.config = False  # a failed trial never wrote its config

# The best trial of each cell, by final val_avg_acc among completed trials: (row, dataset, seed) -> optuna_trial
EXPECTED_BEST = {
    (BASE, "synthetic", 0): 0, (BASE, "synthetic", 1): 0, (KD, "synthetic", 0): 1, (KD, "synthetic", 1): 0,
    (BASE, "fashion_mnist", 0): 0, (BASE, "fashion_mnist", 1): 0, (KD, "fashion_mnist", 0): 0,
}
SQRT8 = math.sqrt(8)  # sample std (ddof=1) of two values 4 apart
SQRT2 = math.sqrt(2)  # ... 2 apart
SQRT18 = math.sqrt(18)  # ... 6 apart
# (row, dataset) -> acc_mean, acc_std, n, forgetting_cdl_mean, forgetting_cdl_std, acc_delta, forgetting_cdl_delta,
# pruned, failed; each forgetting_chaudhry_* is twice its forgetting_cdl_* (see FakeTrial)
EXPECTED_TABLE = {
    (BASE, "synthetic"): (42.0, SQRT8, 2, 11.0, SQRT2, None, None, 1, 0),
    (KD, "synthetic"): (50.0, SQRT8, 2, 5.0, SQRT2, 8.0, -6.0, 0, 1),
    (BASE, "fashion_mnist"): (23.0, SQRT18, 2, 16.0, SQRT2, None, None, 0, 0),
    (KD, "fashion_mnist"): (30.0, None, 1, 9.0, None, 7.0, -7.0, 1, 1),
}

# Rows named like the paper's, for --compare paper: the ViT-B CODA and ViT-S CODA baselines are on both boards with
# the same numbers, the ViT-B DualPrompt baseline on both with different forgettings (the current board's is
# compared), CDL-Prompt only on the v1 board, logit KD L->B only on the current one, and L->S on neither. Their
# configs showed Chaudhry's as test_forgetting (2 * forg), so a comparison that used it, or Chaudhry's, would be off
# by forg; the ViT-Small baseline was logged by older code and has no CDL forgetting to compare.
VB, VL, VS = "vit_base_patch16_224", "vit_large_patch16_224", "vit_small_patch16_224"
PAPER_TRIALS = [
    *_row_trials(("none", VB, "coda", "none"), "cifar100", 0, (0, "completed", 80, 86.0, 6.0)),
    *_row_trials(("none", VB, "coda", "none"), "cifar100", 1, (0, "completed", 81, 85.0, 5.0)),
    *_row_trials((VL, VB, "coda", "cdl_prompt"), "cifar100", 0, (0, "completed", 82, 88.0, 5.0)),
    *_row_trials((VL, VB, "coda", "cdl_prompt"), "cifar100", 1, (0, "completed", 83, 87.0, 6.0)),
    *_row_trials((VL, VB, "coda", "kd"), "cifar100", 0, (0, "completed", 79, 84.0, 7.0)),
    *_row_trials(("none", VB, "dualprompt", "none"), "cifar100", 0, (0, "completed", 77, 84.0, 5.0)),
    *_row_trials((VL, VS, "coda", "kd"), "cifar100", 0, (0, "completed", 76, 83.0, 6.0)),
    *_row_trials(("none", VS, "coda", "none"), "cifar100", 0, (0, "completed", 78, 82.0, 3.0)),
]
for _t in PAPER_TRIALS:
    _t.config = False
    _t.teacher_run = False
    _t.shown = "chaudhry"
PAPER_TRIALS[-1].old_code = True


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One sqlite store holding every fake sweep the tests read."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = "sqlite:///" + str(root / "mlflow.db")
    client = MlflowClient(uri)
    sweeps = {
        "main": make_sweep(client, root, "sweep-main", MAIN_TRIALS, teacher=True),
        "paper": make_sweep(client, root, "sweep-paper", PAPER_TRIALS),
        "pruned": make_sweep(client, root, "sweep-pruned", [
            FakeTrial(*KD, "synthetic", 0, 0, "pruned", 70, 60, 3, steps=1),
            FakeTrial(*KD, "synthetic", 0, 1, "failed", 0, 0, 0, steps=0, config=False)]),
        "empty": make_sweep(client, root, "sweep-empty", [], teacher=True),  # parent and teacher run only
        "old": make_sweep(client, root, "sweep-old", [FakeTrial(*BASE, "synthetic", 0, 0, "completed", 50, 40, 10, old_code=True)]),
    }
    return {"uri": uri, "root": root, "client": client, **sweeps}


@pytest.fixture(scope="module")
def main_trials(store) -> tuple[pd.DataFrame, dict[str, Any]]:
    return load_trials(store["uri"], "sweep-main")


def _table_row(table: pd.DataFrame, row: tuple[str, str, str, str], dataset: str) -> pd.Series:
    mask = (table["teacher"] == row[0]) & (table["student"] == row[1]) & (table["method"] == row[2]) & (table["kd"] == row[3]) & (table["dataset"] == dataset)
    assert mask.sum() == 1, f"{row} {dataset}: {mask.sum()} rows in\n{table}"
    return table[mask].iloc[0]


def _close(actual: Any, expected: float | None, tol: float = 1e-9) -> bool:
    if expected is None:
        return pd.isna(actual)
    return not pd.isna(actual) and abs(float(actual) - expected) <= tol


# -- the table's math ----------------------------------------------------------------------------------------
def test_load_trials_reads_every_trial_with_tags_and_final_metrics(store, main_trials):
    trials, info = main_trials
    assert len(trials) == len(MAIN_TRIALS)  # the parent and the teacher run are not trials
    assert info["metric"] == "val_avg_acc" and info["parent_run_ids"] == [store["main"]["parent"]]
    assert info["experiment_id"] == store["main"]["experiment_id"]
    by_id = trials.set_index("run_id")
    for run_id, fake in zip(store["main"]["trials"], MAIN_TRIALS):
        got = by_id.loc[run_id]
        assert (got["teacher"], got["student"], got["method"], got["kd"], got["dataset"]) == (*fake.row, fake.dataset)
        assert int(got["seed"]) == fake.seed and int(got["optuna_trial"]) == fake.optuna_trial
        assert got["status"] == fake.status and got["cell"] == fake.cell and got["sweep"] == "sweep-main"
        if fake.steps:  # the metric is the value at the last step, not the first or the best one
            assert got["metric"] == fake.val == got["val_avg_acc"]
            assert got["test_avg_acc"] == fake.acc and got["test_forgetting"] == fake.headline_forg
            assert got["test_forgetting_cdl"] == fake.forg and got["test_forgetting_chaudhry"] == 2 * fake.forg
        if fake.teacher_run:
            assert got["teacher_run_id"] == store["main"]["teacher"]


def test_best_trial_of_each_cell_is_the_completed_one_with_the_best_final_validation_accuracy(main_trials):
    trials, _ = main_trials
    best = best_per_cell(trials)
    chosen = {((r.teacher, r.student, r.method, r.kd), r.dataset, int(r.seed)): int(r.optuna_trial) for r in best.itertuples()}
    assert chosen == EXPECTED_BEST  # not the best test accuracy, not a pruned/failed trial; KD fashion_mnist s1 absent
    assert set(best["status"]) == {"completed"}
    assert best.duplicated(subset=report.CELL).sum() == 0


def test_ties_go_to_the_earlier_optuna_trial(main_trials):
    trials, _ = main_trials
    tie = trials[(trials["kd"] == "kd") & (trials["dataset"] == "synthetic") & (trials["seed"] == 1)].copy()
    tie["metric"] = 60.0
    tie = tie.iloc[::-1]  # later trial first in the frame
    assert int(best_per_cell(tie)["optuna_trial"].iloc[0]) == 0


def test_paper_table_means_std_n_deltas_and_pruned_failed_counts(main_trials):
    trials, _ = main_trials
    table = paper_table(trials)
    assert len(table) == len(EXPECTED_TABLE)
    for (row, dataset), (acc, acc_std, n, forg, forg_std, d_acc, d_forg, pruned, failed) in EXPECTED_TABLE.items():
        got = _table_row(table, row, dataset)
        assert _close(got["acc_mean"], acc), (row, dataset, got["acc_mean"])
        assert _close(got["acc_std"], acc_std), (row, dataset, got["acc_std"])  # sample std, ddof=1
        assert int(got["n"]) == n
        assert _close(got["forgetting_cdl_mean"], forg) and _close(got["forgetting_cdl_std"], forg_std)
        assert _close(got["acc_delta"], d_acc), (row, dataset, got["acc_delta"])  # baseline rows: no delta
        assert _close(got["forgetting_cdl_delta"], d_forg), (row, dataset, got["forgetting_cdl_delta"])
        twice = lambda x: None if x is None else 2 * x  # noqa: E731
        assert _close(got["forgetting_chaudhry_mean"], twice(forg)) and _close(got["forgetting_chaudhry_std"], twice(forg_std))
        assert _close(got["forgetting_chaudhry_delta"], twice(d_forg)), (row, dataset)
        assert (int(got["pruned"]), int(got["failed"])) == (pruned, failed), (row, dataset)
    # the baseline first within each (student, method, dataset)
    for dataset in ("synthetic", "fashion_mnist"):
        teachers = list(table[table["dataset"] == dataset]["teacher"])
        assert teachers == ["none", "demo-t"]


def test_not_the_average_of_a_cells_trials_nor_the_best_test_accuracy(main_trials):
    trials, _ = main_trials
    got = _table_row(paper_table(trials), KD, "synthetic")
    all_trials_mean = trials[(trials["kd"] == "kd") & (trials["dataset"] == "synthetic") & (trials["status"] == "completed")]["test_avg_acc"].mean()
    assert got["acc_mean"] == 50.0 and all_trials_mean != 50.0


def test_pruned_and_failed_trials_are_counted_even_where_a_row_has_no_completed_trial(main_trials):
    trials, _ = main_trials
    # drop KD fashion_mnist s0: KD then has only a pruned and a failed trial on fashion_mnist (seed 1)
    trials = trials[~((trials["kd"] == "kd") & (trials["dataset"] == "fashion_mnist") & (trials["seed"] == 0))]
    table = paper_table(trials)
    kd = table[table["kd"] == "kd"]
    assert (int(kd["pruned"].sum()), int(kd["failed"].sum())) == (1, 2)  # synthetic: 0 pruned, 1 failed
    assert int(table["pruned"].sum()) == int((trials["status"] == "pruned").sum())
    assert int(table["failed"].sum()) == int((trials["status"] == "failed").sum())
    # and a row whose only trials were pruned is shown, counted, without numbers
    lost = trials[(trials["kd"] == "kd")].assign(kd="dkd", status="pruned")
    table = paper_table(pd.concat([trials, lost], ignore_index=True))
    dkd = table[table["kd"] == "dkd"]
    assert len(dkd) > 0 and (dkd["n"] == 0).all() and dkd["acc_mean"].isna().all() and int(dkd["pruned"].sum()) == len(lost)
    assert "dkd" in render(table, "console")


def test_a_row_with_only_a_teacher_and_no_baseline_has_no_delta(main_trials):
    trials, _ = main_trials
    only_kd = trials[trials["teacher"] != "none"]
    table = paper_table(only_kd)
    assert table["acc_delta"].isna().all() and table["forgetting_cdl_delta"].isna().all()
    assert table["forgetting_chaudhry_delta"].isna().all()
    assert len(table) == 2


# -- rendering -------------------------------------------------------------------------------------------------
def test_console_table_is_aligned_with_mean_std_n_and_delta(main_trials, capsys, store):
    code, out, err = run_main(capsys, "--experiment", "sweep-main", "--tracking-uri", store["uri"])
    assert code == 0, err
    lines = out.rstrip("\n").split("\n")[1:-1]  # the first line names the comparison, the last is the paired Δacc legend
    assert len(lines) == 2 + 2  # header, rule, one line per row (baseline, KD)
    assert len({len(line) for line in lines}) == 1  # columns padded to one width
    header = lines[0]
    for column in ("teacher", "student", "method", "kd", "fashion_mnist acc", "fashion_mnist Δacc", "synthetic acc",
                   "synthetic forgetting (CDL)", "synthetic Δforg (CDL)", "synthetic forgetting (Chaudhry)",
                   "synthetic Δforg (Chaudhry)", "pruned", "failed"):
        assert column in header
    assert set(lines[1].replace(" ", "")) == {"-"}
    baseline, kd = lines[2], lines[3]
    assert baseline.split()[:4] == list(BASE) and kd.split()[:4] == list(KD)
    assert f"42.00 ± {SQRT8:.2f} (n=2)" in baseline and f"11.00 ± {SQRT2:.2f} (n=2)" in baseline
    assert f"22.00 ± {2 * SQRT2:.2f} (n=2)" in baseline  # Chaudhry's
    assert f"23.00 ± {SQRT18:.2f} (n=2)" in baseline and "+" not in baseline
    assert f"50.00 ± {SQRT8:.2f} (n=2)" in kd and "+8.00" in kd and "-6.00" in kd
    assert "30.00 (n=1)" in kd and "9.00 (n=1)" in kd and "+7.00" in kd and "-7.00" in kd  # n=1: no std
    assert "-12.00" in kd and "18.00 (n=1)" in kd and "-14.00" in kd  # Chaudhry's
    assert "30.00 ±" not in kd
    assert kd.split()[-2:] == ["1", "2"] and baseline.split()[-2:] == ["1", "0"]  # pruned, failed summed over datasets


def test_markdown_is_a_pipe_table_with_a_column_per_dataset_metric(main_trials):
    trials, _ = main_trials
    text = render(paper_table(trials), "markdown")
    lines = text.split("\n\n")[0].split("\n")  # the table; the paired Δacc legend follows a blank line
    assert len(lines) == 2 + 2
    assert all(line.startswith("| ") or line.startswith("|-") for line in lines)
    assert all(line.endswith("|") for line in lines)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    expected = ["teacher", "student", "method", "kd"]
    for d in ("fashion_mnist", "synthetic"):
        expected += [f"{d} acc", f"{d} Δacc", f"{d} paired Δacc", f"{d} forgetting (CDL)", f"{d} Δforg (CDL)",
                     f"{d} forgetting (Chaudhry)", f"{d} Δforg (Chaudhry)"]
    assert header == expected + ["pruned", "failed"]
    assert set(lines[1].strip("|").split("|")) == {"---"} and lines[1].count("|") == len(header) + 1
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    baseline = dict(zip(header, rows[0]))
    kd = dict(zip(header, rows[1]))
    assert baseline["synthetic acc"] == f"42.00 ± {SQRT8:.2f} (n=2)" and baseline["synthetic Δacc"] == ""
    assert kd["synthetic acc"] == f"50.00 ± {SQRT8:.2f} (n=2)" and kd["synthetic Δacc"] == "+8.00"
    assert kd["synthetic Δforg (CDL)"] == "-6.00" and kd["synthetic Δforg (Chaudhry)"] == "-12.00"
    assert kd["fashion_mnist acc"] == "30.00 (n=1)" and kd["fashion_mnist Δacc"] == "+7.00"
    assert kd["fashion_mnist forgetting (CDL)"] == "9.00 (n=1)" and kd["fashion_mnist forgetting (Chaudhry)"] == "18.00 (n=1)"
    assert (baseline["pruned"], baseline["failed"], kd["pruned"], kd["failed"]) == ("1", "0", "1", "2")


def test_markdown_marks_a_dataset_a_row_lacks(main_trials):
    trials, _ = main_trials
    missing = trials[~((trials["kd"] == "kd") & (trials["dataset"] == "fashion_mnist"))]
    lines = render(paper_table(missing), "markdown").rstrip("\n").split("\n")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    kd = dict(zip(header, [c.strip() for c in lines[3].strip("|").split("|")]))
    assert kd["fashion_mnist acc"] == kd["fashion_mnist forgetting (CDL)"] == kd["fashion_mnist forgetting (Chaudhry)"] == "-"
    assert kd["synthetic acc"].startswith("50.00")


def test_csv_parses_with_pandas_and_its_numbers_are_the_table(main_trials, capsys, store, tmp_path):
    out_file = tmp_path / "table.csv"
    code, out, err = run_main(capsys, "--experiment", "sweep-main", "--tracking-uri", store["uri"], "--format", "csv", "--out", str(out_file))
    assert code == 0, err
    assert out_file.read_text() == out  # --out holds exactly the table printed
    parsed = pd.read_csv(io.StringIO(out))
    table = paper_table(main_trials[0])
    assert list(parsed.columns) == list(table.columns)
    assert len(parsed) == len(table)
    for (_, want), (_, got) in zip(table.iterrows(), parsed.iterrows()):
        for column in ("teacher", "student", "method", "kd", "dataset"):
            assert got[column] == want[column]
        for column in ("acc_mean", "acc_std", "n", "forgetting_cdl_mean", "forgetting_cdl_std", "forgetting_chaudhry_mean",
                       "forgetting_chaudhry_std", "acc_delta", "forgetting_cdl_delta", "forgetting_chaudhry_delta", "pruned", "failed"):
            if pd.isna(want[column]):
                assert pd.isna(got[column]), column
            else:
                assert abs(float(got[column]) - float(want[column])) < 1e-4, column
    kd = _table_row(parsed, KD, "synthetic")
    assert kd["acc_mean"] == 50.0 and kd["acc_delta"] == 8.0 and abs(kd["acc_std"] - SQRT8) < 1e-4


def test_markdown_format_from_the_command_line(capsys, store):
    code, out, err = run_main(capsys, "--experiment", "sweep-main", "--tracking-uri", store["uri"], "--format", "markdown")
    assert code == 0, err
    assert out.split("\n")[2].startswith("| teacher | student | method | kd | fashion_mnist acc |")  # under the comparison line
    assert len(out.rstrip("\n").split("\n")) == 2 + 4 + 2  # and a blank line, the paired Δacc legend


# -- --compare paper -------------------------------------------------------------------------------------------
# Where the authors' leaderboard file lives beside this checkout (DESIGN.md: ../shared/paper_leaderboard.csv); a
# clean clone has none, and then the shipped CSV is checked on its own: the boards' grids and values copied by hand.
LEADERBOARD = Path(__file__).resolve().parents[2] / "shared" / "paper_leaderboard.csv"
BOARD_2026, BOARD_V1 = "leaderboard-2026", "v1-2024-07"
VT = "vit_tiny_patch16_224"
FEATURE_KD = ["kd", "dkd", "fitnets", "reviewkd", "deit", "dcdl"]
# (board, teacher, student, method, kd, dataset) -> (acc, forgetting), read off the leaderboard file by hand
SPOT_VALUES = {
    (BOARD_2026, VB, VS, "coda", "dcdl", "cifar100"): (84.31, 5.63),
    (BOARD_2026, VL, VB, "apt", "dcdl", "cifar100"): (89.41, 2.74),
    (BOARD_2026, VL, VB, "l2p", "reviewkd", "cifar100"): (83.12, 7.97),
    (BOARD_2026, "none", VB, "l2p", "none", "imagenet_r"): (73.94, 4.41),
    (BOARD_2026, VL, VB, "dualprompt", "fitnets", "imagenet_r"): (71.23, 5.71),
    (BOARD_2026, VB, VS, "apt", "deit", "imagenet_r"): (72.34, 3.71),
    (BOARD_V1, "none", VL, "coda", "none", "cifar100"): (88.97, 3.97),
    (BOARD_V1, VB, VS, "dualprompt", "cdl_prompt", "cifar100"): (82.29, 6.6),
    (BOARD_V1, "none", VB, "l2p", "none", "imagenet_r"): (71.59, 5.65),
    (BOARD_V1, VB, VT, "dualprompt", "cdl_prompt", "imagenet_r"): (53.88, 9.60),
    (BOARD_V1, "none", VT, "coda", "none", "imagenet_r"): (50.23, 12.75),
}


def _board_cells(paper: pd.DataFrame, board: str) -> list[tuple[str, ...]]:
    return list(paper.loc[paper["board"] == board, [*report.ROW, "dataset"]].itertuples(index=False, name=None))


def test_the_shipped_paper_results_hold_every_published_number_of_both_boards():
    raw = Path(report.__file__).with_name("paper_results.csv").read_text()
    header = " ".join(line for line in raw.splitlines() if line.startswith("#"))
    assert "Continual Distillation Learning" in header and "IRVLUTD/irvlutd.github.io" in header
    assert BOARD_2026 in header and BOARD_V1 in header
    paper = load_paper()
    assert list(paper.columns) == ["board", "teacher", "student", "method", "kd", "dataset", "paper_acc", "paper_forgetting"]
    assert not paper.duplicated(subset=["board", *report.ROW, "dataset"]).any()
    assert paper["paper_acc"].between(0, 100).all() and paper["paper_forgetting"].between(0, 100).all()
    assert (paper.loc[paper["teacher"] == "none", "kd"] == "none").all()  # "none" stays a string, not NaN
    # the current board: 4 prompt methods x (each student alone + 6 KD methods from its teacher) x 2 datasets
    current = [(t, s, m, kd, d) for m in ("l2p", "dualprompt", "coda", "apt") for t, s in ((VB, VS), (VL, VB))
               for kd in ["none", *FEATURE_KD] for d in ("cifar100", "imagenet_r")]
    current = [("none", s, m, "none", d) if kd == "none" else (t, s, m, kd, d) for t, s, m, kd, d in current]
    assert len(current) == 112 and sorted(_board_cells(paper, BOARD_2026)) == sorted(current)
    # v1: the teachers alone (ViT-L), and each student alone and with CDL-Prompt, for L2P, DualPrompt, CODA
    v1 = [row for m in ("l2p", "dualprompt", "coda") for d in ("cifar100", "imagenet_r") for row in (
        ("none", VL, m, "none", d), *((x, s, m, kd, d) for t, s in ((VL, VB), (VB, VS), (VB, VT))
                                     for x, kd in (("none", "none"), (t, "cdl_prompt"))))]
    assert len(v1) == 42 and sorted(_board_cells(paper, BOARD_V1)) == sorted(v1)
    assert len(paper) == 112 + 42
    values = paper.set_index(["board", *report.ROW, "dataset"])
    for key, (acc, forgetting) in SPOT_VALUES.items():
        assert (values.loc[key, "paper_acc"], values.loc[key, "paper_forgetting"]) == (acc, forgetting), key


def test_the_shipped_paper_results_equal_the_authors_leaderboard_file_where_it_is_present():
    """Beside this checkout the leaderboard file is there: every row, in the project's names, number for number.
    (A clean clone lacks it; the test above then stands alone.)"""
    if not LEADERBOARD.is_file():
        return
    board = pd.read_csv(LEADERBOARD, comment="#", keep_default_na=False, dtype=str)
    mapped = {(r.board, r.teacher or "none", r.student, r.prompt_method, r.kd_method, r.dataset): (float(r.final_avg_acc), float(r.forgetting))
              for r in board.itertuples()}
    assert len(mapped) == len(board) == 154
    shipped = {(r.board, r.teacher, r.student, r.method, r.kd, r.dataset): (r.paper_acc, r.paper_forgetting)
               for r in load_paper().itertuples()}
    assert shipped == mapped
    for key, value in SPOT_VALUES.items():
        assert mapped[key] == value, key


def test_a_cell_on_both_boards_takes_the_current_boards_number_and_v1_fills_in_the_rest():
    chosen = report.paper_per_cell(load_paper())
    assert not chosen.duplicated(subset=[*report.ROW, "dataset"]).any()
    assert len(chosen) == 112 + 42 - 12  # the v1 board's 12 ViT-B and ViT-S baselines are on the current board too
    by_cell = chosen.set_index([*report.ROW, "dataset"])
    assert tuple(by_cell.loc[("none", VB, "l2p", "none", "imagenet_r"), ["paper_board", "paper_acc"]]) == (BOARD_2026, 73.94)
    assert tuple(by_cell.loc[(VB, VT, "coda", "cdl_prompt", "cifar100"), ["paper_board", "paper_acc"]]) == (BOARD_V1, 70.05)
    assert set(by_cell["paper_board"]) == {BOARD_2026, BOARD_V1}
    with pytest.raises(ReportError, match="unknown boards"):
        report.paper_per_cell(load_paper().assign(board="v0"))


def test_compare_paper_adds_the_published_numbers_their_board_and_the_difference(store):
    trials, _ = load_trials(store["uri"], "sweep-paper")
    table = compare_with_paper(paper_table(trials), load_paper())
    assert len(table) == 6  # the paper's other rows are not added, and no cell is doubled by the two boards
    base = _table_row(table, ("none", VB, "coda", "none"), "cifar100")
    assert base["acc_mean"] == 85.5 and base["paper_acc"] == 86.16 and base["paper_forgetting"] == 5.63
    assert base["paper_board"] == BOARD_2026  # on both boards: the current one
    assert abs(base["acc_vs_paper"] - (85.5 - 86.16)) < 1e-9
    # against CDL's forgetting (5.5), not Chaudhry's nor the runs' headline test_forgetting (both 11.0 here)
    assert base["forgetting_cdl_mean"] == 5.5 and base["forgetting_chaudhry_mean"] == 11.0
    assert abs(base["forgetting_vs_paper"] - (5.5 - 5.63)) < 1e-9
    dual = _table_row(table, ("none", VB, "dualprompt", "none"), "cifar100")  # v1 has forgetting 5.46 here
    assert (dual["paper_board"], dual["paper_acc"], dual["paper_forgetting"]) == (BOARD_2026, 84.66, 5.91)
    assert abs(dual["forgetting_vs_paper"] - (5.0 - 5.91)) < 1e-9
    cdl = _table_row(table, (VL, VB, "coda", "cdl_prompt"), "cifar100")  # only on v1
    assert (cdl["paper_board"], cdl["paper_acc"], cdl["paper_forgetting"]) == (BOARD_V1, 87.69, 5.40)
    assert abs(cdl["acc_vs_paper"] - (87.5 - 87.69)) < 1e-9 and abs(cdl["acc_delta"] - 2.0) < 1e-9
    kd = _table_row(table, (VL, VB, "coda", "kd"), "cifar100")  # only on the current board
    assert (kd["paper_board"], kd["paper_acc"], kd["paper_forgetting"]) == (BOARD_2026, 86.27, 5.45)
    assert abs(kd["acc_vs_paper"] - (84.0 - 86.27)) < 1e-9 and abs(kd["forgetting_vs_paper"] - (7.0 - 5.45)) < 1e-9
    no_paper = _table_row(table, (VL, VS, "coda", "kd"), "cifar100")
    assert pd.isna(no_paper["paper_acc"]) and pd.isna(no_paper["acc_vs_paper"]) and pd.isna(no_paper["paper_board"])
    assert abs(no_paper["acc_delta"] - 1.0) < 1e-9  # still compared with its own baseline
    old = _table_row(table, ("none", VS, "coda", "none"), "cifar100")  # older code: only Chaudhry's, as test_forgetting
    assert old["paper_forgetting"] == 6.48 and abs(old["acc_vs_paper"] - (82.0 - 82.18)) < 1e-9
    assert pd.isna(old["forgetting_cdl_mean"]) and pd.isna(old["forgetting_vs_paper"])  # missing, not the old number


def test_compare_paper_rendered(capsys, store):
    code, out, err = run_main(capsys, "--experiment", "sweep-paper", "--tracking-uri", store["uri"], "--compare", "paper", "--format", "markdown")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("|")]  # the table, not the legend under it
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert {"cifar100 paper acc/forg (CDL)", "cifar100 paper board", "cifar100 vs paper"} <= set(header)
    rows = {tuple(r[:4]): dict(zip(header, r)) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert len(rows) == 6
    base = rows[("none", VB, "coda", "none")]
    assert (base["cifar100 paper acc/forg (CDL)"], base["cifar100 paper board"]) == ("86.16 / 5.63", BOARD_2026)
    assert base["cifar100 vs paper"] == "-0.66 / -0.13"  # 5.50 - 5.63, CDL's
    dual = rows[("none", VB, "dualprompt", "none")]
    assert (dual["cifar100 paper acc/forg (CDL)"], dual["cifar100 paper board"]) == ("84.66 / 5.91", BOARD_2026)
    cdl = rows[(VL, VB, "coda", "cdl_prompt")]
    assert (cdl["cifar100 paper acc/forg (CDL)"], cdl["cifar100 paper board"]) == ("87.69 / 5.40", BOARD_V1)
    assert cdl["cifar100 vs paper"] == "-0.19 / +0.10"
    kd = rows[(VL, VB, "coda", "kd")]
    assert (kd["cifar100 paper acc/forg (CDL)"], kd["cifar100 paper board"], kd["cifar100 vs paper"]) == ("86.27 / 5.45", BOARD_2026, "-2.27 / +1.55")
    none = rows[(VL, VS, "coda", "kd")]
    assert (none["cifar100 paper acc/forg (CDL)"], none["cifar100 paper board"], none["cifar100 vs paper"]) == ("-", "-", "")
    old = rows[("none", VS, "coda", "none")]
    assert old["cifar100 vs paper"] == "-0.18 / -" and old["cifar100 forgetting (CDL)"] == "-"

    code, out, err = run_main(capsys, "--experiment", "sweep-paper", "--tracking-uri", store["uri"], "--compare", "paper", "--format", "csv")
    assert code == 0, err
    parsed = pd.read_csv(io.StringIO(out))
    assert {"paper_acc", "paper_forgetting", "paper_board", "acc_vs_paper", "forgetting_vs_paper"} <= set(parsed.columns)
    cdl = _table_row(parsed, (VL, VB, "coda", "cdl_prompt"), "cifar100")
    assert cdl["paper_acc"] == 87.69 and cdl["paper_board"] == BOARD_V1 and abs(cdl["acc_vs_paper"] - -0.19) < 1e-4
    assert abs(cdl["forgetting_vs_paper"] - (5.5 - 5.40)) < 1e-4
    assert _table_row(parsed, (VL, VB, "coda", "kd"), "cifar100")["paper_board"] == BOARD_2026
    assert pd.isna(_table_row(parsed, (VL, VS, "coda", "kd"), "cifar100")["paper_acc"])

    code, out, err = run_main(capsys, "--experiment", "sweep-paper", "--tracking-uri", store["uri"], "--compare", "paper")
    assert code == 0, err
    head = out.splitlines()[1]  # under the comparison line
    assert "cifar100 paper board" in head
    kd_line = next(line for line in out.splitlines() if line.split()[:4] == [VL, VS, "coda", "kd"])
    assert " - " in kd_line + " "
    cdl_line = next(line for line in out.splitlines() if line.split()[:4] == [VL, VB, "coda", "cdl_prompt"])
    assert BOARD_V1 in cdl_line and BOARD_2026 not in cdl_line


def test_a_sweep_logged_by_older_code_has_no_named_forgetting(capsys, store, tmp_path):
    """Its test_forgetting was Chaudhry's; neither named column is filled from it."""
    trials, _ = load_trials(store["uri"], "sweep-old")
    assert trials["test_forgetting"].tolist() == [20.0]
    assert trials[["test_forgetting_cdl", "test_forgetting_chaudhry"]].isna().all().all()
    code, out, err = run_main(capsys, "--experiment", "sweep-old", "--tracking-uri", store["uri"], "--format", "markdown",
                              "--parquet", str(tmp_path / "pq"))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("|")]
    row = dict(zip([c.strip() for c in lines[0].strip("|").split("|")], [c.strip() for c in lines[2].strip("|").split("|")]))
    assert row["synthetic acc"] == "40.00 (n=1)"
    assert row["synthetic forgetting (CDL)"] == row["synthetic forgetting (Chaudhry)"] == "-"
    tasks = pd.read_parquet(tmp_path / "pq" / "tasks.parquet")
    assert tasks["test_forgetting"].notna().all() and tasks["test_forgetting_cdl"].isna().all()


# -- Parquet ---------------------------------------------------------------------------------------------------
def test_parquet_export_matches_the_schema_and_the_logged_values(capsys, store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = tmp_path / "pq"
    code, out, err = run_main(capsys, "--experiment", "sweep-main", "--tracking-uri", store["uri"], "--parquet", str(directory))
    assert code == 0, err
    assert f"wrote {directory / 'runs.parquet'}" in out and f"wrote {directory / 'tasks.parquet'}" in out

    arrow = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
    runs_schema = pq.read_schema(directory / "runs.parquet")
    assert runs_schema.names == list(RUNS_SCHEMA)
    for name, kind in RUNS_SCHEMA.items():
        assert runs_schema.field(name).type == arrow[kind], name
    # the documented interface, independent of RUNS_SCHEMA itself
    ints = {"seed", "optuna_trial"}
    doubles = {"metric", "test_avg_acc", "test_forgetting", "test_forgetting_cdl", "test_forgetting_chaudhry",
               "test_avg_incremental_acc", "val_avg_acc", "val_forgetting", "val_forgetting_cdl", "val_forgetting_chaudhry"}
    strings = {"run_id", "sweep", "cell", "teacher", "student", "method", "kd", "dataset", "status", "setting", "teacher_run_id", "config"}
    assert set(runs_schema.names) == ints | doubles | strings
    for name in runs_schema.names:
        want = pa.int64() if name in ints else pa.float64() if name in doubles else pa.string()
        assert runs_schema.field(name).type == want, name

    runs = pd.read_parquet(directory / "runs.parquet")
    assert len(runs) == len(MAIN_TRIALS) and runs["run_id"].is_unique
    assert str(runs["seed"].dtype) == "int64" and str(runs["metric"].dtype) == "float64"
    by_id = runs.set_index("run_id")
    for run_id, fake in zip(store["main"]["trials"], MAIN_TRIALS):
        got = by_id.loc[run_id]
        assert got["cell"] == fake.cell and got["status"] == fake.status and int(got["seed"]) == fake.seed
        if fake.steps:
            assert got["metric"] == fake.val and got["test_avg_acc"] == fake.acc and got["test_forgetting"] == fake.headline_forg
            assert got["test_forgetting_cdl"] == fake.forg and got["test_forgetting_chaudhry"] == 2 * fake.forg
        if fake.config:
            assert RunConfig.from_dict(json.loads(got["config"])).to_dict() == fake.run_config()
        else:
            assert pd.isna(got["config"])
        if fake.teacher_run:
            assert got["teacher_run_id"] == store["main"]["teacher"]
        else:
            assert pd.isna(got["teacher_run_id"])

    tasks_schema = pq.read_schema(directory / "tasks.parquet")
    metrics = ["test_avg_acc", "test_forgetting", "test_forgetting_cdl", "test_forgetting_chaudhry", "val_avg_acc",
               "val_forgetting", "val_forgetting_cdl", "val_forgetting_chaudhry", "test_acc_task1", "test_acc_task2"]
    assert tasks_schema.names == ["run_id", "task", *metrics]
    assert tasks_schema.field("run_id").type == pa.string() and tasks_schema.field("task").type == pa.int64()
    assert all(tasks_schema.field(m).type == pa.float64() for m in metrics)

    tasks = pd.read_parquet(directory / "tasks.parquet")
    assert not tasks.duplicated(subset=["run_id", "task"]).any()
    expected_rows = sum(fake.steps for fake in MAIN_TRIALS)
    assert len(tasks) == expected_rows
    by_key = tasks.set_index(["run_id", "task"])
    for run_id, fake in zip(store["main"]["trials"], MAIN_TRIALS):
        for step, values in fake.history().items():
            got = by_key.loc[(run_id, step)]
            for name in metrics:
                if name in values:
                    assert got[name] == values[name], (fake.cell, step, name)
                else:
                    assert pd.isna(got[name]), (fake.cell, step, name)  # task 2 not yet learned at step 1


def test_parquet_export_when_no_run_has_a_config(capsys, store, tmp_path):
    """Runs without config.json (e.g. older sweeps) give a null config column, not a crash."""
    directory = tmp_path / "pq"
    code, out, err = run_main(capsys, "--experiment", "sweep-paper", "--tracking-uri", store["uri"], "--parquet", str(directory))
    assert code == 0, err
    runs = pd.read_parquet(directory / "runs.parquet")
    assert len(runs) == len(PAPER_TRIALS) and runs["config"].isna().all()


# -- best configs ----------------------------------------------------------------------------------------------
def test_best_configs_one_file_per_cell_and_one_reruns(capsys, store, tmp_path):
    from cdl_core import run as cdl_run

    directory = tmp_path / "best"
    code, out, err = run_main(capsys, "--experiment", "sweep-main", "--tracking-uri", store["uri"], "--configs", str(directory))
    assert code == 0, err
    assert f"wrote {len(EXPECTED_BEST)} best configs" in out
    files = sorted(p.name for p in directory.iterdir())
    by_cell = {}
    for fake in MAIN_TRIALS:
        if EXPECTED_BEST.get((fake.row, fake.dataset, fake.seed)) == fake.optuna_trial:
            by_cell[fake.cell] = fake
    assert files == sorted(f"{cell}.json" for cell in by_cell)
    for cell, fake in by_cell.items():
        loaded = RunConfig.from_json(directory / f"{cell}.json")
        assert loaded.to_dict() == fake.run_config(), cell  # the best trial's config, not another trial's

    baseline = by_cell[FakeTrial(*BASE, "synthetic", 0, 0, "completed", 0, 0, 0).cell]
    result = tmp_path / "rerun.json"
    assert cdl_run.main(["--config", str(directory / f"{baseline.cell}.json"), "--quiet", "--no-baseline", "--out", str(result)]) == 0
    capsys.readouterr()
    runs = json.loads(result.read_text())["runs"]
    assert list(runs) == ["single"]


# -- plots -----------------------------------------------------------------------------------------------------
def test_plots_are_written_and_logged_to_the_parent_run(capsys, store, tmp_path):
    directory = tmp_path / "plots"
    code, out, err = run_main(capsys, "--experiment", "sweep-main", "--tracking-uri", store["uri"], "--plots", str(directory))
    assert code == 0, err
    curves = sorted(p.name for p in directory.glob("curves_*.png"))
    assert curves == ["curves_demo-s_coda_fashion_mnist.png", "curves_demo-s_coda_synthetic.png"]
    cells = {fake.cell for fake in MAIN_TRIALS if (fake.row, fake.dataset, fake.seed) in EXPECTED_BEST}
    matrices = {p.parent.name for p in directory.glob("matrices/*/accuracy_matrix.png")}
    assert matrices == cells
    pngs = [*directory.glob("curves_*.png"), *directory.glob("matrices/*/accuracy_matrix.png"), directory / "kd_gain.png"]
    for path in pngs:
        assert path.read_bytes()[:8] == PNG_MAGIC, path
        assert f"wrote {path}" in out

    client = store["client"]
    parent = store["main"]["parent"]
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {f"report/{name}" for name in curves} | {"report/kd_gain.png", "report/matrices"} <= logged
    logged_matrices = {a.path for a in client.list_artifacts(parent, "report/matrices")}
    assert logged_matrices == {f"report/matrices/{cell}" for cell in cells}
    some_cell = sorted(cells)[0]
    assert f"report/matrices/{some_cell}/accuracy_matrix.png" in {a.path for a in client.list_artifacts(parent, f"report/matrices/{some_cell}")}
    assert not client.list_artifacts(store["main"]["trials"][0], "report")  # logged to the parent only


def test_accuracy_matrix_from_per_task_metrics():
    from orchestrator.report_plots import accuracy_matrix

    tasks = pd.DataFrame([
        {"run_id": "r", "task": 2, "test_acc_task1": 39.0, "test_acc_task2": 41.0},
        {"run_id": "r", "task": 1, "test_acc_task1": 49.0, "test_acc_task2": float("nan")},
    ])
    assert accuracy_matrix(tasks) == [[49.0], [39.0, 41.0]]


# -- errors ----------------------------------------------------------------------------------------------------
def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_experiment_names_it_and_lists_the_existing_ones(capsys, store):
    code, out, err = run_main(capsys, "--experiment", "no-such-sweep", "--tracking-uri", store["uri"])
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "no-such-sweep" in line
    for name in ("sweep-main", "sweep-paper", "sweep-empty", "sweep-pruned"):
        assert name in line
    with pytest.raises(ReportError, match="no-such-sweep"):
        load_trials(store["uri"], "no-such-sweep")


def test_experiment_without_trial_runs(capsys, store):
    code, out, err = run_main(capsys, "--experiment", "sweep-empty", "--tracking-uri", store["uri"])
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "sweep-empty" in line and "no trial runs" in line


def test_experiment_with_only_pruned_and_failed_trials(capsys, store):
    code, out, err = run_main(capsys, "--experiment", "sweep-pruned", "--tracking-uri", store["uri"])
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "sweep-pruned" in line and "no completed trial" in line
    assert "pruned" in line and "failed" in line


def test_missing_sqlite_store_is_an_error_and_is_not_created(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "nowhere" / "mlflow.db"
    code, out, err = run_main(capsys, "--experiment", "x", "--tracking-uri", f"sqlite:///{db}")
    assert code == 2 and out == ""
    assert "no MLflow store" in _one_error_line(err)
    assert not db.exists() and not db.parent.exists()
    # the default URI is ./mlflow.db in the working directory
    code, out, err = run_main(capsys, "--experiment", "x")
    assert code == 2 and str(tmp_path / "mlflow.db") in _one_error_line(err)
    assert not (tmp_path / "mlflow.db").exists()
