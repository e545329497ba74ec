"""Several trained adapters on one frozen base model, switched by name (e.g. a `prompts` soft
prompt and a `quotes` soft prompt, as in the seed notebook).

    base = AutoModelForCausalLM.from_pretrained(base_model_path(dirs[0]))
    adapters = load_adapters(base, ["runs/prompts/adapter", "runs/quotes/adapter"])
    texts = adapters["quotes"].generate(tokenizer, ["Be yourself;"], GenerationSettings())
    base_texts = adapters["quotes"].generate_base(tokenizer, ["Be yourself;"], GenerationSettings())

The adapters share one `PeftModel` (`PeftModel.from_pretrained` for the first,
`load_adapter(..., adapter_name=...)` for the rest); `Adapter.activate()` switches with
`set_adapter`. PEFT keeps one method per `PeftModel`, so the adapters must share their method
(all prompt tuning, or all LoRA, ...). The base weights stay shared: a soft prompt adds
`num_virtual_tokens x hidden` numbers per adapter, not a model copy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from peft import PeftConfig, PeftModel

from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir
from softprompt.models.generation import GenerationSettings, generate
from softprompt.models.methods import Method, by_peft_type


@dataclass
class Adapter:
    name: str
    path: Path
    entry: Method  # the PEFT method's registry entry
    model: PeftModel  # shared by all adapters of one load_adapters call
    # (num_virtual_tokens, hidden) input embeddings for prompt_tuning / p_tuning, else None
    soft_prompt: torch.Tensor | None

    @property
    def method(self) -> str:
        """prompt_tuning | p_tuning | prefix_tuning | lora"""
        return self.entry.name

    def activate(self) -> "Adapter":
        self.model.set_adapter(self.name)
        self.model.eval()  # set_adapter may mark the adapter trainable; we only infer here
        return self

    def generate(self, tokenizer, prompts: list[str], settings: GenerationSettings, batch_size: int = 8) -> list[str]:
        """Continuations with this adapter, by the path it was evaluated with in training."""
        self.activate()
        return self.entry.generator(self.model)(tokenizer, prompts, settings, batch_size=batch_size, desc=self.name)

    def generate_base(self, tokenizer, prompts: list[str], settings: GenerationSettings,
                      batch_size: int = 8) -> list[str]:
        """The same prompts through the base model alone (LoRA layers disabled)."""
        with self.model.disable_adapter():
            return generate(self.model.get_base_model(), tokenizer, prompts, settings, batch_size=batch_size,
                            desc="base")


def adapter_dir(path: str | Path) -> Path:
    """An adapter directory, given it or the run directory that holds it in `adapter/`."""
    path = Path(path).expanduser()
    found = RunDir.holding_adapter(path)
    if found is not None:
        return found
    raise UserError(f"{path} holds no adapter (no {RunDir.ADAPTER_CONFIG} in it or in {RunDir(path).adapter}); "
                    "give a run directory or its adapter/ directory")


def default_name(path: Path) -> str:
    """`runs/quotes/adapter` -> `quotes`: the run directory's name, as a valid module key."""
    run = RunDir.of_adapter(path)
    folder = run.path if run else path
    return re.sub(r"[^A-Za-z0-9_-]", "_", folder.name) or RunDir.ADAPTER


def base_model_path(path: str | Path) -> str:
    """What `from_pretrained` needs to load the base this adapter was trained on: the local copy
    the run recorded where it exists on this machine, else the portable identity
    (`adapter_config.json`; softprompt.serve.inference rebuilds tiny and packaged bases from the
    recorded config instead)."""
    directory = adapter_dir(path)
    meta = directory / RunDir.ADAPTER_RECORD
    if meta.is_file():
        local = json.loads(meta.read_text()).get("base_model")
        if local and Path(local).expanduser().is_dir():
            return str(local)
    return PeftConfig.from_pretrained(str(directory)).base_model_name_or_path


def load_adapters(base: torch.nn.Module, dirs: Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, Adapter]:
    """Load the adapters in `dirs` (a list, named after their run directories, or {name: dir})
    onto `base`, in order; returns {name: Adapter}, the first one active.

    LoRA adapters are injected into `base` in place (PEFT's behaviour); soft prompts leave it
    untouched.
    """
    named = dict(dirs) if isinstance(dirs, Mapping) else _unique_names([adapter_dir(d) for d in dirs])
    if not named:
        raise UserError("no adapters given; pass one or more adapter (or run) directories")
    paths = {name: adapter_dir(p) for name, p in named.items()}
    methods = {name: by_peft_type(PeftConfig.from_pretrained(str(p)).peft_type.value, where=f"adapter {p}")
               for name, p in paths.items()}
    if len({m.name for m in methods.values()}) > 1:
        listing = ", ".join(f"{n}={m.name}" for n, m in methods.items())
        raise UserError(f"these adapters use different PEFT methods ({listing}); one base model holds adapters of "
                        "one method at a time: load them in separate calls")
    model: PeftModel | None = None
    for name, path in paths.items():
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
            else:
                model.load_adapter(str(path), adapter_name=name)
        except RuntimeError as exc:  # shape mismatches: an adapter trained on another base
            raise UserError(f"adapter {path} does not fit this base model (trained on "
                            f"{base_model_path(path)}): {str(exc).splitlines()[0]}") from exc
    assert model is not None
    model.eval()
    adapters = {}
    for name, path in paths.items():
        model.set_adapter(name)
        adapters[name] = Adapter(name, path, methods[name], model, methods[name].soft_prompt_embeddings(model))
    model.set_adapter(next(iter(paths)))
    model.eval()
    return adapters


def _unique_names(paths: list[Path]) -> dict[str, Path]:
    named: dict[str, Path] = {}
    for path in paths:
        name, n = default_name(path), 2
        while name in named:
            name, n = f"{default_name(path)}-{n}", n + 1
        named[name] = path
    return named
