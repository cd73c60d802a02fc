"""The two measures every stage reports, each written once: a refusal rate with its interval, and the KL
divergence between a clean and an edited next-token distribution.

* :func:`rate` — counts of ``refused`` / ``complied`` / ``incoherent`` outcomes (:mod:`refusal_lens.core.judge`),
  the refusal rate with its Wilson 95% interval, and the incoherent share (counted apart, never as compliance).
  One schema everywhere: ``n``, ``refused``, ``complied``, ``incoherent``, ``refusal_rate``, ``ci``,
  ``incoherent_rate``, ``coherent_rate``.
* :func:`kl_divergence` — ``KL(reference || other) = sum p_ref (log p_ref - log p_other)`` over the vocabulary,
  from log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from refusal_lens.core.judge import OUTCOMES
from refusal_lens.core.stats.intervals import wilson_interval

#: the keys of a :func:`rate`
RATE_KEYS = ("n", *OUTCOMES, "refusal_rate", "ci", "incoherent_rate", "coherent_rate")


def rate(outcomes: Sequence[str], level: float = 0.95) -> dict:
    """Counts, refusal rate (Wilson interval at ``level``) and incoherent share of judged outcomes; NaN rates and
    interval when there are none."""
    outcomes = list(outcomes)
    unknown = sorted(set(outcomes) - set(OUTCOMES))
    if unknown:
        raise ValueError(f"unknown outcome(s) {unknown}; allowed: {', '.join(OUTCOMES)}")
    n = len(outcomes)
    counts = {o: outcomes.count(o) for o in OUTCOMES}
    lo, hi = wilson_interval(counts["refused"], n, level) if n else (float("nan"), float("nan"))
    nan = float("nan")
    return {"n": n, **counts, "refusal_rate": counts["refused"] / n if n else nan, "ci": [lo, hi],
            "incoherent_rate": counts["incoherent"] / n if n else nan,
            "coherent_rate": 1 - counts["incoherent"] / n if n else nan}


def rate_of_counts(refused: int, n: int, incoherent: int = 0) -> dict:
    """:func:`rate` from counts (``n - refused - incoherent`` complied)."""
    return rate(["refused"] * refused + ["incoherent"] * incoherent + ["complied"] * (n - refused - incoherent))


def kl_divergence(reference: Tensor, other: Tensor) -> Tensor:
    """``KL(reference || other)`` over the last dimension, from log-probabilities (any leading shape)."""
    return (reference.exp() * (reference - other)).sum(-1)
