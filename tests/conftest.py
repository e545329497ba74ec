"""Shared test set-up: offline, CPU only, every cache in a temp dir; tiny models and runs.

The environment is set at import time, before any test module imports transformers, datasets
or wandb, which read these variables once.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout under test, also from a git worktree

# One temp dir for the whole test run, removed when it ends (a run left ~0.5 GB behind, the
# converted SmolLM2, and a full /tmp fails the next run). pytest itself, or pytest-xdist's
# controller, makes it; xdist's workers (`make test` runs one per core) inherit it through the
# environment and share softprompt's cache in it, so the converted SmolLM2 is built once, not once
# per worker. The cache is made for concurrent processes (each entry built once, atomically:
# tests/test_cache.py); tests that need a cold one set their own. Every process keeps its own
# HF, XDG and W&B directories below it.
_OWNER = "SOFTPROMPT_TESTS_TMP" not in os.environ
if _OWNER:
    os.environ["SOFTPROMPT_TESTS_TMP"] = tempfile.mkdtemp(prefix="softprompt-tests-")
    atexit.register(shutil.rmtree, os.environ["SOFTPROMPT_TESTS_TMP"], ignore_errors=True)
_SHARED = Path(os.environ["SOFTPROMPT_TESTS_TMP"])
_TMP = _SHARED / f"process-{os.getpid()}"
_TMP.mkdir()
_CACHE = _SHARED / "softprompt-cache"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HOME": str(_TMP / "hf"),
    "HF_DATASETS_CACHE": str(_TMP / "hf" / "datasets"),
    "XDG_CACHE_HOME": str(_TMP / "xdg"),
    "SOFTPROMPT_CACHE": str(_CACHE),
    "WANDB_CACHE_DIR": str(_TMP / "wandb-cache"),
    "WANDB_CONFIG_DIR": str(_TMP / "wandb-config"),
    "WANDB_DATA_DIR": str(_TMP / "wandb-data"),
    "SOFTPROMPT_QUIET": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
}
os.environ.update(OFFLINE_ENV)
# WANDB_DIR/PROJECT/ENTITY/TAGS would move or rename the test runs (softprompt honours them)
for var in ("WANDB_API_KEY", "HF_TOKEN", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS"):
    os.environ.pop(var, None)

# A tiny, fast job: 2-layer Llama with a 512-token BPE vocabulary, 4 optimizer steps.
TINY = [
    "model=tiny-llama",
    "dataset=prompts_sample",
    "training.epochs=1",
    "training.max_steps=4",
    "training.learning_rate=0.3",
    "eval.max_new_tokens=8",
    "eval.num_heldout_generations=2",
    "wandb.mode=offline",
]


def compose(overrides: list[str] | None = None):
    """The real config, composed as `python train.py OVERRIDES` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from softprompt.core.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def child_env(extra: dict | None = None) -> dict:
    """The environment for a child process: this one's, minus what ties it to this process.

    wandb exports WANDB_SERVICE once this process has started a W&B run, so that children attach
    to the same wandb-core service; a child killed mid-run would then leave its run "in use" in
    our service, and a resumed child could not continue it. Children get their own service.
    """
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return env | {"PYTHONPATH": str(ROOT / "src")} | (extra or {})


def side_by_side_words(out: str, width: int = 200) -> tuple[list[str], list[str]]:
    """The words of the base and the tuned column of `scripts/generate.py`'s first side-by-side
    block, printed at COLUMNS=`width`. Words, not lines: the CLI wraps at the column width and at any
    line boundary in the text (a random tiny model's output can hold \\x0b, which
    str.splitlines() breaks on), so lines are split on "\\n" only and the columns cut at their width."""
    lines = out.split("\n")
    start = next(i for i, line in enumerate(lines) if "- base -" in line) + 1
    body = lines[start:lines.index("", start)]
    col = (width - 3) // 2  # two columns with " | " between them
    assert body and all(line[col:col + 3].rstrip() == " |" for line in body)
    return (" ".join(line[:col] for line in body).split(), " ".join(line[col + 3:] for line in body).split())


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            script: str = "train.py") -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess (for exit codes, stderr and Hydra itself)."""
    full_env = child_env(env)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny run, shared by the tests that only read its outputs: (run_dir, metrics)."""
    from softprompt.train.run import run

    run_dir = tmp_path_factory.mktemp("tiny-run")
    metrics = run(compose(TINY), run_dir=run_dir)
    return run_dir, metrics
