"""Failures a user can cause and fix: reported as one `error: ...` line with exit status 2."""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad config value, a missing file or column, an unreachable service, ...

    The message says what to do; no traceback is shown for it.
    """


def report_and_exit(message: str) -> NoReturn:
    # one line, whatever the message holds, so scripts can grep for it
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)
