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


# rows of the embedding matrix compared at once: an fp32 copy of 8192 x 4096 is 128 MiB, where a
# normalised fp32 copy of a whole Llama-3 matrix (128,256 x 4,096) would be 2 GiB more
CHUNK_ROWS = 8192


@torch.no_grad()
def nearest_tokens(prompt: torch.Tensor, embeddings: torch.Tensor, tokenizer, k: int = 5,
                   initial: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """One row per virtual token of `prompt` (num_virtual_tokens, hidden).

    `embeddings` is the model's input-embedding matrix (vocab, hidden); rows beyond the
    tokenizer's vocabulary (padding to a multiple of 64, say) are not tokens and are skipped.
    It is read in chunks of CHUNK_ROWS, each compared in fp32 on the matrix's device.
    `initial` is the prompt before training; without it the distances are omitted.
    """
    vocab = min(len(tokenizer), embeddings.shape[0])
    unit = F.normalize(prompt.detach().float(), dim=-1).to(embeddings.device)
    best_values = torch.empty(unit.shape[0], 0, device=embeddings.device)
    best_ids = torch.empty(unit.shape[0], 0, dtype=torch.long, device=embeddings.device)
    for start in range(0, vocab, CHUNK_ROWS):
        rows = embeddings.detach()[start:min(start + CHUNK_ROWS, vocab)].float()
        sims = unit @ F.normalize(rows, dim=-1).T  # (nv, chunk) cosine
        values = torch.cat([best_values, sims], dim=-1)
        ids = torch.cat([best_ids, torch.arange(start, start + rows.shape[0], device=sims.device)
                         .expand(sims.shape[0], -1)], dim=-1)
        top = values.topk(min(k, values.shape[-1]), dim=-1)
        best_values, best_ids = top.values, ids.gather(-1, top.indices)
    prompt = prompt.detach().float().cpu()
    best_values, best_ids = best_values.cpu(), best_ids.cpu()
    rows = []
    for pos in range(prompt.shape[0]):
        ids = best_ids[pos].tolist()
        row: dict[str, Any] = {
            "position": pos,
            "neighbours": [{"id": i, "token": tokenizer.decode([i]), "cosine": round(float(c), 6)}
                           for i, c in zip(ids, best_values[pos].tolist())],
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
