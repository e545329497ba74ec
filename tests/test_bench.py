"""scripts/bench.py on a tiny model: both paths train, and the JSON holds real, sane numbers."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def test_bench_defaults_to_the_bundled_sample():
    from softprompt.experiments.bench import parse_args

    assert parse_args([]).data == "bundled"
    assert parse_args(["--data", "path/to/awesome-chatgpt-prompts.csv"]).data == "path/to/awesome-chatgpt-prompts.csv"


def test_bench_run_split_adds_up_to_the_wall_time(tmp_path):
    """`--run-split`: the `make run` job in a child process, its wall time in parts that add up."""
    from softprompt.experiments.bench import SPLIT

    out = tmp_path / "split.json"
    proc = run_cli(["--run-split", "--set", "model=tiny-llama", "--set", "training.max_steps=2",
                    "--set", "eval.max_new_tokens=4", "--out", str(out)], script="scripts/bench.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    split = printed["run_split"]
    assert split["command"] == ("python train.py experiment=offline model=tiny-llama training.max_steps=2 "
                                "eval.max_new_tokens=4")
    assert all(split[k] >= 0 for k in SPLIT), split
    assert abs(sum(split[k] for k in SPLIT) - split["wall_s"]) < 1e-6
    # the imports before run() are part of start-up; training holds the loop
    assert 0 < split["startup_before_run_s"] < split["startup_s"] < split["time_to_first_step_process_s"]
    assert split["train_s"] >= split["train_runtime_s"] > 0
    assert split["wall_over_train"] == split["wall_s"] / split["train_runtime_s"]
    # and a table for people on stderr
    assert "tuned_eval" in proc.stderr and "x training" in proc.stderr


def test_split_of_run_arithmetic():
    from softprompt.core import keys
    from softprompt.experiments.bench import SPLIT, split_of_run

    metrics = {keys.TRAIN_TIME_TO_FIRST_STEP_PROCESS_S: 9.0, keys.TRAIN_TIME_TO_FIRST_STEP_S: 5.0,
               keys.TIME_STARTUP_S: 2.0, keys.TIME_BASE_EVAL_S: 0.5, keys.TIME_TRAIN_S: 30.0,
               keys.TIME_TUNED_EVAL_S: 8.0, keys.TIME_SAVE_S: 0.5, keys.TIME_TOTAL_S: 41.0,
               keys.TRAIN_RUNTIME_S: 29.0, keys.EVAL_BASE_CACHED: 1, keys.EVAL_PERPLEXITY: 20.0}
    split = split_of_run(47.0, metrics)
    assert split["startup_before_run_s"] == 4.0 and split["startup_s"] == 6.0
    assert split["finish_s"] == 47.0 - 4.0 - 41.0
    assert sum(split[k] for k in SPLIT) == 47.0
    assert split["wall_over_train"] == 47.0 / 29.0 and split["base_cached"] is True


def test_profile_splits_a_step_into_shares_that_add_up(tmp_path):
    """`--profile` on a tiny model, in-process: every share of the profiled steps, the matrix
    products and the collation among them, adding up to the profiled wall time."""
    from softprompt.experiments.bench import main
    from softprompt.experiments.step_profile import SHARES

    out = tmp_path / "profile.json"
    assert main(["--profile", "--model", "tiny-llama", "--max-samples", "20", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["timed_steps"] == 2 and result["model"] == "tiny-llama" and result["seconds_per_step"] > 0
    profile = result["profile"]
    assert set(profile["shares"]) == set(SHARES)
    assert sum(profile["shares"].values()) == pytest.approx(1.0)
    assert sum(profile["seconds_per_step_by_share"].values()) == pytest.approx(profile["profiled_seconds_per_step"])
    assert profile["shares"]["gemm"] > 0 and profile["shares"]["attention"] > 0 and profile["shares"]["data"] > 0
    assert profile["shares"]["optimizer"] > 0 and profile["shares"]["loss"] > 0
    assert 0 <= result["padding_share"] < 1 and "aten::mm" in profile["top_operators"]


def test_each_variant_gets_its_ratio_to_the_seed_recipe_and_its_mfu(tmp_path):
    """`--variant NAME:KEY=VALUE`: timed in the same process as the seed recipe and the default path."""
    from softprompt.experiments.bench import main

    out = tmp_path / "bench.json"
    assert main(["--model", "tiny-llama", "--max-samples", "20", "--steps", "2", "--skip-eval",
                 "--variant", "fp32:training.precision=fp32", "--out", str(out)]) == 0
    bench = json.loads(out.read_text())
    seed, variant = bench["seed_recipe"], bench["variants"]["fp32"]
    assert variant["steps"] == 2 and variant["overrides"] == ["training.precision=fp32"]
    assert variant["ratio"] == variant["tokens_per_s"] / seed["tokens_per_s"] > 0
    assert variant["mfu"] == pytest.approx(variant["tokens_per_s"] * bench["flops_per_token"] / bench["matmul_peak_flops"])
    assert variant["speedup_of_default"] == bench["softprompt"]["tokens_per_s"] / variant["tokens_per_s"]
