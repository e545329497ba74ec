"""The training engine: every run trains here, a single run as a pack of one job.

`run_pack(configs, run_dirs, trunks)` trains a set of jobs that softprompt.train.planner grouped
(`train.py` hands it one job; `scripts/sweep.py`, `hydra/launcher=packed` and Hydra's basic
launcher hand it their packs) and writes each job's run directory. What the jobs share is paid
once: start-up, loading the model, tokenising each distinct data split, the base model's
evaluation. What is each job's own stays its own: prompt parameters, AdamW state, learning-rate
schedule, gradient clipping, loss normalisation (a mean over its own batch's tokens) and data
order (drawn from its own seed: softprompt.train.batches).

Trunks. Jobs that differ only in their length train as one *lane* (a prompt and its optimizer)
until they part:
- `constant`: a job's state after its last step is the trunk's state at that step: it is evaluated
  and written as its own run there, and the trunk goes on;
- `wsd`: a job leaves the trunk where its own decay starts, as a *branch*: a copy of the trunk's
  prompt and optimizer state that runs the decay steps on the same batches as the job alone.
Both are exact: the job alone computes the same numbers in the same order.

One step function (softprompt.train.step.train_step), one checkpoint format (`_save`/`_restore`,
format `softprompt-pack/1` in the first job's `checkpoints/`), one writer of a job's outputs
(softprompt.train.outputs.write_run), one failure policy: a job whose loss becomes NaN/inf is
marked failed (`failed.json`, its W&B run finished with exit code 1) with the others of its lane,
and the rest of the pack goes on.

Forward (`training.pack_forward`): `turns` steps the lanes one after another (one forward and
backward each); `concat` puts the rows of all lanes into one forward and backward through the base,
each row with its own lane's prompt, right-padded (the sum of the lanes' losses has, for each
prompt, exactly its own lane's gradient); `auto` times both on the first batches and keeps the
faster. The choice is recorded in each job's config.json (`pack.forward`) and metrics.

Every job leaves the same files and metrics keys (adapter/, metrics.json last, generations.jsonl,
history.jsonl, prompt_tokens.jsonl, config.json with `pack` and `trunk` provenance) and one W&B
run, open from the pack's start so that its curves arrive while it trains (W&B's
`reinit="create_new"`: one run object per job, several open at once).

Several processes (`torchrun`, `accelerate launch`): every rank trains its shard of each lane's
batch, the prompts' gradients are averaged over the ranks (softprompt.train.step), and rank 0
alone evaluates, logs, checkpoints and writes. Under `training.fsdp` the base's decoder layers are
sharded over the ranks (softprompt.train.sharding) and every forward through them needs every
rank: all ranks then run the evaluations and generations in lock-step (`Placement.evaluates`),
without the base-evaluation cache (a rank that found it would leave the others in a forward), and
rank 0 alone still logs, checkpoints and writes. SIGTERM/SIGUSR1/SIGUSR2 stop the pack after the
step with a checkpoint (softprompt.train.preemption); a rerun of the same command continues it.

Writes are batched. A job whose training ends is *trained*: a copy of its prompt parameters and
what its lane says about it then (last evaluation, loss sum, tokens, times) wait for a *flush*. A
flush decodes the eval prompts of all its prompt-tuning and p-tuning jobs in one `generate` call,
each row behind its own job's soft prompt (decoding is memory-bound: a step reads every weight once,
for 6 rows or 36), then writes each job with its own prompt put back into its lane's model. Those
jobs flush when their prompts fill a decode batch (`FLUSH_BATCH_ROWS`: waiting longer would save
nothing) and at the pack's end; a pack checkpoint holds the jobs still waiting (their prompts and
what their lane said), so a resume writes them without training them again. Other methods generate
inside their own write, as a job alone does, and are written as soon as they are trained.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, open_dict
from transformers import set_seed

from softprompt.core import keys
from softprompt.core.clock import process_start
from softprompt.core.config import resolved
from softprompt.core.progress import progress
from softprompt.core.provenance import provenance
from softprompt.core.rundir import RunDir
from softprompt.data.loading import load_splits, tokenize
from softprompt.evaluation.base_cache import evaluate_base
from softprompt.evaluation.evaluate import (
    eval_prompts,
    generation_settings,
    train_subset,
)
from softprompt.evaluation.perplexity import PerplexityResult, perplexity
from softprompt.models import generation
from softprompt.models.cast_free import cast_free_decoder
from softprompt.models.fast_loss import NllSum, nll_sum, supports_fast_loss
from softprompt.models.loading import load_model, loader_placed
from softprompt.models.methods import get as get_method
from softprompt.models.methods import (
    soft_prompt_embeddings,
    virtual_tokens_in_logits,
    wrap,
)
from softprompt.models.training_attention import resolve_training_attention
from softprompt.models.transfer import prompt_source
from softprompt.core.precision import autocast_dtype, model_device, resolve_precision
from softprompt.track.wandb_run import Tracker, resolve_mode, run_name
from softprompt.train import checkpoints, preemption, resume
from softprompt.train.batches import PaddingCollator, epoch_batches, steps_per_epoch
from softprompt.train.compile import (LayerCompiledDecoder, compiled_decoder, compiled_nll_sum, plain_step,
                                      resolve_torch_compile)
from softprompt.train.placement import Placement
from softprompt.train.schedules import Schedule
from softprompt.train.step import forward_backward, log_row, train_step

CALIBRATION_ROUNDS = 1  # timed rounds per way, after one untimed round each (first-call costs)
# auto: below this many steps in a pack's longest lane, timing both ways (4 steps' worth) would cost
# more than the faster one could save; such packs step in turns
CALIBRATION_MIN_STEPS = 20
# auto: above this many rows per step (lanes x batch size) concat is not tried: one forward and
# backward over all lanes' rows keeps all their activations at once (measured: 15 lanes x 8 rows of
# SmolLM2, <= 128 tokens each, reached 16-19 GB of RSS in the calibration step)
CALIBRATION_MAX_ROWS = 32
# the most rows a flush decodes at once (unless eval.batch_size asks for more): a decode step reads
# every weight once whatever its rows, but its KV cache and activations grow with them; the seed
# grid's 15 jobs x 6 prompts decode in two batches. Trained jobs wait until their prompts fill one
# such batch (or the pack ends)
FLUSH_BATCH_ROWS = 64


# --- what the jobs share -------------------------------------------------------------------------


@dataclass
class Data:
    """One data split (a function of the dataset settings and the seed), tokenised, with the base
    model's evaluation on it (rank 0 only): shared by every job of the pack with that seed."""

    splits: Any
    train_rows: list[list[int]]
    val_rows: list[list[int]]
    train_ppl_rows: list[list[int]]
    prompts: list
    base: Any  # ModelEval of the base model (None on ranks other than 0)
    base_cached: bool
    base_seconds: float

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.train_rows]


# --- what is each job's own ----------------------------------------------------------------------


@dataclass
class Member:
    """One grid point: a run directory, a W&B run, a length."""

    index: int
    cfg: DictConfig
    out: Path
    data: Data
    total: int  # its optimizer steps
    leave_at: int  # the step at which it leaves its trunk's lane (== total: cut there; < total: branch)
    name: str = ""  # its W&B run's name
    config: dict[str, Any] = field(default_factory=dict)  # config.json
    rows: list[dict[str, Any]] = field(default_factory=list)  # its history (history.jsonl, W&B curves), in order
    state: str = "pending"  # pending, trained (waiting for a flush), finished, failed
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    trunk_steps: int = 0  # steps it shared with other jobs (trained once for all of them)
    tracker: Tracker | None = None  # its W&B run, open from the pack's start until it is written
    stop_requested: bool = False  # W&B asked its run to stop (set from W&B's thread; read between steps)
    stopped: bool = False  # it ended where W&B stopped it, not at its budget
    pack_seconds: dict[str, float] = field(default_factory=dict)  # the whole pack's wall time, split (and its lane-steps)

    def log(self, row: dict[str, Any]) -> None:
        """A history row: kept for history.jsonl and sent to the job's W&B run now."""
        self.rows.append(row)
        if self.tracker is not None:
            self.tracker.log(row)


@dataclass
class Lane:
    """A prompt being trained: a PEFT model over the shared base, its optimizer and schedule."""

    model: Any
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    members: list[Member]  # the jobs whose state this lane is (shortest first)
    data: Data
    seed: int
    max_grad_norm: float
    fast_loss: bool
    made_from: int = 0  # the member whose settings (and seed) built it: a trunk's longest job, a branch's job
    start: int = 0  # the step it begins at (a branch begins where it leaves its trunk)
    loss_sum: float = 0.0
    tokens: int = 0  # real tokens trained on, all ranks (a branch starts with its trunk's)
    since_log: list[float] = field(default_factory=lambda: [0.0, 0])
    last_eval: tuple[int, PerplexityResult] | None = None
    initial_prompt: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.schedule.total_steps

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of what the lane trains; `Trained.params` and checkpoints follow this order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_trainable()]


@dataclass
class Trained:
    """A job whose training ended, waiting for the next flush: its prompt as it was at its last
    step (its lane may train on) and what the lane said about it then."""

    member: Member
    lane: Lane  # its model holds `params` again while the job is evaluated and written
    params: list[torch.Tensor]  # copies of the lane's trainable parameters at the job's last step
    last_eval: PerplexityResult | None  # the held-out evaluation of exactly these parameters, if any
    tokens: int  # real tokens its prompt was trained on (its trunk's included)
    train: dict[str, Any]  # its train/* and pack/* metrics


@dataclass
class Clock:
    """Where the pack's wall time goes, for the `time/*` keys of each job (docs/metrics.md)."""

    start: float  # time.time() at the pack's (or the run's) start
    base_eval_s: float = 0.0  # the base evaluations, all data splits
    setup_end: float = 0.0  # time.time() when training begins
    eval_s: float = 0.0  # per-epoch evaluations and flushes

    def job_times(self, tuned_eval_s: float, save_s: float) -> dict[str, float]:
        """A job's `time/*` keys at its metrics.json: set-up and base evaluation are the pack's;
        tuned evaluation and saving are the job's own; training is the rest of the pack's wall
        until then (other lanes' steps and the wait for its flush included), so they add up."""
        total = time.time() - self.start
        startup = self.setup_end - self.start - self.base_eval_s
        return {keys.TIME_STARTUP_S: startup, keys.TIME_BASE_EVAL_S: self.base_eval_s,
                keys.TIME_TUNED_EVAL_S: tuned_eval_s, keys.TIME_SAVE_S: save_s,
                keys.TIME_TRAIN_S: total - startup - self.base_eval_s - tuned_eval_s - save_s,
                keys.TIME_TOTAL_S: total}


# --- the engine ------------------------------------------------------------------------------------


def run_pack(configs: list[DictConfig], run_dirs: list[str | Path], trunks: list[list[int]],
             names: list[str] | None = None, log: Callable[[str], None] = print, run_start: float | None = None,
             on_step: Callable[[int, int], None] | None = None, halving=None) -> list[Member]:
    """Train the jobs (`trunks`: lists of indexes into `configs`, shortest first, from
    softprompt.train.planner) and write each job's run directory. `names`: their W&B run names
    (default: from each config, as a run without overrides names itself). `run_start`: the
    time.time() the jobs' clocks start from (default: now). `on_step(step, real_tokens)` is called
    after every step (scripts/bench.py times steps with it). `halving`: a sweep's hyperband
    (softprompt.train.halving.Halving), which stops jobs at epoch boundaries. Returns the members in the order of
    `configs`, each `finished` (with its metrics) or `failed` (with its error); on ranks other than
    0 none is written. Raises `preemption.Preempted` after a preemption signal's checkpoint."""
    from softprompt.train import preflight

    clock = Clock(start=run_start or time.time())
    if len(configs) != len(run_dirs):
        raise ValueError("one run dir per config")
    for cfg in configs:
        preflight.check(cfg)
    first = configs[0]
    dirs = [Path(d) for d in run_dirs]
    place = Placement.of(first)
    main = place.main
    point = resume.prepare(configs, dirs, log=_say(log, main))
    saved = point.load(place.device)
    if first.training.num_threads:
        torch.set_num_threads(first.training.num_threads)
    forward = first.training.pack_forward
    precision = resolve_precision(first.training.precision, place.device)
    wandb_mode = resolve_mode(first.wandb.mode) if main else "disabled"

    # --- setup: the model once, each distinct data split once ------------------------------------
    done_before = {i for i, m in enumerate(saved.state["members"]) if m["state"] != "pending"} if saved else set()
    for i, out in enumerate(dirs):
        if main and i not in done_before:
            RunDir(out).start()  # a rerun in the same dir is not finished yet
            RunDir(out).failed.unlink(missing_ok=True)
    loaded = load_model(first.model, place.device)
    place.model(loaded.model)
    if place.fsdp:
        from softprompt.train.sharding import sharded_layers

        _say(log, main)(f"fsdp: {sharded_layers(loaded.model)} decoder layers sharded over {place.world} ranks")
    data_by_seed: dict[int, Data] = {}
    for cfg in configs:
        if cfg.seed not in data_by_seed:
            data_by_seed[cfg.seed] = load_data(cfg, loaded, evaluate=place.evaluates, log=_say(log, main),
                                               cache_base=not place.fsdp)
    clock.base_eval_s = sum(d.base_seconds for d in data_by_seed.values())
    members = []
    for i, (cfg, out) in enumerate(zip(configs, dirs)):
        data = data_by_seed[cfg.seed]
        per_epoch = steps_per_epoch(len(data.train_rows), cfg.training.batch_size, place.world)
        total = cfg.training.max_steps or cfg.training.epochs * per_epoch
        name = names[i] if names else run_name(cfg, get_method(cfg.peft.method).tag(cfg.peft), overrides=[])
        members.append(Member(i, cfg, out, data, total=total, leave_at=total, name=name))

    lanes: list[Lane] = []
    for trunk in trunks:
        group = [members[i] for i in trunk]
        longest = group[-1]
        for m in group[:-1]:
            m.leave_at = _leave_at(m)
        for m in group:  # the steps it trains together with another job of its trunk
            m.trunk_steps = max((min(o.leave_at, m.leave_at) for o in group if o is not m), default=0)
        if saved is None:
            lanes.append(new_lane(longest.cfg, loaded, longest.data, group, longest.total, made_from=longest.index))
    step = 0
    waiting: list[Trained] = []  # jobs trained but not written yet
    if saved is not None:
        step, lanes, waiting = _restore(saved, members, loaded)
        forward = saved.state["forward"]  # the way the first attempt chose: no second calibration

    # the same numbers, no weight casts each step
    decoder = cast_free_decoder(loaded.model, torch.bfloat16 if precision == "bf16" else None,
                                checkpointing=first.training.gradient_checkpointing, sharded=place.fsdp) \
        if any(lane.fast_loss for lane in lanes) else None
    # training.torch_compile: compiled once for the pack, before the forward is chosen (which it times)
    if saved is not None and "torch_compile" in saved.state:  # the first attempt's choice: its rounding path
        compiling, compile_why = saved.state["torch_compile"], "as the run's first attempt chose"
    else:
        compiling, compile_why = resolve_torch_compile(
            first.training.torch_compile, place.device, _lane_steps_left(members, lanes, step),
            plain_step(first, loaded.model, place.fsdp))
    compile_s, head = None, nll_sum
    if compiling:
        _say(log, main)(f"training.torch_compile: compiling the decoder layers and the loss ({compile_why})")
        decoder, head, compile_s = _compile(lanes, loaded, place, precision, _say(log, main), decoder)
    concat_ok = len(lanes) > 1 and all(lane.fast_loss for lane in lanes)
    if forward == "concat" and not concat_ok and len(configs) > 1:
        _say(log, main)("pack: training.pack_forward=concat needs prompt tuning or p-tuning on a supported model "
                        "in every job and more than one lane; stepping in turns")
    calibration = saved.state.get("calibration_s") if saved else None
    if forward == "auto":
        forward = "turns"
        rows = len(lanes) * first.training.batch_size
        if concat_ok and rows > CALIBRATION_MAX_ROWS:
            _say(log, main)(f"pack: forward turns ({rows} rows per step is too many for one concatenated forward; "
                            f"training.pack_max_rows splits the pack)")
        elif concat_ok and max(lane.end for lane in lanes) >= CALIBRATION_MIN_STEPS:
            forward, calibration = _calibrate(lanes, loaded, place, precision, _say(log, main), decoder, head)
    elif forward == "concat" and not concat_ok:
        forward = "turns"

    pack_info = {"jobs": len(configs), "trunks": len(trunks), "forward": forward,
                 "calibration_s": calibration, "compile_s": compile_s,
                 "torch_compile": compile_why, "members": [d.name for d in dirs]}
    for trunk in trunks:
        group = [members[i] for i in trunk]
        lengths = [m.total for m in group]
        for m in group:
            m.config = resolved(m.cfg) | {
                "data": {"fingerprint": m.data.splits.fingerprint(), "source": m.data.splits.source,
                         "train_rows": len(m.data.train_rows), "validation_rows": len(m.data.val_rows)},
                "provenance": provenance(),
                "pack": pack_info | {"index": m.index},
                "trunk": {"steps": lengths, "leaves_at_step": m.leave_at,
                          "branch": m.leave_at < m.total, "shared_with": [x.out.name for x in group]}} | prompt_source(m.cfg)
            if main and m.state == "pending":
                RunDir(m.out).write_config(m.config)
    # SIGTERM/SIGUSR1/SIGUSR2 from here on stop the pack at a step boundary (softprompt.train.preemption).
    # The watch starts before the W&B runs do: a signal while they start (seconds on a loaded machine)
    # waits for the first step boundary instead of ending the process by the signal's default action.
    with preemption.Watch(dirs[0] if main else None) as watch:
        if main:  # each unwritten job's W&B run, open while it trains (the same run again on a resume)
            for m in members:
                if m.state in ("pending", "trained"):
                    m.tracker = Tracker.start(m.cfg, m.out, m.config, m.name, mode=wandb_mode,
                                              run_id=point.wandb_run_ids[m.index], stop_fn=_stopper(m))
                    if m.tracker.run_id:
                        RunDir(m.out).write_wandb_run_id(m.tracker.run_id)
        try:
            _train(members, lanes, waiting, step, loaded, place, clock, forward, calibration, precision, log, watch,
                   on_step, decoder, halving, head)
        except preemption.Preempted as exc:
            for m in members:
                if m.tracker is not None:
                    m.tracker.mark_preempting()
                    m.tracker.finish(exit_code=exc.exit_status)
            watch.chain(exc.signum)  # submitit's handler, where there is one: it requeues the job
            raise
        except BaseException:
            for m in members:
                if m.tracker is not None:
                    m.tracker.finish(exit_code=1)
            raise
    return members


def _lane_steps_left(members: list[Member], lanes: list[Lane], step: int) -> int:
    """The lane-steps still to train from `step` on: every lane's, then every branch's that will
    leave its trunk (a trunk's step counts once)."""
    return sum(lane.end - max(lane.start, step) for lane in lanes) + sum(
        m.total - max(m.leave_at, step) for m in members if m.state == "pending" and m.leave_at < m.total)


def _train(members: list[Member], lanes: list[Lane], waiting: list[Trained], step: int, loaded, place: "Placement",
           clock: Clock, forward: str, calibration, precision: str, log, watch, on_step,
           decoder: torch.nn.Module | None = None, halving=None, head: NllSum = nll_sum) -> None:
    """Every lane one step at a time, in lock-step, until every job is trained and written."""
    first = members[0].cfg
    settings = first.training
    main, world = place.main, place.world
    collate = PaddingCollator(loaded.tokenizer.pad_token_id)
    checkpoint_root = RunDir(members[0].out).checkpoints
    bar = _progress(_lane_steps_left(members, lanes, step), lanes, [m.cfg for m in members], enabled=main)
    compiled = isinstance(decoder, LayerCompiledDecoder)  # kept in checkpoints: a resumed run compiles alike
    clock.setup_end = time.time()
    started = time.perf_counter()
    real_tokens = 0
    lane_steps = 0  # steps of every lane (a trunk's step counts once): what the pack trained, this attempt
    resumed_from = step
    first_step = None
    delay = checkpoints.step_delay_for_tests()
    save_every = settings.save_steps
    attention = resolve_training_attention(settings.attention, place.device)  # once, not at every step
    orders: dict[tuple[int, int], list[list[int]]] = {}
    flush_rows = max(first.eval.batch_size, FLUSH_BATCH_ROWS)
    autocast = torch.bfloat16 if precision == "bf16" else None
    while lanes:
        # members that leave their lane now: a wsd job whose own decay starts at this step
        for lane in list(lanes):
            for m in [m for m in lane.members if m.leave_at == step and m.leave_at < m.total]:
                lane.members.remove(m)
                lanes.append(_branch(lane, m, loaded))
        batches = []
        for lane in lanes:
            epoch, batch = divmod(step, per_epoch_of(lane, settings, world))
            if (lane.seed, epoch) not in orders:  # a job's order alone: a function of (seed, epoch)
                orders[lane.seed, epoch] = epoch_batches(lane.data.lengths, settings.batch_size, lane.seed, epoch,
                                                         settings.group_by_length, place.rank, world)
            order = orders[lane.seed, epoch]
            batches.append(collate([{"input_ids": lane.data.train_rows[k]} for k in order[batch]]))
        result = train_step(lanes, batches, loaded.model, step, forward=forward, device=place.device,
                            autocast=autocast, world=world, decoder=decoder,
                            attention=attention, head=head)
        for lane, value, tokens, norm, lr in zip(list(lanes), result.losses, result.tokens, result.grad_norms,
                                                 result.rates):
            if not math.isfinite(value):
                msg = (f"training loss became {value} at step {step + 1}; lower training.learning_rate or use "
                       "training.precision=fp32")
                for m in lane.members:
                    _fail(m, msg, main, log)
                    if halving is not None and main:
                        halving.failed(m.out.name)
                lanes.remove(lane)
                continue
            real_tokens += tokens
            lane.tokens += tokens
            lane.loss_sum += value
            lane.since_log[0] += value
            lane.since_log[1] += 1
            if step == 0 or (step + 1) % settings.logging_steps == 0:  # and the first step
                row = log_row(step, lane.since_log[0] / lane.since_log[1], lr, float(norm),
                              per_epoch_of(lane, settings, world))
                for m in lane.members:
                    m.log(row)
                lane.since_log = [0.0, 0]
        step += 1
        if first_step is None:  # seconds to the end of the first step: from the pack's start, the process's
            now = time.time()
            first_step = (now - clock.start, now - process_start())
        bar.update(len(lanes))
        lane_steps += len(lanes)
        if on_step is not None:
            on_step(step, real_tokens)
        if delay:
            time.sleep(delay)  # test-only: slows a tiny pack so a test can kill it on time
        # jobs that W&B stopped end here, as results of the steps they trained (every rank alike)
        pending = [m for lane in lanes for m in lane.members]
        if main and watch.requested() == signal.SIGTERM and controller_stopped(pending):
            watch.forget()  # `wandb agent`'s SIGTERM for the runs its controller stopped: a stop, no preemption
            _say(log, main)("SIGTERM with W&B's stop of every running job: a sweep controller's stop, not a preemption")
        for m, stop in zip(pending, place.any_of([m.stop_requested for m in pending])):
            if stop and m.total > step:
                m.total, m.stopped = step, True
                _say(log, main)(f"{m.out.name}: W&B stopped its run; writing it at step {step}")
        # evaluations
        for lane in lanes:
            per_epoch = per_epoch_of(lane, settings, world)
            done = [m for m in lane.members if m.total == step]
            end_of_epoch = step % per_epoch == 0
            if place.evaluates and first.eval.per_epoch and (end_of_epoch or done):  # each epoch and job's end
                t0 = time.perf_counter()
                row = _epoch_eval(lane, step, per_epoch, first)
                clock.eval_s += time.perf_counter() - t0
                # a job that ends mid-epoch (max_steps) gets its own last evaluation, not the trunk's
                for m in (lane.members if end_of_epoch else done):
                    m.log(row)
        # hyperband: the jobs that the sweep's early termination stops at this epoch's end
        if halving is not None:
            ends = [max(m.total for m in lane.members) for lane in lanes]
            _halve(halving, lanes, step, settings, world, place, log)
            saved_steps = sum(end - max((m.total for m in lane.members), default=step) for lane, end in zip(lanes, ends))
            if saved_steps and bar.total:  # the steps that the stopped jobs' lanes no longer train
                bar.total -= saved_steps
                bar.refresh()
        # finished jobs
        trained_now = False
        for lane in list(lanes):
            done = [m for m in lane.members if m.total == step]
            for m in done:
                m.state, trained_now = "trained", True
                if place.evaluates:
                    waiting.append(_trained(m, lane, precision, started, real_tokens, first_step, forward,
                                            resumed_from, world))
                lane.members.remove(m)
            if not lane.members:
                lanes.remove(lane)
        # checkpoints: each epoch's end (and every save_steps), where a job's training ends (before it
        # is written: a failed write resumes without training it again), and where a preemption stops
        end_of_epoch = step % steps_per_epoch(len(members[0].data.train_rows), settings.batch_size, world) == 0
        saved = None
        if main and (lanes or waiting) and (trained_now or (settings.save_every_epoch and end_of_epoch)
                                            or (save_every and step % save_every == 0)):
            saved = _save(checkpoint_root, step, lanes, waiting, members, forward, calibration, compiled)
        signum = place.any_rank(watch.requested()) if lanes else None
        if signum:
            if main and saved is None:
                saved = _save(checkpoint_root, step, lanes, waiting, members, forward, calibration, compiled)
            bar.close()
            raise preemption.Preempted(signum, step, saved)
        _flush_due(waiting, loaded, clock, log, flush_rows, final=not lanes, place=place)
    _flush_due(waiting, loaded, clock, log, flush_rows, final=True, place=place)  # a resume whose training had ended
    bar.close()
    if not main:  # the other ranks' part is done: rank 0 evaluated and wrote the jobs
        for m in members:
            m.state = "finished" if m.state == "trained" else m.state
    total_s = time.time() - clock.start
    setup_s = clock.setup_end - clock.start
    times = {"total_s": round(total_s, 2), "setup_s": round(setup_s, 2), "eval_s": round(clock.eval_s, 2),
             "train_s": round(total_s - setup_s - clock.eval_s, 2), "base_eval_s": round(clock.base_eval_s, 2),
             "lane_steps": lane_steps}
    for m in members:
        m.pack_seconds = times
    if main and len(members) > 1:
        log(f"pack: {len(members)} jobs in {total_s:.1f} s: set-up {setup_s:.1f} s (base evaluation "
            f"{times['base_eval_s']:.1f} s), training {times['train_s']:.1f} s, evaluation {clock.eval_s:.1f} s")


def _flush_due(waiting: list[Trained], loaded, clock: Clock, log, flush_rows: int, final: bool,
               place: Placement) -> None:
    """Evaluate and write the waiting jobs that are due (softprompt.train.pack._due): rank 0 writes;
    under FSDP the other ranks run the same evaluation forwards with it; otherwise they drop them."""
    due = _due(waiting, flush_rows, final=final)
    if due:
        t0 = time.perf_counter()
        if place.evaluates:
            _flush(due, loaded, clock, log, write=place.main)
        written = {id(job) for job in due}  # by identity: a Trained holds tensors
        waiting[:] = [job for job in waiting if id(job) not in written]
        clock.eval_s += time.perf_counter() - t0


# under `wandb agent`: how long a SIGTERM waits at the step boundary for W&B's stop of the run (the
# SDK polls the server for it; the agent sends SIGKILL 30 s after its SIGTERM)
STOP_GRACE_S = 10.0


def controller_stopped(pending: list[Member], grace_s: float | None = None) -> bool:
    """Whether W&B's controller stopped every job still training: asked of a SIGTERM. A run of
    `wandb agent` (WANDB_SWEEP_ID set) waits up to `grace_s` for the stop's report to arrive."""
    if not pending:
        return False
    if grace_s is None:
        grace_s = STOP_GRACE_S if os.environ.get("WANDB_SWEEP_ID") else 0.0
    deadline = time.monotonic() + grace_s
    while not all(m.stop_requested for m in pending):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _halve(halving, lanes: list[Lane], step: int, settings, world: int, place: "Placement", log) -> None:
    """At an epoch's end: every job of the pack's lanes (its history: the base model's value, then
    each epoch's) to the sweep's decisions (softprompt.train.halving); the jobs stopped end here."""
    ended = [lane for lane in lanes if step % per_epoch_of(lane, settings, world) == 0]
    if not ended:
        return
    epoch = step // per_epoch_of(ended[0], settings, world)
    stop: set[str] = set()
    if place.main:
        field = halving_field(halving.metric)
        jobs = {}
        for lane in ended:
            base = getattr(lane.data.base.perplexity, field)
            for m in lane.members:
                history = [base] + [r[halving.metric] for r in m.rows
                                    if halving.metric in r and float(r[keys.EPOCH]).is_integer()]
                jobs[m.out.name] = ("finished" if m.total == step else "running", history)
        stop = set(halving.epoch_end(epoch, jobs))
    members = [m for lane in ended for m in lane.members]
    for m, flag in zip(members, place.any_of([m.out.name in stop for m in members])):
        if flag and m.total > step:
            m.total, m.stopped = step, True
            _say(log, place.main)(f"{m.out.name}: hyperband stopped it after epoch {epoch}; writing it at step {step}")


def halving_field(metric: str) -> str:
    from softprompt.train.halving import PER_EPOCH

    return PER_EPOCH[metric]


def _stopper(m: Member) -> Callable[[], None]:
    """The job's W&B stop callback: it flags this job only; the engine ends it at the next step
    boundary and writes it as a result (the others of its pack go on)."""

    def stop() -> None:
        m.stop_requested = True

    return stop


def _say(log: Callable[[str], None], main: bool) -> Callable[[str], None]:
    """`log` on rank 0, silence elsewhere (every rank runs the same code)."""
    return log if main else (lambda _message: None)


def per_epoch_of(lane: Lane, settings, world: int = 1) -> int:
    return steps_per_epoch(len(lane.data.train_rows), settings.batch_size, world)


def _leave_at(m: Member) -> int:
    """Where a shorter job leaves its trunk: at its end (constant), or where its decay starts (wsd)."""
    t = m.cfg.training
    if t.lr_scheduler == "constant":
        return m.total
    # the first step whose rate differs from the longer run's: wsd's factor is 1 after warm-up until
    # the decay starts (softprompt.train.schedules)
    schedule = Schedule(t.lr_scheduler, t.learning_rate, m.total, t.warmup_steps, t.decay_fraction)
    for step in range(m.total):
        if step >= t.warmup_steps and schedule.factor(step) != 1.0:
            return step
    return m.total


def load_data(cfg: DictConfig, loaded, evaluate: bool = True, log: Callable[[str], None] = print,
              cache_base: bool = True) -> Data:
    """What a job needs before training, for one seed: split, tokenise, evaluate the base model
    (`evaluate`: rank 0 only, every rank under FSDP; `cache_base=False`: never from the
    base-evaluation cache, whatever `eval.cache_base` says)."""
    splits = load_splits(cfg.dataset, cfg.seed)
    tokenizer_id = f"{cfg.model.source}:{loaded.tokenizer_path}"
    train_rows = tokenize(splits.train, loaded.tokenizer, cfg.training.max_length, tokenizer_id)
    val_rows = tokenize(splits.validation, loaded.tokenizer, cfg.training.max_length, tokenizer_id)
    prompts = eval_prompts(cfg.eval, splits.validation)
    train_ppl_rows = train_subset(train_rows, cfg.eval)
    if not evaluate:
        return Data(splits, train_rows, val_rows, train_ppl_rows, prompts, None, False, 0.0)
    # before any job wraps the base: LoRA injects its layers into it in place
    if not cache_base and cfg.eval.cache_base:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.eval.cache_base = False
    base, cached, seconds = evaluate_base(loaded, val_rows, train_ppl_rows, prompts, cfg)
    log(f"base model: held-out perplexity {base.perplexity.perplexity:.3f} on {base.perplexity.tokens} tokens"
        f"{' (cached)' if cached else ''}")
    return Data(splits, train_rows, val_rows, train_ppl_rows, prompts, base, cached, seconds)


def new_lane(cfg: DictConfig, loaded, data: Data, members: list[Member], total: int, made_from: int = 0) -> Lane:
    # every lane seeds with its job's seed before it wraps the base (a random prompt init draws from
    # torch's generator), without moving the pack's own state: a job draws the same prompt alone
    with torch.random.fork_rng():
        set_seed(cfg.seed)
        model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    if not loader_placed(loaded.model):  # PEFT put the prompt beside a placed base's first weights already
        model.to(next(loaded.model.parameters()).device)  # the prompt beside the base, in its own fp32
    t = cfg.training
    # fused: the HF Trainer's default too (adamw_torch_fused); it takes the rate as a tensor, so an
    # absurd learning rate makes inf weights and then a NaN loss that names its step, where the
    # single-tensor Adam raises an overflow error from inside its update
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                                  weight_decay=t.weight_decay, fused=True)
    initial = soft_prompt_embeddings(model)
    return Lane(model=model, optimizer=optimizer,
                schedule=Schedule(t.lr_scheduler, t.learning_rate, total, t.warmup_steps, t.decay_fraction),
                members=members, data=data, seed=cfg.seed, max_grad_norm=t.max_grad_norm, made_from=made_from,
                fast_loss=bool(t.fast_loss) and supports_fast_loss(model),
                initial_prompt=initial.clone() if initial is not None else None)


def _branch(trunk: Lane, m: Member, loaded) -> Lane:
    """A copy of the trunk's state (prompt, optimizer, loss sums, curve) with `m`'s own schedule."""
    lane = new_lane(m.cfg, loaded, trunk.data, [m], m.total, made_from=m.index)
    with torch.no_grad():
        for mine, theirs in zip(lane.trainable(), trunk.trainable(), strict=True):
            mine.copy_(theirs)
    lane.optimizer.load_state_dict(copy.deepcopy(trunk.optimizer.state_dict()))
    lane.start, lane.loss_sum, lane.since_log = m.leave_at, trunk.loss_sum, list(trunk.since_log)
    lane.tokens = trunk.tokens
    lane.last_eval, lane.initial_prompt = trunk.last_eval, trunk.initial_prompt
    return lane


# --- checkpoints: SIGKILL + training.resume=true continues every unfinished job -----------------


def _save(root: Path, step: int, lanes: list[Lane], waiting: list[Trained], members: list[Member], forward: str,
          calibration: dict[str, float] | None, compiled: bool) -> Path:
    """The engine's checkpoint: the lanes' prompts and optimizers, and the trained jobs still
    waiting for a flush (their prompts after the lanes')."""
    state = {
        "format": resume.FORMAT,
        "step": step, "forward": forward, "calibration_s": calibration, "torch_compile": compiled,
        "dirs": [m.out.name for m in members],
        "members": [{"state": m.state, "error": m.error, "rows": m.rows} for m in members],
        "lanes": [{"members": [m.index for m in lane.members], "made_from": lane.made_from, "total": lane.end,
                   "start": lane.start, "loss_sum": lane.loss_sum, "since_log": lane.since_log, "tokens": lane.tokens,
                   "last_eval": [lane.last_eval[0], lane.last_eval[1].as_dict()] if lane.last_eval else None}
                  for lane in lanes],
        "waiting": [{"member": job.member.index, "tokens": job.tokens, "train": job.train,
                     "last_eval": job.last_eval.as_dict() if job.last_eval else None} for job in waiting],
    }
    prompts = [{n: p.detach().cpu() for n, p in lane.named_trainable()} for lane in lanes]
    prompts += [{n: p.cpu() for (n, _), p in zip(job.lane.named_trainable(), job.params, strict=True)}
                for job in waiting]
    return checkpoints.save(root, step, checkpoints.Checkpoint(
        state=state, prompts=prompts, optimizers=[lane.optimizer.state_dict() for lane in lanes]))


def _restore(saved, members: list[Member], loaded) -> tuple[int, list[Lane], list[Trained]]:
    """The step to continue from, the lanes, and the trained jobs that wait for a flush."""
    for m, state in zip(members, saved.state["members"], strict=True):
        m.state, m.error, m.rows = state["state"], state["error"], list(state["rows"])
        if m.state == "finished":
            m.metrics = RunDir(m.out).read_metrics()
    lanes = []
    lane_prompts, waiting_prompts = saved.prompts[:len(saved.state["lanes"])], saved.prompts[len(saved.state["lanes"]):]
    for state, prompt, optimizer in zip(saved.state["lanes"], lane_prompts, saved.optimizers, strict=True):
        owner = members[state["made_from"]]
        lane = new_lane(owner.cfg, loaded, owner.data, [members[i] for i in state["members"]], state["total"],
                         made_from=owner.index)
        with torch.no_grad():
            for name, param in lane.model.named_parameters():
                if param.requires_grad:
                    param.copy_(prompt[name])
        lane.optimizer.load_state_dict(optimizer)
        lane.start, lane.loss_sum, lane.since_log = state["start"], state["loss_sum"], list(state["since_log"])
        lane.tokens = state["tokens"]
        if state["last_eval"]:
            lane.last_eval = (state["last_eval"][0], PerplexityResult(**state["last_eval"][1]))
        lanes.append(lane)
    waiting = []
    for state, prompt in zip(saved.state.get("waiting", []), waiting_prompts, strict=True):
        m = members[state["member"]]
        # a model of the job's own settings to hold its prompt while it is evaluated and written
        holder = new_lane(m.cfg, loaded, m.data, [], m.total, made_from=m.index)
        params = [prompt[name].clone() for name, _ in holder.named_trainable()]
        last_eval = PerplexityResult(**state["last_eval"]) if state["last_eval"] else None
        # trained before the checkpoint; this attempt, which writes it, continued from there
        train = dict(state["train"]) | {keys.TRAIN_RESUMED_FROM_STEP: saved.state["step"]}
        waiting.append(Trained(m, holder, params, last_eval, state["tokens"], train))
    return saved.state["step"], lanes, waiting


# --- evaluation while training -------------------------------------------------------------------


def _epoch_eval(lane: Lane, step: int, per_epoch: int, cfg: DictConfig) -> dict[str, Any]:
    """The lane's held-out perplexity now, as a history row (the loop's per-epoch evaluation)."""
    result = perplexity(lane.model, lane.data.val_rows, _pad_id(lane), cfg.training.eval_batch_size,
                        virtual_tokens_in_logits(lane.model),
                        autocast_dtype=autocast_dtype(cfg.eval.precision, model_device(lane.model)))
    lane.last_eval = (step, result)
    epoch, batch = divmod(step - 1, per_epoch)
    return {keys.EPOCH: round(epoch + (batch + 1) / per_epoch, 4), keys.TRAIN_STEP: step, keys.EVAL_LOSS: result.loss,
            keys.EVAL_PERPLEXITY: result.perplexity, keys.EVAL_BASE_PERPLEXITY: lane.data.base.perplexity.perplexity}


def _pad_id(lane: Lane) -> int:
    return lane.model.get_base_model().config.pad_token_id


# --- auto: which way is faster here ----------------------------------------------------------------


def _first_batches(lanes: list[Lane], loaded, settings, place: "Placement") -> list[dict[str, torch.Tensor]]:
    """Each lane's first batch of its first epoch, collated: what the warm-ups before training run."""
    collate = PaddingCollator(loaded.tokenizer.pad_token_id)
    batches = []
    for lane in lanes:
        order = epoch_batches(lane.data.lengths, settings.batch_size, lane.seed, 0, settings.group_by_length,
                              place.rank, place.world)
        batches.append(collate([{"input_ids": lane.data.train_rows[k]} for k in order[0]]))
    return batches


def _compile(lanes: list[Lane], loaded, place: "Placement", precision: str, log,
             cast_free: torch.nn.Module | None) -> tuple[torch.nn.Module | None, NllSum, float | None]:
    """training.torch_compile: the base's decoder layers (around the cast-free decoder, if any) and
    the loss's head compiled for the lanes of the hidden-state loss, then one forward and backward
    of their first batches through them (no optimizer step: nothing moves), so that compiling
    happens here, timed, and not inside the first step. Without such lanes: (cast_free, nll_sum, None)."""
    eager = sorted({lane.members[0].cfg.peft.method for lane in lanes if not lane.fast_loss})
    if eager:
        log(f"training.torch_compile: {', '.join(eager)} trains through PEFT's forward, which runs eager; "
            "the decoder and the loss are compiled for the hidden-state loss (prompt tuning, p-tuning) only")
    fast = [lane for lane in lanes if lane.fast_loss]
    if not fast:
        return cast_free, nll_sum, None
    decoder, head = compiled_decoder(loaded.model, cast_free), compiled_nll_sum()
    settings = fast[0].members[0].cfg.training
    batches = _first_batches(fast, loaded, settings, place)
    start = time.perf_counter()
    with torch.random.fork_rng():
        forward_backward(fast, batches, loaded.model, "turns", place.device,
                         torch.bfloat16 if precision == "bf16" else None, decoder,
                         resolve_training_attention(settings.attention, place.device), head)
    for lane in fast:
        lane.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    log(f"training.torch_compile: the decoder and the loss compiled in {seconds:.1f} s (with one forward and backward)")
    return decoder, head, seconds


def _calibrate(lanes: list[Lane], loaded, place: "Placement", precision: str, log,
               decoder: torch.nn.Module | None = None, head: NllSum = nll_sum) -> tuple[str, dict[str, float]]:
    """Time a forward+backward of the first batches both ways (no optimizer step: nothing moves).
    Returns the faster way and the seconds of one step each way."""
    settings = lanes[0].members[0].cfg.training
    batches = _first_batches(lanes, loaded, settings, place)
    best = {"turns": math.inf, "concat": math.inf}
    with torch.random.fork_rng():
        for round_ in range(CALIBRATION_ROUNDS + 1):
            for way in best:
                t0 = time.perf_counter()
                forward_backward(lanes, batches, loaded.model, way, place.device,
                                  torch.bfloat16 if precision == "bf16" else None, decoder,
                                  resolve_training_attention(settings.attention, place.device), head)
                seconds = time.perf_counter() - t0
                for lane in lanes:
                    lane.optimizer.zero_grad(set_to_none=True)
                if round_:  # the first round pays one-off costs (allocator, kernels)
                    best[way] = min(best[way], seconds)
    choice = min(best, key=best.get)
    log(f"pack: forward {choice} (one step of {len(lanes)} prompts: turns {best['turns']:.3f} s, "
        f"concat {best['concat']:.3f} s)")
    return choice, {way: round(seconds, 4) for way, seconds in best.items()}


# --- the end of a job ------------------------------------------------------------------------------


def _trained(m: Member, lane: Lane, precision: str, started: float, real_tokens: int,
             first_step: tuple[float, float] | None, forward: str, resumed_from: int, world: int) -> Trained:
    """The job `m` at its last step (now): its prompt and what its lane says about it, for the next flush."""
    seconds = time.perf_counter() - started
    last = lane.last_eval if lane.last_eval and lane.last_eval[0] == m.total else None
    epoch, batch = divmod(m.total - 1, per_epoch_of(lane, m.cfg.training, world))
    per_epoch = per_epoch_of(lane, m.cfg.training, world)
    return Trained(m, lane, [p.detach().clone() for p in lane.trainable()], last[1] if last else None, lane.tokens, {
        keys.TRAIN_LOSS: lane.loss_sum / max(m.total, 1), keys.TRAIN_EPOCHS: epoch + (batch + 1) / per_epoch,
        keys.TRAIN_STEPS: m.total, keys.TRAIN_RUNTIME_S: seconds, keys.TRAIN_TOKENS_PER_SECOND: real_tokens / seconds,
        keys.TRAIN_PRECISION: precision,
        keys.TRAIN_ATTENTION: resolve_training_attention(m.cfg.training.attention, model_device(lane.model)),
        keys.TRAIN_TIME_TO_FIRST_STEP_S: first_step[0] if first_step else None,
        keys.TRAIN_TIME_TO_FIRST_STEP_PROCESS_S: first_step[1] if first_step else None,
        keys.TRAIN_RESUMED_FROM_STEP: resumed_from,
        keys.PACK_JOBS: len(m.config["pack"]["members"]), keys.PACK_FORWARD: forward,
        keys.PACK_TRUNK_STEPS: m.trunk_steps} | (
        {keys.TRAIN_COMPILE_S: m.config["pack"]["compile_s"]} if m.config["pack"].get("compile_s") else {}) | (
        {keys.SWEEP_TERMINATED_AT_EPOCH: epoch + (batch + 1) / per_epoch} if m.stopped else {}))


@contextlib.contextmanager
def _holding(job: Trained):
    """The job's lane's model with the job's own prompt in it; the lane's own put back after."""
    params = job.lane.trainable()
    own = [p.detach().clone() for p in params]
    with torch.no_grad():
        for param, mine in zip(params, job.params, strict=True):
            param.copy_(mine)
    try:
        yield job.lane.model
    finally:
        with torch.no_grad():
            for param, theirs in zip(params, own, strict=True):
                param.copy_(theirs)


def _batched(job: Trained) -> bool:
    """Whether the job's generations can join a flush's batch (its prompt is input embeddings)."""
    return get_method(job.member.cfg.peft.method).soft_prompt


def _due(waiting: list[Trained], flush_rows: int, final: bool) -> list[Trained]:
    """The waiting jobs to write now: all of them at the pack's end; before it, those that cannot
    join a batch, and the batched ones once their eval prompts fill a decode batch."""
    if final:
        return list(waiting)
    batched = [job for job in waiting if _batched(job)]
    full = sum(len(job.member.data.prompts) for job in batched) >= flush_rows
    return [job for job in waiting if full or not _batched(job)]


def _flush(jobs: list[Trained], loaded, clock: Clock, log, write: bool = True) -> None:
    """Evaluate and write these trained jobs: the generations of all those whose prompt is input
    embeddings in one batched call, each row behind its own job's soft prompt. `write=False`: the
    same forwards, nothing written (the other ranks under FSDP)."""
    if not jobs:
        return
    batched = [job for job in jobs if _batched(job)]
    texts: dict[int, tuple[list[str], float]] = {}  # member index -> its generations, its share of the time
    if batched:
        prompts, soft_prompts = [], []
        for job in batched:
            with _holding(job) as model:  # p-tuning: its encoder's output for these parameters
                embeds = soft_prompt_embeddings(model).clone()
            prompts += [p.prompt for p in job.member.data.prompts]
            soft_prompts += [embeds] * len(job.member.data.prompts)
        cfg = batched[0].member.cfg  # a pack's jobs share their eval settings (softprompt.train.planner)
        t0 = time.perf_counter()
        # the base under the PEFT model, as the method's own generator uses it (one base for the pack)
        out = generation.generate(batched[0].lane.model.get_base_model(), loaded.tokenizer, prompts,
                                  generation_settings(cfg.eval), soft_prompt=soft_prompts,
                                  batch_size=max(cfg.eval.batch_size, min(len(prompts), FLUSH_BATCH_ROWS)),
                                  desc=f"generating ({len(batched)} jobs)")
        seconds = time.perf_counter() - t0
        start = 0
        for job in batched:
            n = len(job.member.data.prompts)
            texts[job.member.index] = out[start:start + n], seconds * n / max(len(prompts), 1)
            start += n
    for job in jobs:
        generations, seconds = texts.get(job.member.index, (None, 0.0))
        _write(job, loaded, generations, seconds, clock, log, write=write)


def _write(job: Trained, loaded, generations: list[str] | None, generation_s: float, clock: Clock, log,
           write: bool = True) -> None:
    """Evaluate the job's own prompt and write its run (metrics.json last, its W&B run finished).
    `write=False`: only the evaluation's forwards, in step with the rank that writes (FSDP)."""
    from softprompt.train.outputs import tuned_evaluation, write_run

    m = job.member
    if not write:
        with _holding(job) as model:
            tuned_evaluation(m.cfg, loaded, model, m.data, job.last_eval, generations)
        m.state = "finished"
        return
    with _holding(job) as model:
        m.metrics = write_run(
            m.cfg, m.out, loaded, model, m.data, m.name, m.tracker, history=m.rows,
            last_eval=job.last_eval, initial_prompt=job.lane.initial_prompt, tokens_seen=job.tokens,
            train=job.train, clock=clock, generations=generations, generation_s=generation_s)
    m.tracker, m.state = None, "finished"
    where = f"{m.out.name}: " if len(m.config["pack"]["members"]) > 1 else ""
    log(f"{where}tuned model: held-out perplexity {m.metrics[keys.EVAL_PERPLEXITY]:.3f} "
        f"(base {m.metrics[keys.EVAL_BASE_PERPLEXITY]:.3f})")


def _fail(m: Member, message: str, main: bool, log) -> None:
    """The job's end when its loss is not finite: failed.json instead of metrics.json, its W&B run
    finished with exit code 1; the pack goes on."""
    m.state, m.error = "failed", message
    if not main:
        return
    RunDir(m.out).write_failed({"error": message, "history": list(m.rows)})
    if m.tracker is not None:
        m.tracker.finish(exit_code=1)
        m.tracker = None
    log(f"{m.out.name} failed: {message}")


def _progress(total: int, lanes: list[Lane], configs: list[DictConfig], enabled: bool = True):
    """One bar per pack: its jobs, lanes and budgets; tqdm's ETA from the lane-steps done so far."""
    lengths = sorted({c.training.max_steps or c.training.epochs for c in configs})
    desc = (f"training: {len(configs)} jobs, {len(lanes)} lanes, budgets {','.join(map(str, lengths))}"
            if len(configs) > 1 else "training")
    return progress(desc=desc, total=total if enabled else 0, unit="step", leave=True)  # 0: no bar
