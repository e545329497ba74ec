"""Read a W&B run file (`run-<id>.wandb`) back into plain Python, with no network.

Offline runs (and the local copy of online runs) are a LevelDB-style log: a 7-byte file header
(`:W&B`, magic 0xBEE1, version 0), then 32 KiB blocks of records, each record
`crc32 (4, little-endian) | length (2) | type (1) | data`, where the crc is zlib's crc32 over the
type byte and the data, and type is FULL/FIRST/MIDDLE/LAST (a record too long for the rest of a
block is split into fragments). A block never starts a header in its last 6 bytes: those are
zero padding. The file header counts as the first 7 bytes of the first block. The joined data of
each record is a `wandb.proto.wandb_internal_pb2.Record`.

wandb 0.31 ships no Python reader for these files (the writer is wandb-core, in Go), so tests
and the dashboard use this one to check what a dashboard would show: config, history, summary,
tables, artifacts and whether the run finished. It is a tool, not part of a run: the tracker
checks only the file's tail for the exit record (softprompt.track.wandb_run.ends_with_exit_record),
and an import-linter contract keeps training and the tracker from importing this module.

    python -m softprompt.track.records RUN_DIR|MULTIRUN_DIR|FILE.wandb ...

prints one JSON object per run file: placement, whether it finished, the history keys (with how
many rows hold each), the summary and the config.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HEADER = struct.Struct("<4sHB")
HEADER_IDENT, HEADER_MAGIC = b":W&B", 0xBEE1
RECORD_HEADER = struct.Struct("<IHB")
BLOCK_LEN = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

# history values of these types are references to files, not numbers
TABLE_TYPES = ("table-file", "incremental-table-file", "partitioned-table", "joined-table")


class RecordFileError(ValueError):
    """The file is not a W&B run file, or a record in it is corrupt."""


def iter_records(path: str | Path) -> Iterator[Any]:
    """Every `Record` in a `.wandb` file, in write order.

    A torn tail (a run killed mid-write, or a file still being written) ends the iteration
    quietly; a checksum mismatch before the tail is corruption and raises RecordFileError.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        # a run killed before its writer flushed the header (seen with wandb 0.19.10: an empty
        # file after a SIGKILL) holds no record yet: a torn file, not a foreign one
        if HEADER.pack(HEADER_IDENT, HEADER_MAGIC, 0).startswith(data):
            return
        raise RecordFileError(f"{path}: too short for a W&B run file")
    ident, magic, version = HEADER.unpack_from(data)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC:
        raise RecordFileError(f"{path}: not a W&B run file (header {data[:7]!r})")
    if version != 0:
        raise RecordFileError(f"{path}: unknown W&B run file version {version}")

    pos, pending = HEADER.size, bytearray()
    while True:
        left = BLOCK_LEN - pos % BLOCK_LEN
        if left < RECORD_HEADER.size:  # trailer: zero padding up to the next block
            pos += left
            continue
        if pos + RECORD_HEADER.size > len(data):
            return
        checksum, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0 and checksum == 0:  # zero-filled: nothing written beyond here
            return
        start, end = pos + RECORD_HEADER.size, pos + RECORD_HEADER.size + length
        if end > len(data):
            return  # torn tail
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise RecordFileError(f"{path}: checksum mismatch in the record at byte {pos}")
        pos = end
        if kind == FULL:
            pending = bytearray(payload)
        elif kind == FIRST:
            pending = bytearray(payload)
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        else:
            raise RecordFileError(f"{path}: unknown record type {kind} at byte {pos}")
        record = pb.Record()
        record.ParseFromString(bytes(pending))
        pending = bytearray()
        yield record


@dataclass
class TableRef:
    key: str  # the history key the table was logged under, e.g. "eval/generations"
    step: int  # the history row (`_step`) it was logged in
    path: str  # relative to the run's files/ dir
    nrows: int | None
    ncols: int | None
    columns: list[str] | None = None  # read from the table file when it is on disk
    data: list[list[Any]] | None = None


@dataclass
class ArtifactInfo:
    name: str
    type: str
    digest: str
    aliases: list[str]
    metadata: dict[str, Any]
    files: dict[str, int]  # path in the artifact -> size in bytes


@dataclass
class OfflineRun:
    path: Path  # the .wandb file
    run_id: str = ""
    name: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    sweep_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # without W&B's own `_wandb` entry
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # define_metric: name -> options
    tables: list[TableRef] = field(default_factory=list)
    artifacts: list[ArtifactInfo] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None  # None: no exit record, the run never finished
    preempted: bool = False  # run.mark_preempting() was called (a preemption record)

    @property
    def finished(self) -> bool:
        return self.exit_code is not None

    @property
    def files_dir(self) -> Path:
        return self.path.parent / "files"

    def series(self, key: str) -> list[Any]:
        """The values of one history key, in order, skipping rows that do not have it."""
        return [row[key] for row in self.history if key in row]

    def user_summary(self) -> dict[str, Any]:
        """The summary without W&B's own keys (`_runtime`, `_step`, `_wandb`, ...)."""
        return {k: v for k, v in self.summary.items() if not k.startswith("_")}


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """A config value by its dotted name, whichever way the run holds it.

    Runs from `wandb agent` hold sweep parameters as flat keys (`"peft.num_virtual_tokens"`),
    other runs only nested (`config["peft"]["num_virtual_tokens"]`); see docs/wandb.md.
    Raises KeyError when neither is there.
    """
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def find_run_files(root: str | Path) -> list[Path]:
    """The `.wandb` files under a run dir, a multirun dir, or an `offline-run-*` dir (or the file)."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob("run-*.wandb"))


def read_run(path: str | Path) -> OfflineRun:
    """One run, from its `.wandb` file or from a directory that holds exactly one."""
    files = find_run_files(path)
    if len(files) != 1:
        raise RecordFileError(f"{path}: expected one W&B run file, found {len(files)}")
    return _fold(files[0], iter_records(files[0]))


def read_runs(root: str | Path) -> list[OfflineRun]:
    return [_fold(f, iter_records(f)) for f in find_run_files(root)]


def _fold(path: Path, records: Iterator[Any]) -> OfflineRun:
    run = OfflineRun(path=Path(path))
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.name, run.group, run.job_type = r.display_name, r.run_group, r.job_type
            run.tags, run.sweep_id = list(r.tags), r.sweep_id
            _apply(config, r.config.update, r.config.remove)
            _apply(run.summary, r.summary.update, r.summary.remove)
        elif kind == "config":
            _apply(config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(run.summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, _item_path(item), _history_value(item))
            run.history.append(row)
        elif kind == "metric":
            m = record.metric
            run.metrics[m.name or m.glob_name] = {
                "step_metric": m.step_metric,
                "summary": sorted(f.name for f, v in m.summary.ListFields() if v),
                "goal": m.goal,
            }
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append(ArtifactInfo(
                name=a.name, type=a.type, digest=a.digest, aliases=list(a.aliases),
                metadata=json.loads(a.metadata) if a.metadata else {},
                files={e.path: e.size for e in a.manifest.contents}))
        elif kind == "files":
            run.files.extend(f.path for f in record.files.files)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "preempting":
            run.preempted = True
    config.pop("_wandb", None)
    run.config = config
    run.tables = _tables(run)
    return run


def _item_path(item) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _apply(target: dict[str, Any], updates, removes) -> None:
    for item in updates:
        _set(target, _item_path(item), json.loads(item.value_json))
    for item in removes:
        *parents, last = _item_path(item)
        node = target
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)


def _history_value(item) -> Any:
    # wandb ships stubs per protobuf major version; those for protobuf < 7 (wandb 0.19-0.31 with
    # protobuf 6, measured) have only value_json, without the typed `value` oneof
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which is None:
        return json.loads(item.value_json) if item.value_json else None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)


def _tables(run: OfflineRun) -> list[TableRef]:
    tables = []
    for row in run.history:
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") in TABLE_TYPES:
                ref = TableRef(key=key, step=row.get("_step", -1), path=value.get("path", ""),
                               nrows=value.get("nrows"), ncols=value.get("ncols"))
                table_file = run.files_dir / ref.path
                if ref.path and table_file.is_file():
                    content = json.loads(table_file.read_text(encoding="utf-8"))
                    ref.columns, ref.data = content.get("columns"), content.get("data")
                tables.append(ref)
    return tables


def summarize(run: OfflineRun) -> dict[str, Any]:
    """What a reviewer would look for on the dashboard, as plain JSON-able values."""
    history_keys: dict[str, int] = {}
    for row in run.history:
        for key in row:
            if not key.startswith("_"):
                history_keys[key] = history_keys.get(key, 0) + 1
    return {
        "path": str(run.path),
        "run_id": run.run_id, "name": run.name, "project": run.project, "entity": run.entity,
        "group": run.group, "tags": run.tags, "sweep_id": run.sweep_id,
        "finished": run.finished, "exit_code": run.exit_code,
        "history_rows": len(run.history),
        "history_keys": dict(sorted(history_keys.items())),
        # table references (W&B keeps the last one of each key in the summary) are under "tables"
        "summary": {k: v for k, v in run.user_summary().items()
                    if not (isinstance(v, dict) and v.get("_type") in TABLE_TYPES)},
        "config": run.config,
        "tables": [{"key": t.key, "step": t.step, "nrows": t.nrows, "ncols": t.ncols, "columns": t.columns}
                   for t in run.tables],
        "artifacts": [{"name": a.name, "type": a.type, "files": sorted(a.files)} for a in run.artifacts],
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from softprompt.core.errors import UserError, report_and_exit

    parser = argparse.ArgumentParser(
        prog="python -m softprompt.track.records",
        description="Summarise offline W&B run files as JSON, one object per line.")
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR|MULTIRUN_DIR|FILE.wandb")
    args = parser.parse_args(argv)
    try:
        for root in args.paths:
            if not Path(root).exists():
                raise UserError(f"{root} does not exist; give a run dir, a multirun dir or a run-*.wandb file")
            files = find_run_files(root)
            if not files:
                raise UserError(f"no W&B run files (run-*.wandb) under {root}; "
                                "was the run made with wandb.mode=disabled?")
            for run_file in files:
                print(json.dumps(summarize(_fold(run_file, iter_records(run_file))), default=str), flush=True)
    except (RecordFileError, UserError) as exc:
        report_and_exit(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
