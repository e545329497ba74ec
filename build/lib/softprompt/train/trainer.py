"""Training the soft prompt with the Hugging Face `Trainer`.

What differs from the seed notebook's recipe, and why (each measured in scripts/bench.py):
- our collator masks labels by attention, not by id: EOS doubles as pad for many models, and
  `DataCollatorForLanguageModeling` would then drop the EOS label we append to every text;
- batches are padded to their own longest row and grouped by length (less compute on padding);
- bf16 autocast where the hardware has bf16 matrix units, fp32 elsewhere;
- the loss is computed from hidden states, with the lm_head only on labelled positions
  (softprompt.models.fast_loss), not on the virtual tokens and padding;
- a non-finite loss stops the run at once, naming the step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import Trainer, TrainerCallback, TrainingArguments

from softprompt.models.fast_loss import prompt_tuning_loss, supports_fast_loss
from softprompt.train.checkpoints import AtomicCheckpointsMixin, SaveSchedule


class NonFiniteLossError(RuntimeError):
    pass


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


@dataclass
class PaddingCollator:
    """Right-pads a batch to its longest row; labels are the ids, -100 where there is padding."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def cpu_has_bf16_matmul() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls are several times faster than fp32 on a CPU.

    Without them (e.g. AVX2-only CPUs) oneDNN emulates bf16 and it is slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16_matmul() else "fp32"


class SoftpromptTrainer(AtomicCheckpointsMixin, Trainer):
    """`Trainer` that refuses to go on after a NaN/inf loss (the default logs a filtered mean),
    writes its checkpoints atomically (softprompt.train.checkpoints) and, for prompt tuning, computes
    the loss without logits on loss-free positions (softprompt.models.fast_loss)."""

    real_tokens = 0  # non-pad, non-virtual tokens trained on: what tokens/s counts
    fast_loss = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.fast_loss or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # a per-batch mean over the labelled tokens (the Trainer's num_items_in_batch counts
        # labels[:, 1:], one short per row here: the soft prompt predicts the first token)
        self.loss_is_scaled_for_ga = False
        return prompt_tuning_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.real_tokens += int(inputs["attention_mask"].sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {self.state.global_step + 1}; "
                "lower training.learning_rate or use training.precision=fp32"
            )
        return loss


class FirstStepClock(TrainerCallback):
    """Seconds from process start to the end of the first optimizer step: the start-up cost a
    user waits through (imports, model and data loading, W&B init, base evaluation)."""

    seconds: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is None:
            import time

            import psutil

            self.seconds = time.time() - psutil.Process().create_time()


def training_arguments(cfg: DictConfig, output_dir: Path, precision: str) -> TrainingArguments:
    t = cfg.training
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a share of all steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        eval_strategy="no",  # our per-epoch perplexity callback evaluates token-weighted
        # checkpoints are written atomically by softprompt.train.checkpoints; SaveSchedule adds one at
        # every epoch end and at the last step
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        report_to="none",  # softprompt.track.wandb_run logs to W&B with the keys of metrics.json
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        torch_compile=t.torch_compile,
        disable_tqdm=os.environ.get("SOFTPROMPT_QUIET") == "1",
    )


def build_trainer(model, tokenizer, train_rows: list[list[int]], cfg: DictConfig, output_dir: Path,
                  precision: str, callbacks: list[TrainerCallback]) -> SoftpromptTrainer:
    trainer = SoftpromptTrainer(
        model=model,
        args=training_arguments(cfg, output_dir, precision),
        train_dataset=TokenDataset(train_rows),
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[*callbacks, SaveSchedule(cfg.training.save_every_epoch)],
    )
    # under DDP the forward must go through the DDP wrapper (it sets up the gradient all-reduce),
    # which the hidden-state loss bypasses: multi-process runs use the plain PEFT forward
    trainer.fast_loss = (bool(cfg.training.get("fast_loss", True)) and supports_fast_loss(model)
                         and trainer.args.world_size == 1)
    return trainer
