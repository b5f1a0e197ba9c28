"""What a sweep prints, and where the rest goes.

The console shows the progress view, the project's warnings and errors (each kind once for the whole sweep) and
the commands printed at the end. Everything logged, by Ray, Optuna, MLflow, alembic, urllib3 ... and every
repeat of a warning, goes to the sweep log file instead.

Trials run in Ray worker processes whose stderr Ray forwards to the driver's console (`log_to_driver=True`,
kept: a worker that dies in C code or is killed for memory still says so there). A trial therefore logs to the
sweep log file (same machine or shared storage; else `trial.log` in its working directory) and not to stderr,
except the first warning of each kind: which kinds were shown is kept by one small actor the driver owns
(`start_warning_registry`), since a per-process filter would still show a kind once per trial process. Bugs in
a trial stay findable: Tune writes each traceback to `error.txt` in the trial's directory under the sweep's
storage (the progress view names it) and logs it into the sweep log.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

PROJECT = ("cdl_core", "orchestrator", "search_spaces", "bench", "__main__", "py.warnings")  # py.warnings: warnings.warn
OWN_HANDLERS = ("ray", "mlflow", "alembic", "huey")  # libraries that put their own stderr handlers on these loggers
FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
REGISTRY = "cdl-console-warning-kinds"


def kind(record: logging.LogRecord) -> str:
    """A warning's kind: logger and message template. A Python warning's text names its category, file and line."""
    if record.name == "py.warnings":
        return "py.warnings:" + record.getMessage().split("\n", 1)[0]
    return f"{record.name}:{record.msg}"


class FirstOfKind(logging.Filter):
    """Lets through the project's warnings and errors, each kind the first time `first(kind)` says so."""

    def __init__(self, first: Callable[[str], bool]) -> None:
        super().__init__()
        self.first = first

    def filter(self, record: logging.LogRecord) -> bool:
        own = any(record.name == p or record.name.startswith(p + ".") for p in PROJECT)
        return own and record.levelno >= logging.WARNING and self.first(kind(record))


class ConsoleHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, so a rich Live view's redirect (and pytest) see it."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr


class LogFile(logging.FileHandler):
    """The sweep log (a type of its own, so routing again replaces it instead of adding a second)."""


def seen_here() -> Callable[[str], bool]:
    seen: set[str] = set()

    def first(name: str) -> bool:
        new = name not in seen
        seen.add(name)
        return new

    return first


def seen_in_sweep() -> Callable[[str], bool]:
    """Asks the driver's registry actor; remembers its answers here. Without the actor (no sweep, unreachable),
    this process shows each kind once."""
    local = seen_here()

    def first(name: str) -> bool:
        if not local(name):
            return False
        import ray

        if not ray.is_initialized():  # ray.get_actor would start a Ray instance
            return True
        try:
            return bool(ray.get(ray.get_actor(REGISTRY).first.remote(name), timeout=10))
        except Exception:  # noqa: BLE001 - better a warning shown once per process than lost
            return True

    return first


def route(log_file: Path, first: Callable[[str], bool]) -> None:
    """Root logger -> the log file (INFO and up) and the console (the filter's picks); libraries propagate to it."""
    if "optuna" in sys.modules:  # its own handler prints "Using an existing study" for every trial's cell
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    root = logging.getLogger()
    for handler in list(root.handlers):  # ours from an earlier call, and logging.basicConfig's stderr handler
        if isinstance(handler, (LogFile, ConsoleHandler)) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
            handler.close()
    file = LogFile(log_file, encoding="utf-8")
    file.setFormatter(logging.Formatter(FORMAT))
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.addFilter(FirstOfKind(first))
    root.addHandler(file)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def route_driver_logs(log_file: str | os.PathLike[str]) -> Path:
    """Call in the driver before ray.init: library logs and repeated warnings go to `log_file` (created with its
    folder), whose path is printed once."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"  # mlflow, imported later here or in local workers, adds no handler
    # With a tracking server, MLflow prints "View run ... / View experiment ..." for every run it ends (every trial).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not sys.stderr.isatty():  # Ray colours the "(trial pid=...)" prefix of forwarded worker lines unless told not to
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    import optuna  # noqa: F401 - imported now so its handler is replaced (the sweep imports both anyway)
    import ray  # noqa: F401 - `import ray` puts a stderr handler on the "ray" logger

    route(path, seen_here())
    print(f"logs of Ray, Optuna, MLflow and repeated warnings: {path}", flush=True)
    return path


def start_warning_registry():  # -> ray.actor.ActorHandle
    """Call in the driver after ray.init and hold the handle for the sweep: the kinds of warnings trials have
    shown (0 CPUs, so it never takes a trial's slot; it ends with the driver)."""
    import ray

    return ray.remote(num_cpus=0)(WarningKinds).options(name=REGISTRY, get_if_exists=True).remote()


class WarningKinds:
    def __init__(self) -> None:
        self.kinds: set[str] = set()

    def first(self, name: str) -> bool:
        new = name not in self.kinds
        self.kinds.add(name)
        return new


def quiet_trial(log_file: str | os.PathLike[str] | None = None) -> Path:
    """Call first thing in a trial: its logs (Ray's "Checkpoint successfully created" after every task, the
    project's repeated warnings) go to `log_file` if its folder is reachable from here, else to trial.log in the
    trial's working directory; returns the file used. Safe to call again in a reused worker."""
    path = Path(log_file) if log_file is not None and Path(log_file).parent.is_dir() else Path.cwd() / "trial.log"
    route(path, seen_in_sweep())
    return path


def print_sweep_end(experiment: str, tracking_uri: str, optuna_url: str, *, experiment_id: str | None = None,
                    runs_filter: str | None = None, file: TextIO | None = None) -> None:
    """Where to look at the finished sweep: MLflow's UI and this sweep's runs table, the report, Optuna's dashboard."""
    out, q = file or sys.stdout, shlex.quote  # quoted: names and URLs with spaces or `&` paste as one argument
    served = tracking_uri if tracking_uri.startswith("http") else "http://127.0.0.1:5000"  # `mlflow ui`'s default
    if served == tracking_uri:
        print(f"\nMLflow UI at {tracking_uri} (experiment {experiment!r})", file=out)
    else:
        print(f"\nMLflow UI: mlflow ui --backend-store-uri {q(tracking_uri)}   (experiment {experiment!r})", file=out)
    if experiment_id is not None:  # the runs table of the trials (MLflow otherwise opens its GenAI overview)
        query = "?workflowType=machine_learning" + (f"&searchFilter={urllib.parse.quote(runs_filter)}" if runs_filter else "")
        print(f"  open {served}/#/experiments/{experiment_id}/runs{query}", file=out)
    print(f"Report: python -m orchestrator.report --experiment {q(experiment)} --tracking-uri {q(tracking_uri)}", file=out)
    print(f"Optuna dashboard: optuna-dashboard {q(optuna_url)}", file=out, flush=True)
