"""The offline W&B run-file reader, against files that wandb itself wrote (no network)."""

from __future__ import annotations

import json
import struct

import pytest

from softprompt.core.rundir import RunDir
from softprompt.track.records import (
    BLOCK_LEN,
    RecordFileError,
    iter_records,
    read_run,
    wait_until_finished,
)


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
    assert wait_until_finished(run.settings.sync_file)
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
