"""Atomic, resumable checkpoints of the training engine (softprompt.train.pack).

A checkpoint is written into a staging directory, fsynced, given a `COMPLETE` marker and then
renamed into place, so a `checkpoint-N/` either does not exist or is complete: a kill during a
save leaves a `.staging-*` directory that the next attempt removes, never a half checkpoint.
The last `KEEP_LAST` are kept. What one holds is everything the loop needs to continue exactly:

- `trainer_state.json`: the step, and per lane and per job what the engine needs (format
  `softprompt-pack/1`: softprompt.train.pack writes and reads it);
- `prompts.pt`: each lane's (and each trained-but-unwritten job's) trainable parameters (by name);
- `optimizer.pt`: each lane's optimizer state (AdamW moments);
- `rng_state.pt`: the Python, NumPy and torch RNG states, and the current CUDA device's (rank 0's:
  a DDP resume reseeds the others; one device's state, so a resume on another device count works).

The learning rate needs nothing: a schedule is a function of the step (softprompt.train.schedules),
and the order of the batches is a function of (seed, epoch) (softprompt.train.batches).

Test-only hooks (never set them in real runs): `SOFTPROMPT_TEST_STEP_DELAY` (seconds to sleep
after each optimizer step) and `SOFTPROMPT_TEST_SAVE_DELAY` (seconds to sleep after a checkpoint's
files are written, before it is committed) make kill timing in tests/test_resume.py reliable.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softprompt.core import atomic
from softprompt.core.errors import disk_full, is_disk_full

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
PROMPTS_FILE = "prompts.pt"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
KEEP_LAST = 2
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Checkpoint:
    state: dict[str, Any]  # trainer_state.json
    prompts: list[dict[str, torch.Tensor]]  # per job: parameter name -> tensor
    optimizers: list[dict[str, Any]]  # per job: optimizer.state_dict()


def complete_checkpoints(directory: Path) -> list[Path]:
    """Committed checkpoints, oldest first (staging dirs and anything without the marker are ignored)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.match(p.name)) and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def read_state(checkpoint: Path | None) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    return json.loads((checkpoint / STATE_FILE).read_text())


def save(root: Path, step: int, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint-{step}` under `root` atomically; keep the newest KEEP_LAST."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=root))
    written = staging / name
    try:
        written.mkdir()
        (written / STATE_FILE).write_text(json.dumps(checkpoint.state))
        torch.save(checkpoint.optimizers, written / OPTIMIZER_FILE)
        torch.save(checkpoint.prompts, written / PROMPTS_FILE)
        torch.save(_rng_states(), written / RNG_FILE)
        _test_save_delay(step)
        (written / COMPLETE).write_text("")
        _fsync_tree(written)
    except OSError as exc:
        # a full disk: the half-written staging dir goes (it holds space), the older checkpoints
        # stay, and the run ends with one error line that says what the checkpoint needed
        shutil.rmtree(staging, ignore_errors=True)
        if not is_disk_full(exc):
            raise
        raise disk_full(name, root, _size_of(checkpoint),
                        "free some space and rerun the same command with training.resume=true "
                        "(it continues from the newest complete checkpoint)") from exc
    target = root / name
    if target.exists():  # the same step saved twice (a rerun of a finished step): keep one
        shutil.rmtree(target)
    os.replace(written, target)  # the commit: a checkpoint-N/ is always complete
    atomic.fsync_path(root)
    shutil.rmtree(staging, ignore_errors=True)
    for old in complete_checkpoints(root)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _size_of(checkpoint: Checkpoint) -> int:
    """Bytes the checkpoint's files take, serialized in memory (only after a failed write)."""
    total = len(json.dumps(checkpoint.state).encode())
    for obj in (checkpoint.optimizers, checkpoint.prompts, _rng_states()):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        total += buffer.tell()
    return total


def load(checkpoint: Path, map_location: torch.device | str | None = "cpu") -> Checkpoint:
    """Read a committed checkpoint onto `map_location` (the engine's device, whatever device saved
    it) and restore the RNG states it holds."""
    # weights_only: a checkpoint is data, never code to run (tensors, numbers, strings only)
    _set_rng_states(torch.load(checkpoint / RNG_FILE, weights_only=True, map_location="cpu"))
    return Checkpoint(state=read_state(checkpoint),
                      prompts=torch.load(checkpoint / PROMPTS_FILE, weights_only=True, map_location=map_location),
                      optimizers=torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True,
                                            map_location=map_location))


def _rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    atomic.fsync_path(root)


def remove_staging(directory: Path) -> None:
    """Drop what a kill during a save left behind (never a committed checkpoint)."""
    if directory.is_dir():
        for path in directory.glob(".staging-*"):
            shutil.rmtree(path, ignore_errors=True)


def clear(directory: Path) -> None:
    """Remove checkpoints and leftover staging dirs (a fresh run in a reused run dir)."""
    shutil.rmtree(directory, ignore_errors=True)


# --- test-only hooks -----------------------------------------------------------------------------


def step_delay_for_tests() -> float:
    """SOFTPROMPT_TEST_STEP_DELAY=SECONDS: sleep after every optimizer step (slows a tiny run so
    a test can kill it on time)."""
    return float(os.environ.get("SOFTPROMPT_TEST_STEP_DELAY", "0") or 0)


def _test_save_delay(step: int) -> None:
    # SOFTPROMPT_TEST_SAVE_DELAY=SECONDS[@FROM_STEP] opens a window in which the checkpoint's
    # files are written but not committed, for saves at FROM_STEP or later
    spec = os.environ.get("SOFTPROMPT_TEST_SAVE_DELAY")
    if not spec:
        return
    seconds, _, from_step = spec.partition("@")
    if step >= int(from_step or 0):
        time.sleep(float(seconds))
