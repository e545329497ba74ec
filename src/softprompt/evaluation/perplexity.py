"""Held-out perplexity, token-weighted, computed in-process.

`evaluate.load("perplexity")` needs the Hub and takes a model id, not a PEFT model, so we compute
exp(sum NLL / tokens) from the model's own logits. Base and tuned model are scored on exactly the
same tokens: every text token after the first (the first has no text before it; only the tuned
model's soft prompt could predict it, which would make the two numbers incomparable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softprompt.core.progress import progress
from softprompt.models.architectures import logits_are_lm_head_of_hidden


@dataclass
class PerplexityResult:
    loss: float  # mean NLL per token, nats
    perplexity: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def pad_batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (input_ids, attention_mask) on `device`: built on the host row by
    row, then moved in one copy each."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _base_of(model):
    """The plain transformers model under a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _hidden_state_base(model):
    """The base model whose decoder output goes through lm_head only on the scored positions, or
    None where the architecture is not known to compute its logits as lm_head(hidden)."""
    base = _base_of(model)
    return base if logits_are_lm_head_of_hidden(base) else None


@torch.inference_mode()
def perplexity(model, rows: list[list[int]], pad_id: int, batch_size: int = 16, num_virtual_tokens: int = 0,
               autocast_dtype: torch.dtype | None = None, desc: str = "perplexity") -> PerplexityResult:
    """Token-weighted perplexity of `model` on `rows` (lists of token ids).

    `num_virtual_tokens` > 0 means the model (a PEFT prompt-learning model) prepends that many
    positions to its logits; they are dropped before scoring.

    Where the architecture's logits are lm_head(last hidden state), the lm_head (49k-vocab: ~21 %
    of SmolLM2's FLOPs) runs only on the scored positions: the decoder's output is taken by a
    forward hook and the model is asked for the logits of one position only (`logits_to_keep`),
    so padding, virtual tokens and each row's last position cost no vocabulary projection.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    base = _hidden_state_base(model)
    captured: list[torch.Tensor] = []
    hook = None
    if base is not None:
        hook = base.base_model.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths, less padding
    # the one position the model's own lm_head must still compute, as an index tensor: with the int
    # 1, transformers applies the lm_head to a strided `[rows, 1, hidden]` slice, for which torch's
    # CPU matmul copies the whole weight once per row (measured on torch 2.13: 2 GB and 10 s for 4
    # rows of a 128k-vocabulary bf16 Llama, against 0.03 s on the contiguous copy that indexing makes;
    # pytorch/pytorch#151934)
    last = torch.tensor([-1], device=device)
    nll_sum, count = 0.0, 0
    try:
        for start in progress(range(0, len(order), batch_size), desc=desc, unit="batch"):
            batch = [rows[i] for i in order[start : start + batch_size]]
            input_ids, mask = pad_batch(batch, pad_id, device)
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            keep = targets != -100
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if base is None:
                    logits = model(input_ids=input_ids, attention_mask=mask).logits
                    scored = logits[:, num_virtual_tokens:][:, :-1][keep]
                else:
                    captured.clear()
                    model(input_ids=input_ids, attention_mask=mask, logits_to_keep=last)
                    hidden = captured[-1][:, -input_ids.shape[1] :]  # the text positions
                    scored = base.get_output_embeddings()(hidden[:, :-1][keep])
            nll = F.cross_entropy(scored.float(), targets[keep], reduction="sum")
            nll_sum += nll.item()
            count += int(keep.sum())
    finally:
        if hook is not None:
            hook.remove()
    model.train(was_training)
    loss = nll_sum / max(count, 1)
    return PerplexityResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count)
