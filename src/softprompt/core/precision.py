"""`precision=auto` (training, and the perplexity passes): bf16 autocast where the hardware has bf16
matrix units, fp32 elsewhere."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_bf16_matmul() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls are several times faster than fp32 on a CPU.

    Without them (e.g. AVX2-only CPUs) oneDNN emulates bf16 and it is slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16_matmul() else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The `torch.autocast` dtype of a precision setting (`auto` resolved here); None: fp32, no autocast."""
    return torch.bfloat16 if resolve_precision(precision) == "bf16" else None
