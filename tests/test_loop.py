"""The engine (softprompt.train.pack) in-process on a tiny model: a single run is a pack of one
job and leaves the same files and metrics keys as a job of a larger pack; a resume from a
mid-epoch checkpoint continues exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose

from softprompt.core import keys
from softprompt.core.rundir import RunDir

ONE = [o for o in TINY if not o.startswith("training.max_steps")] + [
    "peft.init=random", "training.batch_size=4", "training.logging_steps=1", "dataset.max_samples=20",
    "eval.num_heldout_generations=0", "wandb.mode=disabled"]


def _prompt(run_dir) -> torch.Tensor:
    from safetensors.torch import load_file

    return next(iter(load_file(str(RunDir(run_dir).adapter / "adapter_model.safetensors")).values()))


def test_a_run_and_a_packed_job_leave_the_same_keys_and_files(tmp_path):
    from softprompt.train.pack import run_pack
    from softprompt.train.run import run

    single = run(compose(ONE + ["training.max_steps=4"]), run_dir=tmp_path / "single")
    configs = [compose(ONE + [f"training.max_steps={n}", "training.lr_scheduler=constant"]) for n in (2, 4)]
    members = run_pack(configs, [tmp_path / "p0", tmp_path / "p1"], [[0, 1]])
    assert [m.state for m in members] == ["finished", "finished"]
    assert single[keys.PACK_JOBS] == 1 and members[1].metrics[keys.PACK_JOBS] == 2
    assert set(single) == set(members[0].metrics) == set(members[1].metrics)
    for name in ("single", "p0", "p1"):
        assert sorted(p.name for p in (tmp_path / name).iterdir() if p.name != "checkpoints") == [
            "adapter", "config.json", "generations.jsonl", "history.jsonl", "metrics.json", "prompt_tokens.jsonl"]
    # the time/* keys add up to the job's total, in a pack as alone
    for metrics in (single, members[0].metrics, members[1].metrics):
        parts = sum(metrics[k] for k in keys.TIME_PHASES)
        assert parts == pytest.approx(metrics[keys.TIME_TOTAL_S], abs=1e-6)
        assert metrics[keys.TIME_TRAIN_S] > 0 and metrics[keys.TIME_TUNED_EVAL_S] > 0
    # history.jsonl: every logged training step (loss, rate, gradient norm) and each evaluation
    rows = RunDir(tmp_path / "single").read_history()
    steps = [r[keys.TRAIN_STEP] for r in rows if keys.TRAIN_LOSS in r]
    assert steps == [1, 2, 3, 4]
    assert all({keys.TRAIN_LEARNING_RATE, keys.TRAIN_GRAD_NORM} <= set(r) for r in rows if keys.TRAIN_LOSS in r)
    assert [r[keys.TRAIN_STEP] for r in rows if keys.EVAL_PERPLEXITY in r] == [4]


def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path):
    from softprompt.core.errors import UserError  # noqa: F401 (the engine's errors are UserErrors)
    from softprompt.train.checkpoints import complete_checkpoints, read_state
    from softprompt.train.pack import run_pack

    over = ONE + ["training.max_steps=7", "training.save_steps=2"]  # 16 rows, batch 4: 4 steps an epoch
    (full,) = run_pack([compose(over)], [tmp_path / "full"], [[0]])
    # saves at 2, 4 (epoch end), 6 and 7 (the last step, before the job is written); the newest two are kept
    assert [p.name for p in complete_checkpoints(RunDir(tmp_path / "full").checkpoints)] == [
        "checkpoint-6", "checkpoint-7"]

    class Killed(Exception):
        pass

    def kill_at_3(step: int, tokens: int) -> None:
        if step == 3:
            raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        run_pack([compose(over)], [part], [[0]], on_step=kill_at_3)
    (ckpt,) = complete_checkpoints(RunDir(part).checkpoints)
    assert ckpt.name == "checkpoint-2" and read_state(ckpt)["format"] == "softprompt-pack/1"
    (resumed,) = run_pack([compose(over + ["training.resume=true"])], [part], [[0]])
    assert resumed.metrics[keys.TRAIN_RESUMED_FROM_STEP] == 2 and resumed.metrics[keys.TRAIN_STEPS] == 7
    assert resumed.metrics[keys.TRAIN_EPOCHS] == full.metrics[keys.TRAIN_EPOCHS] == 1.75
    torch.testing.assert_close(_prompt(part), _prompt(tmp_path / "full"), rtol=1e-6, atol=1e-7)
    for key in (keys.TRAIN_LOSS, keys.EVAL_PERPLEXITY):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], rel=1e-6)
    # history.jsonl holds every step once: the checkpoint's rows, then the resumed attempt's
    steps = [r[keys.TRAIN_STEP] for r in RunDir(part).read_history() if keys.TRAIN_LOSS in r]
    assert steps == list(range(1, 8))


def test_an_old_format_checkpoint_is_one_error(tmp_path):
    import json

    from softprompt.core.errors import UserError
    from softprompt.train.pack import run_pack

    ckpt = RunDir(tmp_path).checkpoints / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3, "epoch": 0, "batches_done": 3, "jobs": []}))
    (ckpt / "COMPLETE").write_text("")
    with pytest.raises(UserError, match=r"checkpoint-3 is a checkpoint in the single-run format \(global_step/"):
        run_pack([compose(ONE + ["training.resume=true"])], [tmp_path], [[0]])
