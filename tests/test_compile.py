"""training.torch_compile: the decoder compiled once per pack and used by every training step, with
the eager step's numbers; a CPU without a C++ compiler is one error line.

Inductor's own code generation takes about a minute even for the tiny model on 2 cores, so the
suite compiles with the `aot_eager` backend (the same Dynamo graphs and AOTAutograd backward
without generated kernels); scripts/device_check.sh compiles with inductor on a GPU."""

from __future__ import annotations

import pytest
from conftest import TINY, compose

from softprompt.core import keys

FP32 = TINY + ["training.precision=fp32", "eval.num_heldout_generations=0", "wandb.mode=disabled"]


def test_a_compiled_run_steps_through_the_compiled_decoder_with_the_eager_numbers(tmp_path, monkeypatch):
    import json

    from softprompt.train import compile as compile_module
    from softprompt.train import pack
    from softprompt.train.checkpoints import latest_checkpoint, read_state
    from softprompt.train.run import run

    eager = run(compose(FP32), run_dir=tmp_path / "eager")
    monkeypatch.setenv("SOFTPROMPT_TEST_COMPILE_BACKEND", "aot_eager")
    calls: list[int] = []
    real = compile_module.compiled_decoder

    def counted(base, inner=None):
        compiled = real(base, inner)
        compiled.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["inputs_embeds"].shape[0]),
                                           with_kwargs=True)
        return compiled

    monkeypatch.setattr(pack, "compiled_decoder", counted)
    heads: list[int] = []
    real_head = compile_module.compiled_nll_sum()

    def counted_head(lm_head, hidden, targets):
        heads.append(hidden.shape[0])
        return real_head(lm_head, hidden, targets)

    monkeypatch.setattr(pack, "compiled_nll_sum", lambda: counted_head)
    # auto, with the bar lowered to the tiny run's 4 lane-steps: what the seed grid's 510 meet
    monkeypatch.setattr(compile_module, "AUTO_MIN_LANE_STEPS", 4)
    compiled = run(compose(FP32 + ["training.torch_compile=auto"]), run_dir=tmp_path / "compiled")
    assert len(calls) == len(heads) == 1 + 4  # the timed warm-up, then each of the 4 steps
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["pack"]["torch_compile"] == \
        "auto: 4 lane-steps on the CPU repay compiling"
    assert compiled[keys.TRAIN_COMPILE_S] > 0 and keys.TRAIN_COMPILE_S not in eager
    # the checkpoints keep the choice: a resumed run compiles as its first attempt did, whatever is left
    assert read_state(latest_checkpoint(tmp_path / "compiled" / "checkpoints"))["torch_compile"] is True
    assert read_state(latest_checkpoint(tmp_path / "eager" / "checkpoints"))["torch_compile"] is False
    for key in (keys.TRAIN_LOSS, keys.EVAL_PERPLEXITY, keys.EVAL_LOSS):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5), key
    assert compiled[keys.EVAL_BASE_PERPLEXITY] == eager[keys.EVAL_BASE_PERPLEXITY]  # evaluation runs eager


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_one_error(tmp_path, monkeypatch):
    import torch

    from softprompt.core.errors import UserError
    from softprompt.train.compile import check_compiler

    for variable in ("CXX", "CC", "SOFTPROMPT_TEST_COMPILE_BACKEND"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    with pytest.raises(UserError, match=r"^training.torch_compile=true on cpu needs a C\+\+ compiler"):
        check_compiler(torch.device("cpu"))
    with pytest.raises(UserError, match=r"^training.torch_compile=true on cuda needs a C compiler"):
        check_compiler(torch.device("cuda"))  # Triton builds its launcher with one
    (tmp_path / "g++").write_text("#!/bin/sh\n")
    (tmp_path / "g++").chmod(0o755)
    check_compiler(torch.device("cpu"))  # found: no error


def _tiny_base():
    from softprompt.models.loading import load_model

    return load_model(compose(["model=tiny-llama"]).model).model


def test_the_layers_are_compiled_for_the_call_only_and_give_the_decoders_numbers(monkeypatch):
    import torch

    from softprompt.models.cast_free import cast_free_decoder
    from softprompt.models.loading import decoder_layers
    from softprompt.train.compile import compiled_decoder

    monkeypatch.setenv("SOFTPROMPT_TEST_COMPILE_BACKEND", "aot_eager")
    base = _tiny_base()
    layers = decoder_layers(base)
    originals = list(layers)
    seen: list[list[str]] = []

    class Recording(torch.nn.Module):  # what the decoder's layers are while the compiled decoder runs
        def forward(self, **kwargs):
            seen.append([type(layer).__name__ for layer in layers])
            return base.base_model(**kwargs)

    torch.manual_seed(0)
    embeds = torch.randn(2, 5, base.config.hidden_size)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    eager = base.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    compiled = compiled_decoder(base, Recording())(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert seen == [["OptimizedModule"] * len(originals)]
    assert list(layers) == originals  # swapped back: evaluation and generation never meet them
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)

    class Failing(torch.nn.Module):
        def forward(self, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compiled_decoder(base, Failing())(inputs_embeds=embeds, attention_mask=mask)
    assert list(layers) == originals  # after an exception too
    # around the cast-free decoder: its weight copies are found under the wrappers' names
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = cast_free_decoder(base, torch.bfloat16)(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        both = compiled_decoder(base, cast_free_decoder(base, torch.bfloat16))(
            inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert both.dtype == plain.dtype and torch.equal(both, plain)


@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="inductor writes C++ for the CPU")
def test_the_loss_head_compiled_by_inductor_gives_the_eager_loss_and_gradient(monkeypatch):
    """The real backend, on the loss's head alone (seconds, not the minute the layers take): for
    any number of positions, the eager value and hidden-state gradient in fp32."""
    import torch

    monkeypatch.delenv("SOFTPROMPT_TEST_COMPILE_BACKEND", raising=False)
    from softprompt.models.fast_loss import nll_sum
    from softprompt.train.compile import compiled_nll_sum

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 512, bias=False).requires_grad_(False)
    head = compiled_nll_sum()
    for positions in (7, 23, 40):
        hidden = torch.randn(positions, 16, requires_grad=True)
        targets = torch.randint(0, 512, (positions,))
        eager = nll_sum(lm_head, hidden, targets)
        (eager_grad,) = torch.autograd.grad(eager, hidden)
        compiled = head(lm_head, hidden, targets)
        (compiled_grad,) = torch.autograd.grad(compiled, hidden)
        assert compiled.shape == () and compiled.item() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("setting", "device", "lane_steps", "plain", "compiles", "why"), [
    (True, "cpu", 1, True, True, "training.torch_compile=true"),
    (False, "cpu", 10_000, True, False, "training.torch_compile=false"),
    ("auto", "cpu", 510, True, True, "auto: 510 lane-steps on the CPU repay compiling"),
    ("auto", "cpu", 102, True, False, "auto: 102 lane-steps, fewer than the 200 that repay compiling"),
    ("auto", "cpu", 510, False, False, "auto: gradient checkpointing, FSDP, a device map or quantization"),
    ("auto", "cuda", 510, True, False, "auto: not measured on cuda"),
])
def test_auto_compiles_long_plain_packs_on_a_cpu(setting, device, lane_steps, plain, compiles, why, monkeypatch):
    import torch

    from softprompt.train.compile import resolve_torch_compile

    monkeypatch.setenv("SOFTPROMPT_TEST_COMPILE_BACKEND", "aot_eager")  # a compiler is there
    assert resolve_torch_compile(setting, torch.device(device), lane_steps, plain) == (compiles, why)


def test_auto_without_a_cpp_compiler_does_not_compile(tmp_path, monkeypatch):
    import torch

    from softprompt.train.compile import resolve_torch_compile

    for variable in ("CXX", "SOFTPROMPT_TEST_COMPILE_BACKEND"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_torch_compile("auto", torch.device("cpu"), 510, True) == (False, "auto: no C++ compiler found")


def test_torch_compile_takes_true_false_or_auto():
    from softprompt.core.config import validate
    from softprompt.core.errors import UserError

    with pytest.raises(UserError, match=r"^training.torch_compile='yes' is not one of true, false, auto$"):
        validate(compose(["training.torch_compile=yes"]))
