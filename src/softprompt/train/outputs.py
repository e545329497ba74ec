"""The end of a job: evaluate the tuned prompt, write the run directory, finish its W&B run.

The engine (softprompt.train.pack) writes every job with `write_run`, a single run's and a
packed job's alike: adapter/, generations.jsonl, history.jsonl, prompt_tokens.jsonl, the W&B run's
tables, summary and adapter artifact, and metrics.json last (its presence means the job finished).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from softprompt.core import keys
from softprompt.core.precision import model_device
from softprompt.core.rundir import RunDir
from softprompt.evaluation import interpret
from softprompt.evaluation.evaluate import comparison_metrics, evaluate
from softprompt.evaluation.perplexity import PerplexityResult
from softprompt.models.flops import training_flops
from softprompt.models.loading import count_parameters
from softprompt.models.methods import (
    soft_prompt_embeddings,
    tuned_generation,
    virtual_tokens_in_logits,
)
from softprompt.models.portable import adapter_record, save_adapter
from softprompt.models.transfer import prompt_source
from softprompt.track.wandb_run import Tracker


def memory_metrics(device: torch.device) -> dict[str, int]:
    """The process's peak resident memory, and on CUDA the peak allocated on `device`, so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {keys.MEMORY_PEAK_RSS_BYTES: peak if sys.platform == "darwin" else peak * 1024}  # Linux: KiB
    if device.type == "cuda":
        out[keys.MEMORY_CUDA_PEAK_ALLOCATED_BYTES] = torch.cuda.max_memory_allocated(device)
    return out


def write_run(cfg: DictConfig, out: Path, loaded, model, data, name: str, tracker: Tracker | None, *,
              history: list[dict[str, Any]], last_eval: PerplexityResult | None, initial_prompt, tokens_seen: int,
              train: dict[str, Any], clock, generations: list[str] | None = None,
              generation_s: float = 0.0) -> dict[str, Any]:
    """The one writer of a job's outputs. `model`: the PEFT model with the job's final prompt;
    `data`: its softprompt.train.pack.Data; `tracker`: its W&B run, open since the pack started
    (its curves are there already), finished here; `history`: every row it logged, in order;
    `tokens_seen`: the real tokens its prompt was trained on (its trunk's included); `train`: its
    other `train/*` metrics; `clock`: the pack's softprompt.train.pack.Clock (the `time/*` keys).
    `generations`: the tuned model's continuations of `data.prompts` when they were already
    generated (in one batch with other jobs'), and `generation_s` this job's share of that time;
    None: generated here. Returns metrics.json's content."""
    tracker = tracker or Tracker(None)
    base = data.base
    t0 = time.perf_counter()
    tuned = tuned_evaluation(cfg, loaded, model, data, last_eval, generations)
    tuned.seconds += generation_s
    trainable, total = count_parameters(model)
    metrics = eval_metrics(base, tuned, data.base_seconds, data.base_cached) | {
        **train,
        keys.TRAIN_TRAINABLE_PARAMS: trainable,
        keys.TRAIN_TOTAL_PARAMS: total,
        keys.TRAIN_TOKENS_SEEN: tokens_seen,
        keys.TRAIN_FLOPS: training_flops(model, tokens_seen),
        keys.PEFT_NUM_VIRTUAL_TOKENS: cfg.peft.num_virtual_tokens,
    } | comparison_metrics(base, tuned, data.prompts) | memory_metrics(model_device(model))
    generations = generation_rows(data.prompts, base, tuned)
    tuned_eval_s = time.perf_counter() - t0 + generation_s
    try:
        t0 = time.perf_counter()
        rundir = save_outputs(RunDir(out), cfg, loaded, model, tracker, metrics, generations, history, initial_prompt)
        metrics |= clock.job_times(tuned_eval_s, time.perf_counter() - t0)
        tracker.set_summary(metrics)
        rundir.finish(metrics)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)
    return metrics


def tuned_evaluation(cfg: DictConfig, loaded, model, data, last_eval: PerplexityResult | None,
                     generations: list[str] | None):
    """The tuned model's evaluation (every forward `write_run` runs through the base): its
    perplexities, and its generations unless `generations` are given. Under FSDP the ranks that
    write nothing call it too, in step with rank 0 (softprompt.train.pack)."""
    how = {"generations": generations} if generations is not None else tuned_generation(model)
    return evaluate(model, loaded.tokenizer, data.val_rows, data.prompts, cfg,
                    num_virtual_tokens=virtual_tokens_in_logits(model), label="tuned", train_rows=data.train_ppl_rows,
                    validation_result=last_eval, **how)


def eval_metrics(base, tuned, base_seconds: float, base_cached: bool) -> dict[str, Any]:
    """The `eval/*` keys of metrics.json: tuned and base held-out perplexity and what they cost."""
    return {
        keys.EVAL_PERPLEXITY: tuned.perplexity.perplexity,
        keys.EVAL_BASE_PERPLEXITY: base.perplexity.perplexity,
        keys.EVAL_LOSS: tuned.perplexity.loss,
        keys.EVAL_BASE_LOSS: base.perplexity.loss,
        keys.EVAL_PPL_RATIO: tuned.perplexity.perplexity / base.perplexity.perplexity,
        keys.EVAL_TOKENS: tuned.perplexity.tokens,
        keys.EVAL_RUNTIME_S: base_seconds + tuned.seconds,
        keys.EVAL_BASE_RUNTIME_S: base_seconds,
        keys.EVAL_BASE_COMPUTE_S: base.seconds,
        keys.EVAL_TUNED_RUNTIME_S: tuned.seconds,
        keys.EVAL_BASE_CACHED: int(base_cached),
    }


def generation_rows(prompts, base, tuned) -> list[dict[str, Any]]:
    """generations.jsonl: one row per eval prompt, base and tuned side by side."""
    return [{"prompt": p.prompt, **({"reference": p.reference} if p.reference is not None else {}),
             "base": b, "tuned": t} for p, b, t in zip(prompts, base.generations, tuned.generations)]


def save_outputs(rundir: RunDir, cfg: DictConfig, loaded, model, tracker: Tracker, metrics: dict[str, Any],
                 generations: list[dict[str, Any]], history: list[dict[str, Any]], initial_prompt) -> RunDir:
    """Everything of a finished run but metrics.json: the adapter (its base named portably, this
    machine's copy in the adapter record), generations, history, the learned prompt as tokens, and
    the W&B tables and adapter artifact. The caller writes metrics.json last."""
    rundir.write_adapter(lambda folder: save_adapter(model, folder, cfg, metrics),
                         adapter_record(cfg, loaded.base_path, loaded.tokenizer_path, metrics) | prompt_source(cfg))
    rundir.write_generations(generations)
    rundir.write_history(history)
    if initial_prompt is not None:  # prompt tuning, p-tuning: what the learned prompt is close to
        prompt_tokens = interpret.nearest_tokens(soft_prompt_embeddings(model), model.get_input_embeddings().weight,
                                                 loaded.tokenizer, cfg.eval.nearest_tokens, initial=initial_prompt)
        rundir.write_prompt_tokens(prompt_tokens)
        tracker.log_table(interpret.TABLE_KEY, interpret.TABLE_COLUMNS, interpret.table_rows(prompt_tokens))
    tracker.log_table(keys.GENERATIONS_TABLE, ["prompt", "reference", "base", "tuned"],
                      [[r["prompt"], r.get("reference", ""), r["base"], r["tuned"]] for r in generations])
    tracker.log_adapter(rundir.adapter, name=f"adapter-{cfg.model.name}-{cfg.dataset.name}", metadata={
        "base_model": cfg.model.name_or_path, "base_model_path": loaded.base_path, "peft_method": cfg.peft.method,
        "num_virtual_tokens": cfg.peft.num_virtual_tokens, **metrics})
    return rundir
