"""Live sweep progress as a Ray Tune ProgressReporter, drawn with rich.

Each trial's cell, task k/n, validation metric, test accuracy and state; trials by state; the best completed
trial per cell; elapsed time and an estimate of the time left. On a terminal one rich Live view is redrawn in
place; anywhere else (CI, `ray job submit` logs, a pipe) plain lines without ANSI codes, at most every `every`
seconds and at the end, listing only the trials and cells that changed since the last print, so a long sweep's
log grows with what happens, not with its size.
"""
from __future__ import annotations

import atexit
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ray.tune.progress_reporter import ProgressReporter
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.errors import CONFIG_ERROR
from orchestrator.tracking import trial_status

STATES = ("running", "pending", "completed", "pruned", "failed")
TEST = "test_avg_acc"
LIVE_EVERY = 1.0  # seconds between redraws of the live view (each costs the driver a render)
MAX_ROWS = 15  # trials shown in the live view; the counts line covers the rest


@dataclass(frozen=True)
class Row:
    trial_id: str
    cell: str
    state: str
    task: int | None
    n_tasks: int | None
    val: float | None
    test: float | None
    why: str | None  # a failed trial: its config error, or the file where Tune keeps its traceback


def state_of(trial: Any) -> str:
    result = trial.last_result or {}
    if CONFIG_ERROR in result:  # reported by the trial itself: a user error, not retried
        return "failed"
    if trial.status == "RUNNING":
        return "running"
    if trial.status in ("PENDING", "PAUSED"):  # paused: waits for a slot again
        return "pending"
    if trial.status == "ERROR":
        return "failed"
    return trial_status(result)  # TERMINATED: it learned every task, or our pruner stopped it


def row_of(trial: Any, metric: str) -> Row:
    result, state = trial.last_result or {}, state_of(trial)
    why = None
    if state == "failed":
        traceback = error_file(trial) or "the sweep log"
        why = f"config error: {result[CONFIG_ERROR]}" if CONFIG_ERROR in result else f"traceback in {traceback}"
    return Row(str(trial.trial_id), trial.config.get("cell", "?"), state, result.get("task"), result.get("n_tasks"),
               result.get(metric), result.get(TEST), why)


def error_file(trial: Any) -> str | None:
    """Tune's error.txt of a failed trial in the sweep's storage (its `error_file` is a driver-side staging copy
    under /tmp/ray that goes when Ray stops)."""
    staged = getattr(trial, "error_file", None)
    return f"{trial.path.rstrip('/')}/{staged.rsplit('/', 1)[-1]}" if staged and getattr(trial, "path", None) else staged


def time_left(rows: Sequence[Row], unseen: int, task_seconds: float | None, slots: int) -> float | None:
    """Seconds until the sweep ends, assuming every unfinished trial runs all its remaining tasks (pruning only
    shortens that), the task in progress counts whole, a task takes the mean measured task time, trials not yet
    reporting (and the `unseen` ones Tune has not created) have the mean task count of those that did, and the
    sweep keeps as many trials running at once as it has at most so far, or fewer when fewer are left. No trial
    ends sooner than its own remaining tasks allow."""
    counts = [r.n_tasks for r in rows if r.n_tasks]
    if task_seconds is None or not counts:
        return None
    typical = sum(counts) / len(counts)
    open_rows = [r for r in rows if r.state in ("running", "pending")]
    remaining = [(r.n_tasks - (r.task or 0)) if r.n_tasks else typical for r in open_rows] + [typical] * unseen
    if not remaining:
        return 0.0
    width = max(1, min(slots, len(remaining)))
    return max(sum(remaining) / width, max(remaining)) * task_seconds


def clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def task_text(row: Row) -> str:
    return "-" if row.task is None else f"{row.task}/{row.n_tasks}"


class SweepProgress(ProgressReporter):
    """Tune's progress reporter for our sweeps. `cells`: the plan's cell keys, numbered in this order in the live
    view; `total_trials`: the planned trials (Tune's setup() passes it too); `interactive`: rich Live (default:
    stdout is a terminal); `every`: seconds between plain prints; `console` and `clock` for tests."""

    def __init__(self, metric: str, cells: Iterable[str] = (), total_trials: int = 0, *, interactive: bool | None = None,
                 every: float = 30.0, console: Console | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.metric, self.cells, self.total = metric, list(cells), total_trials
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.every = LIVE_EVERY if self.interactive else every
        self.console = console or Console()
        self.clock = clock
        self.start = clock()
        self.last_print: float | None = None
        self.task_times: dict[tuple[str, int], float] = {}  # (trial, task) -> seconds, as reported
        self.peak_running = 0
        self.printed: dict[str, tuple[Any, ...]] = {}  # plain mode: what was last printed per trial / cell
        self.live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the run config, reporter included; consoles do not pickle
        return self.__dict__ | {"console": None, "live": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.console = Console()

    def setup(self, start_time: float | None = None, total_samples: int | None = None, **kwargs: Any) -> None:
        self.start = self.clock()
        self.total = total_samples or self.total

    def should_report(self, trials: list, done: bool = False) -> bool:
        return done or self.last_print is None or self.clock() - self.last_print >= self.every

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        self.last_print = self.clock()
        rows = [row_of(t, self.metric) for t in trials]
        self.observe(trials, rows)
        if self.interactive:
            if self.live is None:
                # Prints from elsewhere (Ray's forwarded worker lines, warnings) scroll above the view.
                self.live = Live(console=self.console, auto_refresh=False, redirect_stdout=True, redirect_stderr=True)
                self.live.start()
                atexit.register(self.close)  # a sweep that stops on an exception gets the cursor back too
            self.live.update(self.view(rows, sys_info[1:2]), refresh=True)
            if done:
                self.close()
        else:
            print(self.plain(rows, done), file=self.console.file, flush=True)

    def close(self) -> None:
        """Stop the live view (Tune's last report does; call it too where the sweep may stop early)."""
        if self.live is not None:
            self.live.stop()
            self.live = None

    def observe(self, trials: list, rows: list[Row]) -> None:
        for trial, row in zip(trials, rows):
            seconds = (trial.last_result or {}).get("task_seconds")
            if seconds is not None and row.task is not None:
                self.task_times[(row.trial_id, row.task)] = float(seconds)
        self.peak_running = max(self.peak_running, sum(r.state == "running" for r in rows))

    def status(self, rows: list[Row]) -> tuple[str, dict[str, Row]]:
        """The head line (elapsed, time left, trials by state) and the best completed trial per cell."""
        states = Counter(r.state for r in rows)
        unseen = max(0, self.total - len(rows))
        states["pending"] += unseen
        mean = sum(self.task_times.values()) / len(self.task_times) if self.task_times else None
        left = time_left(rows, unseen, mean, self.peak_running)
        head = (f"{clock_text(self.clock() - self.start)} elapsed, about {clock_text(left)} left; trials: "
                + ", ".join(f"{states[s]} {s}" for s in STATES))
        best: dict[str, Row] = {}
        for r in rows:
            if r.state == "completed" and r.val is not None and (r.cell not in best or r.val > best[r.cell].val):
                best[r.cell] = r
        return head, best

    def number(self, cell: str) -> int:
        if cell not in self.cells:
            self.cells.append(cell)
        return self.cells.index(cell) + 1

    def plain(self, rows: list[Row], done: bool) -> str:
        head, best = self.status(rows)
        lines = [f"[sweep] {head}"]
        for r in rows:
            seen = (r.state, r.task)
            if self.printed.get(r.trial_id) != seen:
                self.printed[r.trial_id] = seen
                lines.append(f"  {r.trial_id}  {r.state:<9} task {task_text(r):<7} {self.metric} {acc(r.val):>6}  "
                             f"{TEST} {acc(r.test):>6}  {r.cell}" + (f"  ({r.why})" if r.why else ""))
        for cell, r in sorted(best.items()):
            if done or self.printed.get(f"best:{cell}") != (r.trial_id,):
                self.printed[f"best:{cell}"] = (r.trial_id,)
                lines.append(f"  best {cell}: {r.trial_id} {self.metric} {acc(r.val)} {TEST} {acc(r.test)}")
        return "\n".join(lines)

    def view(self, rows: list[Row], extra: Sequence[str] = ()) -> RenderableType:
        head, best = self.status(rows)
        for r in rows:
            self.number(r.cell)
        cells = Table(title="cells (best completed trial)", title_justify="left")
        for name in ("#", "cell", "trials", "best trial", self.metric, TEST):
            cells.add_column(name, overflow="fold")  # fold: a long cell name wraps, never cut
        for i, cell in enumerate(self.cells, 1):
            b = best.get(cell)
            cells.add_row(str(i), cell, str(sum(r.cell == cell for r in rows)), b.trial_id if b else "-",
                          acc(b.val if b else None), acc(b.test if b else None))
        order = sorted(rows, key=lambda r: ("running", "failed", "pending", "completed", "pruned").index(r.state))
        trials = Table(title="trials", title_justify="left")
        for name in ("trial", "cell #", "state", "task", self.metric, TEST):
            trials.add_column(name)
        for r in order[:MAX_ROWS]:
            trials.add_row(r.trial_id, str(self.number(r.cell)), r.state, task_text(r), acc(r.val), acc(r.test))
        if len(order) > MAX_ROWS:
            trials.add_row(f"... {len(order) - MAX_ROWS} more", "", "", "", "", "")
        failures = [Text(f"failed {r.trial_id} ({r.cell}): {r.why}", style="red") for r in rows if r.why][:5]
        return Group(Text(head, style="bold"), *(Text(s, style="dim") for s in extra if s), cells, trials, *failures)
