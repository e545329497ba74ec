"""Packed sweeps: the planner's groups, and the pack engine's exactness against standalone runs.

(a) each epoch budget of a shared trunk equals its standalone run (constant and wsd);
(b) a pack of jobs with different prompt lengths, learning rates and seeds equals each job alone
    (both ways through the base: turns and concat);
(c) per-job gradient clipping and schedules are independent (one job clipped, the other not).
Every job that leaves its lane is written from its own prompt, as it was at its last step, with
the generations a standalone run writes; one `generate` call decodes every prompt-tuning and
p-tuning job of a flush. Then the wiring: scripts/sweep.py and `train.py -m hydra/launcher=packed` leave one finished run
dir per grid point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose, run_cli

from softprompt.core import keys
from softprompt.core.rundir import RunDir

# 16 training rows, batch 8: 2 optimizer steps per epoch; W&B off where only numbers are compared
FAST = ["model=tiny-llama", "dataset=prompts_sample", "dataset.max_samples=20", "training.max_length=24",
        "eval.max_new_tokens=4",
        "eval.num_heldout_generations=0", "eval.train_perplexity_rows=4", "training.save_every_epoch=false",
        "training.learning_rate=0.3", "wandb.mode=disabled"]


def _prompt(run_dir: Path):
    from safetensors.torch import load_file

    return next(iter(load_file(str(RunDir(run_dir).adapter / "adapter_model.safetensors")).values()))


def _evals(history: list[dict]) -> list[dict]:
    """The per-epoch evaluations of a history.jsonl (which also holds every logged step)."""
    return [r for r in history if keys.EVAL_PERPLEXITY in r]


def _alone(tmp: Path, name: str, overrides: list[str]) -> tuple[Path, dict]:
    from softprompt.train.run import run

    out = tmp / f"alone-{name}"
    return out, run(compose(FAST + overrides), run_dir=out)


def _packed(tmp: Path, name: str, jobs: list[list[str]], forward: str = "turns", dirs: list[Path] | None = None):
    from softprompt.train.pack import run_pack
    from softprompt.train.planner import plan

    configs = [compose(FAST + o + [f"training.pack_forward={forward}"]) for o in jobs]
    dirs = dirs or [tmp / f"{name}-{i}" for i in range(len(jobs))]
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
    # wsd: the 4-step job decays over its last 2 steps (0-based steps 2 and 3), where the 6-step
    # trunk still runs at the peak rate: it branches off at step 2
    assert members[0].leave_at == (4 if schedule == "constant" else 2)
    for e, out, member in zip(budgets, dirs, members):
        alone_dir, alone = _alone(tmp_path, f"{schedule}-{e}", sched + [f"training.epochs={e}"])
        assert member.metrics[keys.EVAL_PERPLEXITY] == pytest.approx(alone[keys.EVAL_PERPLEXITY], rel=1e-5, abs=0)
        assert member.metrics[keys.TRAIN_LOSS] == pytest.approx(alone[keys.TRAIN_LOSS], rel=1e-5)
        assert member.metrics[keys.TRAIN_STEPS] == alone[keys.TRAIN_STEPS] == 2 * e
        torch.testing.assert_close(_prompt(out), _prompt(alone_dir), rtol=0, atol=1e-5)
        # the shorter job is generated and written after its trunk trained on: from its own prompt
        assert RunDir(out).read_generations() == RunDir(alone_dir).read_generations()
        mine, theirs = (_evals(RunDir(d).read_history()) for d in (out, alone_dir))
        assert [r[keys.EPOCH] for r in mine] == [r[keys.EPOCH] for r in theirs] == list(range(1, e + 1))
        assert [r[keys.EVAL_PERPLEXITY] for r in mine] == pytest.approx([r[keys.EVAL_PERPLEXITY] for r in theirs],
                                                                       rel=1e-5)
        config = RunDir(out).read_config()
        assert config["trunk"]["steps"] == [4, 6] and config["pack"]["jobs"] == 2
    # the longer job trained its first steps once for both
    assert members[1].metrics[keys.PACK_TRUNK_STEPS] == members[0].leave_at


# --- (b), (c): different prompts in one pack -------------------------------------------------------------

# Eager attention here: a concat step rounds differently from the job's own step (another batch
# shape; test_concat_step_equals_each_prompt_alone), and Adam, which divides each gradient element by
# its own magnitude, turns a last-bit difference on a near-zero element into up to lr per step. With
# SDPA's CPU kernel that left 3.4e-4 in perplexity and 0.03 in the prompt after 4 steps at lr 0.3
# (measured); with eager attention these batches came out equal to 1e-4. `turns` is bit-identical.
JOBS = [
    # never clipped (its gradient norm stays far below 1000), constant rate
    ["peft.num_virtual_tokens=2", "training.learning_rate=0.3", "seed=1", "training.lr_scheduler=constant",
     "training.max_grad_norm=1000", "peft.init=random"],
    # clipped hard, linear decay
    ["peft.num_virtual_tokens=5", "training.learning_rate=0.1", "seed=2", "training.lr_scheduler=linear",
     "training.max_grad_norm=0.001"],
]
COMMON = ["training.epochs=2", "training.logging_steps=1", "model.attn_implementation=eager"]


@pytest.fixture(scope="module")
def alone_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alone")
    return [_alone(tmp, str(i), o + COMMON) for i, o in enumerate(JOBS)]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packs")
    return {forward: _packed(tmp, forward, [o + COMMON for o in JOBS], forward=forward)
            for forward in ("turns", "concat")}


@pytest.mark.parametrize("forward", ["turns", "concat"])
def test_a_pack_of_different_prompts_equals_each_job_alone(packs, alone_runs, forward):
    import torch

    dirs, members, pack = packs[forward]
    assert len(pack.trunks) == 2  # different seeds and schedules: no shared trunk, one pack
    for out, member, (alone_dir, alone) in zip(dirs, members, alone_runs):
        assert member.metrics[keys.PACK_FORWARD] == forward
        assert member.metrics[keys.EVAL_PERPLEXITY] == pytest.approx(alone[keys.EVAL_PERPLEXITY], rel=1e-4)
        assert member.metrics[keys.TRAIN_LOSS] == pytest.approx(alone[keys.TRAIN_LOSS], rel=1e-4)
        assert member.metrics[keys.EVAL_BASE_PERPLEXITY] == alone[keys.EVAL_BASE_PERPLEXITY]
        torch.testing.assert_close(_prompt(out), _prompt(alone_dir), rtol=0, atol=1e-4)
        assert _prompt(out).shape[0] == member.cfg.peft.num_virtual_tokens
        assert RunDir(out).read_config()["pack"]["forward"] == forward
        if forward == "turns":  # bit-identical prompts (concat's differ by rounding): the same text, batched
            assert RunDir(out).read_generations() == RunDir(alone_dir).read_generations()
            assert RunDir(out).read_prompt_tokens() == RunDir(alone_dir).read_prompt_tokens()


def test_clipping_and_schedules_are_per_job(packs, alone_runs):
    _, members, _ = packs["turns"]
    logged = [[r for r in m.rows if keys.TRAIN_GRAD_NORM in r] for m in members]
    alone = [_evals(RunDir(d).read_history()) for d, _ in alone_runs]
    assert [len(rows) for rows in logged] == [4, 4]
    # the gradient norms (before clipping) lie between the two limits: job 1 is clipped, job 0 not
    assert all(0.001 < r[keys.TRAIN_GRAD_NORM] < 1000 for rows in logged for r in rows)
    # each job's own schedule: constant 0.3; linear from 0.1 to 0 over 4 steps
    assert [r[keys.TRAIN_LEARNING_RATE] for r in logged[0]] == pytest.approx([0.3] * 4)
    assert [r[keys.TRAIN_LEARNING_RATE] for r in logged[1]] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    # and a clipped neighbour changes nothing: both equal their standalone runs exactly (turns)
    for member, (_, metrics) in zip(members, alone_runs):
        assert member.metrics[keys.EVAL_PERPLEXITY] == metrics[keys.EVAL_PERPLEXITY]
    assert len(alone[0]) == len(alone[1]) == 2  # one held-out evaluation per epoch


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_concat_step_equals_each_prompt_alone(attention):
    """One forward of two prompts' rows (lengths 2 and 5) gives each prompt its own loss and
    gradient, as prompt_tuning_loss on its rows alone does, to float rounding (a batch of another
    shape rounds differently: ~1e-7 here, on gradients up to ~0.02)."""
    import torch

    from softprompt.models.fast_loss import prompt_tuning_loss
    from softprompt.models.loading import load_model
    from softprompt.train import pack, step
    from softprompt.train.batches import PaddingCollator

    configs = [compose(FAST + o + [f"model.attn_implementation={attention}"]) for o in JOBS]
    loaded = load_model(configs[0].model)
    collate = PaddingCollator(loaded.tokenizer.pad_token_id)
    ids = loaded.tokenizer(["I want you to act as a poet", "Hello", "Write a story about a cat and a dog"])["input_ids"]
    batches = [collate([{"input_ids": ids[0]}, {"input_ids": ids[1]}]), collate([{"input_ids": ids[2]}])]
    lanes = [pack.new_lane(c, loaded, None, [], 4) for c in configs]
    together = step.concat_losses(lanes, batches, loaded.model, torch.device("cpu"))
    torch.stack(together).sum().backward()
    grads = [lane.trainable()[0].grad.clone() for lane in lanes]
    for lane, batch, loss, grad in zip(lanes, batches, together, grads):
        lane.optimizer.zero_grad()
        alone = prompt_tuning_loss(lane.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        alone.backward()
        assert float(loss) == pytest.approx(float(alone), rel=1e-6)
        torch.testing.assert_close(grad, lane.trainable()[0].grad, rtol=0, atol=1e-6)


def test_auto_times_both_ways_and_moves_nothing():
    import torch

    from softprompt.models.loading import load_model
    from softprompt.train import pack
    from softprompt.train.placement import Placement

    configs = [compose(FAST + o) for o in JOBS]
    loaded = load_model(configs[0].model)
    data = pack.load_data(configs[0], loaded)
    lanes = [pack.new_lane(c, loaded, data, [pack.Member(0, c, Path("."), data, 4, 4)], 4) for c in configs]
    before = [[p.detach().clone() for p in lane.trainable()] for lane in lanes]
    choice, seconds = pack._calibrate(lanes, loaded, Placement(torch.device("cpu")), "fp32", log=lambda line: None)
    assert choice == min(seconds, key=seconds.get) and set(seconds) == {"turns", "concat"}
    assert all(s > 0 for s in seconds.values())
    for lane, params in zip(lanes, before):
        assert all(p.grad is None for p in lane.trainable())
        assert all(torch.equal(p, q) for p, q in zip(lane.trainable(), params))
        assert lane.optimizer.state_dict()["state"] == {}  # no optimizer step was taken


def test_auto_does_not_try_concat_over_too_many_rows(tmp_path, monkeypatch):
    """One concatenated forward keeps every lane's activations: above CALIBRATION_MAX_ROWS rows per
    step auto steps in turns without timing concat (15 SmolLM2 lanes of 8 rows took 16-19 GB)."""
    from softprompt.train import pack

    monkeypatch.setattr(pack, "CALIBRATION_MIN_STEPS", 1)
    monkeypatch.setattr(pack, "CALIBRATION_MAX_ROWS", 8)  # the tiny jobs' batch is 8 rows: 2 lanes are 16
    monkeypatch.setattr(pack, "_calibrate", lambda *a, **k: pytest.fail("concat was timed"))
    dirs, members, _ = _packed(tmp_path, "rows", [["peft.num_virtual_tokens=1"], ["peft.num_virtual_tokens=2"]],
                               forward="auto")
    assert [m.state for m in members] == ["finished", "finished"]
    for out in dirs:
        assert RunDir(out).read_config()["pack"]["forward"] == "turns"
        assert RunDir(out).read_config()["pack"]["calibration_s"] is None


@pytest.mark.parametrize("flush_rows", [64, 4])
def test_one_generate_call_serves_every_job_of_a_flush(tmp_path, monkeypatch, flush_rows):
    """Trained jobs wait until their eval prompts fill a decode batch (FLUSH_BATCH_ROWS) or the
    pack ends (a flush): the prompts of all its prompt-tuning and p-tuning jobs decode in one call,
    each row behind its own job's prompt as it was at that job's last step; prefix tuning generates
    inside its own write. A checkpoint in between holds the waiting jobs."""
    import torch

    from softprompt.models import generation
    from softprompt.train import pack as pack_module

    calls = []
    real = generation.generate

    def counting(model, tokenizer, prompts, settings, soft_prompt=None, **kwargs):
        calls.append({"rows": len(prompts), "soft_prompt": soft_prompt, "batch_size": kwargs.get("batch_size")})
        return real(model, tokenizer, prompts, settings, soft_prompt=soft_prompt, **kwargs)

    monkeypatch.setattr(generation, "generate", counting)
    monkeypatch.setattr(pack_module, "FLUSH_BATCH_ROWS", flush_rows)
    eval_batch = min(8, flush_rows)
    constant = ["training.lr_scheduler=constant", "peft.num_virtual_tokens=1", "training.save_every_epoch=true",
                "eval.num_heldout_generations=2", f"eval.batch_size={eval_batch}"]
    jobs = [constant + ["training.epochs=1"], constant + ["training.epochs=2"],
            constant + ["training.epochs=2", "peft=p_tuning", "peft.num_virtual_tokens=3"],
            constant + ["training.epochs=2", "peft=prefix_tuning", "peft.num_virtual_tokens=2"]]
    dirs, members, pack = _packed(tmp_path, "flush", jobs)
    assert [t.jobs for t in pack.trunks] == [[0, 1], [2], [3]] and all(m.state == "finished" for m in members)
    per_job = len(RunDir(dirs[0]).read_generations())
    assert per_job == 4  # 2 configured prompts, 2 held-out prefixes
    # 64 rows per batch: job 0 (1 epoch) waits through the epoch-1 checkpoint and joins jobs 1 and 2
    # at the end; 4 rows per batch: job 0's 4 prompts fill one, so it is written at epoch 1
    expected = [[0, 1, 2]] if flush_rows == 64 else [[0], [1, 2]]
    assert [c["rows"] for c in calls] == [per_job * len(flush) for flush in expected]
    assert [c["batch_size"] for c in calls] == [max(eval_batch, min(per_job * len(flush), flush_rows))
                                                for flush in expected]
    rows = [p for c in calls for p in c["soft_prompt"]]
    for k, i in enumerate(i for flush in expected for i in flush):
        mine = rows[k * per_job:(k + 1) * per_job]
        assert all(p is mine[0] for p in mine) and mine[0].shape[0] == (1, 1, 3)[i]
        if i < 2:  # prompt tuning: the generation prompt is the saved adapter's, byte for byte
            assert torch.equal(mine[0], _prompt(dirs[i]))
    # the 1-epoch job was written from its own prompt, not the trunk's after 2 epochs
    assert not torch.equal(_prompt(dirs[0]), _prompt(dirs[1]))
    for out in dirs:
        generations = RunDir(out).read_generations()
        assert len(generations) == per_job and all(g["tuned"] is not None for g in generations)


def test_a_diverging_job_fails_alone_and_the_pack_goes_on(tmp_path):
    # lr 1e38 turns the prompt into inf after one step: the next loss is NaN
    dirs, members, _ = _packed(tmp_path, "nan", [["training.learning_rate=1e38", "peft.init=random",
                                                  "training.epochs=2"],
                                                 ["training.epochs=2", "peft.num_virtual_tokens=2"]])
    assert [m.state for m in members] == ["failed", "finished"]
    assert members[0].error.startswith("training loss became nan at step 2")
    assert RunDir(dirs[0]).failed.is_file() and not RunDir(dirs[0]).finished
    assert RunDir(dirs[1]).read_metrics()[keys.TRAIN_STEPS] == 4


# a pack in a child process, so that a test can SIGKILL it: argv = JSON overrides per job, JSON run dirs
CHILD = """
import json, sys
from hydra import compose, initialize_config_dir
from softprompt.core.config import CONF_DIR, register_schema
from softprompt.train.pack import run_pack
from softprompt.train.planner import plan
register_schema()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    configs = [compose(config_name="config", overrides=o) for o in json.loads(sys.argv[1])]
(pack,) = plan(configs)
run_pack(configs, json.loads(sys.argv[2]), [t.jobs for t in pack.trunks])
"""


def test_sigkill_during_a_pack_then_resume_continues_every_job_exactly(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import torch
    from conftest import child_env

    from softprompt.train import checkpoints

    # a constant trunk (2, 3 epochs) and a wsd job of another prompt length: 6 steps, checkpoints per
    # epoch; the kill comes after the epoch-2 checkpoint, which holds job 0 trained but not written
    # (its 2 eval prompts do not fill a decode batch: it waits for the pack's end)
    jobs = [["training.lr_scheduler=constant", "training.epochs=2"],
            ["training.lr_scheduler=constant", "training.epochs=3"],
            ["training.lr_scheduler=wsd", "training.epochs=3", "peft.num_virtual_tokens=2"]]
    jobs = [j + ["training.save_every_epoch=true"] for j in jobs]
    ref_dirs, reference, _ = _packed(tmp_path / "ref", "ref", jobs)

    dirs = [tmp_path / "killed" / f"job-{i}" for i in range(len(jobs))]
    root = RunDir(dirs[0]).checkpoints
    overrides = [FAST + j + ["training.pack_forward=turns"] for j in jobs]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(overrides), json.dumps([str(d) for d in dirs])],
                            env=child_env({"SOFTPROMPT_TEST_STEP_DELAY": "1.5"}), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while (latest := checkpoints.latest_checkpoint(root)) is None or latest.name != "checkpoint-4":
        assert proc.poll() is None, f"the pack ended before the kill point: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not any(RunDir(d).finished for d in dirs)
    assert [w["member"] for w in checkpoints.read_state(root / "checkpoint-4")["waiting"]] == [0]

    _, resumed, _ = _packed(tmp_path, "", [j + ["training.resume=true"] for j in jobs], dirs=dirs)
    # job 0 is written from the checkpoint as it was trained before the kill; the others continued
    assert [m.metrics[keys.TRAIN_RESUMED_FROM_STEP] for m in resumed] == [4, 4, 4]
    for out, mine, ref_dir, theirs in zip(dirs, resumed, ref_dirs, reference):
        assert mine.metrics[keys.EVAL_PERPLEXITY] == pytest.approx(theirs.metrics[keys.EVAL_PERPLEXITY], rel=1e-5)
        assert mine.metrics[keys.TRAIN_LOSS] == pytest.approx(theirs.metrics[keys.TRAIN_LOSS], rel=1e-5)
        torch.testing.assert_close(_prompt(out), _prompt(ref_dir), rtol=0, atol=1e-5)
        # every step and evaluation once: the checkpoint's rows, then the resumed attempt's
        mine_rows, ref_rows = RunDir(out).read_history(), RunDir(ref_dir).read_history()
        assert [sorted(r) for r in mine_rows] == [sorted(r) for r in ref_rows]
        for row, ref_row in zip(mine_rows, ref_rows):
            assert row == pytest.approx(ref_row, rel=1e-5)


# --- wiring: scripts/sweep.py and the packed Hydra launcher ----------------------------------------------


def _finished_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if RunDir(p).finished)


def test_sweep_trains_a_grid_as_one_pack_with_a_run_dir_per_point(tmp_path):
    from softprompt.experiments.sweep import SWEEP_STATE, parse_sweep, run_sweep

    sweep = parse_sweep({"method": "grid", "parameters": {"peft.num_virtual_tokens": {"values": [1, 2]},
                                                          "training.epochs": {"values": [1, 2]}}}, name="tiny")
    lines = []
    sweep_dir, jobs = run_sweep(sweep, FAST + ["training.lr_scheduler=constant", "wandb.mode=offline"],
                                root=tmp_path, log=lines.append)
    assert [j.state for j in jobs] == ["finished"] * 4
    assert _finished_dirs(sweep_dir) == [sweep_dir / str(i) for i in range(4)]
    assert sum("pack of jobs 0, 1, 2, 3" in line for line in lines) == 1
    for job in jobs:
        config = RunDir(job.run_dir).read_config()
        assert config["training"]["epochs"] == job.values["training.epochs"]
        assert config["pack"]["jobs"] == 4 and len(config["trunk"]["steps"]) == 2
        # pack_forward=auto: 4 steps are too few to pay for timing both ways; such a pack steps in turns
        assert config["pack"]["forward"] == job.metrics[keys.PACK_FORWARD] == "turns"
        assert config["pack"]["calibration_s"] is None
        assert job.metrics[keys.TRAIN_STEPS] == 2 * job.values["training.epochs"]
        assert list((job.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # its own W&B run
    state = json.loads((sweep_dir / SWEEP_STATE).read_text())
    assert [j["state"] for j in state["jobs"]] == ["finished"] * 4
    split = state["jobs"][0]["pack"]  # the pack's wall time, split into its parts
    assert split["jobs"] == [0, 1, 2, 3] and split["train_s"] > 0 and split["eval_s"] > 0
    assert split["total_s"] == pytest.approx(split["setup_s"] + split["train_s"] + split["eval_s"], abs=0.05)


def test_packed_hydra_launcher_gives_each_job_its_hydra_dir(tmp_path):
    result = run_cli(["-m", "hydra/launcher=packed", *FAST, "training.lr_scheduler=wsd", "training.epochs=1,2",
                      f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 jobs, 1 trunk (1 shared; lengths 1,2)" in result.stdout + result.stderr
    assert _finished_dirs(tmp_path) == [tmp_path / "0", tmp_path / "1"]
    for i, steps in ((0, 2), (1, 4)):
        run = RunDir(tmp_path / str(i))
        assert run.hydra_config.is_file() and run.read_metrics()[keys.TRAIN_STEPS] == steps
        assert run.read_config()["trunk"]["steps"] == [2, 4]


def test_a_packed_multirun_stopped_by_sigterm_exits_143_and_the_rerun_equals_the_whole_pack(tmp_path):
    """Preemption of a pack under hydra/launcher=packed: a checkpoint after the signal's step, the
    single run's line and exit status (143), and a rerun of the same command that continues it."""
    import re
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, child_env

    from softprompt.train.checkpoints import complete_checkpoints

    # one trunk of 2 and 3 epochs (2 steps each): checkpoints at steps 2 and 4
    command = ["-m", "hydra/launcher=packed", *FAST, "training.lr_scheduler=constant", "training.epochs=2,3",
               "training.save_every_epoch=true", "training.pack_forward=turns"]
    reference = run_cli([*command, f"hydra.sweep.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-2000:]

    sweep = tmp_path / "killed"
    args = [sys.executable, str(ROOT / "train.py"), *command, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, env=child_env({"SOFTPROMPT_TEST_STEP_DELAY": "1.0"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not complete_checkpoints(RunDir(sweep / "0").checkpoints):  # step 2 done
        assert proc.poll() is None, f"the pack ended before the signal: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "signal point not reached in time"
        time.sleep(0.05)
    time.sleep(0.5)  # into step 3: no checkpoint is due there
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    found = re.fullmatch(r"preempted by SIGTERM at step (\d+); checkpoint (\S+); rerun the same command to continue",
                         stderr.strip().splitlines()[-1])
    assert found, stderr[-2000:]
    step = int(found.group(1))
    assert step == 3, step  # the step the signal came in: the checkpoint is newer than the signal
    assert Path(found.group(2)) == RunDir(sweep / "0").checkpoints / "checkpoint-3"
    assert RunDir(sweep / "0").read_preempted() == "SIGTERM"
    assert not any(RunDir(sweep / str(i)).finished for i in (0, 1))

    rerun = run_cli([*command, f"hydra.sweep.dir={sweep}"])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from {RunDir(sweep / '0').checkpoints / 'checkpoint-3'} (step 3)" in rerun.stdout
    for i in (0, 1):
        mine, ref = RunDir(sweep / str(i)).read_metrics(), RunDir(tmp_path / "ref" / str(i)).read_metrics()
        assert mine[keys.TRAIN_RESUMED_FROM_STEP] == 3 and mine[keys.TRAIN_STEPS] == ref[keys.TRAIN_STEPS]
        for key in (keys.EVAL_PERPLEXITY, keys.EVAL_LOSS, keys.TRAIN_LOSS):
            assert mine[key] == pytest.approx(ref[key], rel=1e-6), (i, key)
        assert RunDir(sweep / str(i)).read_generations() == RunDir(tmp_path / "ref" / str(i)).read_generations()
    assert RunDir(sweep / "0").read_preempted() is None


def test_a_stop_that_wandb_asks_for_one_run_ends_that_job_only(tmp_path, monkeypatch):
    """W&B stops one run (its web UI's stop button, a sweep controller's early termination): the
    run's own `stop_fn` flags its job, which is written as a result at the next step boundary with
    `sweep/terminated_at_epoch`; the other job of the pack trains to its end, and nothing exits."""
    from softprompt.track.records import read_run
    from softprompt.train import pack

    stops = {}
    real_start = pack.Tracker.start

    def start(cfg, run_dir, config, name, mode, run_id=None, stop_fn=None):
        stops[Path(run_dir).name] = stop_fn
        return real_start(cfg, run_dir, config, name, mode=mode, run_id=run_id, stop_fn=stop_fn)

    monkeypatch.setattr(pack.Tracker, "start", start)
    configs = [compose(FAST + ["training.epochs=2", f"peft.num_virtual_tokens={n}", "wandb.mode=offline",
                               "training.pack_forward=turns"]) for n in (1, 2)]
    dirs = [tmp_path / "job-0", tmp_path / "job-1"]

    def press_stop(step: int, tokens: int) -> None:
        if step == 1:  # W&B calls it from its own thread some time after the request
            stops["job-1"]()

    members = pack.run_pack(configs, dirs, [[0], [1]], on_step=press_stop)
    assert [m.state for m in members] == ["finished", "finished"]
    full, stopped = (RunDir(d).read_metrics() for d in dirs)
    assert full[keys.TRAIN_STEPS] == 4 and keys.SWEEP_TERMINATED_AT_EPOCH not in full
    assert stopped[keys.TRAIN_STEPS] == 1 and stopped[keys.SWEEP_TERMINATED_AT_EPOCH] == 0.5  # 2 steps an epoch
    assert stopped[keys.TRAIN_EPOCHS] == 0.5 and RunDir(dirs[1]).adapter.is_dir()
    # its last evaluation is of the prompt it was written with (a job ending mid-epoch gets its own)
    evals = [r for r in RunDir(dirs[1]).read_history() if keys.EVAL_PERPLEXITY in r]
    assert [r[keys.TRAIN_STEP] for r in evals] == [1]
    assert evals[-1][keys.EVAL_PERPLEXITY] == pytest.approx(stopped[keys.EVAL_PERPLEXITY], rel=1e-9)
    run = read_run(dirs[1])
    assert run.exit_code == 0 and run.summary[keys.SWEEP_TERMINATED_AT_EPOCH] == 0.5
