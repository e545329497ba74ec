"""`python train.py -m hydra/launcher=packed ...`: a Hydra multirun whose jobs train as packs.

Hydra hands a launcher all jobs of a multirun batch at once (`Launcher.launch(job_overrides)`),
which is exactly what packing needs: this launcher composes every job's config as Hydra's
BasicLauncher does, checks them all (softprompt.train.preflight), plans them
(softprompt.train.planner) and hands each pack to `hydra.launcher.executor`
(softprompt.train.dispatch): `local` trains them one after another in this process (a pack of one
through the usual task function, `run_job`, the same as `hydra/launcher=basic`; a larger one
through softprompt.train.pack), `submitit_local` and `submitit_slurm` as submitit jobs. Every job
keeps its own Hydra job dir (`hydra.sweep.dir/hydra.sweep.subdir`, with `.hydra/config.yaml`,
`hydra.yaml`, `overrides.yaml`), which is its run directory; `packs.json` in the sweep dir records
each pack, its job and what became of it. Hydra finds this module through the `hydra_plugins`
namespace package; the config below registers it as `hydra/launcher=packed`
(`hydra/launcher=slurm` is this launcher with executor=submitit_slurm).

No `from __future__ import annotations` here: Hydra executes plugin modules without entering them
in sys.modules, where `dataclasses` cannot resolve string annotations. For the same reason what
submitit pickles (softprompt.train.dispatch.PackJob) lives in softprompt.
"""

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.softprompt_packed_launcher.packed_launcher.PackedLauncher"
    # false: every job alone, as hydra/launcher=basic (the plan is still logged)
    share: bool = True
    # where each pack trains: local (this process, one pack after another), submitit_local (a
    # submitit job on this machine), submitit_slurm (a SLURM job)
    executor: str = "local"
    # at most this many lanes (trunks) per pack; the planner balances the packs' planned steps
    pack_lanes: Optional[int] = None
    # auto or N: packs trained at once on this machine, each pinned to a GPU of its own
    # (submitit_local); auto is the GPUs present, 1 on a CPU-only machine
    devices: Any = "auto"
    # at most this many pack jobs at once; null: `devices` (submitit_local), all (submitit_slurm)
    parallelism: Optional[int] = None
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    # a pack job's time limit, in minutes: 10 + timeout_margin x (planned steps x seconds_per_step
    # + points x seconds_per_point), or timeout_min for every pack job
    seconds_per_step: float = 3.0
    seconds_per_point: float = 60.0
    timeout_margin: float = 1.5
    timeout_min: Optional[int] = None
    # submitit's signal (SIGUSR2) this long before the time limit: the pack checkpoints and is
    # requeued, at most max_num_timeout times for time limits (preemptions do not count)
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    setup: Optional[List[str]] = None  # shell lines run before each pack job (both submitit executors)
    # a W&B sweep's early termination block ({type: hyperband, min_iter: 2, eta: 3}), the epoch as
    # its iteration, judged on `metric` (empty: eval/perplexity, minimized): softprompt.train.halving.
    # null: every job trains to its end
    early_terminate: Any = None
    metric: Any = None
    # SLURM only (executor=submitit_slurm), named as in hydra-submitit-launcher; null: not asked for
    partition: Optional[str] = None
    qos: Optional[str] = None
    account: Optional[str] = None
    comment: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    gres: Optional[str] = None
    cpus_per_task: Optional[int] = None
    gpus_per_node: Optional[int] = None
    mem_gb: Optional[int] = None
    cpus_per_gpu: Optional[int] = None
    gpus_per_task: Optional[int] = None
    mem_per_gpu: Optional[str] = None
    mem_per_cpu: Optional[str] = None
    additional_parameters: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="softprompt")


class PackedLauncher(Launcher):
    def __init__(self, share: bool = True, **params: Any) -> None:
        super().__init__()
        self.share = share
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in params.items()}
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from softprompt.core.errors import UserError
        from softprompt.train import dispatch, preflight
        from softprompt.train.planner import plan

        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        # the launcher's own settings first: a bad one fails before any job is composed or started
        settings = dispatch.Settings.of(self.params)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_configs = [self._sweep_config(overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        task_configs = [_task_config(c) for c in sweep_configs]
        for sweep_config, task in zip(sweep_configs, task_configs):  # every job's cheap checks, before any job starts
            HydraConfig.instance().set_config(sweep_config)
            preflight.check(task)
        halving = _halving(self.params, task_configs, sweep_dir)
        steps = dispatch.planned_steps(task_configs) if settings.needs_steps else None
        packs = plan(task_configs, share=self.share, lanes=settings.pack_lanes, devices=settings.devices, steps=steps)
        _log_plan(packs, task_configs, job_overrides, initial_job_idx, settings)

        jobs = []
        for pack in packs:
            dirs = [_prepare_job_dir(sweep_configs[i], task_configs[i]) for i in pack.jobs]
            jobs.append(dispatch.PackJob(
                configs=[task_configs[i] for i in pack.jobs], dirs=[str(d) for d in dirs],
                trunks=[[pack.jobs.index(i) for i in t.jobs] for t in pack.trunks],
                overrides=[list(job_overrides[i]) for i in pack.jobs], steps=pack.steps, halving=halving))
        summary = dispatch.Summary(sweep_dir, settings, jobs)
        outcomes: dict[int, Any] = {}
        for k, job in enumerate(jobs):
            if _kept(job):
                outcomes[k] = dispatch.Outcome("kept", points=[{"state": "finished", "error": None,
                                                                "metrics": _metrics(d)} for d in job.dirs])
                summary.update(k, state="kept")
                log.info(f"pack {k}: every point finished in an earlier attempt; kept")
        todo = [k for k in range(len(jobs)) if k not in outcomes]
        returned: dict[int, JobReturn] = {}  # packs of one that Hydra's run_job ran (executor=local)
        if settings.executor == "local":
            for k in todo:
                summary.update(k, state="running")
                if len(jobs[k].configs) == 1 and halving is None:
                    returned[k], outcomes[k] = self._run_job(sweep_configs[packs[k].jobs[0]])
                else:
                    outcomes[k] = dispatch.Outcome("finished", points=jobs[k].run())
                summary.update(k, state=outcomes[k].state)
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        else:
            name = str(self.config.hydra.job.name)
            ran = dispatch.submit([jobs[k] for k in todo], settings, lambda n, **record: summary.update(todo[n], **record),
                                  names=[f"{name}-pack{k}" for k in todo])
            outcomes.update(zip(todo, ran))
        for k, outcome in outcomes.items():
            summary.results(k, outcome.points)
        failed = summary.failed(outcomes)  # one line for every pack whose job failed (None: none)
        runs: list[Optional[JobReturn]] = [None] * len(job_overrides)
        for k, pack in enumerate(packs):
            if k in returned:
                runs[pack.jobs[0]] = returned[k]
                continue
            for i, out, point in zip(pack.jobs, jobs[k].dirs, outcomes[k].points or [None] * len(pack)):
                ret = JobReturn(overrides=list(job_overrides[i]), cfg=task_configs[i], hydra_cfg=sweep_configs[i],
                                working_dir=out, task_name=sweep_configs[i].hydra.job.name)
                ret.status = JobStatus.COMPLETED if point and point["state"] == "finished" else JobStatus.FAILED
                # a failed job's return value is its error: Hydra's sweeper raises it after the batch
                # (the other packs and jobs of the batch have run by then)
                ret.return_value = (point["metrics"].get("eval/perplexity") if ret.status == JobStatus.COMPLETED
                                    else failed if point is None else UserError(f"job {i} ({out}): {point['error']}"))
                runs[i] = ret
        if failed is not None:  # raised here, not by the sweeper: one line, every failed pack in it
            raise failed
        return runs  # type: ignore[return-value]

    def _sweep_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        """The job's config with its `hydra` node, as Hydra's BasicLauncher composes it."""
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return sweep_config

    def _run_job(self, sweep_config: DictConfig) -> "tuple[JobReturn, Any]":
        """A pack of one in this process: through Hydra's task function, as hydra/launcher=basic
        runs it (its job log, its return value for a sweeper that optimises it)."""
        from softprompt.train.dispatch import Outcome

        errors: list[BaseException] = []

        def task(cfg: DictConfig) -> Any:
            try:
                return self.task_function(cfg)  # type: ignore[misc]
            except Exception as exc:
                errors.append(exc)
                raise

        ret = run_job(hydra_context=self.hydra_context, task_function=task, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        if ret.status == JobStatus.COMPLETED:
            point = {"state": "finished", "error": None, "metrics": {"eval/perplexity": ret.return_value}}
        else:
            point = {"state": "failed", "error": f"{type(errors[0]).__name__}: {errors[0]}" if errors else "failed",
                     "metrics": {}}
        return ret, Outcome("finished", points=[point])


def _halving(params: dict, task_configs: list, sweep_dir: Path):
    """hydra.launcher.early_terminate as a sweep's hyperband (None without it), checked against
    the jobs before any starts: the block's schema (the `sweeps` package's), its iterations within
    the epoch budget, its metric logged at every epoch."""
    from softprompt.core.errors import UserError
    from softprompt.train import halving

    block = params.get("early_terminate")
    if not block:
        return None
    metric = params.get("metric") or {"name": "eval/perplexity", "goal": "minimize"}
    config = {"method": "grid", "metric": dict(metric), "early_terminate": dict(block),
              "parameters": {"seed": {"value": 0}}}
    where = "hydra.launcher.early_terminate"
    violations = halving.schema_violations(config)
    if violations:
        raise UserError(f"{where} is not a valid W&B early_terminate block: {'; '.join(violations)}")
    halving.check(config, max(int(c.training.epochs) for c in task_configs),
                  all(bool(c.eval.per_epoch) for c in task_configs),
                  next((c.training.max_steps for c in task_configs if c.training.max_steps), None), where)
    return halving.Halving(config, sweep_dir / halving.FOLDER)


def _log_plan(packs, task_configs, job_overrides, initial_job_idx: int, settings) -> None:
    from softprompt.train.planner import describe, makespan

    where = {"local": "in this process", "submitit_local": f"as submitit jobs on this machine, "
             f"{settings.parallelism} at a time", "submitit_slurm": "as SLURM jobs"}[settings.executor]
    at_once = 1 if settings.executor == "local" else settings.parallelism or len(packs)
    planned = (f" (planned steps until the last ends: {makespan([p.steps for p in packs], at_once)})"
               if packs and packs[0].steps is not None else "")
    log.info(f"Launching {len(job_overrides)} jobs in {len(packs)} pack{'s' if len(packs) != 1 else ''} {where}{planned}")
    for pack in packs:
        log.info(f"pack: {describe(pack, task_configs)}")
        for i in pack.jobs:
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")


def _kept(job) -> bool:
    """A rerun with training.resume=true keeps a pack whose points all finished with these settings."""
    if not all(c.training.resume for c in job.configs):
        return False
    from softprompt.train.resume import finished

    return finished(job.configs, [Path(d) for d in job.dirs])


def _metrics(run_dir: str) -> dict:
    from softprompt.core.rundir import RunDir

    return RunDir(run_dir).read_metrics()


def _task_config(sweep_config: DictConfig) -> DictConfig:
    """What the task function would receive: the job's config without the `hydra` node."""
    HydraConfig.instance().set_config(sweep_config)
    task = copy.deepcopy(sweep_config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _prepare_job_dir(sweep_config: DictConfig, task_config: DictConfig) -> Path:
    """The job dir Hydra's run_job would make, with its `.hydra/` record of the job."""
    HydraConfig.instance().set_config(sweep_config)
    out = Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir"))) / str(
        OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
    with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
        sweep_config.hydra.runtime.output_dir = str(out.resolve())
    from softprompt.core.distributed import is_main

    if not is_main():  # under torchrun every rank plans the same packs; rank 0 writes the records
        return out
    record = out / str(sweep_config.hydra.output_subdir)
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(task_config, record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": sweep_config.hydra}), record / "hydra.yaml")
    OmegaConf.save(sweep_config.hydra.overrides.task, record / "overrides.yaml")
    return out
