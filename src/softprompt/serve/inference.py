"""A saved adapter and its base model, ready to generate: base and tuned continuations of the same
prompts under the same settings (used by scripts/generate.py and scripts/demo.py).

The tuned model generates the way its PEFT method's registry entry says
(`softprompt.models.methods`: soft-prompt embeddings, prefix cache or active LoRA layers), never
through `PeftModel.generate`, which breaks on batches (on Bloom a batch of more than one prompt
fails with an ALiBi size mismatch; on SmolLM2 a right-padded batch generates garbage); the base
generates with the adapter disabled. The base model is found offline from what the adapter records
(`AdapterInfo.base_model_config`).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from softprompt.core.device import resolve_device
from softprompt.core.errors import UserError
from softprompt.models.generation import GenerationSettings, generate
from softprompt.models.loading import load_model, loader_placed
from softprompt.models.methods import Method, by_peft_type
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


def load(adapter: str | Path | AdapterInfo, base: str | None = None, batch_size: int = 8,
         device: str = "auto") -> LoadedAdapter:
    """Load `adapter` (a run dir or its adapter/ folder) on its recorded base model, or on `base`,
    on `device` (auto: the GPU where there is one: softprompt.core.device)."""
    info = adapter if isinstance(adapter, AdapterInfo) else resolve(adapter)
    method = _method(info)
    model, tokenizer, base_path = _load_base(info, base, device)
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
    tuned = method.generator(peft_model)

    def generate_base(prompts, settings):
        with peft_model.disable_adapter():  # LoRA's layers live inside `plain`: off for the base
            return generate(plain, tokenizer, prompts, settings, batch_size=batch_size, desc="base")

    def generate_tuned(prompts, settings):
        return tuned(tokenizer, prompts, settings, batch_size=batch_size, desc="tuned")

    return LoadedAdapter(info, base_path, tokenizer, locked(generate_base), locked(generate_tuned))


def base_key(info: AdapterInfo, base: str | None = None) -> tuple[str, str, str]:
    """Adapters with the same key can share one loaded base model: same base weights (the same
    way of loading them), same tokenizer, same PEFT method (one `PeftModel` holds adapters of
    one method)."""
    tokenizer = "" if base else (info.recorded_tokenizer or "")
    return (json.dumps(info.base_model_config(base), sort_keys=True), tokenizer, info.peft_type)


def load_shared(adapters: dict[str, AdapterInfo], base: str | None = None,
                batch_size: int = 8, device: str = "auto") -> dict[str, LoadedAdapter]:
    """Several adapters on ONE base model, loaded once (`multi_adapter.load_adapters`): returns
    {name: LoadedAdapter}, each generating with its own adapter. They share a lock, since
    switching the active adapter and generating must not interleave between demo requests."""
    from softprompt.serve.multi_adapter import load_adapters

    if not adapters:
        raise UserError("no adapters given; pass one or more adapter (or run) directories")
    keys = {name: base_key(info, base) for name, info in adapters.items()}
    if len(set(keys.values())) > 1:
        listing = "; ".join(f"{name}: base {info.recorded_base or '?'}, {info.peft_type}"
                            for name, info in adapters.items())
        raise UserError(f"these adapters do not share one base model and PEFT method ({listing}); "
                        "compare adapters of one base at a time, or pass --base MODEL")
    first = next(iter(adapters.values()))
    for info in adapters.values():
        _method(info)
    model, tokenizer, base_path = _load_base(first, base, device)
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


def _method(info: AdapterInfo) -> Method:
    return by_peft_type(info.peft_type, where=f"the adapter in {info.adapter_dir}")


def _load_base(info: AdapterInfo, base: str | None, device: str = "auto"):
    """(model, tokenizer, what it was loaded from) for `info`, or for `base` when given, on `device`."""
    spec = info.base_model_config(base)
    if spec is None:
        raise UserError(f"the adapter in {info.adapter_dir} does not record its base model; pass --base MODEL")
    where = resolve_device(device)
    try:
        loaded = load_model(OmegaConf.create(spec), where)
        if not loader_placed(loaded.model):  # a device map's or a quantized base stays where its loader put it
            loaded.model.to(where)  # PeftModel.from_pretrained puts the adapter beside it
    except UserError as exc:
        hint = "" if base else "; pass the base model with --base MODEL"
        raise UserError(f"cannot load the base model of {info.adapter_dir}: {exc}{hint}") from exc
    tokenizer = loaded.tokenizer
    recorded_tok = info.recorded_tokenizer
    if not base and recorded_tok and recorded_tok != loaded.base_path and Path(recorded_tok).is_dir():
        # a run may have trained with a tokenizer stored apart from the weights
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(recorded_tok, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return loaded.model, tokenizer, loaded.base_path


def _check_width(info: AdapterInfo, model: torch.nn.Module, base_path: str) -> None:
    """A soft prompt only fits a base with the embedding width it was trained for. (Prefix
    tuning's token_dim is the key/value width instead: a mismatch there fails in PEFT's load.)"""
    if not _method(info).soft_prompt:
        return
    token_dim = info.peft_config.get("token_dim")
    width = model.get_input_embeddings().weight.shape[1]
    if token_dim and int(token_dim) != width:
        raise UserError(f"the adapter in {info.adapter_dir} was trained on a model with hidden size {token_dim}, "
                        f"but {base_path} has {width}; pass the base it was trained on with --base")
