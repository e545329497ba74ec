"""One prompt-tuning run: a pack of one job on the engine (softprompt.train.pack).

`run(cfg)` is a plain function (the Hydra entrypoint is a thin wrapper around it), so tests and
sweeps call it directly. The engine does the rest, as for every pack: checks, data, model, the
base model's evaluation, training with checkpoints, preemption and resume, the tuned model's
evaluation and the run directory, `metrics.json` last and atomically (its presence means the run
finished). A run whose loss became NaN/inf leaves `failed.json` and raises `UserError` (one
`error:` line, exit status 2).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from softprompt.core import distributed
from softprompt.core.errors import UserError


def run_directory(cfg: DictConfig, run_dir: str | Path | None) -> Path:
    if run_dir is None and cfg.get("output_dir"):
        run_dir = cfg.output_dir
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate one job in `run_dir` (default: Hydra's output dir); returns metrics.json's
    content ({} on ranks other than 0, which write nothing)."""
    started = time.time()  # train/time_to_first_step_s counts from here (the process start: *_process_s)
    from softprompt.models.methods import get as get_method
    from softprompt.track.wandb_run import run_name
    from softprompt.train import preflight
    from softprompt.train.pack import run_pack

    preflight.check(cfg)  # every check a user can fail comes before any model is loaded
    if run_dir is None:
        distributed.check_run_dir_is_shared()
    out = run_directory(cfg, run_dir)
    name = run_name(cfg, get_method(cfg.peft.method).tag(cfg.peft))
    (job,) = run_pack([cfg], [out], [[0]], names=[name], run_start=started)
    if job.state == "failed":
        raise UserError(job.error or "the run failed")
    return job.metrics
