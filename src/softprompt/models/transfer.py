"""Prompt transfer: a prompt-tuning run that starts from another run's learned soft prompt.

`peft.init=from_run peft.init_from=SOURCE` (SOURCE: a finished run's directory or its `adapter/`
folder) starts the prompt from SOURCE's saved prompt embeddings instead of text or random ones
(SPoT, Vu et al. 2022: a prompt learned on one task is a better start for another).

Rules (docs/transfer.md):
- the source is a prompt-tuning adapter (`PROMPT_TUNING`): p-tuning's prompt is the output of an
  MLP encoder and prefix tuning's lives in every layer's cache, neither is an input prompt;
- the same base model: the source's portable base identity (`adapter_config.json`, see
  softprompt.models.portable) equals this run's, and so does the hidden size (and, for the tiny
  random models, their whole recorded shape). `read_source` and `check_same_base` read JSON only
  and run in the preflight, before torch; `start_from_source` checks the hidden size again
  against the loaded embedding matrix;
- lengths: source prompt of S tokens, this run's N = `peft.num_virtual_tokens`.
  S >= N: the first N source tokens are kept (truncation). S < N: the S source tokens come first,
  and the N - S extra positions get the embeddings of `peft.init_text`'s tokens (tokenised and
  repeated as PEFT's `init=text` does) when it is set, else of tokens sampled uniformly from the
  vocabulary (PEFT's `init=sample_vocab`, from the run's seeded generator).

The run records where its prompt came from (`Source.record()`: config.json's `prompt_source` and
the adapter record).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from softprompt.core import keys
from softprompt.core.config import BUILT_SOURCES
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir
from softprompt.models.portable import portable_id

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

PROMPT_TUNING = "PROMPT_TUNING"
# PEFT's key for a prompt-tuning adapter's (num_virtual_tokens, hidden) prompt in its weights file
PROMPT_KEY = "prompt_embeddings"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Source:
    given: str  # peft.init_from as the user wrote it
    adapter_dir: Path
    run_dir: Path | None
    base_model_id: str | None  # the portable identity it was trained on
    num_virtual_tokens: int
    hidden_size: int | None  # adapter_config.json's token_dim
    model: dict[str, Any] | None  # the model config its run recorded (softprompt.json)
    dataset: str | None
    metrics: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Where this run's prompt came from: written to config.json and the adapter record."""
        return {"path": str(self.adapter_dir.resolve()), "given": self.given,
                "run_dir": str(self.run_dir.resolve()) if self.run_dir else None,
                "base_model_id": self.base_model_id, "num_virtual_tokens": self.num_virtual_tokens,
                "dataset": self.dataset, keys.EVAL_PERPLEXITY: self.metrics.get(keys.EVAL_PERPLEXITY)}


def read_source(path: str) -> Source:
    """The soft prompt `peft.init_from` names, described from its JSON files (no torch)."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise UserError(f"peft.init_from={path} {'is a file' if given.exists() else 'does not exist'}; "
                        "give a finished prompt-tuning run's directory or its adapter/ folder")
    adapter_dir = RunDir.holding_adapter(given)
    if adapter_dir is None:
        raise UserError(f"peft.init_from={path} holds no adapter ({RunDir.ADAPTER_CONFIG} is neither in it nor in "
                        "its adapter/ folder); give a finished prompt-tuning run's directory")
    peft_config = _read_json(adapter_dir / RunDir.ADAPTER_CONFIG)
    peft_type = str(peft_config.get("peft_type", ""))
    if peft_type != PROMPT_TUNING:
        raise UserError(f"peft.init_from={path} is a {peft_type or 'non-PEFT'} adapter; peft.init=from_run starts "
                        "from a prompt-tuning (PROMPT_TUNING) run's soft prompt only")
    if peft_config.get("num_transformer_submodules") not in (None, 1):
        raise UserError(f"peft.init_from={path} has a prompt per transformer submodule "
                        f"({peft_config['num_transformer_submodules']}); only causal-LM prompts transfer")
    if not any((adapter_dir / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"peft.init_from={path}: the adapter in {adapter_dir} has no weights; "
                        "was its run interrupted? give a finished run")
    record_path = adapter_dir / RunDir.ADAPTER_RECORD
    record = _read_json(record_path) if record_path.is_file() else {}
    run = RunDir.of_adapter(adapter_dir)
    metrics = _read_json(run.metrics) if run is not None and run.finished else record.get("metrics") or {}
    dataset = (record.get("dataset") or {}).get("name")
    return Source(given=str(path), adapter_dir=adapter_dir, run_dir=run.path if run else None,
                  base_model_id=peft_config.get("base_model_name_or_path") or record.get("base_model_id"),
                  num_virtual_tokens=int(peft_config["num_virtual_tokens"]),
                  hidden_size=peft_config.get("token_dim"), model=record.get("model"), dataset=dataset,
                  metrics=metrics)


def check_same_base(source: Source, model_cfg: DictConfig) -> None:
    """UserError unless `source` was trained on the base model `model_cfg` loads (JSON only)."""
    here = portable_id(model_cfg)
    where = f"peft.init_from={source.given}"
    if source.base_model_id != here:
        raise UserError(f"{where} was trained on base model {source.base_model_id or '(unrecorded)'}, this run "
                        f"uses {here}; a soft prompt transfers only between runs of the same base model")
    hidden = _hidden_size(model_cfg)
    if hidden is not None and source.hidden_size is not None and hidden != source.hidden_size:
        raise UserError(f"{where} has hidden size {source.hidden_size}, this run's {here} has {hidden}; "
                        "a soft prompt transfers only between runs of the same base model")
    group = model_cfg.source  # tiny or shape: the settings that build the random model
    recorded_built = (source.model or {}).get(group) if group in BUILT_SOURCES else None
    if recorded_built:
        built = OmegaConf.to_container(model_cfg[group], resolve=True)
        differ = sorted(k for k in set(built) | set(recorded_built) if built.get(k) != recorded_built.get(k))
        if differ:  # the same preset name, another shape: another random model
            raise UserError(f"{where} was trained on {here} with other model.{group} settings ("
                            + ", ".join(f"{k}: {recorded_built.get(k)} there, {built.get(k)} here" for k in differ)
                            + "); a soft prompt transfers only between runs of the same base model")


def _hidden_size(model_cfg: DictConfig) -> int | None:
    """The base's hidden size where JSON tells it (tiny presets, a local model dir); else None."""
    if model_cfg.source == "tiny":
        return int(model_cfg.tiny.hidden_size)
    if model_cfg.source == "shape":
        return int(model_cfg.shape.config.hidden_size)
    config_file = Path(str(model_cfg.name_or_path)).expanduser() / "config.json"
    if model_cfg.source == "pretrained" and config_file.is_file():
        config = _read_json(config_file)
        for name in ("hidden_size", "n_embed", "d_model"):  # Bloom's checkpoints spell it n_embed
            if isinstance(config.get(name), int):
                return config[name]
    return None


def initial_prompt(source: Source, word_embeddings: "torch.nn.Embedding", num_virtual_tokens: int,
                   init_text: str | None, tokenizer_path: str) -> "torch.Tensor":
    """The (num_virtual_tokens, hidden) prompt this run starts from (the module docstring's rule)."""
    import torch
    from peft import load_peft_weights

    prompt = load_peft_weights(str(source.adapter_dir), device="cpu")[PROMPT_KEY]
    hidden = word_embeddings.embedding_dim
    if prompt.shape[-1] != hidden:
        raise UserError(f"peft.init_from={source.given} has hidden size {prompt.shape[-1]}, this run's base model "
                        f"has {hidden}; a soft prompt transfers only between runs of the same base model")
    prompt = prompt[:num_virtual_tokens].to(torch.float32)
    extra = num_virtual_tokens - prompt.shape[0]
    if extra <= 0:
        return prompt
    if init_text:
        from transformers import AutoTokenizer

        # as PEFT's init=text: the text's token ids (with what the tokenizer adds), repeated to fill
        ids = AutoTokenizer.from_pretrained(tokenizer_path)(init_text)["input_ids"]
        ids = (ids * math.ceil(extra / len(ids)))[:extra]
        pad_ids = torch.tensor(ids, dtype=torch.long)
    else:  # as PEFT's init=sample_vocab, from the generator the run seeded
        pad_ids = torch.randint(0, word_embeddings.num_embeddings, (extra,), dtype=torch.long)
    with torch.no_grad():
        pad = word_embeddings(pad_ids.to(word_embeddings.weight.device)).detach().to("cpu", torch.float32)
    return torch.cat([prompt, pad])


def start_from_source(peft_model: "PeftModel", peft_cfg: DictConfig, tokenizer_path: str) -> Source:
    """Put the source's prompt into a freshly wrapped prompt-tuning model (methods.wrap calls it)."""
    from peft import set_peft_model_state_dict

    source = read_source(str(peft_cfg.init_from))
    prompt = initial_prompt(source, peft_model.get_input_embeddings(), int(peft_cfg.num_virtual_tokens),
                            peft_cfg.init_text, tokenizer_path)
    # the public loader of a saved adapter's state: the same path as PeftModel.from_pretrained
    set_peft_model_state_dict(peft_model, {PROMPT_KEY: prompt})
    return source


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def prompt_source(cfg) -> dict:
    """`{"prompt_source": ...}` for a run that starts from another run's prompt (peft.init=from_run),
    recorded in its config.json and adapter record; `{}` otherwise."""
    return {"prompt_source": read_source(str(cfg.peft.init_from)).record()} if cfg.peft.init == "from_run" else {}
