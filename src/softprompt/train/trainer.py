"""Training soft prompts: an explicit loop on `accelerate`, top to bottom in `train()`.

What differs from the seed notebook's recipe (a Hugging Face `Trainer`), and why (each measured
in scripts/bench.py):
- batches padded to their own longest row and grouped by length (softprompt.train.batches): less
  compute on padding;
- bf16 autocast where the hardware has bf16 matrix units, fp32 elsewhere (softprompt.core.precision);
- for prompt tuning and p-tuning the loss is computed from hidden states, with the lm_head only on
  labelled positions (softprompt.models.fast_loss), not on the virtual tokens and padding;
- a non-finite loss stops the run at once, naming the step;
- checkpoints are atomic and a resumed run continues exactly (softprompt.train.checkpoints).

The loop trains a *set* of jobs, each a trainable prompt with its own parameters, optimizer,
learning-rate schedule, gradient clipping, loss normalisation and data order; a plain run is a
set of one. Jobs take their steps in turn (issue 14 adds packing their rows into one forward).

Measured against the `Trainer` subclass this loop replaced (tiny-llama, 2 epochs, fp32, linear): the
same batches, rates and updates, held-out perplexity equal to the last digit (1545.790685358781 in
both), train/loss to 1e-8 (the Trainer sums the step losses in fp32, this loop in float64).

`accelerate` places the model on the device and, under `torchrun`/`accelerate launch`, wraps it in
DDP (gloo on CPU, nccl on GPUs); every rank trains its shard of each batch, rank 0 alone evaluates,
logs and writes checkpoints.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from softprompt.core import distributed, keys
from softprompt.evaluation.perplexity import PerplexityResult, perplexity
from softprompt.models.fast_loss import prompt_tuning_loss, supports_fast_loss
from softprompt.models.methods import virtual_tokens_in_logits
from softprompt.train import checkpoints
from softprompt.train.batches import PaddingCollator, epoch_batches, steps_per_epoch
from softprompt.train.preemption import Preempted
from softprompt.train.schedules import Schedule


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class LoopSettings:
    """What the loop shares across its jobs (the `training.*` keys that are not per job)."""

    epochs: int
    max_steps: int | None  # None: epochs x steps per epoch
    batch_size: int  # rows per rank and step
    logging_steps: int
    group_by_length: bool
    precision: str  # resolved: "fp32" or "bf16"
    save_every_epoch: bool = True
    save_steps: int | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, precision: str) -> "LoopSettings":
        t = cfg.training
        return cls(epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size, logging_steps=t.logging_steps,
                   group_by_length=t.group_by_length, precision=precision, save_every_epoch=t.save_every_epoch,
                   save_steps=t.save_steps)


def _no_log(values: dict[str, Any]) -> None:
    pass


@dataclass
class Job:
    """One trainable prompt and everything that is its own."""

    name: str
    model: Any  # a PeftModel: its trainable parameters are this job's prompt
    seed: int  # the order of its batches is drawn from (seed, epoch)
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    decay_fraction: float
    weight_decay: float
    max_grad_norm: float
    fast_loss: bool  # the hidden-state loss (prompt tuning, p-tuning, one process)
    log: Callable[[dict[str, Any]], None] = _no_log  # where its curves go (a Tracker's log)
    history_extra: dict[str, Any] = field(default_factory=dict)  # added to each per-epoch eval row
    # the state of training, filled by train() (and restored on resume)
    loss_sum: float = 0.0  # sum of the per-step losses of all steps, across resumes
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch eval rows
    last_eval: tuple[int, PerplexityResult] | None = None  # (step, result) of the latest eval

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


def job_from_config(cfg: DictConfig, model, name: str = "default", log: Callable[[dict[str, Any]], None] = _no_log,
                    history_extra: dict[str, Any] | None = None) -> Job:
    """The job of a plain run: everything from `cfg.training` and `cfg.seed`."""
    t = cfg.training
    # under DDP the forward must go through the DDP wrapper (it sets up the gradient all-reduce),
    # which the hidden-state loss bypasses: multi-process runs use PEFT's own forward
    fast = bool(t.fast_loss) and supports_fast_loss(model) and distributed.world_size() == 1
    return Job(name=name, model=model, seed=cfg.seed, learning_rate=t.learning_rate, lr_scheduler=t.lr_scheduler,
               warmup_steps=t.warmup_steps, decay_fraction=t.decay_fraction, weight_decay=t.weight_decay,
               max_grad_norm=t.max_grad_norm, fast_loss=fast, log=log, history_extra=dict(history_extra or {}))


@dataclass
class EpochEval:
    """Held-out perplexity after every epoch (and at the last step): a curve per job."""

    rows: list[list[int]]
    batch_size: int
    autocast_dtype: torch.dtype | None = None  # eval.precision, resolved


@dataclass
class LoopResult:
    steps: int  # optimizer steps of the whole run (across resumes)
    epoch: float  # epochs done, fractional (12 steps of 8 per epoch: 1.5)
    seconds: float  # wall time of this attempt's loop (evaluations and checkpoints included)
    real_tokens: int  # non-pad, non-virtual tokens this attempt trained on, all ranks and jobs
    resumed_from_step: int
    time_to_first_step_s: float | None  # from the run's start (run() entry) to the first step's end
    time_to_first_step_process_s: float | None  # the same from the process start (imports included)


def train(jobs: list[Job], rows: list[list[int]], pad_id: int, settings: LoopSettings, *,
          checkpoint_dir: Path | None = None, resume_from: Path | None = None, epoch_eval: EpochEval | None = None,
          run_start: float | None = None, on_step: Callable[[int, int], None] | None = None,
          stop: Callable[[], int | None] | None = None) -> LoopResult:
    """Train every job for the same number of steps; returns when the last step is done.

    `resume_from`: a committed checkpoint of this very run to continue from. `on_step(step,
    real_tokens)` is called after every optimizer step (scripts/bench.py times steps with it).
    """
    # --- setup ------------------------------------------------------------------------------------
    # Mixed precision is not given to the Accelerator: its state is a process-wide singleton that
    # refuses another setting later in the same process (tests, sweeps and the bench run fp32 and
    # bf16 jobs in one process), so bf16 is an explicit autocast around the forward below.
    # cpu=True where there is no GPU: without it accelerate 1.15 ignores torchrun's WORLD_SIZE on a
    # CPU and every rank trains alone as "rank 0" (measured); with it, DDP over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    bf16 = settings.precision == "bf16"
    collate = PaddingCollator(pad_id)
    lengths = [len(r) for r in rows]
    per_epoch = steps_per_epoch(len(rows), settings.batch_size, world)
    total_steps = settings.max_steps or settings.epochs * per_epoch

    forwards, params, optimizers, schedules = [], [], [], []
    for job in jobs:
        # the DDP wrapper when distributed, the model itself (on the device) otherwise
        forwards.append(accelerator.prepare_model(job.model))
        params.append(list(job.trainable().values()))
        # fused: the HF Trainer's default too (adamw_torch_fused); it takes the rate as a tensor, so an
        # absurd learning rate makes inf weights and then a NaN loss that names its step, where the
        # single-tensor Adam raises an overflow error from inside its update
        optimizers.append(torch.optim.AdamW(params[-1], lr=job.learning_rate, weight_decay=job.weight_decay,
                                            fused=True))
        schedules.append(Schedule(job.lr_scheduler, job.learning_rate, total_steps, job.warmup_steps,
                                  job.decay_fraction))

    step, epoch, skip = 0, 0, 0  # skip: batches of `epoch` already done (a mid-epoch resume)
    if resume_from is not None:
        saved = checkpoints.load(resume_from)
        step, epoch, skip = saved.state["global_step"], saved.state["epoch"], saved.state["batches_done"]
        for job, optimizer, state, prompt, opt_state in zip(jobs, optimizers, saved.state["jobs"], saved.prompts,
                                                           saved.optimizers, strict=True):
            with torch.no_grad():
                for name, param in job.trainable().items():
                    param.copy_(prompt[name])
            optimizer.load_state_dict(opt_state)
            job.loss_sum, job.history = state["loss_sum"], list(state["history"])
    resumed_from = step
    epoch_done = epoch + skip / per_epoch
    delay = checkpoints.step_delay_for_tests()

    def save(next_epoch: int, next_batch: int) -> Path:
        state = {"global_step": step, "epoch": next_epoch, "batches_done": next_batch,
                 "jobs": [{"name": j.name, "loss_sum": j.loss_sum, "history": j.history} for j in jobs]}
        return checkpoints.save(checkpoint_dir, step, checkpoints.Checkpoint(
            state=state, prompts=[{n: p.detach().cpu() for n, p in j.trainable().items()} for j in jobs],
            optimizers=[o.state_dict() for o in optimizers]))

    # --- train ------------------------------------------------------------------------------------
    real_tokens, first_step = 0, None
    since_log = [[0.0, 0] for _ in jobs]  # per job: loss sum and steps since its last log line
    started = time.perf_counter()
    while step < total_steps:
        # each job's batches of this epoch, this rank's share; the same on every resume
        orders = [epoch_batches(lengths, settings.batch_size, job.seed, epoch, settings.group_by_length, rank, world)
                  for job in jobs]
        for batch in range(skip, per_epoch):
            epoch_done = epoch + (batch + 1) / per_epoch
            for j, (job, forward, optimizer, schedule) in enumerate(zip(jobs, forwards, optimizers, schedules)):
                inputs = collate([{"input_ids": rows[k]} for k in orders[j][batch]])
                real_tokens += int(inputs["attention_mask"].sum())  # the rows' own tokens: no pad, no prompt
                inputs = {k: v.to(device) for k, v in inputs.items()}
                job.model.train()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    if job.fast_loss:
                        loss = prompt_tuning_loss(job.model, inputs["input_ids"], inputs["attention_mask"],
                                                  inputs["labels"])
                    else:  # PEFT's forward: the mean NLL over the labelled tokens, as the fast loss
                        loss = forward(**inputs).loss
                # every rank sees the same value, so all of them stop together on a NaN
                value = (accelerator.reduce(loss.detach(), "mean") if world > 1 else loss).item()
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"training loss became {value} at step {step + 1}"
                        f"{f' (job {job.name})' if len(jobs) > 1 else ''}; "
                        "lower training.learning_rate or use training.precision=fp32")
                loss.backward()  # under DDP this averages the prompt's gradient over the ranks
                grad_norm = torch.nn.utils.clip_grad_norm_(params[j], job.max_grad_norm)
                lr = schedule.lr(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                job.loss_sum += value
                since_log[j][0] += value
                since_log[j][1] += 1
                if main and (step == 0 or (step + 1) % settings.logging_steps == 0):  # and the first step
                    job.log({keys.TRAIN_LOSS: since_log[j][0] / since_log[j][1], keys.TRAIN_LEARNING_RATE: lr,
                             keys.TRAIN_GRAD_NORM: float(grad_norm), keys.TRAIN_STEP: step + 1,
                             keys.EPOCH: round(epoch_done, 4)})
                    since_log[j] = [0.0, 0]
            step += 1
            if first_step is None:
                first_step = (time.time(), process_start())
            if on_step is not None:
                on_step(step, real_tokens)
            if delay:
                time.sleep(delay)  # test-only: slows a tiny run so a test can kill it on time

            end_of_epoch, last = batch + 1 == per_epoch, step >= total_steps
            if main and epoch_eval is not None and (end_of_epoch or last):
                for job in jobs:
                    result = perplexity(job.model, epoch_eval.rows, pad_id, epoch_eval.batch_size,
                                        virtual_tokens_in_logits(job.model), autocast_dtype=epoch_eval.autocast_dtype)
                    job.last_eval = (step, result)
                    row = {keys.EPOCH: round(epoch_done, 4), keys.TRAIN_STEP: step, keys.EVAL_LOSS: result.loss,
                           keys.EVAL_PERPLEXITY: result.perplexity} | job.history_extra
                    job.history.append(row)
                    job.log(row)
            # the position to continue from: a finished epoch is the start of the next one
            position = (epoch + 1, 0) if end_of_epoch else (epoch, batch + 1)
            saved = None
            if main and checkpoint_dir is not None and (
                    last or (end_of_epoch and settings.save_every_epoch)
                    or (settings.save_steps and step % settings.save_steps == 0)):
                saved = save(*position)
            signum = stop() if stop is not None else None
            if world > 1 and stop is not None:  # every rank stops at the same step (the signal may reach one)
                anyone = accelerator.reduce(torch.tensor(int(bool(signum)), device=device), "sum").item()
                signum = signum or (int(signal.SIGTERM) if anyone else None)
            if signum:  # preemption: a checkpoint here, then out (softprompt.train.preemption)
                if main and checkpoint_dir is not None and saved is None:
                    saved = save(*position)
                raise Preempted(signum, step, saved)
            if last:
                break
        skip = 0
        epoch += 1
    seconds = time.perf_counter() - started

    # --- result -----------------------------------------------------------------------------------
    # every rank counted its own shard; all ranks reach this line once, right after training
    real_tokens = distributed.sum_over_ranks(real_tokens)
    return LoopResult(
        steps=step, epoch=epoch_done, seconds=seconds, real_tokens=real_tokens, resumed_from_step=resumed_from,
        time_to_first_step_s=first_step[0] - run_start if first_step and run_start is not None else None,
        time_to_first_step_process_s=first_step[0] - first_step[1] if first_step else None)


def process_start() -> float:
    """When this process started, as a `time.time()` value.

    On Linux: its start in clock ticks since boot (/proc/self/stat) against CLOCK_BOOTTIME, exact
    to a tick (10 ms). psutil's `create_time()` adds that start to /proc/stat's boot time, which is
    whole seconds: measured 0.75 s early on the dev VM, so time to first step read 0.75 s long.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, IndexError, ValueError, AttributeError):  # not Linux
        import psutil

        return psutil.Process().create_time()


def whole_run_loss(job: Job, steps: int) -> float:
    """The mean of the per-step training losses over all steps of the run (resumes included)."""
    return job.loss_sum / max(steps, 1)
