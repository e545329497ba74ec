"""Where the engine runs: one device for the model, the batches, evaluation and generation, and
which rank of how many processes this is.

`Placement.of(cfg)` resolves `training.device` once (`auto`: accelerate's choice, the local GPU
under `torchrun`, else MPS, else the CPU) and starts the process group when `torchrun` or
`accelerate launch` started several processes (gloo on the CPU, nccl on GPUs). Everything the
engine builds or moves goes to `placement.device`; nothing later asks `torch.cuda.is_available()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.core import distributed
from softprompt.core.device import check_device, resolve_device


@dataclass(frozen=True)
class Placement:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, cfg) -> "Placement":
        name = cfg.training.device
        check_device(name)
        if distributed.world_size() == 1:
            return cls(resolve_device(name))
        from accelerate import PartialState

        # cpu=True where the run is on the CPU: without it accelerate ignores torchrun's WORLD_SIZE
        # on a machine without a GPU and every rank trains alone as "rank 0" (measured, 1.15)
        state = PartialState(cpu=name == "cpu" or (name == "auto" and not torch.cuda.is_available()))
        device = state.device if name == "auto" else torch.device(name, state.local_process_index) \
            if name == "cuda" else torch.device(name)
        return cls(device, state.process_index, state.num_processes)

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """The frozen base on the engine's device (its dtype is the loader's: model.dtype)."""
        return module.to(self.device)

    def any_of(self, flags: list[bool]) -> list[bool]:
        """Each flag set on any rank (W&B's stop requests reach rank 0 only)."""
        if self.world == 1 or not flags:
            return flags
        import torch.distributed as dist

        mask = torch.tensor([int(f) for f in flags], dtype=torch.long, device=self.device)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX)
        return [bool(v) for v in mask.tolist()]

    def any_rank(self, signum: int | None) -> int | None:
        """A preemption signal seen by any rank, so that every rank stops after the same step."""
        if self.world == 1:
            return signum
        import torch.distributed as dist

        flag = torch.tensor([signum or 0], dtype=torch.long, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
