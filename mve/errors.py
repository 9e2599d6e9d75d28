"""The one user-facing error type, and the one place that turns it into a message.

Every mistake a user can make (a config key, a data path, a checkpoint, a search space, a
Kubernetes object, a server answer) raises a subclass of :class:`UserError`. Entry points run
their handler through :func:`run_command`, which prints such an error as one line and returns
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["UserError", "is_user_error", "run_command", "USER_ERROR_EXIT"]

USER_ERROR_EXIT = 2  # argparse's own exit code for a bad command line


class UserError(ValueError):
    """An error caused by input, shown as one line without a traceback."""


def is_user_error(exc: BaseException) -> bool:
    """A :class:`UserError`, or a named file that does not exist."""
    return isinstance(exc, UserError | FileNotFoundError)


def run_command(handler: Callable[[Any], int | None], args: Any, *, prog: str = "mve") -> int:
    """Runs ``handler(args)``: user errors become ``prog: error: ...`` and exit code 2,
    Ctrl-C becomes exit code 130."""
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors get one clear line
        if not is_user_error(exc):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
