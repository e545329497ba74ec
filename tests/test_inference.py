"""Using a saved adapter: scripts/generate.py and the Gradio demo, on the tiny trained run."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys

import pytest
from conftest import run_cli, side_by_side_words

from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir
from softprompt.serve.adapters import discover, resolve


def _generations(run_dir):
    return [json.loads(line) for line in (run_dir / RunDir.GENERATIONS).read_text().splitlines()]


def test_generate_json_reproduces_the_runs_own_generations(tiny_run, capsys):
    """Greedy with the run's eval settings, the CLI gives exactly what the run wrote at the end of
    training, for base and tuned: same base model, same soft prompt, same placement."""
    from softprompt.serve.generate_cli import main

    run_dir, _ = tiny_run
    rows = _generations(run_dir)
    assert main([str(run_dir), *[r["prompt"] for r in rows], "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert got == [{"prompt": r["prompt"], "base": r["base"], "tuned": r["tuned"]} for r in rows]
    assert any(r["base"] != r["tuned"] for r in got)  # the trained prompt changes the output


def test_generate_text_output_side_by_side_from_adapter_dir_and_stdin(tiny_run, capsys, monkeypatch):
    from softprompt.serve.generate_cli import main

    run_dir, _ = tiny_run
    row = _generations(run_dir)[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(row["prompt"] + "\n\n"))
    monkeypatch.setenv("COLUMNS", "200")
    assert main([str(run_dir / RunDir.ADAPTER), "-", "--max-new-tokens", "8", "--repetition-penalty", "1.5"]) == 0
    out = capsys.readouterr().out
    lines = out.split("\n")
    assert lines[0].startswith(f"adapter {run_dir / RunDir.ADAPTER} (PROMPT_TUNING) on base ")
    assert lines[1] == "greedy, max_new_tokens 8, repetition_penalty 1.5"
    assert f"[1/1] {row['prompt']}" in lines
    header = next(line for line in lines if "- base -" in line)
    assert " tuned " in header and " | " in header
    # the columns hold the two continuations, word for word
    assert side_by_side_words(out) == (row["base"].split(), row["tuned"].split())


def test_generate_missing_adapter_is_a_user_error(tmp_path):
    result = run_cli([str(tmp_path / "nope"), "hello"], script="scripts/generate.py", timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: adapter directory") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_foreign_dir_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter")
    result = run_cli([str(tmp_path), "hello"], script="scripts/generate.py", timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "holds no PEFT adapter" in result.stderr
    assert "Traceback" not in result.stderr


def test_foreign_adapters_are_refused_or_accepted_for_the_right_reason(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    # not a PEFT config
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / RunDir.ADAPTER_CONFIG).write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="not a PEFT adapter config"):
        resolve(bad)
    # a PEFT adapter without its weights
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run_dir / RunDir.ADAPTER / RunDir.ADAPTER_CONFIG, empty)
    with pytest.raises(UserError, match="has no weights"):
        resolve(empty)
    # saved by another tool (no softprompt.json): the base comes from adapter_config.json
    plain = tmp_path / "plain"
    shutil.copytree(run_dir / RunDir.ADAPTER, plain)
    (plain / RunDir.ADAPTER_RECORD).unlink()
    info = resolve(plain)
    assert info.record is None and info.run_dir is None and info.metrics == {}
    assert info.recorded_base == "softprompt/tiny-llama"  # the portable name: not loadable without the record
    # ... and the base named there must load, else the message says to pass --base
    config = json.loads((plain / RunDir.ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (plain / RunDir.ADAPTER_CONFIG).write_text(json.dumps(config))
    from softprompt.serve.inference import load

    with pytest.raises(UserError, match="cannot load the base model.*--base"):
        load(plain)


def test_discover_finds_runs_and_skips_checkpoints(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    for name in ("sweep/0", "sweep/1"):
        shutil.copytree(run_dir / RunDir.ADAPTER, tmp_path / name / RunDir.ADAPTER)
    shutil.copytree(run_dir / RunDir.ADAPTER, tmp_path / "sweep/1" / RunDir.CHECKPOINTS / "checkpoint-4" / RunDir.ADAPTER)
    assert list(discover(tmp_path)) == ["sweep/0", "sweep/1"]
    assert list(discover(run_dir)) == [run_dir.name]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapters under"):
        discover(tmp_path / "empty")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_answers_through_gradio_client(tiny_run, tmp_path):
    """The real server on a free localhost port, a real request through gradio_client."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from gradio_client import Client

    from softprompt.serve.demo import build

    run_dir, metrics = tiny_run
    # a directory of two runs: the picker offers both
    shutil.copytree(run_dir, tmp_path / "runs" / "a", ignore=shutil.ignore_patterns(RunDir.WANDB, RunDir.CHECKPOINTS))
    shutil.copytree(run_dir, tmp_path / "runs" / "b", ignore=shutil.ignore_patterns(RunDir.WANDB, RunDir.CHECKPOINTS))
    row = next(r for r in _generations(run_dir) if r["base"] != r["tuned"])
    demo = build(discover(tmp_path / "runs"))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        base, tuned = client.predict("b", row["prompt"], 8, 1.5, 0.0, 1.0, 0, api_name="/generate")
        assert (base, tuned) == (row["base"], row["tuned"])
        assert base != tuned
        shown = client.predict("a", api_name="/metrics")
        assert f"| held-out perplexity, tuned | {metrics['eval/perplexity']:.4g} |" in shown
        assert "| virtual tokens | 4 |" in shown
    finally:
        demo.close()


def test_demo_refuses_a_missing_dir(tmp_path):
    result = run_cli([str(tmp_path / "nope")], script="scripts/demo.py", timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: adapter directory") and "Traceback" not in result.stderr


# --- several soft prompts on one base: the tiny prompts run and a tiny quotes run -------------

@pytest.fixture(scope="session")
def tiny_quotes_run(tmp_path_factory):
    """A second tiny run, on the quotes sample: (run_dir, metrics). Same tiny base as tiny_run."""
    from conftest import TINY, compose

    from softprompt.train.run import run

    run_dir = tmp_path_factory.mktemp("tiny-quotes")
    overrides = [o for o in TINY if not o.startswith("dataset=")] + ["dataset=quotes_sample"]
    return run_dir, run(compose(overrides), run_dir=run_dir)


@pytest.fixture
def count_base_loads(monkeypatch):
    """How often a base model is loaded from disk (softprompt.serve.inference's load_model)."""
    import softprompt.serve.inference as inference

    calls = []
    real = inference.load_model

    def counting(cfg, device="cpu"):
        calls.append(cfg.name_or_path)
        return real(cfg, device)

    monkeypatch.setattr(inference, "load_model", counting)
    return calls


def _two_prompts(tiny_run, tiny_quotes_run) -> list[str]:
    # a prompt from each run's own generation table
    return [_generations(tiny_run[0])[0]["prompt"], _generations(tiny_quotes_run[0])[-1]["prompt"]]


def test_generate_two_adapters_on_one_base_equal_each_alone(tiny_run, tiny_quotes_run, capsys, count_base_loads):
    from softprompt.serve.generate_cli import main

    prompts = _two_prompts(tiny_run, tiny_quotes_run)
    assert main(["--adapter", f"prompts={tiny_run[0]}", "--adapter", f"quotes={tiny_quotes_run[0] / RunDir.ADAPTER}",
                 *prompts, "--json"]) == 0
    both = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(count_base_loads) == 1  # the base was loaded once for both adapters
    alone = {}
    for name, (run_dir, _) in {"prompts": tiny_run, "quotes": tiny_quotes_run}.items():
        assert main([str(run_dir), *prompts, "--json"]) == 0
        alone[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for i, row in enumerate(both):
        assert row["prompt"] == prompts[i]
        assert list(row["tuned"]) == ["prompts", "quotes"]
        assert row["base"] == alone["prompts"][i]["base"] == alone["quotes"][i]["base"]
        assert row["tuned"]["prompts"] == alone["prompts"][i]["tuned"]
        assert row["tuned"]["quotes"] == alone["quotes"][i]["tuned"]
    # two different soft prompts: different continuations somewhere
    assert any(row["tuned"]["prompts"] != row["tuned"]["quotes"] for row in both)


def test_generate_two_adapters_text_columns_named_after_runs(tiny_run, tiny_quotes_run, capsys, monkeypatch):
    from softprompt.serve.generate_cli import main

    monkeypatch.setenv("COLUMNS", "200")
    prompt = _two_prompts(tiny_run, tiny_quotes_run)[0]
    assert main(["--adapter", str(tiny_run[0]), "--adapter", str(tiny_quotes_run[0]), prompt]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 adapters (PROMPT_TUNING) on base ") and lines[0].endswith("loaded once:")
    assert lines[1:3] == [f"  {tiny_run[0].name}: {tiny_run[0] / RunDir.ADAPTER}",
                          f"  {tiny_quotes_run[0].name}: {tiny_quotes_run[0] / RunDir.ADAPTER}"]
    header = next(line for line in lines if "- base -" in line)
    assert header.count(" | ") == 2
    assert f" {tiny_run[0].name} " in header and f" {tiny_quotes_run[0].name} " in header


def test_adapters_on_different_bases_are_not_shared(tiny_run, tmp_path):
    from softprompt.serve.inference import load_shared

    other = tmp_path / "other"
    shutil.copytree(tiny_run[0] / RunDir.ADAPTER, other)
    record = json.loads((other / RunDir.ADAPTER_RECORD).read_text())
    (tmp_path / "another-base").mkdir()  # a recorded local base that exists is what loads
    record["base_model"] = str(tmp_path / "another-base")
    (other / RunDir.ADAPTER_RECORD).write_text(json.dumps(record))
    with pytest.raises(UserError, match="do not share one base model"):
        load_shared({"a": resolve(tiny_run[0]), "b": resolve(other)})


def test_demo_switches_adapters_on_one_base_without_reloading(tiny_run, tiny_quotes_run, tmp_path, count_base_loads):
    """A runs dir with a prompts and a quotes adapter on the same tiny base: both load onto one
    base at the first request; each later request switches adapters without loading a model."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from gradio_client import Client

    from softprompt.serve.demo import build

    runs = tmp_path / "runs"
    for name, (run_dir, _) in {"prompts": tiny_run, "quotes": tiny_quotes_run}.items():
        shutil.copytree(run_dir, runs / name, ignore=shutil.ignore_patterns(RunDir.WANDB, RunDir.CHECKPOINTS))
    prompt = _two_prompts(tiny_run, tiny_quotes_run)[1]
    from softprompt.serve.inference import load

    expected = {name: load(runs / name).compare([prompt], _settings())[0] for name in ("prompts", "quotes")}
    assert expected["prompts"]["tuned"] != expected["quotes"]["tuned"]
    count_base_loads.clear()
    demo = build(discover(runs))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for name in ("quotes", "prompts", "quotes"):
            base, tuned = client.predict(name, prompt, 8, 1.5, 0.0, 1.0, 0, api_name="/generate")
            assert (base, tuned) == (expected[name]["base"], expected[name]["tuned"])
        assert len(count_base_loads) == 1
    finally:
        demo.close()


def _settings():
    from softprompt.models.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=8, repetition_penalty=1.5, do_sample=False, temperature=1.0,
                              top_p=1.0, seed=0)
