"""The typed config schema and its start-up checks.

The dataclasses are registered with Hydra's ConfigStore as the base of `conf/config.yaml`, so
OmegaConf rejects wrong types and unknown keys while composing. `validate()` adds what types
cannot say (ranges, enums, dependencies between keys) and runs before anything is loaded.

The schema holds types and checks only: every field is MISSING here, and its default lives in one
place, the YAML presets (`conf/config.yaml` for what all options of a group share, `conf/<group>/`
for what an option sets). A key no preset gives fails composition's first access, not silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from softprompt.core.device import DEVICES
from softprompt.core.errors import UserError

# the Hydra config tree ships inside the package (conf/ at the top of a checkout links to it);
# Hydra's config_path needs a directory on disk, which a regular (non-zip) install is
CONF_DIR = Path(str(resources.files("softprompt") / "conf"))

# the PEFT methods and their own checks: the torch-free table softprompt.models.methods builds on
from softprompt.core.method_facts import FACTS, PEFT_METHODS  # noqa: E402
WANDB_MODES = ("auto", "online", "offline", "disabled")
QUANTIZATIONS = ("8bit", "4bit")  # softprompt.models.quantization
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16")
PACK_FORWARDS = ("auto", "concat", "turns")  # softprompt.train.pack
TRAINING_ATTENTIONS = ("auto", "model", "eager", "math_backward")  # softprompt.models.training_attention
MODEL_SOURCES = ("pretrained", "gguf_package", "tiny", "shape")
# randomly initialised bases built from a config, not loaded: rebuilt from the recorded config
BUILT_SOURCES = ("tiny", "shape")
TINY_ARCHITECTURES = ("bloom", "llama")
SHAPE_ARCHITECTURES = ("llama",)  # softprompt.models.shapes
SCHEDULERS = ("linear", "cosine", "constant", "wsd")  # softprompt.train.schedules


@dataclass
class TinyModelConfig:
    architecture: str = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    vocab_size: int = MISSING
    initializer_range: float = MISSING


@dataclass
class ShapeConfig:
    """A public checkpoint's architecture with random weights (conf/model/shape-*.yaml)."""
    architecture: str = MISSING
    # the published config.json's shape fields, passed to the architecture's transformers config
    config: dict[str, Any] = MISSING
    initializer_range: float = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING  # short label for run names and reports
    name_or_path: str = MISSING  # Hub id or local directory (or the package, for gguf_package)
    source: str = MISSING
    # the Hub id these weights come from, recorded as a saved adapter's base model where
    # name_or_path is not one (the packaged GGUF); null: name_or_path (softprompt.models.portable)
    hub_id: Optional[str] = MISSING
    gguf_file: Optional[str] = MISSING
    revision: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    # null: the kernel measured fastest for the architecture (see softprompt.models.loading)
    attn_implementation: Optional[str] = MISSING
    tiny: Optional[TinyModelConfig] = MISSING  # the source=tiny presets set it; null otherwise
    shape: Optional[ShapeConfig] = MISSING  # the source=shape presets set it; null otherwise
    # accelerate's big-model placement (auto: across the GPUs, then CPU memory); null: one device
    device_map: Optional[str] = MISSING
    # bitsandbytes: the frozen base's linear layers in 8 or 4 bits (null: model.dtype throughout)
    quantization: Optional[str] = MISSING
    # the frozen base's weights (the prompt and its optimizer stay fp32): softprompt.core.precision
    dtype: str = MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING
    hub_id: Optional[str] = MISSING
    hub_split: str = MISSING
    path: Optional[str] = MISSING  # a local csv/json/jsonl/parquet file, used instead of the Hub
    bundled: Optional[str] = MISSING  # a sample file shipped in softprompt/data
    text_column: str = MISSING
    max_samples: Optional[int] = MISSING
    validation_fraction: float = MISSING
    min_chars: int = MISSING


@dataclass
class PeftConfig:
    method: str = MISSING
    num_virtual_tokens: int = MISSING
    # the method-specific keys are null unless the method's preset sets them
    # prompt_tuning's init
    init: Optional[str] = MISSING
    init_text: Optional[str] = MISSING
    # init=from_run: a run directory or adapter folder whose soft prompt this one starts from
    init_from: Optional[str] = MISSING
    # p_tuning's prompt encoder
    encoder_hidden_size: Optional[int] = MISSING
    # lora
    lora_r: Optional[int] = MISSING
    lora_alpha: Optional[int] = MISSING
    lora_dropout: Optional[float] = MISSING
    lora_target_modules: Optional[list[str]] = MISSING


@dataclass
class TrainingConfig:
    epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    learning_rate: float = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    max_length: int = MISSING
    lr_scheduler: str = MISSING
    warmup_steps: int = MISSING  # fixed steps, not a share of the run: schedules that do not depend on its length
    decay_fraction: float = MISSING  # wsd: the share of the steps over which the rate decays to 0
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    logging_steps: int = MISSING
    device: str = MISSING  # auto, cpu, cuda, mps: where the model, batches, evaluation and generation run
    precision: str = MISSING
    group_by_length: bool = MISSING
    # the training step's decoder layers compiled: true, false, or auto (long packs on a CPU: softprompt.train.compile)
    torch_compile: Any = MISSING
    # the training step's attention: auto (eager on a CPU), the model's own, eager, or SDPA with the math backward
    attention: str = MISSING
    # recompute each decoder layer's activations in the backward pass instead of keeping them
    gradient_checkpointing: bool = MISSING
    # under torchrun: shard the frozen decoder layers across the ranks (FSDP2), the prompt replicated
    fsdp: bool = MISSING
    fast_loss: bool = MISSING  # prompt tuning: lm_head only on labelled positions (softprompt.models.fast_loss)
    num_threads: Optional[int] = MISSING
    resume: bool = MISSING
    save_every_epoch: bool = MISSING
    save_steps: Optional[int] = MISSING  # also checkpoint every N optimizer steps (null: epochs only)
    # packed sweeps (softprompt.train.pack): how the rows of a pack's jobs go through the base model
    pack_forward: str = MISSING
    pack_max_rows: Optional[int] = MISSING  # training rows per step in one pack (jobs x batch size); null: no cap


@dataclass
class EvalConfig:
    prompts: list[str] = MISSING
    max_new_tokens: int = MISSING
    repetition_penalty: float = MISSING
    batch_size: int = MISSING
    num_heldout_generations: int = MISSING
    # share of a held-out example's words shown as the prompt; the rest is the reference
    heldout_prefix_fraction: float = MISSING
    per_epoch: bool = MISSING
    cache_base: bool = MISSING
    # rows of the training split scored for train/perplexity (base and tuned); 0: none
    train_perplexity_rows: int = MISSING
    # neighbours per virtual token in prompt_tokens.jsonl (prompt tuning, p-tuning)
    nearest_tokens: int = MISSING
    # the perplexity passes' precision (auto: bf16 autocast where the hardware has bf16 matmul units)
    precision: str = MISSING


@dataclass
class WandbConfig:
    mode: str = MISSING
    project: Optional[str] = MISSING  # null: WANDB_PROJECT, else "softprompt" (track.wandb_run.placement)
    entity: Optional[str] = MISSING  # null: WANDB_ENTITY, else the login's default
    group: Optional[str] = MISSING
    tags: Optional[list[str]] = MISSING  # null: WANDB_TAGS (comma-separated), else none
    dir: Optional[str] = MISSING  # null: WANDB_DIR, else the run directory
    name: Optional[str] = MISSING  # null: made from the run's overrides, e.g. vt8-ep6
    log_model: bool = MISSING


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = MISSING
    # where a run writes when run() is called outside Hydra; Hydra runs use hydra.run.dir
    output_dir: Optional[str] = MISSING


def register_schema() -> None:
    ConfigStore.instance().store(name="softprompt_schema", node=Config)


register_schema()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: DictConfig) -> None:
    """Ranges, enums and dependencies that the types alone do not catch."""
    m, d, p, t, e, w = cfg.model, cfg.dataset, cfg.peft, cfg.training, cfg.eval, cfg.wandb
    _check(m.source in MODEL_SOURCES, f"model.source={m.source!r} is not one of {', '.join(MODEL_SOURCES)}")
    if m.source == "tiny":
        _check(m.tiny is not None, "model.source=tiny needs model.tiny (pick model=tiny-llama or model=tiny-bloom)")
        _check(m.tiny.architecture in TINY_ARCHITECTURES,
               f"model.tiny.architecture={m.tiny.architecture!r} is not one of {', '.join(TINY_ARCHITECTURES)}")
        for key in ("hidden_size", "num_layers", "num_heads", "vocab_size"):
            _check(m.tiny[key] >= 1, f"model.tiny.{key} must be >= 1 (got {m.tiny[key]})")
        _check(m.tiny.hidden_size % m.tiny.num_heads == 0,
               "model.tiny.hidden_size must be a multiple of model.tiny.num_heads")
    if m.source == "shape":
        _check(m.shape is not None, "model.source=shape needs model.shape (pick model=shape-llama-1b or "
                                    "model=shape-llama-8b)")
        _check(m.shape.architecture in SHAPE_ARCHITECTURES,
               f"model.shape.architecture={m.shape.architecture!r} is not one of {', '.join(SHAPE_ARCHITECTURES)}")
        _check(int(m.shape.config.get("vocab_size") or 0) >= 1, "model.shape.config.vocab_size must be >= 1")
    if m.device_map is not None:
        _check(m.device_map in DEVICE_MAPS,
               f"model.device_map={m.device_map!r} is not one of {', '.join(DEVICE_MAPS)} (or null)")
    if m.quantization is not None:
        _check(m.quantization in QUANTIZATIONS,
               f"model.quantization={m.quantization!r} is not one of {', '.join(QUANTIZATIONS)} (or null)")
    if m.source == "gguf_package":
        _check(bool(m.gguf_file), "model.source=gguf_package needs model.gguf_file")
    _check(bool(d.path or d.bundled or d.hub_id),
           "the dataset has no source: set dataset.path=FILE, or dataset.hub_id, or pick dataset=prompts_sample")
    _check(bool(d.text_column), "dataset.text_column must name the column that holds the training text")
    if d.max_samples is not None:
        _check(d.max_samples >= 2, f"dataset.max_samples must be >= 2 or null (got {d.max_samples})")
    _check(0 < d.validation_fraction < 1,
           f"dataset.validation_fraction must be in (0, 1) (got {d.validation_fraction})")
    _check(p.method in PEFT_METHODS, f"peft.method={p.method!r} is not one of {', '.join(PEFT_METHODS)}")
    _check(p.num_virtual_tokens >= 1, f"peft.num_virtual_tokens must be >= 1 (got {p.num_virtual_tokens})")
    FACTS[p.method].check(p)  # the method's own settings (softprompt.core.method_facts)
    if p.init_from or p.init == "from_run":
        # p-tuning's prompt comes out of an MLP encoder and prefix tuning's sits in every layer's
        # cache: neither has a (tokens x hidden) input prompt to start from. With prompt tuning,
        # init_from is read only for init=from_run, so one sweep can compare it with init=text
        _check("init_from" in FACTS[p.method].keys,
               f"peft.init=from_run / peft.init_from apply to peft.method=prompt_tuning only (got "
               f"peft.method={p.method}): only its prompt is a sequence of input embeddings to start from")
    if t.gradient_checkpointing and FACTS[p.method].no_checkpointing:
        raise UserError(f"training.gradient_checkpointing=true cannot serve peft.method={p.method}: "
                        f"{FACTS[p.method].no_checkpointing}")
    for key in ("epochs", "batch_size", "eval_batch_size", "max_length", "logging_steps"):
        _check(t[key] >= 1, f"training.{key} must be >= 1 (got {t[key]})")
    if t.max_steps is not None:
        _check(t.max_steps >= 1, f"training.max_steps must be >= 1 or null (got {t.max_steps})")
    _check(t.learning_rate > 0, f"training.learning_rate must be > 0 (got {t.learning_rate})")
    _check(t.warmup_steps >= 0, f"training.warmup_steps must be >= 0 (got {t.warmup_steps})")
    _check(0 < t.decay_fraction <= 1, f"training.decay_fraction must be in (0, 1] (got {t.decay_fraction})")
    _check(t.weight_decay >= 0, f"training.weight_decay must be >= 0 (got {t.weight_decay})")
    _check(t.max_grad_norm > 0, f"training.max_grad_norm must be > 0 (got {t.max_grad_norm})")
    _check(cfg.model.dtype in MODEL_DTYPES,
           f"model.dtype={cfg.model.dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
    _check(t.device in DEVICES, f"training.device={t.device!r} is not one of {', '.join(DEVICES)}")
    _check(t.precision in PRECISIONS, f"training.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
    _check(cfg.eval.precision in PRECISIONS,
           f"eval.precision={cfg.eval.precision!r} is not one of {', '.join(PRECISIONS)}")
    _check(t.lr_scheduler in SCHEDULERS,
           f"training.lr_scheduler={t.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if t.save_steps is not None:
        _check(t.save_steps >= 1, f"training.save_steps must be >= 1 or null (got {t.save_steps})")
    if t.num_threads is not None:
        _check(t.num_threads >= 1, f"training.num_threads must be >= 1 or null (got {t.num_threads})")
    _check(t.torch_compile in (True, False, "auto"),
           f"training.torch_compile={t.torch_compile!r} is not one of true, false, auto")
    _check(t.attention in TRAINING_ATTENTIONS,
           f"training.attention={t.attention!r} is not one of {', '.join(TRAINING_ATTENTIONS)}")
    _check(t.pack_forward in PACK_FORWARDS,
           f"training.pack_forward={t.pack_forward!r} is not one of {', '.join(PACK_FORWARDS)}")
    if t.pack_max_rows is not None:
        _check(t.pack_max_rows >= t.batch_size, f"training.pack_max_rows must be >= training.batch_size "
               f"({t.batch_size}) or null (got {t.pack_max_rows})")
    _check(e.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1 (got {e.max_new_tokens})")
    _check(e.repetition_penalty > 0, f"eval.repetition_penalty must be > 0 (got {e.repetition_penalty})")
    _check(e.batch_size >= 1, f"eval.batch_size must be >= 1 (got {e.batch_size})")
    _check(e.nearest_tokens >= 1, f"eval.nearest_tokens must be >= 1 (got {e.nearest_tokens})")
    _check(e.num_heldout_generations >= 0,
           f"eval.num_heldout_generations must be >= 0 (got {e.num_heldout_generations})")
    _check(e.train_perplexity_rows >= 0,
           f"eval.train_perplexity_rows must be >= 0 (got {e.train_perplexity_rows})")
    _check(0 < e.heldout_prefix_fraction < 1,
           f"eval.heldout_prefix_fraction must be in (0, 1) (got {e.heldout_prefix_fraction})")
    _check(w.mode in WANDB_MODES, f"wandb.mode={w.mode!r} is not one of {', '.join(WANDB_MODES)}")


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers: what trackers and result files receive."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
