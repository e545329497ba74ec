"""`training.resume=true`: continue a killed run in the same run directory.

What a resumed run needs from the earlier attempt: its newest complete checkpoint, the same
settings (a checkpoint of another config cannot be continued) and its W&B run id, so the
resumed attempt logs into the same W&B run. A fresh run in a reused directory starts clean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from softprompt.core.config import resolved
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir
from softprompt.train import checkpoints

# keys that may differ between the attempts of one run
_MAY_CHANGE = {("training", "resume"), ("training", "num_threads"), ("wandb", "mode")}


@dataclass
class ResumePoint:
    checkpoint: Path | None = None  # None: start from step 0
    state: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: str | None = None

    @property
    def step(self) -> int:
        return int(self.state.get("global_step", 0))


def checkpoint_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def prepare(cfg: DictConfig, run_dir: Path) -> ResumePoint:
    """Where this attempt starts; call before the run dir's config.json is rewritten."""
    ckpt_dir = checkpoint_dir(run_dir)
    if not cfg.training.resume:
        # a preempted run rerun as it was started (a requeued SLURM job reruns the same command)
        # continues by itself; with other settings it is a new run in the same directory
        preempted = RunDir(run_dir).read_preempted()
        if preempted and checkpoints.latest_checkpoint(ckpt_dir) is not None and not _changed(cfg, run_dir):
            print(f"{run_dir} was preempted ({preempted}): resuming it (delete {RunDir(run_dir).preempted} "
                  "to start over instead)", flush=True)
            return _resume_from_latest(cfg, run_dir)
        if ckpt_dir.exists():
            checkpoints.clear(ckpt_dir)
        RunDir(run_dir).forget_wandb_run_id()
        RunDir(run_dir).forget_preempted()
        return ResumePoint()
    return _resume_from_latest(cfg, run_dir)


def _resume_from_latest(cfg: DictConfig, run_dir: Path) -> ResumePoint:
    ckpt_dir = checkpoint_dir(run_dir)
    checkpoints.remove_staging(ckpt_dir)
    latest = checkpoints.latest_checkpoint(ckpt_dir)
    if latest is None:
        print(f"training.resume=true but {ckpt_dir} holds no complete checkpoint; starting from step 0", flush=True)
        return ResumePoint(wandb_run_id=RunDir(run_dir).read_wandb_run_id())
    _check_same_config(cfg, run_dir)
    point = ResumePoint(latest, checkpoints.read_state(latest), RunDir(run_dir).read_wandb_run_id())
    print(f"resuming from {latest} (step {point.step})", flush=True)
    return point


def remember_wandb_id(run_dir: Path, run_id: str | None) -> None:
    if run_id:
        RunDir(run_dir).write_wandb_run_id(run_id)


def _check_same_config(cfg: DictConfig, run_dir: Path) -> None:
    changed = _changed(cfg, run_dir)
    if changed:
        raise UserError(
            f"training.resume=true but {', '.join(changed)} differ from the run in {run_dir}; "
            "resume with the same settings, or start a new run (another hydra.run.dir, or training.resume=false)"
        )


def _changed(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The settings that differ from the earlier attempt's config.json (none when it has none)."""
    before = RunDir(run_dir).read_config()
    if before is None:
        return []
    now = resolved(cfg)
    changed = sorted(f"{section}.{key}" for section, values in now.items() if isinstance(values, dict)
                     for key, value in values.items()
                     if (section, key) not in _MAY_CHANGE and before.get(section, {}).get(key) != value)
    changed += [k for k, v in now.items() if not isinstance(v, dict) and before.get(k) != v]
    return changed
