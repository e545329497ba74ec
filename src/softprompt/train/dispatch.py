"""Where a multirun's packs train: in this process, as submitit jobs on this machine, or on SLURM.

The packed Hydra launcher (`hydra/launcher=packed`) plans a multirun into packs
(softprompt.train.planner) and hands each pack to `hydra.launcher.executor`:
- `local`: one pack after another in the launcher's own process;
- `submitit_local`: each pack a submitit job on this machine (a process of its own, its log in
  `<sweep dir>/.submitit/<job id>/`), at most `parallelism` at once; on a machine with GPUs each
  job is pinned to a GPU of its own (`CUDA_VISIBLE_DEVICES`, set by submitit), `devices` at once;
- `submitit_slurm`: each pack a SLURM job through submitit, with its own time limit, from its
  planned steps (`Settings.time_limit_min`).

The unit of work is `PackJob`: the jobs' configs and run dirs and the pack's trunks, called
without arguments. submitit pickles it (so it lives here: Hydra runs plugin modules without
entering them in sys.modules, and pickle finds a class by its module) and calls it in the job's
process, where it trains the pack on the one engine (softprompt.train.pack.run_pack). Preemption
and requeueing are the engine's and submitit's: on submitit's signal (SIGUSR2, before a time
limit or on preemption) the engine writes a checkpoint, then calls submitit's handler, which asks
`PackJob.checkpoint` for the job to resubmit (the same pack, resuming) and requeues it. A job that
died without a signal (SIGKILL, a lost node) is rerun with `training.resume=true`, or requeued
by SLURM (`SLURM_RESTART_COUNT`), and continues from the pack's newest checkpoint
(softprompt.train.resume).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf, open_dict

from softprompt.core import atomic, keys
from softprompt.core.errors import UserError, import_extra

EXECUTORS = ("local", "submitit_local", "submitit_slurm")
# what only submitit's SLURM executor reads: given to another executor they would do nothing
SLURM_OPTIONS = ("partition", "qos", "account", "comment", "constraint", "exclude", "gres", "cpus_per_task",
                 "gpus_per_node", "mem_gb", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu",
                 "additional_parameters")
# of those, the ones submitit's AutoExecutor takes by their generic name (the rest get `slurm_`)
_GENERIC = ("cpus_per_task", "gpus_per_node", "mem_gb")
# added to every time limit: start-up, loading the model, the base model's evaluation
STARTUP_MIN = 10
POLL_S = 0.25  # how often the launcher asks whether a job has ended
SUMMARY = "packs.json"  # in the sweep dir: every pack, its points, its job and what became of it


# --- the unit of work ------------------------------------------------------------------------------


@dataclass
class PackJob:
    """One pack: what submitit pickles and calls in the job's process; `run()` in the launcher's
    own (`local`). Both return one dict per job: `state` (finished or failed), `error`, `metrics`
    (its metrics.json)."""

    configs: list[DictConfig]  # the jobs' composed configs, in the pack's order
    dirs: list[str]  # their run directories (Hydra's job dirs)
    trunks: list[list[int]]  # indexes into configs, shortest first (softprompt.train.planner)
    overrides: list[list[str]]  # each job's command-line overrides (its W&B run's name)
    steps: int | None = None  # planned lane-steps
    resume: bool = False  # continue from the pack's newest checkpoint (a requeued job)
    halving: Any = None  # the sweep's hyperband (softprompt.train.halving.Halving), shared through the sweep dir

    def __call__(self) -> list[dict[str, Any]]:
        from softprompt.train.preemption import Preempted

        # SLURM requeues a job whose node failed (`--requeue`) with the same pickle: resume it
        resume = self.resume or os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
        try:
            return self.run(resume)
        except Preempted as exc:
            # stopped with a checkpoint by a signal that submitit does not requeue on (SIGTERM:
            # SLURM's own preempt-requeue does): an exit, not an error, so that the job leaves no
            # result and the launcher waits for a requeued attempt; any rerun resumes (the marker)
            print(f"{exc}; checkpoint {exc.checkpoint}", file=sys.stderr, flush=True)
            raise SystemExit(exc.exit_status) from None

    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train the pack here; raises softprompt.train.preemption.Preempted after a preemption's
        checkpoint (the CLI turns it into the single run's line and exit status)."""
        from softprompt.models.methods import get as get_method
        from softprompt.track.wandb_run import run_name
        from softprompt.train.pack import run_pack

        configs = [self._resuming(c) if resume or self.resume else c for c in self.configs]
        names = [run_name(c, get_method(c.peft.method).tag(c.peft), overrides=list(o))
                 for c, o in zip(configs, self.overrides)]
        try:
            members = run_pack(configs, self.dirs, self.trunks, names=names, halving=self.halving)
        except UserError as exc:
            return [{"state": "failed", "error": str(exc), "metrics": {}} for _ in configs]
        return [{"state": m.state, "error": m.error, "metrics": m.metrics if m.state == "finished" else {}}
                for m in members]

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's hook on its preemption/time-limit signal (after the engine's checkpoint):
        the job to requeue, this pack resuming."""
        submitit = import_extra("submitit", "slurm", "requeueing a pack job")
        return submitit.helpers.DelayedSubmission(replace(self, resume=True), *args, **kwargs)

    @staticmethod
    def _resuming(cfg: DictConfig) -> DictConfig:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.training.resume = True
        return cfg


# --- settings: hydra.launcher.* --------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The launcher's settings, checked: every bad value is a UserError before any job starts."""

    executor: str
    pack_lanes: int | None
    devices: int  # packs this machine trains at once, one per device (1: the CPU, or one GPU)
    gpus: tuple[int, ...]  # the GPUs submitit_local pins its jobs to (none on a CPU-only machine)
    parallelism: int | None  # at most this many pack jobs at once (None: all at once)
    folder: str  # submitit's folder (`%j`: the job id)
    seconds_per_step: float
    seconds_per_point: float
    timeout_margin: float
    timeout_min: int | None
    signal_delay_s: int
    max_num_timeout: int
    setup: tuple[str, ...] = ()
    slurm: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Settings:
        p = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else dict(params)
        executor = p["executor"]
        if executor not in EXECUTORS:
            raise UserError(f"hydra.launcher.executor={executor} is not an executor; use local (this process), "
                            "submitit_local (submitit jobs on this machine) or submitit_slurm (SLURM jobs)")
        for key in ("pack_lanes", "parallelism"):
            if p[key] is not None and (not isinstance(p[key], int) or p[key] < 1):
                raise UserError(f"hydra.launcher.{key}={p[key]}: give a whole number >= 1 (or null)")
        slurm = {k: p[k] for k in SLURM_OPTIONS if p.get(k)}
        if executor != "submitit_slurm" and slurm:
            raise UserError(f"hydra.launcher.{', '.join(slurm)} {'is a SLURM option' if len(slurm) == 1 else 'are SLURM options'}, "
                            f"but hydra.launcher.executor={executor} trains the packs on this machine; remove "
                            f"{'it' if len(slurm) == 1 else 'them'}, or use hydra.launcher.executor=submitit_slurm")
        devices, gpus = _devices(p["devices"], executor)
        parallelism = p["parallelism"]
        if executor == "local" and (parallelism or 1) > 1:
            raise UserError(f"hydra.launcher.parallelism={parallelism}: executor=local trains one pack at a time in this "
                            "process; use hydra.launcher.executor=submitit_local for packs side by side")
        if executor == "submitit_local":
            if gpus and parallelism and parallelism > devices:
                raise UserError(f"hydra.launcher.parallelism={parallelism} but hydra.launcher.devices={devices}: each "
                                "pack job has a GPU of its own; lower parallelism or raise devices")
            parallelism = parallelism or devices  # on a CPU-only machine 1: its cores are one device
        if executor != "local":
            import_extra("submitit", "slurm", f"hydra.launcher.executor={executor}")
        if executor == "submitit_slurm" and not shutil.which("srun"):
            raise UserError("hydra.launcher.executor=submitit_slurm submits through SLURM (sbatch, srun), which this "
                            "machine does not have on its PATH; run the command on the cluster (a login node), or "
                            "use hydra.launcher.executor=submitit_local")
        for key in ("seconds_per_step", "seconds_per_point", "timeout_margin"):
            if not p[key] or p[key] <= 0:
                raise UserError(f"hydra.launcher.{key}={p[key]}: give a number > 0")
        return cls(executor=executor, pack_lanes=p["pack_lanes"], devices=devices, gpus=gpus,
                   parallelism=parallelism, folder=str(p["submitit_folder"]),
                   seconds_per_step=float(p["seconds_per_step"]), seconds_per_point=float(p["seconds_per_point"]),
                   timeout_margin=float(p["timeout_margin"]), timeout_min=p["timeout_min"],
                   signal_delay_s=int(p["signal_delay_s"]), max_num_timeout=int(p["max_num_timeout"]),
                   setup=tuple(p.get("setup") or ()), slurm=slurm)

    @property
    def needs_steps(self) -> bool:
        """Whether the plan needs each job's planned steps (balancing, time limits)."""
        return self.executor != "local" or bool(self.pack_lanes) or self.devices > 1

    def time_limit_min(self, steps: int, points: int) -> int:
        """A pack job's time limit: its planned lane-steps and its points' evaluations at the
        configured pace, times the margin, plus the start-up (or `timeout_min` when given)."""
        if self.timeout_min:
            return int(self.timeout_min)
        seconds = self.timeout_margin * (steps * self.seconds_per_step + points * self.seconds_per_point)
        return STARTUP_MIN + math.ceil(seconds / 60)

    def parameters(self, steps: int, points: int, gpu: int | None, name: str) -> dict[str, Any]:
        """submitit's `update_parameters` for one pack job (AutoExecutor's names for SLURM)."""
        common = {"timeout_min": self.time_limit_min(steps, points), "name": name}
        if self.executor == "submitit_local":
            gpu_params = {"gpus_per_node": 1, "visible_gpus": [gpu]} if gpu is not None else {}
            return common | {"signal_delay_s": self.signal_delay_s, "setup": list(self.setup)} | gpu_params
        slurm = {k if k in _GENERIC else f"slurm_{k}": v for k, v in self.slurm.items()}
        return common | slurm | {"slurm_signal_delay_s": self.signal_delay_s, "slurm_setup": list(self.setup)}


def _devices(value: Any, executor: str) -> tuple[int, tuple[int, ...]]:
    """(packs at once on this machine, the GPUs to pin them to) for hydra.launcher.devices."""
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UserError(f"hydra.launcher.devices={value}: give auto or a whole number >= 1")
    if executor == "submitit_slurm":
        if value != "auto":
            raise UserError(f"hydra.launcher.devices={value} is for this machine's GPUs (executor=submitit_local); a "
                            "SLURM pack job asks for its own with hydra.launcher.gpus_per_node, and "
                            "hydra.launcher.pack_lanes spreads a grid over more jobs")
        return 1, ()
    gpus = gpu_ids() if executor == "submitit_local" or value != "auto" else ()
    present = max(1, len(gpus))
    if value == "auto":
        return (present if executor == "submitit_local" else 1), gpus
    if value > present:
        what = f"{len(gpus)} GPUs" if gpus else "no GPU (one device: the CPU, whose cores one pack uses)"
        raise UserError(f"hydra.launcher.devices={value} but this machine has {what}; use hydra.launcher.devices=auto "
                        f"or at most {present}")
    if value > 1 and executor == "local":
        raise UserError(f"hydra.launcher.devices={value} trains {value} packs at once, each in a process of its own: "
                        "use hydra.launcher.executor=submitit_local")
    return value, gpus[:value]


def gpu_ids() -> tuple[int, ...]:
    """The CUDA devices this process may use, by the numbers CUDA_VISIBLE_DEVICES gives them
    (submitit pins a job to one by setting that variable)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return ()  # hidden on purpose: no need to import torch to know
    import torch

    count = torch.cuda.device_count()
    if not visible:
        return tuple(range(count))
    names = [v.strip() for v in visible.split(",")][:count]
    if not all(n.isdigit() for n in names):
        raise UserError(f"CUDA_VISIBLE_DEVICES={visible} names GPUs by UUID; the packed launcher pins its jobs by "
                        "number: give their numbers (nvidia-smi -L lists them)")
    return tuple(int(n) for n in names)


# --- planned steps ---------------------------------------------------------------------------------


def planned_steps(configs: list[DictConfig]) -> list[int]:
    """Each job's optimizer steps, from its data split's training rows (read once per dataset
    setting and seed: a bundled or local csv in milliseconds; a Hub dataset from its cache)."""
    from softprompt.data.loading import load_splits
    from softprompt.train.planner import planned_steps as steps_of

    rows: dict[str, int] = {}
    out = []
    for cfg in configs:
        key = f"{OmegaConf.to_yaml(cfg.dataset)}seed={cfg.seed}"
        if key not in rows:
            rows[key] = len(load_splits(cfg.dataset, cfg.seed).train)
        out.append(steps_of(cfg, rows[key]))
    return out


# --- submitit: submit, cap, wait, collect ----------------------------------------------------------


@dataclass
class Outcome:
    """What became of one pack: `finished` (its job ran; a job of it may still have failed alone:
    `points`), `failed` (its job ended without results: `error` says why), `kept` (finished before)."""

    state: str
    points: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def submit(jobs: list[PackJob], settings: Settings, on_event: Callable[..., None],
           names: list[str] | None = None) -> list[Outcome]:
    """Run the packs as submitit jobs, longest first, at most `settings.parallelism` at once (each
    on a GPU of its own where there are GPUs); `on_event(k, **record)` when pack k starts and ends;
    `names`: the jobs' names (SLURM's job name)."""
    submitit = import_extra("submitit", "slurm", f"hydra.launcher.executor={settings.executor}")
    order = sorted(range(len(jobs)), key=lambda k: -(jobs[k].steps or 0))
    if settings.gpus:
        slots: list[int | None] = list(settings.gpus[:settings.parallelism or len(settings.gpus)])
    else:
        slots = [None] * (settings.parallelism or len(jobs))
    running: dict[int, tuple[Any, int | None]] = {}
    outcomes: list[Outcome | None] = [None] * len(jobs)
    try:
        while order or running:
            while order and slots:
                k, gpu = order.pop(0), slots.pop(0)
                executor = _executor(submitit, settings)
                executor.update_parameters(**settings.parameters(jobs[k].steps or 0, len(jobs[k].configs), gpu,
                                                                 names[k] if names else f"pack{k}"))
                job = executor.submit(jobs[k])
                running[k] = (job, gpu)
                on_event(k, state="running", job_id=str(job.job_id), log=str(job.paths.stdout), gpu=gpu)
            ended = [k for k, (job, _) in running.items() if job.done()]
            for k in ended:
                job, gpu = running.pop(k)
                outcomes[k] = _collect(job, settings, submitit)
                slots.append(gpu)
                on_event(k, state=outcomes[k].state, error=outcomes[k].error)
            if not ended:
                time.sleep(POLL_S)
    finally:
        if settings.executor == "submitit_local":  # the launcher stopped (Ctrl-C): so do its local jobs
            for job, _ in running.values():
                job.cancel(check=False)
    return outcomes  # type: ignore[return-value]


def _executor(submitit, settings: Settings):
    if settings.executor == "submitit_local":
        # LocalExecutor itself: AutoExecutor does not pass visible_gpus on to it
        return submitit.LocalExecutor(folder=settings.folder, max_num_timeout=settings.max_num_timeout)
    return submitit.AutoExecutor(folder=settings.folder, cluster="slurm", slurm_max_num_timeout=settings.max_num_timeout)


def _collect(job, settings: Settings, submitit) -> Outcome:
    if settings.executor == "submitit_local" and not job.paths.result_pickle.exists():
        # a local job writes its result before its process ends: none means it was killed (SIGKILL,
        # out of memory) without a signal it could act on (submitit would wait 15 s for it first)
        return Outcome("failed", error=f"submitit job {job.job_id} ended without a result (its process was killed, "
                                       f"or stopped by a signal after a checkpoint); log {job.paths.stderr}")
    try:
        return Outcome("finished", points=job.result())
    except Exception as exc:  # noqa: BLE001 - whatever ended the job, the others go on and it is reported
        return Outcome("failed", error=f"submitit job {job.job_id}: {_why(exc)}; log {job.paths.stderr}")


def _why(exc: Exception) -> str:
    """The line that says what ended a job: the last line of its traceback, or submitit's first."""
    text = str(exc)
    parts = text.split("-" * 22)
    lines = [line.strip() for line in (parts[1] if len(parts) >= 3 else text).strip().splitlines() if line.strip()]
    return (lines[-1] if len(parts) >= 3 else lines[0]) if lines else type(exc).__name__


# --- the sweep's summary: packs.json ----------------------------------------------------------------


class Summary:
    """`packs.json` in the sweep dir: each pack's points, trunks, planned steps and time limit, its
    job (id, log, GPU), its state (pending, running, finished, failed, kept) and why it failed, and
    each point's state and held-out perplexity. Rewritten whenever a pack changes."""

    def __init__(self, sweep_dir: Path, settings: Settings, jobs: list[PackJob]):
        self.path = Path(sweep_dir) / SUMMARY
        self.record: dict[str, Any] = {
            "executor": settings.executor, "devices": settings.devices, "parallelism": settings.parallelism,
            "pack_lanes": settings.pack_lanes,
            "packs": [{"pack": k, "points": [Path(d).name for d in job.dirs],
                       "trunks": [[Path(job.dirs[i]).name for i in trunk] for trunk in job.trunks],
                       "planned_steps": job.steps, "state": "pending", "error": None,
                       "timeout_min": (settings.time_limit_min(job.steps or 0, len(job.dirs))
                                       if settings.executor != "local" else None)}
                      for k, job in enumerate(jobs)]}
        self._write()

    def update(self, k: int, **fields: Any) -> None:
        self.record["packs"][k].update(fields)
        self._write()

    def results(self, k: int, points: list[dict[str, Any]]) -> None:
        pack = self.record["packs"][k]
        pack["results"] = {d: {"state": p["state"], "error": p.get("error"),
                               keys.EVAL_PERPLEXITY: p.get("metrics", {}).get(keys.EVAL_PERPLEXITY)}
                           for d, p in zip(pack["points"], points)}
        self._write()

    def failed(self, outcomes: Mapping[int, Outcome]) -> UserError | None:
        """One error for every pack whose job failed: which points, why, what to do."""
        failed = sorted(k for k, o in outcomes.items() if o.state == "failed")
        if not failed:
            return None
        which = "; ".join(f"pack {k}, points {', '.join(self.record['packs'][k]['points'])}: {outcomes[k].error}"
                          for k in failed)
        return UserError(f"{len(failed)} of {len(outcomes)} packs failed ({which}); the other packs' points are kept; "
                         f"see {self.path}; rerun the same command with training.resume=true to continue the failed "
                         "packs from their checkpoints")

    def _write(self) -> None:
        from softprompt.core.distributed import is_main

        if is_main():  # under torchrun every rank launches the same packs; rank 0 records them
            atomic.write_json(self.path, self.record)
