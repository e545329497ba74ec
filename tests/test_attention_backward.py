"""training.attention_backward=math: SDPA's forward unchanged, the math kernel's backward, in the
training step only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose

from softprompt.core import keys
from softprompt.models import attention_backward as ab


def _inputs(kv_heads: int = 4):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 20, 16, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 20, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    return q, k, v, torch.randn(2, 4, 20, 16, dtype=torch.bfloat16)


def _padding_mask():
    mask = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, 1, 20, 20).clone()
    mask[0, :, :, -3:] = False  # the first row's last 3 positions are padding
    mask[0, :, -3:, 0] = True
    return mask


@pytest.mark.parametrize("case", ["causal", "padding mask", "grouped query heads"])
def test_the_forward_is_sdpas_and_the_gradients_are_exact_in_bf16(case):
    q, k, v, grad = _inputs(kv_heads=2 if case == "grouped query heads" else 4)
    kwargs = {"attn_mask": _padding_mask()} if case == "padding mask" else {"is_causal": True}
    kwargs |= {"enable_gqa": True} if case == "grouped query heads" else {}
    native = F.scaled_dot_product_attention(q, k, v, **kwargs)
    mine = ab.sdpa_with_math_backward(q, k, v, **kwargs)
    assert torch.equal(mine, native)  # the same kernel forward: loss, evaluation, generation unchanged
    exact = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), **kwargs)
    reference = torch.autograd.grad(exact, (q, k, v), grad.double())  # fp64, rounded to bf16

    def error(grads) -> float:
        return max(float((g.double() - r.double()).norm() / r.double().norm()) for g, r in zip(grads, reference))
    grads = torch.autograd.grad(mine, (q, k, v), grad)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    mine_error = error(grads)
    assert mine_error < 1e-5  # the fp64 gradient, rounded to bf16
    assert mine_error <= error(torch.autograd.grad(native, (q, k, v), grad))


def test_the_mode_routes_sdpa_only_where_a_gradient_is_taken():
    q, k, v, _ = _inputs()
    with ab.attention_backward("math"):
        trained = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.no_grad():
            evaluated = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert type(trained.grad_fn).__name__ == "_SameForwardMathBackwardBackward" and evaluated.grad_fn is None
    with ab.attention_backward("native"):
        assert type(F.scaled_dot_product_attention(q, k, v, is_causal=True).grad_fn).__name__ != \
            "_SameForwardMathBackwardBackward"


def test_a_run_with_the_math_backward_trains_through_it_with_the_native_numbers_in_fp32(tmp_path, monkeypatch):
    from softprompt.train.run import run

    fp32 = TINY + ["training.precision=fp32", "eval.num_heldout_generations=0", "wandb.mode=disabled"]
    native = run(compose(fp32), run_dir=tmp_path / "native")
    calls: list[int] = []
    real = ab.sdpa_with_math_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ab, "sdpa_with_math_backward", counted)
    math = run(compose(fp32 + ["training.attention_backward=math"]), run_dir=tmp_path / "math")
    assert len(calls) == 4 * 2  # 4 steps x the tiny model's 2 layers
    for key in (keys.TRAIN_LOSS, keys.EVAL_PERPLEXITY, keys.EVAL_LOSS):
        assert math[key] == pytest.approx(native[key], rel=1e-5), key
