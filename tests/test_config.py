"""Every preset composes, with the values the SPEC fixes."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from conftest import ROOT, compose, run_cli
from omegaconf import MISSING, OmegaConf

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
    assert cfg.wandb.mode == "auto" and cfg.wandb.project == "softprompt"
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


def test_cfg_job_shows_the_specs_defaults():
    result = run_cli(["--cfg", "job"])
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["peft"]["num_virtual_tokens"] == 4 and cfg["training"]["epochs"] == 6
    assert (cfg["eval"]["max_new_tokens"], cfg["eval"]["repetition_penalty"]) == (100, 1.5)
    assert cfg["wandb"]["mode"] == "auto" and cfg["seed"] == 42
    assert cfg["peft"]["init"] == "text" and cfg["training"]["learning_rate"] == 0.3
    # every key has a value from a preset: none is left MISSING ("???")
    assert "???" not in result.stdout


# --- one home per default: the YAML presets; the schema holds types and checks -------------------


def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            yield from _leaf_fields(f.type, f"{prefix}{f.name}.")
        elif f.default_factory is not dataclasses.MISSING:
            yield from _leaf_fields(type(f.default_factory()), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.default


def test_schema_carries_no_default():
    from softprompt.core.config import Config

    leaves = dict(_leaf_fields(Config))
    assert len(leaves) > 60 and "peft.init" in leaves and "training.learning_rate" in leaves
    assert {k: v for k, v in leaves.items() if v != MISSING} == {}


@pytest.mark.parametrize("override,problem", [
    ("training.epochs=six", "Value 'six' of type 'str' could not be converted to Integer"),
    ("training.epoch=6", "Key 'epoch' not in 'TrainingConfig'"),
    ("model.tiny.hidden=8", "Key 'hidden' not in 'TinyModelConfig'"),
])
def test_schema_still_rejects_wrong_types_and_unknown_keys(override, problem):
    with pytest.raises(Exception) as info:
        compose(["model=tiny-llama", override])
    assert problem in "".join(str(e) for e in (info.value, info.value.__cause__) if e)


def _markdown_tables(text: str):
    """(header cells, rows of cells) of each pipe table in a markdown text."""
    tables, lines = [], text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and re.match(r"^\|(\s*:?-+:?\s*\|)+\s*$", lines[i + 1]) and \
                (i == 0 or not lines[i - 1].startswith("|")):
            rows = []
            for line in lines[i + 2:]:
                if not line.startswith("|"):
                    break
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
            tables.append(([c.strip().lower() for c in lines[i].strip().split("|")[1:-1]], rows))
    return tables


def documented_defaults() -> list[tuple[str, str, str]]:
    """(file, key, value) for every default stated in a `| key | ... | default |` table of the
    README or docs/*.md: the backticked values of the default column, paired with the backticked
    keys of the key column (in order; `project \\`softprompt\\`` names the key it belongs to)."""
    found = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for header, rows in _markdown_tables(md.read_text(encoding="utf-8")):
            if not header or header[0] != "key" or "default" not in header:
                continue
            column = header.index("default")
            for row in rows:
                keys_, cell = re.findall(r"`([^`]+)`", row[0]), row[column]
                values = re.findall(r"`([^`]*)`", cell)
                if not values:
                    continue  # "per model", "by measurement", "": nothing stated
                if len(values) == len(keys_):
                    found += [(md.name, k, v) for k, v in zip(keys_, values)]
                    continue
                labelled = re.findall(r"(\w+) `([^`]*)`", cell)
                assert labelled and len(labelled) == len(values), f"{md.name}: cannot pair {row[0]} with {cell}"
                for word, value in labelled:
                    [key] = [k for k in keys_ if k.endswith(f".{word}")]
                    found.append((md.name, key, value))
    return found


def test_every_documented_default_is_the_composed_one():
    cfg = compose()
    stated = documented_defaults()
    assert len(stated) >= 20, stated  # the README's config table, at least
    wrong = [(f, k, v, OmegaConf.select(cfg, k, throw_on_missing=True)) for f, k, v in stated
             if OmegaConf.select(cfg, k, throw_on_missing=True) != yaml.safe_load(v)]
    assert wrong == [], "docs state another default than conf/ composes: (file, key, documented, composed)"


def test_every_documented_preset_learning_rate_is_the_composed_one():
    """docs/methods.md: one row per `peft=` option with the learning rate its preset sets."""
    checked = 0
    for md in sorted((ROOT / "docs").glob("*.md")):
        for header, rows in _markdown_tables(md.read_text(encoding="utf-8")):
            if not (header and header[0] == "`peft=`" and any("learning rate" in h for h in header)):
                continue
            column = next(i for i, h in enumerate(header) if "learning rate" in h)
            for row in rows:
                option = re.match(r"`(\w+)`", row[0]).group(1)
                documented = float(re.match(r"\s*([0-9.e-]+)", row[column]).group(1))
                assert compose([f"peft={option}"]).training.learning_rate == documented, (md.name, option)
                checked += 1
    assert checked == len(_options("peft")) == 4
