"""`python -m orchestrator.report --experiment NAME`: the paper's table for a finished sweep, from MLflow.

One row per (teacher, student, prompt method, KD method); per dataset the final average accuracy and both
forgetting definitions (CDL's, as the official trainer prints it, and Chaudhry's; see cdl_core.metrics) on the
test split (mean ± std over seeds, n shown) and the change against the no-teacher baseline of the same student
and method, for accuracy also paired seed by seed with its 95% interval (orchestrator.paired_stats). Each cell (a
row, dataset and seed) is represented by its best completed trial, ranked by the sweep's validation metric as
Optuna ranked them, or with `--setting default` by its first trial, which ran the methods' default settings; pruned
and failed trials are left out and counted. A line above the table names the comparison it shows.

Also: `--compare paper` (the published numbers side by side, each with the board it is from: the current
leaderboard where it has the cell, else the v1 board; the paper's forgetting against CDL's),
`--parquet DIR` (runs and per-task metrics), `--plots DIR` (PNGs, also logged to the sweep's parent run) and
`--configs DIR` (each cell's best config, which `python -m cdl_core.run --config FILE` reruns).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from cdl_core.cli import run_cli
from orchestrator.errors import ReportError
from orchestrator.paired_stats import CONFIDENCE, paired_gain

ROW = ["teacher", "student", "method", "kd"]
CELL = [*ROW, "dataset", "seed"]
# Per-task metrics read from MLflow. *_forgetting is the definition the run's config chose (RunConfig.forgetting);
# *_forgetting_cdl (as the official trainer prints it) and *_forgetting_chaudhry say which is which.
TASK_METRICS = (
    "test_avg_acc", "test_forgetting", "test_forgetting_cdl", "test_forgetting_chaudhry",
    "val_avg_acc", "val_forgetting", "val_forgetting_cdl", "val_forgetting_chaudhry",
)
# Each trial's values after its last task (runs.parquet keeps this order).
FINAL_METRICS = (*TASK_METRICS[:4], "test_avg_incremental_acc", *TASK_METRICS[4:])
# The table's forgetting columns and the definition each header names; the paper's forgetting is CDL's.
FORGETTINGS = {"forgetting_cdl": "CDL", "forgetting_chaudhry": "Chaudhry"}


# -- reading MLflow -------------------------------------------------------------------------------------------
def load_trials(tracking_uri: str, experiment: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per trial run (tags, params, final metrics) and the sweep's parent run info."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=50))
        raise ReportError(f"no MLflow experiment {experiment!r} at {tracking_uri}; experiments there: {', '.join(names) or 'none'}")
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string="tags.role = 'trial'")
    if runs.empty:
        raise ReportError(f"experiment {experiment!r} has no trial runs yet; run a sweep into it first (python -m orchestrator.sweep ...)")
    parents = client.search_runs([exp.experiment_id], "tags.role = 'sweep'")
    metric = parents[0].data.params.get("metric", "val_avg_acc") if parents else "val_avg_acc"
    trials = pd.DataFrame({
        "run_id": runs["run_id"],
        **{key: runs[f"tags.{key}"] for key in ("sweep", "cell", "teacher", "student", "method", "kd", "dataset", "status")},
        "setting": runs.get("tags.setting"),  # "default" or "tuned"; None in runs logged before default trials existed
        "seed": runs["tags.seed"].astype(int),
        "optuna_trial": runs["tags.optuna_trial"].astype(int),
        "teacher_run_id": runs.get("tags.teacher_run_id"),
        "metric": runs.get(f"metrics.{metric}"),
        # A metric older runs never logged (they have only *_forgetting, Chaudhry's) is NaN, never a stand-in.
        **{name: runs.get(f"metrics.{name}", float("nan")) for name in FINAL_METRICS},
    })
    info = {"experiment_id": exp.experiment_id, "metric": metric, "parent_run_ids": [p.info.run_id for p in parents]}
    return trials, info


def load_task_metrics(tracking_uri: str, run_ids: list[str]) -> pd.DataFrame:
    """Per-task metrics (step = tasks learned) of the given runs, one row per (run, task)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for run_id in run_ids:
        names = client.get_run(run_id).data.metrics
        for name in sorted(names):
            if name in TASK_METRICS or name.startswith("test_acc_task"):
                for m in client.get_metric_history(run_id, name):
                    rows.setdefault((run_id, m.step), {"run_id": run_id, "task": m.step})[name] = m.value
    frame = pd.DataFrame(list(rows.values()))
    return frame.sort_values(["run_id", "task"], ignore_index=True) if not frame.empty else frame


# -- the table ------------------------------------------------------------------------------------------------
SETTINGS = ("tuned", "default")
DEFAULT_TRIALS = "each cell's first trial, the methods' defaults"


def trials_for_setting(trials: pd.DataFrame, setting: str) -> pd.DataFrame:
    """The trials a cell is picked from: all of them for "tuned" (the best wins), only the cell's default trial
    for "default", so a cell whose default trial was pruned or failed is left out and counted."""
    if setting == "tuned":
        return trials
    defaults = trials[trials["setting"] == "default"]
    if defaults.empty:
        raise ReportError("--setting default: this sweep's runs predate default trials (no run is tagged setting=default); to "
                          "get them, rerun the sweep with this version under a new --name (python -m orchestrator.sweep --space "
                          "SPACE --name NEW; a --resume adds none to cells that already have trials)")
    return defaults


def best_per_cell(trials: pd.DataFrame) -> pd.DataFrame:
    """The best completed trial of each cell (by the sweep's metric); ties go to the earlier Optuna trial."""
    done = trials[trials["status"] == "completed"].dropna(subset=["metric"])
    ranked = done.sort_values(["metric", "optuna_trial"], ascending=[False, True])
    return ranked.drop_duplicates(subset=CELL, keep="first").sort_values(CELL, ignore_index=True)


def paper_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (row, dataset): mean/std/n over seeds of the best trials, the change against the no-teacher
    baseline of the same student and method (of the means, and for accuracy paired by seed: acc_paired_*), and
    how many trials were pruned or failed."""
    best = best_per_cell(trials)
    stats = best.groupby([*ROW, "dataset"]).agg(
        acc_mean=("test_avg_acc", "mean"), acc_std=("test_avg_acc", "std"), n=("test_avg_acc", "size"),
        **{f"{name}_{stat}": (f"test_{name}", stat) for name in FORGETTINGS for stat in ("mean", "std")},
    )
    # Every (row, dataset) that has trials, so one whose trials were all pruned or failed is shown and counted too.
    counts = trials.groupby([*ROW, "dataset"])["status"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=["pruned", "failed"], fill_value=0)
    table = counts.join(stats, how="left").reset_index()
    table["n"] = table["n"].fillna(0).astype(int)
    baseline = table[table["teacher"] == "none"].set_index(["student", "method", "dataset"])
    keys = list(zip(table["student"], table["method"], table["dataset"]))
    for column in ("acc", *FORGETTINGS):  # change against the no-teacher baseline of the same student and method
        table[f"{column}_delta"] = [
            getattr(r, f"{column}_mean") - baseline[f"{column}_mean"].get(k, float("nan")) if r.teacher != "none" else float("nan")
            for r, k in zip(table.itertuples(), keys)
        ]
    # Paired: a seed's trials share data order and augmentation across cells, so each seed's gain is against the
    # baseline of that seed; a seed only one of the two has is left out of the pairing.
    acc_by_seed = {key: dict(zip(cell["seed"], cell["test_avg_acc"]))
                   for key, cell in best.dropna(subset=["test_avg_acc"]).groupby([*ROW, "dataset"])}
    baseline_by_seed = {(student, method, dataset): seeds
                        for (teacher, student, method, _, dataset), seeds in acc_by_seed.items() if teacher == "none"}
    gains = [paired_gain(acc_by_seed.get(key, {}) if key[0] != "none" else {}, baseline_by_seed.get(k, {}))
             for key, k in zip(table[[*ROW, "dataset"]].itertuples(index=False, name=None), keys)]
    table["acc_paired_n"] = [g.n for g in gains]
    for column, field in (("acc_paired_gain", "mean"), ("acc_paired_low", "low"), ("acc_paired_high", "high")):
        table[column] = pd.Series([getattr(g, field) for g in gains], index=table.index, dtype="float64")  # None -> NaN
    table["acc_paired_established"] = [g.established for g in gains]
    order = table["teacher"].ne("none")  # the baseline first within each student and method
    return table.assign(_order=order).sort_values(["student", "method", "dataset", "_order", "teacher", "kd"]).drop(columns="_order").reset_index(drop=True)


def _how_chosen(side: str, trials_per_cell: pd.Series, setting: str, metric: str) -> str:
    if setting == "default":
        return f"default {side} ({DEFAULT_TRIALS})"
    most = int(trials_per_cell.max())
    if most == 1:
        return f"untuned {side} (1 trial per cell)"
    up_to = "up to " if trials_per_cell.min() < most else ""
    return f"tuned {side} (best of {up_to}{most} trials per cell by {metric})"


def comparison_line(trials: pd.DataFrame, setting: str, metric: str) -> str:
    """One line naming what the table compares: for the KD rows and the student-alone baselines, how each shown
    cell's trial was chosen from `trials` (those the table picked from). A cell's trials are counted as its
    completed and pruned ones, those the validation metric ranked (a pruned one lost on it early); a failed one
    never was."""
    ranked = trials[trials["status"].isin(("completed", "pruned"))]
    per_cell = ranked.groupby(CELL).size().reindex(best_per_cell(trials).set_index(CELL).index)
    alone = per_cell.index.get_level_values("teacher") == "none"
    kd, baselines = per_cell[~alone], per_cell[alone]
    if len(kd) and len(baselines):
        if setting == "default":
            return f"comparison: default vs default ({DEFAULT_TRIALS})"
        return (f"comparison: {_how_chosen('KD rows', kd, setting, metric)} vs "
                f"{_how_chosen('student-alone baselines', baselines, setting, metric)}")
    if len(kd):
        return f"comparison: {_how_chosen('KD rows', kd, setting, metric)} with no student-alone baselines"
    return f"comparison: {_how_chosen('student-alone baselines', baselines, setting, metric)} with no KD rows"


# The published boards (orchestrator/paper_results.csv, source in its header), the current one first: a cell on both
# is compared with the current board's number, a cell only the older board has with that one.
PAPER_BOARDS = ("leaderboard-2026", "v1-2024-07")


def load_paper() -> pd.DataFrame:
    """Every published number shipped with the project, one row per (board, row, dataset)."""
    with resources.as_file(resources.files("orchestrator") / "paper_results.csv") as path:
        return pd.read_csv(path, comment="#", keep_default_na=False, dtype={c: str for c in ["board", *ROW, "dataset"]})


def paper_per_cell(paper: pd.DataFrame) -> pd.DataFrame:
    """One published number per (row, dataset): the first board of PAPER_BOARDS that has it (column paper_board)."""
    rank = paper["board"].map({board: i for i, board in enumerate(PAPER_BOARDS)})
    if rank.isna().any():
        raise ReportError(f"paper results name unknown boards {sorted(set(paper['board'][rank.isna()]))}; known: {', '.join(PAPER_BOARDS)}")
    chosen = paper.assign(_rank=rank).sort_values("_rank", kind="stable").drop_duplicates(subset=[*ROW, "dataset"])
    return chosen.drop(columns="_rank").rename(columns={"board": "paper_board"})


def compare_with_paper(table: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    merged = table.merge(paper_per_cell(paper), on=[*ROW, "dataset"], how="left")
    merged["acc_vs_paper"] = merged["acc_mean"] - merged["paper_acc"]
    # The paper's forgetting is the official code's printed definition: compared with CDL's, never Chaudhry's.
    merged["forgetting_vs_paper"] = merged["forgetting_cdl_mean"] - merged["paper_forgetting"]
    return merged


# -- output ---------------------------------------------------------------------------------------------------
def _pm(mean: float, std: float, n: int) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 and not pd.isna(std) else f"{mean:.2f} (n={n})"


def _signed(value: float) -> str:
    return "" if pd.isna(value) else f"{value:+.2f}"


def _number(value: float, fmt: str) -> str:
    return "-" if pd.isna(value) else format(value, fmt)


def _paired(r: pd.Series) -> str:
    """The paired accuracy gain: mean [interval] n=seeds, "not established" where the interval covers 0."""
    if r.acc_paired_n == 0:  # a baseline row, no baseline, or no seed the two have in common
        return "" if pd.isna(r.acc_delta) else "no seed in common"
    if r.acc_paired_n == 1:
        return f"{r.acc_paired_gain:+.2f} (1 seed: no interval)"
    verdict = "" if r.acc_paired_established else " not established"
    return f"{r.acc_paired_gain:+.2f} [{r.acc_paired_low:+.2f}, {r.acc_paired_high:+.2f}] n={r.acc_paired_n}{verdict}"


PAIRED_LEGEND = (f"paired Δacc: mean over seeds of acc - the student alone's acc on the same seed [{CONFIDENCE:.0%} "
                 "t-interval over the per-seed paired gains] n=seeds paired; not established = the interval covers 0")


def render(table: pd.DataFrame, fmt: str, compare: bool = False, comparison: str | None = None) -> str:
    """The table as text; `comparison` (comparison_line) goes above it, except in CSV, which stays plain data."""
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.4f")
    datasets = sorted(table["dataset"].unique())
    header = ["teacher", "student", "method", "kd"]
    per_dataset = ["acc", "Δacc", "paired Δacc"] + [h for label in FORGETTINGS.values() for h in (f"forgetting ({label})", f"Δforg ({label})")]
    per_dataset += ["paper acc/forg (CDL)", "paper board", "vs paper"] if compare else []
    header += [f"{d} {h}" for d in datasets for h in per_dataset] + ["pruned", "failed"]
    lines = []
    for key, group in table.groupby(ROW, sort=False):
        by_dataset = group.set_index("dataset")
        cells = list(key)
        for d in datasets:
            if d not in by_dataset.index:
                cells += ["-"] * len(per_dataset)
                continue
            r = by_dataset.loc[d]
            cells += [_pm(r.acc_mean, r.acc_std, r.n), _signed(r.acc_delta), _paired(r)]
            for name in FORGETTINGS:
                cells += [_pm(r[f"{name}_mean"], r[f"{name}_std"], r.n), _signed(r[f"{name}_delta"])]
            if compare:
                paper = "-" if pd.isna(r.paper_acc) else f"{r.paper_acc:.2f} / {r.paper_forgetting:.2f}"
                vs = f"{_number(r.acc_vs_paper, '+.2f')} / {_number(r.forgetting_vs_paper, '+.2f')}"
                cells += [paper, "-" if pd.isna(r.paper_acc) else r.paper_board, "" if pd.isna(r.paper_acc) else vs]
        cells += [str(int(group["pruned"].sum())), str(int(group["failed"].sum()))]
        lines.append(cells)
    above = [comparison] if comparison else []
    if fmt == "markdown":
        out = [*above, ""] if above else []  # a blank line, else a markdown renderer may read the line as the header
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(out + ["| " + " | ".join(row) + " |" for row in lines]) + f"\n\n{PAIRED_LEGEND}\n"  # the blank line ends the table
    widths = [max(len(header[i]), *(len(row[i]) for row in lines)) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([*above, fmt_row(header), fmt_row(["-" * w for w in widths]), *map(fmt_row, lines), PAIRED_LEGEND]) + "\n"


# Parquet: the schemas are part of the interface (README "Comparing results").
RUNS_SCHEMA = {
    "run_id": "string", "sweep": "string", "cell": "string", "teacher": "string", "student": "string", "method": "string",
    "kd": "string", "dataset": "string", "seed": "int64", "optuna_trial": "int64", "status": "string",
    "setting": "string", "teacher_run_id": "string", "metric": "float64", **{name: "float64" for name in FINAL_METRICS}, "config": "string",
}


def export_parquet(trials: pd.DataFrame, tasks: pd.DataFrame, configs: dict[str, str], directory: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    runs = trials.assign(config=trials["run_id"].map(configs))[list(RUNS_SCHEMA)]
    arrow = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
    runs_schema = pa.schema([(name, arrow[kind]) for name, kind in RUNS_SCHEMA.items()])
    task_columns = ["run_id", "task", *TASK_METRICS] + sorted((c for c in tasks.columns if c.startswith("test_acc_task")), key=lambda c: int(c[13:]))
    tasks = tasks.reindex(columns=task_columns)
    tasks_schema = pa.schema([("run_id", pa.string()), ("task", pa.int64())] + [(c, pa.float64()) for c in task_columns[2:]])
    paths = [directory / "runs.parquet", directory / "tasks.parquet"]
    pq.write_table(pa.Table.from_pandas(runs, schema=runs_schema, preserve_index=False), paths[0])
    pq.write_table(pa.Table.from_pandas(tasks.astype({"task": "int64"}), schema=tasks_schema, preserve_index=False), paths[1])
    return paths


def fetch_configs(tracking_uri: str, run_ids: list[str]) -> dict[str, str]:
    """run id -> the run's resolved RunConfig JSON (its config.json artifact)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            try:
                path = client.download_artifacts(run_id, "config.json", tmp)
            except Exception:  # noqa: BLE001 - a run that never finished has no config artifact
                continue
            out[run_id] = Path(path).read_text()
    return out


def export_configs(best: pd.DataFrame, configs: dict[str, str], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in best.itertuples():
        if row.run_id in configs:
            path = directory / f"{row.cell}.json"
            path.write_text(json.dumps(json.loads(configs[row.run_id]), indent=1) + "\n")
            paths.append(path)
    return paths


# -- CLI ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment of the sweep (the sweep's name by default)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the working directory, as the sweep)")
    p.add_argument("--format", choices=["console", "markdown", "csv"], default="console", help="table format (default console)")
    p.add_argument("--setting", choices=SETTINGS, default="tuned",
                   help="which trial stands for each cell: tuned (the default) = its best completed trial by the sweep's "
                        "validation metric; default = its first trial, at the methods' default settings")
    p.add_argument("--compare", choices=["paper"], help="add the paper's published numbers and the difference per cell")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--parquet", metavar="DIR", help="write runs.parquet and tasks.parquet here")
    p.add_argument("--plots", metavar="DIR", help="draw the plots here (PNG) and log them to the sweep's parent run")
    p.add_argument("--configs", metavar="DIR", help="write each cell's best config here (<cell>.json; rerun with python -m cdl_core.run --config)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    from orchestrator.services import reach_mlflow

    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file written is enough
    tracking_uri = args.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"no MLflow store at {tracking_uri}; run the report where the sweep ran or pass --tracking-uri")
    reach_mlflow(tracking_uri)
    trials, info = load_trials(tracking_uri, args.experiment)
    chosen = trials_for_setting(trials, args.setting)
    table = paper_table(chosen)
    if not table["n"].any():
        kind = "trial" if args.setting == "tuned" else "default trial"
        raise ReportError(f"experiment {args.experiment!r} has no completed {kind} yet ({len(chosen)} {kind}s: "
                          f"{dict(chosen['status'].value_counts())}); nothing to tabulate")
    if args.compare:
        table = compare_with_paper(table, load_paper())
    text = render(table, args.format, compare=bool(args.compare), comparison=comparison_line(chosen, args.setting, info["metric"]))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    configs = fetch_configs(tracking_uri, list(trials["run_id"])) if (args.parquet or args.configs) else {}
    if args.parquet:
        tasks = load_task_metrics(tracking_uri, list(trials["run_id"]))
        for path in export_parquet(trials, tasks, configs, Path(args.parquet)):
            print(f"wrote {path}")
    if args.configs:
        paths = export_configs(best_per_cell(chosen), configs, Path(args.configs))
        which = "best" if args.setting == "tuned" else "default"
        print(f"wrote {len(paths)} {which} configs to {args.configs} (rerun one: python -m cdl_core.run --config FILE)")
    if args.plots:
        from orchestrator.report_plots import draw_plots

        best = best_per_cell(chosen)
        teacher_ids = sorted({t for t in best["teacher_run_id"].dropna() if t})
        teacher_tasks = load_task_metrics(tracking_uri, teacher_ids) if teacher_ids else pd.DataFrame(columns=["run_id", "task"])
        for path in draw_plots(tracking_uri, best, load_task_metrics(tracking_uri, list(best["run_id"])), teacher_tasks,
                               table, info, Path(args.plots)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
