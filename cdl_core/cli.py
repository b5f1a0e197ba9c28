"""The one boundary every `python -m` entry point shares: a user error becomes one line, anything else is a bug.

`sys.exit(run_cli(main))` in each entry point: a `UserError` (cdl_core.errors) prints `error: <message>` on
stderr and exits 2; every other exception propagates with its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from cdl_core.errors import UserError, one_line

USER_ERROR_EXIT = 2


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
