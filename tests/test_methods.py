"""PEFT methods beside prompt tuning, the learned prompt read back as tokens, several adapters on
one base, and a 2-process (gloo) run of the real entrypoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, child_env, compose

from softprompt.core import keys
from softprompt.core.rundir import RunDir

# trainable numbers on tiny-llama (hidden 64, 2 layers, 4 heads, 2 key/value heads of 16 dims)
TRAINABLE = {
    "prompt_tuning": 4 * 64,  # 4 virtual tokens x hidden
    "prefix_tuning": 4 * 2 * 2 * 32,  # 4 tokens x 2 layers x (key, value) x kv width 2 heads x 16
    # embedding 4x64 + MLP 64->128->128->64 with biases
    "p_tuning": 4 * 64 + (64 * 128 + 128) + (128 * 128 + 128) + (128 * 64 + 64),
    # r=8 on q_proj (64->64) and v_proj (64->32) in 2 layers: A is r x in, B is out x r
    "lora": 2 * (8 * (64 + 64) + 8 * (64 + 32)),
}


def _tiny(method: str, *extra: str):
    from softprompt.models.loading import load_model
    from softprompt.models.methods import wrap

    cfg = compose(TINY + [f"peft={method}", "training.max_steps=2", "training.learning_rate=0.3", *extra])
    loaded = load_model(cfg.model)
    return cfg, loaded, wrap(loaded.model, cfg.peft, loaded.tokenizer_path)


def _batch(tok):
    from softprompt.train.batches import PaddingCollator

    return PaddingCollator(tok.pad_token_id)([{"input_ids": tok("I want you to act as a poet.")["input_ids"]},
                                              {"input_ids": tok("Be yourself; everyone else is taken.")["input_ids"]}])


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning", "lora"])
def test_preset_trains_saves_and_reloads(method, tmp_path):
    from peft import PeftModel

    from softprompt.data.loading import load_splits, tokenize
    from softprompt.models.loading import load_model
    from softprompt.train.batches import PaddingCollator
    from softprompt.train.pack import Data, new_lane
    from softprompt.train.step import train_step

    cfg = compose(TINY + [f"peft={method}", "training.max_steps=2", "training.learning_rate=0.3"])
    assert cfg.peft.method == method
    loaded = load_model(cfg.model)
    tok = loaded.tokenizer
    rows = tokenize(load_splits(cfg.dataset, cfg.seed).train[:16], tok, 64, "tiny")
    lane = new_lane(cfg, loaded, Data(None, rows, [], [], [], None, False, 0.0), [], total=2)
    model = lane.model
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    assert sum(v.numel() for v in before.values()) == TRAINABLE[method]
    collate = PaddingCollator(tok.pad_token_id)
    for step, batch in enumerate((rows[:8], rows[8:])):  # the engine's step, twice
        result = train_step([lane], [collate([{"input_ids": r} for r in batch])], loaded.model, step,
                            forward="turns", device=torch.device("cpu"), autocast=None)
        assert result.tokens == [sum(len(r) for r in batch)] and result.rates == [0.3]
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before), "no trainable weight moved"

    model.save_pretrained(tmp_path / RunDir.ADAPTER)
    model.eval()
    batch = _batch(tok)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    fresh = load_model(cfg.model).model
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / RunDir.ADAPTER).eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_prefix_generation_batched_equals_one_at_a_time(arch):
    from softprompt.models.generation import GenerationSettings
    from softprompt.models.prefix_generation import generate_with_prefix

    cfg, loaded, model = _tiny("prefix_tuning", f"model=tiny-{arch}")
    torch.manual_seed(1)
    with torch.no_grad():  # a prefix far from its init, so that it matters
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    tok = loaded.tokenizer
    prompts = ["I want you to act as a poet.", "Be yourself", "There are two nice things that should matter to you:"]
    settings = GenerationSettings(max_new_tokens=6)
    batched = generate_with_prefix(model, tok, prompts, settings, batch_size=3)
    alone = [generate_with_prefix(model, tok, [p], settings, batch_size=1)[0] for p in prompts]
    assert batched == alone
    import softprompt.models.prefix_generation as prefix_generation

    with pytest.MonkeyPatch.context() as patch:  # generate() with the prefix cache: the same text
        patch.setattr(prefix_generation, "supports_lean_decode", lambda model: False)
        assert generate_with_prefix(model, tok, prompts, settings, batch_size=3) == batched
    # the first generated token is the training forward pass's argmax (same positions, same prefix)
    ids = tok(prompts[1], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    first = generate_with_prefix(model, tok, [prompts[1]], GenerationSettings(max_new_tokens=1, repetition_penalty=1.0))
    assert first[0] == tok.decode([int(logits[0, -1].argmax())]).strip()
    # and the prefix changes the output: the base model alone continues differently
    from softprompt.models.generation import generate

    assert generate(model.get_base_model(), tok, prompts, settings) != batched


def test_nearest_tokens_of_text_init_are_the_init_text():
    from softprompt.evaluation.interpret import nearest_tokens
    from softprompt.models.loading import load_model
    from softprompt.models.methods import soft_prompt_embeddings

    text = "I want you to act as"
    cfg = compose(TINY)
    tok = load_model(cfg.model).tokenizer
    init_ids = tok(text)["input_ids"]  # as PEFT tokenizes the init text
    _, loaded, model = _tiny("prompt_tuning", "peft.init=text", f"peft.init_text={text}",
                             f"peft.num_virtual_tokens={len(init_ids)}")
    prompt = soft_prompt_embeddings(model)
    rows = nearest_tokens(prompt, model.get_input_embeddings().weight, tok, k=3, initial=prompt)
    assert [r["neighbours"][0]["id"] for r in rows] == init_ids
    assert "".join(r["neighbours"][0]["token"] for r in rows) == text
    for r in rows:
        assert r["neighbours"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert r["neighbours"][1]["cosine"] < 0.99
        assert r["cosine_to_init"] == pytest.approx(1.0, abs=1e-6) and r["l2_to_init"] == pytest.approx(0.0)
        assert r["l2_norm"] == pytest.approx(float(prompt[r["position"]].norm()))


def test_run_writes_prompt_tokens_and_wandb_table(tiny_run):
    from softprompt.core.rundir import RunDir

    run_dir, _ = tiny_run
    rows = RunDir(run_dir).read_prompt_tokens()
    assert [r["position"] for r in rows] == [0, 1, 2, 3]
    assert all(len(r["neighbours"]) == 5 for r in rows)
    # 4 Adam steps at lr 0.3 move the text-initialised prompt far ("I want you to act" -> norm ~4.5)
    assert all(r["l2_to_init"] > 1.0 and -1.0 <= r["cosine_to_init"] < 0.9 for r in rows)
    # the init of position 0 is the embedding of "I": where "I" is a neighbour, its cosine is cosine_to_init
    first = {n["token"]: n["cosine"] for n in rows[0]["neighbours"]}
    if "I" in first:
        assert first["I"] == pytest.approx(rows[0]["cosine_to_init"], abs=1e-5)
    tables = list((run_dir / RunDir.WANDB).glob("offline-run-*/files/media/table/peft/prompt_tokens_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["position", "nearest_tokens"] and len(table["data"]) == 4


def test_lora_run_evaluates_the_true_base(tiny_run, tmp_path):
    """LoRA injects its layers into the base in place: the base eval must come before that."""
    from softprompt.train.run import run

    _, prompt_metrics = tiny_run
    metrics = run(compose(TINY + ["peft=lora", "training.learning_rate=0.01"]), run_dir=tmp_path)
    # same data, same seed, same base model: the same base perplexity as the prompt-tuning run
    assert metrics[keys.EVAL_BASE_PERPLEXITY] == pytest.approx(prompt_metrics[keys.EVAL_BASE_PERPLEXITY], rel=1e-6)
    assert metrics[keys.EVAL_PERPLEXITY] < metrics[keys.EVAL_BASE_PERPLEXITY]
    assert metrics[keys.TRAIN_TRAINABLE_PARAMS] == TRAINABLE["lora"]
    assert not (tmp_path / RunDir.PROMPT_TOKENS).exists()  # no soft prompt to read
    rows = [json.loads(line) for line in (tmp_path / RunDir.GENERATIONS).read_text().splitlines()]
    assert len(rows) == 4 and any(r["base"] != r["tuned"] for r in rows)


def _train_soft_prompt(tmp_path, name, value):
    """A saved prompt-tuning adapter whose prompt is `value` everywhere (no training needed)."""
    _, loaded, model = _tiny("prompt_tuning", "peft.init=random")
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.fill_(value)
    model.save_pretrained(tmp_path / name / RunDir.ADAPTER)
    return loaded


def test_load_adapters_switches_between_two_soft_prompts(tmp_path):
    from peft import PeftModel

    from softprompt.models.generation import GenerationSettings
    from softprompt.models.loading import load_model
    from softprompt.serve.multi_adapter import load_adapters

    _train_soft_prompt(tmp_path, "prompts", 0.5)
    _train_soft_prompt(tmp_path, "quotes", -0.5)
    cfg = compose(TINY)
    loaded = load_model(cfg.model)
    tok = loaded.tokenizer
    adapters = load_adapters(loaded.model, [tmp_path / "prompts", tmp_path / "quotes" / RunDir.ADAPTER])
    assert list(adapters) == ["prompts", "quotes"]
    assert adapters["prompts"].method == "prompt_tuning"
    assert torch.equal(adapters["prompts"].soft_prompt, torch.full((4, 64), 0.5))
    assert torch.equal(adapters["quotes"].soft_prompt, torch.full((4, 64), -0.5))
    batch = _batch(tok)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = adapters["quotes"].activate().model
    with torch.no_grad():
        quotes_logits = model(**inputs).logits
        adapters["prompts"].activate()
        prompts_logits = model(**inputs).logits
    assert not torch.allclose(quotes_logits, prompts_logits)
    # each equals the adapter loaded alone
    alone = PeftModel.from_pretrained(load_model(cfg.model).model, tmp_path / "quotes" / RunDir.ADAPTER).eval()
    with torch.no_grad():
        torch.testing.assert_close(alone(**inputs).logits, quotes_logits)
    settings = GenerationSettings(max_new_tokens=5)
    a, b = (adapters[n].generate(tok, ["Be yourself"], settings) for n in ("prompts", "quotes"))
    assert a != b
    from softprompt.models.generation import generate

    assert b == generate(alone.get_base_model(), tok, ["Be yourself"], settings,
                         soft_prompt=torch.full((4, 64), -0.5))


def test_load_adapters_rejects_a_non_adapter_dir(tmp_path):
    from softprompt.core.errors import UserError
    from softprompt.serve.multi_adapter import load_adapters

    with pytest.raises(UserError, match="holds no adapter"):
        load_adapters(torch.nn.Linear(1, 1), [tmp_path])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run_writes_once(tmp_path):
    from softprompt.models.loading import load_model

    load_model(compose(TINY).model)  # build the tiny model's cache once, not racing in two ranks
    run_dir = tmp_path / "ddp"
    env = child_env({"OMP_NUM_THREADS": "1"})
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), str(ROOT / "train.py"), *TINY, "training.max_steps=2", "training.batch_size=4",
            "eval.max_new_tokens=4", "eval.num_heldout_generations=0", "eval.per_epoch=false",
            f"hydra.run.dir={run_dir}"]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob(RunDir.METRICS)) == [f"ddp/{RunDir.METRICS}"]
    assert len(list((run_dir / RunDir.WANDB).glob("offline-run-*"))) == 1
    metrics = json.loads((run_dir / RunDir.METRICS).read_text())
    assert metrics[keys.TRAIN_STEPS] == 2
    assert len((run_dir / RunDir.GENERATIONS).read_text().splitlines()) == 2
    # rank 0 counted the tokens of both ranks' shards (2 steps x 2 ranks x 4 rows), exactly
    from softprompt.data.loading import load_splits, tokenize
    from softprompt.train.batches import epoch_batches

    cfg = compose(TINY)
    loaded = load_model(cfg.model)
    rows = tokenize(load_splits(cfg.dataset, cfg.seed).train, loaded.tokenizer, cfg.training.max_length,
                    f"{cfg.model.source}:{loaded.tokenizer_path}")
    shards = [epoch_batches([len(r) for r in rows], 4, cfg.seed, 0, True, rank=r, world_size=2)[:2] for r in (0, 1)]
    assert shards[0] != shards[1]
    expected = sum(len(rows[k]) for shard in shards for batch in shard for k in batch)
    assert round(metrics[keys.TRAIN_TOKENS_PER_SECOND] * metrics[keys.TRAIN_RUNTIME_S]) == expected
    assert "tuned model: held-out perplexity" in result.stdout
    assert result.stdout.count("tuned model: held-out perplexity") == 1  # evaluated once


def test_two_process_pack_trains_every_job_on_both_shards(tmp_path):
    """`torchrun` under a packed multirun: both ranks plan the same pack, each trains its shard of
    every job's batches, rank 0 alone writes; each job's token count is both shards' exactly."""
    from softprompt.data.loading import load_splits, tokenize
    from softprompt.models.loading import load_model
    from softprompt.train.batches import epoch_batches

    load_model(compose(TINY).model)  # build the tiny model's cache once, not racing in two ranks
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), str(ROOT / "train.py"), "-m", "hydra/launcher=packed", *TINY, "training.max_steps=2",
            "training.batch_size=4", "eval.max_new_tokens=4", "eval.num_heldout_generations=0",
            "eval.per_epoch=false", "seed=1,2", "training.pack_forward=turns", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(args, cwd=ROOT, env=child_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob(RunDir.METRICS)) == [
        f"0/{RunDir.METRICS}", f"1/{RunDir.METRICS}"]
    loaded = load_model(compose(TINY).model)
    for i, seed in enumerate((1, 2)):
        metrics = json.loads((sweep / str(i) / RunDir.METRICS).read_text())
        assert metrics[keys.TRAIN_STEPS] == 2 and metrics[keys.PACK_JOBS] == 2
        assert len(list((sweep / str(i) / RunDir.WANDB).glob("offline-run-*"))) == 1
        cfg = compose(TINY + [f"seed={seed}"])
        rows = tokenize(load_splits(cfg.dataset, seed).train, loaded.tokenizer, cfg.training.max_length,
                        f"{cfg.model.source}:{loaded.tokenizer_path}")
        shards = [epoch_batches([len(r) for r in rows], 4, seed, 0, True, rank=r, world_size=2)[:2] for r in (0, 1)]
        assert shards[0] != shards[1]
        assert metrics[keys.TRAIN_TOKENS_SEEN] == sum(len(rows[k]) for shard in shards for batch in shard for k in batch)
