"""Prompt transfer (peft.init=from_run): the run starts exactly from the source's saved prompt,
the length rule, the same-base checks and the record of where the prompt came from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY, compose, run_cli
from safetensors.torch import load_file

from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.rundir import RunDir


def _source_prompt(run_dir) -> torch.Tensor:
    return load_file(RunDir(run_dir).adapter / "adapter_model.safetensors")["prompt_embeddings"]


def _wrapped(*overrides: str):
    """The model exactly as the run builds it (preflight, load_model, methods.wrap)."""
    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap
    from softprompt.train import preflight

    cfg = compose(TINY + list(overrides))
    preflight.check(cfg)
    loaded = load_model(cfg.model)
    return loaded, wrap(loaded.model, cfg.peft, loaded.tokenizer_path)


def _prompt(model) -> torch.Tensor:
    from softprompt.models.methods import soft_prompt_embeddings

    return soft_prompt_embeddings(model)


def test_from_run_starts_from_the_saved_prompt_exactly(tiny_run):
    run_dir, _ = tiny_run
    source = _source_prompt(run_dir)
    assert source.shape == (4, 64)  # TINY: 4 virtual tokens on tiny-llama (hidden 64)
    for given in (run_dir, RunDir(run_dir).adapter):  # a run directory or its adapter/ folder
        _, model = _wrapped("peft.init=from_run", f"peft.init_from={given}")
        assert torch.equal(_prompt(model), source)
    _, text_init = _wrapped()  # the default init=text is another start: the check above can fail
    assert not torch.allclose(_prompt(text_init), source)


def test_longer_and_shorter_prompts_follow_the_stated_rule(tiny_run):
    run_dir, _ = tiny_run
    source = _source_prompt(run_dir)
    _, model = _wrapped("peft.init=from_run", f"peft.init_from={run_dir}", "peft.num_virtual_tokens=2")
    assert torch.equal(_prompt(model), source[:2])  # truncated: the first N kept

    # longer, with init_text: the extra positions are the text's first token embeddings
    loaded, model = _wrapped("peft.init=from_run", f"peft.init_from={run_dir}", "peft.num_virtual_tokens=7",
                             "peft.init_text='Be yourself'")
    ids = loaded.tokenizer("Be yourself")["input_ids"]
    assert len(ids) >= 1
    expected_ids = (ids * 3)[:3]
    words = model.get_input_embeddings().weight.detach()
    assert torch.equal(_prompt(model), torch.cat([source, words[expected_ids]]))

    # longer, no init_text: sampled vocabulary rows, from the seeded generator
    torch.manual_seed(5)
    _, model = _wrapped("peft.init=from_run", f"peft.init_from={run_dir}", "peft.num_virtual_tokens=6",
                        "peft.init_text=null")
    prompt = _prompt(model)
    assert torch.equal(prompt[:4], source)
    words = model.get_input_embeddings().weight.detach()
    for row in prompt[4:]:  # each extra row is one vocabulary token's embedding
        assert int((words == row).all(dim=1).sum()) >= 1
    torch.manual_seed(5)
    _, again = _wrapped("peft.init=from_run", f"peft.init_from={run_dir}", "peft.num_virtual_tokens=6",
                        "peft.init_text=null")
    assert torch.equal(_prompt(again), prompt)


def test_a_run_from_a_prompt_starts_there_and_records_its_source(tiny_run, tmp_path, monkeypatch):
    import softprompt.train.run as run_module

    source_dir, source_metrics = tiny_run
    seen = []

    def wrap_and_look(*args, **kwargs):  # the run's own model, before its first step
        model = real_wrap(*args, **kwargs)
        seen.append(_prompt(model).clone())
        return model

    import softprompt.train.pack as pack

    real_wrap = pack.wrap
    monkeypatch.setattr(pack, "wrap", wrap_and_look)
    out = tmp_path / "transfer"
    metrics = run_module.run(compose(TINY + ["peft.init=from_run", f"peft.init_from={source_dir}",
                                             "training.max_steps=1", "eval.per_epoch=false"]), run_dir=out)
    assert len(seen) == 1 and torch.equal(seen[0], _source_prompt(source_dir))
    assert metrics[keys.TRAIN_STEPS] == 1
    trained = _source_prompt(out)
    assert not torch.equal(trained, seen[0])  # it trained from there

    expected = {"path": str(RunDir(source_dir).adapter.resolve()), "run_dir": str(source_dir.resolve()),
                "base_model_id": "softprompt/tiny-llama", "num_virtual_tokens": 4, "dataset": "prompts_sample",
                keys.EVAL_PERPLEXITY: source_metrics[keys.EVAL_PERPLEXITY]}
    config = json.loads(RunDir(out).config.read_text())
    record = json.loads(RunDir(out).adapter_record.read_text())
    for written in (config["prompt_source"], record["prompt_source"]):
        assert {k: written[k] for k in expected} == expected
    assert config["peft"]["init"] == "from_run" and config["peft"]["init_from"] == str(source_dir)


def test_another_base_model_is_refused_before_loading(tiny_run):
    run_dir, _ = tiny_run
    result = run_cli(["model=tiny-bloom", "dataset=prompts_sample", "wandb.mode=disabled", "peft.init=from_run",
                      f"peft.init_from={run_dir}"], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (f"error: peft.init_from={run_dir} was trained on base model softprompt/tiny-llama, this run "
                        "uses softprompt/tiny-bloom; a soft prompt transfers only between runs of the same base model")


@pytest.mark.parametrize("overrides, message", [
    (["model.tiny.hidden_size=32"], "has hidden size 64, this run's softprompt/tiny-llama has 32"),
    (["model.tiny.num_layers=3"], "other model.tiny settings (num_layers: 2 there, 3 here)"),
])
def test_other_shapes_are_refused(tiny_run, overrides, message):
    from softprompt.train import preflight

    run_dir, _ = tiny_run
    with pytest.raises(UserError) as exc:
        preflight.check(compose(TINY + ["peft.init=from_run", f"peft.init_from={run_dir}", *overrides]))
    assert message in str(exc.value)


@pytest.mark.parametrize("overrides", [["peft=p_tuning"], ["peft=p_tuning", "peft.init=from_run"],
                                       ["peft=prefix_tuning"]])
def test_other_methods_are_refused(tiny_run, overrides):
    from softprompt.train import preflight

    run_dir, _ = tiny_run
    with pytest.raises(UserError) as exc:
        preflight.check(compose(TINY + overrides + [f"peft.init_from={run_dir}"]))
    method = overrides[0].split("=")[1]
    assert str(exc.value) == (f"peft.init=from_run / peft.init_from apply to peft.method=prompt_tuning only (got "
                              f"peft.method={method}): only its prompt is a sequence of input embeddings to start from")


def test_init_from_is_read_only_for_init_from_run(tiny_run):
    """A transfer sweep gives peft.init_from to its init=text jobs too: they start from the text."""
    run_dir, _ = tiny_run
    _, with_path = _wrapped(f"peft.init_from={run_dir}")  # init=text, the default
    _, without = _wrapped()
    assert torch.equal(_prompt(with_path), _prompt(without))


def test_bad_sources_are_refused(tiny_run, tmp_path):
    from softprompt.train import preflight

    run_dir, _ = tiny_run

    def error(*overrides: str) -> str:
        with pytest.raises(UserError) as exc:
            preflight.check(compose(TINY + list(overrides)))
        return str(exc.value)

    assert error("peft.init=from_run") == ("peft.init=from_run needs peft.init_from=RUN_DIR (a finished run or "
                                           "its adapter/ folder)")
    assert "does not exist" in error("peft.init=from_run", f"peft.init_from={tmp_path / 'nope'}")
    assert "holds no adapter" in error("peft.init=from_run", f"peft.init_from={tmp_path}")
    lora = tmp_path / "lora" / RunDir.ADAPTER
    shutil.copytree(RunDir(run_dir).adapter, lora)
    config = json.loads((lora / RunDir.ADAPTER_CONFIG).read_text())
    (lora / RunDir.ADAPTER_CONFIG).write_text(json.dumps(config | {"peft_type": "LORA"}))
    assert error("peft.init=from_run", f"peft.init_from={lora}") == (
        f"peft.init_from={lora} is a LORA adapter; peft.init=from_run starts from a prompt-tuning "
        "(PROMPT_TUNING) run's soft prompt only")


def test_transfer_sweep_runs_both_inits_over_three_seeds(tiny_run, tmp_path):
    """sweeps/transfer.yaml through scripts/sweep.py's engine on the tiny model: seeds are an axis,
    2 points x 3 seeds, each point's seeds one W&B job_type, every job one W&B group."""
    from conftest import ROOT

    from softprompt.experiments.report import build_report
    from softprompt.experiments.sweep import load_sweep, run_sweep
    from softprompt.track.records import read_run

    source_dir, _ = tiny_run
    sweep_dir, jobs = run_sweep(load_sweep(ROOT / "sweeps" / "transfer.yaml"), [
        "model=tiny-llama", "peft.num_virtual_tokens=4", f"peft.init_from={source_dir}", "dataset.max_samples=10",
        "training.max_steps=1", "eval.max_new_tokens=4", "eval.num_heldout_generations=0", "eval.per_epoch=false",
        "training.save_every_epoch=false"], root=tmp_path, log=lambda _: None)
    assert [j.state for j in jobs] == ["finished"] * 6, [j.error for j in jobs]
    configs = [json.loads(RunDir(j.run_dir).config.read_text()) for j in jobs]
    assert sorted((c["peft"]["init"], c["seed"]) for c in configs) == \
        [(init, seed) for init in ("from_run", "text") for seed in (1, 2, 3)]
    assert [c["dataset"]["name"] for c in configs] == ["quotes_sample"] * 6
    for c in configs:  # only the from_run jobs record a source
        assert ("prompt_source" in c) == (c["peft"]["init"] == "from_run")

    report = build_report([sweep_dir])
    assert sorted(len(p.runs) for p in report.points) == [3, 3]
    # the axes are the init and the seed; the source's description is no column of its own
    assert report.swept == ["peft.init", "seed"]
    wandb_runs = {c["seed"] * 10 + (c["peft"]["init"] == "text"): read_run(RunDir(j.run_dir).wandb)
                  for c, j in zip(configs, jobs)}
    assert len({r.group for r in wandb_runs.values()}) == 1 and next(iter(wandb_runs.values())).group
    for text in (0, 1):  # one job_type per point, shared by its seeds
        assert len({wandb_runs[seed * 10 + text].job_type for seed in (1, 2, 3)}) == 1
    assert wandb_runs[10].job_type != wandb_runs[11].job_type
