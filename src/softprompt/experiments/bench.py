"""Training/eval throughput of softprompt against the seed notebook's recipe, in one process.

Both paths train the same model on the same rows with the same batch size:
- seed recipe (the anchor): the notebook's plain Hugging Face `Trainer` (no subclass; a
  `TrainerCallback` only reads the clock), tokenizer(text) with no truncation (capped at
  `SEED_MAX_LENGTH`) and no EOS, `DataCollatorForLanguageModeling(mlm=False)` (pads each random
  batch to its longest row), PEFT's forward (logits on every position), fp32, 4 random virtual
  tokens, random order;
- softprompt: `softprompt.data.loading.tokenize` (EOS, truncated to training.max_length) and the
  engine's step (`softprompt.train.step.train_step`: length-grouped batches, hidden-state loss,
  precision) on a `softprompt.models.loading.load_model` model: what every run's lane takes.

Throughput counts real tokens only (non-pad, non-virtual): the tokens each path actually trained
on. Truncation changes the work, so the rows' token totals differ and both are reported.
Timing starts after a warm-up step. MFU is achieved model FLOP/s over a matmul peak measured in
this process, in the dtype the matmuls run in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.core.quiet import quiet_third_party

# before transformers' Trainer machinery is imported: where bitsandbytes is installed (the
# quantization extra) that import imports it, and its import talks
quiet_third_party()
from transformers import TrainerCallback  # noqa: E402

from softprompt.models.flops import matmul_params  # noqa: E402

SEED_MAX_LENGTH = 1024  # "no truncation" with a sane cap: the longest prompt CSV row is ~380 tokens
FLOPS_FORMULA = ("4 * N per real token: forward 2N + backward 2N (activation gradients only; the base "
                 "is frozen, so no weight gradients); N = matmul parameters = all parameters except the "
                 "input embedding, plus the lm_head counted even when tied; attention-score FLOPs "
                 "(~2-3 % at these lengths) and virtual-token positions are not counted")


class StepClock(TrainerCallback):
    """Wall time and real-token count at the end of every optimizer step of the seed recipe.

    Tokens are counted where the model receives them (a forward pre-hook: the attention mask's
    ones), not where the collator makes them: the data loader fetches one batch ahead.
    """

    def __init__(self, model):
        self.tokens = 0
        self.marks: list[tuple[float, int]] = []
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        self.tokens += int(kwargs["attention_mask"].sum())

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), self.tokens))


def matmul_peak_flops(dtype: torch.dtype, size: int = 1536, seconds: float = 2.0,
                      device: torch.device | str = "cpu") -> float:
    """Best FLOP/s of a square matmul in `dtype` on `device`: the ceiling MFU is measured against
    (a GPU gets a larger matrix and a sync around each product)."""
    device = torch.device(device)
    if device.type == "cuda":
        size = max(size, 8192)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def _timed(marks: list[tuple[float, int]], warmup_steps: int, start: float) -> dict:
    """Throughput between the end of the warm-up and the last step, from (time, tokens) marks."""
    (t0, tok0), (t1, tok1) = marks[warmup_steps - 1], marks[-1]
    steps = len(marks) - warmup_steps
    return {"tokens_per_s": (tok1 - tok0) / (t1 - t0), "real_tokens": tok1 - tok0, "seconds": t1 - t0,
            "steps": steps, "seconds_per_step": (t1 - t0) / steps, "warmup_step_s": t0 - start}


def seed_recipe(cfg, texts: list[str], steps: int, warmup_steps: int, out_dir: Path) -> dict:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from softprompt.models.loading import load_model

    start = time.perf_counter()
    loaded = load_model(cfg.model)
    tokenizer = loaded.tokenizer
    encoded = tokenizer(texts, truncation=True, max_length=SEED_MAX_LENGTH)
    rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(encoded["input_ids"], encoded["attention_mask"])]
    model = get_peft_model(loaded.model, PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.RANDOM, num_virtual_tokens=4))
    t = cfg.training
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=warmup_steps + steps, per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate, lr_scheduler_type="linear", weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, save_strategy="no", report_to="none",
        use_cpu=cfg.training.device == "cpu" or not torch.cuda.is_available(), seed=cfg.seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True)
    clock = StepClock(model)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer)
    trainer.train()
    result = _timed(clock.marks, warmup_steps, start)
    result["rows_tokens_total"] = sum(len(r["input_ids"]) for r in rows)
    return result


@dataclass
class OneLane:
    """A run of one job as the engine trains it, ready to step (no checkpoints, no evaluation in
    between): what the timing (`softprompt_path`) and the profile (`--profile`) share."""

    cfg: Any
    device: torch.device
    loaded: Any
    lane: Any
    rows: list
    val_rows: list
    autocast: torch.dtype | None
    decoder: torch.nn.Module | None = None  # compiled (training.torch_compile, at the first step) or cast-free
    compiled: bool = False  # the decoder is compiled: the first step's time holds the compile time
    head: Any = None  # the loss's head compiled (training.torch_compile), else None: the eager one
    _order: tuple = (-1, ())  # (epoch, its batches): the order is made once per epoch

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Step `step`'s batch, collated on the host (the run's length-grouped order)."""
        from softprompt.train.batches import PaddingCollator, epoch_batches, steps_per_epoch

        t = self.cfg.training
        epoch, index = divmod(step, steps_per_epoch(len(self.rows), t.batch_size))
        if self._order[0] != epoch:
            self._order = (epoch, epoch_batches([len(r) for r in self.rows], t.batch_size, self.cfg.seed, epoch,
                                                t.group_by_length))
        rows = [{"input_ids": self.rows[k]} for k in self._order[1][index]]
        return PaddingCollator(self.loaded.tokenizer.pad_token_id)(rows)

    def step(self, step: int, batch: dict[str, torch.Tensor]):
        """The engine's step (softprompt.train.step.train_step) of this one lane."""
        from softprompt.models.fast_loss import nll_sum
        from softprompt.models.training_attention import resolve_training_attention
        from softprompt.train.step import train_step

        return train_step([self.lane], [batch], self.loaded.model, step, forward="turns", device=self.device,
                          autocast=self.autocast, decoder=self.decoder,
                          attention=resolve_training_attention(self.cfg.training.attention, self.device),
                          head=self.head or nll_sum)


def one_lane(cfg, splits, total: int, precision: str) -> OneLane:
    """The model placed and loaded, the rows tokenized and a lane for `total` steps, as a run makes them."""
    from softprompt.data.loading import tokenize
    from softprompt.models.loading import load_model
    from softprompt.train.pack import Data, new_lane
    from softprompt.train.placement import Placement

    place = Placement.of(cfg)
    loaded = load_model(cfg.model, place.device)
    place.model(loaded.model)
    tokenizer_id = f"{cfg.model.source}:{loaded.tokenizer_path}"
    rows = tokenize(splits.train, loaded.tokenizer, cfg.training.max_length, tokenizer_id)
    val_rows = tokenize(splits.validation, loaded.tokenizer, cfg.training.max_length, tokenizer_id)
    lane = new_lane(cfg, loaded, Data(splits, rows, val_rows, [], [], None, False, 0.0), [], total)
    decoder = None
    if lane.fast_loss:  # as the engine does (softprompt.train.pack)
        from softprompt.models.cast_free import cast_free_decoder

        decoder = cast_free_decoder(loaded.model, torch.bfloat16 if precision == "bf16" else None,
                                    checkpointing=cfg.training.gradient_checkpointing, sharded=cfg.training.fsdp)
    from softprompt.train.compile import compiled_decoder, compiled_nll_sum, plain_step, resolve_torch_compile

    compiling = lane.fast_loss and resolve_torch_compile(cfg.training.torch_compile, place.device, total,
                                                         plain_step(cfg, loaded.model, place.fsdp))[0]
    head = None
    if compiling:
        decoder, head = compiled_decoder(loaded.model, decoder), compiled_nll_sum()
    return OneLane(cfg, place.device, loaded, lane, rows, val_rows, torch.bfloat16 if precision == "bf16" else None,
                   decoder, compiled=compiling, head=head)


def softprompt_path(cfg, splits, steps: int, warmup_steps: int, precision: str):
    """The engine's step (softprompt.train.step.train_step) on one lane, as a run of one job
    takes it, timed step by step: no checkpoints, no evaluation in between."""
    from softprompt.models.methods import virtual_tokens_in_logits

    start = time.perf_counter()
    run = one_lane(cfg, splits, warmup_steps + steps, precision)
    marks, tokens = [], 0
    for step in range(warmup_steps + steps):
        result = run.step(step, run.batch(step))
        tokens += result.tokens[0]
        marks.append((time.perf_counter(), tokens))
    result = _timed(marks, warmup_steps, start)
    result["rows_tokens_total"] = sum(len(r) for r in run.rows)
    result["fast_loss"] = run.lane.fast_loss
    result["torch_compile"] = run.compiled  # then warmup_step_s holds the compile time
    model = run.lane.model
    # the A/B check that a speed change does not cost quality: held-out perplexity after these steps
    from softprompt.evaluation.perplexity import perplexity

    result["heldout_perplexity_after"] = perplexity(model, run.val_rows, run.loaded.tokenizer.pad_token_id,
                                                    cfg.training.eval_batch_size,
                                                    virtual_tokens_in_logits(model)).perplexity
    return result, run.loaded, model, run.val_rows, virtual_tokens_in_logits(model)


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of a large tensor copy (read + write): the bound a decode step meets, since it
    reads every weight once."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * src.element_size() / (time.perf_counter() - start))
    return best


def weight_bytes(model) -> int:
    """Bytes of the model's parameters, each once (a tied lm_head is the embedding's storage)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _plain_eval(model, rows: list[list[int]], pad_id: int, batch_size: int) -> int:
    """The plain way to score held-out rows: a batched forward with every position's logits."""
    from softprompt.evaluation.perplexity import pad_batch

    model.eval()
    tokens = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_batch(rows[start : start + batch_size], pad_id, device)
            model(input_ids=ids, attention_mask=mask)  # logits for every position, as a plain forward does
            tokens += int(mask[:, 1:].sum())  # the positions perplexity() scores
    return tokens


def _plain_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The plain way to generate: `model.generate`, left-padded batches, KV cache, greedy, penalty 1.5."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(next(model.parameters()).device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, repetition_penalty=1.5, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [t.strip() for t in texts]


def eval_and_generation(cfg, loaded, model, val_rows, n_virtual: int, splits, autocast_dtype,
                        fp32_perplexity: float) -> dict:
    from softprompt.evaluation.evaluate import eval_prompts
    from softprompt.evaluation.perplexity import perplexity
    from softprompt.models.generation import GenerationSettings, generate
    from softprompt.models.methods import soft_prompt_embeddings

    tokenizer = loaded.tokenizer
    batch = cfg.training.eval_batch_size
    start = time.perf_counter()
    ppl = perplexity(model, val_rows, tokenizer.pad_token_id, batch, n_virtual, autocast_dtype=autocast_dtype)
    eval_s = time.perf_counter() - start
    base = model.get_base_model()
    start = time.perf_counter()
    plain_tokens = _plain_eval(base, val_rows, tokenizer.pad_token_id, batch)
    plain_eval_s = time.perf_counter() - start
    prompts = [p.prompt for p in eval_prompts(cfg.eval, splits.validation)]

    def count(texts: list[str]) -> int:  # both paths' text measured the same way: re-tokenized
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    settings = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens, repetition_penalty=1.5)
    soft_prompt = soft_prompt_embeddings(model)
    # against the plain way on the same model and prompts (the base: plain generate has no soft
    # prompt), so that both produce the same text and tokens/s compares the same work
    start = time.perf_counter()
    texts = generate(base, tokenizer, prompts, settings, batch_size=cfg.eval.batch_size)
    gen_s = time.perf_counter() - start
    start = time.perf_counter()
    tuned_texts = generate(base, tokenizer, prompts, settings, soft_prompt=soft_prompt, batch_size=cfg.eval.batch_size)
    tuned_s = time.perf_counter() - start
    # the batch must not change the text: each prompt again, alone (with the soft prompt)
    alone = [generate(base, tokenizer, [p], settings, soft_prompt=soft_prompt, batch_size=1)[0] for p in prompts]
    start = time.perf_counter()
    plain_texts = _plain_generate(base, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    plain_gen_s = time.perf_counter() - start
    generated, plain_generated = count(texts), count(plain_texts)
    bandwidth, nbytes = memory_bandwidth(), weight_bytes(base)
    # one decode step reads every weight once and yields one token per row of the batch
    rows_per_step = min(cfg.eval.batch_size, len(prompts))
    bound = rows_per_step * bandwidth / nbytes
    return {"eval_tokens_per_s": ppl.tokens / eval_s, "eval_tokens": ppl.tokens, "eval_perplexity": ppl.perplexity,
            "eval_precision": "bf16" if autocast_dtype else "fp32",
            # the same model state's held-out perplexity in fp32 (softprompt_path computed it)
            "eval_perplexity_rel_diff_to_fp32": abs(ppl.perplexity - fp32_perplexity) / fp32_perplexity,
            "plain_eval_tokens_per_s": plain_tokens / plain_eval_s,
            "eval_ratio_to_plain": (ppl.tokens / eval_s) / (plain_tokens / plain_eval_s),
            "generation_tokens_per_s": generated / gen_s, "generation_tokens": generated,
            "generation_prompts": len(prompts),
            "plain_generation_tokens_per_s": plain_generated / plain_gen_s,
            "plain_generation_tokens": plain_generated,
            "generation_ratio_to_plain": (generated / gen_s) / (plain_generated / plain_gen_s),
            "generation_same_text_as_plain": texts == plain_texts,
            "generation_tuned_tokens_per_s": count(tuned_texts) / tuned_s,
            "generation_tuned_batched_equals_alone": tuned_texts == alone,
            "memory_bandwidth_bytes_per_s": bandwidth, "weight_bytes": nbytes,
            "decode_step_bound_s": nbytes / bandwidth,
            "generation_bound_tokens_per_s": bound,
            "generation_share_of_bound": (generated / gen_s) / bound}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a conf/model option (tiny-llama for a quick check)")
    p.add_argument("--data", default="bundled",
                   help="'bundled' (the packaged prompts sample, 72 rows), or a local csv/json/jsonl/parquet "
                        "file, e.g. path/to/awesome-chatgpt-prompts.csv (the figures in docs/speed.md)")
    p.add_argument("--text-column", default="prompt")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (default: one epoch)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="training.device of both paths (auto: the GPU where there is one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--gen-tokens", type=int, default=32, help="max new tokens per prompt in the generation timing")
    p.add_argument("--skip-seed", action="store_true", help="time softprompt's path only (per-change gains)")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for softprompt's path, e.g. training.fast_loss=false")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="also time softprompt's path with these overrides (per-change gains), e.g. "
                        "no_fast_loss:training.fast_loss=false")
    p.add_argument("--profile", action="store_true",
                   help="instead: where one training step's time goes (torch.profiler; --steps profiled steps, "
                        "default 4)")
    p.add_argument("--packing", action="store_true",
                   help="instead: a padding-free (packed) step against the padded one (--steps batches, default 4)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def main(argv=None) -> int:
    """`python scripts/bench.py ...` / the console script softprompt-bench: prints the JSON.
    With `--sweep SWEEP.yaml`: a sweep alone-per-job vs shared (softprompt.experiments.sweep_bench);
    `--sweep SWEEP.yaml --halving`: its early termination (hyperband) vs its full grid, both shared.
    With `--run-split`: where the wall time of one `make run` goes (`run_split`).
    With `--memory`: peak memory per base and setting (softprompt.experiments.memory_bench).
    With `--profile`: where one training step's time goes (softprompt.experiments.step_profile).
    With `--packing`: a padding-free step against the padded one (softprompt.experiments.packing_bench)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--sweep" or a.startswith("--sweep=") for a in args):
        from softprompt.experiments.sweep_bench import main as sweep_main

        return sweep_main(args)
    if "--run-split" in args:
        run_split(args)
        return 0
    if "--memory" in args:
        from softprompt.experiments.memory_bench import run_memory

        run_memory(args)
        return 0
    if "--profile" in args:
        from softprompt.experiments.step_profile import run_profile

        run_profile(args)
        return 0
    if "--packing" in args:
        from softprompt.experiments.packing_bench import run_packing

        run_packing(args)
        return 0
    measure(argv)
    return 0


# --- the wall time of one `make run` -----------------------------------------------------------------

# what `make run` runs (Makefile): the main job, offline
MAKE_RUN = ["experiment=offline"]
# the parts of a run's wall time, in order; they add up to wall_s
SPLIT = ("startup_s", "base_eval_s", "train_s", "tuned_eval_s", "save_s", "finish_s")


def train_command(overrides: list[str]) -> list[str]:
    """`python train.py OVERRIDES` in a checkout (what `make run` runs), `python -m softprompt` else."""
    checkout = Path(__file__).resolve().parents[3]
    entry = [str(checkout / "train.py")] if (checkout / "train.py").is_file() else ["-m", "softprompt"]
    return [sys.executable, *entry, *overrides]


def train_env() -> dict:
    """The environment of a training child: this softprompt first on its path (also for `python -m
    softprompt`), and its own wandb-core (not the parent's service), as `make run` has."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def split_of_run(wall_s: float, metrics: dict) -> dict:
    """The wall time of one training process split into its parts, from its `metrics.json`.

    The run records its own phases from run() entry to metrics.json (`time/*`); what came before
    run() (interpreter, imports, Hydra) is the process's time to first step less the run's, and
    what came after metrics.json (W&B's finish, the interpreter's exit) is the rest of the wall time.
    """
    from softprompt.core import keys

    before_run = metrics[keys.TRAIN_TIME_TO_FIRST_STEP_PROCESS_S] - metrics[keys.TRAIN_TIME_TO_FIRST_STEP_S]
    split = {"startup_s": before_run + metrics[keys.TIME_STARTUP_S],
             "base_eval_s": metrics[keys.TIME_BASE_EVAL_S],
             "train_s": metrics[keys.TIME_TRAIN_S],
             "tuned_eval_s": metrics[keys.TIME_TUNED_EVAL_S],
             "save_s": metrics[keys.TIME_SAVE_S],
             "finish_s": wall_s - before_run - metrics[keys.TIME_TOTAL_S]}
    return {"wall_s": wall_s, **split,
            "startup_before_run_s": before_run,  # interpreter, imports, Hydra: before run() is entered
            "train_runtime_s": metrics[keys.TRAIN_RUNTIME_S],  # the loop alone (what "training time" means)
            "wall_over_train": wall_s / metrics[keys.TRAIN_RUNTIME_S],
            "time_to_first_step_s": metrics[keys.TRAIN_TIME_TO_FIRST_STEP_S],
            "time_to_first_step_process_s": metrics[keys.TRAIN_TIME_TO_FIRST_STEP_PROCESS_S],
            "base_cached": bool(metrics[keys.EVAL_BASE_CACHED]),
            "eval_perplexity": metrics[keys.EVAL_PERPLEXITY]}


def run_split(argv: list[str]) -> dict:
    """`--run-split [--set KEY=VALUE ...] [--out FILE]`: run the `make run` job (`python train.py
    experiment=offline`, plus the overrides) in a child process, time it, and print its wall time
    split into start-up, base eval, training, tuned eval, saving and finish, as JSON (and a table
    on stderr). Runs on the machine's warm caches, as `make run` does."""
    p = argparse.ArgumentParser(description=run_split.__doc__.splitlines()[0])
    p.add_argument("--run-split", action="store_true", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for the run, e.g. model=tiny-llama (a quick check)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    from softprompt.core.rundir import RunDir

    overrides = [*MAKE_RUN, *args.set]
    with tempfile.TemporaryDirectory(prefix="softprompt-run-split-") as tmp:
        command = train_command([*overrides, f"hydra.run.dir={tmp}"])
        env = train_env()
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"error: the run failed (exit status {proc.returncode}): {' '.join(command)}")
        metrics = RunDir(tmp).read_metrics()
    result = {"run_split": {"command": "python train.py " + " ".join(overrides), **split_of_run(wall, metrics)},
              "run_info": {"cpu_flags": _cpu_flags(), "commit": git_commit(), "load_average_before": load_before,
                           "load_average_after": os.getloadavg()}}
    split = result["run_split"]
    for key in SPLIT:
        print(f"{key[:-2]:>12} {split[key]:7.2f} s {100 * split[key] / wall:5.1f} %", file=sys.stderr)
    print(f"{'wall':>12} {wall:7.2f} s = {split['wall_over_train']:.2f} x training ({split['train_runtime_s']:.2f} s); "
          f"first step after {split['time_to_first_step_process_s']:.2f} s", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


@dataclass
class Setup:
    """What a bench run composes from its arguments: the seed recipe's config (`base`), softprompt's
    (`ours`: with `--set`), the overrides both share, the device, precision and rows."""

    base: Any
    ours: Any
    overrides: list[str]
    device: torch.device
    precision: str
    splits: Any
    threads: int


def setup(args: argparse.Namespace) -> Setup:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SOFTPROMPT_QUIET", "1")
    from hydra import compose, initialize_config_dir

    from softprompt.core.config import CONF_DIR, validate
    from softprompt.core.device import resolve_device
    from softprompt.core.precision import resolve_precision
    from softprompt.data.loading import load_splits

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    data = ["dataset=prompts_sample"] if args.data == "bundled" else [
        f"dataset.path={args.data}", f"dataset.text_column={args.text_column}"]
    overrides = [f"model={args.model}", *data, f"dataset.max_samples={args.max_samples or 'null'}",
                 f"training.batch_size={args.batch_size}", f"training.precision={args.precision}",
                 "peft.num_virtual_tokens=4", "peft.init=random", f"eval.max_new_tokens={args.gen_tokens}",
                 f"training.device={args.device}", "wandb.mode=disabled"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base_cfg = compose(config_name="config", overrides=overrides)
        ours_cfg = compose(config_name="config", overrides=overrides + list(args.set))
    validate(ours_cfg)
    device = resolve_device(args.device)
    precision = resolve_precision(ours_cfg.training.precision, device)
    return Setup(base_cfg, ours_cfg, overrides, device, precision, load_splits(base_cfg.dataset, base_cfg.seed),
                 threads)


def describe(args: argparse.Namespace, run: Setup, steps: int) -> dict:
    """The JSON's head: what was measured, on what."""
    # the file's name and the rows' fingerprint name the data; the path is only this machine's
    data_name = args.data if args.data == "bundled" else Path(args.data).name
    device = run.device
    return {"model": args.model, "data": data_name, "data_fingerprint": run.splits.fingerprint(),
            "train_rows": len(run.splits.train), "batch_size": args.batch_size, "timed_steps": steps,
            "warmup_steps": args.warmup_steps, "precision": run.precision, "threads": run.threads,
            "overrides": list(args.set), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()}


def run_info() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu_flags": _cpu_flags(), "commit": git_commit()}


def measure(argv=None) -> dict:
    args = parse_args(argv)
    from hydra import compose, initialize_config_dir
    from transformers import set_seed

    from softprompt.core.config import CONF_DIR
    from softprompt.core.precision import autocast_dtype, resolve_precision

    run = setup(args)
    base_cfg, ours_cfg, overrides, device, precision, splits = (run.base, run.ours, run.overrides, run.device,
                                                                 run.precision, run.splits)
    steps = args.steps or math.ceil(len(splits.train) / args.batch_size)
    result = describe(args, run, steps)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # measured before and after training, the larger kept: one reading can be disturbed by load
    peak_before = matmul_peak_flops(dtype, device=device)
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as tmp:
        if not args.skip_seed:
            set_seed(base_cfg.seed)
            result["seed_recipe"] = seed_recipe(base_cfg, splits.train, steps, args.warmup_steps, Path(tmp) / "seed")
        set_seed(ours_cfg.seed)
        ours, loaded, model, val_rows, n_virtual = softprompt_path(ours_cfg, splits, steps, args.warmup_steps,
                                                                   precision)
        for spec in args.variant:
            name, _, sets = spec.partition(":")
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                vcfg = compose(config_name="config", overrides=overrides + list(args.set) + sets.split(","))
            set_seed(vcfg.seed)
            vres = softprompt_path(vcfg, splits, steps, args.warmup_steps,
                                   resolve_precision(vcfg.training.precision, device))[0]
            result.setdefault("variants", {})[name] = vres | {
                "overrides": sets.split(","), "speedup_of_default": ours["tokens_per_s"] / vres["tokens_per_s"]}
    result["softprompt"] = ours
    if "seed_recipe" in result:
        result["ratio"] = ours["tokens_per_s"] / result["seed_recipe"]["tokens_per_s"]
    result["matmul_peak_flops"] = max(peak_before, matmul_peak_flops(dtype, device=device))
    n = matmul_params(loaded.model)
    result["flops_per_token"] = 4 * n
    result["flops_formula"] = FLOPS_FORMULA
    result["mfu"] = ours["tokens_per_s"] * 4 * n / result["matmul_peak_flops"]
    for variant in result.get("variants", {}).values():  # against the same seed run and matmul peak
        variant["mfu"] = variant["tokens_per_s"] * 4 * n / result["matmul_peak_flops"]
        if "seed_recipe" in result:
            variant["ratio"] = variant["tokens_per_s"] / result["seed_recipe"]["tokens_per_s"]
    if not args.skip_eval:
        result |= eval_and_generation(ours_cfg, loaded, model, val_rows, n_virtual, splits,
                                      autocast_dtype(ours_cfg.eval.precision, device), ours["heldout_perplexity_after"])
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["run_info"] = run_info()
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result
