"""The PEFT methods, one registry entry each: everything that differs between methods lives here.

`METHODS[name]` (`name` = `peft.method` = the preset `conf/peft/<name>.yaml`) is a `Method` that
owns its PEFT config builder, its PEFT type (as `adapter_config.json` spells it), how its logits
line up with the text, whether it has soft-prompt input embeddings, how it generates, whether the
fast loss applies and its run-name tag. Training, evaluation, the generation CLI, the demo and
the multi-adapter pool ask the entry; none of them branches on the method. A saved adapter finds
its entry by PEFT type (`by_peft_type`).

How each method generates (batched, equal to one prompt at a time; not `PeftModel.generate`,
which fails on a Bloom batch of more than one prompt (ALiBi size mismatch) and generates garbage
from a right-padded SmolLM2 batch):
- prompt tuning, p-tuning: the frozen base with the learned input embeddings after the left
  padding and before the text (`softprompt.models.generation`);
- prefix tuning: the base continuing from a cache pre-filled with the learned prefix
  (`softprompt.models.prefix_generation`);
- LoRA: the base with the adapter layers injected and active, nothing prepended.

The facts the cheap checks need (the keys a method reads, whether its prompt is input embeddings,
whether it shares the base) live torch-free in softprompt.core.method_facts; each entry here takes
them from there, so they are said once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
from omegaconf import DictConfig

from softprompt.core.errors import UserError
from softprompt.core.method_facts import FACTS

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

# (tokenizer, prompts, settings, batch_size=..., desc=...) -> one continuation per prompt
GenerateFn = Callable[..., list[str]]


@dataclass(frozen=True)
class Method:
    name: str  # peft.method
    preset: str  # conf/peft/<preset>.yaml
    peft_type: str  # PeftConfig.peft_type.value
    description: str  # what "tuned" means for this method, for people (demo, model card)
    # (cfg.peft, tokenizer path) -> the PEFT config
    build_config: Callable[[DictConfig, str], "PeftConfig"]
    # (peft_model) -> its batched generation function
    generator: Callable[["PeftModel"], GenerateFn]
    # the hidden-state loss of softprompt.models.fast_loss reproduces its training loss
    fast_loss: bool
    # cfg.peft -> the size part of a run name ("vt8", "r8")
    size_tag: Callable[[DictConfig], str]

    @property
    def soft_prompt(self) -> bool:
        """It prepends learned input embeddings: its logits have num_virtual_tokens positions
        before the text, and the prompt can be read back as embeddings."""
        return FACTS[self.name].soft_prompt

    @property
    def uses_virtual_tokens(self) -> bool:
        """peft.num_virtual_tokens means something for it (the size shown in names and cards)."""
        return FACTS[self.name].uses_virtual_tokens

    @property
    def shares_base(self) -> bool:
        """Its wrapper leaves the base model as it is (softprompt.train.pack puts several jobs on one base)."""
        return FACTS[self.name].shares_base

    def tag(self, peft_cfg: DictConfig) -> str:
        """The run-name tag: `vt8` for prompt tuning (the seed's method, kept short),
        `p_tuning-vt8`, `prefix_tuning-vt8`, `lora-r8` for the others."""
        size = self.size_tag(peft_cfg)
        return size if self.name == DEFAULT else f"{self.name}-{size}"

    def virtual_tokens_in_logits(self, peft_model: "PeftModel") -> int:
        """Positions PEFT puts before the text in the logits (prefix tuning keeps its prompt in
        the KV cache and LoRA adds none: 0)."""
        return peft_model.active_peft_config.num_virtual_tokens if self.soft_prompt else 0

    def soft_prompt_embeddings(self, peft_model: "PeftModel") -> torch.Tensor | None:
        """The (num_virtual_tokens, hidden) input embeddings the model prepends, or None."""
        if not self.soft_prompt:
            return None
        with torch.no_grad():  # p-tuning: the prompt encoder's output, as in the forward pass
            return peft_model.get_prompt(batch_size=1)[0].detach()


# --- config builders ---------------------------------------------------------------------------


def _prompt_tuning_config(cfg: DictConfig, tokenizer_path: str):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    # from_run: a cheap random start that `wrap` replaces with the source run's prompt
    inits = {"random": PromptTuningInit.RANDOM, "text": PromptTuningInit.TEXT,
             "sample_vocab": PromptTuningInit.SAMPLE_VOCAB, "from_run": PromptTuningInit.RANDOM}
    kwargs = {}
    if cfg.init == "text":
        # PEFT tokenizes the init text itself, from this path (a local dir for offline models)
        kwargs = dict(prompt_tuning_init_text=cfg.init_text, tokenizer_name_or_path=tokenizer_path)
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                              prompt_tuning_init=inits[cfg.init], **kwargs)


def _p_tuning_config(cfg: DictConfig, tokenizer_path: str):
    from peft import PromptEncoderConfig, TaskType

    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                               encoder_hidden_size=cfg.encoder_hidden_size)


def _prefix_tuning_config(cfg: DictConfig, tokenizer_path: str):
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)


def _lora_config(cfg: DictConfig, tokenizer_path: str):
    from peft import LoraConfig, TaskType

    targets = list(cfg.lora_target_modules) if cfg.lora_target_modules else None
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets)


# --- generation --------------------------------------------------------------------------------


def _with_soft_prompt(peft_model: "PeftModel") -> GenerateFn:
    from softprompt.models.generation import generate

    # read once, when asked: the multi-adapter pool asks after switching to the adapter
    prompt = method_of(peft_model).soft_prompt_embeddings(peft_model)
    return partial(generate, peft_model.get_base_model(), soft_prompt=prompt)


def _with_prefix_cache(peft_model: "PeftModel") -> GenerateFn:
    from softprompt.models.prefix_generation import generate_with_prefix

    return partial(generate_with_prefix, peft_model)


def _with_active_adapters(peft_model: "PeftModel") -> GenerateFn:
    from softprompt.models.generation import generate

    # get_base_model() is the transformers model with the LoRA layers injected in place; they
    # act unless the caller is inside `peft_model.disable_adapter()`
    return partial(generate, peft_model.get_base_model())


def _virtual_tokens(cfg: DictConfig) -> str:
    return f"vt{cfg.num_virtual_tokens}"


DEFAULT = "prompt_tuning"

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("prompt_tuning", "prompt_tuning", "PROMPT_TUNING",
           "the base model with the trained soft prompt (input embeddings) before the text",
           _prompt_tuning_config, generator=_with_soft_prompt,
           fast_loss=True, size_tag=_virtual_tokens),
    Method("prefix_tuning", "prefix_tuning", "PREFIX_TUNING",
           "the base model with the trained prefix in every layer's key/value cache",
           _prefix_tuning_config, generator=_with_prefix_cache,
           # its prompt is not in the input embeddings: the fast loss's [prompt, text] input does not apply
           fast_loss=False, size_tag=_virtual_tokens),
    Method("p_tuning", "p_tuning", "P_TUNING",
           "the base model with the soft prompt from the trained prompt encoder before the text",
           _p_tuning_config, generator=_with_soft_prompt,
           fast_loss=True, size_tag=_virtual_tokens),
    Method("lora", "lora", "LORA",
           "the base model with the trained low-rank (LoRA) updates in its attention projections",
           _lora_config, generator=_with_active_adapters,
           # the adapters change every layer: the fast loss's frozen-decoder path does not apply
           fast_loss=False, size_tag=lambda cfg: f"r{cfg.lora_r}"),
)}

METHODS_BY_TYPE: dict[str, Method] = {m.peft_type: m for m in METHODS.values()}


def get(name: str) -> Method:
    """The entry for `peft.method=name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"peft.method={name!r} is not one of {', '.join(METHODS)}") from None


def by_peft_type(peft_type: str, where: str = "this adapter") -> Method:
    """The entry for a saved adapter's `peft_type` (`adapter_config.json`)."""
    method = METHODS_BY_TYPE.get(str(peft_type))
    if method is None:
        raise UserError(f"{where} uses PEFT method {peft_type or '(none)'}, which softprompt does not train or "
                        f"serve (supported: {', '.join(METHODS_BY_TYPE)})")
    return method


def method_of(peft_model: "PeftModel") -> Method:
    """The entry for the active adapter of a `PeftModel`."""
    return by_peft_type(peft_model.active_peft_config.peft_type.value)


def wrap(model: torch.nn.Module, cfg: DictConfig, tokenizer_path: str) -> "PeftModel":
    """The PEFT model the run trains, its prompt initialised as `cfg.init` says (from_run:
    softprompt.models.transfer)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, get(cfg.method).build_config(cfg, tokenizer_path))
    if cfg.get("init") == "from_run":
        from softprompt.models.transfer import start_from_source

        start_from_source(peft_model, cfg, tokenizer_path)
    return peft_model


# --- what callers ask of a PeftModel, answered by its entry --------------------------------------


def virtual_tokens_in_logits(peft_model: "PeftModel") -> int:
    return method_of(peft_model).virtual_tokens_in_logits(peft_model)


def soft_prompt_embeddings(peft_model: "PeftModel") -> torch.Tensor | None:
    return method_of(peft_model).soft_prompt_embeddings(peft_model)


def tuned_generation(peft_model: "PeftModel") -> dict:
    """`evaluation.evaluate` arguments that make the tuned model generate as it was trained."""
    return {"generate_fn": method_of(peft_model).generator(peft_model)}
