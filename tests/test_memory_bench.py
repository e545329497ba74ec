"""`bench --memory` on tiny-llama: a record per setting with real peaks, and the guard that keeps a
setting that cannot fit from starting, or kills it before the kernel's OOM killer does."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from conftest import compose

from softprompt.experiments import memory_bench
from softprompt.experiments.memory_bench import GIB

MIB = 2**20
TINY_SETTINGS = ["--memory", "--memory-models", "tiny-llama", "--memory-checkpointing", "false", "--device", "cpu"]


def _printed(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_memory_bench_records_every_setting_of_tiny_llama(tmp_path, capsys):
    from softprompt.experiments.bench import main
    from softprompt.models.loading import count_parameters, load_model

    out, plot = tmp_path / "memory.json", tmp_path / "memory.svg"
    assert main([*TINY_SETTINGS, "--memory-dtypes", "float32,bfloat16", "--out", str(out),
                 "--memory-plot", str(plot)]) == 0
    printed = _printed(capsys)
    assert printed == json.loads(out.read_text())
    tiny_parameters = count_parameters(load_model(compose(["model=tiny-llama"]).model).model)[1]
    assert tiny_parameters == 155968  # 512 x 64 tied embedding, 2 layers of 61,568, the final norm
    records = printed["memory"]
    assert [(r["model"], r["dtype"], r["gradient_checkpointing"], r["batch_size"]) for r in records] == [
        ("tiny-llama", "float32", False, 2), ("tiny-llama", "bfloat16", False, 2)]
    for record, itemsize in zip(records, (4, 2)):
        assert record["fits"] is True and "error" not in record, record
        assert record["parameters"] == record["parameters_estimate"] == tiny_parameters
        assert record["weight_bytes_estimate"] == itemsize * tiny_parameters
        # torch and transformers alone hold more than 200 MB; the machine has less than its total
        assert 200 * MIB < record["peak_rss_bytes"] < printed["run_info"]["mem_total_bytes"]
        assert record["peak_of"] == "rss" and record["peak_cuda_allocated_bytes"] is None
        assert record["bytes_per_parameter"] == record["peak_rss_bytes"] / record["parameters"]
        assert record["train_tokens_per_s"] > 0 and record["wall_s"] > 0
        assert record["heldout_perplexity"] > 1 and record["heldout_tokens"] > 0
    # the held-out pass is the same 4 rows whatever the dtype
    assert records[0]["heldout_tokens"] == records[1]["heldout_tokens"]
    assert printed["common"]["rss_limit_bytes"] == printed["run_info"]["mem_total_bytes"] - int(1.5 * GIB)
    assert printed["run_info"]["cpu"] and printed["run_info"]["torch"]
    assert plot.read_text().lstrip().startswith("<?xml") and "tiny-llama" in plot.read_text()


@pytest.mark.parametrize("squeeze", ["limit", "available"])
def test_the_guard_does_not_start_a_setting_that_cannot_fit(monkeypatch, capsys, squeeze):
    def no_child(*args, **kwargs):
        raise AssertionError("a setting that cannot fit was started")

    monkeypatch.setattr(memory_bench, "run_guarded", no_child)
    argv = [*TINY_SETTINGS, "--memory-dtypes", "float32"]
    if squeeze == "limit":
        argv += ["--memory-limit-gib", "0.1"]
    else:
        real = memory_bench.meminfo()
        monkeypatch.setattr(memory_bench, "meminfo", lambda: real | {"MemAvailable": 100 * MIB})
    (record,) = memory_bench.run_memory(argv)["memory"]
    assert record["fits"] is False and "peak_rss_bytes" not in record
    # tiny-llama's weights are 0.6 MB: the process around them is what cannot fit
    assert record["reason"] == (f"does not fit: needs ~{4 * 155968 / GIB:.3g} GiB of weights (+0.45 GiB for the "
                                f"process), {100 * MIB / GIB if squeeze == 'available' else 0.1:.3g} GiB available")
    assert "does not fit" in capsys.readouterr().err


def test_the_guard_kills_a_setting_that_passes_the_rss_limit(monkeypatch):
    monkeypatch.setattr(memory_bench, "PROCESS_BYTES", 0)  # past the estimate: the run itself must be stopped
    limit = 0.15  # GiB: a bare interpreter holds ~10 MB, importing torch ~300 MB
    start = time.perf_counter()
    (record,) = memory_bench.run_memory([*TINY_SETTINGS, "--memory-dtypes", "float32",
                                         "--memory-limit-gib", str(limit)])["memory"]
    assert time.perf_counter() - start < 15  # killed while importing, long before a run's 7 s
    assert record["fits"] is False and "parameters" not in record, record
    assert record["reason"].startswith("does not fit: killed at ") and record["reason"].endswith(
        f"GiB RSS, over the {limit:.3g} GiB limit")
    assert record["peak_rss_bytes"] > limit * GIB


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_guarded_counts_and_kills_the_childs_own_children(tmp_path):
    """The RSS that counts is the whole tree's: a grandchild's allocation gets the group killed."""
    pid_file = tmp_path / "grandchild.pid"
    grandchild = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                  f"b = b'x' * {400 * MIB}; time.sleep(60)")
    command = [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"]
    child = memory_bench.run_guarded(command, dict(os.environ), 200 * MIB, tmp_path / "stderr.log")
    assert child.killed_at_bytes is not None and child.killed_at_bytes > 200 * MIB
    assert child.returncode == -9 and child.wall_s < 30
    deadline = time.monotonic() + 5  # the grandchild is reparented to init, which reaps it
    while _alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(int(pid_file.read_text()))


def test_run_guarded_peak_catches_what_rose_between_two_polls(tmp_path):
    """300 MB held for far less than a poll interval still counts (the kernel's maximum, wait4)."""
    command = [sys.executable, "-c", f"import sys; b = b'x' * {300 * MIB}; del b; sys.exit('error: done')"]
    child = memory_bench.run_guarded(command, dict(os.environ), 4 * GIB, tmp_path / "stderr.log")
    assert child.killed_at_bytes is None and child.returncode == 1
    assert child.peak_rss_bytes > 300 * MIB
    assert child.last_line == "error: done"


def test_shape_parameters_come_from_the_config_alone():
    """The guard's estimate for the large shapes: their published parameter counts, no weights built."""
    assert memory_bench.estimate_parameters(compose(["model=shape-llama-1b"]).model) == 1_235_814_400
    assert memory_bench.estimate_parameters(compose(["model=shape-llama-8b"]).model) == 8_030_261_248
