"""Run a W&B sweep file offline: the `sweeps` package (what W&B's own controller runs) proposes
each job, `softprompt.train.run.run` trains it, and the finished job's metrics go back to the search.

The same file works with `wandb sweep FILE` + `wandb agent` where the service is reachable: its
parameters are Hydra overrides (`peft.num_virtual_tokens=8`), passed by the agent through
`${args_no_hyphens}` and here through Hydra's compose API. All jobs run in this one process, so
imports, the tokenization cache and model files are paid for once; jobs that can share train
together as packs (softprompt.train.planner and .pack; docs/sweeps.md), unless `share=False`.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from softprompt.core import atomic, keys
from softprompt.core.errors import UserError, import_extra, report_and_exit
from softprompt.core.progress import progress
from softprompt.core.quiet import quiet_third_party
from softprompt.core.rundir import RunDir

METHODS = ("grid", "random", "bayes")
# keys W&B's server reads but the `sweeps` package's schema does not know
SERVER_KEYS = ("run_cap",)
# the sweep's own record beside its job dirs: values, state and metric of every job
SWEEP_STATE = "sweep.json"


@dataclass
class Sweep:
    name: str
    config: dict[str, Any]  # the file's content, as the `sweeps` package wants it (no server keys)
    run_cap: int | None
    path: Path | None = None

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        return self.config["parameters"]

    @property
    def metric(self) -> dict[str, Any] | None:
        return self.config.get("metric")

    @property
    def early_terminate(self) -> dict[str, Any] | None:
        return self.config.get("early_terminate")


@dataclass
class Job:
    index: int
    values: dict[str, Any]  # sweep parameter -> value
    run_dir: Path
    state: str = "pending"
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    terminated_at_epoch: float | None = None  # hyperband stopped it there (a result, not a failure)
    seconds: float = 0.0
    pack: dict[str, Any] | None = None  # the pack it trained in: its jobs and wall time split (None: alone)


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; every problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist; pick one in sweeps/")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"sweep file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"sweep file {path} must hold a mapping with `method` and `parameters`")
    return parse_sweep(raw, name=raw.get("name") or path.stem, path=path)


def _sweeps():
    """The `sweeps` package. Its last release that runs beside numpy 2 (0.2.0; 0.3.0 needs numpy<2)
    still declares pydantic-v1-style models, and pydantic 2 warns about them once, at import;
    those two notices (about the package's own source, nothing a user can act on) are silenced
    here and only here, by their text."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Support for class-based `config` is deprecated")
        warnings.filterwarnings("ignore", message=r"Valid config keys have changed in V2")
        return import_extra("sweeps", "sweeps", "the sweep search needs it")


def parse_sweep(raw: dict[str, Any], name: str, path: Path | None = None) -> Sweep:
    schema_violations_from_proposed_config = _sweeps().schema_violations_from_proposed_config

    where = f"sweep file {path}" if path else "sweep config"
    config = {k: v for k, v in raw.items() if k not in SERVER_KEYS}
    if config.get("method") not in METHODS:
        raise UserError(f"{where}: method must be one of {', '.join(METHODS)} (got {config.get('method')!r})")
    if not isinstance(config.get("parameters"), dict) or not config["parameters"]:
        raise UserError(f"{where}: `parameters` must map at least one config key to its values")
    for key, spec in config["parameters"].items():
        if isinstance(spec, dict) and "parameters" in spec:
            raise UserError(f"{where}: nested parameter {key!r}; name parameters by their dotted config key, "
                            "e.g. peft.num_virtual_tokens")
    violations = schema_violations_from_proposed_config(config)
    if violations:
        raise UserError(f"{where} is not a valid W&B sweep: {'; '.join(violations)}")
    if config["method"] == "bayes" and not config.get("metric"):
        raise UserError(f"{where}: method bayes needs a `metric` (e.g. name: eval/perplexity, goal: minimize)")
    if config.get("early_terminate") and config["early_terminate"].get("type") == "hyperband" \
            and not config.get("metric"):
        raise UserError(f"{where}: early_terminate needs a `metric` (e.g. name: eval/perplexity, goal: minimize)")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise UserError(f"{where}: run_cap must be a positive integer (got {run_cap!r})")
    return Sweep(name=str(name), config=config, run_cap=run_cap, path=path)


def override_value(value: Any) -> str:
    """A Python value as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    if isinstance(value, int) or text.replace("_", "").replace("-", "").replace(".", "").replace("/", "").isalnum():
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={override_value(value)}" for key, value in values.items()]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(sweep_overrides: list[str], extra: list[str]) -> list[str]:
    """The sweep's overrides, then the user's; a key the user sets replaces the sweep's value
    (Hydra refuses a config group given twice, and the command line should win)."""
    user_keys = {override_key(o) for o in extra}
    return [o for o in sweep_overrides if override_key(o) not in user_keys] + list(extra)


def compose(overrides: list[str]):
    """The config `python train.py OVERRIDES` would get; composition errors are UserErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from softprompt.core.config import CONF_DIR, register_schema

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(" ".join(str(exc).split())) from exc


def probe_values(spec: dict[str, Any]) -> list[Any]:
    """Values that stand for a parameter's whole range: every listed value, or the bounds."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec[k] for k in ("min", "max") if k in spec]


def check_parameters(sweep: Sweep, extra: list[str]) -> None:
    """Every parameter is a key of the composed config and every value (or bound) composes and
    validates, so a typo fails in seconds rather than after the first job has trained."""
    from softprompt.core.config import validate

    user_keys = {override_key(o) for o in extra}  # these replace the sweep's values in every job
    base = {k: probe_values(v)[0] for k, v in sweep.parameters.items() if k not in user_keys}
    probes = [(None, None)] + [(k, v) for k in base for v in probe_values(sweep.parameters[k])[1:]]
    for key, value in probes:  # the first values together, then each other value in turn
        values = base if key is None else base | {key: value}
        try:
            validate(compose(merge_overrides(job_overrides(values), extra)))
        except UserError as exc:
            what = "" if key is None else f" {key}={override_value(value)}"
            raise UserError(f"sweep {sweep.name}{what}: {exc}") from exc


def check_halving(sweep: Sweep, extra: list[str]) -> None:
    """A sweep's `early_terminate` against the runs it judges: its iterations within the epoch
    budget (the most epochs of any job), its metric logged at every epoch."""
    if not sweep.early_terminate:
        return
    from softprompt.train.halving import check

    user_keys = {override_key(o) for o in extra}
    base = {k: probe_values(v)[0] for k, v in sweep.parameters.items() if k not in user_keys}
    cfg = compose(merge_overrides(job_overrides(base), extra))
    epochs = cfg.training.epochs
    if "training.epochs" in base:
        epochs = max(int(v) for v in probe_values(sweep.parameters["training.epochs"]))
    check(sweep.config, epochs, bool(cfg.eval.per_epoch), cfg.training.max_steps, f"sweep {sweep.name}")


def _sweep_run(job: Job):
    RunState, SweepRun = _sweeps().RunState, _sweeps().SweepRun
    state = {"finished": RunState.finished, "failed": RunState.failed}.get(job.state, RunState.running)
    return SweepRun(name=str(job.index), state=state, config={k: {"value": v} for k, v in job.values.items()},
                    summaryMetrics=job.metrics, sampledHistory=job.history)


def propose(sweep: Sweep, done: list[Job]) -> dict[str, Any] | None:
    """The next parameter values, or None when a grid is exhausted."""
    suggestion = _sweeps().next_run(sweep.config, [_sweep_run(j) for j in done])
    if suggestion is None:
        return None
    return {key: _plain(suggestion.config[key]["value"]) for key in sweep.parameters}


def _plain(value: Any) -> Any:
    """NumPy scalars (what distributions sample) as Python values: repr(np.float64(0.1)) is no
    Hydra override."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def grid_size(sweep: Sweep) -> int | None:
    """How many points a grid has (None for random/bayes, which sample without end)."""
    if sweep.method != "grid":
        return None
    return math.prod(len(spec["values"]) if "values" in spec else 1 for spec in sweep.parameters.values())


def planned_count(sweep: Sweep, count: int | None) -> int | None:
    """How many jobs to run: --count, else run_cap, else the whole grid (random/bayes need one)."""
    limits = [n for n in (count, sweep.run_cap) if n is not None]
    if limits:
        return min(limits)
    if sweep.method == "grid":
        return None  # until the grid is exhausted
    raise UserError(f"sweep {sweep.name}: method {sweep.method} never ends by itself; give --count N "
                    "or run_cap in the sweep file")


def run_sweep(sweep: Sweep, extra: list[str], count: int | None = None, root: str | Path = "multirun",
              seed: int = 0, log=print, share: bool = True, pack: int = 1) -> tuple[Path, list[Job]]:
    """Run the sweep's jobs in this process; returns (sweep dir, jobs).

    `share`: jobs that can train together do (softprompt.train.planner): a grid is planned whole,
    random/bayes proposals `pack` at a time (the search sees their results before it proposes
    the next ones). `share=False`: each job alone, one after another.
    """
    import numpy as np

    limit = planned_count(sweep, count)
    check_parameters(sweep, extra)
    check_halving(sweep, extra)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    sweep_id = f"{sweep.name}-{stamp}"
    sweep_dir = Path(root) / f"sweep-{sweep_id}"
    sweep_dir.mkdir(parents=True, exist_ok=False)
    # random and bayes draw from Python's and NumPy's generators: a seed makes a sweep repeatable
    random.seed(seed)
    np.random.seed(seed)
    defaults = [f"wandb.group={sweep_id}", "wandb.mode=offline"]
    if not share:
        batch_size = 1
    elif sweep.method == "grid":
        batch_size = None  # the whole grid (or --count of it) at once
    else:
        batch_size = max(1, pack)

    halving = None
    if sweep.early_terminate:
        from softprompt.train.halving import FOLDER, Halving

        halving = Halving(sweep.config, sweep_dir / FOLDER)
    jobs: list[Job] = []
    started = time.perf_counter()
    # jobs done / left and an ETA (tqdm's, from the mean job time so far), on stderr
    bar = progress(desc=f"sweep {sweep.name}", total=limit or grid_size(sweep), unit="job", min_total=1, leave=True)
    while limit is None or len(jobs) < limit:
        batch: list[Job] = []
        while (batch_size is None or len(batch) < batch_size) and (limit is None or len(jobs) + len(batch) < limit):
            values = propose(sweep, jobs + batch)  # proposed but not run yet: "running" to the search
            if values is None:
                break
            batch.append(Job(index=len(jobs) + len(batch), values=values,
                             run_dir=sweep_dir / str(len(jobs) + len(batch))))
        if not batch:
            break
        jobs.extend(batch)
        overrides = [merge_overrides(job_overrides(j.values) + defaults, extra) for j in batch]
        for job, o in zip(batch, overrides):
            log(f"[sweep {sweep.name}] job {job.index}" + (f"/{limit}" if limit else "") + ": " + " ".join(o))
        _run_batch(batch, overrides, share, sweep, log, halving)
        _write_state(sweep_dir, sweep, sweep_id, extra, jobs, time.perf_counter() - started)
        bar.update(len(batch))
    bar.close()
    return sweep_dir, jobs


def _run_batch(batch: list[Job], overrides: list[list[str]], share: bool, sweep: Sweep, log, halving=None) -> None:
    """Plan the batch into packs and run each: a pack of one as a plain run, larger ones together."""
    from softprompt.train.planner import describe, plan

    composed = []
    for job, o in zip(batch, overrides):
        try:
            composed.append((job, compose(o)))
        except UserError as exc:
            job.state, job.error = "failed", str(exc)
    configs = [cfg for _, cfg in composed]
    for pack in plan(configs, share=share):
        members = [composed[i][0] for i in pack.jobs]
        if len(members) == 1 and halving is None:
            _run_job(members[0], configs[pack.jobs[0]])
        else:
            log(f"[sweep {sweep.name}] pack of jobs {', '.join(str(j.index) for j in members)}: "
                f"{describe(pack, configs)}")
            _run_pack(members, [configs[i] for i in pack.jobs],
                      [[pack.jobs.index(i) for i in t.jobs] for t in pack.trunks], halving)
        for job in members:
            stopped = f" (hyperband stopped it after epoch {job.terminated_at_epoch:g})" \
                if job.terminated_at_epoch is not None else ""
            log(f"[sweep {sweep.name}] job {job.index} {job.state}{stopped} in {job.seconds:.1f} s"
                + (f": {_metric_line(sweep, job)}" if job.state == "finished" else f": {job.error}"))


def _run_job(job: Job, cfg) -> None:
    from softprompt.train.run import run

    t0 = time.perf_counter()
    try:
        job.metrics = run(cfg, run_dir=job.run_dir)
        job.state = "finished"
        job.history = RunDir(job.run_dir).read_history()
    except UserError as exc:
        # a job can fail for its values (a learning rate that diverges): like W&B agents, the
        # sweep goes on and the search learns that this region is bad
        job.state, job.error = "failed", str(exc)
    job.seconds = time.perf_counter() - t0


def _run_pack(jobs: list[Job], configs: list, trunks: list[list[int]], halving=None) -> None:
    from softprompt.train.pack import run_pack

    t0 = time.perf_counter()
    try:
        members = run_pack(configs, [j.run_dir for j in jobs], trunks, halving=halving)
    except UserError as exc:
        for job in jobs:
            job.state, job.error = "failed", str(exc)
        members = []
    seconds = time.perf_counter() - t0
    for job, member in zip(jobs, members):
        job.state, job.error, job.metrics = member.state, member.error, member.metrics
        job.pack = {"jobs": [j.index for j in jobs]} | member.pack_seconds
        job.history = RunDir(job.run_dir).read_history() if member.state == "finished" else []
        job.terminated_at_epoch = member.metrics.get(keys.SWEEP_TERMINATED_AT_EPOCH)
    for job in jobs:
        job.seconds = seconds  # the pack's wall time: its jobs trained together


def _metric_line(sweep: Sweep, job: Job) -> str:
    name = (sweep.metric or {}).get("name", keys.EVAL_PERPLEXITY)
    value = job.metrics.get(name)
    return f"{name}={value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else f"{name}={value}"


def _write_state(sweep_dir: Path, sweep: Sweep, sweep_id: str, extra: list[str], jobs: list[Job],
                 seconds: float) -> None:
    packs: dict[tuple[int, ...], int] = {}  # each pack's lane-steps, once; a job alone is one lane
    for j in jobs:
        if j.pack:
            packs[tuple(j.pack["jobs"])] = int(j.pack.get("lane_steps", 0))
        elif j.state == "finished":
            packs[(j.index,)] = int(j.metrics.get(keys.TRAIN_STEPS, 0))
    state = {
        "sweep": sweep_id, "lane_steps": sum(packs.values()), "file": str(sweep.path) if sweep.path else None, "config": sweep.config,
        "run_cap": sweep.run_cap, "overrides": list(extra), "wall_s": round(seconds, 2),
        "jobs": [{"index": j.index, "dir": j.run_dir.name, "values": j.values, "state": j.state,
                  "seconds": round(j.seconds, 2), "error": j.error,
                  **({"terminated_at_epoch": j.terminated_at_epoch} if j.terminated_at_epoch is not None else {}),
                  "metric": j.metrics.get((sweep.metric or {}).get("name", keys.EVAL_PERPLEXITY)),
                  **({"pack": j.pack} if j.pack else {})} for j in jobs],
    }
    atomic.write_json(sweep_dir / SWEEP_STATE, state)


# --- command line: python scripts/sweep.py SWEEP.yaml ... (console script softprompt-sweep) --------

CLI_DOC = """python scripts/sweep.py SWEEP.yaml [--count N] [--seed S] [--root DIR] [--no-share] [--pack N] [overrides...]

Runs a W&B sweep file offline, without the W&B service: the same parameter semantics (grid,
random, bayes; values and distributions; run_cap) through the `sweeps` package that W&B's
controller uses. Each job is one run of `train.py` with the sweep's values plus OVERRIDES, in
multirun/sweep-<name>-<time>/<i>/, with its own offline W&B run, grouped by sweep.
By default jobs that can share train together (epoch trunks, packed prompts: docs/sweeps.md);
--no-share runs each alone. Every grid point leaves its own run directory either way.
A file's `early_terminate: {type: hyperband, ...}` stops the losing jobs at epoch boundaries,
with the epoch as the iteration (docs/sweeps.md "Early termination").
Then: python scripts/report.py multirun/sweep-<name>-<time>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=CLI_DOC.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", help="a W&B sweep YAML, e.g. sweeps/tokens_x_epochs.yaml")
    parser.add_argument("--count", type=int, default=None,
                        help="run at most N jobs (default: the whole grid, or run_cap)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random/bayes search (default 0)")
    parser.add_argument("--root", default="multirun", help="where the sweep dir goes (default multirun/)")
    parser.add_argument("--no-share", action="store_true",
                        help="train every job alone (default: jobs that can share a process and epoch trunks do)")
    parser.add_argument("--pack", type=int, default=1,
                        help="random/bayes: propose and train N jobs at a time as one pack (default 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every job, e.g. model=tiny-bloom")
    # overrides may come before or after the options
    args = parser.parse_intermixed_args(argv)
    quiet_third_party()  # before PEFT is imported: where bitsandbytes is installed, its import talks
    try:
        if args.count is not None and args.count < 1:
            raise UserError(f"--count must be >= 1 (got {args.count})")
        if args.pack < 1:
            raise UserError(f"--pack must be >= 1 (got {args.pack})")
        sweep = load_sweep(args.sweep_file)
        sweep_dir, jobs = run_sweep(sweep, args.overrides, count=args.count, root=args.root, seed=args.seed,
                                    share=not args.no_share, pack=args.pack)
    except UserError as exc:
        report_and_exit(str(exc))
    finished = sum(j.state == "finished" for j in jobs)
    stopped = sum(j.terminated_at_epoch is not None for j in jobs)
    print(f"sweep {sweep.name}: {finished}/{len(jobs)} jobs finished"
          + (f" ({stopped} of them stopped early by hyperband)" if sweep.early_terminate else "")
          + f" in {sweep_dir}; "
          f"compare them with: python scripts/report.py {sweep_dir}", flush=True)
    failed = [j for j in jobs if j.state == "failed"]
    if failed:  # the others are kept; the exit status says that not every point has a result
        report_and_exit(f"{len(failed)} of {len(jobs)} jobs of sweep {sweep.name} failed (jobs "
                        f"{', '.join(str(j.index) for j in failed)}: {failed[0].error}; see {sweep_dir / SWEEP_STATE})")
    return 0

