"""Finding and describing saved adapters, without loading any model (so errors come fast).

What a run leaves: `RUN/adapter/` (PEFT `save_pretrained` output: `adapter_config.json`, naming
the base portably, the weights and a model card) with our own `softprompt.json` beside them (the
local base, tokenizer, configs, metrics; see softprompt.models.portable), and `RUN/metrics.json`.
Users may point at the run directory or at its `adapter/` folder.

"Foreign" directories, and what we do with them:
- no `adapter_config.json` (here or in `adapter/`), or one that is not a PEFT config: refused;
- a PEFT adapter for another task than causal LM, or without its weights file: refused;
- a PEFT causal-LM adapter that softprompt did not save (no `softprompt.json`, e.g. one from an
  older run or another tool): accepted when its `base_model_name_or_path` (or `--base`) loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir

CONFIG_FILE = RunDir.ADAPTER_CONFIG
RECORD_FILE = RunDir.ADAPTER_RECORD
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class AdapterInfo:
    adapter_dir: Path
    # the run directory holding adapter/ (None for a bare adapter folder)
    run_dir: Path | None
    peft_config: dict[str, Any]
    # softprompt.json, or None for an adapter softprompt did not save
    record: dict[str, Any] | None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.peft_config.get("peft_type", ""))

    @property
    def recorded_base(self) -> str | None:
        """The base model's portable identity (a Hub id; softprompt.models.portable), else the
        local path an older run recorded."""
        return (self.peft_config.get("base_model_name_or_path")
                or (self.record or {}).get("base_model_id") or (self.record or {}).get("base_model") or None)

    def base_model_config(self, base: str | None = None) -> dict[str, Any] | None:
        """What `softprompt.models.loading.load_model` needs to load this adapter's base, offline
        where it can (None: nothing recorded):

        1. `base` (`--base`): a Hub id or a directory;
        2. the local directory the run loaded (`softprompt.json`'s `base_model`: a converted
           SmolLM2, a built tiny model), when it exists on this machine;
        3. the model config the run recorded: a tiny model is rebuilt and the packaged GGUF
           converted again (both offline), a Hub model loads by its id;
        4. `adapter_config.json`'s `base_model_name_or_path` (an adapter softprompt did not save).
        """
        record = self.record or {}
        recorded_model = record.get("model") or {}

        def pretrained(path: str, explicit: bool) -> dict[str, Any]:
            # the recorded revision / trust_remote_code / attention kernel still apply to the
            # recorded base; an explicit --base is taken as it is
            return {"source": "pretrained", "name_or_path": path,
                    "revision": None if explicit else recorded_model.get("revision"),
                    "trust_remote_code": bool(recorded_model.get("trust_remote_code", False)),
                    "attn_implementation": recorded_model.get("attn_implementation")}

        if base:
            return pretrained(base, explicit=True)
        local = record.get("base_model")
        if local and Path(local).expanduser().is_dir():
            return pretrained(str(local), explicit=False)
        if recorded_model.get("source"):
            return dict(recorded_model)
        if self.recorded_base:
            return pretrained(self.recorded_base, explicit=False)
        return None

    @property
    def recorded_tokenizer(self) -> str | None:
        if self.record and self.record.get("tokenizer"):
            return str(self.record["tokenizer"])
        return self.peft_config.get("tokenizer_name_or_path") or None

    def eval_setting(self, name: str, default):
        """A generation setting the run evaluated with (its `eval` config), else `default`."""
        value = ((self.record or {}).get("eval") or {}).get(name)
        return default if value is None else value

    @property
    def eval_prompts(self) -> list[str]:
        return list(self.eval_setting("prompts", []) or [])


def resolve(path: str | Path) -> AdapterInfo:
    """The adapter in `path`: an adapter folder, or a run directory holding `adapter/`."""
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError(f"adapter directory {str(path)!r} does not exist; give a run directory or its adapter/ folder")
    if not given.is_dir():
        raise UserError(f"{str(path)!r} is a file, not an adapter directory; give a run directory or its adapter/ folder")
    adapter_dir = RunDir.holding_adapter(given)
    if adapter_dir is None:
        raise UserError(
            f"{str(path)!r} holds no PEFT adapter ({CONFIG_FILE} is neither in it nor in its adapter/ folder); "
            "give a finished run's directory or its adapter/ folder"
        )
    peft_config = _read_json(adapter_dir / CONFIG_FILE, "adapter config")
    if not isinstance(peft_config, dict) or "peft_type" not in peft_config:
        raise UserError(f"{adapter_dir / CONFIG_FILE} is not a PEFT adapter config (no peft_type); "
                        "give a directory written by PeftModel.save_pretrained")
    task = peft_config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise UserError(f"the adapter in {adapter_dir} is for task {task}, not CAUSAL_LM; it cannot generate text here")
    if not any((adapter_dir / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"the adapter in {adapter_dir} has no weights ({' or '.join(WEIGHT_FILES)}); "
                        "was its run interrupted? give a finished run")
    record = None
    if (adapter_dir / RECORD_FILE).is_file():
        record = _read_json(adapter_dir / RECORD_FILE, "softprompt record")
    run = RunDir.of_adapter(adapter_dir)
    metrics: dict[str, Any] = {}
    if run is not None and run.finished:
        metrics = _read_json(run.metrics, "run metrics")
    elif record and isinstance(record.get("metrics"), dict):
        metrics = record["metrics"]
    return AdapterInfo(adapter_dir, run.path if run else None, peft_config, record, metrics)


def discover(root: str | Path) -> dict[str, AdapterInfo]:
    """Every adapter under `root` (a run dir, a multirun/sweep dir, or a folder of runs), keyed by
    its run's path relative to `root`. Trainer checkpoints and half-written folders are skipped."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        resolve(root_path)  # raises the right error for a missing path or a file
    if RunDir.holding_adapter(root_path) is not None:
        info = resolve(root_path)
        return {(info.run_dir or info.adapter_dir).name: info}
    found: dict[str, AdapterInfo] = {}
    for config in sorted(root_path.rglob(f"{RunDir.ADAPTER}/{CONFIG_FILE}")):
        adapter_dir = config.parent
        rel = adapter_dir.parent.relative_to(root_path)
        # checkpoints/ hold mid-training copies; dot-folders are our atomic-write temporaries
        if RunDir.CHECKPOINTS in rel.parts or any(part.startswith(".") for part in rel.parts):
            continue
        try:
            found[str(rel)] = resolve(adapter_dir)
        except UserError:
            continue  # an unfinished or foreign adapter among many is skipped, not fatal
    if not found:
        raise UserError(f"no adapters under {str(root)!r} (looked for */{RunDir.ADAPTER}/{CONFIG_FILE}); "
                        "give a run directory, its adapter/ folder, or a directory of runs")
    return found


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the {what} {path}: {exc}") from exc
