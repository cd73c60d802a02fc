"""An observed value against matched random controls: the empirical p-value, the controls' summary, and the
Kolmogorov-Smirnov test that the suite uses to check that p-values of null data are uniform."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from refusal_lens.core.stats.checks import StatsOptionError, _alternative, _check_fraction, _json_float, _values


@dataclass(frozen=True)
class RandomControlSummary:
    """An observed value against the distribution of matched random controls."""

    observed: float
    #: Number of random controls.
    n: int
    mean: float
    std: float
    #: Quantiles of the controls at ``(1 - level) / 2``, 0.5 and ``(1 + level) / 2``.
    low: float
    median: float
    high: float
    level: float
    #: :func:`empirical_pvalue` of the observed value against the controls.
    p_value: float
    alternative: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (NaN as None)."""
        return {k: _json_float(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def empirical_pvalue(observed: float, null_values: ArrayLike, alternative: str = "greater") -> float:
    """``(1 + #{null at least as extreme as observed}) / (1 + n)``: valid at any n (never 0).

    ``alternative``: ``greater`` (extreme = ``>= observed``), ``less`` (``<= observed``) or ``two-sided``
    (twice the smaller one-sided p-value, capped at 1).
    """
    alternative = _alternative(alternative)
    null = _values(null_values, "null_values")
    if observed != observed:
        raise StatsOptionError("observed must not be NaN")
    n = len(null)
    greater = (1 + np.sum(null >= observed)) / (1 + n)
    less = (1 + np.sum(null <= observed)) / (1 + n)
    if alternative == "greater":
        return float(greater)
    if alternative == "less":
        return float(less)
    return float(min(1.0, 2 * min(greater, less)))


def compare_to_random(observed: float, random_values: ArrayLike, *, alternative: str,
                      level: float = 0.95) -> RandomControlSummary:
    """A circuit's value (faithfulness, refusal rate under ablation, ...) against matched random node sets.

    Returns the controls' mean, standard deviation and quantiles, and the empirical p-value of the
    observed value (``alternative`` as in :func:`empirical_pvalue`: e.g. ``less`` when the circuit
    should lower the refusal rate more than random sets do).
    """
    null = _values(random_values, "random_values")
    level = _check_fraction("level", level, 0.0, 1.0)
    if len(null) == 0:
        raise StatsOptionError("random_values must hold at least one control value")
    p = empirical_pvalue(observed, null, alternative)
    low, median, high = np.quantile(null, [(1 - level) / 2, 0.5, (1 + level) / 2])
    return RandomControlSummary(observed=float(observed), n=len(null), mean=float(null.mean()),
                                std=float(null.std(ddof=1)) if len(null) > 1 else float("nan"),
                                low=float(low), median=float(median), high=float(high), level=level,
                                p_value=p, alternative=alternative)


def kolmogorov_sf(lam: float) -> float:
    """``P(K > lam)`` for the Kolmogorov distribution (the limit of ``sqrt(n) D_n``)."""
    if lam <= 0.2:
        return 1.0
    j = np.arange(1, 101)
    return float(min(1.0, max(0.0, 2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j * j * lam * lam)))))


def ks_uniform(values: ArrayLike, grid: ArrayLike | None = None) -> tuple[float, float]:
    """Kolmogorov-Smirnov test of ``values`` against the uniform distribution on [0, 1]: ``(D, p)``.

    ``grid``: for a discrete null whose CDF equals ``g`` at each grid point ``g`` (e.g. empirical p-values
    with ``n`` controls live on ``k / (n + 1)``), ``D`` is taken at the grid points only. The p-value uses
    Stephens' finite-sample form of the Kolmogorov limit (conservative for a discrete null).
    """
    x = np.sort(_values(values, "values"))
    n = len(x)
    if n == 0:
        raise StatsOptionError("values must hold at least one value")
    if grid is None:
        i = np.arange(1, n + 1)
        d = float(max(np.max(i / n - x), np.max(x - (i - 1) / n)))
    else:
        g = _values(grid, "grid")
        d = float(np.max(np.abs(np.searchsorted(x, g, side="right") / n - g)))
    root = math.sqrt(n)
    return d, kolmogorov_sf((root + 0.12 + 0.11 / root) * d)

