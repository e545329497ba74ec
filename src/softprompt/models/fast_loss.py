"""The prompt-tuning training loss computed from hidden states, with no work on loss-free positions.

PEFT's forward prepends the soft prompt and lets the causal LM compute logits for every position
(virtual tokens, padding, the last token) before the loss masks most of them away. Over a 49k
vocabulary the lm_head is ~21 % of SmolLM2's FLOPs, so here we run the decoder ourselves on
`[soft prompt, text embeddings]` and apply the lm_head only where a label follows. The result is
the same number as PEFT's loss (tests/test_fast_loss.py checks value and prompt gradient).

`chunk_rows` bounds memory: the logits of at most that many positions exist at once, recomputed
in backward (torch.utils.checkpoint), at the price of one more lm_head forward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from softprompt.models.architectures import logits_are_lm_head_of_hidden
from softprompt.models.methods import method_of

def supports_fast_loss(peft_model) -> bool:
    """The method's registry entry says whether the loss applies; the architecture whether
    lm_head(hidden) are its logits."""
    base = peft_model.get_base_model()
    return method_of(peft_model).fast_loss and logits_are_lm_head_of_hidden(base)


def nll_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed next-token NLL of `targets` under the logits `lm_head(hidden)`: the loss's head,
    which the training step may run compiled (softprompt.train.compile.compiled_nll_sum)."""
    # float(): the softmax over the vocabulary in fp32, also under bf16 autocast (as HF's loss does)
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


NllSum = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def labelled_positions(labels: torch.Tensor, n_virtual: int) -> torch.Tensor:
    """The flat indexes, into `[batch, n_virtual + T - 1]`, of the positions whose next token is
    labelled. Computed from the host's labels before the batch moves to the device, so that the
    loss needs no boolean-mask indexing (a device-to-host sync) on the device."""
    targets = torch.cat([labels.new_full((labels.shape[0], n_virtual), -100), labels], dim=1)[:, 1:]
    return (targets != -100).reshape(-1).nonzero().squeeze(1)


def prompt_tuning_loss(peft_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       num_items: int | torch.Tensor | None = None, chunk_rows: int | None = None,
                       positions: torch.Tensor | None = None, decoder: torch.nn.Module | None = None,
                       head: NllSum = nll_sum) -> torch.Tensor:
    """Mean next-token NLL over the labelled text tokens (or sum / `num_items` when given).
    `positions`: `labelled_positions(labels, num_virtual_tokens)` on the model's device (the
    training step passes them; without them the labels' mask is read on the device).
    `decoder`: the base's decoder compiled (training.torch_compile), else the base's own; `head`:
    `nll_sum` or its compiled version."""
    base = peft_model.get_base_model()
    if decoder is None:
        decoder = base.base_model  # LlamaModel / BloomModel: the layers without the lm_head
    lm_head = base.get_output_embeddings()
    embeds = base.get_input_embeddings()(input_ids)
    batch = input_ids.shape[0]
    prompt = peft_model.get_prompt(batch_size=batch).to(embeds.dtype)
    n_virtual = prompt.shape[1]
    mask = torch.cat([attention_mask.new_ones(batch, n_virtual), attention_mask], dim=1)
    hidden = decoder(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask,
                     use_cache=False).last_hidden_state
    # position p predicts token p+1; the last virtual position predicts the first text token
    targets = torch.cat([labels.new_full((batch, n_virtual), -100), labels], dim=1)[:, 1:]
    if positions is None:
        positions = labelled_positions(labels, n_virtual).to(labels.device)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
    targets = targets.reshape(-1).index_select(0, positions)
    if chunk_rows and hidden.shape[0] > chunk_rows:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            total = total + checkpoint(head, lm_head, hidden[part], targets[part], use_reentrant=False)
    else:
        total = head(lm_head, hidden, targets)
    denominator = num_items if num_items is not None else targets.numel()
    return total / denominator
