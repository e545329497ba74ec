"""`bench --memory`: the peak memory of training and evaluating prompt tuning, per base and setting.

Each setting (model x dtype x gradient checkpointing x batch size) runs the training CLI in a child
process of its own, so that one setting's peak is not another's, and under a guard:
- before it starts: the base's weights (parameters from its config, on the meta device, x the
  dtype's bytes) plus what a training process holds without them must fit in the memory available;
  a setting that clearly cannot fit is recorded as not fitting and never started;
- while it runs: its resident set (its children's included) is read every `POLL_S` and the process
  group is SIGKILLed once it passes the limit, before the kernel's OOM killer picks a victim (which
  could be this process, or the desktop).

The peak is the child's resident set on the CPU (the polled maximum, and the kernel's own maximum
from wait4, which catches what rose and fell between two polls); on CUDA it is the run's peak
allocated memory, which the run records itself (`memory/cuda_peak_allocated_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from softprompt.core import keys
from softprompt.experiments.bench import cpu_name, git_commit, train_command, train_env

GIB = 2**30
POLL_S = 0.2
# what a training process holds besides the base's weights: the interpreter, torch, transformers,
# the tokenizer (measured: 0.43 GiB peak RSS training tiny-llama, whose weights are 0.6 MB)
PROCESS_BYTES = int(0.45 * GIB)
# the default RSS limit leaves this much to the rest of the machine
HEADROOM_BYTES = int(1.5 * GIB)
# the run is what memory is measured on: no generation, no extra evaluation, no tracker; the data
# cut to 20 rows, a fifth of them (4) held out, so the held-out pass is small but still runs
RUN_OVERRIDES = ["dataset=prompts_sample", "dataset.max_samples=20", "dataset.validation_fraction=0.2",
                 "training.max_length=128", "peft.num_virtual_tokens=8", "eval.prompts=[]",
                 "eval.num_heldout_generations=0", "eval.per_epoch=false", "eval.cache_base=false",
                 "eval.train_perplexity_rows=0", "wandb.mode=disabled"]
# the special ids of a shape's tokenizer do not change its parameter count
_NO_TOKENIZER = SimpleNamespace(bos_token_id=None, eos_token_id=None, pad_token_id=None)


@dataclass(frozen=True)
class Setting:
    model: str
    dtype: str
    gradient_checkpointing: bool
    batch_size: int

    def overrides(self, steps: int, device: str) -> list[str]:
        return [f"model={self.model}", f"model.dtype={self.dtype}",
                f"training.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"training.batch_size={self.batch_size}", f"training.max_steps={steps}",
                f"training.device={device}", *RUN_OVERRIDES]

    def record(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "gradient_checkpointing": self.gradient_checkpointing,
                "batch_size": self.batch_size}


@dataclass
class Child:
    """How a guarded child process ended."""
    returncode: int
    peak_rss_bytes: int
    killed_at_bytes: int | None  # the RSS that got it killed; None: it ended by itself
    wall_s: float
    last_line: str  # its stderr's last non-empty line


# --- memory of this machine and of a process tree ----------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes, e.g. {"MemTotal": ..., "MemAvailable": ...}."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        fields = value.split()
        info[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return info


def _status_bytes(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status in bytes; 0 for a process that is gone or a zombie."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """The resident set of `pid` and all its descendants now."""
    import psutil

    try:
        descendants = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    return sum(_status_bytes(p, "VmRSS") for p in [pid, *descendants])


def _has_exited(pid: int) -> bool:
    # WNOWAIT: leave it a zombie, so that wait4 below still gets its resource usage
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _last_line(path: Path) -> str:
    # progress bars end their updates with \r, not \n
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def run_guarded(command: list[str], env: dict, limit_bytes: int, stderr_path: Path) -> Child:
    """Run `command`, SIGKILL its process group once its tree's RSS passes `limit_bytes`, and return
    its peak RSS: the largest tree total polled, or the kernel's maximum for the child itself
    (ru_maxrss from wait4), whichever is larger."""
    start = time.perf_counter()
    with stderr_path.open("wb") as stderr:
        # a session of its own: one killpg reaches the child's own children too
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    peak, killed_at = 0, None
    while not _has_exited(proc.pid):
        rss = tree_rss_bytes(proc.pid)
        peak = max(peak, rss)
        if killed_at is None and rss > limit_bytes:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = rss
        time.sleep(POLL_S)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    peak = max(peak, usage.ru_maxrss * 1024)  # Linux: kB
    return Child(proc.returncode, peak, killed_at, time.perf_counter() - start, _last_line(stderr_path))


# --- the guard's estimate ------------------------------------------------------------------------


def _model_config(model: str):
    """conf/model/MODEL.yaml, composed as a run would."""
    from hydra import compose, initialize_config_dir

    from softprompt.core.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"model={model}"]).model


def _meta_parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate_parameters(model_cfg) -> int | None:
    """The base's parameter count, without loading its weights; None where its config cannot be
    read here (a Hub model that is not in the local cache)."""
    from transformers import AutoConfig

    from softprompt.models import loading

    if model_cfg.source == "tiny":  # built in milliseconds: count the real thing
        return loading.count_parameters(loading.load_model(model_cfg).model)[1]
    if model_cfg.source == "shape":
        from softprompt.models.shapes import shape_config

        return _meta_parameters(shape_config(model_cfg, _NO_TOKENIZER))
    path = (loading.converted_gguf_dir(model_cfg.name_or_path, model_cfg.gguf_file)
            if model_cfg.source == "gguf_package" else model_cfg.name_or_path)
    try:
        # the guard downloads nothing: a model that is not here is the run's to fetch (or refuse)
        config = AutoConfig.from_pretrained(path, revision=model_cfg.revision, local_files_only=True,
                                            trust_remote_code=bool(model_cfg.trust_remote_code))
    except OSError:
        return None
    return _meta_parameters(config)


def weight_bytes(parameters: int, dtype: str, device: torch.device) -> int:
    from softprompt.core.precision import base_dtype

    return parameters * base_dtype(dtype, device).itemsize


def does_not_fit(weights: int, available: int) -> str | None:
    """Why a base of `weights` bytes cannot be trained in `available` bytes; None where it may."""
    if weights + PROCESS_BYTES <= available:
        return None
    return (f"does not fit: needs ~{weights / GIB:.3g} GiB of weights (+{PROCESS_BYTES / GIB:.2g} GiB for the "
            f"process), {available / GIB:.3g} GiB available")


# --- one setting ---------------------------------------------------------------------------------


def child_env() -> dict:
    return {"HF_HUB_OFFLINE": "1", "SOFTPROMPT_QUIET": "1"} | train_env()


def run_setting(setting: Setting, steps: int, device: torch.device, limit_bytes: int) -> tuple[Child, dict | None]:
    """Train and evaluate `setting` in a guarded child: (how it ended, its metrics.json or None)."""
    from softprompt.core.rundir import RunDir

    with tempfile.TemporaryDirectory(prefix="softprompt-memory-") as tmp:
        run_dir = Path(tmp) / "run"
        command = train_command([*setting.overrides(steps, device.type), f"hydra.run.dir={run_dir}"])
        child = run_guarded(command, child_env(), limit_bytes, Path(tmp) / "stderr.log")
        finished = child.returncode == 0 and RunDir(run_dir).finished
        return child, RunDir(run_dir).read_metrics() if finished else None


def measured(child: Child, metrics: dict, device: torch.device) -> dict:
    """The record of a setting that ran to the end."""
    parameters = metrics[keys.TRAIN_TOTAL_PARAMS] - metrics[keys.TRAIN_TRAINABLE_PARAMS]  # the frozen base
    cuda_peak = metrics.get(keys.MEMORY_CUDA_PEAK_ALLOCATED_BYTES) if device.type == "cuda" else None
    peak = cuda_peak if cuda_peak is not None else child.peak_rss_bytes
    return {"fits": True, "parameters": parameters, "peak_rss_bytes": child.peak_rss_bytes,
            "peak_cuda_allocated_bytes": cuda_peak,
            "peak_of": "cuda_allocated" if cuda_peak is not None else "rss",
            "bytes_per_parameter": peak / parameters,
            "train_tokens_per_s": metrics[keys.TRAIN_TOKENS_PER_SECOND],
            "train_precision": metrics[keys.TRAIN_PRECISION], "wall_s": child.wall_s,
            "heldout_perplexity": metrics[keys.EVAL_PERPLEXITY], "heldout_tokens": metrics[keys.EVAL_TOKENS]}


def failed(child: Child, limit_bytes: int) -> dict:
    """The record of a setting whose child was killed or failed."""
    out = {"peak_rss_bytes": child.peak_rss_bytes, "wall_s": child.wall_s}
    if child.killed_at_bytes is not None:
        return {"fits": False, "reason": f"does not fit: killed at {child.killed_at_bytes / GIB:.3g} GiB RSS, over "
                                         f"the {limit_bytes / GIB:.3g} GiB limit", **out}
    if "out of memory" in child.last_line.lower():  # torch.OutOfMemoryError: the device's memory, not ours
        return {"fits": False, "reason": f"does not fit: {child.last_line}", **out}
    return {"fits": None, "error": child.last_line or f"exit status {child.returncode}", **out}


def measure_setting(setting: Setting, parameters: int | None, steps: int, device: torch.device,
                    limit_bytes: int) -> dict:
    """One setting's record: not started where its weights cannot fit, else measured in a child."""
    record = setting.record() | {"parameters_estimate": parameters}
    if parameters is not None:
        weights = weight_bytes(parameters, setting.dtype, device)
        record["weight_bytes_estimate"] = weights
        reason = does_not_fit(weights, min(meminfo()["MemAvailable"], limit_bytes))
        if reason:
            return record | {"fits": False, "reason": reason}
    child, metrics = run_setting(setting, steps, device, limit_bytes)
    return record | (measured(child, metrics, device) if metrics else failed(child, limit_bytes))


# --- the whole benchmark -------------------------------------------------------------------------


def _bools(text: str) -> list[bool]:
    values = {"true": True, "false": False}
    try:
        return [values[v.strip().lower()] for v in text.split(",")]
    except KeyError as exc:
        raise argparse.ArgumentTypeError(f"expected true/false values, got {exc.args[0]!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in _names(text)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench --memory", description=__doc__.splitlines()[0])
    p.add_argument("--memory", action="store_true", required=True, help="this benchmark")
    p.add_argument("--memory-models", type=_names, default=_names("smollm2-135m,shape-llama-1b,shape-llama-8b"),
                   metavar="M1,M2", help="conf/model options, comma-separated")
    p.add_argument("--memory-dtypes", type=_names, default=_names("float32,bfloat16"), metavar="D1,D2",
                   help="model.dtype values")
    p.add_argument("--memory-checkpointing", type=_bools, default=[False, True], metavar="false,true",
                   help="training.gradient_checkpointing values")
    p.add_argument("--memory-batch-sizes", type=_ints, default=[2], metavar="B1,B2", help="training.batch_size values")
    p.add_argument("--memory-limit-gib", type=float, default=None, metavar="GIB",
                   help="SIGKILL a setting's process tree when its RSS passes this (default: MemTotal - 1.5 GiB)")
    p.add_argument("--memory-plot", default=None, metavar="FILE.svg|png", help="also plot bytes per parameter")
    p.add_argument("--steps", type=int, default=2, help="training.max_steps of each setting")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="training.device")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    _check_names(p, args)
    return args


def _check_names(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A misspelt model or dtype fails here, not after the settings before it have run."""
    from softprompt.core.config import CONF_DIR, MODEL_DTYPES

    models = sorted(f.stem for f in (CONF_DIR / "model").glob("*.yaml"))
    for model in args.memory_models:
        if model not in models:
            p.error(f"--memory-models: {model!r} is not one of {', '.join(models)}")
    for dtype in args.memory_dtypes:
        if dtype not in MODEL_DTYPES:
            p.error(f"--memory-dtypes: {dtype!r} is not one of {', '.join(MODEL_DTYPES)}")


def settings_of(args: argparse.Namespace) -> list[Setting]:
    return [Setting(m, d, c, b) for m in args.memory_models for d in args.memory_dtypes
            for c in args.memory_checkpointing for b in args.memory_batch_sizes]


def run_info(device: torch.device) -> dict:
    import transformers

    return {"cpu": cpu_name(), "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "mem_total_bytes": meminfo()["MemTotal"], "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "commit": git_commit()}


def _summary(record: dict) -> str:
    name = (f"{record['model']} {record['dtype']} checkpointing={str(record['gradient_checkpointing']).lower()} "
            f"batch={record['batch_size']}")
    if record.get("fits"):
        return (f"{name}: peak {record['peak_rss_bytes'] / GIB:.2f} GiB RSS, {record['bytes_per_parameter']:.1f} "
                f"B/parameter, {record['train_tokens_per_s']:.0f} tokens/s, {record['wall_s']:.1f} s")
    return f"{name}: {record.get('reason') or 'failed: ' + record['error']}"


def run_memory(argv: list[str]) -> dict:
    """`--memory [...]`: every setting in a guarded child; prints the JSON (and a line per setting
    on stderr), writes it to --out and the plot to --memory-plot."""
    args = parse_args(argv)
    from softprompt.core.device import resolve_device

    device = resolve_device(args.device)
    total = meminfo()["MemTotal"]
    limit = int(args.memory_limit_gib * GIB) if args.memory_limit_gib is not None else total - HEADROOM_BYTES
    estimates = {m: estimate_parameters(_model_config(m)) for m in args.memory_models}
    records = []
    for setting in settings_of(args):
        records.append(measure_setting(setting, estimates[setting.model], args.steps, device, limit))
        print(_summary(records[-1]), file=sys.stderr, flush=True)
    result = {"memory": records,
              "common": {"steps": args.steps, "overrides": RUN_OVERRIDES, "rss_limit_bytes": limit, "poll_s": POLL_S},
              "run_info": run_info(device)}
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.memory_plot:
        write_plot(records, Path(args.memory_plot))
    return result


# --- the plot ------------------------------------------------------------------------------------


def _label(record: dict) -> str:
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(record["dtype"], record["dtype"])
    return f"{dtype}{' ckpt' if record['gradient_checkpointing'] else ''} b{record['batch_size']}"


def write_plot(records: list[dict], path: Path) -> Path:
    """Bytes per parameter per model (groups) and setting (bars), each bar labelled with its peak in
    GiB; a setting that does not fit is named where its bar would be."""
    from softprompt.core.errors import import_extra

    import_extra("matplotlib", "report", "the memory plot needs it").use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    labels = list(dict.fromkeys(_label(r) for r in records))
    width = 0.8 / len(labels)
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(models) * max(1, len(labels) / 3)), 4.4))
    values = [r["bytes_per_parameter"] for r in records if r.get("fits")]
    if values and max(values) > 20 * min(values):  # a tiny model's runtime dwarfs its weights
        ax.set_yscale("log")
    in_legend: set[str] = set()
    for record in records:
        label = _label(record)
        x = models.index(record["model"]) + (labels.index(label) - (len(labels) - 1) / 2) * width
        if record.get("fits"):
            value = record["bytes_per_parameter"]
            ax.bar(x, value, width, color=cmap(labels.index(label) % cmap.N),
                   label=None if label in in_legend else label)
            in_legend.add(label)
            peak = record["peak_cuda_allocated_bytes"] or record["peak_rss_bytes"]
            ax.annotate(f"{peak / GIB:.2g}", (x, value), ha="center", va="bottom", fontsize=7)
        else:
            ax.annotate("does not fit" if record.get("fits") is False else "error", (x, 0.02), rotation=90,
                        ha="center", va="bottom", fontsize=7, xycoords=("data", "axes fraction"))
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("peak bytes per base parameter")
    ax.set_title("Prompt tuning: peak memory per parameter (on the bars: peak GiB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
