"""Start-up path: the stdlib CSV reader gives what `datasets` gives; time to first step and the
run's wall-time split (`time/*`) are recorded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

from conftest import child_env

from softprompt.core import keys
from softprompt.core.rundir import RunDir


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
    # from run() entry to the end of the first optimizer step; the process's own start (pytest's,
    # here) is earlier still
    assert 0 < metrics[keys.TRAIN_TIME_TO_FIRST_STEP_S] < metrics[keys.TRAIN_TIME_TO_FIRST_STEP_PROCESS_S] < 3600


def test_run_records_where_its_wall_time_went(tiny_run):
    run_dir, metrics = tiny_run
    phases = {k: metrics[k] for k in keys.TIME_PHASES}
    assert all(v >= 0 for v in phases.values()), phases
    total = metrics[keys.TIME_TOTAL_S]
    # consecutive phases from run() entry to metrics.json: they tile the run
    assert abs(sum(phases.values()) - total) <= 0.1 * total
    # each phase holds what it names: training is the train loop (train/runtime_s is the loop
    # without its set-up), the first step lies after start-up and base evaluation
    assert metrics[keys.TIME_TRAIN_S] >= metrics[keys.TRAIN_RUNTIME_S] > 0
    assert metrics[keys.TIME_TUNED_EVAL_S] >= metrics[keys.EVAL_TUNED_RUNTIME_S] > 0
    before_training = metrics[keys.TIME_STARTUP_S] + metrics[keys.TIME_BASE_EVAL_S]
    assert before_training < metrics[keys.TRAIN_TIME_TO_FIRST_STEP_S] < before_training + metrics[keys.TIME_TRAIN_S]
    assert metrics[keys.TIME_SAVE_S] > 0
    # written to metrics.json as returned
    assert {k: v for k, v in json.loads(RunDir(run_dir).metrics.read_text()).items() if k.startswith("time/")} \
        == {k: v for k, v in metrics.items() if k.startswith("time/")}


def test_process_start_is_exact_to_a_tick():
    """psutil's create_time() adds /proc/stat's whole-second boot time: up to 1 s off (0.75 s on
    the dev VM), which went straight into train/time_to_first_step_process_s."""
    code = ("import time; from softprompt.core.clock import process_start; "
            "print(time.time() - process_start())")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env())
    wall = time.time() - start
    age = float(out.stdout)
    # the child's age when it asked: its imports (torch, ...), less than the whole call took
    assert 0 < age <= wall + 0.02, (age, wall)
