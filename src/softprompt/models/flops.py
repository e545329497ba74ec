"""Training cost in FLOPs, counted the same way for every PEFT method, so budgets compare.

Per real (non-pad) training token, with N the matmul parameters a token passes through (every
weight but the input embedding, plus the lm_head; attention scores are left out, as in the usual
6N rule):
- forward 2N, backward through the activations 2N (the gradient must reach the inputs of every
  layer, since the soft prompt or the adapters sit at or below them);
- weight gradients 2 x (trainable weights on the token's path). Prompt tuning, p-tuning and prefix
  tuning train an embedding table (the prefix's key/value table) that no token multiplies, so they
  cost 4N per token. LoRA's A and B are on the path: 4N + 2 x lora params (N includes them).
The virtual positions and p-tuning's prompt encoder (run once per step, not per token) are not
counted: the count is per real token, as tokens/s and MFU are (softprompt.experiments.bench).
"""

from __future__ import annotations

import torch


def matmul_params(model: torch.nn.Module) -> int:
    """N of the FLOPs formula: every parameter but the input embedding, plus the lm_head."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters() if p is not embed)
    return n + (head.numel() if head is embed else 0)


def flops_per_token(model: torch.nn.Module) -> int:
    """Training FLOPs per real token of `model` (a PEFT model, or a plain one trained in full)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings().weight
    # trainable weights inside the base model: LoRA's layers (PEFT injects them in place); the
    # prompt-learning methods keep theirs outside it, in the PeftModel's prompt encoder
    on_path = sum(p.numel() for p in base.parameters() if p.requires_grad and p is not embed)
    return 4 * matmul_params(base) + 2 * on_path


def training_flops(model: torch.nn.Module, real_tokens: int) -> int:
    return flops_per_token(model) * int(real_tokens)
