"""Where softprompt keeps what it computes once and reuses: converted models, tokenizers,
tokenized datasets, base-model evaluations."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("SOFTPROMPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "softprompt"
    )
    return Path(base)


def cache_dir(kind: str) -> Path:
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
