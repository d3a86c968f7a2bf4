"""Paired comparisons with bootstrap confidence intervals: how much a mode's takes differ from bf16's.

Each pair is one text spoken with one seed by both models, so the text's difficulty and the seed's luck cancel in
the difference; resampling whole pairs (with replacement) gives the spread of the statistic over pairs like these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Estimate:
    value: float  # the statistic on all pairs
    low: float  # the bootstrap interval's bounds
    high: float

    def text(self, digits: int) -> str:
        return f"{self.value:+.{digits}f} ({self.low:+.{digits}f} to {self.high:+.{digits}f})"


def bootstrap(statistic: Callable[[np.ndarray], float], pairs: int, draws: int = 2000, level: float = 0.95,
              seed: int = 0) -> Estimate:
    """statistic(indices of pairs) on all pairs, and the percentile interval over `draws` resamples of the pairs."""
    if pairs < 1:
        raise ValueError("no pairs to compare")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, pairs, pairs)) for _ in range(draws)])
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(statistic(np.arange(pairs)), float(low), float(high))


def wer_change(errors: np.ndarray, reference_errors: np.ndarray, words: np.ndarray) -> Estimate:
    """Word error rate of the mode minus bf16's, in percentage points, over the words of all pairs (each pair's
    text counted once per side)."""
    errors, reference_errors, words = (np.asarray(a, dtype=np.float64) for a in (errors, reference_errors, words))
    return bootstrap(lambda i: 100.0 * (errors[i].sum() - reference_errors[i].sum()) / words[i].sum(), len(words))


def mean_change(values: np.ndarray, reference: np.ndarray) -> Estimate:
    """Mean over pairs of the mode's value minus bf16's."""
    delta = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return bootstrap(lambda i: float(delta[i].mean()), len(delta))
