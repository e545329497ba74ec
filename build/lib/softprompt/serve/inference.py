"""A saved adapter and its base model, ready to generate: base and tuned continuations of the same
prompts under the same settings (used by scripts/generate.py and scripts/demo.py).

Generation goes through `softprompt.models.generation.generate` (our own `inputs_embeds` path), never
`PeftModel.generate`, which breaks on batches (see KNOWN.md). How the tuned model generates
depends on the PEFT method; `_TUNED` maps a PEFT type to a builder of that function, so methods
that work inside the model's layers (LoRA, ...) can be added next to prompt learning.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from softprompt.core.errors import UserError
from softprompt.models.generation import GenerationSettings, generate
from softprompt.models.loading import load_model
from softprompt.serve.adapters import AdapterInfo, resolve

# (prompts, settings) -> continuations
GenerateFn = Callable[[list[str], GenerationSettings], list[str]]


@dataclass
class LoadedAdapter:
    info: AdapterInfo
    base_model: str  # what the base was loaded from
    tokenizer: object
    generate_base: GenerateFn
    generate_tuned: GenerateFn

    def compare(self, prompts: list[str], settings: GenerationSettings) -> list[dict[str, str]]:
        """One row per prompt, in the schema of a run's generations.jsonl: prompt, base, tuned."""
        base = self.generate_base(prompts, settings)
        tuned = self.generate_tuned(prompts, settings)
        return [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base, tuned)]


def load(adapter: str | Path | AdapterInfo, base: str | None = None, batch_size: int = 8) -> LoadedAdapter:
    """Load `adapter` (a run dir or its adapter/ folder) on its recorded base model, or on `base`."""
    info = adapter if isinstance(adapter, AdapterInfo) else resolve(adapter)
    builder = _builder(info)
    base_path = _base_path(info, base)
    model, tokenizer = _load_base(info, base_path, explicit=base is not None)
    _check_width(info, model, base_path)
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(info.adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"the adapter in {info.adapter_dir} does not fit base model {base_path}: "
                        f"{str(exc).splitlines()[0]}; pass the base it was trained on with --base") from exc
    peft_model.eval()
    # one generation at a time per model: the demo serves requests from a thread pool
    lock = threading.Lock()

    def locked(fn: GenerateFn) -> GenerateFn:
        def run(prompts: list[str], settings: GenerationSettings) -> list[str]:
            with lock:
                return fn(prompts, settings)
        return run

    plain = peft_model.get_base_model()

    def generate_base(prompts, settings):
        return generate(plain, tokenizer, prompts, settings, batch_size=batch_size, desc="base")

    return LoadedAdapter(info, base_path, tokenizer, locked(generate_base),
                         locked(builder(peft_model, tokenizer, batch_size)))


def base_key(info: AdapterInfo, base: str | None = None) -> tuple[str, str, str]:
    """Adapters with the same key can share one loaded base model: same base weights, same
    tokenizer, same PEFT method (one `PeftModel` holds adapters of one method)."""
    tokenizer = "" if base else (info.recorded_tokenizer or "")
    return (base or info.recorded_base or "", tokenizer, info.peft_type)


def load_shared(adapters: dict[str, AdapterInfo], base: str | None = None,
                batch_size: int = 8) -> dict[str, LoadedAdapter]:
    """Several adapters on ONE base model, loaded once (`multi_adapter.load_adapters`): returns
    {name: LoadedAdapter}, each generating with its own adapter. They share a lock, since
    switching the active adapter and generating must not interleave between demo requests."""
    from softprompt.serve.multi_adapter import load_adapters

    if not adapters:
        raise UserError("no adapters given; pass one or more adapter (or run) directories")
    keys = {name: base_key(info, base) for name, info in adapters.items()}
    if len(set(keys.values())) > 1:
        listing = "; ".join(f"{name}: base {k[0] or '?'}, {k[2]}" for name, k in keys.items())
        raise UserError(f"these adapters do not share one base model and PEFT method ({listing}); "
                        "compare adapters of one base at a time, or pass --base MODEL")
    first = next(iter(adapters.values()))
    for info in adapters.values():
        _builder(info)
    base_path = _base_path(first, base)
    model, tokenizer = _load_base(first, base_path, explicit=base is not None)
    for info in adapters.values():
        _check_width(info, model, base_path)
    # PEFT adapter names become module keys: no dots; the user-facing names stay as given
    module_names = _module_names(list(adapters))
    loaded = load_adapters(model, {module_names[name]: info.adapter_dir for name, info in adapters.items()})
    lock = threading.Lock()
    any_adapter = next(iter(loaded.values()))

    def generate_base(prompts, settings):
        with lock:
            return any_adapter.generate_base(tokenizer, prompts, settings, batch_size=batch_size)

    def tuned_for(adapter) -> GenerateFn:
        def generate_tuned(prompts, settings):
            with lock:  # activate() + generate as one step
                return adapter.generate(tokenizer, prompts, settings, batch_size=batch_size)
        return generate_tuned

    return {name: LoadedAdapter(info, base_path, tokenizer, generate_base, tuned_for(loaded[module_names[name]]))
            for name, info in adapters.items()}


def _module_names(names: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        candidate, n = re.sub(r"[^A-Za-z0-9_-]", "_", name) or "adapter", 2
        stem = candidate
        while candidate in out.values():
            candidate, n = f"{stem}-{n}", n + 1
        out[name] = candidate
    return out


def _builder(info: AdapterInfo):
    builder = _TUNED.get(info.peft_type)
    if builder is None:
        raise UserError(f"{info.peft_type} adapters are not supported for generation yet "
                        f"(supported: {', '.join(sorted(_TUNED))})")
    return builder


def _base_path(info: AdapterInfo, base: str | None) -> str:
    base_path = base or info.recorded_base
    if not base_path:
        raise UserError(f"the adapter in {info.adapter_dir} does not record its base model; pass --base MODEL")
    return base_path


def _prompt_learning(peft_model, tokenizer, batch_size: int) -> GenerateFn:
    """Prompt tuning and p-tuning: the tuned model is the frozen base with the learned input
    embeddings in front of each prompt (after the left padding)."""
    from softprompt.models.methods import soft_prompt_embeddings

    soft_prompt = soft_prompt_embeddings(peft_model)
    plain = peft_model.get_base_model()

    def generate_tuned(prompts, settings):
        return generate(plain, tokenizer, prompts, settings, soft_prompt=soft_prompt, batch_size=batch_size,
                        desc="tuned")

    return generate_tuned


_TUNED: dict[str, Callable[..., GenerateFn]] = {
    "PROMPT_TUNING": _prompt_learning,
    "P_TUNING": _prompt_learning,
}


def _load_base(info: AdapterInfo, base_path: str, explicit: bool):
    recorded_model = (info.record or {}).get("model") or {}
    # the recorded model config keeps revision / trust_remote_code / attention kernel; the
    # source is always "pretrained" now, since the run recorded a loadable path (a cache dir for
    # the GGUF and tiny models)
    cfg = OmegaConf.create({
        "source": "pretrained",
        "name_or_path": base_path,
        "revision": None if explicit else recorded_model.get("revision"),
        "trust_remote_code": bool(recorded_model.get("trust_remote_code", False)),
        "attn_implementation": recorded_model.get("attn_implementation"),
    })
    try:
        loaded = load_model(cfg)
    except UserError as exc:
        hint = "" if explicit else "; pass the base model with --base MODEL"
        raise UserError(f"cannot load the base model of {info.adapter_dir}: {exc}{hint}") from exc
    tokenizer = loaded.tokenizer
    recorded_tok = info.recorded_tokenizer
    if not explicit and recorded_tok and recorded_tok != base_path and Path(recorded_tok).is_dir():
        # a run may have trained with a tokenizer stored apart from the weights
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(recorded_tok, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return loaded.model, tokenizer


def _check_width(info: AdapterInfo, model: torch.nn.Module, base_path: str) -> None:
    """A soft prompt only fits a base with the embedding width it was trained for."""
    token_dim = info.peft_config.get("token_dim")
    width = model.get_input_embeddings().weight.shape[1]
    if token_dim and int(token_dim) != width:
        raise UserError(f"the adapter in {info.adapter_dir} was trained on a model with hidden size {token_dim}, "
                        f"but {base_path} has {width}; pass the base it was trained on with --base")
