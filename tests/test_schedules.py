"""Learning-rate schedules (softprompt.train.schedules) and the order of batches (softprompt.train.batches)."""

from __future__ import annotations

import pytest

from softprompt.core.config import SCHEDULERS
from softprompt.train.batches import epoch_batches, epoch_order, steps_per_epoch
from softprompt.train.schedules import FACTORS, Schedule


def _factors(name: str, total: int, warmup: int = 0, decay: float = 0.2) -> list[float]:
    schedule = Schedule(name, 0.3, total, warmup, decay)
    return [schedule.factor(step) for step in range(total)]


def test_the_config_accepts_exactly_the_schedules_there_are():
    assert sorted(SCHEDULERS) == sorted(FACTORS) == ["constant", "cosine", "linear", "wsd"]


def test_linear_is_the_seeds():
    # Hugging Face's get_linear_schedule_with_warmup: full rate at step 0, 1/T at the last step
    assert _factors("linear", 4) == [1.0, 0.75, 0.5, 0.25]
    assert _factors("linear", 6, warmup=2) == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    assert Schedule("linear", 0.3, 4).lr(1) == pytest.approx(0.225)


def test_cosine():
    assert _factors("cosine", 4) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    assert _factors("cosine", 5, warmup=1) == pytest.approx([0.0, 1.0, 0.8535534, 0.5, 0.1464466])


def test_constant():
    assert _factors("constant", 5) == [1.0] * 5
    assert _factors("constant", 5, warmup=4) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_wsd_warms_up_holds_then_decays_over_the_last_fraction():
    assert _factors("wsd", 10, warmup=2, decay=0.2) == pytest.approx([0.0, 0.5, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    assert _factors("wsd", 10, decay=0.5) == pytest.approx([1, 1, 1, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert _factors("wsd", 6, decay=0.2) == [1, 1, 1, 1, 1, 0.5]  # a 1-step decay still decays
    # too short for warm-up and decay: the warm-up is kept, the decay takes the rest
    assert _factors("wsd", 4, warmup=3, decay=0.5) == [0.0, 1 / 3, 2 / 3, 0.5]


def test_wsd_and_constant_do_not_depend_on_the_run_length_before_the_decay():
    # what lets a 2-epoch run branch off a 6-epoch trunk (issue 14): equal rates up to the decay
    for name in ("wsd", "constant"):
        short, long = _factors(name, 20, warmup=3), _factors(name, 60, warmup=3)
        assert short[:16] == long[:16], name
    # linear does depend on it: its rate at step 1 already differs
    assert _factors("linear", 20)[1] != _factors("linear", 60)[1]


def _lengths(n: int) -> list[int]:
    return [(7 * i) % 23 + 1 for i in range(n)]  # 1..23, scrambled


def test_epoch_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths(58)
    for group in (True, False):
        a = epoch_order(lengths, 8, seed=42, epoch=1, group_by_length=group)
        assert a == epoch_order(lengths, 8, seed=42, epoch=1, group_by_length=group)
        assert sorted(a) == list(range(58))
        assert a != epoch_order(lengths, 8, seed=42, epoch=2, group_by_length=group)
        assert a != epoch_order(lengths, 8, seed=43, epoch=1, group_by_length=group)


def test_length_grouped_batches_hold_similar_lengths():
    lengths = _lengths(400)
    order = epoch_order(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert lengths[order[0]] == max(lengths)  # the longest row first: memory trouble shows at step 1
    batches = [order[i:i + 8] for i in range(0, 400, 8)]
    spread = sum(max(lengths[k] for k in b) - min(lengths[k] for k in b) for b in batches) / len(batches)
    shuffled = epoch_order(lengths, 8, seed=0, epoch=0, group_by_length=False)
    random_spread = sum(max(lengths[k] for k in shuffled[i:i + 8]) - min(lengths[k] for k in shuffled[i:i + 8])
                        for i in range(0, 400, 8)) / len(batches)
    # 400 rows: mega-batches of 10 batches, sorted inside; padding waste far below a random order's
    assert spread < 4 < 15 < random_spread


def test_ranks_get_equal_shares_that_cover_the_epoch():
    lengths = _lengths(58)
    whole = epoch_order(lengths, 4, seed=1, epoch=0, group_by_length=True)
    ranks = [epoch_batches(lengths, 4, seed=1, epoch=0, group_by_length=True, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == steps_per_epoch(58, 4, 2) == 8
    assert [k for batch in ranks[0] for k in batch] == whole[0::2]
    assert {k for rank in ranks for batch in rank for k in batch} == set(range(58))
    # 59 rows over 2 ranks: the order is padded with its first row so that both take 30
    odd = [epoch_batches(_lengths(59), 8, 1, 0, False, rank=r, world_size=2) for r in (0, 1)]
    assert [sum(map(len, o)) for o in odd] == [30, 30]
    assert steps_per_epoch(58, 8) == len(epoch_batches(lengths, 8, 1, 0, True)) == 8
