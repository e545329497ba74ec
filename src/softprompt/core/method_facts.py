"""What the cheap checks need to know about each PEFT method: a torch-free table.

`FACTS[name]` (`name` = `peft.method` = the preset `conf/peft/<name>.yaml`) says which `peft.*`
keys the method reads, whether its prompt is input embeddings, whether it has virtual tokens,
whether it leaves the base model as it is, and checks its own settings. The config schema
(softprompt.core.config) and the checks before torch is imported (softprompt.train.preflight)
ask this table; softprompt.models.methods builds each method's torch side (PEFT config,
generation, fast loss) on the same entry. Adding a method is one entry here, one in
models/methods.py, and its preset YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig

from softprompt.core.errors import UserError

PEFT_INITS = ("random", "text", "sample_vocab", "from_run")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class MethodFacts:
    name: str  # peft.method
    keys: tuple[str, ...]  # the peft.* keys it reads (besides `method`)
    # its prompt is learned input embeddings placed before the text: the fast loss, nearest
    # tokens, batched generation with a soft prompt, transfer from another run apply
    soft_prompt: bool
    uses_virtual_tokens: bool  # peft.num_virtual_tokens means something for it
    # its wrapper leaves the base model as it is, so several jobs' adapters can sit on one base in
    # one process (softprompt.train.pack); LoRA injects its layers into the base
    shares_base: bool
    check: Callable[[DictConfig], None]  # its own settings (cfg.peft): UserError when one is wrong
    # why training.gradient_checkpointing cannot serve it (None: it can)
    no_checkpointing: str | None = None


def _no_checks(p: DictConfig) -> None:
    pass


def _check_prompt_tuning(p: DictConfig) -> None:
    _check(p.init in PEFT_INITS, f"peft.init={p.init!r} is not one of {', '.join(PEFT_INITS)}")
    if p.init == "text":
        _check(bool(p.init_text and p.init_text.strip()),
               "peft.init=text needs peft.init_text (or choose peft.init=random|sample_vocab)")
    if p.init == "from_run":
        _check(bool(p.init_from), "peft.init=from_run needs peft.init_from=RUN_DIR (a finished run or its "
                                  "adapter/ folder)")


def _check_p_tuning(p: DictConfig) -> None:
    _check(p.encoder_hidden_size is not None and p.encoder_hidden_size >= 1,
           f"peft.encoder_hidden_size must be >= 1 (got {p.encoder_hidden_size})")


def _check_lora(p: DictConfig) -> None:
    _check(p.lora_r is not None and p.lora_r >= 1, f"peft.lora_r must be >= 1 (got {p.lora_r})")
    _check(p.lora_alpha is not None, "peft.lora_alpha must be set for peft.method=lora")
    _check(p.lora_dropout is not None and 0 <= p.lora_dropout < 1,
           f"peft.lora_dropout must be in [0, 1) (got {p.lora_dropout})")


FACTS: dict[str, MethodFacts] = {f.name: f for f in (
    MethodFacts("prompt_tuning", ("num_virtual_tokens", "init", "init_text", "init_from"), soft_prompt=True,
                uses_virtual_tokens=True, shares_base=True, check=_check_prompt_tuning),
    MethodFacts("prefix_tuning", ("num_virtual_tokens",), soft_prompt=False, uses_virtual_tokens=True,
                shares_base=True, check=_no_checks,
                # measured (transformers 5.25, peft 0.21): the layers drop the cache, and the shapes
                # no longer match; PEFT itself refuses it when checkpointing is on before wrapping
                no_checkpointing="its prefix reaches every layer as a key/value cache, and transformers' "
                                 "checkpointed layers run without a cache"),
    MethodFacts("p_tuning", ("num_virtual_tokens", "encoder_hidden_size"), soft_prompt=True,
                uses_virtual_tokens=True, shares_base=True, check=_check_p_tuning),
    MethodFacts("lora", ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"), soft_prompt=False,
                uses_virtual_tokens=False, shares_base=False, check=_check_lora),
)}
PEFT_METHODS = tuple(FACTS)


def facts(name: str) -> MethodFacts:
    try:
        return FACTS[name]
    except KeyError:
        raise UserError(f"peft.method={name!r} is not one of {', '.join(PEFT_METHODS)}") from None


def readers(key: str) -> list[str]:
    """The methods that read `peft.<key>`."""
    return [f.name for f in FACTS.values() if key in f.keys]
