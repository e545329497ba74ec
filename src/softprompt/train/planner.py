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

This lives in the train layer, not in experiments, because the engine that trains a pack needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

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


def plan(configs: list[Any], share: bool = True, max_rows: int | None = None) -> list[Pack]:
    """Group the jobs (composed configs, in sweep order) into packs of trunks.

    `share=False`: every job is a pack of one (each trains alone). `max_rows`: at most this many
    training rows per step in one pack (jobs x batch size), else `training.pack_max_rows` of the
    jobs; a group larger than that is split into several packs.
    """
    plain = [_plain(c) for c in configs]
    if not share:
        return [Pack([Trunk([i], shared=False)]) for i in range(len(plain))]
    groups: dict[str, list[int]] = {}
    from softprompt.models.methods import get

    for i, config in enumerate(plain):
        # a method whose wrapper changes the base model (LoRA) trains each job alone
        if not get(config["peft"]["method"]).shares_base:
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
        packs.extend(_split(ordered, limit))
    # sweep order: the pack holding the first job first
    return sorted(packs, key=lambda p: min(p.jobs))


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
    return (f"{len(pack)} job{'s' if len(pack) != 1 else ''}, {len(pack.trunks)} trunk"
            f"{'s' if len(pack.trunks) != 1 else ''} ({shared} shared; lengths {' | '.join(parts)})")
