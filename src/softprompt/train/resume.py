"""Where an attempt of a pack starts: its newest complete checkpoint, or step 0.

A pack (a single run is a pack of one) keeps its checkpoints in its first job's run directory
(`checkpoints/`), with the preemption marker. An attempt continues from the newest complete
checkpoint when `training.resume=true`, or by itself when the first run directory holds a
preemption marker and the command is the same (a requeued SLURM or submitit job reruns the same
command). It needs the same settings in every job (a checkpoint of another config cannot be
continued) and each job's W&B run id, so the resumed attempt logs into the same W&B runs. A fresh
attempt in reused directories starts clean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from softprompt.core.config import resolved
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir
from softprompt.train import checkpoints

# keys that may differ between the attempts of one run
_MAY_CHANGE = {("training", "resume"), ("training", "num_threads"), ("wandb", "mode"), ("training", "device")}
# the checkpoint format this engine writes and reads (trainer_state.json's "format")
FORMAT = "softprompt-pack/1"


@dataclass
class ResumePoint:
    checkpoint: Path | None = None  # None: start from step 0
    wandb_run_ids: list[str | None] = field(default_factory=list)  # per job

    def load(self, device) -> checkpoints.Checkpoint | None:
        return checkpoints.load(self.checkpoint, map_location=device) if self.checkpoint else None


def checkpoint_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def prepare(configs: list[DictConfig], run_dirs: list[Path], log=print) -> ResumePoint:
    """Where this attempt starts; call before the jobs' config.json files are rewritten."""
    first, root = run_dirs[0], checkpoint_dir(run_dirs[0])
    if not configs[0].training.resume:
        preempted = RunDir(first).read_preempted()
        if preempted and checkpoints.latest_checkpoint(root) is not None and not _changed_any(configs, run_dirs):
            log(f"{first} was preempted ({preempted}): resuming it (delete {RunDir(first).preempted} "
                "to start over instead)")
            return _resume_from_latest(configs, run_dirs, log)
        if root.exists():
            checkpoints.clear(root)
        for out in run_dirs:
            RunDir(out).forget_wandb_run_id()
            RunDir(out).forget_preempted()
        return ResumePoint(wandb_run_ids=[None] * len(run_dirs))
    return _resume_from_latest(configs, run_dirs, log)


def _resume_from_latest(configs: list[DictConfig], run_dirs: list[Path], log) -> ResumePoint:
    root = checkpoint_dir(run_dirs[0])
    ids = [RunDir(out).read_wandb_run_id() for out in run_dirs]
    checkpoints.remove_staging(root)
    if (root / "pack").is_dir():
        raise UserError(f"{root / 'pack'} holds checkpoints of an earlier version's pack format, which this version "
                        "cannot continue; start over with training.resume=false")
    latest = checkpoints.latest_checkpoint(root)
    if latest is None:
        log(f"training.resume=true but {root} holds no complete checkpoint; starting from step 0")
        return ResumePoint(wandb_run_ids=ids)
    state = checkpoints.read_state(latest)
    if state.get("format") != FORMAT:
        what = ("the single-run format (global_step/epoch/batches_done)" if "global_step" in state
                else f"format {state.get('format')!r}")
        raise UserError(f"{latest} is a checkpoint in {what}, which this version cannot continue (it reads "
                        f"{FORMAT}); start over with training.resume=false")
    if state["dirs"] != [Path(d).name for d in run_dirs]:
        raise UserError(f"training.resume=true: the pack checkpointed in {root} held the jobs {state['dirs']}, "
                        f"this one holds {[Path(d).name for d in run_dirs]}; rerun the same command, or without "
                        "training.resume to start over")
    for cfg, out in zip(configs, run_dirs):
        changed = _changed(cfg, out)
        if changed:
            raise UserError(
                f"training.resume=true but {', '.join(changed)} differ from the run in {out}; resume with the same "
                "settings, or start a new run (another hydra.run.dir, or training.resume=false)")
    log(f"resuming from {latest} (step {state['step']})")
    return ResumePoint(latest, ids)


def finished(configs: list[DictConfig], run_dirs: list[Path]) -> bool:
    """Every job finished in an earlier attempt, with these settings: nothing left to resume."""
    return all(RunDir(out).finished for out in run_dirs) and not _changed_any(configs, run_dirs)


def _changed_any(configs: list[DictConfig], run_dirs: list[Path]) -> bool:
    return any(_changed(cfg, out) for cfg, out in zip(configs, run_dirs))


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
