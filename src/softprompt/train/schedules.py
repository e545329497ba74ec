"""Learning-rate schedules: the multiplier of the peak rate for the optimizer step about to be taken.

A schedule is a pure function of (step, total steps, settings): nothing else, no state to
checkpoint, so a resumed run picks up its rate from the step alone. `step` counts from 0, and the
warm-up follows Hugging Face's convention (`step / warmup_steps`, so the seed's `linear` with no
warm-up starts at the full rate and reaches 0 after the last step).

- `linear` (the seed notebook's): warm-up, then a straight line to 0 at the end of the run.
- `cosine`: warm-up, then half a cosine to 0.
- `constant`: warm-up, then the peak rate to the end (Lester et al. 2021 prompt-tuned with 0.3).
- `wsd`, warmup-stable-decay (Hägele et al. 2024): warm-up, constant, then a straight line to 0 over
  the last `decay_fraction` of the steps. Until its decay starts, a run's rate does not depend on
  its length: a short run is the start of a longer one plus its own decay (a pack's epoch trunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _warmup(step: int, warmup_steps: int) -> float | None:
    return step / warmup_steps if step < warmup_steps else None


def linear(step: int, total: int, warmup_steps: int, decay_fraction: float) -> float:
    return max(0.0, (total - step) / max(1, total - warmup_steps))


def cosine(step: int, total: int, warmup_steps: int, decay_fraction: float) -> float:
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def constant(step: int, total: int, warmup_steps: int, decay_fraction: float) -> float:
    return 1.0


def wsd(step: int, total: int, warmup_steps: int, decay_fraction: float) -> float:
    # the decay never eats into the warm-up: a run too short for both keeps its warm-up
    decay_start = max(warmup_steps, total - round(decay_fraction * total))
    if step < decay_start:
        return 1.0
    # a straight line from the last stable step (1) to the end of the run (0): every decay step is
    # below the peak (with `linear`'s convention a 1-step decay would run at the full rate)
    return max(0.0, (total - step) / (total - decay_start + 1))


# the names core.config.SCHEDULERS accepts (tests/test_schedules.py checks that the two agree)
FACTORS = {"linear": linear, "cosine": cosine, "constant": constant, "wsd": wsd}


@dataclass(frozen=True)
class Schedule:
    name: str
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.2

    def factor(self, step: int) -> float:
        warm = _warmup(step, self.warmup_steps)
        if warm is not None:
            return warm
        return FACTORS[self.name](step, self.total_steps, self.warmup_steps, self.decay_fraction)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        return self.peak_lr * self.factor(step)
