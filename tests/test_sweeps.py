"""Sweeps: every sweep file composes; the offline sweep runner and a Hydra multirun each give one
finished run and one W&B run per job; the report compares them; the SLURM launcher composes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose, run_cli

from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir

SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
# settings that keep a tiny job to a few optimizer steps: 8 training rows = 1 step per epoch
FAST = ["dataset=prompts_sample", "dataset.max_samples=10", "eval.max_new_tokens=4",
        "eval.num_heldout_generations=0", "training.save_every_epoch=false", "wandb.mode=offline"]


def test_there_are_the_three_kinds_of_sweep():
    methods = {yaml.safe_load(f.read_text())["method"] for f in SWEEP_FILES}
    assert {"grid", "bayes"} <= methods and len(SWEEP_FILES) >= 3


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_parameters_exist_and_every_value_composes(path):
    from omegaconf import OmegaConf

    from softprompt.core.config import validate
    from softprompt.experiments.sweep import job_overrides, load_sweep, probe_values

    sweep = load_sweep(path)
    raw = yaml.safe_load(path.read_text())
    # what `wandb agent` runs: the program with Hydra overrides (key=value, no leading dashes)
    assert raw["program"] == "train.py"
    assert raw["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    assert raw["metric"] == {"name": keys.EVAL_PERPLEXITY, "goal": "minimize"}
    # each value among the other parameters' first values, as the sweep runs it (one value alone can
    # need another: transfer.yaml's peft.init=from_run needs its peft.init_from)
    firsts = {k: probe_values(v)[0] for k, v in sweep.parameters.items()}
    for key, spec in sweep.parameters.items():
        for value in probe_values(spec):
            cfg = compose(job_overrides(firsts | {key: value}))
            validate(cfg)
            if "." in key:  # a config key, not a config group choice such as model=...
                assert OmegaConf.select(cfg, key) == pytest.approx(value) if isinstance(value, float) \
                    else OmegaConf.select(cfg, key) == value, (key, value)


def test_seed_grid_is_tokens_by_epochs():
    from softprompt.experiments.sweep import load_sweep

    grid = load_sweep(ROOT / "sweeps" / "tokens_x_epochs.yaml")
    assert grid.parameters[keys.CFG_NUM_VIRTUAL_TOKENS]["values"] == [1, 4, 8, 16, 32]
    assert grid.parameters[keys.CFG_EPOCHS]["values"] == [2, 4, 6]


def test_grid_order_bayes_feedback_and_run_cap():
    from softprompt.experiments.sweep import (
        Job,
        job_overrides,
        parse_sweep,
        planned_count,
        propose,
    )

    grid = parse_sweep({"method": "grid", "parameters": {"a": {"values": [1, 2]}, "b": {"values": ["x", "y"]}}}, "g")
    done: list[Job] = []
    while (values := propose(grid, done)) is not None:
        done.append(Job(index=len(done), values=values, run_dir=Path("."), state="finished"))
    assert [j.values for j in done] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]

    bayes = parse_sweep({"method": "bayes", "run_cap": 3, "metric": {"name": "m", "goal": "minimize"},
                         "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-1}}}, "b")
    assert planned_count(bayes, None) == 3 and planned_count(bayes, 2) == 2
    finished = [Job(index=i, values={"lr": lr}, run_dir=Path("."), state="finished", metrics={"m": m})
                for i, (lr, m) in enumerate([(1e-3, 5.0), (1e-2, 2.0), (1e-1, 9.0)])]
    proposal = propose(bayes, finished)["lr"]
    assert type(proposal) is float and 1e-3 <= proposal <= 1e-1
    (override,) = job_overrides({keys.CFG_LEARNING_RATE: proposal})
    assert compose([override]).training.learning_rate == pytest.approx(proposal)  # a float, not np.float64(...)
    with pytest.raises(UserError, match="never ends"):
        planned_count(parse_sweep({"method": "random", "parameters": {"a": {"min": 0.0, "max": 1.0}}}, "r"), None)


def test_unknown_parameter_and_bad_files_are_one_error_line(tmp_path, capsys):
    from softprompt.experiments.sweep import check_parameters, parse_sweep

    typo = parse_sweep({"method": "grid", "parameters": {"peft.num_virtual_tokenz": {"values": [1, 2]}}}, "typo")
    with pytest.raises(UserError, match="num_virtual_tokenz"):
        check_parameters(typo, [])
    out_of_range = parse_sweep({"method": "grid", "parameters": {"peft.num_virtual_tokens": {"values": [4, 0]}}}, "r")
    with pytest.raises(UserError, match="num_virtual_tokens must be >= 1"):
        check_parameters(out_of_range, [])

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters:\n  training.epochs:\n    valuez: [1]\n")
    result = run_cli([str(bad)], script="scripts/sweep.py", timeout=120)  # the real command line once
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: sweep file "), \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    sweep_main = _script("sweep")
    for args, says in (([str(tmp_path / "missing.yaml")], "does not exist"),
                       ([str(ROOT / "sweeps" / "lr_init_bayes.yaml"), "--count", "1", "training.nope=3"], "nope")):
        with pytest.raises(SystemExit) as exit_info:
            sweep_main([*args, "--root", str(tmp_path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith("error: ") and says in err[-1], err
    assert not list(tmp_path.glob("sweep-*"))  # nothing ran


def _script(name: str):
    """A script's main(), run in this process (saves the imports a subprocess would pay again)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _wandb_run_ids(run_dirs: list[Path]) -> set[str]:
    ids = set()
    for d in run_dirs:
        runs = list((d / RunDir.WANDB).glob("offline-run-*"))
        assert len(runs) == 1, (d, runs)
        ids.add(runs[0].name.rsplit("-", 1)[-1])
    return ids


def test_sweep_script_runs_two_offline_jobs(tmp_path):
    # the runner runs every job in this one process, as it does from the command line
    assert _script("sweep")([str(ROOT / "sweeps" / "smoke.yaml"), "--count", "2", "model=tiny-bloom",
                             "dataset=prompts_sample", "--root", str(tmp_path)]) == 0
    (sweep_dir,) = tmp_path.glob("sweep-smoke-*")
    run_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in run_dirs] == ["0", "1"]
    metrics = [json.loads((d / RunDir.METRICS).read_text()) for d in run_dirs]
    assert len(_wandb_run_ids(run_dirs)) == 2  # one W&B run per job
    state = json.loads((sweep_dir / "sweep.json").read_text())
    # the grid's first two points, in the order W&B's controller proposes them
    assert [j["values"][keys.CFG_NUM_VIRTUAL_TOKENS] for j in state["jobs"]] == [1, 1]
    assert [j["values"][keys.CFG_EPOCHS] for j in state["jobs"]] == [1, 2]
    assert [j["state"] for j in state["jobs"]] == ["finished", "finished"]
    assert [m[keys.TRAIN_STEPS] for m in metrics] == [1, 2]  # 8 rows, batch 8: 1 step per epoch
    configs = [json.loads((d / RunDir.CONFIG).read_text()) for d in run_dirs]
    assert {c["model"]["name"] for c in configs} == {"tiny-bloom"}  # the command line beat the file
    assert {c["wandb"]["group"] for c in configs} == {state["sweep"]}  # grouped by sweep
    assert [j["metric"] for j in state["jobs"]] == pytest.approx([m[keys.EVAL_PERPLEXITY] for m in metrics])


def test_multirun_2x2_gives_four_runs_and_a_report(tmp_path, capsys):
    sweep_dir = tmp_path / "multirun"
    result = run_cli(["-m", "model=tiny-llama", *FAST, "peft.num_virtual_tokens=1,2", "training.epochs=1,2",
                      f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [sweep_dir / str(i) for i in range(4)]
    assert all((d / RunDir.METRICS).is_file() for d in run_dirs)
    assert len(_wandb_run_ids(run_dirs)) == 4
    configs = [json.loads((d / RunDir.CONFIG).read_text()) for d in run_dirs]
    assert [(c["peft"]["num_virtual_tokens"], c["training"]["epochs"]) for c in configs] == \
        [(1, 1), (1, 2), (2, 1), (2, 2)]
    (sweep_dir / "4").mkdir()  # a job that never finished: listed, not reported
    (sweep_dir / "4" / RunDir.CONFIG).write_text("{}")

    assert _script("report")([str(sweep_dir)]) == 0
    stdout = capsys.readouterr().out
    report = (sweep_dir / "report.md").read_text()
    runs_section = report[report.index("## Runs"):].split("\n## ", 1)[0]
    header = next(line for line in runs_section.splitlines() if line.startswith("| run"))
    assert header.split(" | ")[1:3] == [keys.CFG_NUM_VIRTUAL_TOKENS, keys.CFG_EPOCHS]
    tokens_section = report[report.index("## The learned prompt, read as tokens"):]
    rows = [line for line in runs_section.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == 4 and sum("**best**" in r for r in rows) == 1
    ppl = [json.loads((d / RunDir.METRICS).read_text())[keys.EVAL_PERPLEXITY] for d in run_dirs]
    assert f"{min(ppl):.4g}" in next(r for r in rows if "**best**" in r)
    assert f"skipped {sweep_dir.resolve() / '4'}" in stdout and header in stdout
    # the best run's learned prompt, read as tokens: one row per virtual token
    best = min(range(4), key=lambda i: ppl[i])
    prompt_rows = [line for line in tokens_section.splitlines() if line.startswith("| ")][2:]
    assert f"Run `{best}` (best run)" in tokens_section
    assert len(prompt_rows) == configs[best]["peft"]["num_virtual_tokens"]
    for png in ("ppl_vs_virtual_tokens.png", "eval_curves.png", "train_loss.png", "pareto.png"):
        assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one seed per point: no grid-point table, and the base-vs-tuned generations of the best run
    assert "## Grid points" not in report and f"Run `{best}`, from its `generations.jsonl`" in report
    assert (sweep_dir / "report.html").read_text().count('src="data:image/png;base64,') == 4


def test_report_picks_up_gen_metrics_and_needs_finished_runs(tmp_path):
    from softprompt.experiments.report import build_report

    for i, (tokens, ppl) in enumerate([(1, 30.0), (8, 20.0)]):
        d = tmp_path / str(i)
        d.mkdir()
        (d / RunDir.CONFIG).write_text(json.dumps({"peft": {"num_virtual_tokens": tokens}, "training": {"epochs": 2},
                                                   "data": {"fingerprint": f"x{i}"},
                                                   "provenance": {"git": {"commit": f"c{i}"}}}))
        (d / RunDir.METRICS).write_text(json.dumps({keys.EVAL_PERPLEXITY: ppl, keys.EVAL_BASE_PERPLEXITY: 40.0,
                                                    "gen/rougeL": 0.1 * (i + 1)}))
    report = build_report([tmp_path])
    assert report.swept == [keys.CFG_NUM_VIRTUAL_TOKENS]  # data.*, provenance.* differ too: not settings
    assert report.gen_keys == ["gen/rougeL"] and report.best == 1
    header, rows = report.rows()
    assert rows[1][header.index("tuned/base")] == "0.5" and rows[1][header.index("gen/rougeL")] == "0.2"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no finished runs"):
        build_report([empty])
