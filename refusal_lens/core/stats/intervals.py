"""Intervals: the Wilson interval of a rate, Newcombe's interval of a difference of two independent rates, and the
percentile bootstrap interval of a mean."""

from __future__ import annotations

import math
import statistics

import numpy as np
from numpy.typing import ArrayLike

from refusal_lens.core.stats.checks import RandomLike, StatsOptionError, _check_fraction, _check_int, _generator, _values


def normal_quantile(q: float) -> float:
    """The standard normal quantile (inverse CDF) at ``q`` in (0, 1)."""
    return statistics.NormalDist().inv_cdf(q)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate ``k / n`` (good coverage down to small ``n`` and ``k`` = 0 or n).

    ``(center -+ half) / (1 + z^2 / n)`` with ``center = p + z^2 / 2n`` and
    ``half = z sqrt(p (1 - p) / n + z^2 / 4n^2)``. ``n = 0`` gives ``(nan, nan)``.
    """
    k = _check_int("k", k, 0)
    n = _check_int("n", n, 0)
    if k > n:
        raise StatsOptionError(f"k must be at most n, got k={k}, n={n}")
    level = _check_fraction("level", level, 0.0, 1.0)
    if n == 0:
        return float("nan"), float("nan")
    z = normal_quantile((1 + level) / 2)
    p = k / n
    denom = 1 + z * z / n
    center = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (center - half) / denom), min(1.0, (center + half) / denom)


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998, method 10) of ``k1/n1 - k2/n2`` for two independent samples, from
    the two Wilson intervals ``(l1, u1)``, ``(l2, u2)``: ``d - sqrt((p1 - l1)^2 + (u2 - p2)^2)`` to ``d +
    sqrt((u1 - p1)^2 + (p2 - l2)^2)``. Either ``n = 0`` gives ``(nan, nan)``."""
    if n1 == 0 or n2 == 0:
        return float("nan"), float("nan")
    (l1, u1), (l2, u2) = wilson_interval(k1, n1, level), wilson_interval(k2, n2, level)
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def bootstrap_mean_ci(values: ArrayLike, n_boot: int = 1000, level: float = 0.95,
                      rng: RandomLike = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per prompt, resampled)."""
    x = _values(values, "values")
    n_boot = _check_int("n_boot", n_boot, 1)
    level = _check_fraction("level", level, 0.0, 1.0)
    if len(x) == 0:
        return float("nan"), float("nan")
    gen = _generator(rng)
    counts = gen.multinomial(len(x), np.full(len(x), 1.0 / len(x)), size=n_boot)
    means = counts @ x / len(x)
    return (float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2)))

