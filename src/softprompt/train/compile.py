"""`training.torch_compile=true`: the frozen decoder that the training step runs through, compiled
once per pack (torch.compile, dynamic shapes: the length-grouped batches change width every step
and would otherwise recompile).

What is compiled is the decoder under the hidden-state loss (softprompt.models.fast_loss: prompt
tuning and p-tuning, both pack forwards), forward and backward (AOTAutograd). Methods that train
through PEFT's own forward (LoRA, prefix tuning) run eager; the run says so in one line.
Evaluation and generation run eager: they would compile graphs of their own (other shapes, the KV
cache) that one training run cannot repay.

Measured on the 2-core Zen 4 (docs/speed.md): with eager attention in the step, the compiled step
is 7-13 % faster, but compiling SmolLM2's decoder takes 248 s (72 s from inductor's warm on-disk
cache), more than a seed grid's 510 lane-steps win back, so the default is off;
scripts/device_check.sh measures it on a GPU.
"""

from __future__ import annotations

import os
import shutil

import torch

from softprompt.core.errors import UserError

# Test-only hook (never set it in real runs): another torch.compile backend (`aot_eager`: the same
# graphs without inductor's code generation, seconds instead of a minute for a tiny model)
_BACKEND_FOR_TESTS = "SOFTPROMPT_TEST_COMPILE_BACKEND"


def check_compiler(device: torch.device) -> None:
    """Inductor writes C++ for the CPU, and Triton builds a C launcher for a GPU: without a compiler
    the run would fail at its first step, after loading and evaluating the base."""
    if os.environ.get(_BACKEND_FOR_TESTS):
        return
    language, variable, names = ("C++", "CXX", ["g++", "c++", "clang++"]) if device.type == "cpu" \
        else ("C", "CC", ["cc", "gcc", "clang"])
    names = [os.environ[variable]] if os.environ.get(variable) else names
    if not any(shutil.which(name) for name in names):
        raise UserError(f"training.torch_compile=true on {device.type} needs a {language} compiler and none was "
                        f"found ({', '.join(names)}); install one (e.g. gcc) or set training.torch_compile=false")


def compiled_decoder(base: torch.nn.Module) -> torch.nn.Module:
    """The base's decoder (its layers without the lm_head), compiled; its parameters are the base's."""
    return torch.compile(base.base_model, dynamic=True, backend=os.environ.get(_BACKEND_FOR_TESTS) or "inductor")
