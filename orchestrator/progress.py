"""Live sweep progress through Ray Tune's own CLIReporter: the trial table, plus trials by state (pruned
counted apart from completed) and the best validation accuracy so far per cell."""
from __future__ import annotations

from collections import Counter

from ray.tune import CLIReporter

from orchestrator.tracking import trial_status


class SweepProgress(CLIReporter):
    def __init__(self, metric: str) -> None:
        super().__init__(
            metric_columns={"task": "task", metric: "val acc", "test_avg_acc": "test acc", "test_forgetting": "forgetting"},
            parameter_columns={"cell": "cell"},
            max_report_frequency=30,
            sort_by_metric=False,
        )
        self.metric = metric

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        super().report(trials, done, *sys_info)
        print(progress_lines(trials, self.metric), flush=True)


def progress_lines(trials: list, metric: str) -> str:
    states: Counter[str] = Counter()
    best: dict[str, float] = {}
    for trial in trials:
        if trial.status in ("RUNNING", "PENDING", "PAUSED"):
            states[trial.status.lower()] += 1
            continue
        status = "failed" if trial.status == "ERROR" else trial_status(trial.last_result)
        states[status] += 1
        if status == "completed":  # a finished trial's final value; running ones are still dropping
            cell = trial.config.get("cell", "?")
            best[cell] = max(best.get(cell, float("-inf")), trial.last_result[metric])
    order = ("running", "pending", "paused", "completed", "pruned", "failed")
    lines = ["trials: " + ", ".join(f"{states[s]} {s}" for s in order if states[s] or s in ("running", "pending"))]
    lines += [f"  best {metric} so far  {cell:<56} {value:6.2f}" for cell, value in sorted(best.items())]
    return "\n".join(lines)
