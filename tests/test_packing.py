"""The padding-free (packed) step that `scripts/bench.py --packing` measures: the same loss and
prompt gradient as the padded step, and a bench that reports both."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_packed_loss_and_gradient_equal_the_padded_ones_in_fp32(attention):
    from softprompt.experiments.packing_bench import packed_loss
    from softprompt.models.fast_loss import prompt_tuning_loss
    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap
    from softprompt.train.batches import PaddingCollator

    cfg = compose(["model=tiny-llama", "peft.init=random", "peft.num_virtual_tokens=3"])
    loaded = load_model(cfg.model)
    loaded.model.set_attn_implementation(attention)
    torch.manual_seed(0)
    peft_model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    peft_model.train()
    rows = [[5, 9, 33, 12, 7, 2, 60], [40, 41], [8, 100, 200, 3], [17, 18, 19, 20, 21]]  # ragged: padding in play
    batch = PaddingCollator(loaded.tokenizer.pad_token_id)([{"input_ids": r} for r in rows])
    assert int((batch["attention_mask"] == 0).sum()) == 5 + 3 + 2  # positions the packed step leaves out
    prompt = peft_model.prompt_encoder["default"].embedding.weight
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])

    padded = prompt_tuning_loss(peft_model, *inputs)
    (padded_grad,) = torch.autograd.grad(padded, prompt)
    packed = packed_loss(peft_model, *inputs)
    (packed_grad,) = torch.autograd.grad(packed, prompt)

    assert padded.item() > 1.0  # a random tiny model: a real loss
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)
    assert padded_grad.abs().sum() > 0
    # to 1e-5 of the gradient's norm (single elements near zero differ by fp32 summation order)
    assert float((packed_grad - padded_grad).norm() / padded_grad.norm()) < 1e-5
    # the confinement is real: two 2-token rows packed, with restarting position ids, differ from one
    # 4-token row (rotary depends on relative positions only, so attending across is the difference)
    crossing = peft_model.get_base_model().base_model
    embeds = crossing.get_input_embeddings()(batch["input_ids"][:2, :2].reshape(1, -1))
    whole = crossing(inputs_embeds=embeds, position_ids=torch.arange(4)[None]).last_hidden_state
    restarted = crossing(inputs_embeds=embeds, position_ids=torch.tensor([[0, 1, 0, 1]])).last_hidden_state
    assert not torch.allclose(whole[0, 2:], restarted[0, 2:])


def test_the_packing_bench_times_the_padded_and_packed_steps(tmp_path, capsys):
    from softprompt.experiments.bench import main

    out = tmp_path / "packing.json"
    # rows up to 1024 tokens: the bundled rows, in the tiny tokenizer, are not all cut to one length
    assert main(["--packing", "--model", "tiny-llama", "--max-samples", "24", "--steps", "2", "--set",
                 "training.max_length=1024", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 < result["padding_share"] < 1
    for implementation in ("eager", "sdpa"):
        assert result["fp32"][implementation]["loss_rel_diff"] < 1e-5
        assert result["fp32"][implementation]["grad_rel_diff"] < 1e-5
    timed = result["seconds_per_step"]
    assert {"padded", "packed_eager", "packed_sdpa"} <= set(timed)
    assert all(seconds > 0 for seconds in timed.values())
    assert result["against_padded"]["padded"] == 1.0
    # flex_attention either ran (timed) or says why not; never both, never neither
    assert ("packed_flex_attention" in timed) != ("packed_flex_attention" in result["unavailable"])
    assert "packed_eager:" in capsys.readouterr().out


def test_the_packing_bench_refuses_a_decoder_without_switchable_attention(capsys):
    from softprompt.experiments.bench import main

    with pytest.raises(SystemExit) as exit_:
        main(["--packing", "--model", "tiny-bloom", "--max-samples", "24", "--steps", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --packing: tiny-bloom")
