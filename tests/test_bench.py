"""scripts/bench.py on a tiny model: both paths train, and the JSON holds real, sane numbers."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def test_bench_tiny_model_prints_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(["--model", "tiny-llama", "--data", "bundled", "--steps", "2", "--gen-tokens", "4",
                    "--out", str(out)], script="scripts/bench.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert printed == json.loads(out.read_text())
    for path in ("seed_recipe", "softprompt"):
        part = printed[path]
        assert part["steps"] == 2
        assert part["tokens_per_s"] > 0 and part["real_tokens"] > 0
        assert part["tokens_per_s"] == part["real_tokens"] / part["seconds"]
    assert printed["softprompt"]["fast_loss"] is True
    assert printed["ratio"] == printed["softprompt"]["tokens_per_s"] / printed["seed_recipe"]["tokens_per_s"]
    assert printed["ratio"] > 0
    assert 0 < printed["mfu"] <= 1
    assert printed["precision"] == "fp32" or "amx_bf16" in printed["run_info"]["cpu_flags"] \
        or "avx512_bf16" in printed["run_info"]["cpu_flags"]
    assert printed["peak_rss_mib"] > 100  # torch and transformers alone take more
    assert printed["eval_tokens_per_s"] > 0 and printed["eval_tokens"] > 0
    assert printed["generation_tokens_per_s"] > 0 and printed["generation_prompts"] >= 2
    # the plain ways, timed in the same run, and the ratios to them
    assert printed["plain_eval_tokens_per_s"] > 0 and printed["plain_generation_tokens_per_s"] > 0
    assert printed["eval_ratio_to_plain"] == printed["eval_tokens_per_s"] / printed["plain_eval_tokens_per_s"]
    assert printed["generation_ratio_to_plain"] == (printed["generation_tokens_per_s"]
                                                    / printed["plain_generation_tokens_per_s"])
    # the same model and prompts both ways: the same greedy text, so tokens/s compares the same work;
    # with the soft prompt, batched equals one prompt at a time; bf16 perplexity within 0.5 % of fp32
    assert printed["generation_same_text_as_plain"] is True
    assert printed["generation_tuned_batched_equals_alone"] is True and printed["generation_tuned_tokens_per_s"] > 0
    assert printed["eval_perplexity_rel_diff_to_fp32"] < 0.005
    # tiny-llama's fp32 weights, each parameter once: N above (the tied lm_head is the embedding), 4 bytes each
    assert printed["weight_bytes"] == 4 * (printed["flops_per_token"] // 4)
    assert printed["memory_bandwidth_bytes_per_s"] > 1e8
    assert printed["decode_step_bound_s"] == printed["weight_bytes"] / printed["memory_bandwidth_bytes_per_s"]
    assert 0 < printed["generation_share_of_bound"] == (printed["generation_tokens_per_s"]
                                                        / printed["generation_bound_tokens_per_s"])
    # tiny-llama: hidden 64, 2 layers, tied 512-token embedding -> N counts the lm_head once
    assert printed["flops_per_token"] == 4 * (2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 256 + 2 * 64) + 64
                                              + 512 * 64)
    # the data is named, not located: no path of the machine that measured it
    assert printed["data"] == "bundled" and len(printed["data_fingerprint"]) == 16


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


SWEEP = """name: tiny_pack
program: train.py
method: grid
metric: {name: eval/perplexity, goal: minimize}
parameters:
  peft.num_virtual_tokens: {values: [1, 2]}
  training.epochs: {values: [1, 2]}
"""


def test_bench_sweep_times_both_modes_from_the_same_warm_cache(tmp_path):
    """`--sweep`: a warm-up fills a fresh cache, then the grid runs shared (one pack, 2 trunks) and
    alone; both modes find the base evaluation cached, and their results are bit-identical."""
    sweep, out = tmp_path / "tiny.yaml", tmp_path / "sweep-bench.json"
    sweep.write_text(SWEEP)
    proc = run_cli(["--sweep", str(sweep), "--root", str(tmp_path / "runs"), "--out", str(out),
                    "model=tiny-llama", "dataset=prompts_sample", "dataset.max_samples=20", "training.max_length=24",
                    "training.lr_scheduler=constant", "training.pack_forward=turns", "eval.max_new_tokens=4",
                    "eval.num_heldout_generations=0", "eval.train_perplexity_rows=4", "wandb.mode=disabled"],
                   script="scripts/bench.py", env={"SOFTPROMPT_CACHE": str(tmp_path / "fresh-cache")}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["jobs"] == 4 and result["compared"] == 4
    assert result["max_rel_diff_eval_perplexity"] == 0.0  # turns: each job computes what it computes alone
    assert result["warmup_s"] > 0 and result["alone_wall_s"] > 0 and result["shared_wall_s"] > 0
    # the ratio is of the unrounded walls; each printed wall is rounded to 0.01 s (of ~10 s here)
    assert result["ratio"] == pytest.approx(result["alone_wall_s"] / result["shared_wall_s"], rel=5e-3)
    assert all(job["alone_state"] == job["shared_state"] == "finished" for job in result["per_job"])
    for mode in ("shared", "alone"):
        sweep_dir = tmp_path / "runs" / mode
        metrics = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("sweep-*/*/metrics.json"))]
        assert len(metrics) == 4
        assert [m["eval/base_cached"] for m in metrics] == [1, 1, 1, 1]  # the warm-up computed it
    shared = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs" / "shared").glob("sweep-*/*/config.json"))]
    assert [c["pack"]["jobs"] for c in shared] == [4] * 4 and {c["pack"]["trunks"] for c in shared} == {2}
