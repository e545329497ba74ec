"""The device a run uses: one placement for the model, batches, evaluation and generation.

On this CPU-only machine the tests show what a CPU can: no code path of the step, the loss, the
perplexity pass or generation makes a tensor without naming its device (a `TorchFunctionMode`
catches factory calls that would land on the default device whatever the model's); one training
step syncs with the host only for what logging needs (a `TorchDispatchMode` counts the ops that
read a device value back); a device the machine lacks is one `error:` line; `auto` asks for
native bf16. The `cuda`-marked tests run where a GPU is (scripts/device_check.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, child_env, compose, run_cli
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from softprompt.core import keys
from softprompt.core.rundir import RunDir

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.randn, torch.rand,
             torch.randint, torch.as_tensor, torch.eye, torch.linspace}


class NoDefaultDevice(TorchFunctionMode):
    """Records factory calls in softprompt's code that name no device: on a GPU run they would
    make CPU tensors (libraries' own calls are theirs to place)."""

    def __init__(self):
        super().__init__()
        self.unplaced: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_code.co_filename
        if func in FACTORIES and "device" not in kwargs and f"{os.sep}softprompt{os.sep}" in caller:
            self.unplaced.append(f"{func.__name__} in {os.path.basename(caller)}")
        return func(*args, **kwargs)


class Syncs(TorchDispatchMode):
    """Counts the ops that read a device tensor back to the host (`.item()`, boolean-mask indexing)."""

    SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _lane(method: str = "prompt_tuning", *extra: str):
    from softprompt.data.loading import load_splits, tokenize
    from softprompt.models.loading import load_model
    from softprompt.train.pack import Data, new_lane

    cfg = compose(TINY + [f"peft={method}", "training.learning_rate=0.3", *extra])
    loaded = load_model(cfg.model)
    rows = tokenize(load_splits(cfg.dataset, cfg.seed).train[:16], loaded.tokenizer, 48, "tiny")
    return cfg, loaded, rows, new_lane(cfg, loaded, Data(None, rows, rows[:4], [], [], None, False, 0.0), [], total=4)


def _batch(loaded, rows):
    from softprompt.train.batches import PaddingCollator

    return PaddingCollator(loaded.tokenizer.pad_token_id)([{"input_ids": r} for r in rows])


@pytest.mark.parametrize("forward", ["turns", "concat"])
def test_step_loss_perplexity_and_generation_name_their_device(forward):
    from softprompt.evaluation.perplexity import perplexity
    from softprompt.models.generation import GenerationSettings, generate
    from softprompt.models.methods import soft_prompt_embeddings
    from softprompt.train.pack import new_lane
    from softprompt.train.step import train_step

    cfg, loaded, rows, lane = _lane()
    other = new_lane(compose(TINY + ["peft.num_virtual_tokens=2", "seed=3"]), loaded, lane.data, [], total=4)
    batches = [_batch(loaded, rows[:4]), _batch(loaded, rows[4:8])]  # built on the host by the collator
    mode = NoDefaultDevice()
    with mode:
        train_step([lane, other], batches, loaded.model, 0, forward=forward, device=torch.device("cpu"),
                   autocast=None)
        perplexity(lane.model, rows[:4], loaded.tokenizer.pad_token_id, 4, 4)
        generate(loaded.model, loaded.tokenizer, ["I want you to act as a poet.", "Be"], GenerationSettings(4),
                 soft_prompt=soft_prompt_embeddings(lane.model))
    assert mode.unplaced == []


def test_the_mode_catches_a_tensor_made_without_a_device():
    mode = NoDefaultDevice()
    with mode:
        torch.zeros(3)
        torch.zeros(3, device="cpu")
    assert mode.unplaced == []  # a test file is not softprompt's code: the filter is by caller
    mode.unplaced.clear()
    import softprompt.evaluation.perplexity as perplexity

    with mode:
        perplexity.pad_batch([[1, 2], [3]], 0, "cpu")
    assert mode.unplaced == []


def test_one_training_step_syncs_only_for_the_loss_it_logs():
    from softprompt.train.step import train_step

    _, loaded, rows, lane = _lane()
    assert lane.fast_loss
    batch = _batch(loaded, rows[:8])
    train_step([lane], [batch], loaded.model, 0, forward="turns", device=torch.device("cpu"), autocast=None)
    syncs = Syncs()
    with syncs:
        result = train_step([lane], [batch], loaded.model, 1, forward="turns", device=torch.device("cpu"),
                            autocast=None)
    # two reads: the loss value (its finiteness decides the step; it is what is logged), and
    # transformers' SDPA mask builder asking whether the padding mask is all ones (its own, once
    # per forward); the labels' positions come from the host and the gradient norm stays a tensor
    # until a logged step reads it
    assert syncs.seen == ["aten::_local_scalar_dense"] * 2
    assert isinstance(result.grad_norms[0], torch.Tensor) and result.tokens == [sum(len(r) for r in rows[:8])]


def test_auto_precision_asks_for_native_bf16(monkeypatch):
    from softprompt.core import precision

    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # a GPU that only emulates bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert precision.resolve_precision("auto", "cuda") == "fp32"
    assert precision.base_dtype("auto", "cuda") == torch.float32
    assert calls == [False, False]
    assert precision.base_dtype("auto", "cpu") == torch.float32 and precision.base_dtype("bfloat16") == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_cuda_is_one_error(tmp_path):
    result = run_cli([*TINY, "training.device=cuda", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: training.device=cuda but this machine has no CUDA device (torch {torch.__version__}); use auto or cpu"]
    assert not (tmp_path / RunDir.METRICS).exists()


def test_a_bfloat16_base_trains_with_an_fp32_prompt(tmp_path):
    from softprompt.train.run import run

    metrics = run(compose(TINY + ["model.dtype=bfloat16", "training.precision=fp32", "wandb.mode=disabled"]),
                  run_dir=tmp_path)
    assert metrics[keys.TRAIN_STEPS] == 4 and metrics[keys.EVAL_PERPLEXITY] < metrics[keys.EVAL_BASE_PERPLEXITY]
    from safetensors.torch import load_file

    (prompt,) = load_file(str(RunDir(tmp_path).adapter / "adapter_model.safetensors")).values()
    assert prompt.dtype == torch.float32


def test_device_check_dry_run_on_the_cpu_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--device", "cpu", "--model",
                             "tiny-llama", "--quick", "--out", str(out)], cwd=ROOT,
                            env=child_env({"PYTHON": sys.executable}), capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads(out.read_text())
    parts = ("tests", "single", "pack-turns", "pack-concat")  # --quick leaves the packing bench out
    assert check["device"] == "cpu" and {*parts, "summary"} <= set(check) and "packing" not in check
    assert all(check[name]["rc"] == 0 for name in parts)
    summary = check["summary"]
    assert summary["ratio_vs_seed_recipe"] > 0 and 0 < summary["mfu"] < 1
    assert summary["pack_turns_max_rel_diff"] == 0.0  # turns: each job computes what it computes alone
    assert summary["pack_concat_max_rel_diff"] is not None and summary["pack_turns_ratio"] > 0
    assert summary["packed_step_against_padded"] is None
    _check_single_bench(check["single"]["result"])
    _check_sweep_bench(check["pack-turns"]["result"], out.with_suffix("") / "pack-turns-runs")


def _check_single_bench(bench: dict) -> None:
    """`scripts/bench.py` (one run, 2 timed steps): both paths timed, the ratios and MFU of them."""
    for path in ("seed_recipe", "softprompt"):
        part = bench[path]
        assert part["steps"] == 2 and part["tokens_per_s"] > 0 and part["real_tokens"] > 0
        assert part["tokens_per_s"] == part["real_tokens"] / part["seconds"]
    assert bench["softprompt"]["fast_loss"] is True
    assert bench["ratio"] == bench["softprompt"]["tokens_per_s"] / bench["seed_recipe"]["tokens_per_s"] > 0
    assert 0 < bench["mfu"] <= 1
    assert bench["precision"] == "fp32" or "amx_bf16" in bench["run_info"]["cpu_flags"] \
        or "avx512_bf16" in bench["run_info"]["cpu_flags"]
    assert bench["peak_rss_mib"] > 100  # torch and transformers alone take more
    assert bench["eval_tokens_per_s"] > 0 and bench["eval_tokens"] > 0
    assert bench["generation_tokens_per_s"] > 0 and bench["generation_prompts"] >= 2
    # the plain ways, timed in the same run, and the ratios to them
    assert bench["eval_ratio_to_plain"] == bench["eval_tokens_per_s"] / bench["plain_eval_tokens_per_s"]
    assert bench["generation_ratio_to_plain"] == (bench["generation_tokens_per_s"]
                                                  / bench["plain_generation_tokens_per_s"])


def _check_sweep_bench(bench: dict, runs: Path) -> None:
    """`scripts/bench.py --sweep sweeps/pack_small.yaml` (2 lengths x 1, 2, 3 epochs): a warm-up,
    then the grid shared (one pack, a trunk per length) and alone, bit-identical, both finding the
    base evaluation cached by the warm-up."""
    assert bench["jobs"] == 6 and bench["compared"] == 6
    assert bench["max_rel_diff_eval_perplexity"] == 0.0
    assert bench["warmup_s"] > 0 and bench["alone_wall_s"] > 0 and bench["shared_wall_s"] > 0
    # the ratio is of the unrounded walls; each printed wall is rounded to 0.01 s
    assert bench["ratio"] == pytest.approx(bench["alone_wall_s"] / bench["shared_wall_s"], rel=5e-3)
    assert all(job["alone_state"] == job["shared_state"] == "finished" for job in bench["per_job"])
    for mode in ("shared", "alone"):
        metrics = [json.loads(p.read_text()) for p in sorted((runs / mode).glob("sweep-*/*/metrics.json"))]
        assert len(metrics) == 6 and [m["eval/base_cached"] for m in metrics] == [1] * 6
    shared = [json.loads(p.read_text()) for p in sorted((runs / "shared").glob("sweep-*/*/config.json"))]
    assert [c["pack"]["jobs"] for c in shared] == [6] * 6 and {c["pack"]["trunks"] for c in shared} == {2}


# --- where a GPU is: scripts/device_check.sh runs these -----------------------------------------------


@pytest.mark.cuda
@cuda
def test_a_run_on_cuda_evaluates_trains_and_generates_there(tmp_path):
    from softprompt.train.run import run

    metrics = run(compose(TINY + ["training.device=cuda", "wandb.mode=disabled", "training.save_steps=2"]),
                  run_dir=tmp_path)
    assert metrics[keys.TRAIN_STEPS] == 4 and metrics[keys.EVAL_PERPLEXITY] > 0
    assert len(RunDir(tmp_path).read_generations()) == 4


@pytest.mark.cuda
@cuda
def test_a_cuda_checkpoint_resumes_on_the_cpu(tmp_path):
    from softprompt.train.checkpoints import complete_checkpoints, load
    from softprompt.train.pack import run_pack

    class Killed(Exception):
        pass

    def kill_at_3(step, tokens):
        if step == 3:
            raise Killed

    over = TINY + ["wandb.mode=disabled", "training.save_steps=2", "training.precision=fp32", "model.dtype=float32"]
    with pytest.raises(Killed):
        run_pack([compose(over + ["training.device=cuda"])], [tmp_path], [[0]], on_step=kill_at_3)
    (ckpt,) = complete_checkpoints(RunDir(tmp_path).checkpoints)
    assert all(t.device.type == "cpu" for p in load(ckpt, map_location="cpu").prompts for t in p.values())
    (job,) = run_pack([compose(over + ["training.device=cpu", "training.resume=true"])], [tmp_path], [[0]])
    assert job.state == "finished" and job.metrics[keys.TRAIN_RESUMED_FROM_STEP] == 2
