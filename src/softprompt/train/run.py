"""One prompt-tuning run, top to bottom: setup -> base perplexity -> train -> base and tuned eval -> save.

`run(cfg)` is a plain function (the Hydra entrypoint is a thin wrapper around it), so tests and
sweeps call it directly. Everything a run leaves is in its run directory; `metrics.json` is
written last, atomically, so its presence means the run finished.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import set_seed

from softprompt.core import distributed, keys
from softprompt.core.config import resolved
from softprompt.core.errors import UserError
from softprompt.core.provenance import provenance
from softprompt.core.rundir import RunDir
from softprompt.data.loading import load_splits, tokenize
from softprompt.evaluation.base_cache import evaluate_base
from softprompt.evaluation.evaluate import (
    comparison_metrics,
    eval_prompts,
    evaluate,
    train_subset,
)
from softprompt.models.flops import training_flops
from softprompt.models.loading import count_parameters, load_model
from softprompt.models.methods import (
    METHODS,
    soft_prompt_embeddings,
    tuned_generation,
    virtual_tokens_in_logits,
    wrap,
)
from softprompt.models.transfer import prompt_source
from softprompt.track.wandb_run import Tracker, resolve_mode, run_name
from softprompt.train import preemption, preflight, resume
from softprompt.train.outputs import eval_metrics, generation_rows, save_outputs
from softprompt.core.precision import autocast_dtype, resolve_precision
from softprompt.train.trainer import (
    EpochEval,
    LoopSettings,
    NonFiniteLossError,
    job_from_config,
    train,
    whole_run_loss,
)


def run_directory(cfg: DictConfig, run_dir: str | Path | None) -> Path:
    if run_dir is None and cfg.get("output_dir"):
        run_dir = cfg.output_dir
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Phases:
    """Where a run's wall time goes (the `time/*` keys): each phase runs from the end of the one
    before, so they add up to `time/total_s`; a phase that comes back (start-up, around the base
    evaluation) adds to its total."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds = dict.fromkeys(keys.TIME_PHASES, 0.0)

    def end(self, key: str) -> None:
        now = time.perf_counter()
        self.seconds[key] += now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        return self.seconds | {keys.TIME_TOTAL_S: self.last - self.start}


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    started = time.time()  # train/time_to_first_step_s counts from here (the process start: *_process_s)
    phases = Phases()
    # --- setup: every check a user can fail comes before any model is loaded -------------------
    preflight.check(cfg)
    if run_dir is None:
        distributed.check_run_dir_is_shared()
    main = distributed.is_main()  # under torchrun/accelerate only rank 0 logs, evaluates and writes
    wandb_mode = resolve_mode(cfg.wandb.mode) if main else "disabled"
    out = run_directory(cfg, run_dir)
    start = resume.prepare(cfg, out)  # before config.json is rewritten: resume compares with it
    if main:
        RunDir(out).start()  # a rerun in the same dir is not finished yet
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.training.precision)
    splits = load_splits(cfg.dataset, cfg.seed)
    loaded = load_model(cfg.model)
    tokenizer = loaded.tokenizer
    tokenizer_id = f"{cfg.model.source}:{loaded.tokenizer_path}"
    train_rows = tokenize(splits.train, tokenizer, cfg.training.max_length, tokenizer_id)
    val_rows = tokenize(splits.validation, tokenizer, cfg.training.max_length, tokenizer_id)
    prompts = eval_prompts(cfg.eval, splits.validation)
    config = resolved(cfg) | {"data": {"fingerprint": splits.fingerprint(), "source": splits.source,
                                       "train_rows": len(train_rows), "validation_rows": len(val_rows)},
                              "provenance": provenance()} | prompt_source(cfg)
    if main:
        RunDir(out).write_config(config)

    name = run_name(cfg, METHODS[cfg.peft.method].tag(cfg.peft))
    # SIGTERM/SIGUSR1/SIGUSR2 from here on stop the run at a step boundary (softprompt.train.preemption)
    with preemption.Watch(out if main else None) as watch:
        tracker = Tracker.start(cfg, out, config, name, mode=wandb_mode, run_id=start.wandb_run_id)
        resume.remember_wandb_id(out, tracker.run_id)
        try:
            metrics = _train_and_evaluate(cfg, out, loaded, train_rows, val_rows, prompts, precision, tracker, start,
                                           started, phases, stop=watch.requested)
            tracker.set_summary(metrics)
        except preemption.Preempted as exc:
            tracker.mark_preempting()
            tracker.finish(exit_code=exc.exit_status)
            watch.chain(exc.signum)  # submitit's handler, where there is one: it requeues the job
            raise
        except BaseException:
            tracker.finish(exit_code=1)
            raise
        tracker.finish(exit_code=0)
    return metrics


def _train_and_evaluate(cfg, out, loaded, train_rows, val_rows, prompts, precision, tracker,
                        start: resume.ResumePoint, started: float, phases: Phases, stop=None) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    main = distributed.is_main()
    train_ppl_rows = train_subset(train_rows, cfg.eval)
    base = None
    if main:
        phases.end(keys.TIME_STARTUP_S)
        # the base model is evaluated before wrapping: LoRA injects its layers into it in place
        base, base_cached, base_seconds = evaluate_base(loaded, val_rows, train_ppl_rows, prompts, cfg)
        print(f"base model: held-out perplexity {base.perplexity.perplexity:.3f} on {base.perplexity.tokens} tokens"
              f"{' (cached)' if base_cached else ''}", flush=True)
        phases.end(keys.TIME_BASE_EVAL_S)

    model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    n_virtual = virtual_tokens_in_logits(model)
    initial_prompt = soft_prompt_embeddings(model)  # None for prefix tuning and LoRA
    initial_prompt = initial_prompt.clone() if initial_prompt is not None else None
    trainable, total = count_parameters(model)
    # --- train: a plain run is a set of one job (softprompt.train.trainer) -----------------------
    job = job_from_config(cfg, model, log=tracker.log,
                          history_extra={keys.EVAL_BASE_PERPLEXITY: base.perplexity.perplexity} if main else {})
    phases.end(keys.TIME_STARTUP_S)
    try:
        result = train([job], train_rows, tokenizer.pad_token_id, LoopSettings.from_config(cfg, precision),
                       checkpoint_dir=resume.checkpoint_dir(out), resume_from=start.checkpoint,
                       epoch_eval=EpochEval(val_rows, cfg.training.eval_batch_size, autocast_dtype(cfg.eval.precision))
                       if cfg.eval.per_epoch else None,
                       run_start=started, stop=stop)
    except NonFiniteLossError as exc:
        raise UserError(str(exc)) from exc
    if not main:
        return {}
    phases.end(keys.TIME_TRAIN_S)

    # the last per-epoch evaluation already scored these very weights: not computed twice
    last = job.last_eval if job.last_eval and job.last_eval[0] == result.steps else None
    tuned = evaluate(model, tokenizer, val_rows, prompts, cfg, num_virtual_tokens=n_virtual, label="tuned",
                     train_rows=train_ppl_rows, validation_result=last[1] if last else None,
                     **tuned_generation(model))
    print(f"tuned model: held-out perplexity {tuned.perplexity.perplexity:.3f} "
          f"(base {base.perplexity.perplexity:.3f})", flush=True)

    metrics = eval_metrics(base, tuned, base_seconds, base_cached) | {
        keys.TRAIN_LOSS: whole_run_loss(job, result.steps),
        keys.TRAIN_EPOCHS: result.epoch,
        keys.TRAIN_STEPS: result.steps,
        keys.TRAIN_RUNTIME_S: result.seconds,
        keys.TRAIN_TOKENS_PER_SECOND: result.real_tokens / result.seconds,
        keys.TRAIN_TIME_TO_FIRST_STEP_S: result.time_to_first_step_s,
        keys.TRAIN_TIME_TO_FIRST_STEP_PROCESS_S: result.time_to_first_step_process_s,
        keys.TRAIN_TRAINABLE_PARAMS: trainable,
        keys.TRAIN_TOTAL_PARAMS: total,
        keys.TRAIN_TOKENS_SEEN: result.real_tokens,
        keys.TRAIN_FLOPS: training_flops(model, result.real_tokens),
        keys.TRAIN_PRECISION: precision,
        keys.TRAIN_RESUMED_FROM_STEP: result.resumed_from_step,
        keys.PEFT_NUM_VIRTUAL_TOKENS: cfg.peft.num_virtual_tokens,
    } | comparison_metrics(base, tuned, prompts)
    rows = generation_rows(prompts, base, tuned)
    phases.end(keys.TIME_TUNED_EVAL_S)

    # --- save: adapter and generations first, metrics.json last (its presence = finished) ------
    rundir = save_outputs(RunDir(out), cfg, loaded, model, tracker, metrics, rows, job.history, initial_prompt)
    phases.end(keys.TIME_SAVE_S)
    metrics |= phases.metrics()
    rundir.finish(metrics)
    return metrics


