"""One optimizer step of every lane of a pack: the engine's only step function.

`train_step(lanes, batches, ...)` runs the forward and backward of each lane's batch through the
one frozen base (`turns`: lane after lane; `concat`: every lane's rows in one forward, each row
behind its own lane's soft prompt), averages the prompts' gradients over the ranks when several
processes train (the base is frozen, so the prompts' gradients are all that DDP would reduce: one
flat all-reduce does it, for every method and both forwards), then clips, sets the rate and
steps each lane's own optimizer. A lane whose loss is not finite on any rank takes no update: its
value says so and the engine fails its jobs.

What a lane is (its model, optimizer, schedule, clipping) lives in softprompt.train.pack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from softprompt.core import keys
from softprompt.models.training_attention import training_attention
from softprompt.models.fast_loss import NllSum, nll_sum, prompt_tuning_loss
from softprompt.models.methods import virtual_tokens_in_logits


@dataclass
class StepResult:
    """Per lane: its loss (the mean over the ranks), its real tokens (all ranks), the gradient norm
    before clipping (a tensor: read only when logged, so the step needs no sync for it) and the
    learning rate it stepped with (None where it took no step)."""

    losses: list[float]
    tokens: list[int]
    grad_norms: list[torch.Tensor | None]
    rates: list[float | None]


def train_step(lanes: list, batches: list[dict[str, torch.Tensor]], base, step: int, *, forward: str,
               device: torch.device, autocast: torch.dtype | None, world: int = 1,
               decoder: torch.nn.Module | None = None, attention: str = "model", head: NllSum = nll_sum) -> StepResult:
    """Step `step` (0-based) of every lane on its batch (`batches[i]` for `lanes[i]`, on the host).
    `decoder`, `head`: the base's decoder and the loss's head, compiled or cast-free
    (softprompt.train.compile), for the hidden-state loss.
    `attention`: training.attention resolved (softprompt.models.training_attention)."""
    local_tokens = [len(b["labelled"]) for b in batches]  # the rows' own tokens, counted on the host
    values = forward_backward(lanes, batches, base, forward, device, autocast, decoder, attention, head)
    if world > 1:
        values, tokens = _over_ranks(lanes, values, local_tokens, device, world)
    else:
        tokens = local_tokens
    grad_norms: list[torch.Tensor | None] = []
    rates: list[float | None] = []
    for lane, value in zip(lanes, values):
        if not math.isfinite(value):
            for p in lane.trainable():
                p.grad = None
            grad_norms.append(None)
            rates.append(None)
            continue
        params = lane.trainable()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(params, lane.max_grad_norm))
        lr = lane.schedule.lr(step)
        for group in lane.optimizer.param_groups:
            group["lr"] = lr
        lane.optimizer.step()
        lane.optimizer.zero_grad(set_to_none=True)
        rates.append(lr)
    return StepResult(values, tokens, grad_norms, rates)


def log_row(step: int, loss: float, lr: float, grad_norm: float, per_epoch: int) -> dict[str, Any]:
    """The history row of a logged training step (the x axis of train/* curves is the step)."""
    epoch, batch = divmod(step, per_epoch)
    return {keys.TRAIN_LOSS: loss, keys.TRAIN_LEARNING_RATE: lr, keys.TRAIN_GRAD_NORM: grad_norm,
            keys.TRAIN_STEP: step + 1, keys.EPOCH: round(epoch + (batch + 1) / per_epoch, 4)}


def forward_backward(lanes: list, batches: list[dict], base, forward: str, device: torch.device,
                      autocast: torch.dtype | None, decoder: torch.nn.Module | None = None,
                      attention: str = "model", head: NllSum = nll_sum) -> list[float]:
    """Each lane's loss value on this rank; gradients are in each lane's prompt. A lane whose loss
    is not finite gets no backward. `attention`: training.attention resolved."""
    with training_attention(base, attention) as in_forward:
        return _forward_backward(lanes, batches, base, forward, device, autocast, decoder, in_forward, head)


def _forward_backward(lanes: list, batches: list[dict], base, forward: str, device: torch.device,
                      autocast: torch.dtype | None, decoder: torch.nn.Module | None, in_forward,
                      head: NllSum) -> list[float]:
    if forward == "concat" and len(lanes) > 1:
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None), \
                in_forward():
            losses = concat_losses(lanes, batches, base, device, decoder, head)
        values = [float(loss.detach()) for loss in losses]
        finite = [loss for loss, v in zip(losses, values) if math.isfinite(v)]
        if finite:
            torch.stack(finite).sum().backward()  # each prompt gets its own lane's gradient only
        return values
    values = []
    for lane, batch in zip(lanes, batches):
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labelled"}
        lane.model.train()
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None), \
                in_forward():
            if lane.fast_loss:
                n = virtual_tokens_in_logits(lane.model)
                positions = _positions(batch["labelled"], n, n + batch["input_ids"].shape[1] - 1).to(device)
                loss = prompt_tuning_loss(lane.model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                                          positions=positions, decoder=decoder, head=head)
            else:  # PEFT's forward: the mean NLL over the labelled tokens, as the fast loss
                loss = lane.model(**inputs).loss
        value = loss.item()  # the step's one sync per lane: the finiteness check and the logged loss
        if math.isfinite(value):
            loss.backward()
        values.append(value)
    return values


def _over_ranks(lanes: list, values: list[float], tokens: list[int], device: torch.device,
                world: int) -> tuple[list[float], list[int]]:
    """Average the losses and the prompts' gradients over the ranks and sum the tokens: what DDP
    does for the trainable parameters, here for every lane at once (one collective for the numbers,
    one for the gradients). A non-finite loss on one rank makes the mean non-finite on all."""
    import torch.distributed as dist

    numbers = torch.tensor(values + [float(t) for t in tokens], dtype=torch.float64, device=device)
    dist.all_reduce(numbers)
    n = len(values)
    mean = [v / world for v in numbers[:n].tolist()]
    total = [int(round(t)) for t in numbers[n:].tolist()]
    params = [p for lane in lanes for p in lane.trainable()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    start = 0
    for p in params:
        p.grad = flat[start:start + p.numel()].view_as(p).to(p.dtype)
        start += p.numel()
    return mean, total


def _positions(labelled: torch.Tensor, n_virtual: int, width: int) -> torch.Tensor:
    """Flat indexes into a `[rows, width]` grid of next-token predictions of the positions whose
    next token is a label: label (row, j) is predicted at position j + n_virtual - 1 (the last
    virtual position predicts the first text token). Host arithmetic: no device sync."""
    return labelled[:, 0] * width + labelled[:, 1] + (n_virtual - 1)


def concat_losses(lanes: list, batches: list[dict], base, device: torch.device,
                  decoder: torch.nn.Module | None = None, head: NllSum = nll_sum) -> list[torch.Tensor]:
    """One forward through the frozen base for the rows of all lanes, each row behind its own
    lane's soft prompt: `[prompt_j, text, padding]`, right-padded to the longest. Returns each
    lane's mean NLL over its own labelled tokens (what `prompt_tuning_loss` returns for it alone)."""
    decoder = decoder if decoder is not None else base.base_model
    lm_head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    pieces, masks, targets = [], [], []
    for lane, inputs in zip(lanes, batches):
        lane.model.train()
        ids, mask, labels = (inputs[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
        emb = embed(ids)
        prompt = lane.model.get_prompt(batch_size=ids.shape[0]).to(emb.dtype)
        n = prompt.shape[1]
        pieces.append(torch.cat([prompt, emb], dim=1))
        masks.append(torch.cat([mask.new_ones(ids.shape[0], n), mask], dim=1))
        targets.append(torch.cat([labels.new_full((ids.shape[0], n), -100), labels], dim=1))
    width = max(p.shape[1] for p in pieces)
    embeds = torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in pieces])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
    target = torch.cat([F.pad(t, (0, width - t.shape[1]), value=-100) for t in targets])
    hidden = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    # position p predicts token p+1 (the last virtual position predicts the first text token)
    hidden, target = hidden[:, :-1], target[:, 1:]
    losses, start = [], 0
    # each lane's rows: its loss as prompt_tuning_loss computes it alone
    for piece, batch in zip(pieces, batches):
        rows = slice(start, start + piece.shape[0])
        start += piece.shape[0]
        keep = _positions(batch["labelled"], piece.shape[1] - batch["input_ids"].shape[1], width - 1).to(device)
        picked = hidden[rows].reshape(-1, hidden.shape[-1]).index_select(0, keep)
        targets = target[rows].reshape(-1).index_select(0, keep)
        nll = head(lm_head, picked, targets)
        losses.append(nll / len(batch["labelled"]))
    return losses
