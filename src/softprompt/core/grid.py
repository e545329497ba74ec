"""Grid points: runs whose settings are equal except for the seed are one point of a sweep.

The report averages over the runs of one point (mean, spread, n) and W&B groups them by a shared
`job_type`; both ask this module which point a run belongs to, so they always agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

SEED = "seed"
# config.json entries that differ between runs without being a setting of the experiment: the
# data split's fingerprint and row counts (the split is drawn with the seed), W&B placement, the
# output dir, the eval prompts (long lists, not an axis), provenance (commit, versions) and the
# description of a transferred prompt's source (the setting is peft.init_from; softprompt.models.transfer)
PER_RUN_PREFIXES = ("data.", "wandb.", "output_dir", "eval.prompts", "provenance.", "prompt_source.",
                    "pack.", "trunk.")  # how the sweep engine trained a job, not what it trained


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys: {"peft": {"num_virtual_tokens": 8}} -> {"peft.num_virtual_tokens": 8}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_setting(key: str) -> bool:
    """A config key that can be an axis of a sweep (the seed included)."""
    return not key.startswith(PER_RUN_PREFIXES)


def point_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a run's grid point: every setting but the seed (flat keys)."""
    flat = flatten(config) if any(isinstance(v, dict) for v in config.values()) else config
    return {k: v for k, v in sorted(flat.items()) if is_setting(k) and k != SEED}


def point_id(config: dict[str, Any]) -> str:
    """A short stable id of a run's grid point: equal for runs that differ only in seed."""
    text = json.dumps(point_settings(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]
