"""Packs beyond one process: the packed launcher's executors, one pack per device, faults.

- A 2 lengths x 2 epochs grid through `hydra/launcher=packed` with submitit's local executor, one
  pack per length (`pack_lanes=1`): each pack is a submitit job (a process of its own, its log in
  the sweep dir). One of them is killed with SIGKILL after its first checkpoint: the sweep reports
  that pack failed (which points, why) and keeps the other; the same command with
  `training.resume=true` continues the killed pack from its checkpoint and keeps the finished one.
  Every point then equals the same grid trained as one pack in this process, and each has one W&B
  run. (One launch serves all these checks: each submitit job is a fresh Python process, ~7 s of
  imports on the 2-core test VM.)
- The SLURM preset composes (`--cfg hydra`), and its per-pack job parameters, time limit from the
  pack's planned steps, are ones submitit's SLURM executor takes.
- Bad launcher settings are one `error:` line before any job starts, e.g. two devices on a machine
  that has one.
- The planner spreads the seed grid over two devices: the last pack ends after <= 0.65 of the
  planned steps one device needs.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, child_env, compose, run_cli

from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir
from softprompt.train import dispatch

# 16 training rows, batch 8: 2 optimizer steps per epoch
FAST = ["model=tiny-llama", "dataset=prompts_sample", "dataset.max_samples=20", "training.max_length=24",
        "eval.max_new_tokens=4", "eval.num_heldout_generations=0", "eval.train_perplexity_rows=4",
        "training.save_every_epoch=false", "training.learning_rate=0.3", "training.lr_scheduler=constant",
        "training.pack_forward=turns"]
POINTS = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (num_virtual_tokens, epochs) in Hydra's job order
GRID = ["peft.num_virtual_tokens=1,2", "training.epochs=1,2"]
SUBMITIT = ["-m", "hydra/launcher=packed", "hydra.launcher.executor=submitit_local", "hydra.launcher.pack_lanes=1",
            # both packs at once: this test's wall time, not the default (1 on a CPU-only machine)
            "hydra.launcher.parallelism=2", *FAST, "wandb.mode=offline", *GRID]


@pytest.fixture(scope="module")
def one_local_pack(tmp_path_factory) -> list[dict]:
    """The grid as one pack (two trunks) in this process: each point's metrics."""
    from softprompt.train.pack import run_pack
    from softprompt.train.planner import plan

    root = tmp_path_factory.mktemp("one-pack")
    configs = [compose(FAST + ["wandb.mode=disabled", f"peft.num_virtual_tokens={n}", f"training.epochs={e}"])
               for n, e in POINTS]
    (pack,) = plan(configs)
    assert [t.jobs for t in pack.trunks] == [[0, 1], [2, 3]]
    members = run_pack(configs, [root / str(i) for i in range(4)], [t.jobs for t in pack.trunks])
    assert [m.state for m in members] == ["finished"] * 4
    return [m.metrics for m in members]


def _summary(sweep: Path) -> dict:
    return json.loads((sweep / dispatch.SUMMARY).read_text())


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory, one_local_pack):
    """The grid as 2 submitit jobs, pack 0's killed after its first checkpoint; then the rerun. (After
    one_local_pack: the tiny model and the data are in the cache then, for every job alike.)"""
    import psutil

    from softprompt.train.checkpoints import complete_checkpoints

    sweep = tmp_path_factory.mktemp("submitit")
    logs = tmp_path_factory.mktemp("logs")
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        # 0.3 s after each step: a window between the pack's first checkpoint (step 2) and its end
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SUBMITIT, f"hydra.sweep.dir={sweep}"],
                                env=child_env({"SOFTPROMPT_TEST_STEP_DELAY": "0.3"}), stdout=out, stderr=err)
        deadline = time.monotonic() + 240
        while not complete_checkpoints(RunDir(sweep / "0").checkpoints):
            assert proc.poll() is None, (logs / "err").read_text()[-3000:]
            assert time.monotonic() < deadline, "pack 0's first checkpoint not reached in time"
            time.sleep(0.05)
        controller = psutil.Process(int(_summary(sweep)["packs"][0]["job_id"]))  # submitit's job id: its pid
        (task,) = controller.children()  # the process that trains the pack
        killed_after = [p.name for p in complete_checkpoints(RunDir(sweep / "0").checkpoints)]
        task.send_signal(signal.SIGKILL)
        proc.wait(timeout=240)
    first = {"returncode": proc.returncode, "stderr": (logs / "err").read_text(), "summary": _summary(sweep),
             "killed_after": killed_after, "finished": [RunDir(sweep / str(i)).finished for i in range(4)],
             "kept_mtimes": [RunDir(sweep / str(i)).metrics.stat().st_mtime_ns for i in (2, 3)]}
    rerun = run_cli([*SUBMITIT, "training.resume=true", f"hydra.sweep.dir={sweep}"], timeout=300)
    return sweep, first, rerun


def test_a_killed_pack_job_is_reported_and_its_rerun_continues_it_from_its_checkpoint(killed_then_rerun):
    sweep, first, rerun = killed_then_rerun
    assert first["killed_after"][0] == "checkpoint-2"  # the pack's first checkpoint (its 1-epoch job trained)
    # the sweep went on without the killed pack, then said which points failed and why, in one line
    assert first["returncode"] == 2, first["stderr"][-3000:]
    assert "Traceback" not in first["stderr"]
    line = first["stderr"].strip().splitlines()[-1]
    assert line.startswith("error: 1 of 2 packs failed (pack 0, points 0, 1: submitit job ")
    assert "ended without a result (its process was killed" in line and "training.resume=true" in line
    packs = first["summary"]["packs"]
    assert [(p["points"], p["state"]) for p in packs] == [(["0", "1"], "failed"), (["2", "3"], "finished")]
    assert packs[0]["results"] == {}  # nothing from the killed pack
    assert all(packs[1]["results"][d]["state"] == "finished" for d in ("2", "3"))
    assert first["finished"] == [False, False, True, True]

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    packs = _summary(sweep)["packs"]
    assert [p["state"] for p in packs] == ["finished", "kept"]
    assert "pack 1: every point finished in an earlier attempt; kept" in rerun.stdout + rerun.stderr
    # kept, not trained again: the finished pack's files are the first attempt's
    assert [RunDir(sweep / str(i)).metrics.stat().st_mtime_ns for i in (2, 3)] == first["kept_mtimes"]
    resumed_log = Path(packs[0]["log"]).read_text()
    step = int(first["killed_after"][-1].split("-")[1])
    assert f"resuming from {RunDir(sweep / '0').checkpoints / f'checkpoint-{step}'} (step {step})" in resumed_log
    for i in (0, 1):
        assert RunDir(sweep / str(i)).read_metrics()[keys.TRAIN_RESUMED_FROM_STEP] == step


def test_the_grid_ran_as_submitit_jobs_and_equals_one_local_pack(killed_then_rerun, one_local_pack):
    sweep, _, _ = killed_then_rerun
    # each pack a submitit job of its own, its log in the sweep dir: 2 packs, the killed one twice
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 3, logs
    assert all("submitit INFO" in log.read_text() for log in logs)
    for i, (n, e) in enumerate(POINTS):
        mine = RunDir(sweep / str(i))
        metrics = mine.read_metrics()
        config = mine.read_config()
        assert (config["peft"]["num_virtual_tokens"], config["training"]["epochs"]) == (n, e)
        assert config["pack"]["members"] == (["0", "1"] if n == 1 else ["2", "3"])  # one trunk per pack
        assert mine.hydra_config.is_file()
        for key in (keys.EVAL_PERPLEXITY, keys.EVAL_LOSS, keys.TRAIN_LOSS):
            assert metrics[key] == pytest.approx(one_local_pack[i][key], rel=1e-6), (i, key)
        assert metrics[keys.TRAIN_STEPS] == one_local_pack[i][keys.TRAIN_STEPS] == 2 * e


def test_each_point_has_one_wandb_run(killed_then_rerun):
    sweep, _, _ = killed_then_rerun
    ids = []
    for i in range(4):
        run = RunDir(sweep / str(i))
        run_id = run.read_wandb_run_id()
        files = list(run.wandb.glob("offline-run-*/run-*.wandb"))
        # the resumed pack's points: one file per attempt, both of the same run
        assert files and {f.stem.removeprefix("run-") for f in files} == {run_id}, files
        assert len(files) == (2 if i < 2 else 1)
        ids.append(run_id)
    assert len(set(ids)) == 4


def test_a_requeued_pack_job_resumes(tmp_path):
    """What submitit's handler asks for on its preemption/time-limit signal (after the engine's
    checkpoint): the same pack, resuming; it survives submitit's pickling."""
    import pickle

    configs = [compose(FAST + [f"training.epochs={e}"]) for e in (1, 2)]
    job = dispatch.PackJob(configs=configs, dirs=[str(tmp_path / "0"), str(tmp_path / "1")], trunks=[[0, 1]],
                           overrides=[["training.epochs=1"], ["training.epochs=2"]], steps=4)
    delayed = pickle.loads(pickle.dumps(job.checkpoint()))
    again = delayed.function
    assert isinstance(again, dispatch.PackJob) and again.resume and not job.resume
    assert (again.dirs, again.trunks, again.steps) == (job.dirs, job.trunks, 4)
    assert [c.training.epochs for c in again.configs] == [1, 2] and not again.configs[0].training.resume


def test_each_pack_job_on_a_machine_with_gpus_gets_one_of_its_own(monkeypatch, tmp_path):
    """devices=2 on a machine with GPUs 2 and 3 visible: two packs at once, each pinned by submitit
    (visible_gpus: the job's CUDA_VISIBLE_DEVICES)."""
    import submitit

    monkeypatch.setattr(dispatch, "gpu_ids", lambda: (2, 3))
    settings = dispatch.Settings.of(_launcher("hydra/launcher=packed", "hydra.launcher.executor=submitit_local",
                                              "hydra.launcher.devices=2", f"hydra.sweep.dir={tmp_path}"))
    assert (settings.devices, settings.gpus, settings.parallelism) == (2, (2, 3), 2)
    params = settings.parameters(steps=4, points=2, gpu=3, name="train-pack1")
    executor = submitit.LocalExecutor(folder=tmp_path / "%j")
    executor.update_parameters(**params)  # submitit checks visible_gpus against gpus_per_node
    assert (executor.parameters["visible_gpus"], executor.parameters["gpus_per_node"]) == ([3], 1)
    with pytest.raises(UserError, match="hydra.launcher.devices=3 but this machine has 2 GPUs"):
        dispatch.Settings.of(_launcher("hydra/launcher=packed", "hydra.launcher.executor=submitit_local",
                                       "hydra.launcher.devices=3"))


# --- SLURM -------------------------------------------------------------------------------------------


def test_the_slurm_preset_composes_with_per_pack_resources():
    result = run_cli(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "model=tiny-llama", "--cfg", "hydra"])
    assert result.returncode == 0, result.stderr[-2000:]
    hydra = yaml.safe_load(result.stdout)["hydra"]
    assert hydra["sweep"]["subdir"] == "${hydra.job.num}"  # one run dir per point, on the cluster too
    launcher = hydra["launcher"]
    assert launcher["_target_"] == "hydra_plugins.softprompt_packed_launcher.packed_launcher.PackedLauncher"
    assert (launcher["executor"], launcher["partition"], launcher["gpus_per_node"], launcher["cpus_per_task"],
            launcher["mem_gb"]) == ("submitit_slurm", "gpu", 1, 8, 32)
    assert (launcher["signal_delay_s"], launcher["max_num_timeout"], launcher["timeout_min"]) == (120, 3, None)
    assert launcher["submitit_folder"].endswith("/.submitit/%j")


def _launcher(*overrides: str) -> dict:
    """hydra.launcher as Hydra composes it for `-m OVERRIDES` (the launcher's keyword arguments)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from softprompt.core.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    return {k: v for k, v in params.items() if k not in ("_target_", "share")}


def test_a_slurm_pack_job_asks_for_its_own_time_limit_in_submitits_terms(tmp_path, monkeypatch):
    import submitit

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit's SLURM executor looks for it
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    settings = dispatch.Settings.of(_launcher("hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                              f"hydra.sweep.dir={tmp_path}"))
    # the seed grid's longer pack on two GPUs: 306 lane-steps, 9 points (test_planner_... below)
    params = settings.parameters(steps=306, points=9, gpu=None, name="train-pack0")
    assert params["timeout_min"] == 10 + 37  # 1.5 x (306 x 3 s + 9 x 60 s) = 2,187 s
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm", slurm_max_num_timeout=3)
    executor.update_parameters(**params)  # raises on any name submitit does not know
    assert {k: executor.parameters[k] for k in ("time", "gpus_per_node", "cpus_per_task", "mem", "partition",
                                                "signal_delay_s", "job_name")} == {
        "time": 47, "gpus_per_node": 1, "cpus_per_task": 8, "mem": "32GB", "partition": "gpu",
        "signal_delay_s": 120, "job_name": "train-pack0"}
    assert executor.parameters["setup"][0].startswith("export WANDB_MODE=")
    assert dispatch.Settings.of(_launcher("hydra/launcher=slurm", "hydra.launcher.timeout_min=90")).time_limit_min(
        306, 9) == 90


# --- bad input ---------------------------------------------------------------------------------------


def test_two_devices_on_a_one_device_machine_are_refused_before_any_job(tmp_path):
    result = run_cli(["-m", "hydra/launcher=packed", "hydra.launcher.executor=submitit_local",
                      "hydra.launcher.devices=2", *FAST, *GRID, f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 2
    assert result.stderr == ("error: hydra.launcher.devices=2 but this machine has no GPU (one device: the CPU, whose "
                             "cores one pack uses); use hydra.launcher.devices=auto or at most 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun.yaml"]  # no job dir, no submitit job


@pytest.mark.parametrize(("overrides", "message"), [
    (["hydra.launcher.executor=ray"], "hydra.launcher.executor=ray is not an executor; use local (this process), "
                                      "submitit_local (submitit jobs on this machine) or submitit_slurm (SLURM jobs)"),
    (["hydra.launcher.executor=submitit_local", "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=8"],
     "hydra.launcher.partition, mem_gb are SLURM options, but hydra.launcher.executor=submitit_local trains the packs "
     "on this machine; remove them, or use hydra.launcher.executor=submitit_slurm"),
    (["hydra.launcher.devices=2"], "hydra.launcher.devices=2 but this machine has no GPU"),
    (["hydra.launcher.parallelism=2"], "hydra.launcher.parallelism=2: executor=local trains one pack at a time"),
    (["hydra.launcher.executor=submitit_slurm"], "hydra.launcher.executor=submitit_slurm submits through SLURM "
                                                 "(sbatch, srun), which this machine does not have on its PATH"),
    (["hydra.launcher.executor=submitit_slurm", "hydra.launcher.devices=2"],
     "hydra.launcher.devices=2 is for this machine's GPUs (executor=submitit_local)"),
    (["hydra.launcher.pack_lanes=0"], "hydra.launcher.pack_lanes=0: give a whole number >= 1 (or null)"),
])
def test_bad_launcher_settings_are_user_errors(overrides, message):
    with pytest.raises(UserError) as caught:
        dispatch.Settings.of(_launcher("hydra/launcher=packed", *overrides))
    assert str(caught.value).startswith(message)


def test_a_submitit_executor_without_submitit_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(UserError, match=r"^submitit is not installed \(hydra.launcher.executor=submitit_local\); "
                                        r"run pip install 'softprompt\[slurm\]'$"):
        dispatch.Settings.of(_launcher("hydra/launcher=packed", "hydra.launcher.executor=submitit_local"))


# --- the planner: packs per device --------------------------------------------------------------------


def test_two_devices_end_the_seed_grid_after_at_most_065_of_one_devices_planned_steps():
    from omegaconf import OmegaConf

    from softprompt.train.planner import makespan, plan, planned_steps

    sweep = yaml.safe_load((ROOT / "sweeps" / "tokens_x_epochs.yaml").read_text())["parameters"]
    base = OmegaConf.to_container(compose([]), resolve=True)  # the seed's settings: constant LR, batch 8
    configs = []
    for tokens in sweep["peft.num_virtual_tokens"]["values"]:
        for epochs in sweep["training.epochs"]["values"]:
            config = copy.deepcopy(base)
            config["peft"]["num_virtual_tokens"], config["training"]["epochs"] = tokens, epochs
            configs.append(config)
    # the seed dataset's 134 training rows (docs/sweeps.md): 17 steps an epoch
    steps = [planned_steps(c, 134) for c in configs]
    one, two = plan(configs, steps=steps), plan(configs, devices=2, steps=steps)
    assert [p.steps for p in one] == [510]  # 5 trunks of 6 epochs
    assert sorted(p.steps for p in two) == [204, 306]  # 2 and 3 trunks; every trunk whole
    assert sorted(len(t.jobs) for p in two for t in p.trunks) == [3] * 5
    ratio = makespan([p.steps for p in two], 2) / makespan([p.steps for p in one], 1)
    assert ratio == pytest.approx(0.6) and ratio <= 0.65
    # pack_lanes=2 caps the lanes per pack: 3 packs, the longest two of 2 trunks
    capped = plan(configs, lanes=2, steps=steps)
    assert [len(p.trunks) for p in capped] == [2, 2, 1] and [p.steps for p in capped] == [204, 204, 102]
