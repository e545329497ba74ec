"""Metrics of generated text against held-out references, computed offline.

`evaluate.load("rouge")` needs the Hub; `rouge_score` (Google's reference implementation, which
`evaluate` wraps) runs offline. All metrics work on whitespace words, lower-cased, so they do not
depend on the model's tokenizer and base and tuned (or two models) are compared on one scale:

- rougeL: mean ROUGE-L F1 (longest common subsequence, Porter-stemmed) of each generation against
  the rest of its held-out example;
- distinct2: distinct word bigrams / all word bigrams, pooled over the generations (diversity
  across outputs; 1.0 = no bigram used twice anywhere);
- repetition: mean over generations of the share of word bigrams that repeat an earlier bigram of
  the same generation (rep-2 of Welleck et al. 2019; 0.0 = no loops);
- length_words: mean number of words per generation.
"""

from __future__ import annotations

from functools import lru_cache

from softprompt.core.keys import GEN_METRICS as METRICS  # noqa: F401  (the names below, in order)


def words(text: str) -> list[str]:
    return text.lower().split()


def bigrams(tokens: list[str]) -> list[tuple[str, str]]:
    return list(zip(tokens, tokens[1:]))


def distinct_n2(texts: list[str]) -> float:
    grams = [g for t in texts for g in bigrams(words(t))]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str) -> float:
    grams = bigrams(words(text))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def generation_metrics(generations: list[str], references: list[str]) -> dict[str, float]:
    """The four metrics above for paired generations and references (empty input: {})."""
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references")
    if not generations:
        return {}
    n = len(generations)
    return {
        "rougeL": sum(rouge_l(g, r) for g, r in zip(generations, references)) / n,
        "distinct2": distinct_n2(generations),
        "repetition": sum(repetition_rate(g) for g in generations) / n,
        "length_words": sum(len(words(g)) for g in generations) / n,
    }
