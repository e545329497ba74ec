"""Evaluation of one model (base or tuned): held-out perplexity and a generation per prompt."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from omegaconf import DictConfig

from softprompt.generation import GenerationSettings, generate
from softprompt.perplexity import PerplexityResult, perplexity


@dataclass
class EvalPrompt:
    prompt: str
    reference: str | None = None  # the rest of a held-out example, when the prompt is its prefix


@dataclass
class ModelEval:
    perplexity: PerplexityResult
    generations: list[str]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


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


def evaluate(model, tokenizer, validation_rows: list[list[int]], prompts: list[EvalPrompt], cfg: DictConfig,
             generation_model=None, soft_prompt=None, num_virtual_tokens: int = 0, label: str = "",
             known_perplexity: PerplexityResult | None = None) -> ModelEval:
    """Perplexity of `model` on the held-out rows and its continuation of each prompt.

    `generation_model` is the plain transformers model used for generation (the base under a PEFT
    model); `soft_prompt` is placed before each prompt's text, as in training.
    """
    start = time.perf_counter()
    ppl = known_perplexity or perplexity(model, validation_rows, tokenizer.pad_token_id, cfg.eval.batch_size * 2,
                                         num_virtual_tokens)
    texts = generate(generation_model or model, tokenizer, [p.prompt for p in prompts], generation_settings(cfg.eval),
                     soft_prompt=soft_prompt, batch_size=cfg.eval.batch_size, desc=f"generating ({label})")
    return ModelEval(ppl, texts, time.perf_counter() - start)
