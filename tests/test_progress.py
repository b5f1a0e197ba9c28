"""The sweep's progress view (orchestrator/progress.py) on fake Tune trials: plain lines off a terminal, rich's
Live view on one, with the same content; the time-left estimate checked against a computation by hand."""
from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from orchestrator.progress import Row, SweepProgress, row_of, time_left

METRIC = "val_avg_acc"
A = "vit_base_patch16_224-vit_small_patch16_224.coda.cdl_prompt.imagenet_r.s0"  # longer than a terminal column
B = "none-vit_small_patch16_224.coda.none.imagenet_r.s0"
START, NOW = 1000.0, 1000.0 + 3725  # 1 h 2 min 5 s in


def trial(trial_id, status, cell, task=None, val=None, test=None, seconds=None, n_tasks=10, **result):
    if task is not None:
        result |= {"task": task, "n_tasks": n_tasks, METRIC: val, "test_avg_acc": test, "task_seconds": seconds}
    staged = f"/tmp/ray/session_x/artifacts/driver_artifacts/{trial_id}/error.txt"  # Tune's copy on the driver
    return SimpleNamespace(trial_id=trial_id, status=status, config={"cell": cell}, last_result=result,
                           path=f"/sweep/{trial_id}", error_file=staged if status == "ERROR" else None)


TRIALS = [
    trial("t1", "RUNNING", A, task=3, val=61.5, test=58.25, seconds=10),
    trial("t8", "RUNNING", B, task=1, val=20.0, test=19.0, seconds=20),
    trial("t2", "PENDING", B),
    trial("t3", "TERMINATED", A, task=10, val=70.0, test=66.0, seconds=20),
    trial("t4", "TERMINATED", A, task=10, val=72.5, test=65.0, seconds=30),  # best of A
    trial("t5", "TERMINATED", B, task=4, val=80.0, test=78.0, seconds=20),  # pruned: not a best, however high
    trial("t6", "ERROR", B, task=2, val=25.0, test=24.0, seconds=20),
    trial("t7", "TERMINATED", B, config_error="pool_size=5 < 10 tasks"),
]
TOTAL = 10  # two more planned that Tune has not created yet


def expected_left() -> str:
    """By hand: tasks left of the running (7 and 9), the pending one and the two unseen (10 each, the task count
    of those that reported), two trials at once (the most seen running), at the mean measured task time."""
    tasks_left = (10 - 3) + (10 - 1) + 10 + 2 * 10
    seconds = tasks_left / 2 * ((10 + 20 + 20 + 30 + 20 + 20) / 6)
    assert seconds == 460
    return "0:07:40"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def reporter(interactive: bool, console: Console) -> tuple[SweepProgress, Clock]:
    clock = Clock()
    progress = SweepProgress(METRIC, [A, B], interactive=interactive, every=30, console=console, clock=clock)
    progress.setup(total_samples=TOTAL)
    clock.now = NOW
    return progress, clock


def assert_full_content(text: str) -> None:
    assert A in text and B in text
    assert "3/10" in text and "1/10" in text and "61.50" in text and "58.25" in text
    for state in ("running", "pending", "completed", "pruned", "failed"):
        assert state in text
    assert "2 running, 3 pending, 2 completed, 1 pruned, 2 failed" in text
    assert "1:02:05 elapsed" in text and f"about {expected_left()} left" in text
    assert "pool_size=5 < 10 tasks" in text and "/sweep/t6/error.txt" in text


def test_plain_view_lists_every_trial_with_its_full_cell_counts_best_per_cell_and_time_left_without_ansi():
    out = io.StringIO()
    progress, _ = reporter(False, Console(file=out))
    progress.report(TRIALS, False)
    text = out.getvalue()
    assert "\x1b" not in text
    assert_full_content(text)
    best = [line.split() for line in text.splitlines() if line.strip().startswith("best ")]
    assert best == [["best", f"{A}:", "t4", METRIC, "72.50", "test_avg_acc", "65.00"]]  # B has nothing completed


def test_plain_view_prints_at_most_every_interval_and_repeats_only_what_changed():
    out = io.StringIO()
    progress, clock = reporter(False, Console(file=out))
    assert progress.should_report(TRIALS)
    progress.report(TRIALS, False)
    clock.now += 29
    assert not progress.should_report(TRIALS)
    assert progress.should_report(TRIALS, done=True)
    clock.now += 1
    assert progress.should_report(TRIALS)
    out.seek(0)
    out.truncate()
    moved = [trial("t1", "RUNNING", A, task=4, val=62.0, test=59.0, seconds=10)] + TRIALS[1:]
    progress.report(moved, False)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[sweep] ") and len(lines) == 2 and "t1" in lines[1] and "4/10" in lines[1]


def test_interactive_view_renders_through_rich_live_with_the_same_content():
    console = Console(file=io.StringIO(), force_terminal=True, width=200, record=True)
    progress, _ = reporter(True, console)
    progress.report(TRIALS, True)
    assert progress.live is None  # the last report stopped the live view
    text = console.export_text()
    assert_full_content(text)
    best_a = next(line for line in text.splitlines() if A in line)
    assert [c.strip() for c in best_a.split("│")[1:-1]] == ["1", A, "3", "t4", "72.50", "65.00"]  # number, cell, trials, best


def test_a_narrow_terminal_wraps_long_cell_names_instead_of_cutting_them():
    console = Console(file=io.StringIO(), force_terminal=True, width=80, record=True)
    progress, _ = reporter(True, console)
    console.print(progress.view([row_of(t, METRIC) for t in TRIALS]))
    text = console.export_text()
    assert "…" not in text
    cells_table = text.split("\ntrials")[0]  # the cells table comes first, then the trials table
    cell_column = "".join(line.split("│")[2].strip() for line in cells_table.splitlines() if line.count("│") == 7)
    assert A in cell_column and B in cell_column


def test_no_trial_ends_sooner_than_its_own_remaining_tasks():
    def row(task, n_tasks=10):
        return Row("t", "c", "running", task, n_tasks, None, None, None)

    assert time_left([row(1), row(9)], unseen=0, task_seconds=5.0, slots=2) == 9 * 5.0  # not (9 + 1) / 2
    assert time_left([row(1), row(1)], unseen=0, task_seconds=5.0, slots=4) == 9 * 5.0  # 2 trials use 2 slots
    assert time_left([row(1)], unseen=0, task_seconds=None, slots=1) is None  # nothing measured yet


def test_the_reporter_pickles_as_tune_stores_it_with_the_run_config():
    import pickle

    progress, _ = reporter(True, Console(file=io.StringIO(), force_terminal=True))
    progress.report(TRIALS, False)  # a live view is open
    copy = pickle.loads(pickle.dumps(progress))
    progress.close()
    assert copy.live is None and copy.metric == METRIC and copy.cells == [A, B] and copy.total == TOTAL
