"""A difference of two rates at a matched covariate: is one group's outcome different beyond what the covariate predicts?

The question it serves (docs/direction.md, "Why no single direction separates them"): under an intervention, the
refused toxic prompts stay refused more often than the refused safe ones. Is that *selectivity*, or only *dose*:
the safe prompts were refused less firmly to begin with (a lower clean refusal score), and any push against refusal
flips the weakly refused ones first, whatever their label?

:func:`stratified_difference_test` compares the rate of ``y`` (1 = still refused) in group ``a`` with group ``b``
within strata of the covariate ``x`` (the clean refusal score): strata are the pooled quantiles of ``x``
(``n_strata``), and the estimate is the Cochran-Mantel-Haenszel weighted risk difference

    d = sum_s w_s (p_a,s - p_b,s) / sum_s w_s,   w_s = n_a,s n_b,s / (n_a,s + n_b,s)

over the strata that hold both groups (a stratum with one group only carries no comparison and gets no weight; the
share of prompts left out is reported). Its interval is a percentile bootstrap that resamples the prompts of each
group (each keeps its ``x``; the strata edges are fixed). The raw difference (no strata) and its Newcombe interval
stand beside it, so a reader sees how much of the raw gap the covariate accounts for.

Verdict (the words match the size, and never come from "not significant"):

* ``dose alone``: the interval lies within ``[-margin, margin]``: at a matched clean score the groups differ by less
  than ``margin``;
* ``beyond dose``: the interval is above 0 and the estimate >= ``margin`` (``against dose``: below 0 and <= -margin);
* ``indeterminate``: anything else (the interval too wide to tell, or fewer than half the bootstrap draws share a
  stratum between the groups: ``boot_used``);
* ``insufficient``: a group has fewer than ``min_n`` prompts in the compared strata.

Strata by quantile leave some of the covariate's effect inside each stratum (Cochran 1968: five strata remove about
90% of a linear confounder's bias), so ``dose alone`` is conservative only up to that residue; the suite measures the
interval's coverage on null data where the outcome depends on ``x`` alone (tests/core/test_stats_stratified.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

from refusal_lens.core.stats.checks import (RandomLike, StatsOptionError, _check_fraction, _check_int, _generator,
                                            _json_float)
from refusal_lens.core.stats.intervals import newcombe_difference

VERDICTS = ("dose alone", "beyond dose", "against dose", "indeterminate", "insufficient")


def strata_edges(x: ArrayLike, n_strata: int) -> np.ndarray:
    """The interior edges of ``n_strata`` pooled-quantile strata of ``x`` (ties merge strata: fewer edges)."""
    x = np.asarray(x, dtype=float)
    n_strata = _check_int("n_strata", n_strata, 1)
    if len(x) == 0 or n_strata == 1:
        return np.empty(0)
    return np.unique(np.quantile(x, np.arange(1, n_strata) / n_strata))


def stratum_of(x: ArrayLike, edges: np.ndarray) -> np.ndarray:
    """The stratum index of each ``x`` (0 .. len(edges)); a value equal to an edge goes to the stratum above it."""
    return np.searchsorted(edges, np.asarray(x, dtype=float), side="right")


def _weighted(n_a: np.ndarray, k_a: np.ndarray, n_b: np.ndarray, k_b: np.ndarray) -> np.ndarray:
    """The weighted risk difference over the last axis (strata); NaN where no stratum holds both groups."""
    both = (n_a > 0) & (n_b > 0)
    w = np.where(both, n_a * n_b / np.maximum(n_a + n_b, 1), 0.0)
    diff = np.where(both, k_a / np.maximum(n_a, 1) - k_b / np.maximum(n_b, 1), 0.0)
    total = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w * diff).sum(-1) / np.where(total > 0, total, 1), np.nan)


def stratified_difference(y_a: ArrayLike, x_a: ArrayLike, y_b: ArrayLike, x_b: ArrayLike, edges: np.ndarray) -> float:
    """The weighted risk difference ``rate(a) - rate(b)`` within the strata of ``edges`` (NaN without a shared one)."""
    y_a, y_b = np.asarray(y_a, dtype=float), np.asarray(y_b, dtype=float)
    k = len(edges) + 1
    s_a, s_b = stratum_of(x_a, edges), stratum_of(x_b, edges)
    n_a, n_b = np.bincount(s_a, minlength=k), np.bincount(s_b, minlength=k)
    k_a, k_b = np.bincount(s_a, y_a, minlength=k), np.bincount(s_b, y_b, minlength=k)
    return float(_weighted(n_a, k_a, n_b, k_b))


@dataclass(frozen=True)
class StratifiedDifference:
    estimate: float | None  # rate(a) - rate(b) at a matched covariate (weighted over shared strata)
    ci: tuple[float | None, float | None]
    raw: float | None  # rate(a) - rate(b), no strata
    raw_ci: tuple[float | None, float | None]  # Newcombe
    n_a: int
    n_b: int
    compared_a: int  # prompts of a in strata that hold both groups
    compared_b: int
    strata: list[dict]  # per stratum: its x range, n and rate of each group
    strata_shared: int  # strata holding both groups (the ones compared; ties can merge or empty strata)
    boot_used: int  # bootstrap draws with a shared stratum (the interval's draws; the others have no estimate)
    margin: float
    level: float
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def _verdict(lo: float, hi: float, est: float, margin: float) -> str:
    if -margin <= lo and hi <= margin:
        return "dose alone"
    if lo > 0 and est >= margin:
        return "beyond dose"
    if hi < 0 and est <= -margin:
        return "against dose"
    return "indeterminate"


def stratified_difference_test(y_a: ArrayLike, x_a: ArrayLike, y_b: ArrayLike, x_b: ArrayLike, *, n_strata: int = 5,
                               n_boot: int = 2000, level: float = 0.95, margin: float = 0.1, min_n: int = 10,
                               rng: RandomLike = 0) -> StratifiedDifference:
    """The estimate, its bootstrap interval and the verdict (module docstring). ``y``: 0/1 outcomes; ``x``: the
    covariate, one per prompt."""
    y_a, y_b = np.asarray(y_a, dtype=float), np.asarray(y_b, dtype=float)
    x_a, x_b = np.asarray(x_a, dtype=float), np.asarray(x_b, dtype=float)
    if len(y_a) != len(x_a) or len(y_b) != len(x_b):
        raise StatsOptionError(f"y and x differ in length: a {len(y_a)} vs {len(x_a)}, b {len(y_b)} vs {len(x_b)}")
    if not set(np.unique(np.concatenate([y_a, y_b]))) <= {0.0, 1.0}:
        raise StatsOptionError("y must be 0/1 outcomes (1 = still refused)")
    if not (np.isfinite(x_a).all() and np.isfinite(x_b).all()):
        raise StatsOptionError("x must be finite for every prompt (a NaN or inf covariate has no stratum)")
    level = _check_fraction("level", level, 0.0, 1.0)
    margin = _check_fraction("margin", margin, 0.0, 1.0, high_inclusive=True)
    n_boot = _check_int("n_boot", n_boot, 1)
    min_n = _check_int("min_n", min_n, 1)
    edges = strata_edges(np.concatenate([x_a, x_b]), n_strata)
    k = len(edges) + 1
    s_a, s_b = stratum_of(x_a, edges), stratum_of(x_b, edges)
    n_a, n_b = np.bincount(s_a, minlength=k), np.bincount(s_b, minlength=k)
    k_a, k_b = np.bincount(s_a, y_a, minlength=k), np.bincount(s_b, y_b, minlength=k)
    shared = (n_a > 0) & (n_b > 0)
    bounds = np.concatenate([[-np.inf], edges, [np.inf]])
    strata = [{"x_from": _json_float(bounds[s]), "x_to": _json_float(bounds[s + 1]), "n_a": int(n_a[s]),
               "n_b": int(n_b[s]), "rate_a": float(k_a[s] / n_a[s]) if n_a[s] else None,
               "rate_b": float(k_b[s] / n_b[s]) if n_b[s] else None} for s in range(k)]
    compared_a, compared_b = int(n_a[shared].sum()), int(n_b[shared].sum())
    raw = float(y_a.mean() - y_b.mean()) if len(y_a) and len(y_b) else float("nan")
    raw_ci = newcombe_difference(int(y_a.sum()), len(y_a), int(y_b.sum()), len(y_b), level)
    common = dict(raw=_json_float(raw), raw_ci=(_json_float(raw_ci[0]), _json_float(raw_ci[1])), n_a=len(y_a),
                  n_b=len(y_b), compared_a=compared_a, compared_b=compared_b, strata=strata,
                  strata_shared=int(shared.sum()), margin=margin, level=level)
    if min(compared_a, compared_b) < min_n:
        return StratifiedDifference(None, (None, None), boot_used=0, verdict="insufficient", **common)
    est = float(_weighted(n_a, k_a, n_b, k_b))
    gen = _generator(rng)

    def draws(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        counts = gen.multinomial(len(y), np.full(len(y), 1.0 / len(y)), size=n_boot)  # [n_boot, n]
        onehot = np.eye(k)[s]  # [n, k]
        return counts @ onehot, counts @ (onehot * y[:, None])

    (bn_a, bk_a), (bn_b, bk_b) = draws(y_a, s_a), draws(y_b, s_b)
    boot = _weighted(bn_a, bk_a, bn_b, bk_b)
    boot = boot[~np.isnan(boot)]
    if len(boot) < n_boot / 2:  # most draws share no stratum: no interval to speak of
        return StratifiedDifference(est, (None, None), boot_used=len(boot), verdict="indeterminate", **common)
    lo, hi = (float(np.quantile(boot, (1 - level) / 2)), float(np.quantile(boot, (1 + level) / 2)))
    return StratifiedDifference(est, (lo, hi), boot_used=len(boot), verdict=_verdict(lo, hi, est, margin), **common)


__all__ = ["VERDICTS", "StratifiedDifference", "stratified_difference", "stratified_difference_test",
           "strata_edges", "stratum_of"]
