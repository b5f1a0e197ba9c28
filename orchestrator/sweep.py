"""`python -m orchestrator.sweep --space NAME`: run a search space's grid of cells on Ray Tune, with one Optuna
study per cell that prunes poor trials after each task, and every trial tracked in MLflow.

Defaults run on this machine: a local Ray sized to it, MLflow in sqlite:///mlflow.db and Optuna in
sqlite:///optuna.db (both in the working directory), Tune results under ./ray_results. On a cluster pass
--address auto, a tracking-server URI, an RDB Optuna URL and a shared --storage-path.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cdl_core.cli import run_cli
from orchestrator.errors import CONFIG_ERROR, SweepError
from orchestrator.plan import Plan, make_plan, prepare_backbones, print_plan
from orchestrator.space import SweepSpace, available_spaces, load_space

TRIALS_FILTER = "tags.role = 'trial'"  # MLflow search filter for a sweep's trial runs


def summarize(results: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best completed trial per cell (by the space's metric, as Optuna ranks them) with counts of
    completed/pruned/failed trials."""
    by_cell: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by_cell[result["cell"]].append(result)
    rows = []
    for cell, items in sorted(by_cell.items()):
        counts = Counter(r["status"] for r in items)
        done = [r for r in items if r["status"] == "completed"]
        best = max(done, key=lambda r: r["metrics"][metric], default=None)
        errors = sorted({r["metrics"][CONFIG_ERROR] for r in items if CONFIG_ERROR in r["metrics"]})
        rows.append({"cell": cell, "counts": counts, "best": best, "errors": errors})
    return rows


def print_summary(rows: list[dict[str, Any]], metric: str) -> None:
    # Both forgetting definitions by name: cells may differ in which one their config shows as `forgetting`.
    columns = [(f"best {metric}", metric, 12), ("test acc", "test_avg_acc", 8),
               ("forgetting (cdl)", "test_forgetting_cdl", 16), ("forgetting (chaudhry)", "test_forgetting_chaudhry", 21)]
    print(f"\n{'cell':<56} {'done':>4} {'pruned':>6} {'failed':>6} " + " ".join(f"{title:>{width}}" for title, _, width in columns))
    for row in rows:
        best, counts = row["best"], row["counts"]
        got = best["metrics"] if best else {}
        # "-": no completed trial, or a metric the code that ran the trial did not report yet
        values = " ".join(f"{got[key]:>{width}.2f}" if key in got else f"{'-':>{width}}" for _, key, width in columns)
        print(f"{row['cell']:<56} {counts['completed']:>4} {counts['pruned']:>6} {counts['failed']:>6} {values}")
    for row in rows:
        for message in row["errors"]:  # refused settings: each ended its trial at once, never retried
            print(f"  failed, config error: {row['cell']}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True, help=f"search space: one of {', '.join(available_spaces())}, or a path to a copied space .py file")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: start a local Ray sized to this machine")
    p.add_argument("--cluster-config", metavar="FILE", help="the cluster YAML whose node types the autoscaler adds (default: the "
                   "config this cluster's autoscaler runs with, found on its head; ~/ray_bootstrap_config.yaml after `ray up`)")
    p.add_argument("--experiment", help="MLflow experiment name (default: the sweep name, so one experiment per sweep)")
    p.add_argument("--name", help="sweep name: Tune experiment folder, MLflow parent run and Optuna study prefix (default: the space name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the working directory; on clusters an http:// tracking server)")
    p.add_argument("--optuna-storage", help="Optuna storage URL (default: sqlite:///optuna.db in the working directory; on clusters a postgresql:// URL)")
    p.add_argument("--storage-path", default="ray_results", help="where Tune keeps results and checkpoints: a local dir, or a shared path / URI (s3://...) on clusters")
    p.add_argument("--teacher-store", help="where trained teachers are stored and shared: a directory or URI "
                   "(default: teachers/ under --storage-path); reused across sweeps")
    p.add_argument("--no-teacher-reuse", action="store_true", help="every trial trains its own teacher (to compare costs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: finished trials are not rerun, interrupted ones continue from their last task")
    p.add_argument("--dry-run", action="store_true", help="print the plan (cells, trials, resources, teacher trainings) and start nothing")
    p.add_argument("--max-concurrent", type=int, default=0, help="at most this many trials at once (default: as many as resources allow)")
    p.add_argument("--cpus-per-trial", type=float, help="override the space's CPUs per trial")
    p.add_argument("--gpus-per-trial", type=float, help="override the space's GPUs per trial (fractions share a GPU)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial, from its last task checkpoint (default 2)")
    p.add_argument("--mlflow-wait", type=float, default=300, metavar="SECONDS",
                   help="at the end, how long to wait for an unreachable MLflow server to take the writes that waited (default 300)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings only until run_sweep routes the logs (orchestrator.console): planning and preflight stay quiet.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    space = load_space(args.space)
    if args.cpus_per_trial is not None:
        space.cpus_per_trial = args.cpus_per_trial
    if args.gpus_per_trial is not None:
        space.gpus_per_trial = args.gpus_per_trial
    if args.max_concurrent < 0:
        raise SweepError(f"--max-concurrent={args.max_concurrent} must be >= 0 (0: no limit)")
    space.validate()
    plan = make_plan(space)
    if args.dry_run:
        print_plan(space, plan, None if args.no_teacher_reuse else teacher_store_location(args))
        return 0
    return run_sweep(space, plan, args)


def storage_location(args: argparse.Namespace) -> str:
    return args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())


def teacher_store_location(args: argparse.Namespace) -> str:
    if args.teacher_store is not None:
        if not args.teacher_store.strip():
            raise SweepError("--teacher-store is empty; give a directory or URI, or leave it out for the default")
        return args.teacher_store if "://" in args.teacher_store else str(Path(args.teacher_store).resolve())
    return f"{storage_location(args).rstrip('/')}/teachers"


@contextlib.contextmanager
def pending_trials(count: int | None) -> Iterator[None]:
    """Let Tune keep `count` trials placed ahead (None: its own rule). For a searcher of its own, without
    --max-concurrent, Tune keeps one: each trial's placement group and process start then wait for the trial before
    it to be placed, and short trials run one at a time on a machine that holds two (bench/sweep_overhead.py: 117 s
    -> 91 s for 40 trials). Read when the Tuner's loop starts; restored after, for the next sweep in this process."""
    name, before = "TUNE_MAX_PENDING_TRIALS_PG", os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")
    if count is None or before is not None:  # a value the user set stays
        yield
        return
    os.environ[name] = str(count)
    try:
        yield
    finally:
        del os.environ[name]


def sweep_arguments(space: SweepSpace, args: argparse.Namespace) -> dict[str, Any]:
    """The arguments this sweep runs with, resolved (default stores as absolute paths): recorded beside Tune's
    experiment and compared on --resume (orchestrator.resume)."""
    space_arg = str(Path(args.space).resolve()) if args.space.endswith(".py") else args.space
    return {
        "space": space_arg, "name": args.name or space.name,
        "tracking_uri": args.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}",
        "optuna_storage": args.optuna_storage or f"sqlite:///{Path.cwd() / 'optuna.db'}",
        "storage_path": storage_location(args),
        "teacher_store": None if args.no_teacher_reuse else teacher_store_location(args),
        "max_concurrent": args.max_concurrent, "max_failures": args.max_failures, "mlflow_wait": args.mlflow_wait,
    }


def preflight(now: dict[str, Any], experiment_path: str, resuming: bool) -> list[str]:
    """What is checked before Ray starts or Tune saves anything, so a refused resume or a bad URL leaves nothing
    behind: the resume's arguments against the recorded ones (returns the adjustable ones that change), MLflow,
    the Optuna storage and the teacher store."""
    from orchestrator import resume
    from orchestrator.services import reach_mlflow, reach_optuna

    adjusted = resume.check_resume(resume.read_record(experiment_path), now) if resuming else []
    reach_mlflow(now["tracking_uri"])
    reach_optuna(now["optuna_storage"], f"{now['name']}/.preflight")
    if now["teacher_store"] is not None:
        from cdl_core.teacher_store import TeacherStore

        TeacherStore(now["teacher_store"]).keys()  # reachable (an unknown filesystem or a denied bucket stops here)
    return adjusted


def run_sweep(space: SweepSpace, plan: Plan, args: argparse.Namespace, trainable: Callable[..., None] | None = None) -> int:
    """Run the planned trials. `trainable` replaces `train_cdl` (the benchmark of the sweep's own overhead runs a
    no-op); it is called like train_cdl, with the trial's config and `teachers=`."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # use the reporter below (the new output ignores it)
    # MLflow is the sweep's metrics store: of Tune's own loggers keep the JSON and CSV results (resume, the
    # fallback when MLflow is down), not TensorBoard event files, which cost the driver time at every report.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # A trial whose config is refused reports only why (orchestrator.trainable), without the search metric; Tune's
    # strict check would turn that one report into an error of the whole sweep.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # MLflow adds no handler of its own: its INFO lines ("Creating initial MLflow database tables") stay off the
    # console, and once routed (orchestrator.console) go to the sweep's log file.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    from orchestrator import console, resume
    from orchestrator.capacity import Fit, cluster_fit, release_room, request_room

    now = sweep_arguments(space, args)
    sweep, experiment = now["name"], args.experiment or now["name"]
    tracking_uri, optuna_url, storage, teacher_store = (now[k] for k in ("tracking_uri", "optuna_storage", "storage_path", "teacher_store"))
    experiment_path = f"{storage.rstrip('/')}/{sweep}"
    adjusted = preflight(now, experiment_path, args.resume)
    log_file = console.route_driver_logs(
        Path(experiment_path) / "sweep.log" if "://" not in experiment_path else Path.cwd() / f"{sweep}.log"
    )
    prepare_backbones(space)  # needs no cluster: a missing dataset stops the sweep before Ray starts

    import ray
    from optuna.trial import TrialState
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from orchestrator.checkpoints import CheckpointPruner
    from orchestrator.pruning import CellStudies, OptunaPruningScheduler, PerCellOptunaSearch
    from orchestrator.progress import SweepProgress
    from orchestrator.teachers import TeacherSharing, start_lease_actor
    from orchestrator.tracking import LIVE, MlflowTracking
    from orchestrator.trainable import train_cdl

    own_ray = not ray.is_initialized()  # a caller that already started Ray (a benchmark, a notebook) keeps it
    if own_ray:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=True)
    progress = SweepProgress(space.metric, [cell.key for cell in plan.cells], plan.total_trials)
    fit = Fit(None, 0)
    try:
        warning_kinds = console.start_warning_registry()  # noqa: F841 (held: trials show each warning kind once)
        fit = cluster_fit(space.name, space.cpus_per_trial, space.gpus_per_trial, plan.total_trials, args.max_concurrent,
                          args.cluster_config)
        if fit.waiting:
            print(f"[sweep] {fit.waiting}", flush=True)
        request_room(fit, space.cpus_per_trial, space.gpus_per_trial)
        sharing = None
        if teacher_store is not None:
            sharing = TeacherSharing(teacher_store, f"cdl-teacher-leases:{sweep}")
            leases = start_lease_actor(sharing.lease_actor)  # noqa: F841 (held: the actor lives while the driver references it)
        resourced = tune.with_resources(
            tune.with_parameters(trainable or train_cdl, teachers=sharing, log_file=str(log_file)),
            {"cpu": space.cpus_per_trial, "gpu": space.gpus_per_trial},
        )
        if args.resume:
            if not tune.Tuner.can_restore(experiment_path):
                raise SweepError(f"nothing to resume at {experiment_path}; start the sweep without --resume")
            tuner = tune.Tuner.restore(experiment_path, resourced, resume_unfinished=True, resume_errored=True)
            resume.apply_adjustable(tuner, now, MlflowTracking)
        else:
            if tune.Tuner.can_restore(experiment_path):
                raise SweepError(f"sweep {sweep!r} already exists at {experiment_path}; continue it with --resume or pick another --name")
            searcher = PerCellOptunaSearch(space, CellStudies(space, sweep, optuna_url))
            sweep_params = {"space": space.name, "cells": len(plan.cells), "trials": plan.total_trials, "metric": space.metric,
                            "pruner": space.pruner, "pruner_args": space.pruner_args, "optuna_storage": optuna_url,
                            "teacher_store": teacher_store or "none (no reuse)"}
            tuner = tune.Tuner(
                resourced,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=OptunaPruningScheduler(searcher), num_samples=plan.total_trials,
                    max_concurrent_trials=args.max_concurrent or None,
                ),
                run_config=tune.RunConfig(
                    name=sweep, storage_path=storage,
                    callbacks=[MlflowTracking(tracking_uri, experiment, sweep, sweep_params, flush_timeout=args.mlflow_wait),
                               JsonLoggerCallback(), CSVLoggerCallback(), CheckpointPruner()],
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    progress_reporter=progress, verbose=1,
                ),
            )
        resume.write_record(experiment_path, now)
        with pending_trials(None if args.max_concurrent else fit.pending_trials):
            grid = tuner.fit()
    finally:
        progress.close()
        if ray.is_initialized():
            release_room(fit)
        if own_ray:
            ray.shutdown()
    # Statuses from Optuna, where the searcher told every outcome: Tune marks a trial that an interrupt (Ctrl-C)
    # stopped TERMINATED, just like a pruned one.
    studies = CellStudies(space, sweep, optuna_url)
    cells = {cell.key: cell for cell in plan.cells}
    results, outcomes = [], {}
    for result in grid:
        if result.config is None:  # never started: the sweep was interrupted before this trial ran
            continue
        key = result.config["cell"]
        if key not in outcomes:
            outcomes[key] = studies.outcomes(cells[key])
        state = outcomes[key][result.config["optuna_trial"]]
        status = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(state, "interrupted")
        results.append({"cell": result.config["cell"], "status": status, "metrics": result.metrics or {}})
    print_summary(summarize(results, space.metric), space.metric)
    print(f"ran with: max concurrency {now['max_concurrent'] or 'as resources allow'}, max failures {now['max_failures']}, "
          f"MLflow wait {now['mlflow_wait']:g} s" + (f" (changed on resume: {'; '.join(adjusted)})" if adjusted else ""))
    unfinished = plan.total_trials - sum(r["status"] != "interrupted" for r in results)
    if unfinished:
        print(f"\nsweep interrupted: {unfinished} of {plan.total_trials} trials not finished; rerun the same command with --resume to continue")
    tracking = LIVE.pop(sweep, None)
    console.print_sweep_end(experiment, tracking_uri, optuna_url, runs_filter=TRIALS_FILTER,
                            experiment_id=tracking.experiment_id if tracking is not None else None)
    if tracking is not None and tracking.unwritten:
        raise SweepError(
            f"MLflow at {tracking_uri} stayed unreachable: {tracking.unwritten} tracking writes were not done after waiting "
            f"{args.mlflow_wait:g} s; every trial's results are in Tune's storage at {experiment_path} (result.json per trial)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
