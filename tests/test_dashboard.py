"""The dashboard spec names keys that a real (tiny) run logs to W&B, read back from its .wandb file."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from conftest import run_cli

from softprompt.core import keys
from softprompt.experiments.dashboard import (
    RunFilter,
    best_run_from_dirs,
    build_spec,
    to_report,
)
from softprompt.track.records import config_value, read_runs

# --- reading the tiny run's offline .wandb file ---------------------------------------------------


@pytest.fixture(scope="module")
def logged(tiny_run):
    """(history keys, summary dict, config dict) of the tiny run, as W&B received them."""
    run_dir, _ = tiny_run
    [run] = read_runs(run_dir)
    history_keys = {key for row in run.history for key in row}
    return history_keys, run.summary, run.config


# --- the spec against the run -------------------------------------------------------------------


def _spec():
    return build_spec("me", "softprompt", RunFilter("sweep", "abc123"))


def test_spec_has_the_panels_the_issue_asks_for():
    spec = _spec()
    panels = {p.title: p for p in spec.panels()}
    assert [p.kind for p in spec.panels()] == ["parallel_coordinates", "scatter", "scatter", "bar", "line", "line",
                                               "table"]
    parallel = panels["Hyperparameters -> tuned perplexity"]
    assert [r.key for r in parallel.y] == [keys.CFG_NUM_VIRTUAL_TOKENS, keys.CFG_EPOCHS, keys.CFG_LEARNING_RATE,
                                           keys.CFG_INIT, keys.EVAL_PERPLEXITY]
    bar = panels["Tuned and base perplexity, grouped by epochs"]
    assert bar.groupby.key == keys.CFG_EPOCHS
    assert {r.key for r in bar.y} == {keys.EVAL_PERPLEXITY, keys.EVAL_BASE_PERPLEXITY}
    curve = panels["Held-out perplexity per epoch"]
    assert (curve.x.source, curve.x.key) == ("history", keys.EPOCH)


def test_every_key_of_the_spec_is_logged_by_a_tiny_run(logged):
    history_keys, summary, config = logged
    refs = _spec().refs()
    assert {r.source for r in refs} == {"history", "summary", "config", "table"}
    for ref in refs:
        if ref.source == "history":
            assert ref.key in history_keys, ref
        elif ref.source == "summary":
            assert isinstance(summary[ref.key], (int, float)), ref
        elif ref.source == "config":
            assert config_value(config, ref.key) is not None, ref
        else:  # a W&B table: logged as `<key>` with `_type: table-file`
            assert summary[ref.key]["_type"] == "table-file", ref
    # and the values are the run's: the tiny preset's soft prompt has 4 tokens
    assert config["peft"]["num_virtual_tokens"] == 4 and config["training"]["max_steps"] == 4
    assert summary[keys.EVAL_PERPLEXITY] < summary[keys.EVAL_BASE_PERPLEXITY]


def test_a_renamed_key_would_be_caught(logged):
    history_keys, _, _ = logged
    assert "eval/ppl" not in history_keys  # the check above is not vacuous


def test_best_run_from_local_run_dirs(tiny_run):
    run_dir, metrics = tiny_run
    # the run dir itself: its parent is the session's temp root, where other tests leave runs too
    text = best_run_from_dirs([run_dir])
    assert f"{metrics[keys.EVAL_PERPLEXITY]:.3f}" in text
    assert f"{keys.CFG_NUM_VIRTUAL_TOKENS}=4" in text
    assert "best of 1 finished runs" in text


def test_report_converts_to_a_wandb_view_spec():
    """The wandb-workspaces objects validate into W&B's own view spec (service lookups stubbed)."""
    import wandb_workspaces.reports.v2.interface as itf

    report = to_report(_spec())
    with mock.patch.object(itf, "execute_graphql", return_value={"project": {"internalId": "UHJvamVjdDox"}}), \
            mock.patch.object(itf, "_get_api", return_value=None):
        model = report._to_model()
    view = json.dumps(model.spec.model_dump(by_alias=True, exclude_none=True))
    for accessor in ("config:peft.value.num_virtual_tokens", "config:training.value.epochs",
                     "config:training.value.learning_rate", "config:peft.value.init", "summary:eval/perplexity",
                     '"xAxis": "epoch"', '"xAxis": "train/global_step"', "eval/generations",
                     '"name": "sweep"', '"value": "abc123"'):
        assert accessor in view, accessor


# --- the command ----------------------------------------------------------------------------------


def test_cli_dry_run_writes_the_spec(tmp_path, tiny_run):
    run_dir, metrics = tiny_run
    out = tmp_path / "dash.json"
    result = run_cli(["--entity", "me", "--project", "softprompt", "--group", "grid1", "--dry-run",
                      "--out", str(out), "--runs", str(run_dir)], script="scripts/dashboard.py", timeout=60)
    assert result.returncode == 0, result.stderr
    spec = json.loads(out.read_text())
    assert spec["runs"] == {"kind": "group", "value": "grid1"}
    assert len([p for s in spec["sections"] for p in s["panels"]]) == 7
    assert f"{metrics[keys.EVAL_PERPLEXITY]:.3f}" in spec["text"]
    md = tmp_path / "dash.md"
    result = run_cli(["--entity", "me", "--project", "softprompt", "--dry-run", "--out", str(md)],
                     script="scripts/dashboard.py", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "to be filled" in md.read_text() and "## Training curves" in md.read_text()


@pytest.mark.parametrize("args, message", [
    (["--project", "p", "--dry-run"], "--entity"),
    (["--entity", "e", "--project", "p", "--sweep", "s", "--group", "g", "--dry-run"], "not allowed"),
    (["--entity", "e", "--project", "p"], "no W&B login"),
    (["--entity", "e", "--project", "p", "--dry-run", "--runs", "/nonexistent/dir"], "no such directory"),
])
def test_cli_user_errors_exit_2(args, message):
    result = run_cli(args, script="scripts/dashboard.py", timeout=60, env={"NETRC": "/nonexistent"})
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_publish_updates_the_report_with_the_same_title(monkeypatch):
    """The online path with the W&B clients stubbed: best run from the API, same-title report updated."""
    from types import SimpleNamespace

    import wandb
    import wandb_workspaces.reports.v2.interface as itf

    import softprompt.track.wandb_run as tracking
    from softprompt.experiments.dashboard import publish

    def run(name, ppl, vt):
        return SimpleNamespace(name=name, url=f"https://w/{name}", config={"peft": {"num_virtual_tokens": vt,
                               "init": "text"}, "training": {"epochs": 2, "learning_rate": 0.03}},
                               summary={keys.EVAL_PERPLEXITY: ppl, keys.EVAL_BASE_PERPLEXITY: 28.0})

    spec = _spec()
    calls = {}

    class FakeApi:
        def __init__(self, **kwargs):
            pass

        def sweep(self, path):
            calls["sweep"] = path
            return SimpleNamespace(config={"description": "Does a longer prompt help?"})

        def runs(self, path, filters):
            calls["runs"] = (path, filters)
            return [run("vt4-ep2", 21.5, 4), run("vt8-ep2", 19.4, 8), SimpleNamespace(name="crashed", summary={})]

        def reports(self, path):
            return [SimpleNamespace(display_name="other", id="X"), SimpleNamespace(display_name=spec.title, id="VID")]

    saved = []
    monkeypatch.setattr(tracking, "has_login", lambda: True)
    monkeypatch.setattr(tracking, "service_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setattr(itf.Report, "save", lambda self, **kw: saved.append(self) or self)
    monkeypatch.setattr(itf.Report, "url", property(lambda self: f"https://w/report--{self.id}"))
    assert publish(spec, question_given=False) == "https://w/report--VID"
    assert calls == {"sweep": "me/softprompt/abc123", "runs": ("me/softprompt", {"sweep": "abc123"})}
    [report] = saved
    assert report.id == "VID"
    text = report.blocks[0].text
    assert "Does a longer prompt help?" in text
    assert "`vt8-ep2`: eval/perplexity 19.400" in text and "peft.num_virtual_tokens=8" in text
    assert "best of 2 runs" in text
