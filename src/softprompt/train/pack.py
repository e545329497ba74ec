"""Training a pack: several grid points in one process, on one frozen base model.

`run_pack(configs, run_dirs, trunks)` is `run(cfg)` for a set of jobs that
softprompt.train.planner grouped. What the jobs share is paid once: start-up, loading the model,
tokenising each distinct data split, the base model's evaluation. What is each job's own stays its
own: prompt parameters, AdamW state, learning-rate schedule, gradient clipping, loss normalisation
(a mean over its own batch's tokens) and data order (drawn from its own seed, as a standalone run
draws it: softprompt.train.batches).

Trunks. Jobs that differ only in their length train as one *lane* (a prompt and its optimizer)
until they part:
- `constant`: a job's state after its last step is the trunk's state at that step: it is evaluated
  and written as its own run there, and the trunk goes on;
- `wsd`: a job leaves the trunk where its own decay starts, as a *branch*: a copy of the trunk's
  prompt and optimizer state that runs the decay steps on the same batches as the standalone run.
Both are exact: the standalone run computes the same numbers in the same order.

Forward (`training.pack_forward`): `turns` steps the lanes one after another (one forward and
backward each); `concat` puts the rows of all lanes into one forward and backward through the base,
each row with its own lane's prompt, right-padded (the sum of the lanes' losses has, for each
prompt, exactly its own lane's gradient); `auto` times both on the first batches and keeps the
faster. The choice is recorded in each job's config.json (`pack.forward`) and metrics.

Every job leaves what a standalone run leaves (adapter/, metrics.json last, generations.jsonl,
history.jsonl, prompt_tokens.jsonl, config.json with `pack` and `trunk` provenance) and one W&B
run. Its curves are kept in memory and its W&B run is opened when it is written (one run open at a
time), so a W&B run holds the same keys and values as its standalone run's. A job whose loss
becomes NaN/inf is marked failed (`failed.json`, a W&B run finished with exit code 1) with the
others of its lane; the rest of the pack goes on.

Writes are batched. A job whose training ends is *trained*: a copy of its prompt parameters and
what its lane says about it then (last evaluation, loss sum, tokens, times) wait for a *flush*. A
flush decodes the eval prompts of all its prompt-tuning and p-tuning jobs in one `generate` call,
each row behind its own job's soft prompt (decoding is memory-bound: a step reads every weight once,
for 6 rows or 36), then writes each job with its own prompt put back into its lane's model. Those
jobs flush when their prompts fill a decode batch (`FLUSH_BATCH_ROWS`: waiting longer would save
nothing) and at the pack's end; a pack checkpoint holds the jobs still waiting (their prompts and
what their lane said), so a resume writes them without training them again. Other methods generate
inside their own write, as a standalone run does, and are written as soon as they are trained.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import set_seed

from softprompt.core import keys
from softprompt.core.config import resolved
from softprompt.core.errors import UserError
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
from softprompt.models.fast_loss import prompt_tuning_loss, supports_fast_loss
from softprompt.models.loading import load_model
from softprompt.models.methods import get as get_method
from softprompt.models.methods import (
    soft_prompt_embeddings,
    virtual_tokens_in_logits,
    wrap,
)
from softprompt.models.transfer import prompt_source
from softprompt.track.wandb_run import resolve_mode, run_name
from softprompt.train import checkpoints
from softprompt.train.batches import PaddingCollator, epoch_batches, steps_per_epoch
from softprompt.core.precision import autocast_dtype, resolve_precision
from softprompt.train.schedules import Schedule
from softprompt.train.trainer import process_start

CALIBRATION_ROUNDS = 1  # timed rounds per way, after one untimed round each (first-call costs)
# auto: below this many steps in a pack's longest lane, timing both ways (4 steps' worth) would cost
# more than the faster one could save; such packs step in turns
CALIBRATION_MIN_STEPS = 20
# auto: above this many rows per step (lanes x batch size) concat is not tried: one forward and
# backward over all lanes' rows keeps all their activations at once (measured: 15 lanes x 8 rows of
# SmolLM2, <= 128 tokens each, reached 16-19 GB of RSS in the calibration step)
CALIBRATION_MAX_ROWS = 32
PACK_CHECKPOINTS = "pack"  # under the first job's checkpoints/: the pack's atomic checkpoints
# the most rows a flush decodes at once (unless eval.batch_size asks for more): a decode step reads
# every weight once whatever its rows, but its KV cache and activations grow with them; the seed
# grid's 15 jobs x 6 prompts decode in two batches. Trained jobs wait until their prompts fill one
# such batch (or the pack ends)
FLUSH_BATCH_ROWS = 64


# --- what the jobs share -------------------------------------------------------------------------


@dataclass
class Data:
    """One data split (a function of the dataset settings and the seed), tokenised, with the base
    model's evaluation on it: shared by every job of the pack with that seed."""

    splits: Any
    train_rows: list[list[int]]
    val_rows: list[list[int]]
    train_ppl_rows: list[list[int]]
    prompts: list
    base: Any  # ModelEval of the base model
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
    rows: list[dict[str, Any]] = field(default_factory=list)  # what its W&B run logs, in order
    history: list[dict[str, Any]] = field(default_factory=list)
    state: str = "pending"  # pending, trained (waiting for a flush), finished, failed
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    trunk_steps: int = 0  # steps it shared with other jobs (trained once for all of them)
    pack_seconds: dict[str, float] = field(default_factory=dict)  # the whole pack's wall time, split


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
    tokens: int = 0  # real tokens trained on (a branch starts with its trunk's)
    since_log: list[float] = field(default_factory=lambda: [0.0, 0])
    history: list[dict[str, Any]] = field(default_factory=list)
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


# --- the pack --------------------------------------------------------------------------------------


def run_pack(configs: list[DictConfig], run_dirs: list[str | Path], trunks: list[list[int]],
             names: list[str] | None = None, log: Callable[[str], None] = print) -> list[Member]:
    """Train the jobs (`trunks`: lists of indexes into `configs`, shortest first, from
    softprompt.train.planner) and write each job's run directory. `names`: their W&B run names
    (default: from each config, as a run without overrides names itself). Returns the members in
    the order of `configs`, each `finished` (with its metrics) or `failed` (with its error)."""
    from softprompt.train import preflight

    pack_start = time.time()
    if len(configs) != len(run_dirs):
        raise ValueError("one run dir per config")
    for cfg in configs:
        preflight.check(cfg)
    first = configs[0]
    # a pack's checkpoints live in its first job's run dir (the planner puts the same jobs in the same
    # order into a pack again; resume checks that it did)
    checkpoint_root = RunDir(run_dirs[0]).checkpoints / PACK_CHECKPOINTS
    saved = _resume_point(first, checkpoint_root, run_dirs)
    if first.training.num_threads:
        torch.set_num_threads(first.training.num_threads)
    forward = first.training.pack_forward
    precision = resolve_precision(first.training.precision)
    wandb_mode = resolve_mode(first.wandb.mode)

    # --- setup: the model once, each distinct data split once ------------------------------------
    loaded = load_model(first.model)
    data_by_seed: dict[int, Data] = {}
    for cfg in configs:
        if cfg.seed not in data_by_seed:
            data_by_seed[cfg.seed] = load_data(cfg, loaded)
    members = []
    done_before = {i for i, m in enumerate(saved.state["members"]) if m["state"] != "pending"} if saved else set()
    for i, (cfg, out) in enumerate(zip(configs, run_dirs)):
        out = Path(out)
        if i not in done_before:
            RunDir(out).start()  # a rerun in the same dir is not finished yet
            RunDir(out).failed.unlink(missing_ok=True)
        data = data_by_seed[cfg.seed]
        per_epoch = steps_per_epoch(len(data.train_rows), cfg.training.batch_size)
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
            lanes.append(_new_lane(longest.cfg, loaded, longest.data, group, longest.total, made_from=longest.index))
    step = 0
    waiting: list[Trained] = []  # jobs trained but not written yet
    if saved is not None:
        step, lanes, waiting = _restore(saved, members, loaded)
        forward = saved.state["forward"]  # the way the first attempt chose: no second calibration

    concat_ok = len(lanes) > 1 and all(l.fast_loss for l in lanes)
    if forward == "concat" and not concat_ok:
        log("pack: training.pack_forward=concat needs prompt tuning or p-tuning on a supported model in every "
            "job and more than one lane; stepping in turns")
    calibration = saved.state.get("calibration_s") if saved else None
    settings_batch = first.training.batch_size
    if forward == "auto":
        forward = "turns"
        rows = len(lanes) * settings_batch
        if concat_ok and rows > CALIBRATION_MAX_ROWS:
            log(f"pack: forward turns ({rows} rows per step is too many for one concatenated forward; "
                f"training.pack_max_rows splits the pack)")
        elif concat_ok and max(l.end for l in lanes) >= CALIBRATION_MIN_STEPS:
            forward, calibration = _calibrate(lanes, loaded, precision, log)
    elif forward == "concat" and not concat_ok:
        forward = "turns"

    pack_info = {"jobs": len(configs), "trunks": len(trunks), "forward": forward,
                 "calibration_s": calibration, "members": [str(Path(d).name) for d in run_dirs]}
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
            if m.state == "pending":
                RunDir(m.out).write_config(m.config)

    # --- train: every lane one step at a time, in lock-step ------------------------------------
    settings = first.training
    collate = PaddingCollator(loaded.tokenizer.pad_token_id)
    work = sum(l.end - max(l.start, step) for l in lanes) + sum(
        m.total - max(m.leave_at, step) for m in members if m.state == "pending" and m.leave_at < m.total)
    bar = _progress(work, lanes, configs)
    started = time.perf_counter()
    setup_s, eval_s = time.time() - pack_start, 0.0
    real_tokens = 0
    resumed_from = step
    first_step = None
    delay = checkpoints.step_delay_for_tests()
    save_every = first.training.save_steps
    orders: dict[tuple[int, int], list[list[int]]] = {}
    flush_rows = max(first.eval.batch_size, FLUSH_BATCH_ROWS)
    while lanes:
        # members that leave their lane now: a wsd job whose own decay starts at this step
        for lane in list(lanes):
            for m in [m for m in lane.members if m.leave_at == step and m.leave_at < m.total]:
                lane.members.remove(m)
                lanes.append(_branch(lane, m, loaded))
        batches = []
        for lane in lanes:
            epoch, batch = divmod(step, per_epoch_of(lane, settings))
            if (lane.seed, epoch) not in orders:  # a standalone run's order: a function of (seed, epoch)
                orders[lane.seed, epoch] = epoch_batches(lane.data.lengths, settings.batch_size, lane.seed, epoch,
                                                         settings.group_by_length)
            order = orders[lane.seed, epoch]
            batches.append(collate([{"input_ids": lane.data.train_rows[k]} for k in order[batch]]))
        losses = _forward_backward(lanes, batches, loaded, precision, forward)
        for lane, inputs, value in zip(list(lanes), batches, losses):
            if not math.isfinite(value):
                msg = (f"training loss became {value} at step {step + 1}; lower training.learning_rate or use "
                       "training.precision=fp32")
                for m in lane.members:
                    _fail(m, lane, msg, wandb_mode, log)
                lanes.remove(lane)
                continue
            tokens = int(inputs["attention_mask"].sum())  # the rows' own tokens: no pad, no prompt
            real_tokens += tokens
            lane.tokens += tokens
            _optimizer_step(lane, step, value, settings.logging_steps, per_epoch_of(lane, settings))
        step += 1
        if first_step is None:  # seconds to the end of the first step: from the pack's start, the process's
            now = time.time()
            first_step = (now - pack_start, now - process_start())
        bar.update(len(lanes))
        if delay:
            time.sleep(delay)  # test-only: slows a tiny pack so a test can kill it on time
        # evaluations and finished jobs
        for lane in list(lanes):
            per_epoch = per_epoch_of(lane, settings)
            done = [m for m in lane.members if m.total == step]
            end_of_epoch, last_row = step % per_epoch == 0, []
            if first.eval.per_epoch and (end_of_epoch or done):  # as a standalone run: each epoch and its end
                t0 = time.perf_counter()
                row = _epoch_eval(lane, step, per_epoch, first)
                eval_s += time.perf_counter() - t0
                if end_of_epoch:
                    lane.history.append(row)
                    for m in lane.members:
                        m.rows.append(row)
                else:  # a job that ends mid-epoch (max_steps): its own last evaluation, not the trunk's
                    last_row = [row]
                    for m in done:
                        m.rows.append(row)
            for m in done:
                m.history = lane.history + last_row
                waiting.append(_trained(m, lane, precision, started, real_tokens, first_step, forward, resumed_from))
                lane.members.remove(m)
            if not lane.members:
                lanes.remove(lane)
        due = _due(waiting, flush_rows, final=not lanes)
        if due:
            t0 = time.perf_counter()
            _flush(due, loaded, wandb_mode, log)
            written = {id(job) for job in due}  # by identity: a Trained holds tensors
            waiting = [job for job in waiting if id(job) not in written]
            eval_s += time.perf_counter() - t0
        # checkpoints as a standalone run writes them: each epoch's end (and every save_steps)
        end_of_epoch = step % steps_per_epoch(len(members[0].data.train_rows), settings.batch_size) == 0
        if lanes and ((first.training.save_every_epoch and end_of_epoch) or (save_every and step % save_every == 0)):
            _save(checkpoint_root, step, lanes, waiting, members, forward, calibration)
    bar.close()
    total_s = time.time() - pack_start
    # evaluation: per-epoch held-out perplexity and each job's final evaluation, generation and writes
    times = {"total_s": round(total_s, 2), "setup_s": round(setup_s, 2), "eval_s": round(eval_s, 2),
             "train_s": round(total_s - setup_s - eval_s, 2),
             "base_eval_s": round(sum(d.base_seconds for d in data_by_seed.values()), 2)}
    for m in members:
        m.pack_seconds = times
    log(f"pack: {len(members)} jobs in {total_s:.1f} s: set-up {setup_s:.1f} s (base evaluation "
        f"{times['base_eval_s']:.1f} s), training {times['train_s']:.1f} s, evaluation {eval_s:.1f} s")
    return members


def per_epoch_of(lane: Lane, settings) -> int:
    return steps_per_epoch(len(lane.data.train_rows), settings.batch_size)


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


def load_data(cfg: DictConfig, loaded) -> Data:
    """What `run()` does before training, for one seed: split, tokenise, evaluate the base model."""
    splits = load_splits(cfg.dataset, cfg.seed)
    tokenizer_id = f"{cfg.model.source}:{loaded.tokenizer_path}"
    train_rows = tokenize(splits.train, loaded.tokenizer, cfg.training.max_length, tokenizer_id)
    val_rows = tokenize(splits.validation, loaded.tokenizer, cfg.training.max_length, tokenizer_id)
    prompts = eval_prompts(cfg.eval, splits.validation)
    train_ppl_rows = train_subset(train_rows, cfg.eval)
    # before any job wraps the base: it is the same model either way for prompt methods, but the
    # cache key and the numbers are those of a standalone run
    base, cached, seconds = evaluate_base(loaded, val_rows, train_ppl_rows, prompts, cfg)
    return Data(splits, train_rows, val_rows, train_ppl_rows, prompts, base, cached, seconds)


def _new_lane(cfg: DictConfig, loaded, data: Data, members: list[Member], total: int, made_from: int = 0) -> Lane:
    # a standalone run seeds everything with its seed before it wraps the base (a random prompt
    # init draws from torch's generator); the same here, without moving the pack's own state
    with torch.random.fork_rng():
        set_seed(cfg.seed)
        model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    t = cfg.training
    # the optimizer of a standalone run (softprompt.train.trainer): fused AdamW
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
    lane = _new_lane(m.cfg, loaded, trunk.data, [m], m.total, made_from=m.index)
    with torch.no_grad():
        for mine, theirs in zip(lane.trainable(), trunk.trainable(), strict=True):
            mine.copy_(theirs)
    lane.optimizer.load_state_dict(copy.deepcopy(trunk.optimizer.state_dict()))
    lane.start, lane.loss_sum, lane.since_log = m.leave_at, trunk.loss_sum, list(trunk.since_log)
    lane.tokens = trunk.tokens
    lane.history, lane.last_eval, lane.initial_prompt = list(trunk.history), trunk.last_eval, trunk.initial_prompt
    m.rows = list(m.rows)
    return lane


# --- checkpoints: SIGKILL + training.resume=true continues every unfinished job -----------------


def _resume_point(cfg: DictConfig, root: Path, run_dirs: list) -> Any:
    """The pack's latest complete checkpoint when resuming (None: start at step 0)."""
    if not cfg.training.resume:
        if root.exists():
            checkpoints.clear(root)
        return None
    checkpoints.remove_staging(root)
    latest = checkpoints.latest_checkpoint(root)
    if latest is None:
        return None
    saved = checkpoints.load(latest)
    if saved.state["dirs"] != [Path(d).name for d in run_dirs]:
        raise UserError(f"training.resume=true: the pack checkpointed in {root} held the jobs "
                        f"{saved.state['dirs']}, this pack holds {[Path(d).name for d in run_dirs]}; rerun the "
                        "same sweep command, or without training.resume to start over")
    return saved


def _save(root: Path, step: int, lanes: list[Lane], waiting: list[Trained], members: list[Member], forward: str,
          calibration: dict[str, float] | None) -> None:
    """The lanes' prompts and optimizers, and the trained jobs still waiting for a flush (their
    prompts after the lanes')."""
    state = {
        "step": step, "forward": forward, "calibration_s": calibration, "dirs": [m.out.name for m in members],
        "members": [{"state": m.state, "error": m.error, "rows": m.rows} for m in members],
        "lanes": [{"members": [m.index for m in lane.members], "made_from": lane.made_from, "total": lane.end,
                   "start": lane.start, "loss_sum": lane.loss_sum, "since_log": lane.since_log, "tokens": lane.tokens,
                   "history": lane.history,
                   "last_eval": [lane.last_eval[0], lane.last_eval[1].as_dict()] if lane.last_eval else None}
                  for lane in lanes],
        "waiting": [{"member": job.member.index, "tokens": job.tokens, "train": job.train,
                     "history": job.member.history,
                     "last_eval": job.last_eval.as_dict() if job.last_eval else None} for job in waiting],
    }
    prompts = [{n: p.detach().cpu() for n, p in lane.named_trainable()} for lane in lanes]
    prompts += [{n: p.cpu() for (n, _), p in zip(job.lane.named_trainable(), job.params, strict=True)}
                for job in waiting]
    checkpoints.save(root, step, checkpoints.Checkpoint(
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
        lane = _new_lane(owner.cfg, loaded, owner.data, [members[i] for i in state["members"]], state["total"],
                         made_from=owner.index)
        with torch.no_grad():
            for name, param in lane.model.named_parameters():
                if param.requires_grad:
                    param.copy_(prompt[name])
        lane.optimizer.load_state_dict(optimizer)
        lane.start, lane.loss_sum, lane.since_log = state["start"], state["loss_sum"], list(state["since_log"])
        lane.tokens = state["tokens"]
        lane.history = list(state["history"])
        if state["last_eval"]:
            lane.last_eval = (state["last_eval"][0], PerplexityResult(**state["last_eval"][1]))
        lanes.append(lane)
    waiting = []
    for state, prompt in zip(saved.state.get("waiting", []), waiting_prompts, strict=True):
        m = members[state["member"]]
        m.history = list(state["history"])
        # a model of the job's own settings to hold its prompt while it is evaluated and written
        holder = _new_lane(m.cfg, loaded, m.data, [], m.total, made_from=m.index)
        params = [prompt[name].clone() for name, _ in holder.named_trainable()]
        last_eval = PerplexityResult(**state["last_eval"]) if state["last_eval"] else None
        waiting.append(Trained(m, holder, params, last_eval, state["tokens"], dict(state["train"])))
    return saved.state["step"], lanes, waiting


# --- one step ------------------------------------------------------------------------------------


def _forward_backward(lanes: list[Lane], batches: list[dict], loaded, precision: str, forward: str) -> list[float]:
    """Each lane's loss value; gradients are in each lane's prompt. A lane whose loss is not
    finite gets no backward (its value says so)."""
    device = next(loaded.model.parameters()).device
    bf16 = precision == "bf16"
    if forward == "concat" and len(lanes) > 1:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = concat_losses(lanes, batches, loaded.model)
        values = [float(loss.detach()) for loss in losses]
        finite = [loss for loss, v in zip(losses, values) if math.isfinite(v)]
        if finite:
            torch.stack(finite).sum().backward()  # each prompt gets its own lane's gradient only
        return values
    values = []
    for lane, inputs in zip(lanes, batches):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        lane.model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if lane.fast_loss:
                loss = prompt_tuning_loss(lane.model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            else:  # PEFT's forward: the mean NLL over the labelled tokens, as the fast loss
                loss = lane.model(**inputs).loss
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
        values.append(value)
    return values


def concat_losses(lanes: list[Lane], batches: list[dict], base) -> list[torch.Tensor]:
    """One forward through the frozen base for the rows of all lanes, each row behind its own
    lane's soft prompt: `[prompt_j, text, padding]`, right-padded to the longest. Returns each
    lane's mean NLL over its own labelled tokens (what `prompt_tuning_loss` returns for it alone)."""
    device = next(base.parameters()).device
    decoder, lm_head, embed = base.base_model, base.get_output_embeddings(), base.get_input_embeddings()
    pieces, masks, targets = [], [], []
    for lane, inputs in zip(lanes, batches):
        lane.model.train()
        ids, mask, labels = (inputs[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        emb = embed(ids)
        prompt = lane.model.get_prompt(batch_size=ids.shape[0]).to(emb.dtype)
        n = prompt.shape[1]
        pieces.append(torch.cat([prompt, emb], dim=1))
        masks.append(torch.cat([mask.new_ones(ids.shape[0], n), mask], dim=1))
        targets.append(torch.cat([labels.new_full((ids.shape[0], n), -100), labels], dim=1))
    width = max(p.shape[1] for p in pieces)
    embeds = torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in pieces])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
    target = torch.cat([F.pad(t, (0, width - t.shape[1]), value=-100) for t in targets])
    hidden = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    # position p predicts token p+1 (the last virtual position predicts the first text token)
    hidden, target = hidden[:, :-1], target[:, 1:]
    losses, start = [], 0
    for piece in pieces:  # each lane's rows: its loss as prompt_tuning_loss computes it alone
        rows = slice(start, start + piece.shape[0])
        start += piece.shape[0]
        keep = target[rows] != -100
        nll = F.cross_entropy(lm_head(hidden[rows][keep]).float(), target[rows][keep], reduction="sum")
        losses.append(nll / int(keep.sum()))
    return losses


def _optimizer_step(lane: Lane, step: int, value: float, logging_steps: int, per_epoch: int) -> None:
    params = lane.trainable()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, lane.max_grad_norm)
    lr = lane.schedule.lr(step)
    for group in lane.optimizer.param_groups:
        group["lr"] = lr
    lane.optimizer.step()
    lane.optimizer.zero_grad(set_to_none=True)
    lane.loss_sum += value
    lane.since_log[0] += value
    lane.since_log[1] += 1
    if step == 0 or (step + 1) % logging_steps == 0:  # and the first step, as a standalone run logs
        epoch, batch = divmod(step, per_epoch)
        row = {keys.TRAIN_LOSS: lane.since_log[0] / lane.since_log[1], keys.TRAIN_LEARNING_RATE: lr,
               keys.TRAIN_GRAD_NORM: float(grad_norm), keys.TRAIN_STEP: step + 1,
               keys.EPOCH: round(epoch + (batch + 1) / per_epoch, 4)}
        for m in lane.members:
            m.rows.append(row)
        lane.since_log = [0.0, 0]


def _epoch_eval(lane: Lane, step: int, per_epoch: int, cfg: DictConfig) -> dict[str, Any]:
    """The lane's held-out perplexity now, as a history row (the loop's per-epoch evaluation)."""
    result = perplexity(lane.model, lane.data.val_rows, _pad_id(lane), cfg.training.eval_batch_size,
                        virtual_tokens_in_logits(lane.model), autocast_dtype=autocast_dtype(cfg.eval.precision))
    lane.last_eval = (step, result)
    epoch, batch = divmod(step - 1, per_epoch)
    return {keys.EPOCH: round(epoch + (batch + 1) / per_epoch, 4), keys.TRAIN_STEP: step, keys.EVAL_LOSS: result.loss,
            keys.EVAL_PERPLEXITY: result.perplexity, keys.EVAL_BASE_PERPLEXITY: lane.data.base.perplexity.perplexity}


def _pad_id(lane: Lane) -> int:
    return lane.model.get_base_model().config.pad_token_id


# --- auto: which way is faster here ----------------------------------------------------------------


def _calibrate(lanes: list[Lane], loaded, precision: str, log) -> tuple[str, dict[str, float]]:
    """Time a forward+backward of the first batches both ways (no optimizer step: nothing moves).
    Returns the faster way and the seconds of one step each way."""
    settings = lanes[0].members[0].cfg.training
    collate = PaddingCollator(loaded.tokenizer.pad_token_id)
    batches = []
    for lane in lanes:
        order = epoch_batches(lane.data.lengths, settings.batch_size, lane.seed, 0, settings.group_by_length)
        batches.append(collate([{"input_ids": lane.data.train_rows[k]} for k in order[0]]))
    best = {"turns": math.inf, "concat": math.inf}
    with torch.random.fork_rng():
        for round_ in range(CALIBRATION_ROUNDS + 1):
            for way in best:
                t0 = time.perf_counter()
                _forward_backward(lanes, batches, loaded, precision, way)
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
             first_step: tuple[float, float] | None, forward: str, resumed_from: int) -> Trained:
    """The job `m` at its last step (now): its prompt and what its lane says about it, for the next flush."""
    seconds = time.perf_counter() - started
    last = lane.last_eval if lane.last_eval and lane.last_eval[0] == m.total else None
    per_epoch = steps_per_epoch(len(m.data.train_rows), m.cfg.training.batch_size)
    epoch, batch = divmod(m.total - 1, per_epoch)
    m.state = "trained"
    return Trained(m, lane, [p.detach().clone() for p in lane.trainable()], last[1] if last else None, lane.tokens, {
        keys.TRAIN_LOSS: lane.loss_sum / max(m.total, 1), keys.TRAIN_EPOCHS: epoch + (batch + 1) / per_epoch,
        keys.TRAIN_STEPS: m.total, keys.TRAIN_RUNTIME_S: seconds, keys.TRAIN_TOKENS_PER_SECOND: real_tokens / seconds,
        keys.TRAIN_PRECISION: precision,
        keys.TRAIN_TIME_TO_FIRST_STEP_S: first_step[0] if first_step else None,
        keys.TRAIN_TIME_TO_FIRST_STEP_PROCESS_S: first_step[1] if first_step else None,
        keys.TRAIN_RESUMED_FROM_STEP: resumed_from,
        keys.PACK_JOBS: len(m.config["pack"]["members"]), keys.PACK_FORWARD: forward,
        keys.PACK_TRUNK_STEPS: m.trunk_steps})


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


def _flush(jobs: list[Trained], loaded, wandb_mode: str, log) -> None:
    """Evaluate and write these trained jobs: the generations of all those whose prompt is input
    embeddings in one batched call, each row behind its own job's soft prompt."""
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
        _write(job, loaded, generations, seconds, wandb_mode, log)


def _write(job: Trained, loaded, generations: list[str] | None, generation_s: float, wandb_mode: str, log) -> None:
    """Evaluate the job's own prompt and write its run (metrics.json last, its W&B run)."""
    from softprompt.train.outputs import write_run

    m = job.member
    with _holding(job) as model:
        m.metrics = write_run(
            m.cfg, m.out, loaded, model, m.data, m.config, m.name, wandb_mode, history=m.history, rows=m.rows,
            last_eval=job.last_eval, initial_prompt=job.lane.initial_prompt, tokens_seen=job.tokens,
            train=job.train, generations=generations, generation_s=generation_s)
    m.state = "finished"
    log(f"pack: {m.out.name} finished: {keys.EVAL_PERPLEXITY} {m.metrics[keys.EVAL_PERPLEXITY]:.4f}")


def _fail(m: Member, lane: Lane, message: str, wandb_mode: str, log) -> None:
    from softprompt.track.wandb_run import Tracker

    m.state, m.error = "failed", message
    RunDir(m.out).write_failed({"error": message, "history": list(lane.history)})
    tracker = Tracker.start(m.cfg, m.out, m.config, m.name, mode=wandb_mode)
    for row in m.rows:
        tracker.log(row)
    tracker.finish(exit_code=1)
    log(f"pack: {m.out.name} failed: {message}")


def _progress(total: int, lanes: list[Lane], configs: list[DictConfig]):
    """One bar per pack: its jobs, lanes and budgets; tqdm's ETA from the lane-steps done so far."""
    lengths = sorted({c.training.max_steps or c.training.epochs for c in configs})
    desc = f"pack: {len(configs)} jobs, {len(lanes)} lanes, budgets {','.join(map(str, lengths))}"
    return progress(desc=desc, total=total, unit="step", leave=True)
