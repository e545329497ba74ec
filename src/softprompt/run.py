"""One prompt-tuning run, top to bottom: setup -> base perplexity -> train -> base and tuned eval -> save.

`run(cfg)` is a plain function (the Hydra entrypoint is a thin wrapper around it), so tests and
sweeps call it directly. Everything a run leaves is in its run directory; `metrics.json` is
written last, atomically, so its presence means the run finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback, set_seed

from softprompt import keys
from softprompt.config import resolved, validate
from softprompt.data import load_splits, tokenize
from softprompt.errors import UserError
from softprompt.evaluation import eval_prompts, evaluate
from softprompt.modeling import count_parameters, load_model
from softprompt.peft_methods import soft_prompt_embeddings, virtual_tokens_in_logits, wrap
from softprompt.perplexity import perplexity
from softprompt.tracking import Tracker, resolve_mode
from softprompt.training import FirstStepClock, NonFiniteLossError, build_trainer, resolve_precision


def run_directory(cfg: DictConfig, run_dir: str | Path | None) -> Path:
    if run_dir is None and cfg.get("output_dir"):
        run_dir = cfg.output_dir
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_name(cfg: DictConfig) -> str:
    if cfg.wandb.name:
        return cfg.wandb.name
    parts = [f"vt{cfg.peft.num_virtual_tokens}", f"ep{cfg.training.epochs}"]
    if cfg.peft.method != "prompt_tuning":
        parts.insert(0, cfg.peft.method)
    return "-".join(parts)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    # --- setup: every check a user can fail comes before any model is loaded -------------------
    validate(cfg)
    wandb_mode = resolve_mode(cfg.wandb.mode)
    out = run_directory(cfg, run_dir)
    (out / "metrics.json").unlink(missing_ok=True)  # a rerun in the same dir is not finished yet
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
                                       "train_rows": len(train_rows), "validation_rows": len(val_rows)}}
    _write_json(out / "config.json", config)

    tracker = Tracker.start(cfg, out, config, run_name(cfg), mode=wandb_mode)
    try:
        metrics = _train_and_evaluate(cfg, out, loaded, train_rows, val_rows, prompts, precision, tracker)
        tracker.set_summary(metrics)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)
    return metrics


def _train_and_evaluate(cfg, out, loaded, train_rows, val_rows, prompts, precision, tracker) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    # only the base perplexity before training (the per-epoch curves show it); the base model's
    # generations come after training: the base is frozen, and training starts seconds sooner
    base_ppl = perplexity(loaded.model, val_rows, tokenizer.pad_token_id, cfg.eval.batch_size * 2)
    print(f"base model: held-out perplexity {base_ppl.perplexity:.3f} on {base_ppl.tokens} tokens", flush=True)

    model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    n_virtual = virtual_tokens_in_logits(model)
    trainable, total = count_parameters(model)
    history: list[dict[str, Any]] = []
    first_step = FirstStepClock()
    callbacks = [_EpochEval(val_rows, tokenizer.pad_token_id, cfg, n_virtual, base_ppl, tracker, history),
                 _LogToTracker(tracker), first_step]
    trainer = build_trainer(model, tokenizer, train_rows, cfg, out / "checkpoints", precision, callbacks)
    try:
        result = trainer.train()
    except NonFiniteLossError as exc:
        raise UserError(str(exc)) from exc
    train_seconds = result.metrics["train_runtime"]

    base = evaluate(loaded.model, tokenizer, val_rows, prompts, cfg, label="base", known_perplexity=base_ppl)

    tuned = evaluate(model, tokenizer, val_rows, prompts, cfg, generation_model=model.get_base_model(),
                     soft_prompt=soft_prompt_embeddings(model), num_virtual_tokens=n_virtual, label="tuned")
    print(f"tuned model: held-out perplexity {tuned.perplexity.perplexity:.3f} "
          f"(base {base.perplexity.perplexity:.3f})", flush=True)

    metrics = {
        keys.EVAL_PERPLEXITY: tuned.perplexity.perplexity,
        keys.EVAL_BASE_PERPLEXITY: base.perplexity.perplexity,
        keys.EVAL_LOSS: tuned.perplexity.loss,
        keys.EVAL_BASE_LOSS: base.perplexity.loss,
        keys.EVAL_PPL_RATIO: tuned.perplexity.perplexity / base.perplexity.perplexity,
        keys.EVAL_TOKENS: tuned.perplexity.tokens,
        keys.EVAL_RUNTIME_S: base.seconds + tuned.seconds,
        keys.TRAIN_LOSS: result.training_loss,
        keys.TRAIN_EPOCHS: trainer.state.epoch,
        keys.TRAIN_STEPS: trainer.state.global_step,
        keys.TRAIN_RUNTIME_S: train_seconds,
        keys.TRAIN_TOKENS_PER_SECOND: trainer.real_tokens / train_seconds,
        keys.TRAIN_TIME_TO_FIRST_STEP_S: first_step.seconds,
        keys.TRAIN_TRAINABLE_PARAMS: trainable,
        keys.TRAIN_TOTAL_PARAMS: total,
        keys.TRAIN_PRECISION: precision,
        keys.PEFT_NUM_VIRTUAL_TOKENS: cfg.peft.num_virtual_tokens,
    }
    rows = [{"prompt": p.prompt, **({"reference": p.reference} if p.reference is not None else {}),
             "base": b, "tuned": t} for p, b, t in zip(prompts, base.generations, tuned.generations)]

    # --- save: adapter and generations first, metrics.json last (its presence = finished) ------
    model.peft_config["default"].base_model_name_or_path = loaded.base_path
    adapter_tmp = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=out))
    model.save_pretrained(adapter_tmp)
    _write_json(adapter_tmp / "softprompt.json", {
        "base_model": loaded.base_path, "tokenizer": loaded.tokenizer_path, "model": resolved(cfg.model),
        "peft": resolved(cfg.peft), "eval": resolved(cfg.eval), "metrics": metrics,
    })
    _replace_dir(adapter_tmp, out / "adapter")
    _write_text(out / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    tracker.log_table(keys.GENERATIONS_TABLE, ["prompt", "reference", "base", "tuned"],
                      [[r["prompt"], r.get("reference", ""), r["base"], r["tuned"]] for r in rows])
    tracker.log_adapter(out / "adapter", name=f"adapter-{cfg.model.name}-{cfg.dataset.name}", metadata={
        "base_model": loaded.base_path, "peft_method": cfg.peft.method,
        "num_virtual_tokens": cfg.peft.num_virtual_tokens, **metrics})
    _write_json(out / "metrics.json", metrics)
    return metrics


class _EpochEval(TrainerCallback):
    """Held-out perplexity after every epoch: a curve, with the base model's value beside it."""

    def __init__(self, val_rows, pad_id, cfg, n_virtual, base, tracker, history):
        self.val_rows, self.pad_id, self.cfg, self.n_virtual = val_rows, pad_id, cfg, n_virtual
        self.base, self.tracker, self.history = base, tracker, history

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self.cfg.eval.per_epoch:
            return
        result = perplexity(model, self.val_rows, self.pad_id, self.cfg.eval.batch_size * 2, self.n_virtual)
        row = {keys.EPOCH: round(state.epoch or 0, 4), keys.TRAIN_STEP: state.global_step,
               keys.EVAL_LOSS: result.loss, keys.EVAL_PERPLEXITY: result.perplexity,
               keys.EVAL_BASE_PERPLEXITY: self.base.perplexity}
        self.history.append(row)
        self.tracker.log(row)


class _LogToTracker(TrainerCallback):
    """Trainer's log lines (loss, learning rate, grad norm) under our key names."""

    NAMES = {"loss": keys.TRAIN_LOSS, "learning_rate": keys.TRAIN_LEARNING_RATE, "grad_norm": keys.TRAIN_GRAD_NORM}

    def __init__(self, tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {self.NAMES[k]: v for k, v in (logs or {}).items() if k in self.NAMES}
        if values:
            self.tracker.log(values | {keys.TRAIN_STEP: state.global_step, keys.EPOCH: state.epoch})


# --- atomic writes -------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
