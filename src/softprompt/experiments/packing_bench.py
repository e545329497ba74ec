"""`python scripts/bench.py --packing`: a padding-free training step against the engine's padded one.

The engine pads each batch to its longest row (rows grouped by length: softprompt.train.batches).
A padding-free step packs a lane's rows into one sequence instead: each row behind its own copy of
the soft prompt, position ids restarting at each row, attention confined to each row. It saves the
padding's share of the positions; what it costs is confining attention to the rows of one long
sequence. transformers builds that confinement itself from restarting position ids when no
attention mask is given: a dense `[positions x positions]` block-diagonal mask for `eager` and
`sdpa`, a block mask for `flex_attention`.

On one lane prepared as `scripts/bench.py` times it (the cast-free decoder, bf16 autocast where the
run has it), the same batches, in alternation, forward and backward (no optimizer step: nothing
moves), this times:

- `padded`: the engine's own forward and backward (softprompt.train.step.forward_backward, the
  run's training.attention);
- `packed_<implementation>`: `packed_loss` with the base's attention switched to that
  implementation for the call; one that cannot run here (flex_attention has no CPU backward in
  torch 2.13) is reported with its error's first line.

First, in fp32, the packed loss and prompt gradient are compared with the padded ones. Only
decoders that take position ids and rotate by them (Llama and its kin) can pack: ALiBi (Bloom)
has no position ids to restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from softprompt.core.errors import report_and_exit
from softprompt.models.fast_loss import nll_sum, prompt_tuning_loss
from softprompt.models.training_attention import implementation_of

PACKED = ("eager", "sdpa", "flex_attention")  # the attention implementations a packed step is timed with


def packed_loss(peft_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                decoder: torch.nn.Module | None = None) -> torch.Tensor:
    """`prompt_tuning_loss` of a right-padded batch, computed on one packed sequence: `[prompt,
    row 0, prompt, row 1, ...]` without padding, position ids restarting at each prompt, no
    attention mask (transformers confines attention to each row from the position ids). The mean
    next-token NLL over the labelled tokens, as the padded loss."""
    base = peft_model.get_base_model()
    decoder = decoder if decoder is not None else base.base_model
    embeds = base.get_input_embeddings()(input_ids)
    prompt = peft_model.get_prompt(batch_size=1)[0].to(embeds.dtype)
    n_virtual = prompt.shape[0]
    pieces, positions, targets = [], [], []
    for row, length in enumerate(attention_mask.sum(dim=1).tolist()):
        pieces += [prompt, embeds[row, :length]]
        positions.append(torch.arange(n_virtual + length, device=input_ids.device))
        # position p predicts p + 1 within its row; a row's last position predicts nothing
        row_labels = torch.cat([labels.new_full((n_virtual,), -100), labels[row, :length]])
        targets += [row_labels[1:], labels.new_full((1,), -100)]
    hidden = decoder(inputs_embeds=torch.cat(pieces)[None], position_ids=torch.cat(positions)[None],
                     attention_mask=None, use_cache=False).last_hidden_state[0]
    target = torch.cat(targets)
    keep = (target != -100).nonzero().squeeze(1)
    return nll_sum(base.get_output_embeddings(), hidden.index_select(0, keep), target.index_select(0, keep)) \
        / keep.numel()


def _with_attention(base, implementation: str, fn):
    """`fn()` with the base's attention switched to `implementation`, and back."""
    own = implementation_of(base)
    base.set_attn_implementation(implementation)
    try:
        return fn()
    finally:
        base.set_attn_implementation(own)


def fp32_agreement(lane, batch: dict, implementation: str) -> dict[str, float]:
    """Relative difference of the packed loss and prompt gradient from the padded ones, fp32, both
    with `implementation` attention."""
    model, base = lane.lane.model, lane.loaded.model
    prompt = lane.lane.trainable()
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    padded = _with_attention(base, implementation, lambda: prompt_tuning_loss(model, *inputs))
    padded_grad = torch.autograd.grad(padded, prompt)
    packed = _with_attention(base, implementation, lambda: packed_loss(model, *inputs))
    packed_grad = torch.autograd.grad(packed, prompt)
    grad_diff = sum(float((a - b).norm() ** 2) for a, b in zip(padded_grad, packed_grad)) ** 0.5
    grad_norm = sum(float(a.norm() ** 2) for a in padded_grad) ** 0.5
    return {"loss_rel_diff": abs(float(packed) - float(padded)) / abs(float(padded)),
            "grad_rel_diff": grad_diff / grad_norm}


def run_packing(argv: list[str]) -> dict:
    """`scripts/bench.py --packing [--model M] [--data CSV] [--steps N] [--out FILE]`: the padded
    step and each packed one on the first `--steps` batches (default 4), twice round, the first
    round untimed (one-off costs, flex_attention's compile)."""
    from softprompt.experiments.bench import describe, one_lane, parse_args, run_info, setup
    from softprompt.models.training_attention import resolve_training_attention
    from softprompt.train.step import forward_backward

    args = parse_args(argv)
    run = setup(args)
    steps = args.steps or 4
    result = describe(args, run, steps)
    lane = one_lane(run.ours, run.splits, steps, run.precision)
    base, device = lane.loaded.model, run.device
    if implementation_of(base) is None or not base.is_backend_compatible():
        report_and_exit(f"--packing: {run.ours.model.name} has no switchable attention to confine to rows "
                        "(a Llama-style decoder with position ids can pack)")
    batches = [lane.batch(step) for step in range(steps)]
    real = sum(len(b["labelled"]) for b in batches)
    result["padding_share"] = 1 - real / sum(b["input_ids"].numel() for b in batches)
    result["fp32"] = {impl: fp32_agreement(lane, batches[0], impl) for impl in ("eager", "sdpa")}
    attention = resolve_training_attention(run.ours.training.attention, device)
    autocast = lane.autocast

    def padded(batch):
        forward_backward([lane.lane], [batch], base, "turns", device, autocast, lane.decoder, attention)

    def packed(implementation):
        def step(batch):
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labelled"}
            with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = _with_attention(base, implementation, lambda: packed_loss(
                    lane.lane.model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], lane.decoder))
            loss.backward()
        return step

    ways = {"padded": padded} | {f"packed_{impl}": packed(impl) for impl in PACKED}
    seconds: dict[str, float] = dict.fromkeys(ways, 0.0)
    failed: dict[str, str] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for round_ in range(2):
        for batch in batches:
            for name, step in ways.items():
                if name in failed:
                    continue
                sync()
                start = time.perf_counter()
                try:
                    step(batch)
                except Exception as error:  # noqa: BLE001 - an implementation this device lacks is a result
                    if name == "padded":
                        raise
                    failed[name] = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    continue
                finally:
                    lane.lane.optimizer.zero_grad(set_to_none=True)
                sync()
                if round_:
                    seconds[name] += time.perf_counter() - start
    result["training_attention"] = attention
    result["seconds_per_step"] = {name: s / steps for name, s in seconds.items() if name not in failed}
    result["against_padded"] = {name: s / seconds["padded"] for name, s in seconds.items() if name not in failed}
    result["unavailable"] = failed
    result["run_info"] = run_info()
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    for name, ratio in result["against_padded"].items():
        print(f"{name}: {result['seconds_per_step'][name]:.3f} s a step ({ratio:.2f}x the padded step's time)")
    for name, why in failed.items():
        print(f"{name}: unavailable here ({why})")
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result
