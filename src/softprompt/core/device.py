"""`training.device` / `--device`: the one device a run, generation or the demo works on.

`auto` is accelerate's choice for one process: the GPU (CUDA) where there is one, else Apple's MPS,
else the CPU. A device the machine does not have is a bad input: one `error:` line, exit 2,
before any model loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from softprompt.core.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def check_device(name: str) -> None:
    """`name` is a device this machine has."""
    if name not in DEVICES:
        raise UserError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    if name in ("auto", "cpu"):
        return
    import torch  # here, not at the top: the config checks that import this module run before torch
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"training.device=cuda but this machine has no CUDA device (torch {torch.__version__}); "
                        "use auto or cpu")
    if name == "mps" and not _mps():
        raise UserError("training.device=mps but this machine has no MPS device; use auto or cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """The device `name` means on this machine (one process; softprompt.train.placement adds the
    rank's GPU under torchrun)."""
    import torch

    check_device(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps() else torch.device("cpu")
    return torch.device(name)
