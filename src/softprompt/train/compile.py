"""`training.torch_compile`: the decoder layers that the training step runs through, and the loss's
head, compiled once per pack (torch.compile, dynamic shapes: the length-grouped batches change
width every step and would otherwise recompile).

What is compiled is each decoder layer under the hidden-state loss (softprompt.models.fast_loss:
prompt tuning and p-tuning, both pack forwards), forward and backward (AOTAutograd), the layers
sharing one graph; and that loss's head (lm_head, fp32 softmax, cross-entropy). Methods that train through PEFT's own forward (LoRA, prefix tuning) run eager; the
run says so in one line. Evaluation and generation run eager: they would compile graphs of their
own (other shapes, the KV cache) that one training run cannot repay.

Measured on the 2-core Zen 4 (docs/speed.md): compiling the layers and the head takes 27-40 s cold
(the whole decoder as one graph took 248 s), and the compiled step is 12-18 % faster than the eager
one, so a pack of a few hundred lane-steps repays it and a single short run does not: `auto` compiles CPU
packs of at least AUTO_MIN_LANE_STEPS lane-steps. On GPUs it is not measured yet
(scripts/device_check.sh times it), so `auto` leaves it off there.
"""

from __future__ import annotations

import os
import shutil

import torch

from softprompt.core.errors import UserError

# Test-only hook (never set it in real runs): another torch.compile backend (`aot_eager`: the same
# graphs without inductor's code generation, seconds instead of a minute for a tiny model)
_BACKEND_FOR_TESTS = "SOFTPROMPT_TEST_COMPILE_BACKEND"


# `auto` compiles a CPU pack of at least this many lane-steps (a trunk's step counts once). Measured
# on the 2-core Zen 4 (docs/speed.md): compiling SmolLM2's layers and the loss's head costs 27-40 s
# cold (8-16 s from inductor's warm on-disk cache) and saves 0.23-0.38 s a lane-step, so it pays
# from ~50-170 lane-steps; auto asks for the worst case. A 6-epoch run on the prompts CSV is 102
# steps (not compiled), the seed grid 510 (compiled).
AUTO_MIN_LANE_STEPS = 200


def _compilers(device: torch.device) -> tuple[str, list[str]]:
    """Inductor writes C++ for the CPU, and Triton builds a C launcher for a GPU."""
    language, variable, names = ("C++", "CXX", ["g++", "c++", "clang++"]) if device.type == "cpu" \
        else ("C", "CC", ["cc", "gcc", "clang"])
    return language, [os.environ[variable]] if os.environ.get(variable) else names


def _backend() -> str:
    return os.environ.get(_BACKEND_FOR_TESTS) or "inductor"


def has_compiler(device: torch.device) -> bool:
    """A compiler for `device` on the PATH (or in CXX / CC); the test backend needs none."""
    return bool(os.environ.get(_BACKEND_FOR_TESTS)) or any(shutil.which(n) for n in _compilers(device)[1])


def plain_step(cfg, model: torch.nn.Module, fsdp: bool) -> bool:
    """Whether the step runs the base as measured for `auto`: no gradient checkpointing, FSDP,
    device map (accelerate's hooks) or quantized layers."""
    return not (cfg.training.gradient_checkpointing or fsdp or cfg.model.get("quantization")
                or getattr(model, "hf_device_map", None))


def resolve_torch_compile(setting: bool | str, device: torch.device, lane_steps: int, plain: bool) -> tuple[bool, str]:
    """training.torch_compile resolved for a pack, and why (for the log): true and false as set;
    `auto` compiles on a CPU with a C++ compiler, for at least AUTO_MIN_LANE_STEPS lane-steps, where
    the step is plain (`plain`: no gradient checkpointing, FSDP, device map or quantization, which
    were not measured compiled). On GPUs auto stays off: not measured there yet
    (scripts/device_check.sh times it)."""
    if setting != "auto":
        return bool(setting), f"training.torch_compile={str(bool(setting)).lower()}"
    if device.type != "cpu":
        return False, f"auto: not measured on {device.type}"
    if not plain:
        return False, "auto: gradient checkpointing, FSDP, a device map or quantization"
    if lane_steps < AUTO_MIN_LANE_STEPS:
        return False, f"auto: {lane_steps} lane-steps, fewer than the {AUTO_MIN_LANE_STEPS} that repay compiling"
    if not has_compiler(device):
        return False, "auto: no C++ compiler found"
    return True, f"auto: {lane_steps} lane-steps on the CPU repay compiling"


def check_compiler(device: torch.device) -> None:
    """Without a compiler a compiled run would fail at its first step, after loading and
    evaluating the base."""
    language, names = _compilers(device)
    if not has_compiler(device):
        raise UserError(f"training.torch_compile=true on {device.type} needs a {language} compiler and none was "
                        f"found ({', '.join(names)}); install one (e.g. gcc) or set training.torch_compile=false")


class LayerCompiledDecoder(torch.nn.Module):
    """The base's decoder with each decoder layer compiled (`torch.compile(layer)`, dynamic shapes),
    in place only for the duration of its own call.

    Every layer runs the same code on parameters of the same shapes, and Dynamo treats a layer's
    parameters as inputs of the graph, so the 30 layers of SmolLM2 share one compiled graph: the
    compile costs what one layer costs, not what the whole decoder does (measured below). The
    decoder's own code (embeddings, masks, rotary tables, final norm) stays eager. The layers are
    swapped back after each call, so evaluation and generation, which call the decoder directly,
    never meet a compiled layer. `inner`: what is called with the layers swapped in (the cast-free
    decoder, softprompt.models.cast_free), else the decoder itself."""

    def __init__(self, decoder: torch.nn.Module, layers: torch.nn.ModuleList, inner: torch.nn.Module | None = None):
        super().__init__()
        self.inner = inner if inner is not None else decoder
        self._layers = layers
        backend = _backend()
        # a plain list, not a ModuleList: the wrappers hold the layers' own parameters, no new ones
        self._compiled = [torch.compile(layer, dynamic=True, backend=backend) for layer in layers]

    def forward(self, **kwargs):
        originals = list(self._layers)
        for i, compiled in enumerate(self._compiled):
            self._layers[i] = compiled
        try:
            return self.inner(**kwargs)
        finally:
            for i, layer in enumerate(originals):
                self._layers[i] = layer


def compiled_nll_sum():
    """The loss's head (softprompt.models.fast_loss.nll_sum: the lm_head, the fp32 cast and the
    cross-entropy) compiled, with a dynamic number of positions. Eager, the softmax over SmolLM2's
    49k vocabulary reads and writes `[positions, 49152]` fp32 tensors several times (the cast, the
    log-softmax, a zero-filled gradient and its backward); inductor fuses them into two passes. On
    the 2-core Zen 4, for 700 positions: 0.25 s forward and backward against 0.46 s eager."""
    from softprompt.models.fast_loss import nll_sum

    return torch.compile(nll_sum, dynamic=True, backend=_backend())


def compiled_decoder(base: torch.nn.Module, inner: torch.nn.Module | None = None) -> LayerCompiledDecoder:
    """The base's decoder (its layers without the lm_head) with its layers compiled; its parameters
    are the base's. `inner`: the cast-free decoder to call (softprompt.models.cast_free), if any."""
    from softprompt.models.loading import decoder_layers

    return LayerCompiledDecoder(base.base_model, decoder_layers(base), inner)
