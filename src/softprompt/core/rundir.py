"""The run directory: every file a run leaves, named once, written atomically.

Layout (the names users, scripts and the README rely on: keep them):

    RUN/
      config.json          the resolved config, data fingerprint, provenance (written at start)
      wandb_run_id         the W&B run id, so a resumed attempt logs into the same W&B run
      preempted            the signal that preempted the run; present until it finishes (a rerun resumes)
      checkpoints/         atomic training checkpoints (softprompt.train.checkpoints)
      wandb/               W&B's own run files (wandb.init(dir=RUN))
      adapter/             PeftModel.save_pretrained output + softprompt.json (our record)
      generations.jsonl    one object per eval prompt: prompt, base, tuned (, reference)
      history.jsonl        one object per logged training step and per evaluation, in order
      prompt_tokens.jsonl  nearest vocabulary tokens per virtual token (prompt tuning, p-tuning)
      metrics.json         written LAST: its presence means the run finished
      failed.json          a job that failed (its error, its history); a pack's other jobs went on
      .hydra/, train.log   Hydra's (when run through Hydra)

Nothing else in the code base spells these names: writers call the `write_*` methods, readers
the `read_*` methods or the path properties. Every file write goes through `_write`, the one
place a fault (a full disk, say) can be injected in a test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from softprompt.core import atomic
from softprompt.core.errors import disk_full, is_disk_full

# what a user does after a full disk: the checkpoints are intact, so the run continues from them
_AFTER_DISK_FULL = "free some space and rerun the same command with training.resume=true"


class RunDir:
    ADAPTER = "adapter"
    ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name, inside adapter/
    ADAPTER_RECORD = "softprompt.json"  # ours, inside adapter/: base model, tokenizer, configs, metrics
    METRICS = "metrics.json"
    CONFIG = "config.json"
    GENERATIONS = "generations.jsonl"
    HISTORY = "history.jsonl"
    PROMPT_TOKENS = "prompt_tokens.jsonl"
    FAILED = "failed.json"  # softprompt.train.pack: a job that failed while the rest of its pack went on
    WANDB = "wandb"
    WANDB_RUN_ID = "wandb_run_id"
    PREEMPTED = "preempted"
    CHECKPOINTS = "checkpoints"
    HYDRA = ".hydra"  # Hydra's own: config.yaml, overrides.yaml
    # files and folders whose presence marks a directory as a run directory, finished or not
    MARKERS = (METRICS, CONFIG, HISTORY, HYDRA, WANDB)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # --- paths ------------------------------------------------------------------------------------

    @property
    def adapter(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def adapter_record(self) -> Path:
        return self.adapter / self.ADAPTER_RECORD

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def generations(self) -> Path:
        return self.path / self.GENERATIONS

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    @property
    def prompt_tokens(self) -> Path:
        return self.path / self.PROMPT_TOKENS

    @property
    def failed(self) -> Path:
        return self.path / self.FAILED

    @property
    def wandb(self) -> Path:
        return self.path / self.WANDB

    @property
    def wandb_run_id(self) -> Path:
        return self.path / self.WANDB_RUN_ID

    @property
    def preempted(self) -> Path:
        return self.path / self.PREEMPTED

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def hydra_config(self) -> Path:
        return self.path / self.HYDRA / "config.yaml"

    # --- state ------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.metrics.is_file()

    @classmethod
    def is_run_dir(cls, path: str | Path) -> bool:
        """A run directory, finished or not (and not one of a run's own folders)."""
        path = Path(path)
        return (any((path / m).exists() for m in cls.MARKERS)
                and path.name not in (cls.WANDB, cls.HYDRA, cls.ADAPTER, cls.CHECKPOINTS))

    @classmethod
    def holding_adapter(cls, path: str | Path) -> Path | None:
        """The adapter folder `path` is or holds in `adapter/`, None when neither has a PEFT config."""
        path = Path(path)
        if (path / cls.ADAPTER_CONFIG).is_file():
            return path
        if (path / cls.ADAPTER / cls.ADAPTER_CONFIG).is_file():
            return path / cls.ADAPTER
        return None

    @classmethod
    def of_adapter(cls, adapter_dir: str | Path) -> RunDir | None:
        """The run directory an adapter folder belongs to (None for a bare adapter folder)."""
        adapter_dir = Path(adapter_dir)
        return cls(adapter_dir.parent) if adapter_dir.name == cls.ADAPTER else None

    # --- reading ----------------------------------------------------------------------------------

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text(encoding="utf-8"))

    def read_config(self) -> dict[str, Any] | None:
        """config.json, None where the run has none (yet)."""
        return json.loads(self.config.read_text(encoding="utf-8")) if self.config.is_file() else None

    def read_history(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.history) if self.history.is_file() else []

    def read_generations(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.generations)

    def read_prompt_tokens(self) -> list[dict[str, Any]] | None:
        """prompt_tokens.jsonl rows (docs/methods.md), None for runs without (LoRA, prefix tuning)."""
        return _read_jsonl(self.prompt_tokens) if self.prompt_tokens.is_file() else None

    def read_preempted(self) -> str | None:
        """The signal name of a preemption this run has not recovered from yet, else None."""
        return (self.preempted.read_text().strip() or "preempted") if self.preempted.is_file() else None

    def read_wandb_run_id(self) -> str | None:
        return (self.wandb_run_id.read_text().strip() or None) if self.wandb_run_id.is_file() else None

    # --- writing: metrics.json last -----------------------------------------------------------------

    def start(self) -> None:
        """Create the directory; a rerun in it is not finished until it writes metrics.json again."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics.unlink(missing_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        self._write(self.config, _json(config))

    def write_wandb_run_id(self, run_id: str) -> None:
        self._write(self.wandb_run_id, run_id + "\n")

    def write_preempted(self, signal_name: str) -> None:
        self._write(self.preempted, signal_name + "\n")

    def forget_preempted(self) -> None:
        self.preempted.unlink(missing_ok=True)

    def forget_wandb_run_id(self) -> None:
        self.wandb_run_id.unlink(missing_ok=True)

    def write_adapter(self, save: Callable[[Path], None], record: dict[str, Any]) -> Path:
        """`save(folder)` (e.g. PeftModel.save_pretrained) into a temp folder beside adapter/, our
        record beside it, then one rename: adapter/ is either the old one or the complete new one."""
        staging = Path(tempfile.mkdtemp(prefix=f".{self.ADAPTER}.tmp-", dir=self.path))
        try:
            save(staging)
            self._write(staging / self.ADAPTER_RECORD, _json(record))
            _replace_dir(staging, self.adapter)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.adapter

    def write_generations(self, rows: Iterable[dict[str, Any]]) -> None:
        self._write(self.generations, _jsonl(rows))

    def write_history(self, rows: Iterable[dict[str, Any]]) -> None:
        self._write(self.history, _jsonl(rows))

    def write_prompt_tokens(self, rows: Iterable[dict[str, Any]]) -> None:
        self._write(self.prompt_tokens, _jsonl(rows))

    def write_failed(self, record: dict[str, Any]) -> None:
        """A job of a pack that failed (e.g. a NaN loss) while the rest of its pack went on."""
        self._write(self.failed, _json(record))

    def finish(self, metrics: dict[str, Any]) -> None:
        """metrics.json, the run's last write: from here on the run counts as finished."""
        self._write(self.metrics, _json(metrics))
        self.forget_preempted()

    def _write(self, path: Path, text: str) -> None:
        # the one seam every file write of a run passes (tests inject write failures here); a full
        # disk leaves the old file (atomic) and ends the run with one `error:` line
        try:
            atomic.write_text(path, text)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise disk_full(path.name, path.parent, len(text.encode("utf-8")), _AFTER_DISK_FULL) from exc


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"


def _jsonl(rows: Iterable[Any]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _replace_dir(src: Path, dst: Path) -> None:
    # os.replace cannot replace a non-empty directory: move the old one aside first, so a reader
    # never finds dst missing for longer than between two renames
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
