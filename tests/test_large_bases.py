"""Bases larger than one device: a quantized base (bitsandbytes), a device map (accelerate's
big-model placement) and FSDP over the ranks of a `torchrun` run; and the settings they refuse.

On this CPU-only machine: the tiny Llama quantized in 8 and 4 bits trains (and its prompt's
gradient is the one of the same layers dequantized); `device_map=auto` places every layer on the
CPU and gives the plain run's numbers exactly; two gloo ranks with `training.fsdp=true` give the
DDP run's numbers exactly. The quantized tests need the `quantization` extra (bitsandbytes).
"""

from __future__ import annotations

import importlib.util
import json
import math
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, child_env, compose, run_cli

from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir


# before any fixture is set up (importorskip in the body would build the shared tiny run first)
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="needs bitsandbytes (pip install 'softprompt[quantization]')")


def _moved(run_dir) -> list[float]:
    """How far training moved each virtual token from its initialisation (prompt_tokens.jsonl)."""
    return [json.loads(line)["l2_to_init"] for line in (run_dir / RunDir.PROMPT_TOKENS).read_text().splitlines()]


def _finite(metrics: dict, *names: str) -> bool:
    return all(math.isfinite(metrics[name]) for name in names)


# --- model.quantization ----------------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_tiny_llama_trains(bits, tmp_path, tiny_run):
    import bitsandbytes as bnb

    from softprompt.models.loading import load_model
    from softprompt.train.run import run

    cfg = compose(TINY + [f"model.quantization={bits}"])
    metrics = run(cfg, run_dir=tmp_path)
    assert _finite(metrics, keys.TRAIN_LOSS, keys.EVAL_PERPLEXITY, keys.EVAL_BASE_PERPLEXITY)
    assert min(_moved(tmp_path)) > 0
    assert metrics[keys.EVAL_PERPLEXITY] < metrics[keys.EVAL_BASE_PERPLEXITY]
    # the base really is quantized: close to the fp32 base's perplexity, not equal to it
    plain = tiny_run[1][keys.EVAL_BASE_PERPLEXITY]
    assert metrics[keys.EVAL_BASE_PERPLEXITY] != plain
    assert metrics[keys.EVAL_BASE_PERPLEXITY] == pytest.approx(plain, rel=0.05)
    layer = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    model = load_model(cfg.model).model
    assert sum(isinstance(m, layer) for m in model.modules()) == 2 * 7  # q, k, v, o, gate, up, down per layer


@needs_bitsandbytes
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_prompt_gradient_is_the_dequantized_layers_gradient(bits):
    """After an evaluation (as the base's comes before training), the prompt's gradient through
    the quantized layers equals the gradient through the same weights dequantized to fp32 (4 bits:
    exactly; the repacked CPU kernel of bitsandbytes >= 0.49 would give a wrong one)."""
    import bitsandbytes as bnb

    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap
    from softprompt.train.batches import PaddingCollator

    cfg = compose(TINY + [f"model.quantization={bits}"])
    quantized = load_model(cfg.model)
    dequantized = load_model(compose(TINY).model).model
    layers = dict(quantized.model.named_modules())
    with torch.no_grad():
        for name, module in dequantized.named_modules():
            q = layers[name]
            if isinstance(q, bnb.nn.Linear4bit):
                module.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
            elif isinstance(q, bnb.nn.Linear8bitLt):  # row-wise absmax int8: W = CB * SCB / 127
                module.weight.copy_(q.weight.CB.float() * q.weight.SCB.float()[:, None] / 127)
    tok = quantized.tokenizer
    batch = PaddingCollator(tok.pad_token_id)([{"input_ids": tok("I want you to act as a poet.")["input_ids"]},
                                               {"input_ids": tok("Be yourself; everyone else is taken.")["input_ids"]}])
    batch = {k: v for k, v in batch.items() if k != "labelled"}
    grads = []
    for base in (quantized.model, dequantized):
        torch.manual_seed(0)
        model = wrap(base, cfg.peft, quantized.tokenizer_path)
        model.eval()
        with torch.no_grad():
            model(**batch)
        model.train()
        model(**batch).loss.backward()
        (prompt,) = [p for p in model.parameters() if p.requires_grad]
        grads.append(prompt.grad)
    error = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    assert error < (1e-4 if bits == "8bit" else 1e-6), error


def test_quantization_without_bitsandbytes_is_one_error_before_loading(monkeypatch):
    from softprompt.train import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError) as err:
        preflight.check(compose(TINY + ["model.quantization=8bit"]))
    message = str(err.value)
    assert "bitsandbytes" in message and "pip install 'softprompt[quantization]'" in message
    assert "\n" not in message


def test_quantization_refuses_a_base_built_in_memory():
    from softprompt.train.preflight import check_scaling

    with pytest.raises(UserError, match="model.source=shape builds its random weights in memory"):
        check_scaling(compose(["model=shape-llama-1b", "model.quantization=4bit"]))


# --- model.device_map ------------------------------------------------------------------------------


def test_device_map_auto_trains_evaluates_and_generates_as_the_plain_run(tmp_path, tiny_run):
    from softprompt.evaluation.evaluate import generation_settings
    from softprompt.models.generation import generate
    from softprompt.models.loading import load_model, loader_placed
    from softprompt.train.placement import Placement
    from softprompt.train.run import run

    cfg = compose(TINY + ["model.device_map=auto"])
    metrics = run(cfg, run_dir=tmp_path)
    for key in (keys.TRAIN_LOSS, keys.EVAL_PERPLEXITY, keys.EVAL_BASE_PERPLEXITY):
        assert metrics[key] == pytest.approx(tiny_run[1][key], rel=1e-6), key
    assert metrics[keys.EVAL_BASE_CACHED] == 0  # another model config: its own cache entry
    generations = (tmp_path / RunDir.GENERATIONS).read_text()
    assert generations == (tiny_run[0] / RunDir.GENERATIONS).read_text()

    dispatched = load_model(cfg.model).model
    assert dispatched.hf_device_map and set(dispatched.hf_device_map.values()) == {"cpu"}
    assert loader_placed(dispatched)
    assert Placement(torch.device("cpu")).model(dispatched) is dispatched
    prompts = ["I want you to act as", "Be yourself;"]
    plain = load_model(compose(TINY).model)
    settings = generation_settings(cfg.eval)
    assert generate(dispatched, plain.tokenizer, prompts, settings) == generate(plain.model, plain.tokenizer, prompts,
                                                                                settings)


def test_device_map_under_several_processes_is_refused(monkeypatch):
    from softprompt.train.preflight import check_scaling

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"WORLD_SIZE=2.*training.fsdp=true"):
        check_scaling(compose(TINY + ["model.device_map=auto"]))


# --- training.fsdp -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "world", "says"), [
    (["training.fsdp=true", "peft=lora"], "2", "cannot serve peft.method=lora"),
    (["training.fsdp=true", "model.quantization=8bit"], "2", "cannot shard a base quantized"),
    (["training.fsdp=true", "model.device_map=auto"], "2", "both place the base"),
])
def test_fsdp_refuses_what_it_cannot_serve(overrides, world, says, monkeypatch):
    from softprompt.train.preflight import check_scaling

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(UserError, match=says):
        check_scaling(compose(TINY + overrides))


def test_fsdp_in_one_process_is_one_error_line(tmp_path):
    result = run_cli(TINY + ["training.fsdp=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: training.fsdp=true shards the base over the processes of a torchrun run")
    assert result.stderr.count("\n") == 1 and "torchrun --nproc_per_node N" in result.stderr
    assert not (tmp_path / "run" / RunDir.METRICS).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_two_processes_equal_the_ddp_run(tmp_path):
    """Two gloo ranks, each decoder layer sharded: training, per-epoch and final evaluation and
    generation run on both ranks in lock-step, and give the DDP run's numbers and texts exactly."""
    from softprompt.models.loading import load_model

    load_model(compose(TINY).model)  # build the tiny model's cache once, not racing in two ranks
    job = [o for o in TINY if not o.startswith("wandb.")] + ["wandb.mode=disabled"]  # W&B's start-up: seconds
    outputs = {}
    for name, extra in (("ddp", []), ("fsdp", ["training.fsdp=true"])):
        run_dir = tmp_path / name
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), str(ROOT / "train.py"), *job, "training.batch_size=4", "eval.max_new_tokens=4",
                *extra, f"hydra.run.dir={run_dir}"]
        result = subprocess.run(args, cwd=ROOT, env=child_env({"OMP_NUM_THREADS": "1"}), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stdout
    assert "fsdp: 2 decoder layers sharded over 2 ranks" in outputs["fsdp"]
    assert "fsdp:" not in outputs["ddp"]
    ddp, fsdp = (json.loads((tmp_path / n / RunDir.METRICS).read_text()) for n in ("ddp", "fsdp"))
    for key in (keys.EVAL_PERPLEXITY, keys.EVAL_BASE_PERPLEXITY, keys.TRAIN_LOSS):
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-5), key
    assert fsdp[keys.TRAIN_TOKENS_SEEN] == ddp[keys.TRAIN_TOKENS_SEEN]
    assert fsdp[keys.EVAL_BASE_CACHED] == 0  # every rank evaluates the base: no cache under FSDP
    assert (tmp_path / "fsdp" / RunDir.GENERATIONS).read_text() == (tmp_path / "ddp" / RunDir.GENERATIONS).read_text()
    history = [json.loads(line) for line in (tmp_path / "fsdp" / RunDir.HISTORY).read_text().splitlines()]
    assert any(keys.EVAL_PERPLEXITY in row for row in history)  # the per-epoch evaluation ran (on both ranks)
