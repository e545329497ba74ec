"""`model.quantization`: the frozen base's linear layers in 8 or 4 bits through bitsandbytes.

Only the frozen base is quantized; the soft prompt (or LoRA's adapter) and its optimizer stay
fp32. The weights are quantized while `from_pretrained` loads them, so the base never exists in
full precision on the accelerator. That needs weights in files: the `pretrained` and
`gguf_package` sources, and `tiny` (its weights are saved in the cache). A `shape` base is built
in memory and is refused before anything loads (softprompt.train.preflight.check_scaling).

4 bits: NF4 (the QLoRA data type: normal-distributed weights), computing in the base's dtype
(`model.dtype` resolved for the device: fp32 on a CPU, bf16 on a GPU with bf16 units).
bitsandbytes is the `quantization` extra; no torch import here at module level.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from softprompt.core.errors import UserError, import_extra

if TYPE_CHECKING:
    import torch

EXTRA = "quantization"  # pyproject.toml's extra that installs bitsandbytes


def missing_package(name: str) -> str | None:
    """The `error:` message for `model.quantization=name` when bitsandbytes is not installed
    (None: it is). Found by its spec, without importing it (no torch import either)."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        return None
    return (f"model.quantization={name} needs bitsandbytes, which is not installed; run "
            f"pip install 'softprompt[{EXTRA}]', or set model.quantization=null")


SHAPE_NOT_QUANTIZED = ("model.quantization={quantization} quantizes weights as they load from files, but "
                       "model.source=shape builds its random weights in memory; use a loaded base (a "
                       "checkpoint, model=smollm2-135m or model=tiny-llama) or model.quantization=null")


def quantization_config(name: str | None, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for `model.quantization` (None: no quantization)."""
    if name is None:
        return None
    missing = missing_package(name)
    if missing:
        raise UserError(missing)
    # imported here so that its load-time messages pass softprompt.core.quiet's filter, and so that a
    # broken install fails with its own traceback rather than deep inside from_pretrained
    import_extra("bitsandbytes", EXTRA, f"model.quantization={name} needs it")
    from transformers import BitsAndBytesConfig

    if name == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    raise UserError(f"model.quantization={name!r} is not one of 8bit, 4bit (or null)")


def keep_gradients_exact(model) -> None:
    """Keep every 4-bit layer on the path whose backward is exact.

    bitsandbytes >= 0.49 on a CPU with AVX512-BF16 repacks a 4-bit layer's weights for a faster
    inference kernel the first time the layer runs in eval mode without grad (the base model's
    evaluation, before training), for good; that kernel has no backward, so the prompt's gradient
    through every repacked layer is wrong afterwards (measured, bitsandbytes 0.50.2 on a Zen 4:
    relative error 1.0 against the same layers dequantized; with the repacking off it is 0, and the
    loss equals the dequantized model's). No effect on GPUs or older versions.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model) -> bool:
    """Whether `model` was loaded with a quantization config (its weights cannot be moved or cast)."""
    return getattr(getattr(model, "config", None), "quantization_config", None) is not None
