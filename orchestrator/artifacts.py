"""A trial's accuracy artifacts: the matrix as CSV and heatmap, and the average accuracy after each task as a
curve. Drawn in the trial's own process and saved with its task checkpoint (the sweep driver only copies them
into MLflow), so a sweep's plotting is spread over its trials instead of queueing on the driver."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARTIFACT_FILES = ("accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_curve.png")


def save_matrix_artifacts(matrix: list[list[float]], directory: Path, title: str) -> list[Path]:
    """The accuracy matrix as CSV and heatmap, and the average accuracy after each task as a curve."""
    n = len(matrix)
    csv = directory / "accuracy_matrix.csv"
    csv.write_text("after_task," + ",".join(f"task{j + 1}" for j in range(n)) + "\n" + "\n".join(
        f"{t + 1}," + ",".join(f"{row[j]:.2f}" if j < len(row) else "" for j in range(n)) for t, row in enumerate(matrix)
    ) + "\n")
    grid = [[row[j] if j < len(row) else float("nan") for j in range(n)] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.5 * n))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    ax.set_xlabel("evaluated task"), ax.set_ylabel("after training task"), ax.set_title(title, fontsize=8)
    ax.set_xticks(range(n), [str(j + 1) for j in range(n)]), ax.set_yticks(range(n), [str(t + 1) for t in range(n)])
    for t, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, t, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    heatmap = directory / "accuracy_matrix.png"
    fig.savefig(heatmap, dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(1, n + 1), [sum(row) / len(row) for row in matrix], marker="o")
    ax.set_xlabel("tasks learned"), ax.set_ylabel("average accuracy (%)"), ax.set_ylim(0, 100), ax.set_title(title, fontsize=8)
    curve = directory / "accuracy_curve.png"
    fig.savefig(curve, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [csv, heatmap, curve]
