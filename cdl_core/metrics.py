"""Continual-learning metrics from the accuracy matrix.

R[t][j] is the accuracy (%) on task j's held-out images after training task t, predicting among all classes
seen so far; entries with j > t are undefined (NaN).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(matrix: Matrix) -> int:
    tasks = len(matrix)
    if tasks == 0 or any(len(row) < t + 1 for t, row in enumerate(matrix)):
        raise ValueError("accuracy matrix must be square-ish: row t needs entries for tasks 0..t")
    return tasks


def final_average_accuracy(matrix: Matrix) -> float:
    """A_T = mean_j R[T][j] over the tasks learned so far."""
    tasks = _check(matrix)
    return sum(matrix[-1][:tasks]) / tasks


def average_incremental_accuracy(matrix: Matrix) -> float:
    """Mean over t of A_t, the average accuracy after each task."""
    tasks = _check(matrix)
    return sum(final_average_accuracy(matrix[: t + 1]) for t in range(tasks)) / tasks


def forgetting(matrix: Matrix) -> float:
    """F_T = 1/(T-1) sum_{j<T} (max_{l<T} R[l][j] - R[T][j]); 0 after the first task."""
    tasks = _check(matrix)
    if tasks == 1:
        return 0.0
    last = tasks - 1
    drops = [max(matrix[l][j] for l in range(j, last)) - matrix[last][j] for j in range(last)]
    return sum(drops) / last


def per_task_accuracies(matrix: Matrix) -> list[float]:
    """Accuracy on each task after the last task learned."""
    tasks = _check(matrix)
    return [float(a) for a in matrix[-1][:tasks]]


def summarize(matrix: Matrix) -> dict[str, float]:
    return {
        "final_avg_acc": final_average_accuracy(matrix),
        "avg_incremental_acc": average_incremental_accuracy(matrix),
        "forgetting": forgetting(matrix),
    }


def empty_matrix(n_tasks: int) -> list[list[float]]:
    return [[math.nan] * n_tasks for _ in range(n_tasks)]
