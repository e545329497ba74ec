"""Evaluation: perplexity against a hand computation, batched == one-by-one greedy generation,
the base-evaluation cache, generation metrics and what a run records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose

from softprompt.core import keys
from softprompt.core.rundir import RunDir
from softprompt.evaluation.gen_metrics import (
    distinct_n2,
    generation_metrics,
    repetition_rate,
    rouge_l,
)
from softprompt.evaluation.perplexity import perplexity
from softprompt.models.generation import GenerationSettings, generate

TEXTS = ["I want you to act as a poet.", "Be yourself; everyone else is already taken.",
         "Act as a travel guide for Rome and tell me where to eat", "Hi"]


@pytest.fixture(scope="module", params=["bloom", "llama"])
def tiny(request):
    from softprompt.models.loading import load_model

    return load_model(compose([f"model=tiny-{request.param}"]).model)


def _rows(tok) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS]


def _hand_nll(model, rows, soft_prompt=None) -> tuple[float, int]:
    """Sum of -log p(token | text before it, soft prompt) over every text token after the first,
    one unpadded row at a time, through the plain model with inputs_embeds."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            embeds = model.get_input_embeddings()(ids)
            if soft_prompt is not None:
                embeds = torch.cat([soft_prompt[None], embeds], dim=1)
            logits = model(inputs_embeds=embeds).logits[0, -len(row):]  # the text positions
            logp = torch.log_softmax(logits.double(), dim=-1)
            total -= sum(logp[i, row[i + 1]].item() for i in range(len(row) - 1))
            count += len(row) - 1
    return total, count


def test_perplexity_equals_hand_computation_base(tiny):
    rows = _rows(tiny.tokenizer)
    nll, count = _hand_nll(tiny.model, rows)
    result = perplexity(tiny.model, rows, tiny.tokenizer.pad_token_id, batch_size=3)  # padded batches
    assert result.tokens == count == sum(len(r) - 1 for r in rows)
    assert result.loss == pytest.approx(nll / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_equals_hand_computation_with_soft_prompt(tiny):
    from softprompt.models.methods import (
        soft_prompt_embeddings,
        virtual_tokens_in_logits,
        wrap,
    )

    cfg = compose([f"model=tiny-{tiny.model.config.model_type}", "peft.init=random", "peft.num_virtual_tokens=3"])
    import copy

    peft_model = wrap(copy.deepcopy(tiny.model), cfg.peft, tiny.tokenizer_path)
    with torch.no_grad():  # a prompt far from PEFT's init, so a wrong offset would show
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    rows = _rows(tiny.tokenizer)
    soft = soft_prompt_embeddings(peft_model)
    assert soft.shape == (3, 64)
    nll, count = _hand_nll(peft_model.get_base_model(), rows, soft)
    base_nll, _ = _hand_nll(tiny.model, rows)
    assert abs(nll - base_nll) > 0.1  # the prompt changes the numbers being compared
    result = perplexity(peft_model, rows, tiny.tokenizer.pad_token_id, batch_size=3,
                        num_virtual_tokens=virtual_tokens_in_logits(peft_model))
    assert result.tokens == count
    assert result.loss == pytest.approx(nll / count, rel=1e-5)


def _hand_greedy(model, tok, prompt: str, soft_prompt, max_new: int, penalty: float) -> str:
    """One prompt, no padding, no KV cache: argmax after a CTRL repetition penalty over the
    prompt's ids and the ids generated so far; stops at EOS."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            embeds = model.get_input_embeddings()(torch.tensor([ids + generated]))
            if soft_prompt is not None:
                embeds = torch.cat([soft_prompt[None], embeds], dim=1)
            scores = model(inputs_embeds=embeds).logits[0, -1].clone()
            seen = torch.tensor(sorted(set(ids + generated)))
            scores[seen] = torch.where(scores[seen] < 0, scores[seen] * penalty, scores[seen] / penalty)
            nxt = int(scores.argmax())
            generated.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(generated, skip_special_tokens=True).strip()


@pytest.mark.parametrize("with_prompt", [False, True])
def test_batched_generation_equals_one_at_a_time(tiny, with_prompt):
    tok = tiny.tokenizer
    soft = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.5 if with_prompt else None
    settings = GenerationSettings(max_new_tokens=12, repetition_penalty=1.5)
    batched = generate(tiny.model, tok, TEXTS, settings, soft_prompt=soft, batch_size=4)
    single = [generate(tiny.model, tok, [t], settings, soft_prompt=soft, batch_size=1)[0] for t in TEXTS]
    by_hand = [_hand_greedy(tiny.model, tok, t, soft, 12, 1.5) for t in TEXTS]
    assert batched == single == by_hand
    assert all(by_hand) and len(set(by_hand)) == len(TEXTS)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_lean_decode_equals_generate(tiny, with_prompt, monkeypatch):
    """The lean greedy loop (softprompt.models.decode) gives generate()'s text, token for token."""
    import softprompt.models.generation as generation

    tok = tiny.tokenizer
    soft = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.5 if with_prompt else None
    settings = GenerationSettings(max_new_tokens=12, repetition_penalty=1.5)
    lean = generate(tiny.model, tok, TEXTS, settings, soft_prompt=soft, batch_size=4)
    monkeypatch.setattr(generation, "supports_lean_decode", lambda model: False)
    assert generate(tiny.model, tok, TEXTS, settings, soft_prompt=soft, batch_size=4) == lean
    assert len(set(lean)) == len(TEXTS)


def test_lean_decode_stops_at_eos_and_pads_finished_rows(tiny):
    from softprompt.models.decode import greedy_decode

    tok = tiny.tokenizer
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    free = greedy_decode(tiny.model, torch.ones((1, len(ids)), dtype=torch.long), [ids], 4, 1.0,
                         eos_token_id=-1, pad_token_id=tok.pad_token_id, input_ids=torch.tensor([ids]))[0].tolist()
    assert len(free) == 4
    # declare a token the row generates the EOS: the row stops at its first occurrence, and pads
    # while a second row goes on
    eos = free[-1]
    stop = free.index(eos)
    pad = next(i for i in range(len(tok)) if i not in free)
    pair = torch.tensor([ids, ids[1:] + [ids[0]]])
    out = greedy_decode(tiny.model, torch.ones_like(pair), [ids, pair[1].tolist()], 4, 1.0, eos_token_id=eos,
                        pad_token_id=pad, input_ids=pair)[0].tolist()
    assert out[: stop + 1] == free[: stop + 1]
    assert out[stop + 1 :] == [pad] * (len(out) - stop - 1)


def test_rows_with_different_soft_prompts_decode_as_each_alone(tiny):
    """A packed sweep's jobs generate in one batch, each row with its own prompt (or none)."""
    tok = tiny.tokenizer
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(n, 64, generator=g) * 0.5 for n in (2, 5)]
    settings = GenerationSettings(max_new_tokens=10, repetition_penalty=1.5)
    rows = [(text, prompt) for prompt in (*prompts, None) for text in TEXTS[:3]]
    together = generate(tiny.model, tok, [t for t, _ in rows], settings, soft_prompt=[p for _, p in rows],
                        batch_size=len(rows))
    alone = [generate(tiny.model, tok, [t], settings, soft_prompt=p)[0] for t, p in rows]
    assert together == alone
    assert len(set(together)) > 3  # the prompts change the text


def test_generation_shows_progress_for_several_batches(tiny, capfd, monkeypatch):
    """A bar on stderr for several batches; none under TQDM_DISABLE=1 or SOFTPROMPT_QUIET=1."""
    settings = GenerationSettings(max_new_tokens=2)
    monkeypatch.delenv("SOFTPROMPT_QUIET")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    generate(tiny.model, tiny.tokenizer, TEXTS[:2], settings, batch_size=1, desc="generating (test)")
    assert "generating (test)" in capfd.readouterr().err
    for var, value in (("TQDM_DISABLE", "1"), ("TQDM_DISABLE", "true"), ("SOFTPROMPT_QUIET", "1")):
        with monkeypatch.context() as env:
            env.setenv(var, value)
            generate(tiny.model, tiny.tokenizer, TEXTS[:2], settings, batch_size=1, desc="generating (test)")
        assert capfd.readouterr().err == "", (var, value)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    generate(tiny.model, tiny.tokenizer, TEXTS[:2], settings, batch_size=1, desc="generating (test)")
    assert "generating (test)" in capfd.readouterr().err


# --- base-evaluation cache ---------------------------------------------------------------------


def _base_eval(cfg, counter, loaded=None):
    from softprompt.data.loading import load_splits, tokenize
    from softprompt.evaluation.base_cache import evaluate_base
    from softprompt.evaluation.evaluate import eval_prompts, train_subset
    from softprompt.models.loading import load_model

    splits = load_splits(cfg.dataset, cfg.seed)
    if loaded is None:
        loaded = load_model(cfg.model)
        loaded.model.register_forward_hook(lambda *a: counter.append(1))
    tid = f"tiny:{loaded.tokenizer_path}"
    val = tokenize(splits.validation, loaded.tokenizer, cfg.training.max_length, tid)
    train = tokenize(splits.train, loaded.tokenizer, cfg.training.max_length, tid)
    result = evaluate_base(loaded, val, train_subset(train, cfg.eval), eval_prompts(cfg.eval, splits.validation), cfg)
    return result, loaded


def test_base_evaluation_is_cached_and_recomputed_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))  # an empty cache

    def entries() -> list[Path]:
        return [p for p in (tmp_path / "base_eval").iterdir() if p.is_dir() and not p.name.startswith(".")]
    base = TINY + ["eval.max_new_tokens=2", "dataset.max_samples=12", "eval.num_heldout_generations=1"]
    calls: list[int] = []
    (first, hit, _), loaded = _base_eval(compose(base), calls)
    assert not hit and len(calls) > 0
    assert len(entries()) == 1

    calls.clear()
    (again, hit, _), _ = _base_eval(compose(base), calls, loaded)
    assert hit and calls == []  # the model did not run
    assert again.perplexity == first.perplexity and again.generations == first.generations
    assert again.train_perplexity == first.train_perplexity and again.seconds == first.seconds

    changes = [["dataset.max_samples=13"],  # other rows
               ["eval.max_new_tokens=3"],  # other generation settings
               ["training.max_length=16"],  # other tokens
               ["eval.train_perplexity_rows=3"],
               ["eval.prompts=[Tell me a story.]"]]
    for change in changes:
        calls.clear()
        (_, hit, _), _ = _base_eval(compose(base + change), calls, loaded)
        assert not hit and len(calls) > 0, change
    calls.clear()
    (_, hit, _), _ = _base_eval(compose(base + ["eval.cache_base=false"]), calls, loaded)
    assert not hit and len(calls) > 0
    calls.clear()
    (_, hit, _), _ = _base_eval(compose(base + ["model.tiny.num_layers=1"]), calls)  # another model
    assert not hit and len(calls) > 0
    calls.clear()
    (_, hit, _), _ = _base_eval(compose(base + ["peft.num_virtual_tokens=9", "training.epochs=3"]), calls, loaded)
    assert hit and calls == []  # what a sweep varies does not touch the base evaluation
    assert len(entries()) == 1 + len(changes) + 1


# --- generation metrics ------------------------------------------------------------------------


def test_generation_metrics_values():
    assert distinct_n2(["a b a b"]) == pytest.approx(2 / 3)
    assert distinct_n2(["a b", "a b c"]) == pytest.approx(2 / 3)  # pooled: (a,b) twice, (b,c) once
    assert repetition_rate("A b a B") == pytest.approx(1 / 3)  # lower-cased words
    assert repetition_rate("one") == 0.0
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # P=1, R=1/2
    values = generation_metrics(["the cat sat", ""], ["the cat sat on the mat", "x y"])
    assert values == pytest.approx({"rougeL": 1 / 3, "distinct2": 1.0, "repetition": 0.0, "length_words": 1.5})
    assert generation_metrics([], []) == {}


def test_run_records_gen_metrics_and_references(tiny_run):
    run_dir, metrics = tiny_run
    on_disk = json.loads((run_dir / RunDir.METRICS).read_text())
    rows = [json.loads(line) for line in (run_dir / RunDir.GENERATIONS).read_text().splitlines()]
    held = [r for r in rows if "reference" in r]
    assert len(held) == 2 and all(r["reference"] and r["prompt"] for r in held)
    assert on_disk[keys.GEN_EXAMPLES] == 2
    for label in ("base", "tuned"):
        expected = generation_metrics([r[label] for r in held], [r["reference"] for r in held])
        for name in keys.GEN_METRICS:
            assert on_disk[keys.gen_key(label, name)] == pytest.approx(expected[name]), (label, name)
    assert on_disk[keys.TRAIN_PERPLEXITY] > 1 and on_disk[keys.TRAIN_BASE_PERPLEXITY] > 1
    assert on_disk[keys.TRAIN_PERPLEXITY_TOKENS] > 0
    assert on_disk[keys.EVAL_BASE_CACHED] in (0, 1)
    assert on_disk[keys.EVAL_RUNTIME_S] == pytest.approx(on_disk[keys.EVAL_BASE_RUNTIME_S]
                                                         + on_disk[keys.EVAL_TUNED_RUNTIME_S])
    history = [json.loads(line) for line in (run_dir / RunDir.HISTORY).read_text().splitlines()]
    # the tuned evaluation reuses the last per-epoch perplexity of the same weights
    assert history[-1][keys.EVAL_PERPLEXITY] == on_disk[keys.EVAL_PERPLEXITY]


def test_perplexity_lm_head_only_on_scored_positions_equals_full_logits(tiny, monkeypatch):
    """The hidden-state route (lm_head on scored positions only) gives the full-logits number."""
    from softprompt.evaluation import perplexity as ppl_module

    rows = _rows(tiny.tokenizer)
    fast = perplexity(tiny.model, rows, tiny.tokenizer.pad_token_id, batch_size=3)
    monkeypatch.setattr(ppl_module, "_hidden_state_base", lambda model: None)
    full = perplexity(tiny.model, rows, tiny.tokenizer.pad_token_id, batch_size=3)
    assert fast.tokens == full.tokens == sum(len(r) - 1 for r in rows)
    assert fast.loss == pytest.approx(full.loss, rel=1e-6)


def test_perplexity_bf16_autocast_within_half_a_percent_of_fp32(tiny):
    rows = _rows(tiny.tokenizer)
    fp32 = perplexity(tiny.model, rows, tiny.tokenizer.pad_token_id, batch_size=3)
    bf16 = perplexity(tiny.model, rows, tiny.tokenizer.pad_token_id, batch_size=3, autocast_dtype=torch.bfloat16)
    assert bf16.tokens == fp32.tokens
    assert bf16.loss != fp32.loss  # autocast did change the arithmetic
    assert bf16.perplexity == pytest.approx(fp32.perplexity, rel=0.005)
