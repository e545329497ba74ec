"""Faults of real clusters and disks (issue 18): preemption by SIGTERM/SIGUSR1, a full disk during
a checkpoint or the final save, and the W&B offline records a killed-and-resumed run leaves.

Kill timing uses the test-only hook SOFTPROMPT_TEST_STEP_DELAY (softprompt.train.checkpoints); a
full disk is an OSError(ENOSPC) injected in-process, through the checkpoint writer's torch.save
and through the RunDir write seam.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, child_env, compose, run_cli

from softprompt.core import keys
from softprompt.core.config import resolved
from softprompt.core.errors import disk_full
from softprompt.core.rundir import RunDir
from softprompt.track.records import read_runs
from softprompt.train import checkpoints, preemption
from softprompt.train.checkpoints import COMPLETE, complete_checkpoints

# 12 steps over 1.5 epochs (58 rows, batch 8), checkpoints at 3, 6, 8 (epoch end), 9, 12; every
# step logged, so the W&B history can be checked step by step
FAULTY = [o for o in TINY if not o.startswith("training.max_steps")] + [
    "training.max_steps=12", "training.save_steps=3", "training.epochs=2", "training.logging_steps=1"]
COMPARED = (keys.EVAL_PERPLEXITY, keys.EVAL_LOSS, keys.TRAIN_LOSS, keys.TRAIN_EPOCHS, keys.TRAIN_STEPS)
NO_SPACE = re.compile(r"^error: no space left on the device writing (\S+) in (\S+): it needs ([\d.]+ (?:B|KiB|MiB)), "
                      r"([\d.]+ (?:B|KiB|MiB|GiB)) free there; free some space and rerun the same command "
                      r"with training.resume=true")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli([*FAULTY, f"hydra.run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _start(run_dir: Path, env: dict, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAULTY, *extra, f"hydra.run.dir={run_dir}"],
                            env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the signal: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "signal point not reached in time"
        time.sleep(0.05)


def _train_steps(run) -> list[int]:
    return [row[keys.TRAIN_STEP] for row in run.history if keys.TRAIN_LOSS in row]


def _assert_same_result(metrics: dict, ref: dict) -> None:
    for key in COMPARED:
        assert metrics[key] == pytest.approx(ref[key], rel=1e-5, abs=0), key


# --- preemption ----------------------------------------------------------------------------------


def test_sigterm_mid_epoch_checkpoints_marks_wandb_preempted_and_the_rerun_resumes(tmp_path, uninterrupted):
    _, ref = uninterrupted
    run_dir = tmp_path / "run"
    proc = _start(run_dir, {"SOFTPROMPT_TEST_STEP_DELAY": "0.5"})
    _wait_for(proc, lambda: bool(complete_checkpoints(run_dir / "checkpoints")))  # step 3 done
    time.sleep(0.7)  # into step 4 or 5: no checkpoint is due there
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM == 143, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    found = re.fullmatch(r"preempted by SIGTERM at step (\d+); checkpoint (\S+); rerun the same command to continue",
                         line)
    assert found, line
    step = int(found.group(1))
    assert 3 <= step < 12 and step % 3 != 0 and step != 8, step  # mid-epoch, not a scheduled save
    ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
    assert Path(found.group(2)) == ckpt and (ckpt / COMPLETE).is_file()
    assert checkpoints.read_state(ckpt)["step"] == step
    assert RunDir(run_dir).read_preempted() == "SIGTERM"
    assert not (run_dir / "metrics.json").exists()
    # W&B: a preemption record and the exit code 143, not a crash
    (first,) = read_runs(run_dir / "wandb")
    assert first.preempted and first.exit_code == 143
    assert _train_steps(first) == list(range(1, step + 1))

    # a requeued job reruns the same command: it resumes by itself
    result = run_cli([*FAULTY, f"hydra.run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{run_dir} was preempted (SIGTERM): resuming it" in result.stdout
    assert f"resuming from {ckpt} (step {step})" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _assert_same_result(metrics, ref)
    assert metrics[keys.TRAIN_RESUMED_FROM_STEP] == step
    assert RunDir(run_dir).read_preempted() is None  # finished: the marker is gone
    # two offline files, one W&B run: together they hold every step once
    runs = sorted(read_runs(run_dir / "wandb"), key=lambda r: r.path.parent.name)
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id == RunDir(run_dir).read_wandb_run_id()
    assert runs[1].exit_code == 0 and not runs[1].preempted
    assert _train_steps(runs[0]) + _train_steps(runs[1]) == list(range(1, 13))


def test_sigusr1_before_the_first_checkpoint_saves_one(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, {"SOFTPROMPT_TEST_STEP_DELAY": "0.5"})
    # the first train row in W&B's history is step 1; signal as soon as the run is training
    _wait_for(proc, lambda: any(run_dir.glob("wandb/offline-run-*/run-*.wandb")))
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1 == 138, stderr[-3000:]
    step = int(re.search(r"preempted by SIGUSR1 at step (\d+)", stderr).group(1))
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")][-1] == f"checkpoint-{step}"
    assert RunDir(run_dir).read_preempted() == "SIGUSR1"


def test_a_changed_command_in_a_preempted_dir_starts_over(tmp_path):
    from softprompt.train import resume

    run_dir = tmp_path / "run"
    RunDir(run_dir).start()
    cfg = compose(FAULTY)
    RunDir(run_dir).write_config(resolved(compose([*FAULTY, "seed=7"])))
    (run_dir / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-3" / COMPLETE).write_text("")
    RunDir(run_dir).write_preempted("SIGTERM")
    point = resume.prepare([cfg], [run_dir])  # seed differs: not the preempted run's command
    assert point.checkpoint is None and not (run_dir / "checkpoints").exists()
    assert RunDir(run_dir).read_preempted() is None


def test_watch_chains_to_the_handler_it_replaced(tmp_path):
    # submitit installs its own handler in the job process; ours runs first, then calls it
    calls = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with preemption.Watch(tmp_path) as watch:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert watch.requested() == signal.SIGUSR2 and calls == []
            assert RunDir(tmp_path).read_preempted() == "SIGUSR2"
            watch.chain(signal.SIGUSR2)
        assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is not watch._handle  # restored on exit
    finally:
        signal.signal(signal.SIGUSR2, before)


# --- a full disk ---------------------------------------------------------------------------------


def _cli_in_process(args: list[str], capsys) -> tuple[int, str]:
    """`python train.py ARGS` in this process (so monkeypatched faults reach it): status, stderr."""
    from softprompt import cli

    old = sys.argv
    # Hydra's logging set-up would keep a handler on this test's captured stderr after it closes;
    # a later in-process job then writes to a closed file and takes pytest's stderr with it
    sys.argv = ["train.py", *args, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main()
    finally:
        sys.argv = old
        # Hydra leaves its job's config behind: a later run() called from Python would read this
        # job's command line as its own (softprompt.track.wandb_run.hydra_overrides)
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().cfg = None
    return exited.value.code, capsys.readouterr().err


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_save = checkpoints.torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == "checkpoint-6" \
                and Path(f).name == checkpoints.PROMPTS_FILE:
            Path(f).write_bytes(b"\0" * 100)  # half a file, as a real full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save)
    status, stderr = _cli_in_process([*FAULTY, f"hydra.run.dir={run_dir}"], capsys)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in stderr
    found = NO_SPACE.match(lines[-1])
    assert found and found.group(1) == "checkpoint-6" and Path(found.group(2)) == run_dir / "checkpoints", lines[-1]
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["checkpoint-3"]
    assert not list(ckpts.glob(".staging-*")) and not (ckpts / "checkpoint-6").exists()
    assert checkpoints.load(ckpts / "checkpoint-3").state["step"] == 3
    assert not (run_dir / "metrics.json").exists()


def test_full_disk_writing_metrics_leaves_no_metrics_and_resume_finishes(tmp_path, monkeypatch, capsys,
                                                                          uninterrupted):
    _, ref = uninterrupted
    run_dir = tmp_path / "run"
    from softprompt.core import rundir

    real_write = rundir.atomic.write_text

    def write_text(path: Path, text: str) -> None:
        if path.name == RunDir.METRICS:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, text)

    monkeypatch.setattr(rundir.atomic, "write_text", write_text)
    status, stderr = _cli_in_process([*FAULTY, f"hydra.run.dir={run_dir}"], capsys)
    assert status == 2
    found = NO_SPACE.match(stderr.strip().splitlines()[-1])
    assert found and found.group(1) == "metrics.json" and Path(found.group(2)) == run_dir, stderr[-2000:]
    assert not (run_dir / "metrics.json").exists() and not list(run_dir.glob(".metrics.json*"))
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-9", "checkpoint-12"]

    monkeypatch.setattr(rundir.atomic, "write_text", real_write)  # space freed
    result = run_cli([*FAULTY, "training.resume=true", f"hydra.run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _assert_same_result(metrics, ref)
    assert metrics[keys.TRAIN_RESUMED_FROM_STEP] == 12


def test_disk_full_message_names_the_sizes(tmp_path):
    message = str(disk_full("x.json", tmp_path / "not" / "yet", 3 * 2**20, "then"))
    assert re.fullmatch(r"no space left on the device writing x.json in \S+/not/yet: it needs 3.0 MiB, "
                        r"[\d.]+ (KiB|MiB|GiB) free there; then", message), message
    assert str(disk_full("y", tmp_path, 700, "then")).split(": it needs ")[1].startswith("700 B, ")


# --- W&B offline records after SIGKILL -----------------------------------------------------------


def test_sigkill_and_resume_leave_one_wandb_run_in_two_files(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, {"SOFTPROMPT_TEST_STEP_DELAY": "0.5"})
    _wait_for(proc, lambda: bool(complete_checkpoints(run_dir / "checkpoints")))
    time.sleep(0.8)  # a step or two past checkpoint-3: those steps are logged, then lost
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    result = run_cli([*FAULTY, "training.resume=true", f"hydra.run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = RunDir(run_dir).read_wandb_run_id()
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[1] for d in dirs] == [run_id, run_id]
    killed, resumed = (read_runs(d)[0] for d in dirs)
    assert killed.exit_code is None and resumed.exit_code == 0  # the killed file has no exit record
    steps_killed, steps_resumed = _train_steps(killed), _train_steps(resumed)
    # the resumed file: every step after the checkpoint, once. The killed file: the steps wandb-core
    # had written when the kill came, a prefix (measured: 1-2 of the 3-4 logged; the rest of its
    # buffer died with it), so a step between that prefix and the checkpoint can be in neither file
    assert steps_resumed == list(range(4, 13))
    assert steps_killed == list(range(1, len(steps_killed) + 1))
    print(f"killed attempt's W&B file holds steps {steps_killed}")
    # steps in both files (logged after the checkpoint, before the kill) have the same values:
    # the resumed attempt recomputes them exactly
    again = {row[keys.TRAIN_STEP]: row[keys.TRAIN_LOSS] for row in resumed.history if keys.TRAIN_LOSS in row}
    for row in killed.history:
        if keys.TRAIN_LOSS in row and row[keys.TRAIN_STEP] > 3:
            assert row[keys.TRAIN_LOSS] == pytest.approx(again[row[keys.TRAIN_STEP]], rel=1e-5)
    # `wandb sync` takes both files of one run (--dry-run needs no service; wandb's CLI has it from
    # some release after our floor 0.19.10, whose `wandb sync` needs the service)
    wandb_cli = str(Path(sys.executable).parent / "wandb")
    usage = subprocess.run([wandb_cli, "sync", "--help"], env=child_env(), capture_output=True, text=True, timeout=120)
    if "--dry-run" in usage.stdout:
        sync = subprocess.run([wandb_cli, "sync", "--dry-run", str(run_dir / "wandb")],
                              env=child_env(), capture_output=True, text=True, timeout=120, check=False)
        assert sync.returncode == 0, sync.stderr
        assert "Would sync 2 run(s)" in sync.stdout + sync.stderr
