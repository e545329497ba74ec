"""Which jobs of a sweep can train together, and which of them are one run cut at several lengths.

Pure logic on the composed configs (no model): `plan(configs)` returns packs, each a
list of trunks, each a list of jobs (indexes into `configs`).

- A **pack** is what one process trains together (softprompt.train.pack): the jobs share the
  frozen base model, the data source and every setting that shapes a batch or an evaluation (model,
  dataset, max length, batch size, precision, eval settings, ...). What may differ between them is
  what belongs to one prompt alone: the PEFT prompt settings, learning rate, schedule, clipping,
  weight decay, seed, epochs and the W&B run placement.
- A **trunk** is a set of jobs of one pack that differ *only* in their length (`training.epochs`,
  `training.max_steps`) and whose learning-rate schedule does not depend on that length until their
  own end: `constant` (a shorter run is the start of a longer one) and `wsd` (the same, until a
  shorter run's own decay, which branches off the trunk). `linear` and `cosine` depend on the total
  from the first step: each such job is its own trunk (it still packs).

Packs are what the packed launcher hands to its executor (this process, a submitit job, a SLURM
job). `plan(..., lanes=N)` caps the lanes (trunks) of one pack, `plan(..., devices=N)` makes at
least N packs of a group that has N lanes, so that N devices can train it at once; both balance
the packs' *planned steps* (lane-steps, `planned_steps`: what a pack costs when its lanes step in
turns), longest trunk first onto the least-loaded pack. `makespan` is the wall time, in steps, of
packs run on N devices, longest first onto the first free one (what the launcher does).

This lives in the train layer, not in experiments, because the engine that trains a pack needs it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from softprompt.core.method_facts import facts
from softprompt.train.schedules import Schedule

# schedules whose rate at a step does not depend on the run's length (until a wsd run's own decay)
SHARABLE_SCHEDULES = ("constant", "wsd")

# what belongs to one job alone: everything else must be equal for jobs to share a process
PER_JOB = ("seed", "peft", "wandb", "output_dir", "training.learning_rate", "training.lr_scheduler",
           "training.warmup_steps", "training.warmup_ratio", "training.decay_fraction", "training.weight_decay",
           "training.max_grad_norm", "training.epochs", "training.max_steps")
# what may differ inside one trunk: the length, and where the run is recorded
PER_BUDGET = ("training.epochs", "training.max_steps", "wandb", "output_dir")


@dataclass
class Trunk:
    jobs: list[int]  # shortest first
    shared: bool  # True: one training run, the shorter jobs are cut from (or branch off) it

    def __len__(self) -> int:
        return len(self.jobs)


@dataclass
class Pack:
    trunks: list[Trunk] = field(default_factory=list)
    steps: int | None = None  # planned lane-steps (plan(..., steps=...)), None when not planned

    @property
    def jobs(self) -> list[int]:
        return [j for t in self.trunks for j in t.jobs]

    def __len__(self) -> int:
        return sum(len(t) for t in self.trunks)


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping) and not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return cfg


def _without(config: dict[str, Any], dotted_keys: tuple[str, ...]) -> str:
    out = json.loads(json.dumps(config, default=str))
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(out, sort_keys=True)


def _length(config: dict[str, Any]) -> tuple[int, int]:
    t = config["training"]
    # max_steps, when set, ends the run whatever its epochs; sort by it first
    return (t.get("max_steps") or 0, t["epochs"])


def planned_steps(config: Any, train_rows: int) -> int:
    """The optimizer steps of one job on `train_rows` training rows (one process, as
    softprompt.train.batches.steps_per_epoch counts them)."""
    t = _plain(config)["training"]
    return t.get("max_steps") or t["epochs"] * math.ceil(train_rows / t["batch_size"])


def plan(configs: list[Any], share: bool = True, max_rows: int | None = None, lanes: int | None = None,
         devices: int = 1, steps: list[int] | None = None) -> list[Pack]:
    """Group the jobs (composed configs, in sweep order) into packs of trunks.

    `share=False`: every job is a pack of one (each trains alone). `max_rows`: at most this many
    training rows per step in one pack (jobs x batch size), else `training.pack_max_rows` of the
    jobs; a group larger than that is split into several packs. `lanes`: at most this many trunks
    per pack; `devices`: a group of at least that many trunks makes at least that many packs.
    Both balance the packs' planned steps, which need `steps` (each job's, `planned_steps`); with
    `steps` every pack gets its `steps`.
    """
    plain = [_plain(c) for c in configs]
    if (lanes or devices > 1) and steps is None:
        raise ValueError("balancing packs (lanes, devices) needs each job's planned steps")
    if not share:
        packs = [Pack([Trunk([i], shared=False)]) for i in range(len(plain))]
        return _with_steps(packs, plain, steps)
    groups: dict[str, list[int]] = {}

    for i, config in enumerate(plain):
        # a method whose wrapper changes the base model (LoRA) trains each job alone
        if not facts(config["peft"]["method"]).shares_base:
            groups[f"alone:{i}"] = [i]
        else:
            groups.setdefault(_without(config, PER_JOB), []).append(i)

    packs: list[Pack] = []
    for members in groups.values():
        trunks: dict[str, list[int]] = {}
        for i in members:
            config = plain[i]
            if config["training"]["lr_scheduler"] in SHARABLE_SCHEDULES:
                key = _without(config, PER_BUDGET)
            else:
                key = f"own:{i}"
            trunks.setdefault(key, []).append(i)
        ordered = []
        for jobs in trunks.values():
            jobs = _distinct_lengths(sorted(jobs, key=lambda i: _length(plain[i])), plain)
            ordered.extend(jobs)
        limit = _jobs_per_pack(plain[members[0]], max_rows)
        if lanes or devices > 1:
            for part in _balance(ordered, lanes, devices, steps, plain):
                packs.extend(_split(part.trunks, limit))
        else:
            packs.extend(_split(ordered, limit))
    # sweep order: the pack holding the first job first
    return _with_steps(sorted(packs, key=lambda p: min(p.jobs)), plain, steps)


def _trunk_steps(trunk: Trunk, steps: list[int], plain: list[dict[str, Any]]) -> int:
    """The lane-steps a trunk costs: its longest job's steps, plus the decay of each shorter wsd
    job, which leaves the trunk where its decay starts and trains it on a lane of its own."""
    longest = max(steps[j] for j in trunk.jobs)
    own = 0
    for j in trunk.jobs:
        t = plain[j]["training"]
        if steps[j] < longest and t["lr_scheduler"] == "wsd":
            schedule = Schedule("wsd", 1.0, steps[j], t["warmup_steps"], t["decay_fraction"])
            leave = next((s for s in range(t["warmup_steps"], steps[j]) if schedule.factor(s) != 1.0), steps[j])
            own += steps[j] - leave
    return longest + own


def _with_steps(packs: list[Pack], plain: list[dict[str, Any]], steps: list[int] | None) -> list[Pack]:
    if steps is not None:
        for pack in packs:
            pack.steps = sum(_trunk_steps(t, steps, plain) for t in pack.trunks)
    return packs


def _balance(trunks: list[Trunk], lanes: int | None, devices: int, steps: list[int] | None,
             plain: list[dict[str, Any]]) -> list[Pack]:
    """The trunks of one group in as few packs as `lanes` allows and at least `devices` (while
    there are trunks for them), each trunk, longest first, into the pack with the fewest planned
    steps that has room; every pack keeps its trunks in sweep order."""
    assert steps is not None
    count = max(math.ceil(len(trunks) / lanes) if lanes else 1, min(devices, len(trunks)))
    load, members = [0] * count, [[] for _ in range(count)]
    cost = {id(t): _trunk_steps(t, steps, plain) for t in trunks}
    for trunk in sorted(trunks, key=lambda t: -cost[id(t)]):
        room = [k for k in range(count) if not lanes or len(members[k]) < lanes]
        k = min(room, key=lambda k: (load[k], k))
        load[k] += cost[id(trunk)]
        members[k].append(trunk)
    order = {id(t): n for n, t in enumerate(trunks)}
    return [Pack(sorted(m, key=lambda t: order[id(t)])) for m in members if m]


def makespan(pack_steps: list[int], devices: int) -> int:
    """The planned steps until the last of these packs ends on `devices` devices, each pack, longest
    first, on the device that comes free first (the packed launcher submits them in that order)."""
    load = [0] * max(1, devices)
    for steps in sorted(pack_steps, reverse=True):
        load[load.index(min(load))] += steps
    return max(load)


def _distinct_lengths(jobs: list[int], plain: list[dict[str, Any]]) -> list[Trunk]:
    """One trunk per run of distinct lengths: two jobs of equal length and equal settings (a
    repeated grid point) are two trunks, so that each still trains and is recorded on its own."""
    trunks: list[list[int]] = []
    for i in jobs:
        home = next((t for t in trunks if all(_length(plain[j]) != _length(plain[i]) for j in t)), None)
        if home is None:
            trunks.append([i])
        else:
            home.append(i)
    return [Trunk(t, shared=len(t) > 1) for t in trunks]


def _jobs_per_pack(config: dict[str, Any], max_rows: int | None) -> int | None:
    rows = max_rows if max_rows is not None else config["training"].get("pack_max_rows")
    if not rows:
        return None
    return max(1, rows // config["training"]["batch_size"])


def _split(trunks: list[Trunk], limit: int | None) -> list[Pack]:
    """Greedy: fill packs up to `limit` jobs; a trunk longer than the limit becomes several trunks
    (each a run of the shortest-first budgets, still exact)."""
    if limit is None:
        return [Pack(trunks)]
    pieces = []
    for trunk in trunks:
        for start in range(0, len(trunk.jobs), limit):
            jobs = trunk.jobs[start:start + limit]
            pieces.append(Trunk(jobs, shared=len(jobs) > 1))
    packs: list[Pack] = [Pack()]
    for piece in pieces:
        if len(packs[-1]) + len(piece) > limit:
            packs.append(Pack())
        packs[-1].trunks.append(piece)
    return packs


def describe(pack: Pack, configs: list[Any]) -> str:
    """One line for logs and progress bars: `6 jobs, 2 trunks (epochs 2,4,6 x2)`."""
    plain = [_plain(c) for c in configs]
    parts = []
    for trunk in pack.trunks:
        lengths = ",".join(str(plain[j]["training"].get("max_steps") or plain[j]["training"]["epochs"])
                           for j in trunk.jobs)
        parts.append(lengths)
    shared = sum(t.shared for t in pack.trunks)
    planned = f"; {pack.steps} planned steps" if pack.steps is not None else ""
    return (f"{len(pack)} job{'s' if len(pack) != 1 else ''}, {len(pack.trunks)} trunk"
            f"{'s' if len(pack.trunks) != 1 else ''} ({shared} shared; lengths {' | '.join(parts)}{planned})")
