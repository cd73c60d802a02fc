"""The numbers of the analysis: emergence by layer, circuit similarity with its tests, verdicts.

**Similarity** of two circuits A and B (mean node effects ``a``, ``b`` over their prompts): on the
union ``U`` of the two circuits' top-``k`` nodes (by |effect|),

    sim(A, B) = sum_U [sign(a_i) == sign(b_i)] min(|a_i|, |b_i|) / sum_U max(|a_i|, |b_i|)

a weighted Jaccard index: 1 when both circuits put the same weight on the same nodes with the same sign,
0 when they share no node (or only nodes pushing opposite ways).

* **Permutation p-value** against random circuits of the same size: B's top-``k`` effects are moved to
  ``k`` random nodes drawn from the pool of nodes with a nonzero effect in any group, and the similarity
  recomputed; ``p = (1 + #{null >= observed}) / (1 + n)``. A small p means the overlap is more than
  chance.
* **Bootstrap interval** over prompts: each group's prompts are resampled with replacement, the mean
  effects, top nodes and similarity recomputed; the 2.5 and 97.5 percentiles.
* **Verdict** per pair: ``monolithic`` if sim >= the monolithic threshold and p < alpha; ``partially
  modular`` if sim >= the partial threshold and p < alpha; else ``modular``; ``insufficient`` when a
  group has fewer prompts than ``min_prompts``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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


def bootstrap_similarity(ea: np.ndarray, eb: np.ndarray, k: int, n: int, rng: np.random.Generator,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the similarity with each group's prompts resampled (``ea``: [prompts, nodes])."""
    vals = np.empty(n)
    for t in range(n):
        ma = ea[rng.integers(0, len(ea), len(ea))].mean(0)
        mb = eb[rng.integers(0, len(eb), len(eb))].mean(0)
        vals[t] = similarity(ma, mb, k)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(np.nanquantile(vals, lo)), float(np.nanquantile(vals, hi))


def verdict(sim: float, p: float, n_a: int, n_b: int, *, alpha: float, monolithic: float, partial: float,
            min_prompts: int) -> str:
    if min(n_a, n_b) < min_prompts or sim != sim:
        return "insufficient"
    if p < alpha and sim >= monolithic:
        return "monolithic"
    if p < alpha and sim >= partial:
        return "partially modular"
    return "modular"


def layer_profile(mean: torch.Tensor | np.ndarray, hooks: Sequence[str], sizes: Sequence[int]) -> list[dict]:
    """Per hook: total |effect|, signed sum, largest |effect| and the error node's share of the total."""
    mean = np.asarray(mean, dtype=np.float64)
    out, start = [], 0
    for hook, size in zip(hooks, sizes):
        part = mean[..., start : start + size]
        total = float(np.abs(part).sum())
        out.append({"hook": hook, "total_abs": total, "signed": float(part.sum()), "top_abs": float(np.abs(part).max()),
                    "error_share": float(np.abs(part[..., -1]).sum() / total) if total > 0 else 0.0})
        start += size
    return out


def emergence(profile: Sequence[dict], share: float) -> dict:
    """The first hook (depth order) whose cumulative share of the total |effect| reaches ``share``."""
    totals = np.asarray([p["total_abs"] for p in profile])
    if totals.sum() <= 0:
        return {"hook": None, "cumulative": []}
    cum = np.cumsum(totals) / totals.sum()
    first = int(np.argmax(cum >= share - 1e-12))
    return {"hook": profile[first]["hook"], "cumulative": cum.tolist()}
