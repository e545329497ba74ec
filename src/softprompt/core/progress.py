"""Progress bars for the passes a user waits on (perplexity, generation, sweeps, packs).

tqdm writes to stderr and redraws one line, so logs on stdout stay readable. No bar under
`TQDM_DISABLE=1` (tqdm's own variable, which tqdm itself ignores once a caller passes `disable=`;
here it is read with the rest) nor under `SOFTPROMPT_QUIET=1` (the tests and the benchmark set
it: no bar lines in captured output). A pass of fewer than `min_total` steps gets no bar: it is
over before a bar says anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

_FALSE = ("", "0", "false", "no", "off")


def quiet() -> bool:
    return os.environ.get("SOFTPROMPT_QUIET") == "1"


def bars_disabled() -> bool:
    """SOFTPROMPT_QUIET=1, or TQDM_DISABLE set to anything but an empty/false value."""
    return quiet() or os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE


def progress(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             min_total: int = 2, leave: bool = False):
    from tqdm.auto import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    disable = bars_disabled() or (total is not None and total < min_total)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, dynamic_ncols=True)
