"""Several processes, one run: `torchrun` / `accelerate launch` start N copies of train.py.

The Trainer does the data-parallel training (DDP; gloo on CPU, nccl on GPUs). Everything else a
run does happens once, on rank 0: the W&B run, the base and tuned evaluation (on the unwrapped
model, so no collective is involved and no rank can wait on another), and every file in the run
directory. The other ranks train and return.

The launchers set RANK / WORLD_SIZE / LOCAL_RANK in the environment before Python starts, so these
helpers need no initialised process group.
"""

from __future__ import annotations

import os

import torch

from softprompt.core.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def sum_over_ranks(value: int) -> int:
    """Sum of an integer over all ranks (every rank must call this at the same point)."""
    if world_size() == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def check_run_dir_is_shared() -> None:
    """Each process composes its own Hydra config; the default run dir holds the current time, so
    two ranks could land in different directories a second apart. Demand an explicit one."""
    if world_size() == 1:
        return
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    overrides = HydraConfig.get().overrides
    given = list(overrides.hydra) + list(overrides.task)
    if not any(o.lstrip("+").startswith(("hydra.run.dir=", "output_dir=")) for o in given):
        raise UserError(f"this is a {world_size()}-process run: give every process the same run directory with "
                        "hydra.run.dir=DIR (e.g. hydra.run.dir=outputs/ddp-$(date +%Y%m%d-%H%M%S))")
