"""Start-up path: the stdlib CSV reader gives what `datasets` gives; time to first step is recorded."""

from __future__ import annotations

import csv

from softprompt.core import keys


def test_csv_reader_matches_datasets(tmp_path):
    from datasets import load_dataset

    from softprompt.data.loading import _read_csv

    file = tmp_path / "t.csv"
    with file.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["act", "prompt"])
        w.writerow(["Poet", 'line one\nline "two", with comma'])
        w.writerow(["Café", "ünïcode text"])
    ours, theirs = _read_csv(file), load_dataset("csv", data_files=str(file), split="train")
    assert ours.column_names == theirs.column_names == ["act", "prompt"]
    assert ours["prompt"] == theirs["prompt"] == ['line one\nline "two", with comma', "ünïcode text"]
    assert ours["act"] == ["Poet", "Café"]


def test_time_to_first_step_in_metrics(tiny_run):
    _, metrics = tiny_run
    # from process start (pytest's, here) to the end of the first optimizer step
    assert 0 < metrics[keys.TRAIN_TIME_TO_FIRST_STEP_S] < 3600
