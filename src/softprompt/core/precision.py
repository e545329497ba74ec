"""`precision=auto` (training, and the perplexity passes): bf16 autocast where the device has bf16
matrix units, fp32 elsewhere; and `model.dtype=auto`, the frozen base's weights.

Both follow the device the model is on (softprompt.train.placement): a GPU's own bf16 support
(native, not emulated: `torch.cuda.is_bf16_supported()` alone counts emulation), the CPU's flags.
"""

from __future__ import annotations

from pathlib import Path

import torch

from softprompt.core.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16_matmul() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls are several times faster than fp32 on a CPU.

    Without them (e.g. AVX2-only CPUs) oneDNN emulates bf16 and it is slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_has_fp16_matmul() -> bool:
    """AVX512-FP16 or AMX-FP16 (Sapphire Rapids and later): elsewhere a CPU computes fp16 matmuls
    by converting to fp32, slower than fp32 weights and no more exact than bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_fp16" in flags or "amx_fp16" in flags


def native_fp16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` runs fp16 matmuls natively (every CUDA GPU and Apple GPU does)."""
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return True
    return device.type == "cpu" and cpu_has_fp16_matmul()


def check_base_dtype(name: str, device: torch.device | str) -> None:
    """`model.dtype=float16` on a device without fp16 matmuls is a bad input (UserError)."""
    if name == "float16" and not native_fp16(device):
        raise UserError(f"model.dtype=float16 but this {torch.device(device).type.upper()} has no fp16 matrix "
                        "units (AVX512-FP16 or AMX-FP16); use bfloat16 (or float32)")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` has bf16 matrix units (a GPU of compute capability 8 or newer; a CPU with
    AMX or AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_bf16_matmul()
    return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The `torch.autocast` dtype of a precision setting (`auto` resolved for `device`); None: fp32, no autocast."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None


def base_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`model.dtype`: the frozen base's weights. `auto` is bf16 on a GPU with bf16 units and fp32
    on a CPU (bf16 copies of the frozen weights measured no faster than fp32 weights under bf16
    autocast on a Zen 4 with AVX512-BF16: docs/speed.md) and on other devices."""
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    return torch.bfloat16 if device.type == "cuda" and native_bf16(device) else torch.float32


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (the device autocast must follow)."""
    return next(model.parameters()).device
