"""Every preset composes, with the values the SPEC fixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose, run_cli

from softprompt.core.config import CONF_DIR, validate

GROUPS = ["model", "dataset", "peft", "training", "eval", "wandb", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_defaults_are_the_seed_experiment():
    cfg = compose()
    assert cfg.model.name_or_path == "bigscience/bloomz-560m"
    assert cfg.dataset.hub_id == "fka/awesome-chatgpt-prompts" and cfg.dataset.text_column == "prompt"
    assert cfg.dataset.path is None and cfg.dataset.max_samples is None
    assert cfg.peft.method == "prompt_tuning" and cfg.peft.num_virtual_tokens == 4
    assert cfg.training.epochs == 6 and cfg.training.max_steps is None and cfg.training.resume is False
    assert cfg.eval.max_new_tokens == 100 and cfg.eval.repetition_penalty == 1.5
    assert "I want you to act as a motivational coach." in cfg.eval.prompts
    assert cfg.wandb.mode == "auto" and cfg.wandb.project is None  # null: WANDB_PROJECT, else softprompt
    assert cfg.model.trust_remote_code is False
    assert cfg.seed == 42


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_preset_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}"])
    validate(cfg)
    if group in ("model", "dataset"):
        assert cfg[group].name == option


def test_quotes_switches_hub_id_and_column():
    cfg = compose(["dataset=quotes"])
    assert (cfg.dataset.hub_id, cfg.dataset.text_column) == ("Abirate/english_quotes", "quote")


def test_offline_experiment_needs_no_network():
    cfg = compose(["experiment=offline"])
    assert cfg.model.source == "gguf_package" and cfg.dataset.bundled == "prompts_sample.csv"
    assert cfg.wandb.mode == "offline"


def test_cfg_job_prints_seed_defaults():
    result = run_cli(["--cfg", "job", "dataset=quotes", "peft.num_virtual_tokens=8"])
    assert result.returncode == 0, result.stderr
    assert "name_or_path: bigscience/bloomz-560m" in result.stdout
    assert "hub_id: Abirate/english_quotes" in result.stdout and "text_column: quote" in result.stdout
    assert "num_virtual_tokens: 8" in result.stdout and "epochs: 6" in result.stdout
