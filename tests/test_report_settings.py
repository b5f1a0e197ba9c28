"""`python -m orchestrator.report --setting tuned|default` on a fake sweep whose runs carry the `setting` tag (each
cell's first trial "default", the others "tuned") and on one logged before the tag existed: which trial stands for
each cell, the comparison line above the table, the tag in runs.parquet, and the error for a sweep without it."""
from __future__ import annotations

import io
import json
import statistics
from typing import Any

import pandas as pd
import pytest

from orchestrator.report import best_per_cell, comparison_line, load_trials, paper_table, trials_for_setting
from report_checks import (  # noqa: F401 - restore_mlflow_tracking_uri is autouse: undoes load_trials' global tracking URI
    BASE, DKD, KD, FakeTrial, make_sweep, restore_mlflow_tracking_uri, run_main,
)

Row = tuple[str, str, str, str]

# (row, seed) -> the cell's trials: (optuna_trial, setting, status, val_avg_acc, test_avg_acc). KD's tuned trials beat
# its default on both metrics; KD s0 #2 has the best test accuracy with a lower validation one; DKD s0's default trial
# was pruned, so --setting default leaves that cell out; the baselines have nothing to tune: one default trial each.
PLANTED: dict[tuple[Row, int], list[tuple[int, str, str, float, float]]] = {
    (BASE, 0): [(0, "default", "completed", 50, 40)],
    (BASE, 1): [(0, "default", "completed", 52, 44)],
    (KD, 0): [(0, "default", "completed", 50, 41), (1, "tuned", "completed", 60, 55), (2, "tuned", "completed", 58, 70)],
    (KD, 1): [(0, "default", "completed", 55, 47), (1, "tuned", "completed", 65, 60), (2, "tuned", "pruned", 70, 90)],
    (DKD, 0): [(0, "default", "pruned", 60, 90), (1, "tuned", "completed", 70, 80)],
    (DKD, 1): [(0, "default", "completed", 50, 42), (1, "tuned", "completed", 52, 43)],
}
DATASET = "synthetic"
METRIC = "val_avg_acc"
DEFAULT_LINE = "comparison: default vs default (each cell's first trial, the methods' defaults)"


def _fake(row: Row, seed: int, optuna_trial: int, status: str, val: float, acc: float) -> FakeTrial:
    return FakeTrial(*row, DATASET, seed, optuna_trial, status, val, acc, 5.0, steps=2 if status == "completed" else 1)


def _expected_picks(setting: str) -> dict[tuple[Row, int], int]:
    """(row, seed) -> the Optuna trial that should stand for the cell, worked out from PLANTED: the completed trial
    with the best validation accuracy, among the cell's default trials for "default"."""
    picks = {}
    for cell, trials in PLANTED.items():
        completed = [t for t in trials if t[2] == "completed"]
        if setting == "default":
            completed = [t for t in completed if t[1] == "default"]
        if completed:
            picks[cell] = max(completed, key=lambda t: t[3])[0]
    return picks


def _expected_acc(row: Row, setting: str) -> list[float]:
    picks = _expected_picks(setting)
    return [t[4] for (r, seed), trials in PLANTED.items() if r == row and (r, seed) in picks for t in trials if t[0] == picks[(r, seed)]]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """sweep-settings: PLANTED, each run tagged with its setting; sweep-untagged: runs logged before the tag existed."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow_settings")
    uri = "sqlite:///" + str(root / "mlflow.db")
    client = MlflowClient(uri)
    planted = [(cell, trial) for cell, trials in PLANTED.items() for trial in trials]
    fakes = [_fake(row, seed, n, status, val, acc) for (row, seed), (n, _, status, val, acc) in planted]
    ids = make_sweep(client, root, "sweep-settings", fakes)["trials"]
    settings = {}
    for run_id, (_, (_, setting, *_)) in zip(ids, planted):
        client.set_tag(run_id, "setting", setting)
        settings[run_id] = setting
    untagged = make_sweep(client, root, "sweep-untagged", [
        _fake(BASE, 0, 0, "completed", 50, 40), _fake(KD, 0, 0, "completed", 55, 45), _fake(KD, 0, 1, "completed", 60, 48)])
    return {"uri": uri, "settings": settings, "untagged": untagged["trials"]}


def _chosen(trials: pd.DataFrame, setting: str) -> dict[tuple[Row, int], int]:
    best = best_per_cell(trials_for_setting(trials, setting))
    return {((r.teacher, r.student, r.method, r.kd), int(r.seed)): int(r.optuna_trial) for r in best.itertuples()}


def _row(table: pd.DataFrame, row: Row) -> pd.Series:
    mask = (table[["teacher", "student", "method", "kd"]] == list(row)).all(axis=1)
    assert mask.sum() == 1, table
    return table[mask].iloc[0]


def _markdown_rows(text: str) -> dict[Row, dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {tuple(r[:4]): dict(zip(header, r)) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


# -- reading the tag -------------------------------------------------------------------------------------------
def test_load_trials_reads_the_setting_tag_and_none_where_a_run_has_none(store):
    trials, _ = load_trials(store["uri"], "sweep-settings")
    assert dict(zip(trials["run_id"], trials["setting"])) == store["settings"]
    old, _ = load_trials(store["uri"], "sweep-untagged")
    assert len(old) == len(store["untagged"]) and old["setting"].isna().all()


def test_runs_parquet_has_the_setting_and_null_for_older_runs(capsys, store, tmp_path):
    for experiment, directory in (("sweep-settings", tmp_path / "new"), ("sweep-untagged", tmp_path / "old")):
        code, _, err = run_main(capsys, "--experiment", experiment, "--tracking-uri", store["uri"], "--parquet", str(directory))
        assert code == 0, err
    runs = pd.read_parquet(tmp_path / "new" / "runs.parquet")
    assert dict(zip(runs["run_id"], runs["setting"])) == store["settings"]
    assert pd.read_parquet(tmp_path / "old" / "runs.parquet")["setting"].isna().all()


# -- which trial stands for a cell -----------------------------------------------------------------------------
def test_default_picks_each_cells_default_trial_even_where_a_tuned_one_is_better(store):
    trials, _ = load_trials(store["uri"], "sweep-settings")
    assert _chosen(trials, "default") == _expected_picks("default") == {(BASE, 0): 0, (BASE, 1): 0, (KD, 0): 0, (KD, 1): 0, (DKD, 1): 0}
    table = paper_table(trials_for_setting(trials, "default"))
    kd, dkd, base = _row(table, KD), _row(table, DKD), _row(table, BASE)
    assert kd["acc_mean"] == pytest.approx(statistics.fmean(_expected_acc(KD, "default"))) == pytest.approx(44.0)
    assert kd["acc_delta"] == pytest.approx(44.0 - statistics.fmean([40, 44]))
    assert int(kd["pruned"]) == 0  # its tuned trial's pruning is not the default setting's
    assert (int(dkd["n"]), int(dkd["pruned"]), dkd["acc_mean"]) == (1, 1, 42.0)  # the pruned default cell: out, counted
    assert int(base["n"]) == 2


def test_tuned_picks_each_cells_best_completed_trial(store):
    trials, _ = load_trials(store["uri"], "sweep-settings")
    assert _chosen(trials, "tuned") == _expected_picks("tuned") == {(BASE, 0): 0, (BASE, 1): 0, (KD, 0): 1, (KD, 1): 1, (DKD, 0): 1, (DKD, 1): 1}
    table = paper_table(trials_for_setting(trials, "tuned"))
    kd, dkd = _row(table, KD), _row(table, DKD)
    assert kd["acc_mean"] == pytest.approx(statistics.fmean(_expected_acc(KD, "tuned"))) == pytest.approx(57.5)
    assert (int(kd["pruned"]), int(dkd["pruned"]), int(dkd["n"])) == (1, 1, 2)


def test_default_from_the_command_line_shows_the_default_trials_numbers(capsys, store, tmp_path):
    code, out, err = run_main(capsys, "--experiment", "sweep-settings", "--tracking-uri", store["uri"], "--format", "markdown",
                              "--setting", "default", "--configs", str(tmp_path / "configs"))
    assert code == 0, err
    rows = _markdown_rows(out)
    assert rows[KD][f"{DATASET} acc"].startswith("44.00 ± ") and rows[KD][f"{DATASET} Δacc"] == f"{44.0 - 42.0:+.2f}"
    assert rows[DKD][f"{DATASET} acc"] == "42.00 (n=1)" and rows[DKD]["pruned"] == "1"
    assert "wrote 5 default configs" in out
    for path in (tmp_path / "configs").iterdir():  # FakeTrial's lr is 0.001 * (1 + optuna_trial): the default trial's
        assert json.loads(path.read_text())["train"]["lr"] == pytest.approx(0.001)


# -- the comparison line ---------------------------------------------------------------------------------------
def _tuned_line() -> str:
    """The line for PLANTED: per cell with a completed trial, its completed and pruned trials (a pruned one lost on
    the validation metric; a failed one never ran to be ranked)."""
    ranked = {cell: sum(t[2] in ("completed", "pruned") for t in trials) for cell, trials in PLANTED.items()
              if any(t[2] == "completed" for t in trials)}
    kd = [n for (row, _), n in ranked.items() if row[0] != "none"]
    baselines = [n for (row, _), n in ranked.items() if row[0] == "none"]
    assert (min(kd), max(kd), set(baselines)) == (2, 3, {1})  # the plant: KD cells of 2-3 trials, single-trial baselines
    return (f"comparison: tuned KD rows (best of up to {max(kd)} trials per cell by {METRIC}) "
            "vs untuned student-alone baselines (1 trial per cell)")


def test_the_comparison_line_above_a_tuned_vs_untuned_table(capsys, store):
    for fmt in ("console", "markdown"):
        code, out, err = run_main(capsys, "--experiment", "sweep-settings", "--tracking-uri", store["uri"], "--format", fmt)
        assert code == 0, err
        lines = out.split("\n")
        assert lines[0] == _tuned_line() and sum("comparison:" in line for line in lines) == 1
        if fmt == "markdown":  # a blank line, then the table
            assert lines[1] == "" and lines[2].startswith("| teacher | student | method | kd |")
        else:  # the header and its rule right under it
            assert lines[1].split()[:4] == ["teacher", "student", "method", "kd"] and set(lines[2].replace(" ", "")) == {"-"}


def test_the_comparison_line_for_default(capsys, store):
    code, out, err = run_main(capsys, "--experiment", "sweep-settings", "--tracking-uri", store["uri"], "--setting", "default")
    assert code == 0, err
    assert out.split("\n")[0] == DEFAULT_LINE


def test_csv_has_no_comparison_line(capsys, store):
    code, out, err = run_main(capsys, "--experiment", "sweep-settings", "--tracking-uri", store["uri"], "--format", "csv")
    assert code == 0, err
    assert "comparison" not in out
    assert list(pd.read_csv(io.StringIO(out)).columns[:4]) == ["teacher", "student", "method", "kd"]


def test_the_comparison_line_counts_each_shown_cells_completed_and_pruned_trials():
    def trials(cells: dict[Row, tuple[str, ...]]) -> pd.DataFrame:
        return pd.DataFrame([{"teacher": row[0], "student": row[1], "method": row[2], "kd": row[3], "dataset": DATASET,
                              "seed": 0, "optuna_trial": n, "status": status, "metric": 50.0}
                             for row, statuses in cells.items() for n, status in enumerate(statuses)])

    # KD: 1 completed + 2 pruned is a best of 3; DKD's failed trial was never ranked: 2
    assert comparison_line(trials({KD: ("completed", "pruned", "pruned"), DKD: ("completed", "completed", "failed"),
                                   BASE: ("completed", "pruned")}), "tuned", METRIC) == (
        f"comparison: tuned KD rows (best of up to 3 trials per cell by {METRIC}) "
        f"vs tuned student-alone baselines (best of 2 trials per cell by {METRIC})")
    # a row with no completed trial is not in the table and not described
    assert comparison_line(trials({KD: ("completed", "failed"), BASE: ("pruned", "pruned")}), "tuned", METRIC) == (
        "comparison: untuned KD rows (1 trial per cell) with no student-alone baselines")
    assert comparison_line(trials({BASE: ("completed",)}), "default", METRIC) == (
        "comparison: default student-alone baselines (each cell's first trial, the methods' defaults) with no KD rows")


# -- a sweep from before default trials ------------------------------------------------------------------------
def test_default_on_a_sweep_without_setting_tags_is_one_error_line(capsys, store):
    code, out, err = run_main(capsys, "--experiment", "sweep-untagged", "--tracking-uri", store["uri"], "--setting", "default")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --setting default: ") and "Traceback" not in err
    assert "predate default trials" in lines[0] and "rerun the sweep with this version" in lines[0]
    code, out, err = run_main(capsys, "--experiment", "sweep-untagged", "--tracking-uri", store["uri"])  # tuned still works
    assert code == 0, err
    assert out.split("\n")[0] == (f"comparison: tuned KD rows (best of 2 trials per cell by {METRIC}) "
                                  "vs untuned student-alone baselines (1 trial per cell)")


def test_setting_accepts_only_tuned_and_default(capsys, store):
    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, "--experiment", "sweep-settings", "--tracking-uri", store["uri"], "--setting", "best")
    assert exit_info.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err

