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


def forgetting_cdl(matrix: Matrix) -> float:
    """As the official CDL trainer prints it: F_T = 1/T sum_{j<=T} (R[j][j] - R[T][j]).

    Every learned task counts, the last one too (its term is 0), so the sum is divided by T; the drop is from
    the accuracy right after learning task j, not from its best."""
    tasks = _check(matrix)
    last = tasks - 1
    return sum(matrix[j][j] - matrix[last][j] for j in range(tasks)) / tasks


def forgetting_chaudhry(matrix: Matrix) -> float:
    """Chaudhry et al. (2018): F_T = 1/(T-1) sum_{j<T} (max_{j<=l<T} R[l][j] - R[T][j]); 0 after the first task.

    On a matrix where each task's accuracy only falls, this is forgetting_cdl times T/(T-1)."""
    tasks = _check(matrix)
    if tasks == 1:
        return 0.0
    last = tasks - 1
    drops = [max(matrix[l][j] for l in range(j, last)) - matrix[last][j] for j in range(last)]
    return sum(drops) / last


FORGETTING = {"cdl": forgetting_cdl, "chaudhry": forgetting_chaudhry}  # RunConfig.forgetting -> its definition


def per_task_accuracies(matrix: Matrix) -> list[float]:
    """Accuracy on each task after the last task learned."""
    tasks = _check(matrix)
    return [float(a) for a in matrix[-1][:tasks]]


def summarize(matrix: Matrix, shown: str = "cdl") -> dict[str, float]:
    """The run's summary; `forgetting` is the definition `shown` names (RunConfig.forgetting), and both are
    also given under their own names."""
    named = {f"forgetting_{name}": compute(matrix) for name, compute in FORGETTING.items()}
    return {
        "final_avg_acc": final_average_accuracy(matrix),
        "avg_incremental_acc": average_incremental_accuracy(matrix),
        "forgetting": named[f"forgetting_{shown}"],
        **named,
    }


def empty_matrix(n_tasks: int) -> list[list[float]]:
    return [[math.nan] * n_tasks for _ in range(n_tasks)]
