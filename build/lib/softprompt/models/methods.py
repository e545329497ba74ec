"""The PEFT method wrapped around the frozen base: a soft prompt (the subject of this harness) or
one of its cousins for comparison."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from peft import (
    PeftModel,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)

PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")

_INITS = {"random": PromptTuningInit.RANDOM, "text": PromptTuningInit.TEXT, "sample_vocab": PromptTuningInit.SAMPLE_VOCAB}


def peft_config(cfg: DictConfig, tokenizer_path: str):
    if cfg.method == "prompt_tuning":
        kwargs = {}
        if cfg.init == "text":
            # PEFT tokenizes the init text itself, from this path (a local dir for offline models)
            kwargs = dict(prompt_tuning_init_text=cfg.init_text, tokenizer_name_or_path=tokenizer_path)
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                  prompt_tuning_init=_INITS[cfg.init], **kwargs)
    if cfg.method == "prefix_tuning":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "p_tuning":
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                   encoder_hidden_size=cfg.encoder_hidden_size)
    if cfg.method == "lora":
        from peft import LoraConfig

        targets = list(cfg.lora_target_modules) if cfg.lora_target_modules else None
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=targets)
    raise ValueError(f"unknown PEFT method {cfg.method}")


def wrap(model: torch.nn.Module, cfg: DictConfig, tokenizer_path: str) -> PeftModel:
    return get_peft_model(model, peft_config(cfg, tokenizer_path))


def virtual_tokens_in_logits(peft_model: PeftModel) -> int:
    """How many positions PEFT prepends to the logits (prompt tuning and p-tuning do; prefix
    tuning puts its prompt in the KV cache instead; LoRA adds none)."""
    config = peft_model.active_peft_config
    if config.peft_type.value in ("PROMPT_TUNING", "P_TUNING"):
        return config.num_virtual_tokens
    return 0


def soft_prompt_embeddings(peft_model: PeftModel) -> torch.Tensor | None:
    """The (num_virtual_tokens, hidden) input embeddings the model prepends, or None when the
    method does not work through input embeddings."""
    if virtual_tokens_in_logits(peft_model) == 0:
        return None
    with torch.no_grad():
        return peft_model.get_prompt(batch_size=1)[0].detach()


def tuned_generation(peft_model: PeftModel) -> dict:
    """`evaluation.evaluate` arguments that make the tuned model generate as it was trained.

    - prompt tuning, p-tuning: the base model with the soft prompt before each text;
    - LoRA: the base model with the adapters injected (and active), nothing prepended;
    - prefix tuning: the prefix in the key/value cache (softprompt.models.prefix_generation).
    """
    if peft_model.active_peft_config.peft_type.value == "PREFIX_TUNING":
        from functools import partial

        from softprompt.models.prefix_generation import generate_with_prefix

        return {"generate_fn": partial(generate_with_prefix, peft_model)}
    return {"generation_model": peft_model.get_base_model(), "soft_prompt": soft_prompt_embeddings(peft_model)}
