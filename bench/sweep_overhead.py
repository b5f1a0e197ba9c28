"""What our sweep machinery costs on top of Ray Tune: the same near-no-op trials run through `run_sweep` and
through a bare Tune loop, in one process, side by side; the driver's memory as our sweep grows (its peak by the
200th trial started and at the end, and the growth per trial between); and the planning time and peak memory of
a --dry-run of a 1,000-trial space.

Our side is everything but the training: per-cell Optuna studies in sqlite with the pruning scheduler, MLflow
tracking (sqlite store) through its outbox, drained before run_sweep returns, the teacher lease actor, the
progress reporter and the checkpoint pruner (a finished trial keeps only its latest). The bare side is
`tune.Tuner` with the same trainable and resources and nothing else. Each trial reports the metric keys of
`orchestrator.trainable.task_metrics` with a tiny checkpoint, `--reports` times (one per task of a synthetic
stream, so 1, 2, 5 or 10). Target: ours / bare <= 1.2x.

    python bench/sweep_overhead.py                          # 200 trials x 10 reports each way, then the dry run
    python bench/sweep_overhead.py --trials 1000            # thousands: the ratio and the driver's memory growth
    python bench/sweep_overhead.py --trials 40 --reports 5  # a quicker look
    python bench/sweep_overhead.py --skip-dry-run           # only the two sweeps
    python bench/sweep_overhead.py --skip-sweeps            # only the 1,000-trial dry run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SWEEP = "overhead"
MAX_CELLS = 10


def fake_metrics(task: int, n_tasks: int) -> dict[str, Any]:
    """The keys `task_metrics` reports for a student-only trial, with values that depend on the task alone: every
    trial ties with the median, so the median pruner runs but prunes nothing and both sides run every report."""
    row = [80.0] * task
    out: dict[str, Any] = {"task": task, "n_tasks": n_tasks}
    for split in ("val", "test"):
        out |= {f"{split}_avg_acc": 80.0, f"{split}_forgetting": 0.0, f"{split}_forgetting_cdl": 0.0,
                f"{split}_forgetting_chaudhry": 0.0, f"{split}_avg_incremental_acc": 80.0,
                f"{split}_acc_area": 80.0 * task}
    out |= {f"test_acc_task{j + 1}": acc for j, acc in enumerate(row)}
    out["test_matrix"] = json.dumps([[80.0] * (t + 1) for t in range(task)])
    out["task_seconds"] = 0.0
    return out


def noop_trial(config: dict[str, Any], teachers: Any = None, log_file: str | None = None) -> None:
    """A trial without training: reports each task like `train_cdl`, each with a tiny checkpoint."""
    import ray
    from ray import tune

    n_tasks = config["run"]["data"]["n_tasks"]
    node_id = ray.get_runtime_context().get_node_id()
    for task in range(1, n_tasks + 1):
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "run_state.pt").write_bytes(bytes(1024))
            tune.report(fake_metrics(task, n_tasks) | {"node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(directory))


def write_space(directory: Path, trials: int, reports: int) -> Path:
    """A space of up to MAX_CELLS cells (seeds) whose cells x trials_per_cell is `trials`; tune() suggests two
    values per trial, so each trial really asks its cell's Optuna study."""
    cells = max(n for n in range(1, MAX_CELLS + 1) if trials % n == 0)
    base = {"student.weights": "random", "teacher.weights": "random", "data.name": "synthetic", "data.n_tasks": reports,
            "train.device": "cpu", "data.val_fraction": 0.1}
    path = directory / f"overhead_{trials}.py"
    path.write_text(
        "from orchestrator.space import SweepSpace\n\n\n"
        "def tune(trial, cell):\n"
        "    return {'distill.alpha': trial.suggest_float('alpha', 0.1, 0.9), 'train.lr': trial.suggest_float('lr', 1e-4, 1e-2, log=True)}\n\n\n"
        f"SPACE = SweepSpace(name='overhead', description='orchestrator overhead bench', pairs=[('demo-t', 'demo-s')],\n"
        f"                   methods=['coda'], kd_methods=['kd'], datasets=['synthetic'], seeds={list(range(cells))!r},\n"
        f"                   tune=tune, trials_per_cell={trials // cells}, base={base!r}, cpus_per_trial=1,\n"
        "                   pruner='median', pruner_args={'n_startup_trials': 1, 'n_warmup_steps': 1})\n"
    )
    return path


@dataclass
class Side:
    seconds: float
    driver_cpu: float  # CPU-seconds of this process (Tune's driver, and our tracking thread)
    trials: int  # trials that ran to their last report
    reports: int  # reports that arrived where this side records them (MLflow for ours, Tune's results for bare)
    optuna_trials: int = 0  # ours: Optuna trials COMPLETE with every report as an intermediate value
    memory: list[tuple[int, float]] = field(default_factory=list)  # ours: (trials started, driver RSS MB) samples

    def peak_mb(self, started_at_most: int | None = None) -> float:
        return max((mb for started, mb in self.memory if started_at_most is None or started <= started_at_most), default=0.0)


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class MemorySampler(threading.Thread):
    """This process's resident memory once a second, beside how many trials Tune has started (its trial folders
    under the experiment): the driver's growth with the sweep, sampled without touching the sweep's stores."""

    def __init__(self, experiment: Path) -> None:
        super().__init__(daemon=True)
        self.experiment, self.samples, self.done = experiment, [], threading.Event()

    def started(self) -> int:
        try:
            return sum(entry.is_dir() for entry in os.scandir(self.experiment))
        except FileNotFoundError:
            return 0

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.samples.append((self.started(), resident_mb()))

    def stop(self) -> list[tuple[int, float]]:
        self.done.set()
        self.join()
        return self.samples + [(self.started(), resident_mb())]


def run_ours(space_file: Path, workdir: Path) -> Side:
    """`run_sweep` with the no-op trainable; counts what MLflow received."""
    from mlflow.tracking import MlflowClient

    from orchestrator.space import load_space
    from orchestrator.plan import make_plan
    from orchestrator.sweep import TRIALS_FILTER, build_parser, run_sweep

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    args = build_parser().parse_args([
        "--space", str(space_file), "--name", SWEEP, "--tracking-uri", tracking_uri,
        "--optuna-storage", f"sqlite:///{workdir / 'optuna.db'}", "--storage-path", str(workdir / "ray_results"),
    ])
    space = load_space(args.space)
    plan = make_plan(space)
    sampler = MemorySampler(workdir / "ray_results" / SWEEP)
    sampler.start()
    start, cpu = time.perf_counter(), time.process_time()
    if run_sweep(space, plan, args, trainable=noop_trial) != 0:
        raise RuntimeError("run_sweep failed")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    memory = sampler.stop()
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(SWEEP)
    runs = client.search_runs([experiment.experiment_id], TRIALS_FILTER, max_results=10 * plan.total_trials)
    steps = [len(client.get_metric_history(run.info.run_id, "val_avg_acc")) for run in runs]
    completed = sum(run.info.status == "FINISHED" and run.data.tags["status"] == "completed" for run in runs)
    return Side(seconds, cpu, completed, sum(steps), optuna_complete(f"sqlite:///{workdir / 'optuna.db'}", space), memory)


def optuna_complete(storage_url: str, space: Any) -> int:
    """Optuna trials of the sweep's cells that are COMPLETE with an intermediate value for every report."""
    import optuna

    n_tasks = space.base["data.n_tasks"]
    studies = optuna.get_all_study_summaries(storage_url)
    return sum(t.state == optuna.trial.TrialState.COMPLETE and len(t.intermediate_values) == n_tasks
               for summary in studies if summary.study_name.startswith(f"{SWEEP}/")
               for t in optuna.load_study(study_name=summary.study_name, storage=storage_url).get_trials(deepcopy=False))


def run_bare(space_file: Path, workdir: Path) -> Side:
    """The same trials through `tune.Tuner` alone: one trial config of the space, num_samples times."""
    from ray import tune

    from orchestrator.space import load_space
    from orchestrator.plan import make_plan

    space = load_space(str(space_file))
    plan = make_plan(space)
    cell = plan.cells[0]
    tuner = tune.Tuner(
        tune.with_resources(noop_trial, {"cpu": space.cpus_per_trial, "gpu": space.gpus_per_trial}),
        param_space={"run": space.run_config(cell), "cell": cell.key},
        tune_config=tune.TuneConfig(num_samples=plan.total_trials),
        run_config=tune.RunConfig(name="bare", storage_path=str(workdir / "ray_results"), verbose=1),  # ours' output level
    )
    start, cpu = time.perf_counter(), time.process_time()
    grid = tuner.fit()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    reports = [result.metrics["training_iteration"] for result in grid if result.error is None]
    n_tasks = space.run_config(cell)["data"]["n_tasks"]
    return Side(seconds, cpu, sum(n == n_tasks for n in reports), sum(reports))


def compare_sweeps(trials: int, reports: int, workdir: Path) -> tuple[Side, Side]:
    """Both sides on one local Ray, after a small untimed bare run that starts Ray's workers."""
    import ray

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # run_sweep sets it for its reporter; the bare side gets the same output
    space_file = write_space(workdir, trials, reports)
    warmup = workdir / "warmup"
    warmup.mkdir()
    ray.init(include_dashboard=False, log_to_driver=True)
    try:
        run_bare(write_space(warmup, 2, 1), warmup)
        bare = run_bare(space_file, workdir)
        ours = run_ours(space_file, workdir)
    finally:
        ray.shutdown()
    return ours, bare


def dry_run(trials: int, workdir: Path) -> tuple[float, float]:
    """Wall seconds and peak resident MB of `python -m orchestrator.sweep --dry-run` over a space of `trials`."""
    space_file = write_space(workdir, trials, reports=10)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", "--space", str(space_file), "--dry-run"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory (RUSAGE_CHILDREN mixes in Ray's)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or f"{trials} trials" not in output:
        raise RuntimeError(f"the dry run failed:\n{output}")
    return seconds, usage.ru_maxrss / 1024  # Linux: kilobytes


def print_memory(ours: Side, trials: int, early: int = 200) -> None:
    """The driver's peak resident memory by the `early`-th trial started and over the whole sweep."""
    print(f"driver resident memory (this process, sampled each second): peak {ours.peak_mb():.0f} MB over {trials} trials")
    if trials > early:
        by_early = ours.peak_mb(early)
        growth_kb = (ours.peak_mb() - by_early) * 1024 / (trials - early)
        print(f"  peak by the {early}th trial started {by_early:.0f} MB; growth {growth_kb:.0f} KB per trial after it")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=200, help="trials on each side (the driver's memory is also shown by the 200th)")
    p.add_argument("--reports", type=int, default=10, help="reports (tasks) per trial")
    p.add_argument("--dry-run-trials", type=int, default=1000, help="planned trials of the dry-run space")
    p.add_argument("--skip-sweeps", action="store_true", help="only the dry run")
    p.add_argument("--skip-dry-run", action="store_true", help="only the two sweeps")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_dry_run:  # first: nothing else running while it is timed
            seconds, peak_mb = dry_run(args.dry_run_trials, Path(tmp))
            print(f"dry run of {args.dry_run_trials} planned trials: {seconds:.2f} s wall, driver peak {peak_mb:.0f} MB")
        if not args.skip_sweeps:
            ours, bare = compare_sweeps(args.trials, args.reports, Path(tmp))
            print(f"\n{args.trials} trials x {args.reports} reports, {os.cpu_count()} CPUs, 1 CPU per trial")
            print(f"{'':<24} {'wall s':>7} {'driver CPU s':>12} {'trials done':>11} {'reports':>8}")
            for name, side, counted in (("bare Ray Tune", bare, "Tune results"), ("our sweep (run_sweep)", ours, "MLflow runs, val_avg_acc steps")):
                print(f"{name:<24} {side.seconds:>7.1f} {side.driver_cpu:>12.1f} {side.trials:>11} {side.reports:>8}   ({counted})")
            overhead_ms = (ours.seconds - bare.seconds) / args.trials * 1000
            print(f"ours / bare: {ours.seconds / bare.seconds:.2f}x (target <= 1.2x); overhead {overhead_ms:.0f} ms per trial")
            print(f"Optuna: {ours.optuna_trials} trials COMPLETE with all {args.reports} intermediate values")
            print_memory(ours, args.trials)
            expected = (args.trials, args.trials * args.reports)
            if (ours.trials, ours.reports) != expected or (bare.trials, bare.reports) != expected or ours.optuna_trials != args.trials:
                sys.exit(f"error: a side lost trials or reports (expected {expected[0]} trials, {expected[1]} reports)")


if __name__ == "__main__":
    main()
