"""Evaluation of one model (base or tuned): held-out perplexity and a generation per prompt."""

from __future__ import annotations

import time
from dataclasses import dataclass

from omegaconf import DictConfig

from softprompt.core import keys
from softprompt.core.precision import autocast_dtype, model_device
from softprompt.evaluation.gen_metrics import generation_metrics
from softprompt.evaluation.perplexity import PerplexityResult, perplexity
from softprompt.models.generation import GenerationSettings, generate


@dataclass
class EvalPrompt:
    prompt: str
    reference: str | None = None  # the rest of a held-out example, when the prompt is its prefix


@dataclass
class ModelEval:
    perplexity: PerplexityResult
    generations: list[str]
    seconds: float = 0.0
    # perplexity on a capped subset of the training split (eval.train_perplexity_rows), or None
    train_perplexity: PerplexityResult | None = None


def eval_prompts(cfg: DictConfig, validation_texts: list[str]) -> list[EvalPrompt]:
    """The configured prompts, then a few held-out examples split into prefix and reference."""
    prompts = [EvalPrompt(p) for p in cfg.prompts]
    for text in validation_texts[: cfg.num_heldout_generations]:
        words = text.split()
        if len(words) < 4:
            continue
        cut = max(1, round(len(words) * cfg.heldout_prefix_fraction))
        prompts.append(EvalPrompt(" ".join(words[:cut]), " ".join(words[cut:])))
    return prompts


def generation_settings(cfg: DictConfig) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty)


def train_subset(train_rows: list[list[int]], cfg: DictConfig) -> list[list[int]]:
    """The training rows scored for `train/perplexity`: the first `eval.train_perplexity_rows` of
    the (already shuffled) split, so base and tuned see the same rows and the cost stays capped."""
    return train_rows[: cfg.train_perplexity_rows]


def evaluate(model, tokenizer, validation_rows: list[list[int]], prompts: list[EvalPrompt], cfg: DictConfig,
             generation_model=None, soft_prompt=None, num_virtual_tokens: int = 0, label: str = "",
             train_rows: list[list[int]] | None = None, validation_result: PerplexityResult | None = None,
             generate_fn=None, generations: list[str] | None = None) -> ModelEval:
    """Perplexity of `model` on the held-out rows (and `train_rows`) and its continuation of each prompt.

    `generation_model` is the plain transformers model used for generation (the base under a PEFT
    model); `soft_prompt` is placed before each prompt's text, as in training.
    `validation_result`, when given, is this very model's held-out perplexity already computed
    (the last per-epoch evaluation) and is not computed again. `generate_fn` replaces the
    generation path where the prompt does not live in the input embeddings (prefix tuning): it is
    called as `generate_fn(tokenizer, prompts, settings, batch_size=..., desc=...)`. `generations`,
    when given, are this very model's continuations of `prompts`, already generated (the pack engine
    decodes the prompts of several jobs in one batch): they are not generated again.
    """
    start = time.perf_counter()
    batch = cfg.training.eval_batch_size
    dtype = autocast_dtype(cfg.eval.precision, model_device(model))
    ppl = validation_result or perplexity(model, validation_rows, tokenizer.pad_token_id, batch, num_virtual_tokens,
                                          autocast_dtype=dtype, desc=f"held-out perplexity ({label})")
    train_ppl = None
    if train_rows:
        train_ppl = perplexity(model, train_rows, tokenizer.pad_token_id, batch, num_virtual_tokens,
                               autocast_dtype=dtype, desc=f"train perplexity ({label})")
    if generations is not None:
        if len(generations) != len(prompts):
            raise ValueError(f"{len(generations)} generations for {len(prompts)} prompts")
        texts = list(generations)
    elif generate_fn is None:
        texts = generate(generation_model or model, tokenizer, [p.prompt for p in prompts],
                         generation_settings(cfg.eval), soft_prompt=soft_prompt, batch_size=cfg.eval.batch_size,
                         desc=f"generating ({label})")
    else:
        texts = generate_fn(tokenizer, [p.prompt for p in prompts], generation_settings(cfg.eval),
                            batch_size=cfg.eval.batch_size, desc=f"generating ({label})")
    return ModelEval(ppl, texts, time.perf_counter() - start, train_ppl)


def comparison_metrics(base: ModelEval, tuned: ModelEval, prompts: list[EvalPrompt]) -> dict[str, float]:
    """`train/...` perplexities and `gen/...` metrics of the held-out generations, base and tuned."""
    out: dict[str, float] = {}
    if base.train_perplexity and tuned.train_perplexity:
        out |= {keys.TRAIN_PERPLEXITY: tuned.train_perplexity.perplexity,
                keys.TRAIN_BASE_PERPLEXITY: base.train_perplexity.perplexity,
                keys.TRAIN_PERPLEXITY_TOKENS: tuned.train_perplexity.tokens}
    held = [i for i, p in enumerate(prompts) if p.reference is not None]
    references = [prompts[i].reference for i in held]
    for label, result in (("base", base), ("tuned", tuned)):
        values = generation_metrics([result.generations[i] for i in held], references)
        out |= {keys.gen_key(label, name): value for name, value in values.items()}
    if held:
        out[keys.GEN_EXAMPLES] = len(held)
    return out
