"""Data: read the text column (Hub, local file or bundled sample), split it, tokenize it (cached).

Texts are plain Python lists and token ids plain lists of ints: the samples are small and the
real datasets a few thousand rows, so an Arrow round-trip per run would cost more than it saves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from softprompt.core import cache, hub
from softprompt.core.errors import UserError
from softprompt.data.bundled import bundled_path

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TextSplits:
    train: list[str]
    validation: list[str]
    source: str  # where the rows came from, for logs and run records

    def fingerprint(self) -> str:
        """A short hash of the exact rows and their split, so caches and W&B runs can name the data."""
        digest = hashlib.sha256()
        for split in (self.train, self.validation):
            digest.update(json.dumps(split, ensure_ascii=False).encode())
            digest.update(b"\x00split\x00")
        return digest.hexdigest()[:16]


def load_splits(cfg: DictConfig, seed: int) -> TextSplits:
    """Read, clean, cap and split the texts; every failure a user can fix is a UserError."""
    if cfg.path:
        table, source = _read_local(Path(cfg.path).expanduser()), str(cfg.path)
    elif cfg.bundled:
        table, source = _read_local(bundled_path(cfg.bundled)), f"bundled:{cfg.bundled}"
    else:
        table, source = _read_hub(cfg.hub_id, cfg.hub_split), f"hub:{cfg.hub_id}"
    if cfg.text_column not in table.column_names:
        raise UserError(
            f"dataset {source} has no column {cfg.text_column!r}; its columns are "
            f"{', '.join(table.column_names)} (set dataset.text_column=...)"
        )
    texts = [t.strip() for t in table[cfg.text_column] if isinstance(t, str)]
    texts = [t for t in texts if len(t) >= cfg.min_chars]
    rng = random.Random(seed)
    rng.shuffle(texts)
    if cfg.max_samples is not None:
        texts = texts[: cfg.max_samples]
    if len(texts) < 2:
        raise UserError(
            f"dataset {source} has {len(texts)} usable rows in column {cfg.text_column!r} "
            f"(non-empty, >= {cfg.min_chars} chars); at least 2 are needed for a train/validation split"
        )
    n_val = min(len(texts) - 1, max(1, round(len(texts) * cfg.validation_fraction)))
    return TextSplits(train=texts[n_val:], validation=texts[:n_val], source=source)


class _Columns:
    """The two things load_splits reads from a table: `column_names` and `table[column]`."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name: str) -> list:
        return self.columns[name]


def _read_csv(path: Path) -> _Columns:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or [])
        rows = list(reader)
    return _Columns({name: [row.get(name) for row in rows] for name in names})


def _read_local(path: Path):

    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist (dataset.path); give a csv/json/jsonl/parquet file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"dataset file {path} has unsupported format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if not os.access(path, os.R_OK):
        raise UserError(f"dataset file {path} is not readable; check its permissions")
    if fmt == "csv":
        # the stdlib reads a small CSV in milliseconds; `datasets` takes seconds to import and to
        # build and cache an Arrow copy (part of the time to the first training step)
        try:
            return _read_csv(path)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UserError(f"could not read {path} as csv: {type(exc).__name__}: {exc}") from exc
    from datasets import load_dataset

    try:
        return load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # the builders raise many types for a malformed file
        raise UserError(f"could not read {path} as {fmt}: {type(exc).__name__}: {exc}") from exc


def _read_hub(hub_id: str, split: str):
    import datasets
    import huggingface_hub.constants

    if not hub.reachable():
        # let cached copies of Hub datasets still work, without the libraries' retries
        datasets.config.HF_HUB_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as exc:
        if not hub.reachable():
            raise UserError(
                f"the Hugging Face Hub is unreachable and dataset {hub_id!r} is not cached; use "
                "dataset=prompts_sample or dataset=quotes_sample (bundled), or dataset.path=FILE"
            ) from exc
        raise UserError(f"could not load dataset {hub_id!r} from the Hub: {type(exc).__name__}: {exc}") from exc


# --- tokenization ------------------------------------------------------------------------------


def tokenize(texts: list[str], tokenizer, max_length: int, tokenizer_id: str) -> list[list[int]]:
    """Token ids per text, EOS appended, truncated to max_length; cached on disk.

    The cache key holds the texts, the tokenizer (its id and vocabulary size) and max_length, so
    every job of a sweep over PEFT settings reuses one tokenization.
    """
    key = hashlib.sha256(
        json.dumps([tokenizer_id, len(tokenizer), tokenizer.eos_token_id, max_length, texts], ensure_ascii=False).encode()
    ).hexdigest()[:20]

    def compute() -> list[list[int]]:
        encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
        # EOS teaches the prompt where a text ends, so generations stop instead of running on
        return [list(row) + [tokenizer.eos_token_id] for row in encoded]

    ids, _ = cache.json_entry("tokens", key, compute, check=_token_rows)
    return ids


def _token_rows(value) -> list[list[int]]:
    if not (isinstance(value, list) and all(isinstance(row, list) for row in value)):
        raise TypeError("not a list of token rows")
    return value
