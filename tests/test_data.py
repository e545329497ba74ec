"""Data: every local format, a seeded split, bundled samples, cached tokenization."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import compose

from softprompt.data.bundled import bundled_path
from softprompt.data.loading import load_splits, tokenize

TEXTS = [f"I want you to act as role number {i}, and answer briefly." for i in range(20)]


def _write(path, fmt):
    frame = pd.DataFrame({"act": [f"Role {i}" for i in range(20)], "prompt": TEXTS})
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
def test_local_files_of_every_format(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    _write(path, fmt)
    cfg = compose(["dataset=prompts", f"dataset.path={path}"])
    splits = load_splits(cfg.dataset, seed=42)
    assert len(splits.train) == 16 and len(splits.validation) == 4  # validation_fraction 0.2
    assert sorted(splits.train + splits.validation) == sorted(TEXTS)


def test_split_is_seeded_and_max_samples_caps():
    cfg = compose(["dataset=prompts_sample"])
    a, b = load_splits(cfg.dataset, seed=42), load_splits(cfg.dataset, seed=42)
    c = load_splits(cfg.dataset, seed=7)
    assert a.validation == b.validation and a.fingerprint() == b.fingerprint()
    assert a.validation != c.validation and a.fingerprint() != c.fingerprint()
    assert len(a.train) + len(a.validation) == 72
    capped = load_splits(compose(["dataset=prompts_sample", "dataset.max_samples=10"]).dataset, seed=42)
    assert (len(capped.train), len(capped.validation)) == (8, 2)


@pytest.mark.parametrize("name,column", [("prompts_sample", "prompt"), ("quotes_sample", "quote")])
def test_bundled_samples_have_the_hub_schemas(name, column):
    frame = pd.read_csv(bundled_path(f"{name}.csv"))
    expected = {"prompts_sample": ["act", "prompt"], "quotes_sample": ["quote", "author", "tags"]}[name]
    assert list(frame.columns) == expected
    assert len(frame) == 72 and frame[column].str.len().min() > 20


def test_tokenization_appends_eos_truncates_and_is_cached(monkeypatch):
    from softprompt.models.loading import load_model

    loaded = load_model(compose(["model=tiny-llama"]).model)
    tok = loaded.tokenizer
    rows = tokenize(TEXTS[:3], tok, max_length=8, tokenizer_id="t")
    assert all(len(r) <= 8 and r[-1] == tok.eos_token_id for r in rows)
    full = tokenize(TEXTS[:3], tok, max_length=512, tokenizer_id="t")
    assert full[0][:-1] == tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    # a second call is served from the cache: the tokenizer is not called again
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: pytest.fail("tokenizer called on a cache hit"))
    assert tokenize(TEXTS[:3], tok, max_length=8, tokenizer_id="t") == rows
