"""`python train.py -m hydra/launcher=packed ...`: a Hydra multirun whose jobs train as packs.

Hydra hands a launcher all jobs of a multirun batch at once (`Launcher.launch(job_overrides)`),
which is exactly what packing needs: this launcher composes every job's config as Hydra's
BasicLauncher does, plans them (softprompt.train.planner), runs each pack of one through the
usual task function (`run_job`: the same as `hydra/launcher=basic`) and each larger pack through
softprompt.train.pack in this process. Every job keeps its own Hydra job dir
(`hydra.sweep.dir/hydra.sweep.subdir`, with `.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`),
which is its run directory. Hydra finds this module through the `hydra_plugins` namespace package;
the config below registers it as `hydra/launcher=packed`.

No `from __future__ import annotations` here: Hydra executes plugin modules without entering them
in sys.modules, where `dataclasses` cannot resolve string annotations.
"""

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

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


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="softprompt")


class PackedLauncher(Launcher):
    def __init__(self, share: bool = True) -> None:
        super().__init__()
        self.share = share
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from softprompt.train.planner import describe, plan

        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        sweep_configs = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            sweep_configs.append(sweep_config)
        task_configs = [_task_config(c) for c in sweep_configs]
        packs = plan(task_configs, share=self.share)
        log.info(f"Launching {len(job_overrides)} jobs locally in {len(packs)} pack{'s' if len(packs) != 1 else ''}")
        runs: list[Optional[JobReturn]] = [None] * len(job_overrides)
        for pack in packs:
            log.info(f"pack: {describe(pack, task_configs)}")
            for i in pack.jobs:
                log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
            if len(pack) == 1:
                (i,) = pack.jobs
                runs[i] = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                  config=sweep_configs[i], job_dir_key="hydra.sweep.dir",
                                  job_subdir_key="hydra.sweep.subdir")
            else:
                for i, ret in zip(pack.jobs, self._run_pack(pack, sweep_configs, task_configs, job_overrides)):
                    runs[i] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs  # type: ignore[return-value]

    def _run_pack(self, pack, sweep_configs, task_configs, job_overrides) -> list[JobReturn]:
        from softprompt.core.errors import UserError
        from softprompt.models.methods import get as get_method
        from softprompt.track.wandb_run import run_name
        from softprompt.train.pack import run_pack

        dirs, names = [], []
        for i in pack.jobs:
            dirs.append(_prepare_job_dir(sweep_configs[i], task_configs[i]))
            tag = get_method(task_configs[i].peft.method).tag(task_configs[i].peft)
            names.append(run_name(task_configs[i], tag, overrides=list(job_overrides[i])))
        trunks = [[pack.jobs.index(i) for i in t.jobs] for t in pack.trunks]
        try:
            members = run_pack([task_configs[i] for i in pack.jobs], dirs, trunks, names=names)
            outcomes = [(m.state, m.metrics.get("eval/perplexity") if m.state == "finished" else
                         UserError(f"job {pack.jobs[k]} ({dirs[k]}): {m.error}")) for k, m in enumerate(members)]
        except UserError as exc:
            outcomes = [("failed", exc)] * len(pack.jobs)
        returns = []
        for i, out, (state, value) in zip(pack.jobs, dirs, outcomes):
            ret = JobReturn(overrides=list(job_overrides[i]), cfg=task_configs[i], hydra_cfg=sweep_configs[i],
                            working_dir=str(out), task_name=sweep_configs[i].hydra.job.name)
            ret.status = JobStatus.COMPLETED if state == "finished" else JobStatus.FAILED
            # a failed job's return value is its error: Hydra's sweeper raises it after the batch
            # (the other packs and jobs of the batch have run by then)
            ret.return_value = value
            returns.append(ret)
        return returns


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
