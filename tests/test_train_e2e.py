"""The tiny models end to end: real training, real metrics, real files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose, run_cli
from safetensors.torch import load_file

from softprompt.core import keys
from softprompt.core.rundir import RunDir


def test_tiny_run_leaves_complete_outputs(tiny_run):
    run_dir, metrics = tiny_run
    on_disk = json.loads((run_dir / RunDir.METRICS).read_text())
    assert on_disk == pytest.approx(metrics)
    for key in keys.REQUIRED_METRICS:
        assert key in on_disk, key
        if isinstance(on_disk[key], float):
            assert math.isfinite(on_disk[key]), key
    assert on_disk[keys.TRAIN_STEPS] == 4
    assert on_disk[keys.PEFT_NUM_VIRTUAL_TOKENS] == 4
    assert on_disk[keys.TRAIN_TRAINABLE_PARAMS] == 4 * 64  # 4 virtual tokens x hidden size 64
    assert on_disk[keys.TRAIN_TOKENS_PER_SECOND] > 0
    rows = [json.loads(line) for line in (run_dir / RunDir.GENERATIONS).read_text().splitlines()]
    assert len(rows) == 2 + 2  # the two configured prompts and two held-out examples
    assert all({"prompt", "base", "tuned"} <= set(r) for r in rows)
    assert sum("reference" in r for r in rows) == 2


def test_soft_prompt_lowers_heldout_perplexity(tiny_run):
    _, metrics = tiny_run
    assert metrics[keys.EVAL_PERPLEXITY] < metrics[keys.EVAL_BASE_PERPLEXITY]


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_loss_falls_on_a_repeated_batch(arch):
    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap
    from softprompt.train.batches import PaddingCollator

    cfg = compose([f"model=tiny-{arch}", "peft.init=random", "peft.num_virtual_tokens=4"])
    loaded = load_model(cfg.model)
    model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    tok = loaded.tokenizer
    batch = PaddingCollator(tok.pad_token_id)([{"input_ids": tok("I want you to act as a poet.")["input_ids"]},
                                               {"input_ids": tok("Be yourself; everyone else is taken.")["input_ids"]}])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.3)
    torch.manual_seed(0)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # only the soft prompt trains: 4 x 64 numbers
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * 64
    logits = model(**batch).logits
    assert logits.shape == (2, 4 + batch["input_ids"].shape[1], len(tok))
    assert losses[-1] < losses[0] - 0.1, losses


def test_cli_tiny_bloom_adapter_has_eight_rows(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["model=tiny-bloom", "dataset=prompts_sample", "peft.num_virtual_tokens=8", "training.epochs=1",
                      "eval.max_new_tokens=8", "eval.num_heldout_generations=1", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(run_dir / RunDir.ADAPTER / "adapter_model.safetensors")
    assert weights["prompt_embeddings"].shape == (8, 64)
    config = json.loads((run_dir / RunDir.ADAPTER / RunDir.ADAPTER_CONFIG).read_text())
    assert config["num_virtual_tokens"] == 8 and config["peft_type"] == "PROMPT_TUNING"
    metrics = json.loads((run_dir / RunDir.METRICS).read_text())
    assert metrics[keys.TRAIN_EPOCHS] == pytest.approx(1.0)
    assert len((run_dir / RunDir.GENERATIONS).read_text().splitlines()) == 3
