"""Saving an adapter that loads on any machine: its base named by a portable identity, the local
copy kept on the side, and a model card that says what was trained on what.

`adapter_config.json`'s `base_model_name_or_path` is what PEFT and the Hub read; it holds a
portable identity, never a path of the machine that trained:
- a Hub model: its id (`bigscience/bloomz-560m`); a local directory: the path as the user gave it;
- the packaged SmolLM2 (`source: gguf_package`): the Hub repository the GGUF came from,
  `model.hub_id` (`HuggingFaceTB/SmolLM2-135M-Instruct`), although the weights trained on are its
  Q4_1-dequantised copy (the model card says so);
- a tiny random model (`source: tiny`) or a large shape (`source: shape`): `softprompt/<preset>`
  (`softprompt/tiny-llama`), a name, not a Hub repository: the model is rebuilt from the config
  recorded beside it.

The adapter record (`RunDir.ADAPTER_RECORD`, written by the run directory) keeps what this machine loaded (`base_model`: the converted or
built local directory; `tokenizer`) and the model config that rebuilds it anywhere (`model`);
`softprompt.serve.adapters` resolves them in that order, offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from softprompt.core import atomic, keys
from softprompt.core.config import BUILT_SOURCES, resolved
from softprompt.core.rundir import RunDir

CARD_FILE = "README.md"


def portable_id(model_cfg: DictConfig) -> str:
    """The base model's name for `adapter_config.json` (see the module docstring)."""
    if model_cfg.get("hub_id"):
        return str(model_cfg.hub_id)
    if model_cfg.source in BUILT_SOURCES:
        return f"softprompt/{model_cfg.name_or_path}"
    return str(model_cfg.name_or_path)


def dataset_label(dataset_cfg: DictConfig) -> str:
    if dataset_cfg.get("path"):
        return Path(dataset_cfg.path).name  # a local file: its name, not this machine's path
    if dataset_cfg.get("bundled"):
        origin = f", in the schema of {dataset_cfg.hub_id}" if dataset_cfg.get("hub_id") else ""
        return f"{dataset_cfg.name} (sample shipped with softprompt{origin})"
    return str(dataset_cfg.hub_id)


def save_adapter(peft_model, directory: Path, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """`save_pretrained` into `directory` with a portable base identity, and the model card
    (`README.md`, replacing PEFT's template). The run directory adds `adapter_record()` beside them."""
    base_id = portable_id(cfg.model)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_id
        if getattr(config, "tokenizer_name_or_path", None):
            # prompt tuning's init=text tokenizer (used only to initialise): the same base, named portably
            config.tokenizer_name_or_path = base_id
    # save_embedding_layers=False: no method here resizes or trains the embedding matrix, and
    # PEFT's "auto" would look the base id up on the Hub to compare vocabulary sizes
    peft_model.save_pretrained(directory, save_embedding_layers=False)
    atomic.write_text(directory / CARD_FILE, model_card(cfg, metrics))


def adapter_record(cfg: DictConfig, local_base: str, tokenizer_path: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """What this machine loaded (`base_model`, `tokenizer`) and the config that rebuilds it anywhere."""
    return {"base_model": local_base, "base_model_id": portable_id(cfg.model), "tokenizer": tokenizer_path,
            "model": resolved(cfg.model), "dataset": resolved(cfg.dataset), "peft": resolved(cfg.peft),
            "eval": resolved(cfg.eval), "metrics": metrics}


def model_card(cfg: DictConfig, metrics: dict[str, Any]) -> str:
    """A short model card: base, dataset, method, size, held-out perplexities, how to use it."""
    # imported here: portable_id serves the preflight (softprompt.models.transfer), before torch
    from softprompt.models.methods import get

    method = get(cfg.peft.method)
    base_id = portable_id(cfg.model)
    front = {"base_model": base_id, "library_name": "peft", "pipeline_tag": "text-generation",
             "tags": sorted({"softprompt", cfg.peft.method.replace("_", "-"), f"base_model:adapter:{base_id}"})}
    if cfg.dataset.get("hub_id") and not cfg.dataset.get("path"):
        front["datasets"] = [str(cfg.dataset.hub_id)]
    # JSON values are valid YAML: no YAML writer needed for the front matter
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",
             f"# {cfg.peft.method} adapter for {base_id}", "",
             f"Trained with softprompt: {method.description}.", "",
             "| | |", "| --- | --- |",
             f"| base model | `{base_id}` |",
             f"| dataset | {dataset_label(cfg.dataset)}, text column `{cfg.dataset.text_column}` |",
             f"| PEFT method | {cfg.peft.method} (`{method.peft_type}`) |"]
    if method.uses_virtual_tokens:
        lines.append(f"| virtual tokens | {cfg.peft.num_virtual_tokens} |")
    else:
        lines.append(f"| LoRA rank / alpha | {cfg.peft.lora_r} / {cfg.peft.lora_alpha} |")
    for key, label in ((keys.EVAL_BASE_PERPLEXITY, "held-out perplexity, base"),
                       (keys.EVAL_PERPLEXITY, "held-out perplexity, tuned"),
                       (keys.TRAIN_EPOCHS, "epochs"), (keys.TRAIN_STEPS, "optimizer steps"),
                       (keys.TRAIN_TRAINABLE_PARAMS, "trainable parameters")):
        if key in metrics:
            value = metrics[key]
            lines.append(f"| {label} | {value:.4g} |" if isinstance(value, float) else f"| {label} | {value} |")
    lines.append("")
    if cfg.model.source == "gguf_package":
        lines += [f"Note: trained on the weights of `{cfg.model.gguf_file}` (package `{cfg.model.name_or_path}`), "
                  f"dequantised from Q4_1 to fp32, not on the original weights of `{base_id}`; on those the "
                  "adapter works, but its perplexities above were measured on the dequantised ones.", ""]
    if cfg.model.source in BUILT_SOURCES:
        lines += [f"Note: `{base_id}` is a randomly initialised model that softprompt rebuilds from the config in "
                  f"`{RunDir.ADAPTER_RECORD}`; it is not on the Hub.", ""]
    lines += ["## Use", "", "```",
              "python scripts/generate.py ADAPTER_DIR \"your prompt\"   # base and tuned, side by side",
              "python scripts/demo.py ADAPTER_DIR", "```", ""]
    if method.soft_prompt:
        lines += ["With `PeftModel.generate`, prefer `use_cache=False` for prompt tuning: on peft 0.21 with "
                  "transformers 5.24 its cached greedy output drifts from step-by-step greedy after the first "
                  "token, and padded batches differ from single prompts. softprompt's own generation builds "
                  "`[pads, soft prompt, text]` embeddings for the base model instead.", ""]
    return "\n".join(lines)
