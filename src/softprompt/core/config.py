"""The typed config schema and its start-up checks.

The dataclasses are registered with Hydra's ConfigStore as the base of `conf/config.yaml`, so
OmegaConf rejects wrong types and unknown keys while composing. `validate()` adds what types
cannot say (ranges, enums, dependencies between keys) and runs before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from softprompt.core.errors import UserError

# the Hydra config tree ships inside the package (conf/ at the top of a checkout links to it)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

PEFT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning", "lora")
PEFT_INITS = ("random", "text", "sample_vocab")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PRECISIONS = ("auto", "fp32", "bf16")
PACK_FORWARDS = ("auto", "concat", "turns")  # softprompt.train.pack
MODEL_SOURCES = ("pretrained", "gguf_package", "tiny")
TINY_ARCHITECTURES = ("bloom", "llama")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class TinyModelConfig:
    architecture: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # the tokenizer is trained offline on the bundled samples; a small vocabulary lets a tiny
    # model learn visibly in a few steps
    vocab_size: int = 512
    # wider than transformers' 0.02: a random model that is not near-uniform gives the soft
    # prompt something to correct, so tiny runs show loss falling (measured: -19 % ppl in 5
    # epochs at 0.2 vs -0.3 % at 0.02)
    initializer_range: float = 0.2


@dataclass
class ModelConfig:
    name: str = MISSING  # short label for run names and reports
    name_or_path: str = MISSING  # Hub id or local directory (or the package, for gguf_package)
    source: str = "pretrained"
    gguf_file: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # null: the kernel measured fastest for the architecture (see softprompt.models.loading)
    attn_implementation: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DatasetConfig:
    name: str = MISSING
    hub_id: Optional[str] = None
    hub_split: str = "train"
    path: Optional[str] = None  # a local csv/json/jsonl/parquet file, used instead of the Hub
    bundled: Optional[str] = None  # a sample file shipped in softprompt/data
    text_column: str = MISSING
    max_samples: Optional[int] = None
    validation_fraction: float = 0.2
    min_chars: int = 1


@dataclass
class PeftConfig:
    method: str = "prompt_tuning"
    num_virtual_tokens: int = 4
    init: str = "random"
    init_text: Optional[str] = None
    # p_tuning's prompt encoder
    encoder_hidden_size: int = 128
    # lora
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: Optional[list[str]] = None


@dataclass
class TrainingConfig:
    epochs: int = 6
    max_steps: Optional[int] = None
    learning_rate: float = 0.3
    batch_size: int = 8
    eval_batch_size: int = 16
    max_length: int = 128
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    precision: str = "auto"
    group_by_length: bool = True
    torch_compile: bool = False
    fast_loss: bool = True  # prompt tuning: lm_head only on labelled positions (softprompt.models.fast_loss)
    num_threads: Optional[int] = None
    resume: bool = False
    save_every_epoch: bool = True
    save_steps: Optional[int] = None  # also checkpoint every N optimizer steps (null: epochs only)
    # packed sweeps (softprompt.train.pack): how the rows of a pack's jobs go through the base model
    pack_forward: str = "auto"
    pack_max_rows: Optional[int] = None  # training rows per step in one pack (jobs x batch size); null: no cap


@dataclass
class EvalConfig:
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 100
    repetition_penalty: float = 1.5
    batch_size: int = 8
    num_heldout_generations: int = 4
    # share of a held-out example's words shown as the prompt; the rest is the reference
    heldout_prefix_fraction: float = 0.3
    per_epoch: bool = True
    cache_base: bool = True
    # rows of the training split scored for train/perplexity (base and tuned); 0: none
    train_perplexity_rows: int = 32
    # neighbours per virtual token in prompt_tokens.jsonl (prompt tuning, p-tuning)
    nearest_tokens: int = 5


@dataclass
class WandbConfig:
    mode: str = "auto"
    project: str = "softprompt"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None  # null: made from the run's overrides, e.g. vt8-ep6
    log_model: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = 42
    # where a run writes when run() is called outside Hydra; Hydra runs use hydra.run.dir
    output_dir: Optional[str] = None


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
        _check(m.tiny.architecture in TINY_ARCHITECTURES,
               f"model.tiny.architecture={m.tiny.architecture!r} is not one of {', '.join(TINY_ARCHITECTURES)}")
        for key in ("hidden_size", "num_layers", "num_heads", "vocab_size"):
            _check(m.tiny[key] >= 1, f"model.tiny.{key} must be >= 1 (got {m.tiny[key]})")
        _check(m.tiny.hidden_size % m.tiny.num_heads == 0,
               "model.tiny.hidden_size must be a multiple of model.tiny.num_heads")
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
    _check(p.init in PEFT_INITS, f"peft.init={p.init!r} is not one of {', '.join(PEFT_INITS)}")
    if p.init == "text":
        _check(bool(p.init_text and p.init_text.strip()),
               "peft.init=text needs peft.init_text (or choose peft.init=random|sample_vocab)")
    _check(p.lora_r >= 1, f"peft.lora_r must be >= 1 (got {p.lora_r})")
    _check(0 <= p.lora_dropout < 1, f"peft.lora_dropout must be in [0, 1) (got {p.lora_dropout})")
    for key in ("epochs", "batch_size", "eval_batch_size", "max_length", "logging_steps"):
        _check(t[key] >= 1, f"training.{key} must be >= 1 (got {t[key]})")
    if t.max_steps is not None:
        _check(t.max_steps >= 1, f"training.max_steps must be >= 1 or null (got {t.max_steps})")
    _check(t.learning_rate > 0, f"training.learning_rate must be > 0 (got {t.learning_rate})")
    _check(0 <= t.warmup_ratio < 1, f"training.warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    _check(t.weight_decay >= 0, f"training.weight_decay must be >= 0 (got {t.weight_decay})")
    _check(t.max_grad_norm > 0, f"training.max_grad_norm must be > 0 (got {t.max_grad_norm})")
    _check(t.precision in PRECISIONS, f"training.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
    _check(t.lr_scheduler in SCHEDULERS,
           f"training.lr_scheduler={t.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if t.save_steps is not None:
        _check(t.save_steps >= 1, f"training.save_steps must be >= 1 or null (got {t.save_steps})")
    if t.num_threads is not None:
        _check(t.num_threads >= 1, f"training.num_threads must be >= 1 or null (got {t.num_threads})")
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
