"""The statistics of a comparison: mean and spread over seeds, paired differences over test examples.

Two methods are paired on the same test examples and seeds: method A's seed-s run against
method B's seed-s run (the base model, which has no seed, against every seed). The
difference is the mean over examples of the per-example difference averaged over seeds;
its 95% interval is a percentile bootstrap over test examples (seeds stay together, so
the interval reflects which examples happen to be in the test set). The test is
- McNemar's exact test when every score is 0 or 1: a two-sided binomial test on the
  discordant pairs (A right and B wrong, against the reverse), counted over every
  (seed, example) pair, without continuity correction since it is exact;
- otherwise a two-sided paired sign-flip permutation test on the per-example differences
  (exact over all 2^n sign patterns up to n = 16, else 20,000 random ones).
All functions are pure and seeded, so a report is the same each time it is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "ALPHA",
    "PairedDifference",
    "mean_sd",
    "bootstrap_interval",
    "mcnemar_exact",
    "sign_flip_test",
    "paired_difference",
]

ALPHA = 0.05  # the significance level the report's words use
_EXACT_SIGN_FLIPS = 16
_RESAMPLES = 20_000


@dataclasses.dataclass
class PairedDifference:
    """A minus B over the paired test examples: mean, 95% bootstrap interval, the test and its p-value."""

    mean: float
    low: float
    high: float
    test: str
    p_value: float
    examples: int
    seeds: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for a single value."""
    if not values:
        raise ValueError("mean_sd of no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = _RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (A right only, B right only)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip_test(differences: Sequence[float], resamples: int = _RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired permutation p-value: how often a random sign pattern gives a mean at least as far from 0."""
    data = np.asarray(differences, dtype=np.float64)
    observed = abs(data.mean())
    tolerance = 1e-12 * max(1.0, observed)
    if len(data) <= _EXACT_SIGN_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(data))))
        return float(np.mean(np.abs(signs @ data / len(data)) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(resamples, len(data)))
    hits = int(np.sum(np.abs(signs @ data / len(data)) >= observed - tolerance))
    return (hits + 1) / (resamples + 1)


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> PairedDifference:
    """A minus B, where `a[s][i]` and `b[s][i]` are seed s's scores on test example i (one row each side: reused)."""
    seeds = max(len(a), len(b))
    a_rows = np.asarray([a[s % len(a)] for s in range(seeds)], dtype=np.float64)
    b_rows = np.asarray([b[s % len(b)] for s in range(seeds)], dtype=np.float64)
    if a_rows.shape != b_rows.shape:
        raise ValueError(f"paired scores differ in shape: {a_rows.shape} against {b_rows.shape}")
    per_example = (a_rows - b_rows).mean(axis=0)
    low, high = bootstrap_interval(per_example)
    if np.isin(a_rows, (0.0, 1.0)).all() and np.isin(b_rows, (0.0, 1.0)).all():
        a_only = int(np.sum((a_rows == 1) & (b_rows == 0)))
        b_only = int(np.sum((a_rows == 0) & (b_rows == 1)))
        test, p_value = "McNemar (exact)", mcnemar_exact(a_only, b_only)
    else:
        test, p_value = "sign-flip permutation", sign_flip_test(per_example)
    return PairedDifference(float(per_example.mean()), low, high, test, p_value, per_example.size, seeds)
