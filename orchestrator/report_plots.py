"""The report's plots: accuracy after each task per cell (student alone vs with KD vs teacher), the accuracy
matrix of each cell's best run, and the KD gain per cell; saved as PNG and logged to the sweep's parent run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.artifacts import save_matrix_artifacts  # noqa: E402


def accuracy_matrix(tasks: pd.DataFrame) -> list[list[float]]:
    """R[t][j] of one run from its per-task metrics test_acc_task<j+1> at step t+1."""
    matrix = []
    for row in tasks.sort_values("task").itertuples(index=False):
        values = row._asdict()
        matrix.append([values[f"test_acc_task{j}"] for j in range(1, row.task + 1)])
    return matrix


def draw_plots(tracking_uri: str, best: pd.DataFrame, tasks: pd.DataFrame, teacher_tasks: pd.DataFrame, table: pd.DataFrame,
               info: dict[str, Any], directory: Path) -> list[Path]:
    """The report's figures from the best trial per cell (`best`), their per-task metrics and their teachers'."""
    from mlflow.tracking import MlflowClient

    directory.mkdir(parents=True, exist_ok=True)
    paths = []

    # accuracy after each task: one figure per (student, method, dataset), a line per row, seeds averaged
    curves = best.merge(tasks[["run_id", "task", "test_avg_acc"]].rename(columns={"test_avg_acc": "acc_after_task"}), on="run_id")
    for (student, method, dataset), group in curves.groupby(["student", "method", "dataset"]):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (teacher, kd), line in group.groupby(["teacher", "kd"]):
            mean = line.groupby("task")["acc_after_task"].mean()
            label = f"{student} alone" if teacher == "none" else f"{teacher} -> {student} + {kd}"
            ax.plot(mean.index, mean.values, marker="o", label=label)
        teachers = best[(best.student == student) & (best.method == method) & (best.dataset == dataset)]["teacher_run_id"].dropna()
        for teacher_run in sorted(set(teachers)):
            own = teacher_tasks[teacher_tasks["run_id"] == teacher_run]
            if not own.empty:
                ax.plot(own["task"], own["test_avg_acc"], linestyle="--", marker="s", label=f"teacher [{teacher_run[:6]}]")
        ax.set_xlabel("tasks learned"), ax.set_ylabel("test average accuracy (%)"), ax.set_ylim(0, 100)
        ax.set_xticks(sorted(group["task"].unique()))
        ax.set_title(f"{method} on {dataset}", fontsize=9)
        ax.legend(fontsize=6)
        path = directory / f"curves_{student}_{method}_{dataset}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    # the accuracy matrix of each cell's best run
    for row in best.itertuples():
        own = tasks[tasks["run_id"] == row.run_id]
        if not own.empty:
            cell_dir = directory / "matrices" / row.cell
            cell_dir.mkdir(parents=True, exist_ok=True)
            paths += [p for p in save_matrix_artifacts(accuracy_matrix(own), cell_dir, row.cell) if p.suffix == ".png"]

    # KD gain per cell: accuracy change against the no-teacher baseline
    gains = table[table["teacher"] != "none"].dropna(subset=["acc_delta"])
    if not gains.empty:
        labels = [f"{r.teacher}->{r.student} {r.method} {r.kd} ({r.dataset})" for r in gains.itertuples()]
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(labels) + 1))
        ax.barh(labels, gains["acc_delta"], xerr=gains["acc_std"].fillna(0), color=["tab:green" if v >= 0 else "tab:red" for v in gains["acc_delta"]])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("final avg acc change vs student alone (points)")
        ax.tick_params(axis="y", labelsize=7)
        path = directory / "kd_gain.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    client = MlflowClient(tracking_uri)
    for parent in info["parent_run_ids"]:
        client.log_artifacts(parent, str(directory), artifact_path="report")
    return paths
