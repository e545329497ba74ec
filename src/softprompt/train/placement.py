"""Where the engine runs: one device for the model, the batches, evaluation and generation, and
which rank of how many processes this is.

`Placement.of(cfg)` resolves `training.device` once (`auto`: accelerate's choice, the local GPU
under `torchrun`, else MPS, else the CPU) and starts the process group when `torchrun` or
`accelerate launch` started several processes (gloo on the CPU, nccl on GPUs). Everything the
engine builds or moves goes to `placement.device`; nothing later asks `torch.cuda.is_available()`.

Large bases (docs/large-models.md): a base the loader placed (`model.device_map`, or quantized by
`model.quantization`) stays where it is, and its input embeddings must be on `placement.device`;
with `training.fsdp` under `torchrun` each decoder layer is sharded over the ranks
(softprompt.train.sharding), and then every rank runs the evaluation and generation forwards
(`evaluates`), rank 0 alone writing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.core import distributed
from softprompt.core.device import check_device, resolve_device
from softprompt.core.errors import UserError
from softprompt.models.loading import input_device, loader_placed


@dataclass(frozen=True)
class Placement:
    device: torch.device
    rank: int = 0
    world: int = 1
    # training.gradient_checkpointing: the base's decoder layers recompute their activations in
    # the backward pass
    checkpointing: bool = False
    # training.fsdp under torchrun: the base's decoder layers sharded over the ranks
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def evaluates(self) -> bool:
        """Whether this rank runs the evaluation and generation forwards: rank 0 alone, except under
        FSDP, where a sharded layer's forward needs every rank (rank 0 still writes alone)."""
        return self.main or self.fsdp

    @classmethod
    def of(cls, cfg) -> "Placement":
        name, checkpointing = cfg.training.device, bool(cfg.training.get("gradient_checkpointing"))
        check_device(name)
        if distributed.world_size() == 1:
            return cls(resolve_device(name), checkpointing=checkpointing)
        from accelerate import PartialState

        # cpu=True where the run is on the CPU: without it accelerate ignores torchrun's WORLD_SIZE
        # on a machine without a GPU and every rank trains alone as "rank 0" (measured, 1.15)
        state = PartialState(cpu=name == "cpu" or (name == "auto" and not torch.cuda.is_available()))
        device = state.device if name == "auto" else torch.device(name, state.local_process_index) \
            if name == "cuda" else torch.device(name)
        return cls(device, state.process_index, state.num_processes, checkpointing,
                   fsdp=bool(cfg.training.get("fsdp")))

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """The frozen base on the engine's device (its dtype is the loader's: model.dtype), with
        activation checkpointing when asked. Checkpointing acts in train mode only (transformers'
        layers check `self.training`), so evaluation and generation run as without it. Non-reentrant:
        the base's own inputs do not require grad, only the prompt does. A base its loader placed
        (model.device_map, model.quantization) stays where it is; under FSDP each decoder layer is
        then sharded over the ranks (softprompt.train.sharding)."""
        if self.checkpointing:
            enable_checkpointing(module)
        if loader_placed(module):  # dispatched or quantized: moving it would undo the loader's placement
            self._check_inputs_land_here(module)
            return module
        module.to(self.device)
        if self.fsdp:
            from softprompt.train.sharding import shard_decoder_layers

            shard_decoder_layers(module, self.device, self.world)
        return module

    def _check_inputs_land_here(self, module: torch.nn.Module) -> None:
        """Batches, evaluation and generation inputs go to `self.device`: the input embeddings of a
        base the loader placed must be there."""
        where = input_device(module)
        if where.type != self.device.type or _index(where) != _index(self.device):
            raise UserError(f"model.device_map put the base's input embeddings on {where}, but this run works on "
                            f"{self.device}; set training.device to where the first layers go, or give that "
                            "device more free memory")

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


def enable_checkpointing(module: torch.nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant. 5.25 renamed the method
    (`gradient_checkpointing_enable` now warns); the floor, 5.24, may have only the old name."""
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _index(device: torch.device) -> int | None:
    """A CUDA device's index (`cuda` alone is the current one); None elsewhere."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()
