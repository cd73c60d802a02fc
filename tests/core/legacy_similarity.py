"""The similarity test refusal_lens used before issue 10, kept only so that tests/core/test_stats.py can show, on
the same data, how miscalibrated it was (it called most pairs of independent random circuits significantly
similar). Nothing in refusal_lens uses it."""

from __future__ import annotations

import numpy as np


def top_nodes(mean: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest |effects| (nonzero only) of a flat effect vector (as a set: unordered)."""
    mag = np.abs(mean)
    if k < len(mag):
        idx = np.argpartition(-mag, k - 1)[:k]
    else:
        idx = np.arange(len(mag))
    return idx[mag[idx] > 0]


def similarity(a: np.ndarray, b: np.ndarray, k: int) -> float:
    union = np.union1d(top_nodes(a, k), top_nodes(b, k))
    if len(union) == 0:
        return float("nan")
    x, y = a[union], b[union]
    same = np.sign(x) == np.sign(y)
    num = np.where(same, np.minimum(np.abs(x), np.abs(y)), 0.0).sum()
    den = np.maximum(np.abs(x), np.abs(y)).sum()
    return float(num / den) if den > 0 else float("nan")


def permutation_pvalue(a: np.ndarray, b: np.ndarray, k: int, pool: np.ndarray, n: int,
                       rng: np.random.Generator, chunk: int = 100) -> tuple[float, float]:
    """(p-value, mean null similarity) of ``similarity(a, b)`` against B's top effects on random nodes.

    Vectorised: with B's top values ``v`` on random nodes ``P`` and A's top nodes ``T``, the union is
    ``T | P``; nodes of ``T`` outside ``P`` add ``|a|`` to the denominator only.
    """
    observed = similarity(a, b, k)
    top_b = top_nodes(b, k)
    pool = np.asarray(pool)
    if len(top_b) == 0 or len(pool) < len(top_b):
        return float("nan"), float("nan")
    v = b[top_b]
    ta = top_nodes(a, k)
    in_ta = np.zeros(len(a), dtype=bool)
    in_ta[ta] = True
    abs_a = np.abs(a)
    total_ta = abs_a[ta].sum()
    null = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        picks = pool[np.argpartition(rng.random((m, len(pool))), len(v) - 1, axis=1)[:, : len(v)]]  # [m, k]
        av = a[picks]
        same = np.sign(av) == np.sign(v)[None]
        num = np.where(same, np.minimum(np.abs(av), np.abs(v)[None]), 0.0).sum(1)
        den = np.maximum(np.abs(av), np.abs(v)[None]).sum(1) + total_ta - (abs_a[picks] * in_ta[picks]).sum(1)
        null.append(np.where(den > 0, num / np.where(den > 0, den, 1), np.nan))
    null = np.concatenate(null)
    return float((1 + np.sum(null >= observed)) / (1 + n)), float(np.nanmean(null))
