"""The offline W&B run-file reader, against files that wandb itself wrote (no network), and the
tracker's own check of a run file's tail for the exit record."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import pytest
from conftest import child_env

from softprompt.core.rundir import RunDir
from softprompt.track.records import (
    BLOCK_LEN,
    RecordFileError,
    iter_records,
    read_run,
)
from softprompt.track.wandb_run import ends_with_exit_record, wait_for_exit_record


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory):
    """A run written by plain wandb calls, with a config value larger than a 32 KiB block."""
    import wandb

    run_dir = tmp_path_factory.mktemp("direct")
    big = "x" * (BLOCK_LEN * 2 + 123)  # forces FIRST/MIDDLE/LAST fragments
    run = wandb.init(project="p", name="direct-run", group="g", tags=["a", "b"], dir=str(run_dir),
                     mode="offline", config={"nested": {"lr": 0.1, "n": 3}, "big": big},
                     reinit="create_new")
    for step in range(5):
        run.log({"loss": 1.0 / (step + 1), "step": step})
    run.log({"tbl": wandb.Table(columns=["a", "b"], data=[[1, "x"], [2, "y"]])})
    run.summary["final"] = 42
    run.finish()
    assert wait_for_exit_record(run.settings.sync_file)
    return run_dir, run.id, big


def test_reads_config_history_summary_and_table(direct_run):
    run_dir, run_id, big = direct_run
    r = read_run(run_dir)
    assert (r.run_id, r.name, r.project, r.group, r.tags) == (run_id, "direct-run", "p", "g", ["a", "b"])
    assert r.config == {"nested": {"lr": 0.1, "n": 3}, "big": big}
    assert r.series("loss") == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert r.series("step") == [0, 1, 2, 3, 4]
    assert r.summary["final"] == 42 and r.summary["loss"] == 0.2
    [table] = r.tables
    assert (table.key, table.nrows, table.ncols) == ("tbl", 2, 2)
    assert table.columns == ["a", "b"] and table.data == [[1, "x"], [2, "y"]]
    assert r.finished and r.exit_code == 0


def test_rejects_other_files_and_corruption(direct_run, tmp_path):
    run_dir, _, _ = direct_run
    [path] = list(run_dir.rglob("run-*.wandb"))
    not_wandb = tmp_path / "run-x.wandb"
    not_wandb.write_bytes(b"hello world, not a run file")
    with pytest.raises(RecordFileError, match="not a W&B run file"):
        list(iter_records(not_wandb))

    data = bytearray(path.read_bytes())
    length = struct.unpack_from("<H", data, 7 + 4)[0]
    data[7 + 7 + length - 1] ^= 0xFF  # flip a byte inside the first record's payload
    corrupt = tmp_path / "run-corrupt.wandb"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(RecordFileError, match="checksum mismatch"):
        list(iter_records(corrupt))


def test_a_file_torn_before_its_header_holds_no_records(direct_run, tmp_path):
    """A run killed before its writer flushed the 7-byte header (wandb 0.19.10 left an empty file
    after a SIGKILL) has no records yet; a short file of other bytes is still no run file."""
    run_dir, _, _ = direct_run
    [path] = list(run_dir.rglob("run-*.wandb"))
    for n in (0, 3, 6):
        torn = tmp_path / f"run-{n}.wandb"
        torn.write_bytes(path.read_bytes()[:n])
        assert list(iter_records(torn)) == []
    other = tmp_path / "run-other.wandb"
    other.write_bytes(b"abc")
    with pytest.raises(RecordFileError, match="too short for a W&B run file"):
        list(iter_records(other))


def test_torn_tail_keeps_the_complete_records(direct_run, tmp_path):
    run_dir, _, _ = direct_run
    [path] = list(run_dir.rglob("run-*.wandb"))
    data = path.read_bytes()
    whole = list(iter_records(path))
    torn = tmp_path / "run-torn.wandb"
    torn.write_bytes(data[:-3])  # a run killed mid-write
    records = list(iter_records(torn))
    assert len(records) == len(whole) - 1
    assert records[0].WhichOneof("record_type") == "header"


def test_reads_a_training_run(tiny_run):
    run_dir, metrics = tiny_run
    r = read_run(run_dir)
    assert r.finished
    assert r.config["peft"]["num_virtual_tokens"] == json.loads((run_dir / RunDir.CONFIG).read_text())["peft"][
        "num_virtual_tokens"]
    assert {a.type for a in r.artifacts} >= {"model"}


# --- the tracker's tail check ----------------------------------------------------------------------


def _write_run_file(path, records) -> list[list[int]]:
    """A `.wandb` file in the format wandb-core writes (header, 32 KiB blocks, fragments).

    Returns each record's fragment types (1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST)."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    layout = []
    for record in records:
        data, first = record.SerializeToString(), True
        layout.append([])
        while True:
            left = BLOCK_LEN - len(out) % BLOCK_LEN
            if left < 7:
                out += bytes(left)  # block trailer
                continue
            chunk, data = data[:left - 7], data[left - 7:]
            kind = (1 if not data else 2) if first else (4 if not data else 3)  # FULL FIRST LAST MIDDLE
            out += struct.pack("<IHB", zlib.crc32(chunk, zlib.crc32(bytes([kind]))), len(chunk), kind) + chunk
            layout[-1].append(kind)
            first = False
            if not data:
                break
    path.write_bytes(bytes(out))
    return layout


def _history(size: int):
    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.Record()
    item = record.history.item.add()
    item.key, item.value_json = "blob", json.dumps("x" * size)
    return record


def _exit(code: int = 0):
    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.Record()
    record.exit.exit_code = code
    return record


def test_tail_check_on_the_files_wandb_writes(direct_run, tmp_path):
    run_dir, _, _ = direct_run
    [path] = list(run_dir.rglob("run-*.wandb"))
    assert ends_with_exit_record(path)
    torn = tmp_path / "run-torn.wandb"
    torn.write_bytes(path.read_bytes()[:-3])  # the exit record not fully on disk yet
    assert not ends_with_exit_record(torn)
    assert not ends_with_exit_record(tmp_path / "run-missing.wandb")
    assert not wait_for_exit_record(torn, timeout=0.05)


# the history sizes put the 5-byte exit record's first 2 or 3 bytes at the end of a block
@pytest.mark.parametrize(("before", "exit_fragments"), [
    ([], [1]),  # the exit record right after the file header
    ([_history(100)], [1]),
    ([_history(3 * BLOCK_LEN)], [1]),  # a long record in fragments over several blocks before it
    ([_history(BLOCK_LEN - 44)], [2, 4]),  # the exit record split over the first block boundary
    ([_history(3 * BLOCK_LEN - 59)], [2, 4]),  # ... over a later one, after a fragmented record
])
def test_tail_check_finds_the_exit_record_wherever_it_lies(before, exit_fragments, tmp_path):
    path = tmp_path / "run-x.wandb"
    assert _write_run_file(path, [*before, _exit(3)])[-1] == exit_fragments
    kinds = [r.WhichOneof("record_type") for r in iter_records(path)]  # the full reader agrees
    assert kinds == ["history"] * len(before) + ["exit"]
    assert ends_with_exit_record(path)
    data = path.read_bytes()
    for cut in (1, 2, 8):  # cut inside the exit record: not finished
        path.write_bytes(data[:-cut])
        assert not ends_with_exit_record(path)


def test_tail_check_is_false_when_a_record_follows_the_exit(tmp_path):
    path = tmp_path / "run-x.wandb"
    _write_run_file(path, [_exit(), _history(10)])
    assert not ends_with_exit_record(path)
    _write_run_file(path, [_exit(), _history(2 * BLOCK_LEN)])  # the last record spans the tail
    assert not ends_with_exit_record(path)


# --- python -m softprompt.track.records -------------------------------------------------------------


def test_module_entry_prints_the_run_as_json(direct_run):
    run_dir, run_id, big = direct_run
    done = subprocess.run([sys.executable, "-m", "softprompt.track.records", str(run_dir)],
                          check=False, capture_output=True, text=True, env=child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    out = json.loads(line)
    assert (out["run_id"], out["name"], out["group"], out["tags"]) == (run_id, "direct-run", "g", ["a", "b"])
    assert (out["finished"], out["exit_code"], out["history_rows"]) == (True, 0, 6)
    assert out["history_keys"] == {"loss": 5, "step": 5, "tbl": 1}
    assert out["summary"]["final"] == 42 and out["summary"]["loss"] == 0.2
    assert "tbl" not in out["summary"]  # the table reference is listed under "tables"
    assert out["config"] == {"nested": {"lr": 0.1, "n": 3}, "big": big}
    assert [(t["key"], t["nrows"], t["columns"]) for t in out["tables"]] == [("tbl", 2, ["a", "b"])]


def test_module_entry_errors_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "softprompt.track.records", str(tmp_path)],
                          check=False, capture_output=True, text=True, env=child_env(), timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: no W&B run files") and done.stderr.count("\n") == 1
    assert done.stdout == ""
