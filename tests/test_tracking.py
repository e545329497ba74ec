"""W&B tracking, checked by reading back the offline run files (no network, no W&B service)."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
from conftest import ROOT, TINY, compose, run_cli

from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir
from softprompt.track.records import config_value, read_run, read_runs
from softprompt.track.wandb_run import Tracker, config_for_wandb, resolve_mode, run_name

# 2 epochs of 2 optimizer steps each (16 train rows, batch 8), a log line at every step
TRACKED = [o for o in TINY if not o.startswith(("training.max_steps", "training.epochs"))] + [
    "training.epochs=2", "dataset.max_samples=20", "training.logging_steps=1",
    "wandb.group=test-group", "wandb.tags=[tiny,tracking]"]
# the smallest job for the subprocess tests
QUICK = [o for o in TINY if not o.startswith(("training.max_steps", "eval."))] + [
    "training.max_steps=1", "eval.max_new_tokens=2", "eval.num_heldout_generations=1", "eval.prompts=[Hi]"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    from softprompt.train.run import run

    run_dir = tmp_path_factory.mktemp("tracked")
    metrics = run(compose(TRACKED), run_dir=run_dir)
    return run_dir, metrics, read_run(run_dir)


def test_run_placement_and_config(tracked):
    run_dir, _, r = tracked
    assert r.finished and r.exit_code == 0
    assert (r.name, r.project, r.group, r.tags) == ("vt4-ep2", "softprompt", "test-group", ["tiny", "tracking"])
    assert r.path.parent.parent == run_dir / RunDir.WANDB  # dir= the run directory
    on_disk = json.loads((run_dir / RunDir.CONFIG).read_text())
    # the resolved config, key for key as config.json (data fingerprint and provenance included)
    assert r.config == on_disk
    assert r.config["peft"]["num_virtual_tokens"] == 4 and r.config["training"]["epochs"] == 2
    assert r.config["dataset"]["max_samples"] == 20 and r.config["data"]["train_rows"] == 16
    assert len(r.config["data"]["fingerprint"]) >= 8
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert r.config["provenance"]["git"]["commit"] == head
    import wandb

    assert r.config["provenance"]["versions"]["wandb"] == wandb.__version__


def test_curves_per_step_and_per_epoch(tracked):
    _, metrics, r = tracked
    # 4 optimizer steps, logging_steps=1: one point per step for loss, learning rate and grad norm
    train_rows = [row for row in r.history if keys.TRAIN_LOSS in row]
    assert [row[keys.TRAIN_STEP] for row in train_rows] == [1, 2, 3, 4]
    assert all(keys.TRAIN_LEARNING_RATE in row and keys.TRAIN_GRAD_NORM in row for row in train_rows)
    lrs = [row[keys.TRAIN_LEARNING_RATE] for row in train_rows]
    assert lrs[0] == pytest.approx(0.3) and lrs == sorted(lrs, reverse=True)  # linear decay
    # one eval point per epoch, the base perplexity beside each as a flat reference line
    eval_rows = [row for row in r.history if keys.EVAL_PERPLEXITY in row]
    assert [row[keys.EPOCH] for row in eval_rows] == [1, 2]
    assert {row[keys.EVAL_BASE_PERPLEXITY] for row in eval_rows} == {metrics[keys.EVAL_BASE_PERPLEXITY]}
    assert eval_rows[-1][keys.EVAL_PERPLEXITY] == metrics[keys.EVAL_PERPLEXITY]
    assert r.metrics["train/*"]["step_metric"] == keys.TRAIN_STEP
    assert r.metrics["eval/*"]["step_metric"] == keys.EPOCH
    assert r.metrics[keys.EVAL_PERPLEXITY]["summary"] == ["last"]


def test_summary_equals_metrics_json(tracked):
    run_dir, _, r = tracked
    on_disk = json.loads((run_dir / RunDir.METRICS).read_text())
    assert len(on_disk) >= len(keys.REQUIRED_METRICS)
    for key, value in on_disk.items():
        assert r.summary[key] == value, key  # exact: the same JSON number


def test_generation_table(tracked):
    run_dir, _, r = tracked
    [table] = [t for t in r.tables if t.key == keys.GENERATIONS_TABLE]
    assert table.columns == ["prompt", "reference", "base", "tuned"]
    rows = [json.loads(line) for line in (run_dir / RunDir.GENERATIONS).read_text().splitlines()]
    assert table.nrows == len(rows) == 4
    assert table.data == [[g["prompt"], g.get("reference", ""), g["base"], g["tuned"]] for g in rows]


def test_adapter_artifact(tracked):
    run_dir, metrics, r = tracked
    [artifact] = [a for a in r.artifacts if a.type == "model"]
    assert artifact.name == "adapter-tiny-llama-prompts_sample"
    assert artifact.metadata["base_model"] == "tiny-llama"
    assert artifact.metadata["num_virtual_tokens"] == 4
    assert artifact.metadata[keys.EVAL_PERPLEXITY] == metrics[keys.EVAL_PERPLEXITY]
    adapter = run_dir / RunDir.ADAPTER
    assert artifact.files == {p.name: p.stat().st_size for p in adapter.iterdir() if p.is_file()}
    assert "adapter_model.safetensors" in artifact.files


def test_log_model_false_logs_no_artifact(tmp_path):
    cfg = compose(TINY + ["wandb.log_model=false"])
    (tmp_path / RunDir.ADAPTER).mkdir()
    (tmp_path / RunDir.ADAPTER / "a.bin").write_bytes(b"x")
    tracker = Tracker.start(cfg, tmp_path, {"k": 1}, "no-model", mode="offline")
    tracker.log_adapter(tmp_path / RunDir.ADAPTER, name="adapter-x", metadata={})
    tracker.finish()
    r = read_run(tmp_path)
    assert r.finished and r.artifacts == [] and r.config == {"k": 1}


def test_failed_run_is_finished_with_exit_code_1(tmp_path, monkeypatch):
    import softprompt.train.pack as pack
    import softprompt.train.run as run_module

    def boom(*args, **kwargs):
        raise RuntimeError("training broke")

    monkeypatch.setattr(pack, "train_step", boom)
    with pytest.raises(RuntimeError, match="training broke"):
        run_module.run(compose(TINY), run_dir=tmp_path)
    r = read_run(tmp_path)
    assert r.finished and r.exit_code == 1
    assert not (tmp_path / RunDir.METRICS).exists()


def test_disabled_writes_no_wandb_dir(tmp_path):
    tracker = Tracker.start(compose(TINY), tmp_path, {"k": 1}, "off", mode=resolve_mode("disabled"))
    assert not tracker.active
    tracker.log({"a": 1})
    tracker.log_table("t", ["a"], [[1]])
    tracker.log_adapter(tmp_path, "x", {})
    tracker.set_summary({"a": 1})
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


# --- mode resolution -----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connects are refused


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    return monkeypatch


def test_online_without_login_fails(no_login):
    with pytest.raises(UserError, match="no W&B login"):
        resolve_mode("online")


def test_online_unreachable_fails_fast(no_login):
    no_login.setenv("WANDB_API_KEY", "x" * 40)
    start = time.monotonic()
    with pytest.raises(UserError, match="unreachable"):
        resolve_mode("online")
    assert time.monotonic() - start < 3


def test_auto_goes_offline_with_one_line(no_login, capsys):
    assert resolve_mode("auto") == "offline"
    assert capsys.readouterr().out.strip().splitlines() == [
        "wandb: logging offline (no W&B login); upload later with `wandb sync <run dir>/wandb/offline-run-*`"]
    no_login.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "offline"
    assert "is unreachable" in capsys.readouterr().out


def test_cli_online_unreachable_is_an_error_before_any_work(tmp_path):
    port = _closed_port()
    result = run_cli([*TINY, "wandb.mode=online", f"hydra.run.dir={tmp_path}/run"],
                     env={"WANDB_MODE": "", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: wandb.mode=online but the W&B service") and "unreachable" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / RunDir.WANDB).exists() and not (tmp_path / "run" / RunDir.METRICS).exists()


# --- names ---------------------------------------------------------------------------------------


def _name(overrides: list[str], given: list[str] | None = None) -> str:
    from softprompt.models.methods import METHODS

    cfg = compose(overrides)
    return run_name(cfg, METHODS[cfg.peft.method].tag(cfg.peft), overrides if given is None else given)


def test_run_names_from_overrides():
    assert _name(["peft.num_virtual_tokens=8"]) == "vt8-ep6"
    assert _name(["training.learning_rate=0.01", "peft.init=random", "training.epochs=2", "seed=3"]) \
        == "vt4-ep2-lr0.01-init-random-seed3"
    assert _name(["peft=prompt_tuning", "peft.method=p_tuning"]) == "p_tuning-vt4-ep6"
    # each method's tag comes from its registry entry; LoRA's size is its rank
    assert _name(["peft=p_tuning", "peft.num_virtual_tokens=8"], []) == "p_tuning-vt8-ep6"
    assert _name(["peft=prefix_tuning"], []) == "prefix_tuning-vt4-ep6"
    assert _name(["peft=lora", "peft.lora_r=4", "training.epochs=2"], []) == "lora-r4-ep2"
    assert _name(["peft=lora", "training.learning_rate=0.01"]) == "lora-r8-ep6-lr0.01"
    assert run_name(compose(["wandb.name=mine"]), "vt4", []) == "mine"


# --- multirun and sweeps -------------------------------------------------------------------------


def test_multirun_jobs_are_distinct_finished_runs(tmp_path):
    result = run_cli(["-m", *QUICK, "peft.num_virtual_tokens=2,3", f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r.path.parents[2].name: r for r in read_runs(tmp_path)}
    assert sorted(runs) == ["0", "1"]  # one W&B run in each job's directory
    assert runs["0"].run_id != runs["1"].run_id
    assert all(r.finished and r.exit_code == 0 for r in runs.values())
    assert [runs[j].config["peft"]["num_virtual_tokens"] for j in ("0", "1")] == [2, 3]
    assert [runs[j].name for j in ("0", "1")] == ["vt2-ep1-lr0.3-steps1", "vt3-ep1-lr0.3-steps1"]
    for job, r in runs.items():
        metrics = json.loads((tmp_path / job / RunDir.METRICS).read_text())
        assert {k: r.summary[k] for k in metrics} == metrics


def test_sweep_agent_values_are_held_once(tmp_path):
    """What `wandb agent` does for a sweep command ending in ${args_no_hyphens}, without the service."""
    from wandb.sdk.lib import config_util

    params = tmp_path / "sweep-abc123" / "config-run1.yaml"
    params.parent.mkdir()
    # the agent's own writer, in the agent's format ({key: {value: v}})
    config_util.save_config_file_from_dict(str(params), {"peft.num_virtual_tokens": {"value": 3},
                                                         "training.learning_rate": {"value": 0.1},
                                                         "seed": {"value": 7}})
    env = {"WANDB_SWEEP_ID": "abc123", "WANDB_RUN_ID": "agentrun1", "WANDB_SWEEP_PARAM_PATH": str(params),
           "WANDB_PROJECT": "sweep-project"}
    args = [*QUICK, "peft.num_virtual_tokens=3", "training.learning_rate=0.1", "seed=7"]
    result = run_cli([*args, f"hydra.run.dir={tmp_path}/run"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    r = read_run(tmp_path / "run")
    assert (r.run_id, r.sweep_id, r.finished) == ("agentrun1", "abc123", True)
    assert r.project == "sweep-project"  # in a sweep, wandb puts the run in the sweep's project
    assert r.name == "vt3-ep1-lr0.1-steps1-seed7"  # named from the agent's overrides
    # each value once, under the key the sweep controller looks up
    assert r.config["peft.num_virtual_tokens"] == 3 and "num_virtual_tokens" not in r.config["peft"]
    assert r.config["training.learning_rate"] == 0.1 and "learning_rate" not in r.config["training"]
    assert r.config["seed"] == 7
    assert config_value(r.config, "peft.num_virtual_tokens") == 3 and config_value(r.config, "training.epochs") == 1
    assert r.config["training"]["epochs"] == 1  # the rest of the nested config is whole
    # config.json keeps the full nested config
    assert json.loads((tmp_path / "run" / RunDir.CONFIG).read_text())["peft"]["num_virtual_tokens"] == 3


def test_sweep_values_that_did_not_reach_the_run_are_an_error():
    cfg = compose(["peft.num_virtual_tokens=4"])
    with pytest.raises(UserError, match=r"sets peft.num_virtual_tokens=8 but this run has .*args_no_hyphens"):
        config_for_wandb(cfg, {"peft": {"num_virtual_tokens": 4}}, {"peft.num_virtual_tokens": 8})
    with pytest.raises(UserError, match="not a config key"):
        config_for_wandb(cfg, {}, {"peft.nope": 1})
    assert config_for_wandb(cfg, {"peft": {"num_virtual_tokens": 4, "init": "text"}},
                            {"peft.num_virtual_tokens": 4}) == {"peft": {"init": "text"}}
