"""Reaching the services a command needs — MLflow tracking, the Optuna storage — before anything depends on them.

Each probe does the smallest real round trip and turns any failure into a `ServiceUnreachableError` saying what
is wrong and what to do, so a bad URL stops a sweep before Ray starts or Tune saves an experiment.
"""
from __future__ import annotations

import logging
import os
import urllib.parse

from cdl_core.errors import ServiceUnreachableError, one_line

# Writes to an unreachable server fail within seconds (the sweep's tracking outbox retries them itself) instead
# of MLflow's own retries holding every call for minutes.
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# The drivers each URL scheme needs, as a user installs them.
DRIVERS = {"postgresql": "psycopg2-binary (pip install -e '.[cluster]')", "mysql": "PyMySQL (pip install pymysql)"}


def use_short_mlflow_retries() -> None:
    for name, value in MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(name, value)


def reach_mlflow(tracking_uri: str) -> None:
    """Stop unless the tracking store answers a search."""
    from mlflow.tracking import MlflowClient

    use_short_mlflow_retries()
    retries = logging.getLogger("urllib3.connectionpool")  # its "Retrying ..." warning would precede our one line
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - whatever the cause, the message below is what a user can act on
        raise ServiceUnreachableError(
            f"cannot reach MLflow at {tracking_uri} ({type(err).__name__}); start the tracking server or pass another --tracking-uri"
        ) from None
    finally:
        retries.setLevel(level)


def reach_optuna(storage_url: str, probe_study: str) -> None:
    """Stop unless the Optuna storage connects and can create, read and delete a study (named `probe_study`)."""
    import optuna

    scheme = urllib.parse.urlsplit(storage_url).scheme.split("+")[0]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.get_storage(storage_url)
        optuna.create_study(study_name=probe_study, storage=storage, load_if_exists=True)
        optuna.load_study(study_name=probe_study, storage=storage)
        optuna.delete_study(study_name=probe_study, storage=storage)
    except ImportError:
        driver = DRIVERS.get(scheme, f"the Python driver for {scheme!r}")
        if scheme == "postgresql" and "+" not in urllib.parse.urlsplit(storage_url).scheme:
            # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which psycopg2 does not provide
            driver = f"{driver} and name it in the URL: postgresql+psycopg2://{storage_url.split('://', 1)[1]}"
        raise ServiceUnreachableError(
            f"the database driver for the Optuna storage {storage_url} is not installed; install {driver}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a bad URL, an unreachable server, a read-only file: all end here
        raise ServiceUnreachableError(
            f"cannot use the Optuna storage {storage_url} ({type(err).__name__}: {one_line(err)[:200]}); pass a working "
            "--optuna-storage such as sqlite:///optuna.db or postgresql+psycopg2://HOST/DB"
        ) from None
    finally:
        optuna.logging.set_verbosity(verbosity)
