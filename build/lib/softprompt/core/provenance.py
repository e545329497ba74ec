"""What produced a run: package versions and the code commit, recorded beside its config.

A result is only comparable with another if both say which code and which libraries made them
(PEFT's own benchmarks record the same). Nothing here reads environment variables, so nothing
secret can end up in a config.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGES = ("softprompt", "torch", "transformers", "peft", "datasets", "accelerate", "hydra-core",
            "omegaconf", "wandb", "tokenizers", "safetensors")
# git looks upward from the package: a checkout's commit, none for an installed wheel
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=1)
def git_state(root: Path = PACKAGE_DIR) -> dict[str, Any]:
    """The commit of the checkout that runs, and whether it has uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # not a git checkout (an installed wheel): say so rather than guess
        return {"commit": None, "dirty": None}
    # untracked files do not change what runs; modified tracked files do
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance() -> dict[str, Any]:
    return {"versions": package_versions(), "git": git_state()}
