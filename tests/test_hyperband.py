"""Hyperband early termination (softprompt.train.halving): the jobs that `sweeps.stop_runs` names
are the jobs stopped, at that epoch's end; a stopped job is a complete result; decisions are shared
through the sweep dir and survive SIGKILL and resume; bad blocks fail before the first job.

The decision logic is tested on synthetic histories (no training); one tiny packed multirun,
killed after the first decision and resumed, serves the tests of the engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, child_env, run_cli

from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir
from softprompt.train import halving

SEED_GRID = {"method": "grid", "metric": {"name": keys.EVAL_PERPLEXITY, "goal": "minimize"},
             "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 3},
             "parameters": {"peft.num_virtual_tokens": {"values": [1, 4, 8, 16, 32]},
                            "training.epochs": {"values": [2, 4, 6]}}}
BASE = 100.0


def _curve(rank: int, epochs: int) -> list[float]:
    """A lane's history: the base value (iteration 0), then one value per epoch; rank 0 is the best."""
    return [BASE] + [BASE - (5 - rank) * e for e in range(1, epochs + 1)]


def _simulate(config: dict, base_is_iteration_0: bool) -> tuple[set[str], int]:
    """The seed grid's 5 lanes x budgets 2, 4, 6 in lock-step, decided by `halving.decide` at each
    epoch's end: the jobs stopped and the lane-epochs trained."""
    jobs = {f"vt{rank}-ep{budget}": (rank, budget) for rank in range(5) for budget in (2, 4, 6)}
    ends = dict.fromkeys(jobs)  # the epoch each job ended at
    stopped: set[str] = set()
    for epoch in range(1, 7):
        records = {}
        for name, (rank, budget) in jobs.items():
            last = min(epoch, ends[name] or epoch)
            history = _curve(rank, last)[(0 if base_is_iteration_0 else 1):]
            state = "running" if ends[name] is None and budget > epoch else "finished"
            records[name] = {"state": state, "history": history}
        for name in halving.decide(config, records):
            ends[name] = epoch
            stopped.add(name)
        for name, (_, budget) in jobs.items():
            if ends[name] is None and budget == epoch:
                ends[name] = epoch
    lane_epochs = sum(max(ends[f"vt{rank}-ep{b}"] for b in (2, 4, 6)) for rank in range(5))
    return stopped, lane_epochs


def test_seed_grid_decisions_and_the_floor_of_lane_steps():
    # the base evaluation as iteration 0 (the choice softprompt makes): band 2 judges after epoch 2;
    # the 3 worse lanes' jobs of 4 and 6 epochs stop there, the 2 best lanes train to 6 epochs
    stopped, lane_epochs = _simulate(SEED_GRID, base_is_iteration_0=True)
    assert stopped == {f"vt{r}-ep{b}" for r in (2, 3, 4) for b in (4, 6)}
    assert lane_epochs == 3 * 2 + 2 * 6 == 18  # 60 % of the full grid's 30
    # without it, band 2 is the third epoch: 70 %, the floor the issue's arithmetic gives
    stopped, lane_epochs = _simulate(SEED_GRID, base_is_iteration_0=False)
    assert stopped == {f"vt{r}-ep{b}" for r in (2, 3, 4) for b in (4, 6)}
    assert lane_epochs == 3 * 3 + 2 * 6 == 21


def test_decide_is_stop_runs_and_history_goes_through_its_alias():
    from softprompt.experiments.sweep import _sweeps

    sweeps = _sweeps()
    records = {"a": {"state": "finished", "history": [10, 9, 6]}, "b": {"state": "running", "history": [10, 10, 10]},
               "c": {"state": "running", "history": [10, 8, 7]}, "d": {"state": "running", "history": [10, 7]}}
    config = dict(SEED_GRID, early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2})
    # band 1: values 9, 10, 8, 7 -> threshold sorted[2] = 9; b (min 10) stops, c and d pass
    assert halving.decide(config, records) == ["b"]
    # `history=` is not SweepRun's field alias: given so, stop_runs sees no history and stops nothing
    dropped = [sweeps.SweepRun(name=n, state=sweeps.RunState.running, history=[{keys.EVAL_PERPLEXITY: v} for v in r["history"]])
               for n, r in records.items()]
    assert sweeps.stop_runs(config, dropped) == []


def test_decisions_are_shared_through_the_folder_and_kept_on_resume(tmp_path):
    config = dict(SEED_GRID, early_terminate={"type": "hyperband", "min_iter": 1, "eta": 3})
    first, second = halving.Halving(config, tmp_path), halving.Halving(config, tmp_path)  # two packs' processes
    # alone, x is its own threshold (sorted[int(1/3 * 1)]): nothing stops
    assert first.epoch_end(1, {"x": ("running", [10, 9])}) == []
    # the other pack sees x: band 1 values 9, 5, 7 -> threshold 7; y and z pass, x is not its to stop
    assert second.epoch_end(1, {"y": ("running", [10, 5]), "z": ("running", [10, 7])}) == []
    # x's next epoch: its best (8) is still above the threshold that y and z set
    assert first.epoch_end(2, {"x": ("running", [10, 9, 8])}) == ["x"]
    assert first.stopped_at("x") == 2 and json.loads((tmp_path / "x.json").read_text())["state"] == "stopped"
    # a resumed pack at the same epoch stops x again, whatever the others logged since (y's 50 would
    # make the threshold 9, which x's 8 passes)
    (tmp_path / "y.json").write_text(json.dumps({"state": "running", "history": [10, 50], "stopped_at": None}))
    assert "x" not in halving.decide(config, {n: r for n, r in first.records().items() if n != "x"}
                                     | {"x": {"state": "running", "history": [10, 9, 8]}})
    assert first.epoch_end(2, {"x": ("running", [10, 9, 8])}) == ["x"]


@pytest.mark.parametrize("block, overrides, says", [
    ({"type": "hyperband", "min_iter": 3, "eta": 3}, {"epochs": 3}, "min_iter 3 is not below the epoch budget (3"),
    ({"type": "hyperband", "max_iter": 9, "s": 2}, {"epochs": 6}, "max_iter 9 exceeds the epoch budget (6"),
    ({"type": "hyperband", "min_iter": 1}, {"per_epoch": False}, "eval.per_epoch=false"),
    ({"type": "hyperband", "min_iter": 1}, {"metric": "eval/accuracy"}, "eval/accuracy is not"),
    ({"type": "hyperband", "min_iter": 1}, {"max_steps": 4}, "training.max_steps=4"),
])
def test_bad_blocks_are_user_errors(block, overrides, says):
    config = dict(SEED_GRID, early_terminate=block,
                  metric={"name": overrides.get("metric", keys.EVAL_PERPLEXITY), "goal": "minimize"})
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        halving.check(config, overrides.get("epochs", 6), overrides.get("per_epoch", True),
                      overrides.get("max_steps"), "sweep s")


def test_sweep_file_beyond_the_epoch_budget_is_one_error_line_before_any_job(tmp_path, capsys):
    from test_sweeps import _script

    bad = tmp_path / "hb.yaml"
    bad.write_text("method: grid\nmetric: {name: eval/perplexity, goal: minimize}\n"
                   "early_terminate: {type: hyperband, min_iter: 6, eta: 3}\n"
                   "parameters:\n  training.epochs: {values: [2, 4, 6]}\n")
    with pytest.raises(SystemExit) as exit_info:
        _script("sweep")([str(bad), "--root", str(tmp_path), "model=tiny-llama"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: sweep hb: early_terminate min_iter 6 is not below the epoch budget (6 epochs): "
                       "no job could be stopped before its end; lower min_iter or raise training.epochs")
    assert not list(tmp_path.glob("sweep-*"))


def test_hyperband_sweep_file_is_lr_by_tokens():
    import yaml

    from softprompt.experiments.sweep import check_halving, load_sweep

    sweep = load_sweep(ROOT / "sweeps" / "lr_x_tokens_hyperband.yaml")
    assert len(sweep.parameters["training.learning_rate"]["values"]) >= 3
    assert sweep.parameters["peft.num_virtual_tokens"]["values"] == [1, 4, 8, 16, 32]
    assert sweep.early_terminate == {"type": "hyperband", "min_iter": 2, "eta": 3}
    check_halving(sweep, [])
    assert yaml.safe_load((ROOT / "sweeps" / "lr_x_tokens_hyperband.yaml").read_text())["metric"]["name"] \
        == keys.EVAL_PERPLEXITY


# --- one tiny packed multirun: 3 learning rates, 3 epochs, hyperband min_iter 1 (1 step an epoch) -----

LRS = ["0.3", "0.01", "0.00001"]
MULTIRUN = ["-m", "hydra/launcher=packed", "model=tiny-llama", "dataset=prompts_sample", "dataset.max_samples=10",
            "eval.max_new_tokens=4", "eval.num_heldout_generations=1", "wandb.mode=offline",
            f"training.learning_rate={','.join(LRS)}", "training.epochs=3",
            "hydra.launcher.early_terminate={type:hyperband,min_iter:1,eta:3}"]
CONFIG = {"method": "grid", "metric": {"name": keys.EVAL_PERPLEXITY, "goal": "minimize"},
          "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 3}, "parameters": {"seed": {"value": 0}}}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The multirun killed (SIGKILL) once the first decision is made and the second epoch's
    checkpoint written, then resumed: (sweep dir, the decision records before the kill, the
    resumed attempt's output)."""
    sweep_dir = tmp_path_factory.mktemp("hb") / "multirun"
    env = child_env({"SOFTPROMPT_TEST_STEP_DELAY": "0.5"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *MULTIRUN, f"hydra.sweep.dir={sweep_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (sweep_dir / "0" / RunDir.CHECKPOINTS / "checkpoint-2").is_dir():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    before = {p.stem: json.loads(p.read_text()) for p in (sweep_dir / halving.FOLDER).glob("*.json")}
    assert not any(RunDir(sweep_dir / str(i)).finished for i in range(3))  # nothing was written yet
    resumed = run_cli([*MULTIRUN, "training.resume=true", f"hydra.sweep.dir={sweep_dir}"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return sweep_dir, before, resumed.stdout + resumed.stderr


def test_the_jobs_stop_runs_names_are_exactly_the_ones_stopped(killed_and_resumed):
    sweep_dir, before, _ = killed_and_resumed
    after = {p.stem: json.loads(p.read_text()) for p in (sweep_dir / halving.FOLDER).glob("*.json")}
    # what stop_runs names given every job's history at the end of epoch 1 (base value, epoch 1)
    at_epoch_1 = {name: {"state": "running", "history": r["history"][:2]} for name, r in after.items()}
    named = halving.decide(CONFIG, at_epoch_1)
    assert len(named) == 1  # 3 jobs, eta 3: the threshold is the middle value; the worst one stops
    stopped = sorted(name for name in after if after[name]["stopped_at"] is not None)
    assert stopped == named == sorted(n for n in before if before[n]["stopped_at"] == 1)
    metrics = {d.name: RunDir(d).read_metrics() for d in sorted(sweep_dir.glob("[0-9]"))}
    assert sorted(n for n, m in metrics.items() if keys.SWEEP_TERMINATED_AT_EPOCH in m) == stopped
    for name, m in metrics.items():
        assert m[keys.TRAIN_STEPS] == (1 if name in stopped else 3)  # 8 rows, batch 8: a step an epoch
        assert len(after[name]["history"]) == (2 if name in stopped else 4)
        # the history is the base model's value, then the job's own per-epoch evaluations
        evals = [r[keys.EVAL_PERPLEXITY] for r in RunDir(sweep_dir / name).read_history() if keys.EVAL_PERPLEXITY in r]
        assert after[name]["history"] == pytest.approx([m[keys.EVAL_BASE_PERPLEXITY], *evals])
    # the worst at epoch 1 is the one stopped
    assert max(at_epoch_1, key=lambda n: at_epoch_1[n]["history"][1]) == stopped[0]


def test_a_stopped_job_is_a_complete_result(killed_and_resumed):
    from softprompt.track.records import read_runs

    sweep_dir, before, _ = killed_and_resumed
    (name,) = [n for n, r in before.items() if r["stopped_at"] is not None]
    run = RunDir(sweep_dir / name)
    assert run.finished and not run.failed.exists()
    metrics = run.read_metrics()
    assert metrics[keys.SWEEP_TERMINATED_AT_EPOCH] == 1.0 and metrics[keys.TRAIN_EPOCHS] == 1.0
    assert metrics[keys.EVAL_PERPLEXITY] == pytest.approx(before[name]["history"][1])  # its epoch-1 prompt
    for path in ("adapter", RunDir.CONFIG, "generations.jsonl", "history.jsonl", "prompt_tokens.jsonl"):
        assert (run.path / path).exists(), path
    finished = next(d for d in sweep_dir.glob("[0-9]") if d.name != name)
    assert len((run.path / "generations.jsonl").read_text().splitlines()) \
        == len((finished / "generations.jsonl").read_text().splitlines()) > 0
    # one W&B run, continued by the resumed attempt (offline: a second dir with the same id), which wrote it
    runs = sorted(read_runs(run.path / RunDir.WANDB), key=lambda r: r.path.parent.name)
    assert len(runs) == 2 and len({r.path.parent.name.rsplit("-", 1)[-1] for r in runs}) == 1
    assert runs[-1].finished and runs[-1].user_summary()[keys.SWEEP_TERMINATED_AT_EPOCH] == 1.0
    assert runs[-1].user_summary()[keys.EVAL_PERPLEXITY] == pytest.approx(metrics[keys.EVAL_PERPLEXITY])


def test_resume_after_sigkill_keeps_decisions_and_does_not_retrain(killed_and_resumed):
    sweep_dir, before, output = killed_and_resumed
    (name,) = [n for n, r in before.items() if r["stopped_at"] is not None]
    # resumed from the epoch-2 checkpoint: nothing decided again, the stopped job written from it
    assert "hyperband stopped it" not in output
    metrics = RunDir(sweep_dir / name).read_metrics()
    assert metrics[keys.TRAIN_RESUMED_FROM_STEP] == 2 and metrics[keys.TRAIN_STEPS] == 1
    (pack,) = json.loads((sweep_dir / "packs.json").read_text())["packs"]
    assert [r["state"] for r in pack["results"].values()] == ["finished"] * 3  # a stop is a result


# --- online: a controller's stop (stop_fn) against a SIGTERM, simulated offline ------------------------


@pytest.mark.parametrize("controller_stops", [True, False], ids=["controller-stop", "preemption"])
def test_sigterm_is_a_stop_only_when_the_controller_stopped_the_run(tmp_path, monkeypatch, controller_stops):
    from conftest import compose
    from test_sweeps import FAST

    from softprompt.train import pack, preemption

    stops = []
    original = pack._stopper
    monkeypatch.setattr(pack, "_stopper", lambda m: stops.append(original(m)) or stops[-1])
    monkeypatch.setenv("WANDB_SWEEP_ID", "simulated")  # `wandb agent`'s run: a SIGTERM waits for the stop

    def agent(step: int, _tokens: int) -> None:  # after the first step: what `wandb agent` does on a stop
        if step == 1:
            if controller_stops:
                stops[0]()  # the SDK's report of the controller's stop (W&B's thread, here at once)
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = compose(["model=tiny-llama", *FAST, "training.epochs=2"])
    out = tmp_path / "run"
    if controller_stops:
        (member,) = pack.run_pack([cfg], [out], [[0]], on_step=agent)
        assert member.state == "finished" and member.stopped
        metrics = RunDir(out).read_metrics()
        assert metrics[keys.SWEEP_TERMINATED_AT_EPOCH] == 1.0 and metrics[keys.TRAIN_STEPS] == 1
        assert RunDir(out).read_preempted() is None  # a rerun has nothing to resume
    else:
        monkeypatch.setattr(pack, "STOP_GRACE_S", 0.3)
        with pytest.raises(preemption.Preempted) as info:
            pack.run_pack([cfg], [out], [[0]], on_step=agent)
        assert info.value.exit_status == 143 and info.value.step == 1 and info.value.checkpoint is not None
        assert RunDir(out).read_preempted() == "SIGTERM" and not RunDir(out).finished


def test_report_lists_stopped_runs_apart(killed_and_resumed):
    from softprompt.experiments.report import build_report, report_html, report_markdown

    sweep_dir, before, _ = killed_and_resumed
    (name,) = [n for n, r in before.items() if r["stopped_at"] is not None]
    report = build_report([sweep_dir])
    assert sorted(r.name for r in report.runs) == sorted({"0", "1", "2"} - {name})
    assert [r.name for r in report.stopped] == [name]
    assert report.runs[report.best].metrics.get(keys.SWEEP_TERMINATED_AT_EPOCH) is None
    header, rows = report.stopped_rows()
    assert rows[0][0] == name and rows[0][header.index("stopped after epoch")] == "1"
    markdown = report_markdown(report, [])
    runs_table = markdown.split("## Runs")[1].split("## Stopped early")[0]
    row_names = lambda text: [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert name not in row_names(runs_table) and name in row_names(markdown.split("## Stopped early")[1])
    assert "<h2>Stopped early</h2>" in report_html(report, [])


def test_bench_halving_best_point_leaves_stopped_jobs_out():
    from softprompt.experiments.sweep_bench import bench_sweep, best_point

    def job(ppl, state="finished", stopped=None):
        return {"state": state, "metrics": {keys.EVAL_PERPLEXITY: ppl} | (
            {keys.SWEEP_TERMINATED_AT_EPOCH: stopped} if stopped else {})}

    jobs = {'{"lr": 0.3}': job(5.0), '{"lr": 0.1}': job(4.0, stopped=2.0), '{"lr": 0.03}': job(3.0, state="failed"),
            '{"lr": 0.01}': job(6.0)}
    assert best_point(jobs) == {"lr": 0.3}
    with pytest.raises(UserError, match="has no early_terminate block"):
        bench_sweep(str(ROOT / "sweeps" / "tokens_x_epochs.yaml"), [], halving=True)


def test_a_failed_job_is_no_longer_running_but_its_values_count(tmp_path):
    config = dict(SEED_GRID, early_terminate={"type": "hyperband", "min_iter": 1, "eta": 3})
    hb = halving.Halving(config, tmp_path)
    assert hb.epoch_end(1, {"f": ("running", [10, 11]), "g": ("running", [10, 5])}) == ["f"]  # sorted[0] = 5
    hb.record("f", "running", [10, 11])  # as if not decided yet
    hb.failed("f")
    assert hb.records()["f"] == {"state": "failed", "history": [10, 11], "stopped_at": None}
    # band 1 values 11, 5, 6 -> threshold 6: f's value counts, but a failed job is not stopped
    h = {"h": {"state": "running", "history": [10, 6]}}
    assert halving.decide(config, hb.records() | h) == []
    assert halving.decide(config, hb.records() | h | {"f": {"state": "running", "history": [10, 11]}}) == ["f"]
