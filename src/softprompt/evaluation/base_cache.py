"""The base model's evaluation, cached on disk and shared by every job of a sweep.

Without a soft prompt the base model's perplexities and generations depend only on the model, the
tokens it is shown and the evaluation settings: a sweep over `num_virtual_tokens` x `epochs`
computes the same base evaluation in every job. The key below hashes everything that determines
it; change any of it (other rows, prompts, max_length, generation settings, weights, library
versions) and the evaluation is recomputed. Parallel jobs wait on a per-key file lock instead of
computing the same thing twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import peft
import torch
import transformers
from omegaconf import DictConfig

from softprompt.core import cache
from softprompt.core.config import BUILT_SOURCES, resolved
from softprompt.core.precision import model_device, resolve_precision
from softprompt.evaluation.evaluate import EvalPrompt, ModelEval, evaluate
from softprompt.evaluation.perplexity import PerplexityResult

SCHEMA = 2  # bump when what is stored (or how it is computed) changes


def _weights_identity(loaded, model_cfg) -> object:
    """What names the exact weights: files (size, mtime) of a local dir; the Hub commit otherwise."""
    if model_cfg.source in BUILT_SOURCES:
        # built from the config with a fixed seed; the versions in the key cover the init code
        return model_cfg.source
    path = Path(loaded.base_path)
    if path.is_dir():
        return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                      if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".model", ".gguf"))
    return getattr(loaded.model.config, "_commit_hash", None) or model_cfg.revision


def base_eval_key(cfg, loaded, validation_rows: list[list[int]], train_rows: list[list[int]],
                  prompt_texts: list[str]) -> str:
    model_cfg = {k: v for k, v in resolved(cfg.model).items() if k != "name"}  # name is only a label
    tok = loaded.tokenizer
    param = next(loaded.model.parameters())
    parts = {
        "schema": SCHEMA,
        "model": model_cfg,
        "base_path": loaded.base_path,
        "weights": _weights_identity(loaded, cfg.model),
        "dtype": str(param.dtype),
        "device": param.device.type,
        "attn": getattr(loaded.model.config, "_attn_implementation", None),
        "tokenizer": [loaded.tokenizer_path, len(tok), tok.pad_token_id, tok.eos_token_id,
                      [tok(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]],
        "max_length": cfg.training.max_length,  # already in the rows; kept for readability of the key
        "validation_rows": validation_rows,
        "train_rows": train_rows,
        "prompts": prompt_texts,
        "eval": {k: cfg.eval[k] for k in ("max_new_tokens", "repetition_penalty", "batch_size")}
        | {"precision": resolve_precision(cfg.eval.precision, model_device(loaded.model)),
           "perplexity_batch_size": cfg.training.eval_batch_size},
        "versions": [torch.__version__, transformers.__version__, peft.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _to_json(result: ModelEval) -> dict:
    return {"perplexity": result.perplexity.as_dict(),
            "train_perplexity": result.train_perplexity.as_dict() if result.train_perplexity else None,
            "generations": result.generations, "seconds": result.seconds}


def _from_json(data: dict) -> ModelEval:
    train = data.get("train_perplexity")
    return ModelEval(perplexity=PerplexityResult(**data["perplexity"]), generations=data["generations"],
                     seconds=data["seconds"], train_perplexity=PerplexityResult(**train) if train else None)


def cached_evaluation(key: str, compute: Callable[[], ModelEval], enabled: bool = True) -> tuple[ModelEval, bool]:
    """(evaluation, cache_hit): the stored evaluation for `key`, or `compute()` stored under it.

    Parallel jobs of a sweep wait on the entry's lock instead of computing it twice; a damaged
    entry is computed again (see `softprompt.core.cache`). The returned `seconds` is what the
    evaluation cost when it was computed; the caller times what it spends now.
    """
    if not enabled:
        return compute(), False
    fresh: list[ModelEval] = []

    def build() -> dict:
        fresh.append(compute())
        return _to_json(fresh[0]) | {"created": time.time()}

    result, hit = cache.json_entry("base_eval", key, build, check=_from_json)
    return (result, True) if hit else (fresh[0], False)


def evaluate_base(loaded, validation_rows: list[list[int]], train_rows: list[list[int]], prompts: list[EvalPrompt],
                  cfg: DictConfig) -> tuple[ModelEval, bool, float]:
    """The base model's evaluation, from the on-disk cache when `eval.cache_base` and it is there.

    Returns (evaluation, cache_hit, seconds spent now).
    """
    start = time.perf_counter()
    key = base_eval_key(cfg, loaded, validation_rows, train_rows, [p.prompt for p in prompts])
    result, hit = cached_evaluation(
        key, lambda: evaluate(loaded.model, loaded.tokenizer, validation_rows, prompts, cfg, label="base",
                              train_rows=train_rows),
        enabled=cfg.eval.cache_base)
    return result, hit, time.perf_counter() - start
