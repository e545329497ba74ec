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


def import_extra(module: str, extra: str, what: str):
    """`import module`, or a UserError that names the extra installing it: training needs only the
    core dependencies, and each other command's packages come with its extra (pyproject.toml)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken: its own traceback says more
        package = module.split(".")[0].replace("_", "-")
        raise UserError(f"{package} is not installed ({what}); run pip install 'softprompt[{extra}]'") from None


def is_disk_full(exc: BaseException) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(what: str, where, needed_bytes: int, then: str) -> UserError:
    """The `error:` for a write that found no space: what it needed, what is free, what to do."""
    import shutil
    from pathlib import Path

    place = Path(where)
    while not place.exists() and place != place.parent:  # the nearest existing folder
        place = place.parent
    try:
        free = f"{_size(shutil.disk_usage(place).free)} free"
    except OSError:
        free = "free space unknown"
    return UserError(f"no space left on the device writing {what} in {where}: it needs {_size(needed_bytes)}, "
                     f"{free} there; {then}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
