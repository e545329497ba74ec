"""`training.fsdp`: the frozen base's decoder layers sharded over the ranks of a `torchrun` run.

Each decoder layer is one FSDP2 unit (`torch.distributed.fsdp.fully_shard`, a 1-D mesh over the
ranks of the process group that softprompt.train.placement started: gloo on the CPU, nccl on
GPUs): a rank keeps 1/world of each layer's weights and gathers a layer's full weights only for
its forward (and again for the backward, which carries the prompt's gradient through it).

What stays whole on every rank, on purpose:
- the input embeddings, the final norm and the lm_head: a sharded module's weights exist only
  inside that module's own forward, and the engine uses them outside it (the fast loss embeds the
  ids and applies the lm_head itself; greedy decoding reads the lm_head's weight; the soft prompt's
  text init and nearest tokens read the embedding matrix). They are a small part of a large base;
- the soft prompt and its optimizer: trainable, replicated as under DDP; softprompt.train.step
  averages its gradient over the ranks.

The base is frozen, so FSDP has no gradient of its own to reduce. Every forward through a sharded
layer is a collective: every rank must run the same forwards in the same order (the engine lets
every rank evaluate and generate under FSDP: `Placement.evaluates`).
"""

from __future__ import annotations

import torch

from softprompt.models.loading import decoder_layers


def shard_decoder_layers(model: torch.nn.Module, device: torch.device, world: int) -> int:
    """Shard each decoder layer of `model` (already on `device`) over `world` ranks; returns the
    number of layers sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    layers = decoder_layers(model)
    for layer in layers:
        # True, not FSDP's default: each layer is a root of its own (the model above it is not
        # sharded), and FSDP keeps a root's weights gathered after its forward by default; the
        # whole base would then stay gathered through evaluation (and the ranks' states could part)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    for layer in layers:
        # FSDP allocates a layer's gathered weights at its first gather and reuses them after; the
        # first gather would otherwise come inside generation's torch.inference_mode (the base's
        # evaluation), and the next training forward could not write into inference tensors
        # (measured: torch 2.13, "Inplace update to inference tensor outside InferenceMode")
        layer.unshard()
        layer.reshard()
    return len(layers)


def sharded_layers(model: torch.nn.Module) -> int:
    """How many of `model`'s modules are FSDP units (the run's log says it)."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in model.modules())
