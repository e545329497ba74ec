"""The sweep report over seeds: grid points with mean, std, min-max and n that equal a hand
computation; neighbouring points within the spread; report.html self-contained; the Pareto
frontier; FLOPs per method; progress bars off under SOFTPROMPT_QUIET."""

from __future__ import annotations

import base64
import json
import re
import statistics
from pathlib import Path

import pytest
from conftest import compose, run_cli

from softprompt.core import keys
from softprompt.experiments.report import build_report, pareto_front, write_report

# (num_virtual_tokens, seed) -> tuned held-out perplexity; the base model scores 40 on every split
PPL = {(4, 1): 10.0, (4, 2): 12.0, (4, 3): 14.0,  # mean 12, std 2 (n - 1), range 10-14
       (8, 1): 9.0, (8, 2): 9.5, (8, 3): 13.0,  # mean 10.5, std sqrt(4.75) = 2.179
       (16, 1): 5.0, (16, 2): 5.1, (16, 3): 4.9}  # mean 5, std 0.1


def _synthetic_sweep(root: Path) -> Path:
    for i, ((tokens, seed), ppl) in enumerate(PPL.items()):
        d = root / str(i)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({
            "peft": {"num_virtual_tokens": tokens}, "training": {"epochs": 2}, "seed": seed,
            "data": {"fingerprint": f"split-of-seed-{seed}"}, "provenance": {"git": {"commit": "abc"}}}))
        (d / "metrics.json").write_text(json.dumps({
            keys.EVAL_PERPLEXITY: ppl, keys.EVAL_BASE_PERPLEXITY: 40.0, keys.EVAL_PPL_RATIO: ppl / 40.0,
            keys.TRAIN_FLOPS: 1e9 * tokens, keys.TRAIN_TRAINABLE_PARAMS: 64 * tokens}))
        rows = [{keys.EPOCH: 1.0, keys.TRAIN_STEP: 2, keys.EVAL_PERPLEXITY: ppl + 1},
                {keys.EPOCH: 2.0, keys.TRAIN_STEP: 4, keys.EVAL_PERPLEXITY: ppl}]
        (d / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # the first virtual token reads as the same word in every seed, the others differ
        prompt = [{"position": k, "neighbours": [{"token": "cat" if k == 0 else f"w{seed}-{k}",
                                                   "id": 5 if k == 0 else 100 * seed + k, "cosine": 0.5}],
                   "cosine_to_init": 0.25 * seed, "l2_to_init": 1.0, "l2_norm": 2.0} for k in range(tokens)]
        (d / "prompt_tokens.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt))
        (d / "generations.jsonl").write_text(json.dumps({"prompt": "Act as a <cat>", "base": "meow | base\nline 2",
                                                         "tuned": f"tuned text {i}"}) + "\n")
    return root


def test_seeds_form_grid_points_whose_stats_equal_a_hand_computation(tmp_path):
    report = build_report([_synthetic_sweep(tmp_path)])
    assert report.swept == [keys.CFG_NUM_VIRTUAL_TOKENS, "seed"] and report.axes == [keys.CFG_NUM_VIRTUAL_TOKENS]
    assert [p.settings for p in report.points] == [{keys.CFG_NUM_VIRTUAL_TOKENS: t} for t in (4, 8, 16)]
    stats = [p.stat(keys.EVAL_PERPLEXITY) for p in report.points]
    assert [s.n for s in stats] == [3, 3, 3]
    assert [p.seeds for p in report.points] == [[1, 2, 3]] * 3
    assert stats[0].mean == 12.0 and stats[0].std == 2.0 and (stats[0].min, stats[0].max) == (10.0, 14.0)
    assert stats[1].mean == pytest.approx(10.5) and stats[1].std == pytest.approx(4.75 ** 0.5)
    assert stats[2].mean == pytest.approx(5.0) and stats[2].std == pytest.approx(0.1)
    assert report.best_point == 2 and report.runs[report.best].name == "8"

    # 4 vs 8 tokens: 1.5 apart, std 2 + 2.18 -> within the spread; 8 vs 16: 5.5 apart -> beyond it
    (a, b) = report.comparisons()
    assert (a.low.settings, a.high.settings) == ({keys.CFG_NUM_VIRTUAL_TOKENS: 4}, {keys.CFG_NUM_VIRTUAL_TOKENS: 8})
    assert a.delta == pytest.approx(-1.5) and a.spread == pytest.approx(2 + 4.75 ** 0.5) and a.within_spread
    assert b.delta == pytest.approx(-5.5) and not b.within_spread and b.verdict == "beyond spread"
    # paired by seed: 8 - 4 tokens is 9-10, 9.5-12, 13-14; 16 - 8 tokens is 5-9, 5.1-9.5, 4.9-13
    assert a.paired == pytest.approx([-1.0, -2.5, -1.0]) and a.lower_on == "3/3"
    assert b.paired == pytest.approx([-4.0, -4.4, -8.1]) and b.lower_on == "3/3"

    text = write_report(report, tmp_path).read_text()
    points_table = text[text.index("## Grid points, over seeds"):text.index("## Neighbouring grid points")]
    row4 = next(line for line in points_table.splitlines() if line.startswith("| 4 |"))
    assert [c.strip() for c in row4.strip("|").split("|")][:5] == ["4", "3", "1, 2, 3", "12 ± 2", "10–14"]
    assert "| tokens | 4 | 8 | all runs | -1.5 | 4.18 | **within spread** | -1, -2.5, -1 | 3/3 |" in text
    assert "| tokens | 8 | 16 | all runs | -5.5 | 2.28 | beyond spread | -4, -4.4, -8.1 | 3/3 |" in text
    for png in ("ppl_vs_virtual_tokens.png", "eval_curves.png", "pareto.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text
    # do seeds learn the same words: per length, each seed's nearest tokens and the agreement
    seeds = text[text.index("## Learned prompts across seeds"):]
    row = next(line for line in seeds.splitlines() if line.startswith("| 16 |"))
    assert [c.strip() for c in row.strip("|").split(" | ")] == [
        "16", "tokens=16", "1", " ".join(["`cat`", *(f"`w1-{k}`" for k in range(1, 16))]), "0.25", "5", "1/16"]
    # no training loss anywhere (no train rows, no W&B files): no empty plot
    assert not (tmp_path / "train_loss.png").exists()


def test_report_html_is_self_contained_with_generations_side_by_side(tmp_path):
    report = build_report([_synthetic_sweep(tmp_path)])
    write_report(report, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # every image inline, nothing fetched: the page opens offline, away from its PNGs
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1]) == (tmp_path / "ppl_vs_virtual_tokens.png").read_bytes()
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)
    # the best run's generation row: prompt | base | tuned, escaped, newlines kept
    gen = page[page.index("Generations, base vs tuned"):]
    assert "<th>prompt</th><th>base</th><th>tuned</th>" in gen
    assert ('<td class="text">Act as a &lt;cat&gt;</td><td class="text">meow | base\nline 2</td>'
            '<td class="text">tuned text 8</td>') in gen
    assert '<span class="within">within spread</span>' in page and "<td class=\"num\">12 ± 2</td>" in page


def test_pareto_front_keeps_points_nothing_beats_on_both():
    # (cost, perplexity): (3, 4) is beaten by (2, 3); (5, 1.5) is not (cheaper ones are worse)
    xy = [(1, 5.0), (2, 3.0), (3, 4.0), (4, 1.0), (5, 1.5), (4, 2.0)]
    assert pareto_front(xy) == [0, 1, 3]


def test_flops_per_token_is_4n_for_prompt_tuning_and_counts_lora_weight_grads():
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    from softprompt.models.flops import flops_per_token, matmul_params, training_flops
    from softprompt.models.loading import load_model

    base = load_model(compose(["model=tiny-llama"]).model).model
    embed, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    n = sum(p.numel() for p in base.parameters()) - embed.numel() + (head.numel() if head is embed else 0)
    assert matmul_params(base) == n > 0
    prompt = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    assert flops_per_token(prompt) == 4 * n and training_flops(prompt, 1000) == 4000 * n
    base = load_model(compose(["model=tiny-llama"]).model).model
    lora = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj", "v_proj"]))
    lora_params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert lora_params > 0
    assert flops_per_token(lora) == 4 * (n + lora_params) + 2 * lora_params


def test_progress_bars_are_off_when_quiet_and_for_tiny_passes(monkeypatch):
    from softprompt.core.progress import progress
    from softprompt.experiments.sweep import grid_size, parse_sweep

    assert progress(range(50), desc="x").disable  # the tests set SOFTPROMPT_QUIET=1
    monkeypatch.setenv("SOFTPROMPT_QUIET", "0")
    assert not progress(range(50), desc="x").disable and progress(range(1), desc="x").disable
    grid = parse_sweep({"method": "grid", "parameters": {"a": {"values": [1, 2]}, "b": {"values": [1, 2, 3]},
                                                         "c": {"value": 0}}}, "g")
    assert grid_size(grid) == 6


def test_real_2_points_x_3_seeds_sweep_gives_n3_means_and_one_wandb_job_type_per_point(tmp_path):
    from softprompt.track.records import read_run

    sweep_dir = tmp_path / "multirun"
    result = run_cli(["-m", "model=tiny-llama", "dataset=prompts_sample", "dataset.max_samples=10",
                      "training.max_steps=2", "training.logging_steps=1", "eval.max_new_tokens=4",
                      "eval.per_epoch=false", "eval.num_heldout_generations=0", "training.save_every_epoch=false",
                      "wandb.mode=offline", "peft.num_virtual_tokens=1,2", "seed=1,2,3",
                      f"hydra.sweep.dir={sweep_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [sweep_dir / str(i) for i in range(6)]
    metrics = [json.loads((d / "metrics.json").read_text()) for d in run_dirs]
    configs = [json.loads((d / "config.json").read_text()) for d in run_dirs]
    assert [(c["peft"]["num_virtual_tokens"], c["seed"]) for c in configs] == [(t, s) for t in (1, 2) for s in (1, 2, 3)]

    report = build_report([sweep_dir])
    assert [len(p.runs) for p in report.points] == [3, 3]
    for p, chunk in zip(report.points, (metrics[:3], metrics[3:])):
        values = [m[keys.EVAL_PERPLEXITY] for m in chunk]  # the hand computation
        stat = p.stat(keys.EVAL_PERPLEXITY)
        assert stat.n == 3 and stat.mean == pytest.approx(sum(values) / 3, rel=1e-12)
        assert stat.std == pytest.approx((sum((v - stat.mean) ** 2 for v in values) / 2) ** 0.5, rel=1e-12)
        assert stat.std == pytest.approx(statistics.stdev(values)) and stat.std > 0  # seeds differ
    text = write_report(report, sweep_dir).read_text()
    rows = [line for line in text[text.index("## Grid points"):].splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert [r.split(" | ")[1] for r in rows[:2]] == ["3", "3"]
    for row, p in zip(rows, report.points):
        assert p.stat(keys.EVAL_PERPLEXITY).text() in row
    # every run logs what it trained on and what that cost: 4N per real token for prompt tuning
    assert all(m[keys.TRAIN_TOKENS_SEEN] > 0 and m[keys.TRAIN_FLOPS] % (4 * m[keys.TRAIN_TOKENS_SEEN]) == 0
               for m in metrics)
    n = {m[keys.TRAIN_FLOPS] // (4 * m[keys.TRAIN_TOKENS_SEEN]) for m in metrics}
    assert len(n) == 1  # one base model, one N
    # the per-step training loss comes from each run's W&B file: steps 1 and 2
    assert [[s for s, _ in r.train_loss] for r in report.runs] == [[1, 2]] * 6
    assert (sweep_dir / "train_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep_dir / "pareto.png").is_file() and "data:image/png;base64," in (sweep_dir / "report.html").read_text()
    # W&B: the seeds of one point share a job_type, the two points differ
    job_types = [read_run(d / "wandb").job_type for d in run_dirs]
    assert len(set(job_types[:3])) == 1 and len(set(job_types[3:])) == 1 and job_types[0] != job_types[3]
    assert job_types[0] == f"point-{report.points[0].id}"
