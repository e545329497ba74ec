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


@dataclass
class PerplexityResult:
    loss: float  # mean NLL per token, nats
    perplexity: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def pad_batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def perplexity(model, rows: list[list[int]], pad_id: int, batch_size: int = 16, num_virtual_tokens: int = 0,
               autocast_dtype: torch.dtype | None = None, desc: str = "perplexity") -> PerplexityResult:
    """Token-weighted perplexity of `model` on `rows` (lists of token ids).

    `num_virtual_tokens` > 0 means the model (a PEFT prompt-learning model) prepends that many
    positions to its logits; they are dropped before scoring.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths, less padding
    nll_sum, count = 0.0, 0
    for start in progress(range(0, len(order), batch_size), desc=desc, unit="batch"):
        batch = [rows[i] for i in order[start : start + batch_size]]
        input_ids, mask = pad_batch(batch, pad_id, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        logits = logits[:, num_virtual_tokens:, :]
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="sum")
        nll_sum += nll.item()
        count += int((targets != -100).sum())
    model.train(was_training)
    loss = nll_sum / max(count, 1)
    return PerplexityResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count)
