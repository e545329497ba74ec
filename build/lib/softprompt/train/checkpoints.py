"""Atomic, resumable checkpoints in the Hugging Face `Trainer` format.

HF's own `_save_checkpoint` writes `checkpoint-N/` file by file (`trainer_state.json` last): a
kill during a save leaves a directory that `resume_from_checkpoint` fails on. Here every
checkpoint is written into a staging directory, fsynced, given a `COMPLETE` marker and then
renamed into place, so a `checkpoint-N/` either does not exist or is complete. What it holds is
HF's format (adapter, optimizer, scheduler, RNG states, trainer state), so `Trainer.train(
resume_from_checkpoint=...)` restores all of it, plus `softprompt_state.json` for what the
Trainer does not carry across a resume (the loss of earlier steps, the per-epoch eval history).

Test-only hooks (never set them in real runs): `SOFTPROMPT_TEST_STEP_DELAY` (seconds to sleep
after each optimizer step) and `SOFTPROMPT_TEST_SAVE_DELAY` (seconds to sleep after a checkpoint's
files are written, before it is committed) make kill timing in tests/test_resume.py reliable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

COMPLETE = "COMPLETE"
STATE_FILE = "softprompt_state.json"
KEEP_LAST = 2
_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointsMixin:
    """Mix into a `Trainer` subclass (before `Trainer` in the bases) to make its checkpoints atomic.

    `resume_state` is what an earlier process left in the checkpoint we resume from;
    `extra_state()` returns what to store with each new checkpoint (see `softprompt.train.run`).
    """

    resume_state: dict[str, Any] = {}
    history: list[dict[str, Any]] | None = None
    _staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        # super()._save_checkpoint writes into _get_output_dir(): point it at the staging dir
        return self._staging or super()._get_output_dir(trial)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler and sampler.generator is None:
            sampler.__class__ = EpochSeededLengthGroupedSampler
            sampler.seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return sampler

    def loss_sum(self) -> float:
        """Sum of the per-step training losses of all steps so far, across resumes.

        Reads the Trainer's own accumulators (transformers 5: `_total_loss_scalar` holds the
        logged intervals, `_tr_loss` the steps since the last log), so the final mean equals
        the one an uninterrupted run reports.
        """
        return self.resume_state.get("loss_sum", 0.0) + self._total_loss_scalar + float(self._tr_loss.item())

    def _save_checkpoint(self, model, trial) -> None:
        if not self.args.should_save:
            # multi-process runs: rank 0 alone writes and commits. The one collective in HF's
            # save is store_flos() (an all-gather): the other ranks must join it. Their RNG states
            # are not kept, so a DDP resume reseeds them.
            self.store_flos()
            return
        root = Path(self.args.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        name = f"checkpoint-{self.state.global_step}"
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=root))
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        written = staging / name
        state = {"global_step": self.state.global_step, "loss_sum": self.loss_sum(),
                 "history": list(self.history or [])}
        (written / STATE_FILE).write_text(json.dumps(state))
        _test_save_delay(self.state.global_step)
        (written / COMPLETE).write_text("")
        _fsync_tree(written)
        target = root / name
        if target.exists():  # the same step saved twice (e.g. epoch end == save step): keep one
            shutil.rmtree(target)
        os.replace(written, target)  # the commit: a checkpoint-N/ is always complete
        _fsync_dir(root)
        shutil.rmtree(staging, ignore_errors=True)
        for old in complete_checkpoints(root)[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """HF's length-grouped order, drawn from (seed, epoch) instead of the global RNG.

    With the global RNG the order of the epoch a run resumes in depends on the RNG state at that
    epoch's start, which no checkpoint holds: the resumed run would see other batches. The
    Trainer calls set_epoch() before each epoch (also the one it resumes in).
    """

    seed = 0

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + int(epoch))


def _test_save_delay(step: int) -> None:
    # test-only: SOFTPROMPT_TEST_SAVE_DELAY=SECONDS[@FROM_STEP] opens a window in which the
    # checkpoint's files are written but not committed, for saves at FROM_STEP or later
    spec = os.environ.get("SOFTPROMPT_TEST_SAVE_DELAY")
    if not spec:
        return
    seconds, _, from_step = spec.partition("@")
    if step >= int(from_step or 0):
        time.sleep(float(seconds))


def remove_staging(directory: Path) -> None:
    """Drop what a kill during a save left behind (never a committed checkpoint)."""
    if directory.is_dir():
        for path in directory.glob(".staging-*"):
            shutil.rmtree(path, ignore_errors=True)


def clear(directory: Path) -> None:
    """Remove checkpoints and leftover staging dirs (a fresh run in a reused run dir)."""
    shutil.rmtree(directory, ignore_errors=True)


class SaveSchedule(TrainerCallback):
    """Checkpoint at every epoch end and at the last step, whatever HF's save_strategy says
    (`training.save_steps` adds HF's step-based saves on top)."""

    def __init__(self, every_epoch: bool):
        self.every_epoch = every_epoch
        self.delay = float(os.environ.get("SOFTPROMPT_TEST_STEP_DELAY", "0") or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.delay:
            time.sleep(self.delay)  # test-only: slows a tiny run so a test can kill it on time
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.every_epoch:
            control.should_save = True
        return control
