"""The project's user errors: the bottom of the import graph (this module imports nothing of the project).

A `UserError` is something the person running a command can fix — a bad config or space, a dataset that is
missing or corrupt, weights that cannot load, a store or service that cannot be reached. Every `python -m`
entry point turns one into a single `error: ...` line and exit status 2 (`cdl_core.cli`); any other exception
is a bug and keeps its traceback. Messages say what is wrong and what to do, on one line.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class UserError(Exception):
    """Base of every error a user can act on."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message says which field and how to fix it."""


class DataError(UserError):
    """A dataset, or a file describing one, cannot be used as it is."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are missing; the message lists where we looked and how to get them."""

    def __init__(self, dataset: str, looked_at: Sequence[Path | str], how_to_get: str) -> None:
        paths = ", ".join(str(p) for p in looked_at) or "(no candidate paths)"
        super().__init__(f"dataset {dataset!r} not found; looked at: {paths}; to get it: {how_to_get}")
        self.dataset = dataset
        self.looked_at = tuple(str(p) for p in looked_at)
        self.how_to_get = how_to_get

    def __reduce__(self) -> tuple:  # copied and pickled by Ray (a trial's error travels to the driver)
        return type(self), (self.dataset, self.looked_at, self.how_to_get)


class DatasetCorruptError(DataError):
    """A dataset file exists but cannot be read (truncated, not the expected format)."""


class SplitFileError(DataError):
    """A split file is corrupted, edited, malformed, or belongs to a different image folder."""


class WeightsUnavailableError(UserError):
    """Pretrained weights could not be obtained (offline hub, missing or bad file)."""


class TeacherStoreError(UserError):
    """The teacher store cannot be reached, or an entry in it cannot be used as asked."""


class ServiceUnreachableError(UserError):
    """A service a command needs (MLflow tracking, the Optuna storage) cannot be reached or used."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message from a library joined with '; ')."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
