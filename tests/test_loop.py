"""The training loop (softprompt.train.trainer) in-process on a tiny model: a set of jobs, each
with its own prompt, optimizer, schedule, clipping and data order, trains exactly as each job
alone; a resume from a mid-epoch checkpoint continues exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose

from softprompt.core import keys


def _job(name: str, *overrides: str):
    from softprompt.data.loading import load_splits, tokenize
    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap
    from softprompt.train.trainer import job_from_config

    cfg = compose(TINY + ["peft.init=random", "training.batch_size=4", "training.logging_steps=1", *overrides])
    torch.manual_seed(cfg.seed)  # the random prompt init: the same for a job together or alone
    loaded = load_model(cfg.model)
    model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    rows = tokenize(load_splits(cfg.dataset, cfg.seed).train[:16], loaded.tokenizer, 48, "tiny")
    logged: list[dict] = []
    return cfg, job_from_config(cfg, model, name=name, log=logged.append), rows, loaded.tokenizer.pad_token_id, logged


def _prompt(job) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in job.trainable().items()}


def _train(jobs, rows, pad_id, cfg, **kwargs):
    from softprompt.train.trainer import LoopSettings, train

    return train(jobs, rows, pad_id, LoopSettings.from_config(cfg, "fp32"), **kwargs)


SETTINGS = {
    "a": ("seed=42", "training.learning_rate=0.3", "training.max_grad_norm=1e9", "peft.num_virtual_tokens=4",
          "training.lr_scheduler=linear"),
    "b": ("seed=7", "training.learning_rate=0.05", "training.max_grad_norm=1e-4", "training.lr_scheduler=wsd",
          "training.warmup_steps=1", "peft.num_virtual_tokens=2"),
}


def test_a_set_of_jobs_trains_each_as_alone():
    cfg, a, rows, pad_id, a_log = _job("a", *SETTINGS["a"], "training.max_steps=6")
    _, b, _, _, b_log = _job("b", *SETTINGS["b"], "training.max_steps=6")
    together = _train([a, b], rows, pad_id, cfg)
    assert together.steps == 6 and together.epoch == 1.5  # 16 rows, batch 4: 4 steps per epoch
    alone = {}
    for name in ("a", "b"):
        cfg1, job, _, _, log = _job(name, *SETTINGS[name], "training.max_steps=6")
        _train([job], rows, pad_id, cfg1)
        alone[name] = (job, log)
    for job, (ref, ref_log), log in ((a, alone["a"], a_log), (b, alone["b"], b_log)):
        for name, value in _prompt(job).items():
            assert torch.equal(value, _prompt(ref)[name]), (job.name, name)
        assert job.loss_sum == ref.loss_sum and log == ref_log
    # each job its own schedule and clipping: b warms up from 0 and is clipped hard, a is neither
    assert [row[keys.TRAIN_LEARNING_RATE] for row in a_log] == pytest.approx([0.3 * (6 - s) / 6 for s in range(6)])
    assert [row[keys.TRAIN_LEARNING_RATE] for row in b_log] == pytest.approx([0.0, 0.05, 0.05, 0.05, 0.05, 0.025])
    assert all(row[keys.TRAIN_GRAD_NORM] > 1e-3 for row in a_log + b_log)  # the norm before clipping
    assert [row[keys.TRAIN_STEP] for row in b_log] == [1, 2, 3, 4, 5, 6]
    assert [row[keys.EPOCH] for row in b_log] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path):
    from softprompt.train.checkpoints import complete_checkpoints
    from softprompt.train.trainer import EpochEval

    over = ("training.max_steps=7", "training.save_steps=2")
    cfg, job, rows, pad_id, _ = _job("a", *over)
    full = _train([job], rows, pad_id, cfg, checkpoint_dir=tmp_path / "full", epoch_eval=EpochEval(rows[:4], 4))
    # saves at 2, 4 (epoch end), 6, 7 (last); the newest two are kept
    assert [p.name for p in complete_checkpoints(tmp_path / "full")] == ["checkpoint-6", "checkpoint-7"]
    assert [row[keys.TRAIN_STEP] for row in job.history] == [4, 7]

    # the same run, killed in step 3 (mid-epoch 0), then continued in a fresh model
    class Killed(Exception):
        pass

    def kill_at_3(step: int, tokens: int) -> None:
        if step == 3:
            raise Killed

    cfg2, first, _, _, _ = _job("a", *over)
    with pytest.raises(Killed):
        _train([first], rows, pad_id, cfg2, checkpoint_dir=tmp_path / "part", on_step=kill_at_3)
    assert [p.name for p in complete_checkpoints(tmp_path / "part")] == ["checkpoint-2"]
    cfg3, resumed, _, _, log = _job("a", *over)
    result = _train([resumed], rows, pad_id, cfg3, checkpoint_dir=tmp_path / "part", epoch_eval=EpochEval(rows[:4], 4),
                    resume_from=tmp_path / "part" / "checkpoint-2")
    assert (result.resumed_from_step, result.steps, result.epoch) == (2, 7, full.epoch) == (2, 7, 1.75)
    assert [row[keys.TRAIN_STEP] for row in log if keys.TRAIN_LOSS in row] == [3, 4, 5, 6, 7]
    for name, value in _prompt(resumed).items():
        torch.testing.assert_close(value, _prompt(job)[name], rtol=1e-6, atol=1e-7)
    assert resumed.loss_sum == pytest.approx(job.loss_sum, rel=1e-6)
    assert [r[keys.EVAL_PERPLEXITY] for r in resumed.history] == pytest.approx([r[keys.EVAL_PERPLEXITY]
                                                                                 for r in job.history], rel=1e-6)
