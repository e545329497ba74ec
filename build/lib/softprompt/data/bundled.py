"""The small sample datasets that ship inside the package (written by this project)."""

from __future__ import annotations

import csv
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
# file -> its text column, mirroring fka/awesome-chatgpt-prompts and Abirate/english_quotes
BUNDLED = {"prompts_sample.csv": "prompt", "quotes_sample.csv": "quote"}


def bundled_files() -> list[Path]:
    return [DATA_DIR / name for name in sorted(BUNDLED)]


def bundled_path(name: str) -> Path:
    return DATA_DIR / name


def bundled_texts() -> list[str]:
    texts = []
    for name, column in sorted(BUNDLED.items()):
        with open(DATA_DIR / name, newline="", encoding="utf-8") as f:
            texts.extend(row[column] for row in csv.DictReader(f))
    return texts
