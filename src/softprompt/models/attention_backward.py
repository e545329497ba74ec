"""`training.attention_backward=math`: the training step's attention keeps its forward kernel and
differentiates the math kernel instead of the forward kernel's own backward.

On a CPU, PyTorch's SDPA picks its flash kernel for bf16. Its backward was the slow and inexact
part of the prompt-tuning step on the 2-core Zen 4 (docs/speed.md): 11.9 ms a layer of SmolLM2
against 2.7 ms for its forward, and prompt gradients far enough from fp32's that bf16 training
learned visibly slower than fp32 training on the same batches. Here the forward is the same call
(the same kernel, so the same outputs: the loss, evaluation and generation do not change) and the
backward recomputes the attention with the math kernel (its softmax in fp32) and differentiates
that. The rest of the model is untouched.

It acts through a `TorchFunctionMode` (public torch API) around the training forward, so that it
applies to whatever calls `F.scaled_dot_product_attention` (transformers' SDPA attention for Llama,
Mistral, Qwen...). Architectures with their own attention (Bloom's baddbmm) are unaffected.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

ATTENTION_BACKWARDS = ("native", "math")


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


def attention_backward(setting: str) -> contextlib.AbstractContextManager:
    """The context that the training forward runs in: `math` routes SDPA as above, `native` leaves it."""
    return _MathBackward() if setting == "math" else contextlib.nullcontext()
