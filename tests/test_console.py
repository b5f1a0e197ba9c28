"""Where a sweep's chatter goes (orchestrator/console.py): library logs to the sweep log file only; a project
warning on the console once per kind however often it is logged (in the driver, and across trial processes
through the driver's registry actor), every repeat in the file; and the commands printed at the end."""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator

import pytest

from orchestrator import console

CODA = "coda: %d components in a %d-dim query space cannot all be orthogonal"
CHECKPOINT = "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/checkpoint_000001)"


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Routing changes process-wide logging; put back what it touches."""
    import optuna

    names = ("MLFLOW_CONFIGURE_LOGGING", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "RAY_COLOR_PREFIX")
    environ = {name: os.environ.get(name) for name in names}
    root = logging.getLogger()
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in console.OWN_HANDLERS}
    root_handlers, root_level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in root_handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(root_level)
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.captureWarnings(False)
    for name, value in environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    optuna.logging.disable_propagation()
    optuna.logging.enable_default_handler()


def test_library_logs_go_to_the_file_and_a_project_warning_reaches_the_console_once_per_kind(tmp_path, capsys, logging_state):
    import optuna

    log_file = console.route_driver_logs(tmp_path / "sweep" / "sweep.log")
    assert capsys.readouterr().out.count(str(log_file)) == 1  # its path, printed once
    assert os.environ["MLFLOW_CONFIGURE_LOGGING"] == "false"  # mlflow imported later adds no stderr handler
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # no "View run" lines per trial
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # stderr is no terminal: Ray's forwarded lines carry no ANSI codes
    logging.getLogger("ray.train._internal.storage").info(CHECKPOINT)
    logging.getLogger("mlflow.store.db.utils").warning("Updating database tables")
    storage = optuna.storages.InMemoryStorage()
    for _ in range(2):  # the second one logs Optuna's "Using an existing study"
        optuna.create_study(study_name="sweep/cell", storage=storage, load_if_exists=True)
    coda = logging.getLogger("cdl_core.prompts.coda")
    for pool in (100, 100, 200):  # one kind: same logger, same template
        coda.warning(CODA, pool, 64)
    logging.getLogger("orchestrator.tracking").warning("MLflow is unreachable (%s)", "ConnectionError")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn("the knob is deprecated", UserWarning)

    err, text = capsys.readouterr().err, log_file.read_text()
    assert CHECKPOINT not in err and "Updating database tables" not in err and "Using an existing study" not in err
    assert CHECKPOINT in text and "Updating database tables" in text and "Using an existing study" in text
    assert err.count("cannot all be orthogonal") == 1 and "100 components" in err
    assert text.count("cannot all be orthogonal") == 3 and "200 components" in text
    assert err.count("MLflow is unreachable") == 1
    assert err.count("UserWarning: the knob is deprecated") == 1 and text.count("UserWarning: the knob is deprecated") == 3


def test_routing_again_replaces_the_handlers_instead_of_adding_more(tmp_path, capsys, monkeypatch, logging_state):
    first = console.route_driver_logs(tmp_path / "a.log")
    logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))  # as logging.basicConfig: replaced too
    second = console.quiet_trial(tmp_path / "b.log")
    logging.getLogger("ray.tune").info("trial chatter")
    logging.getLogger("cdl_core.learner").warning("once")
    assert "trial chatter" not in first.read_text() and "trial chatter" in second.read_text()
    err = capsys.readouterr().err
    assert err.count("once") == 1 and "trial chatter" not in err
    monkeypatch.chdir(tmp_path)  # a trial's working directory
    assert console.quiet_trial(tmp_path / "missing" / "c.log") == tmp_path / "trial.log"  # its folder is not here


def test_the_end_commands_name_the_experiment_and_each_store(capsys):
    console.print_sweep_end("my sweep", "sqlite:////w/mlflow.db", "sqlite:////w/optuna.db", experiment_id="7",
                            runs_filter="tags.role = 'trial'")
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:////w/mlflow.db" in out
    runs = "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert f"{runs}&searchFilter=tags.role%20%3D%20%27trial%27" in out
    assert "python -m orchestrator.report --experiment 'my sweep' --tracking-uri sqlite:////w/mlflow.db" in out
    assert "optuna-dashboard sqlite:////w/optuna.db" in out
    console.print_sweep_end("s", "http://10.0.0.5:5000", "postgresql://u@db/optuna?sslmode=require")
    out = capsys.readouterr().out
    assert "MLflow UI at http://10.0.0.5:5000" in out and "mlflow ui" not in out and "/#/experiments/" not in out
    assert "--experiment s --tracking-uri http://10.0.0.5:5000" in out
    assert "optuna-dashboard 'postgresql://u@db/optuna?sslmode=require'" in out


@pytest.mark.slow
def test_trial_processes_show_a_warning_kind_once_on_the_driver_and_no_checkpoint_lines(tmp_path, capsys, monkeypatch):
    """Three trials in three fresh Ray worker processes, their stderr forwarded to this driver as in a sweep."""
    import ray
    import ray._private.ray_logging

    # Ray folds like lines from different workers for a few seconds; that would hide repeats this test looks for.
    monkeypatch.setattr(ray._private.ray_logging, "RAY_DEDUP_LOGS", False)
    log_file = tmp_path / "sweep.log"

    @ray.remote(num_cpus=1, max_calls=1)  # max_calls=1: a new process each, as separate trial workers
    def fake_trial(i: int) -> None:
        console.quiet_trial(log_file)
        for task in range(2):
            logging.getLogger("ray.train._internal.storage").info(CHECKPOINT)
            logging.getLogger("cdl_core.prompts.coda").warning(CODA, 100, 64)
        print(f"end of trial {'abc'[i]}", file=sys.stderr, flush=True)  # forwarded after its earlier lines

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)
    try:
        registry = console.start_warning_registry()  # noqa: F841 (held, as the driver does)
        ray.get([fake_trial.remote(i) for i in range(3)])
        err, deadline = "", time.monotonic() + 60
        while not all(f"end of trial {c}" in err for c in "abc"):
            assert time.monotonic() < deadline, err
            time.sleep(0.2)
            err += capsys.readouterr().err
    finally:
        ray.shutdown()
    assert err.count("cannot all be orthogonal") == 1 and "Checkpoint successfully created" not in err
    text = log_file.read_text()
    assert text.count("cannot all be orthogonal") == 6 and text.count("Checkpoint successfully created") == 6
