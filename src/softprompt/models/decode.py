"""Greedy decoding with the KV cache: what `generate()` does for greedy search, without its overhead.

A decode step reads every weight once for a handful of rows: it is bound by memory bandwidth,
and how a matrix product streams its weight decides its speed. Measured on a 2-core Zen 4
(torch 2.13, MKL, fp32): `F.linear(x, W)` with 6 rows streams a weight from memory at ~11 GB/s,
the same product written `(W @ x.T).T` at ~17 GB/s (a plain read: ~29 GB/s); for SmolLM2's 49k x
576 lm_head it is 24 ms against 6.5 ms. So decode steps (one new token per row, not the prompt's
pre-fill) run every linear layer as `W @ x.T` (`WeightMajorLinear`, a `TorchFunctionMode`: the
model's own code, unchanged), and the loop applies the lm_head itself, only to the last position,
for architectures whose logits are lm_head(decoder output). Everything else is generate's greedy
search: the same position ids (counted
from the attention mask, as `prepare_inputs_for_generation` does), finished rows emit the pad id,
the repetition penalty is the CTRL rule over the prompt's ids plus the generated ones, the loop
stops when every row has emitted EOS. Tests check the text equals `generate()`'s, batched and one
prompt at a time, for every PEFT method.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache

from softprompt.models.architectures import logits_are_lm_head_of_hidden


def supports_lean_decode(model) -> bool:
    """Whether `greedy_decode` applies to `model` (a plain transformers causal LM)."""
    return logits_are_lm_head_of_hidden(model)


class WeightMajorLinear(TorchFunctionMode):
    """Every `F.linear(x, W, b)` inside computed as `(W @ x.T).T + b`: the same product, streamed
    along the weight's rows (faster for few rows; module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        out = (weight @ x.reshape(-1, x.shape[-1]).T).T
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[0])


def _penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty: seen tokens' logits divided by `penalty` (multiplied when negative)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


@torch.inference_mode()
def greedy_decode(model, attention_mask: torch.Tensor, prompt_ids: list[list[int]], max_new_tokens: int,
                  repetition_penalty: float, eos_token_id: int, pad_token_id: int, *,
                  input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                  cache: DynamicCache | None = None) -> torch.Tensor:
    """The (rows, steps) generated ids of greedy search; rows that stopped are padded with the pad id.

    The first step feeds `input_ids` or `inputs_embeds` (left-padded); `attention_mask` covers
    what `cache` already holds (a prefix-tuning prefix) plus those positions. `prompt_ids` are the
    ids the repetition penalty counts as already seen, per row (the text, not pads or prompts).
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings().weight  # (vocab, hidden)
    takes_positions = "position_ids" in inspect.signature(decoder.forward).parameters
    cache = DynamicCache() if cache is None else cache
    rows = attention_mask.shape[0]
    device = attention_mask.device
    seen = torch.zeros((rows, head.shape[0]), dtype=torch.bool, device=device)
    for row, ids in enumerate(prompt_ids):
        if ids:
            seen[row, torch.tensor(ids, dtype=torch.long, device=device)] = True
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    mask = attention_mask
    step_input = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    width = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
    every_row = torch.arange(rows, device=device)
    generated: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        extra = {}
        if takes_positions:
            positions = mask.long().cumsum(-1) - 1
            extra["position_ids"] = positions.masked_fill(mask == 0, 1)[:, -width:]
        with WeightMajorLinear() if width == 1 else contextlib.nullcontext():
            hidden = decoder(**step_input, attention_mask=mask, cache=cache, use_cache=True, **extra).last_hidden_state
        logits = (head @ hidden[:, -1].T).T.float()  # W @ h.T: see WeightMajorLinear
        if repetition_penalty != 1.0:
            logits = _penalised(logits, seen, repetition_penalty)
        token = torch.where(unfinished, logits.argmax(dim=-1), pad_token_id)
        generated.append(token)
        seen[every_row, token] = True
        unfinished &= token != eos_token_id
        if not unfinished.any():
            break
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
        step_input, width = {"input_ids": token[:, None]}, 1
    return torch.stack(generated, dim=1) if generated else torch.empty((rows, 0), dtype=torch.long, device=device)
