"""The run directory: SPEC's file names, written only through RunDir, metrics.json last."""

from __future__ import annotations

import ast
import errno
import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose

from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir


def test_a_run_leaves_the_specs_file_names(tiny_run):
    """The one test that spells the run directory's documented names literally."""
    run_dir, metrics = tiny_run
    assert {"adapter", "metrics.json", "config.json", "generations.jsonl", "wandb"} <= set(os.listdir(run_dir))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(run_dir / "adapter"))
    assert (RunDir.ADAPTER, RunDir.METRICS, RunDir.CONFIG, RunDir.GENERATIONS, RunDir.WANDB) == (
        "adapter", "metrics.json", "config.json", "generations.jsonl", "wandb")
    run = RunDir(run_dir)
    assert run.finished and run.read_metrics() == pytest.approx(metrics)
    assert run.read_config()["peft"]["num_virtual_tokens"] == 4
    assert len(run.read_generations()) == 4 and len(run.read_prompt_tokens()) == 4
    assert run.read_history()[-1][keys.TRAIN_STEP] == 4
    assert run.read_wandb_run_id() and list(run.wandb.glob(f"offline-run-*/run-{run.read_wandb_run_id()}.wandb"))


def test_metrics_json_is_written_last_and_a_rerun_removes_it_first(tmp_path, monkeypatch):
    from softprompt.train.run import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RunDir.METRICS).write_text('{"eval/perplexity": 1.0}')  # an earlier, finished attempt
    written: list[str] = []
    real_write = RunDir._write

    def recording_write(self, path, text):
        # every write before the last one happens while the run does not count as finished
        assert path.name == RunDir.METRICS or not self.finished, f"{path.name} written beside a stale metrics.json"
        written.append(path.relative_to(self.path).as_posix() if path.parent == self.path else path.name)
        real_write(self, path, text)

    monkeypatch.setattr(RunDir, "_write", recording_write)
    metrics = run(compose(TINY), run_dir=run_dir)
    assert written[0] == RunDir.CONFIG and written[-1] == RunDir.METRICS and written.count(RunDir.METRICS) == 1
    assert {RunDir.WANDB_RUN_ID, RunDir.ADAPTER_RECORD, RunDir.GENERATIONS, RunDir.HISTORY,
            RunDir.PROMPT_TOKENS} <= set(written[1:-1])
    assert RunDir(run_dir).read_metrics() == pytest.approx(metrics)


def _enospc(self, path, text):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_failed_write_leaves_the_old_file_and_no_temporaries(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.start()
    run.write_config({"seed": 1})
    monkeypatch.setattr("softprompt.core.atomic.os.replace", lambda *a: _enospc(None, a[1], ""))
    # a full disk is the user's to fix: one error line that names the sizes (tests/test_faults.py)
    with pytest.raises(UserError, match=r"no space left on the device writing config.json .*: it needs 16 B, ") as info:
        run.write_config({"seed": 2})
    assert info.value.__cause__.errno == errno.ENOSPC
    assert run.read_config() == {"seed": 1}
    assert sorted(os.listdir(tmp_path)) == [RunDir.CONFIG]  # the temp file is gone


def test_the_write_seam_fails_a_finish_without_a_metrics_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.start()
    monkeypatch.setattr(RunDir, "_write", _enospc)
    with pytest.raises(OSError):
        run.finish({"eval/perplexity": 3.0})
    assert not run.finished


def test_a_failed_adapter_save_keeps_the_old_adapter_and_no_staging(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.start()

    def save(folder: Path, marker: str) -> None:
        (folder / RunDir.ADAPTER_CONFIG).write_text(json.dumps({"marker": marker}))

    run.write_adapter(lambda folder: save(folder, "first"), {"base_model": "x"})
    assert json.loads((run.adapter / RunDir.ADAPTER_CONFIG).read_text()) == {"marker": "first"}
    assert json.loads(run.adapter_record.read_text()) == {"base_model": "x"}
    monkeypatch.setattr(RunDir, "_write", _enospc)  # the record, written after the weights, fails
    with pytest.raises(OSError):
        run.write_adapter(lambda folder: save(folder, "second"), {"base_model": "y"})
    assert json.loads((run.adapter / RunDir.ADAPTER_CONFIG).read_text()) == {"marker": "first"}
    assert sorted(os.listdir(tmp_path)) == [RunDir.ADAPTER]


def test_run_dir_and_adapter_lookup(tmp_path):
    assert not RunDir.is_run_dir(tmp_path)
    (tmp_path / RunDir.ADAPTER).mkdir()
    (tmp_path / RunDir.ADAPTER / RunDir.ADAPTER_CONFIG).write_text("{}")
    assert RunDir.holding_adapter(tmp_path) == tmp_path / RunDir.ADAPTER
    assert RunDir.holding_adapter(tmp_path / RunDir.ADAPTER) == tmp_path / RunDir.ADAPTER
    assert RunDir.holding_adapter(tmp_path / "nothing") is None
    assert RunDir.of_adapter(tmp_path / RunDir.ADAPTER).path == tmp_path
    assert RunDir.of_adapter(tmp_path / "elsewhere") is None
    RunDir(tmp_path).write_config({})
    assert RunDir.is_run_dir(tmp_path) and not RunDir.is_run_dir(tmp_path / RunDir.ADAPTER)


# names that only a run directory has; `config.json`, `wandb` and `adapter` also name other things
# (a model's config, the package, UI labels), so for them only path joins (`x / "adapter"`) count
_OWN_NAMES = ("metrics.json", "generations.jsonl", "history.jsonl", "prompt_tokens.jsonl", "wandb_run_id",
              "softprompt.json", "adapter_config.json")
_JOINED_NAMES = ("adapter", "checkpoints", "wandb", ".hydra")


def _spelled_run_file_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if any(name in node.value for name in _OWN_NAMES):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value in _JOINED_NAMES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: / {node.right.value!r}")
    return found


def test_only_rundir_spells_a_run_file_name():
    files = [*sorted((ROOT / "src" / "softprompt").rglob("*.py")), *sorted((ROOT / "scripts").glob("*.py")),
             ROOT / "train.py"]
    rundir = ROOT / "src" / "softprompt" / "core" / "rundir.py"
    assert len(_spelled_run_file_names(rundir)) >= len(_OWN_NAMES)  # the scan does see names
    assert [hit for f in files if f != rundir for hit in _spelled_run_file_names(f)] == []
