"""The frozen decoder's linear weights cast once, not at every training step.

Under bf16 autocast an fp32 linear weight is cast to bf16 at every forward: autocast caches its
casts only for tensors that require a gradient, and a frozen base's weights do not. For SmolLM2
that is ~106M parameters read in fp32 and written in bf16 at each step of each lane. The cast gives
the same bf16 tensor every time, so the training step keeps one copy per weight and runs the
decoder with it (`torch.func.functional_call`: the module's own forward, with the copies in place
of its weights for that call only). Autocast then has nothing to cast and the numbers are the same
bit for bit (tests/test_cast_free.py). The price is the copies' memory: half the fp32 size of the
decoder's linear weights. Evaluation and generation keep running on the fp32 weights.
"""

from __future__ import annotations

import torch
from torch.func import functional_call


class CastFreeDecoder(torch.nn.Module):
    """`decoder` (the base's layers without the lm_head) called with its plain `nn.Linear` weights
    in `dtype`, cast once here. Used in place of the decoder by the hidden-state loss
    (softprompt.models.fast_loss), where autocast would cast to `dtype` anyway."""

    def __init__(self, decoder: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.decoder = decoder
        # a plain dict, not buffers: the copies are not part of any state dict or checkpoint
        castables = [(name, module) for name, module in decoder.named_modules() if castable(module, dtype)]
        self.copies = {f"{name}.weight": module.weight.detach().to(dtype) for name, module in castables}
        self._copy_of = {id(module.weight): self.copies[f"{name}.weight"] for name, module in castables}

    def forward(self, **kwargs):
        # the names are read at each call: a compiled layer (softprompt.train.compile) may stand in
        # for its layer during the call, and its wrapper adds a level (`_orig_mod`) to the names
        copies = {name: self._copy_of[id(p)] for name, p in self.decoder.named_parameters() if id(p) in self._copy_of}
        return functional_call(self.decoder, copies, args=(), kwargs=kwargs, strict=False)


def castable(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """A plain linear layer (not a quantized subclass) whose frozen weight autocast would cast."""
    weight = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and weight is not None and not weight.requires_grad
            and weight.dtype == torch.float32 and dtype != torch.float32 and weight.device.type != "meta")


def cast_free_decoder(base: torch.nn.Module, autocast: torch.dtype | None, *, checkpointing: bool = False,
                      sharded: bool = False) -> CastFreeDecoder | None:
    """The base's decoder with its linear weights in the `autocast` dtype, or None: without
    autocast, where no weight would be cast, where accelerate places the weights at each forward
    (a device map), under gradient checkpointing (its recomputation in the backward runs outside
    the call, on the module's own weights) and under FSDP (the weights are shards)."""
    if autocast is None or checkpointing or sharded or getattr(base, "hf_device_map", None):
        return None
    dtype = autocast
    decoder = base.base_model
    if not any(castable(module, dtype) for module in decoder.modules()):
        return None
    return CastFreeDecoder(decoder, dtype)
