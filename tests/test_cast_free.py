"""The training step's decoder with its linear weights cast once: the same loss and prompt gradient
bit for bit under bf16 autocast, no weight casts per step, the base's own weights untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from torch.profiler import ProfilerActivity, profile

from softprompt.models.cast_free import cast_free_decoder


def _setup():
    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap
    from softprompt.train.batches import PaddingCollator

    cfg = compose(["model=tiny-llama", "peft.init=random", "peft.num_virtual_tokens=3"])
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    peft_model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    peft_model.train()
    rows = [[5, 9, 33, 12, 7, 2], [40, 41], [8, 100, 200, 3]]  # ragged: right padding in play
    batch = PaddingCollator(loaded.tokenizer.pad_token_id)([{"input_ids": r} for r in rows])
    return loaded.model, peft_model, batch


def _loss_and_grad(peft_model, batch, decoder):
    from softprompt.models.fast_loss import prompt_tuning_loss

    prompt = peft_model.prompt_encoder["default"].embedding.weight
    with torch.autocast("cpu", dtype=torch.bfloat16), profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = prompt_tuning_loss(peft_model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  decoder=decoder)
    (grad,) = torch.autograd.grad(loss, prompt)
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    return loss, grad, casts


def test_the_same_loss_and_gradient_bit_for_bit_without_the_weight_casts():
    base, peft_model, batch = _setup()
    linears = [m for m in base.base_model.modules() if type(m) is torch.nn.Linear]
    before = [(m.weight.dtype, m.weight.data_ptr()) for m in linears]
    decoder = cast_free_decoder(base, torch.bfloat16)
    assert decoder is not None and len(decoder.copies) == len(linears) == 2 * 7  # q k v o gate up down
    assert {t.dtype for t in decoder.copies.values()} == {torch.bfloat16}

    loss, grad, casts = _loss_and_grad(peft_model, batch, None)
    free_loss, free_grad, free_casts = _loss_and_grad(peft_model, batch, decoder)
    assert torch.equal(free_loss, loss) and torch.equal(free_grad, grad)
    assert loss.item() > 1.0 and grad.abs().sum() > 0
    assert casts - free_casts == len(linears)  # each weight's cast, gone
    assert [(m.weight.dtype, m.weight.data_ptr()) for m in linears] == before  # the base keeps its fp32 weights


@pytest.mark.parametrize("case", ["no autocast", "checkpointing", "sharded", "bf16 weights"])
def test_nothing_to_do_where_no_weight_would_be_cast_or_the_weights_are_not_plain(case):
    base, _, _ = _setup()
    if case == "bf16 weights":
        base.to(torch.bfloat16)
    kwargs = {"checkpointing": case == "checkpointing", "sharded": case == "sharded"}
    assert cast_free_decoder(base, None if case == "no autocast" else torch.bfloat16, **kwargs) is None
