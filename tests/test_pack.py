"""Packed sweeps: the planner's groups, and the pack engine's exactness against standalone runs.

(a) each epoch budget of a shared trunk equals its standalone run (constant and wsd);
(b) a pack of jobs with different prompt lengths, learning rates and seeds equals each job alone
    (both ways through the base: turns and concat);
(c) per-job gradient clipping and schedules are independent (one job clipped, the other not).
Then the wiring: scripts/sweep.py and `train.py -m hydra/launcher=packed` leave one finished run
dir per grid point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, compose, run_cli

from softprompt.core import keys

# 16 training rows, batch 8: 2 optimizer steps per epoch; W&B off where only numbers are compared
FAST = ["model=tiny-llama", "dataset=prompts_sample", "dataset.max_samples=20", "eval.max_new_tokens=4",
        "eval.num_heldout_generations=0", "eval.train_perplexity_rows=4", "training.save_every_epoch=false",
        "training.learning_rate=0.3", "wandb.mode=disabled"]


def _prompt(run_dir: Path):
    from safetensors.torch import load_file

    return next(iter(load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).values()))


def _alone(tmp: Path, name: str, overrides: list[str]) -> tuple[Path, dict]:
    from softprompt.train.run import run

    out = tmp / f"alone-{name}"
    return out, run(compose(FAST + overrides), run_dir=out)


def _packed(tmp: Path, name: str, jobs: list[list[str]], forward: str = "turns"):
    from softprompt.train.pack import run_pack
    from softprompt.train.planner import plan

    configs = [compose(FAST + o + [f"training.pack_forward={forward}"]) for o in jobs]
    dirs = [tmp / f"{name}-{i}" for i in range(len(jobs))]
    (pack,) = plan(configs)
    members = run_pack(configs, dirs, [t.jobs for t in pack.trunks])
    return dirs, members, pack


# --- the planner -------------------------------------------------------------------------------------


def test_planner_groups_by_shared_settings_and_makes_trunks_of_lengths():
    from softprompt.train.planner import plan

    def job(*o):
        return compose(FAST + list(o))

    configs = [job("training.lr_scheduler=constant", "training.epochs=4", "peft.num_virtual_tokens=1"),
               job("training.lr_scheduler=constant", "training.epochs=2", "peft.num_virtual_tokens=1"),
               job("training.lr_scheduler=constant", "training.epochs=2", "peft.num_virtual_tokens=4"),
               job("training.lr_scheduler=linear", "training.epochs=2"),
               job("training.lr_scheduler=linear", "training.epochs=4"),
               job("training.lr_scheduler=constant", "training.epochs=2", "training.max_length=32"),
               job("peft=lora", "training.epochs=2"),
               job("training.lr_scheduler=wsd", "training.epochs=2", "seed=7"),
               job("training.lr_scheduler=wsd", "training.epochs=6", "seed=7")]
    packs = plan(configs)
    shapes = [[(t.jobs, t.shared) for t in p.trunks] for p in packs]
    # one pack for everything that shares model, data, batch and eval settings; max_length and LoRA apart
    assert shapes == [
        [([1, 0], True), ([2], False), ([3], False), ([4], False), ([7, 8], True)],
        [([5], False)],
        [([6], False)],
    ]
    assert [len(p) for p in plan(configs, share=False)] == [1] * 9
    # at most 2 jobs x 8 rows per pack: the 2-budget trunk stays whole, the rest is split
    capped = plan(configs[:4], max_rows=16)
    assert [[t.jobs for t in p.trunks] for p in capped] == [[[1, 0]], [[2], [3]]]


# --- (a) epoch trunks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "wsd"])
def test_each_budget_of_a_trunk_equals_its_standalone_run(tmp_path, schedule):
    import torch

    sched = [f"training.lr_scheduler={schedule}", "training.warmup_steps=1", "training.decay_fraction=0.5"]
    budgets = [2, 3]
    dirs, members, pack = _packed(tmp_path, schedule, [sched + [f"training.epochs={e}"] for e in budgets])
    assert [t.jobs for t in pack.trunks] == [[0, 1]] and all(m.state == "finished" for m in members)
    # wsd: the 4-step job decays over its last 2 steps (rate factors 1, 0.5): its rate first differs
    # from the 6-step trunk's at step 3 (0-based), where it branches off
    assert members[0].leave_at == (4 if schedule == "constant" else 3)
    for e, out, member in zip(budgets, dirs, members):
        alone_dir, alone = _alone(tmp_path, f"{schedule}-{e}", sched + [f"training.epochs={e}"])
        assert member.metrics[keys.EVAL_PERPLEXITY] == pytest.approx(alone[keys.EVAL_PERPLEXITY], rel=1e-5, abs=0)
        assert member.metrics[keys.TRAIN_LOSS] == pytest.approx(alone[keys.TRAIN_LOSS], rel=1e-5)
        assert member.metrics[keys.TRAIN_STEPS] == alone[keys.TRAIN_STEPS] == 2 * e
        torch.testing.assert_close(_prompt(out), _prompt(alone_dir), rtol=0, atol=1e-5)
        mine = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
        theirs = [json.loads(x) for x in (alone_dir / "history.jsonl").read_text().splitlines()]
        assert [r[keys.EPOCH] for r in mine] == [r[keys.EPOCH] for r in theirs] == list(range(1, e + 1))
        assert [r[keys.EVAL_PERPLEXITY] for r in mine] == pytest.approx([r[keys.EVAL_PERPLEXITY] for r in theirs],
                                                                       rel=1e-5)
        config = json.loads((out / "config.json").read_text())
        assert config["trunk"]["steps"] == [4, 6] and config["pack"]["jobs"] == 2
    # the longer job trained its first steps once for both
    assert members[1].metrics[keys.PACK_TRUNK_STEPS] == members[0].leave_at


# --- (b), (c): different prompts in one pack -------------------------------------------------------------

JOBS = [
    # clipped hard, constant rate
    ["peft.num_virtual_tokens=2", "training.learning_rate=0.3", "seed=1", "training.lr_scheduler=constant",
     "training.max_grad_norm=0.001", "training.epochs=2", "peft.init=random"],
    # never clipped, linear decay
    ["peft.num_virtual_tokens=5", "training.learning_rate=0.1", "seed=2", "training.lr_scheduler=linear",
     "training.max_grad_norm=1000", "training.epochs=2"],
]


@pytest.fixture(scope="module")
def alone_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alone")
    return [_alone(tmp, str(i), o) for i, o in enumerate(JOBS)]


@pytest.mark.parametrize("forward", ["turns", "concat"])
def test_a_pack_of_different_prompts_equals_each_job_alone(tmp_path, alone_runs, forward):
    import torch

    dirs, members, pack = _packed(tmp_path, forward, JOBS, forward=forward)
    assert len(pack.trunks) == 2  # different seeds and schedules: no shared trunk, one pack
    for out, member, (alone_dir, alone) in zip(dirs, members, alone_runs):
        assert member.metrics[keys.PACK_FORWARD] == forward
        assert member.metrics[keys.EVAL_PERPLEXITY] == pytest.approx(alone[keys.EVAL_PERPLEXITY], rel=1e-4)
        assert member.metrics[keys.TRAIN_LOSS] == pytest.approx(alone[keys.TRAIN_LOSS], rel=1e-4)
        assert member.metrics[keys.EVAL_BASE_PERPLEXITY] == alone[keys.EVAL_BASE_PERPLEXITY]
        torch.testing.assert_close(_prompt(out), _prompt(alone_dir), rtol=0, atol=1e-4)
        assert _prompt(out).shape[0] == member.cfg.peft.num_virtual_tokens
        assert json.loads((out / "generations.jsonl").read_text().splitlines()[0]).keys() >= {"base", "tuned"}


def test_clipping_and_schedules_are_per_job(tmp_path):
    dirs, members, _ = _packed(tmp_path, "clip", JOBS, forward="concat")
    first = [[r for r in m.rows if keys.TRAIN_GRAD_NORM in r][0] for m in members]
    # both prompts see gradients far above 0.001 and far below 1000: only the first is clipped,
    # so its prompt moved by at most lr x steps (Adam's first steps move by ~lr whatever the norm)
    assert first[0][keys.TRAIN_GRAD_NORM] > 0.001 and first[1][keys.TRAIN_GRAD_NORM] < 1000
    lrs = [[r[keys.TRAIN_LEARNING_RATE] for r in m.rows if keys.TRAIN_LEARNING_RATE in r] for m in members]
    assert lrs[0] == [0.3, 0.3]  # constant: logged at steps 1 and 5? (4 steps, logging every 5: step 1 only)
