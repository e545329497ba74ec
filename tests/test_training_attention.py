"""training.attention: the training step's attention (eager on a CPU by default; SDPA with the math
kernel's backward on request), evaluation and generation on the model's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose

from softprompt.core import keys
from softprompt.models import training_attention as ab


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
    with ab.training_attention(None, "math_backward") as in_forward, in_forward():
        trained = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.no_grad():
            evaluated = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert type(trained.grad_fn).__name__ == "_SameForwardMathBackwardBackward" and evaluated.grad_fn is None
    trained.float().sum().backward()  # outside the forward's context: the backward's own SDPA call is not routed
    assert q.grad.shape == q.shape and bool(q.grad.abs().sum() > 0)


def test_auto_is_eager_on_a_cpu_and_the_models_own_attention_elsewhere():
    assert ab.resolve_training_attention("auto", torch.device("cpu")) == "eager"
    assert ab.resolve_training_attention("auto", torch.device("cuda")) == "model"
    assert ab.resolve_training_attention("math_backward", torch.device("cpu")) == "math_backward"


def test_eager_switches_the_base_for_the_step_and_back():
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        attn_implementation="sdpa"))
    assert ab.implementation_of(base) == "sdpa"
    with ab.training_attention(base, "eager") as in_forward:
        with in_forward():
            assert ab.implementation_of(base) == "eager"
        assert ab.implementation_of(base) == "eager"  # the backward too
    assert ab.implementation_of(base) == "sdpa"
    with pytest.raises(RuntimeError), ab.training_attention(base, "eager"):
        raise RuntimeError("a step that fails")
    assert ab.implementation_of(base) == "sdpa"  # put back all the same
    with ab.training_attention(base, "model"):
        assert ab.implementation_of(base) == "sdpa"


def _fp32_runs(tmp_path, monkeypatch, variant: str, extra: list[str] = ()) -> tuple[dict, dict, list[int]]:
    """A tiny fp32 run with the model's own attention and one with `variant`, counting the calls of
    the function that variant should route through."""
    from transformers.models.llama import modeling_llama

    from softprompt.train.run import run

    fp32 = TINY + ["training.precision=fp32", "eval.num_heldout_generations=0", "wandb.mode=disabled", *extra]
    own = run(compose(fp32 + ["training.attention=model"]), run_dir=tmp_path / "model")
    calls: list[int] = []
    module, name = (ab, "sdpa_with_math_backward") if variant == "math_backward" else (
        modeling_llama, "eager_attention_forward")
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    other = run(compose(fp32 + [f"training.attention={variant}"]), run_dir=tmp_path / variant)
    return own, other, calls


def test_a_run_with_the_math_backward_trains_through_it_with_the_models_numbers_in_fp32(tmp_path, monkeypatch):
    own, math, calls = _fp32_runs(tmp_path, monkeypatch, "math_backward")
    assert len(calls) == 4 * 2  # 4 steps x the tiny model's 2 layers
    for key in (keys.TRAIN_LOSS, keys.EVAL_PERPLEXITY, keys.EVAL_LOSS):
        assert math[key] == pytest.approx(own[key], rel=1e-5), key
    assert (own[keys.TRAIN_ATTENTION], math[keys.TRAIN_ATTENTION]) == ("model", "math_backward")


@pytest.mark.parametrize("extra", [[], ["training.gradient_checkpointing=true"]], ids=["plain", "checkpointed"])
def test_a_run_with_eager_attention_trains_through_it_only_with_the_models_numbers_in_fp32(tmp_path, monkeypatch,
                                                                                           extra):
    own, eager, calls = _fp32_runs(tmp_path, monkeypatch, "eager", extra)
    # 4 steps x 2 layers, with gradients (plus the recomputation in the backward when checkpointed);
    # evaluation and generation, without gradients, stay on SDPA
    assert calls == [True] * (4 * 2 * (2 if extra else 1))
    for key in (keys.TRAIN_LOSS, keys.EVAL_PERPLEXITY, keys.EVAL_LOSS):
        assert eager[key] == pytest.approx(own[key], rel=1e-5), key
    assert eager[keys.TRAIN_ATTENTION] == "eager"
