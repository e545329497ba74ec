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
    from softprompt.train import compile as compile_module
    from softprompt.train.run import run

    eager = run(compose(FP32), run_dir=tmp_path / "eager")
    monkeypatch.setenv("SOFTPROMPT_TEST_COMPILE_BACKEND", "aot_eager")
    calls: list[int] = []
    real = compile_module.compiled_decoder

    def counted(base):
        compiled = real(base)

        def call(*args, **kwargs):
            calls.append(kwargs["inputs_embeds"].shape[0])
            return compiled(*args, **kwargs)
        return call

    monkeypatch.setattr(compile_module, "compiled_decoder", counted)
    compiled = run(compose(FP32 + ["training.torch_compile=true"]), run_dir=tmp_path / "compiled")
    assert len(calls) == 1 + 4  # the timed warm-up, then each of the 4 steps
    assert compiled[keys.TRAIN_COMPILE_S] > 0 and keys.TRAIN_COMPILE_S not in eager
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
