"""Progress bars for the passes a user waits on (perplexity, sweeps), off under SOFTPROMPT_QUIET=1.

tqdm writes to stderr and redraws one line, so logs on stdout stay readable; the tests and the
benchmark set SOFTPROMPT_QUIET=1 (no bar lines in captured output). A pass of fewer than
`min_total` steps gets no bar: it is over before a bar says anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


def quiet() -> bool:
    return os.environ.get("SOFTPROMPT_QUIET") == "1"


def progress(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             min_total: int = 2, leave: bool = False):
    from tqdm.auto import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    disable = quiet() or (total is not None and total < min_total)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, dynamic_ncols=True)
