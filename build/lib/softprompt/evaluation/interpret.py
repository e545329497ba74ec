"""Reading a learned soft prompt (Lester et al. 2021, section 7): for each virtual token its
nearest vocabulary tokens by cosine similarity in the input-embedding space, and how far
training moved it from its initialisation.

Written to the run directory (`RunDir.write_prompt_tokens`), one object per virtual token (the
format is documented in docs/methods.md), and logged to W&B as the table `peft/prompt_tokens`.
Applies to methods whose prompt is a sequence of input embeddings: prompt tuning (the embeddings
themselves) and p-tuning (the prompt encoder's output embeddings).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

TABLE_KEY = "peft/prompt_tokens"
TABLE_COLUMNS = ["position", "nearest_tokens", "top_cosine", "cosine_to_init", "l2_to_init", "l2_norm"]


@torch.no_grad()
def nearest_tokens(prompt: torch.Tensor, embeddings: torch.Tensor, tokenizer, k: int = 5,
                   initial: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """One row per virtual token of `prompt` (num_virtual_tokens, hidden).

    `embeddings` is the model's input-embedding matrix (vocab, hidden); rows beyond the
    tokenizer's vocabulary (padding to a multiple of 64, say) are not tokens and are skipped.
    `initial` is the prompt before training; without it the distances are omitted.
    """
    prompt = prompt.detach().float().cpu()
    vocab = embeddings.detach().float().cpu()[: len(tokenizer)]
    sims = F.normalize(prompt, dim=-1) @ F.normalize(vocab, dim=-1).T  # (nv, vocab) cosine
    top = sims.topk(min(k, vocab.shape[0]), dim=-1)
    rows = []
    for pos in range(prompt.shape[0]):
        ids = top.indices[pos].tolist()
        row: dict[str, Any] = {
            "position": pos,
            "neighbours": [{"id": i, "token": tokenizer.decode([i]), "cosine": round(float(c), 6)}
                           for i, c in zip(ids, top.values[pos].tolist())],
            "l2_norm": float(prompt[pos].norm()),
        }
        if initial is not None:
            init = initial.detach().float().cpu()[pos]
            row["cosine_to_init"] = float(F.cosine_similarity(prompt[pos], init, dim=0))
            row["l2_to_init"] = float((prompt[pos] - init).norm())
        rows.append(row)
    return rows


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The rows of the W&B table (columns TABLE_COLUMNS): neighbours as one readable string."""
    return [[r["position"],
             " | ".join(f"{n['token']!r} {n['cosine']:.3f}" for n in r["neighbours"]),
             r["neighbours"][0]["cosine"] if r["neighbours"] else None,
             r.get("cosine_to_init"), r.get("l2_to_init"), r["l2_norm"]] for r in rows]
