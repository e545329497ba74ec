"""A run killed with SIGKILL and resumed with training.resume=true ends exactly where an
uninterrupted run ends, without redoing finished steps; a kill while a checkpoint is being
written leaves nothing that breaks the resume.

Kill timing uses the test-only hooks of softprompt.train.checkpoints (SOFTPROMPT_TEST_STEP_DELAY,
SOFTPROMPT_TEST_SAVE_DELAY): they slow the tiny run so the kill lands where the test wants it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, child_env, run_cli

from softprompt.core import keys
from softprompt.train.checkpoints import COMPLETE, complete_checkpoints

# 12 steps over 1.5 epochs (58 training rows, batch 8): checkpoints at steps 3, 6, 8 (epoch end), 9, 12
RESUMABLE = [o for o in TINY if not o.startswith("training.max_steps")] + [
    "training.max_steps=12", "training.save_steps=3", "training.epochs=2"]
COMPARED = (keys.EVAL_PERPLEXITY, keys.EVAL_LOSS, keys.TRAIN_LOSS, keys.TRAIN_EPOCHS, keys.TRAIN_STEPS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli([*RESUMABLE, f"hydra.run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _start(run_dir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RESUMABLE, f"hydra.run.dir={run_dir}"],
                            env=child_env(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _resume_and_compare(run_dir: Path, uninterrupted_metrics: dict, expected_from: int) -> dict:
    wandb_id = (run_dir / "wandb_run_id").read_text().strip()
    result = run_cli([*RESUMABLE, "training.resume=true", f"hydra.run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{expected_from}'} (step {expected_from})" \
        in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in COMPARED:
        assert metrics[key] == pytest.approx(uninterrupted_metrics[key], rel=1e-5, abs=0), key
    # it continued: fewer steps trained in the resumed attempt than in a fresh run
    assert metrics[keys.TRAIN_RESUMED_FROM_STEP] == expected_from
    assert uninterrupted_metrics[keys.TRAIN_RESUMED_FROM_STEP] == 0
    assert metrics[keys.TRAIN_STEPS] - metrics[keys.TRAIN_RESUMED_FROM_STEP] < uninterrupted_metrics[keys.TRAIN_STEPS]
    # the same W&B run continues (offline: a second offline-run dir with the same id)
    assert (run_dir / "wandb_run_id").read_text().strip() == wandb_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2
    # only committed checkpoints remain, the last two
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["checkpoint-12", "checkpoint-9"], names
    return metrics


def test_sigkill_after_first_checkpoint_then_resume(tmp_path, uninterrupted):
    ref_dir, ref = uninterrupted
    run_dir = tmp_path / "run"
    proc = _start(run_dir, {"SOFTPROMPT_TEST_STEP_DELAY": "0.4"})
    _wait_for(proc, lambda: bool(complete_checkpoints(run_dir / "checkpoints")))
    _kill(proc)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()
    first = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert first.name == "checkpoint-3"
    metrics = _resume_and_compare(run_dir, ref, expected_from=3)
    # the per-epoch eval of the epoch before the kill came back from the checkpoint
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    ref_history = [json.loads(line) for line in (ref_dir / "history.jsonl").read_text().splitlines()]
    assert [h[keys.TRAIN_STEP] for h in history if keys.EVAL_PERPLEXITY in h] == [
        h[keys.TRAIN_STEP] for h in ref_history if keys.EVAL_PERPLEXITY in h] == [8, 12]
    # history.jsonl holds every logged step and evaluation once, the checkpoint's and the resumed attempt's
    assert [sorted(row) for row in history] == [sorted(row) for row in ref_history]
    for row, ref_row in zip(history, ref_history):
        assert row == pytest.approx(ref_row, rel=1e-5)


def test_sigkill_while_writing_a_checkpoint(tmp_path, uninterrupted):
    _, ref = uninterrupted
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    # checkpoint-3 commits at once; from step 6 on each save waits 120 s before its commit
    proc = _start(run_dir, {"SOFTPROMPT_TEST_STEP_DELAY": "0.2", "SOFTPROMPT_TEST_SAVE_DELAY": "120@6"})

    def half_written() -> bool:
        return any((p / "checkpoint-6" / "trainer_state.json").is_file() for p in ckpts.glob(".staging-*"))

    _wait_for(proc, half_written)
    _kill(proc)
    staged = next(ckpts.glob(".staging-*")) / "checkpoint-6"
    assert (staged / "optimizer.pt").is_file() and not (staged / COMPLETE).exists()
    assert [p.name for p in complete_checkpoints(ckpts)] == ["checkpoint-3"]
    assert not (ckpts / "checkpoint-6").exists()
    _resume_and_compare(run_dir, ref, expected_from=3)
    assert not list(ckpts.glob(".staging-*"))


def test_resume_with_changed_config_is_refused(tmp_path, uninterrupted):
    ref_dir, ref = uninterrupted
    # a changed setting cannot continue a checkpoint: one error line, exit 2
    result = run_cli([*RESUMABLE, "peft.num_virtual_tokens=8", "training.resume=true", f"hydra.run.dir={ref_dir}"],
                     timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: training.resume=true")
    assert "peft.num_virtual_tokens" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((ref_dir / "metrics.json").read_text()) == ref  # the finished run is untouched
