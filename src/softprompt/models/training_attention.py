"""`training.attention`: which attention the training step's forward and backward run through.

Evaluation and generation always use the model's own attention (`model.attn_implementation`: SDPA
for Llama); only the training step can differ:

- `model`: the model's own, forward and backward.
- `eager`: transformers' eager attention (matmuls, the softmax in fp32, the probabilities kept for
  the backward). On a CPU this is what pays: PyTorch's SDPA picks its flash kernel for bf16, whose
  backward recomputes the attention block by block and took 11.9 ms a layer of SmolLM2 against
  2.7 ms for its forward on the 2-core Zen 4, where eager's forward and backward together are a
  few ms (docs/speed.md has the step times). At training lengths (a few hundred positions) the kept
  probabilities are small; on a GPU flash attention is the fast one, so `auto` leaves it there.
- `math_backward`: SDPA's forward call as it is (the same kernel, so the same outputs) and the math
  kernel's recomputation differentiated instead of the forward kernel's own backward: exact bf16
  attention gradients (softmax in fp32), for whoever wants them.
- `auto`: `eager` on a CPU, `model` elsewhere.

Architectures with their own attention (Bloom's baddbmm) are unaffected by all three: they neither
call SDPA nor take an attention implementation at run time.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


class _SameForwardMathBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, options):
        ctx.save_for_backward(q, k, v, mask)
        ctx.options = options
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask = ctx.saved_tensors
        q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        inputs = [t for t in (q, k, v) if t.requires_grad]
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **ctx.options)
        grads = iter(torch.autograd.grad(out, inputs, grad))
        return (*(next(grads) if t.requires_grad else None for t in (q, k, v)), None, None)


def sdpa_with_math_backward(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False):
    """`F.scaled_dot_product_attention` with the math kernel's backward (no dropout: a frozen base
    trains without it; with dropout the call goes to SDPA as it is)."""
    if dropout_p or not any(t.requires_grad for t in (query, key, value)):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # autocast casts SDPA's inputs; the backward runs outside it
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    options = {"is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}
    return _SameForwardMathBackward.apply(query, key, value, attn_mask, options)


class _MathBackward(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and torch.is_grad_enabled():
            return sdpa_with_math_backward(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def resolve_training_attention(setting: str, device: torch.device) -> str:
    """`auto` -> `eager` on a CPU (measured faster there), the model's own attention elsewhere."""
    if setting == "auto":
        return "eager" if device.type == "cpu" else "model"
    return setting


def implementation_of(model) -> str | None:
    """The attention implementation a transformers model runs (`sdpa`, `eager`, ...). transformers
    keeps it in the config's private `_attn_implementation` and has no public getter; this is the
    one place that reads it."""
    return getattr(model.config, "_attn_implementation", None)


@contextlib.contextmanager
def training_attention(base, setting: str):
    """The context a training forward and backward run in; it yields the context for the forward
    alone. `eager` switches the base to eager attention (transformers' public
    `set_attn_implementation`, a sub-millisecond walk over the modules) for both, and back, so
    that evaluation and generation between steps keep the model's own (the backward needs it when
    gradient checkpointing recomputes the forward there). `math_backward` routes SDPA in the
    forward only: its backward calls SDPA itself. A setting resolved (`resolve_training_attention`)
    beforehand; a base whose attention cannot be switched (Bloom) or is already eager is left as it is."""
    if setting == "math_backward":
        yield _MathBackward
        return
    own = implementation_of(base)
    if setting != "eager" or own in (None, "eager") or not base.is_backend_compatible():
        yield contextlib.nullcontext
        return
    base.set_attn_implementation("eager")
    try:
        yield contextlib.nullcontext
    finally:
        base.set_attn_implementation(own)
