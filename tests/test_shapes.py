"""Large public architectures with random weights (`model=shape-llama-1b`, `model=shape-llama-8b`).

The presets hold the published configs' shapes; the tests build them scaled down (the same code,
a few MB) and check what makes the full-size ones honest: the real parameter counts, a tokenizer
with the model's vocabulary size, weights made directly in the target dtype with the right
statistics, the rotary buffers computed, tying as published, the same weights in every process.
The full sizes run in `scripts/bench.py --memory`, not here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose, run_cli

from softprompt.core import keys
from softprompt.core.rundir import RunDir

# a few MB instead of GB: the preset's architecture with small widths and two layers
SMALL = ["model.shape.config.hidden_size=64", "model.shape.config.intermediate_size=128",
         "model.shape.config.num_hidden_layers=2", "model.shape.config.num_attention_heads=4",
         "model.shape.config.num_key_value_heads=2", "model.shape.config.head_dim=16"]


def _small(preset: str, *extra: str):
    return compose([f"model={preset}", "dataset=prompts_sample", *SMALL, *extra])


@pytest.mark.parametrize("preset, parameters, tied", [("shape-llama-1b", 1_235_814_400, True),
                                                      ("shape-llama-8b", 8_030_261_248, False)])
def test_presets_have_the_published_parameter_counts(preset, parameters, tied):
    from softprompt.models.shapes import parameter_count, shape_config
    from softprompt.models.tiny_tokenizer import tiny_tokenizer

    cfg = compose([f"model={preset}"]).model
    tokenizer, _ = tiny_tokenizer(4096, pad_to=128256)
    config = shape_config(cfg, tokenizer)
    assert parameter_count(config) == parameters  # Llama-3.2-1B: 1.24B, Llama-3-8B: 8.03B
    assert config.tie_word_embeddings is tied and config.vocab_size == len(tokenizer) == 128256


@pytest.mark.parametrize("preset", ["shape-llama-1b", "shape-llama-8b"])
def test_a_shape_is_built_in_its_dtype_with_computed_buffers(preset):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from softprompt.models.loading import load_model

    cfg = _small(preset, "model.dtype=bfloat16")
    loaded = load_model(cfg.model)
    model = loaded.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(loaded.tokenizer) == model.config.vocab_size == 128256
    assert loaded.tokenizer.decode([128255]) == "<|filler_128255|>"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is (preset == "shape-llama-1b")
    # the rotary frequencies are the config's (llama3 scaling for the 1B), not to_empty's garbage
    expected = LlamaRotaryEmbedding(config=model.config).inv_freq
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.equal(inv_freq, expected) and inv_freq.dtype == torch.float32
    weight = model.model.layers[0].mlp.up_proj.weight.float()
    assert abs(weight.mean()) < 2e-3 and weight.std() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert len({tuple(row[:8].tolist()) for row in weight}) == weight.shape[0]  # no two rows alike
    again = load_model(cfg.model).model  # the same weights in every process: a saved adapter's base
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    ids = loaded.tokenizer("I want you to act as a motivational coach.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() == pytest.approx(torch.log(torch.tensor(128256.0)).item(), rel=0.1)


def test_a_shape_trains_with_checkpointing_and_its_adapter_loads_again(tmp_path):
    from softprompt.models.generation import GenerationSettings
    from softprompt.serve.inference import load
    from softprompt.train.run import run

    overrides = [o for o in TINY if not o.startswith("model=")] + [
        "model=shape-llama-8b", *SMALL, "model.dtype=bfloat16", "training.gradient_checkpointing=true",
        "training.max_steps=2", "training.batch_size=2", "eval.max_new_tokens=4", "wandb.mode=disabled"]
    metrics = run(compose(overrides), run_dir=tmp_path)
    assert metrics[keys.TRAIN_STEPS] == 2 and metrics[keys.MEMORY_PEAK_RSS_BYTES] > 100 * 2**20
    assert metrics[keys.TRAIN_TOTAL_PARAMS] - metrics[keys.TRAIN_TRAINABLE_PARAMS] == 2 * 128256 * 64 + 2 * (
        64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64  # embeddings, lm_head, two layers, final norm
    assert RunDir(tmp_path).read_metrics() == metrics
    # the base is rebuilt from the recorded config (16 GB of random weights are never saved)
    adapter = load(tmp_path, device="cpu")
    assert adapter.base_model == "shape:shape-llama-8b"
    (text,) = adapter.generate_tuned(["I want you to"], GenerationSettings(3))
    assert isinstance(text, str)


def test_nearest_tokens_read_the_embedding_matrix_in_chunks(monkeypatch):
    """Chunked (as for a 128k vocabulary) equals one pass, skips rows past the tokenizer's vocabulary,
    and reads a bf16 matrix in its own dtype."""
    from softprompt.evaluation import interpret

    class Tokenizer:
        def __len__(self):
            return 90  # the matrix has 100 rows: 10 of padding

        def decode(self, ids):
            return f"t{ids[0]}"

    generator = torch.Generator().manual_seed(0)
    embeddings, prompt = torch.randn(100, 16, generator=generator), torch.randn(3, 16, generator=generator)
    embeddings[95] = prompt[0] * 10  # a padding row nearest to the prompt: never a neighbour
    one_pass = interpret.nearest_tokens(prompt, embeddings, Tokenizer(), k=5)
    monkeypatch.setattr(interpret, "CHUNK_ROWS", 7)
    chunked = interpret.nearest_tokens(prompt, embeddings, Tokenizer(), k=5)
    assert chunked == one_pass and len(chunked) == 3
    assert all(len(r["neighbours"]) == 5 and all(n["id"] < 90 for n in r["neighbours"]) for r in chunked)
    half = interpret.nearest_tokens(prompt, embeddings.bfloat16(), Tokenizer(), k=5)
    assert [n["id"] for n in half[0]["neighbours"]][:3] == [n["id"] for n in one_pass[0]["neighbours"]][:3]


def test_a_shape_that_does_not_exist_is_one_error(tmp_path):
    result = run_cli(["model=shape-llama-3b", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "model/shape-llama-3b" in line
    assert "shape-llama-1b" in line and "shape-llama-8b" in line  # it names the ones there are
