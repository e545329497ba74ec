"""`python scripts/bench.py --profile`: where one training step's wall time goes.

The engine's step (softprompt.train.step.train_step) on one lane, prepared as `scripts/bench.py`
times it, runs `--steps` steps after the warm-up under torch.profiler. Every operator's own time
(its self time: no double counting of an operator and the operators it calls) goes to one share:

- gemm: the matrix products (the base's projections, the MLP, the lm_head);
- attention: SDPA, or eager attention's batched products (bmm/baddbmm: in these decoders only
  attention calls them) and softmax, forward and backward;
- elementwise_and_norm: RMSNorm/LayerNorm, activations, residual adds, rotary, masks, concatenations;
- casts_and_copies: dtype casts and copies (autocast casts the frozen weights on every forward);
- compiled_fused: a compiled step's generated kernels (training.torch_compile: inductor fuses the
  elementwise work, norms, casts and softmax into them; the matrix products it leaves to aten stay
  in gemm), the own time of inductor's `## Call CompiledFxGraph` ranges;
- embedding_and_prompt: the token embedding, the soft prompt, gathering the labelled positions;
- loss: the softmax cross-entropy over the vocabulary;
- optimizer: clipping and the optimizer step;
- data: batch collation on the host (a `softprompt::collate` range);
- overhead: the rest of the step's wall time: Python, the autograd engine, dispatch, idle.

Shares are of the profiled wall time (the profiler adds its own cost, which lands in overhead);
the unprofiled seconds per step of the same steps are reported next to them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEvent

SHARES = ("gemm", "attention", "elementwise_and_norm", "casts_and_copies", "compiled_fused", "embedding_and_prompt",
          "loss", "optimizer", "data", "overhead")
COMPILED_GRAPH_RANGE = "## Call CompiledFxGraph"  # inductor's range around a compiled graph's call
_GEMM = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear",
         "aten::_addmm_activation", "aten::mkldnn_linear", "aten::_mkldnn_linear", "aten::mkldnn_matmul"}
_CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::empty_like"}
_EMBEDDING = {"aten::embedding", "aten::embedding_backward", "aten::embedding_dense_backward", "aten::index_select",
              "aten::index_select_backward", "aten::index_add_", "aten::index", "aten::index_put_",
              "aten::_index_put_impl_"}
_LOSS = {"aten::cross_entropy_loss", "aten::log_softmax", "aten::_log_softmax", "aten::nll_loss", "aten::nll_loss_nd",
         "aten::nll_loss_forward", "aten::nll_loss_backward", "aten::_log_softmax_backward_data"}
COLLATE_RANGE = "softprompt::collate"


def share_of(event: FunctionEvent) -> str | None:
    """The share an operator's self time goes to; None for ranges whose own time is overhead."""
    name = event.name
    ancestors = _ancestor_names(event)
    if name == COLLATE_RANGE or COLLATE_RANGE in ancestors:
        return "data"
    if name.startswith(COMPILED_GRAPH_RANGE):
        return "compiled_fused"  # its own time is the generated kernels'; the aten calls in it are children
    if name.startswith(("ProfilerStep", "autograd::", "Optimizer.")) or event.is_user_annotation:
        return None  # the range's own time: Python and the autograd engine between operators
    if any(a.startswith("Optimizer.") for a in ancestors) or name.startswith("aten::_foreach") \
            or "adam" in name.lower():
        return "optimizer"
    if name in _GEMM:
        return "gemm"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name \
            or name in {"aten::bmm", "aten::baddbmm", "aten::softmax", "aten::_softmax",
                        "aten::_softmax_backward_data"}:
        return "attention"
    if name in _LOSS:
        return "loss"
    if name in _EMBEDDING:
        return "embedding_and_prompt"
    if name in _CASTS:
        return "casts_and_copies"
    return "elementwise_and_norm"


def _ancestor_names(event: FunctionEvent) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def shares_of(events: list[FunctionEvent], wall_us: float) -> dict[str, float]:
    """Seconds per share over the profiled steps; `overhead` is the wall time no operator took."""
    seconds = dict.fromkeys(SHARES, 0.0)
    for event in events:
        share = share_of(event)
        if share is not None:
            seconds[share] += event.self_cpu_time_total / 1e6
    seconds["overhead"] = max(0.0, wall_us / 1e6 - sum(seconds.values()))
    return seconds


def profile_steps(step, collate, steps: int, device: torch.device) -> dict:
    """`collate(i)` builds step i's batches, `step(i, batches)` runs it; profiles `steps` calls."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.profiler.profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()
        for i in range(steps):
            with torch.profiler.record_function(COLLATE_RANGE):
                batches = collate(i)
            step(i, batches)
        sync()
        wall = time.perf_counter() - start
    seconds = shares_of(list(prof.events()), wall * 1e6)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {"profiled_seconds_per_step": wall / steps,
            "seconds_per_step_by_share": {k: v / steps for k, v in seconds.items()},
            "shares": {k: v / wall for k, v in seconds.items()}, "top_operators": table}


def markdown(result: dict) -> str:
    """The shares as a table: one row per share, seconds per step and the share of the step."""
    per_step = result["profile"]["seconds_per_step_by_share"]
    shares = result["profile"]["shares"]
    lines = ["| share | s/step | % |", "|---|---:|---:|"]
    lines += [f"| {k} | {per_step[k]:.3f} | {100 * shares[k]:.1f} |" for k in SHARES]
    lines.append(f"| step (profiled) | {result['profile']['profiled_seconds_per_step']:.3f} | 100 |")
    return "\n".join(lines)


def write(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    print(markdown(result), flush=True)
    if out:
        Path(out).write_text(text + "\n")


def run_profile(argv: list[str]) -> dict:
    """`scripts/bench.py --profile [--model M] [--data CSV] [--steps N] [--set KEY=VALUE] [--out FILE]`:
    warm-up steps (compilation, when asked, happens there), `--steps` steps timed without the
    profiler, then as many profiled."""
    from transformers import set_seed

    from softprompt.experiments.bench import describe, one_lane, parse_args, run_info, setup

    args = parse_args(argv)
    run = setup(args)
    steps = args.steps or 4
    result = describe(args, run, steps)
    set_seed(run.ours.seed)
    started = time.perf_counter()
    lane = one_lane(run.ours, run.splits, args.warmup_steps + 2 * steps, run.precision)
    result["setup_s"] = time.perf_counter() - started
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)

    def timed(first: int, count: int) -> float:
        sync()
        start = time.perf_counter()
        for step in range(first, first + count):
            lane.step(step, lane.batch(step))
        sync()
        return time.perf_counter() - start

    result["torch_compile"] = lane.compiled
    result["warmup_s"] = timed(0, args.warmup_steps)  # with torch_compile: the compile time
    result["seconds_per_step"] = timed(args.warmup_steps, steps) / steps
    first, real, padded = args.warmup_steps + steps, 0, 0

    def collate(i: int) -> dict:
        nonlocal real, padded
        batch = lane.batch(first + i)
        real, padded = real + len(batch["labelled"]), padded + batch["input_ids"].numel()
        return batch

    result["profile"] = profile_steps(lambda i, batch: lane.step(first + i, batch), collate, steps, run.device)
    result["padding_share"] = 1 - real / padded  # of the text positions the profiled steps computed
    result["run_info"] = run_info()
    write(result, args.out)
    return result
