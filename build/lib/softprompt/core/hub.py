"""Is the Hugging Face Hub reachable? Answered in seconds.

Without a network the libraries retry for ~26 s (datasets) and ~52 s (models) before failing;
a single TCP connect with a short timeout tells us the same thing at once, so an unreachable Hub
can be reported (or cached copies used) before any time is spent.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


@functools.lru_cache(maxsize=None)
def reachable(timeout: float = 3.0) -> bool:
    if offline_requested():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
