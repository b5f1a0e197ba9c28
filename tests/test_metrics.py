"""Continual-learning metrics (cdl_core.metrics) against matrices worked out by hand (DESIGN.md section 2).

R[t][j] = accuracy on task j after training task t; entries j > t are undefined (NaN).
"""
from __future__ import annotations

import math

import pytest

from cdl_core import metrics

NAN = math.nan

# Task 0's accuracy peaks after task 1 (95 > 90), so Chaudhry's max is not the diagonal and the two
# forgetting definitions differ by more than their factor T/(T-1).
R = [
    [90.0, NAN, NAN],
    [95.0, 70.0, NAN],
    [60.0, 50.0, 40.0],
]
# final:      (60 + 50 + 40) / 3                        = 50
# A_t:        A_0 = 90, A_1 = (95 + 70) / 2 = 82.5, A_2 = 50 -> mean = 222.5 / 3
# CDL:        j=0: R00 - R20 = 90 - 60 = 30; j=1: R11 - R21 = 70 - 50 = 20; j=2: 40 - 40 = 0 -> 50 / 3
# Chaudhry:   j=0: max(90, 95) - 60 = 35; j=1: 70 - 50 = 20               -> (35 + 20) / 2 = 27.5
#             (not 50/3 * 3/2 = 25: the max over l picked 95, not the diagonal's 90)


def test_final_average_accuracy_is_the_mean_of_the_last_row():
    assert metrics.final_average_accuracy(R) == pytest.approx(50.0)


def test_average_incremental_accuracy_is_the_mean_over_tasks_of_the_running_average():
    assert metrics.average_incremental_accuracy(R) == pytest.approx(222.5 / 3)


def test_cdl_forgetting_is_the_drop_from_the_diagonal_averaged_over_all_tasks():
    assert metrics.forgetting_cdl(R) == pytest.approx(50.0 / 3)


def test_chaudhry_forgetting_uses_the_best_earlier_accuracy_of_each_old_task():
    assert metrics.forgetting_chaudhry(R) == pytest.approx(27.5)
    assert metrics.forgetting_chaudhry(R) != pytest.approx(metrics.forgetting_cdl(R) * 3 / 2)


def test_on_a_monotone_matrix_chaudhry_is_cdl_times_t_over_t_minus_1():
    falling = [
        [80.0, NAN, NAN, NAN],
        [70.0, 90.0, NAN, NAN],
        [65.0, 75.0, 85.0, NAN],
        [60.0, 72.0, 80.0, 95.0],
    ]
    # CDL:      j=0: 80 - 60 = 20; j=1: 90 - 72 = 18; j=2: 85 - 80 = 5; j=3: 95 - 95 = 0 -> 43 / 4
    # Chaudhry: the same drops (each max is the diagonal), over the 3 old tasks             -> 43 / 3
    assert metrics.forgetting_cdl(falling) == pytest.approx(43.0 / 4)
    assert metrics.forgetting_chaudhry(falling) == pytest.approx(43.0 / 3)
    assert metrics.forgetting_chaudhry(falling) == pytest.approx(metrics.forgetting_cdl(falling) * 4 / 3)


def test_forgetting_is_negative_when_old_tasks_improve():
    improving = [[50.0, NAN, NAN], [60.0, 70.0, NAN], [80.0, 65.0, 90.0]]
    # CDL:      j=0: 50 - 80 = -30; j=1: 70 - 65 = 5; j=2: 0 -> -25 / 3 (neither formula has a clamp)
    # Chaudhry: j=0: max(50, 60) - 80 = -20; j=1: 70 - 65 = 5 -> -7.5
    assert metrics.forgetting_cdl(improving) == pytest.approx(-25.0 / 3)
    assert metrics.forgetting_chaudhry(improving) == pytest.approx(-7.5)
    assert metrics.final_average_accuracy(improving) == pytest.approx((80 + 65 + 90) / 3)


def test_one_task_has_zero_forgetting_and_its_accuracy_as_both_averages():
    one = [[73.0]]
    assert metrics.forgetting_cdl(one) == 0.0  # its one term is R00 - R00
    assert metrics.forgetting_chaudhry(one) == 0.0  # no old task
    assert metrics.final_average_accuracy(one) == pytest.approx(73.0)
    assert metrics.average_incremental_accuracy(one) == pytest.approx(73.0)


def test_summarize_shows_the_chosen_forgetting_and_both_by_name():
    both = {"forgetting_cdl": 50.0 / 3, "forgetting_chaudhry": 27.5}
    averages = {"final_avg_acc": 50.0, "avg_incremental_acc": 222.5 / 3}
    assert metrics.summarize(R) == pytest.approx(averages | {"forgetting": 50.0 / 3} | both)  # the official default
    assert metrics.summarize(R, shown="chaudhry") == pytest.approx(averages | {"forgetting": 27.5} | both)
    assert metrics.per_task_accuracies(R) == [60.0, 50.0, 40.0]


def test_metrics_of_a_partly_filled_matrix_use_only_the_finished_rows():
    partial = metrics.empty_matrix(3)[:2]
    partial[0][0], partial[1][0], partial[1][1] = 90.0, 80.0, 60.0
    assert metrics.final_average_accuracy(partial) == pytest.approx(70.0)
    assert metrics.average_incremental_accuracy(partial) == pytest.approx((90.0 + 70.0) / 2)
    assert metrics.forgetting_cdl(partial) == pytest.approx((10.0 + 0.0) / 2)  # 90 - 80, 60 - 60
    assert metrics.forgetting_chaudhry(partial) == pytest.approx(10.0)


def test_empty_matrix_is_all_nan_and_a_row_missing_entries_is_rejected():
    empty = metrics.empty_matrix(3)
    assert len(empty) == 3 and all(len(row) == 3 and all(math.isnan(v) for v in row) for row in empty)
    with pytest.raises(ValueError):
        metrics.final_average_accuracy([[90.0], [80.0]])  # row 1 lacks task 1
    for forgetting in (metrics.forgetting_cdl, metrics.forgetting_chaudhry):
        with pytest.raises(ValueError):
            forgetting([])
