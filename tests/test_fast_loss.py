"""The hidden-state prompt-tuning loss equals PEFT's own loss, and so does its prompt gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import compose


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_fast_loss_matches_peft(model, chunk_rows):
    from softprompt.models.fast_loss import prompt_tuning_loss, supports_fast_loss
    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap
    from softprompt.train.batches import PaddingCollator

    cfg = compose([f"model={model}", "peft.init=random", "peft.num_virtual_tokens=3"])
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    peft_model = wrap(loaded.model, cfg.peft, loaded.tokenizer_path)
    peft_model.train()
    assert supports_fast_loss(peft_model)
    rows = [[5, 9, 33, 12, 7, 2], [40, 41], [8, 100, 200, 3]]  # ragged: right padding in play
    batch = PaddingCollator(loaded.tokenizer.pad_token_id)([{"input_ids": r} for r in rows])
    prompt = peft_model.prompt_encoder["default"].embedding.weight

    reference = peft_model(**batch).loss
    (ref_grad,) = torch.autograd.grad(reference, prompt)
    fast = prompt_tuning_loss(peft_model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                              chunk_rows=chunk_rows)
    (fast_grad,) = torch.autograd.grad(fast, prompt)

    assert fast.item() == pytest.approx(reference.item(), rel=1e-5)
    assert reference.item() > 1.0  # a random tiny model: a real, non-trivial loss
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert ref_grad.abs().sum() > 0
