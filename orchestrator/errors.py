"""The orchestrator's user errors, all `cdl_core.errors.UserError`s: the CLI boundary (cdl_core.cli) prints
each as one `error:` line and exits 2."""
from __future__ import annotations

from cdl_core.errors import ConfigError, UserError

# The key of the one result a trial reports when its config is refused (orchestrator.trainable): the trial ends
# at once, FAILED, instead of raising and being retried by Tune.
CONFIG_ERROR = "config_error"


class SpaceError(ConfigError):
    """A search space is unknown or malformed; the message says what and how to fix it."""


class SweepError(UserError):
    """The sweep cannot start or resume as asked; the message says what is missing."""


class ReportError(UserError):
    """The experiment cannot be reported; the message says why and what to do."""
