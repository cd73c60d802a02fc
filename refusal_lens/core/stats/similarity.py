"""Statistics that hold: the circuit similarity test, false-discovery control, intervals and controls.

Numpy only, vectorised, deterministic for a given ``rng`` (an int seed or a ``numpy.random.Generator``;
no global random state). docs/statistics.md has the design, the verdict rules and the calibration that
tests/core/test_stats.py measures.

**Similarity of two groups of prompts** (:func:`similarity_test`). A group is a ``[prompts, nodes]``
array of per-prompt node effects ``a_i = mu_A + noise_i``; its circuit is the mean ``a_bar``. All
numbers come from the Gram matrix ``G`` of the pooled prompts (inner products over all nodes):

* ``U_A = mean_{i != j} a_i . a_j`` estimates ``|mu_A|^2`` without bias: noise independent across
  prompts drops out of pairs of distinct prompts. ``C = a_bar . b_bar`` estimates ``mu_A . mu_B``.
* **Noise ceiling** of a group: the cosine between the means of two random halves of its prompts,
  averaged over *all* splits in closed form. With ``d_A = mean_i |a_i|^2`` and halves of ``h``
  prompts, ``E[half_1 . half_2] = U_A`` and ``E|half|^2 = d_A / h + (h - 1) / h U_A``, so
  ``ceiling_A = U_A / E|half|^2`` (geometric mean over the two half sizes when ``n_a`` is odd).
* **Similarity**: the cosine between a half of A and a half of B averaged the same way,
  ``C / sqrt(E|half_A|^2 E|half_B|^2)``: numerator and ceilings at the same noise level (half groups),
  as Spearman's correction for attenuation requires.
* **Normalised similarity** ``similarity / sqrt(ceiling_A ceiling_B) = C / sqrt(U_A U_B)``: the
  estimated cosine between the two true mean effects, ~1 for one shared mechanism and ~0 for independent
  ones at any number of prompts; undefined when a ceiling is not positive (a group whose mean does not
  replicate across its own halves).

**Permutation test** of exchangeability (one mechanism): prompts are reassigned at random between the
groups (sizes kept) and the cosine of the two full-group means recomputed; distinct groups are *less*
similar than mixtures of them, ``p = (1 + #{null <= observed}) / (1 + n_permutations)``. Every
reassignment is a 0/1 weight vector over prompts, so one ``[n_permutations, prompts]`` matrix product
with ``G`` gives all of them: the node count enters only once, in ``G``.

**Interval** of the normalised similarity. ``C``, ``U_A`` and ``U_B`` are U-statistics; their variances
and covariances are estimated without bias (Hoeffding's decomposition, means over distinct prompts), and
the interval is the percentile interval of ``C / sqrt(U_A U_B)`` over draws of the three from a
multivariate t (``min(n_a, n_b) - 1`` degrees of freedom) around the estimates. Resampling prompts
(bootstrap) is not used: it overstates the variance of the pair terms ``noise_i . noise_j``, which
dominate with many nodes (measured: 1.7x the true standard deviation at 20 prompts x 5,000 nodes).
The level is ``1 - 2 alpha`` (90% for alpha = 0.05): its bounds are the one-sided ``1 - alpha`` bounds of
an equivalence test (TOST).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from refusal_lens.core.stats.checks import (
    RandomLike,
    StatsOptionError,
    _check_fraction,
    _check_int,
    _effects,
    _generator,
    _json_float,
)
from refusal_lens.core.stats.fdr import bh_qvalues

Verdict = Literal["shared", "partly shared", "distinct", "indeterminate", "insufficient"]
#: The verdicts of :func:`similarity_test`, graded against the margin ``m`` (``shared_margin``): *shared* (the
#: similarity is at least m), *partly shared* (positive, not shown to reach m), *distinct* (below m, and the
#: groups not exchangeable), *indeterminate*, *insufficient*.
VERDICTS: tuple[Verdict, ...] = ("shared", "partly shared", "distinct", "indeterminate", "insufficient")

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class SimilarityResult:
    """The outcome of :func:`similarity_test` for one pair of groups (A, B)."""

    #: Cosine between the mean effects of a half of A and a half of B, averaged over all splits.
    similarity: float
    #: Cosine between the full-group mean effects (descriptive; the permutation test's statistic).
    similarity_full: float
    #: Noise ceiling of A: cosine between the means of two random halves of A, averaged over all splits.
    ceiling_a: float
    #: Noise ceiling of B.
    ceiling_b: float
    #: ``similarity / sqrt(ceiling_a * ceiling_b)``: the estimated cosine of the true mean effects (NaN
    #: when a ceiling is not positive).
    normalised: float
    #: Interval (low, high) of ``normalised`` at level ``ci_level`` (see the module docstring).
    normalised_ci: tuple[float, float]
    #: Level of ``normalised_ci``: ``1 - 2 alpha``, its bounds are one-sided ``1 - alpha`` bounds.
    ci_level: float
    #: One-sided permutation p-value of exchangeability (small: A and B less similar than mixtures).
    p_value: float
    #: Benjamini-Hochberg q-value across a table (NaN until :func:`apply_fdr` sets it).
    q_value: float
    #: One-sided p-value of the equivalence test "similarity >= shared_margin" (small: shown to reach the margin),
    #: and of "similarity < shared_margin" (small: shown to stay below it); from the interval's draws, so that
    #: ``p_shared < alpha`` exactly when the interval's lower end is at least the margin.
    p_shared: float
    p_below: float
    #: Their BH q-values across a table (NaN until :func:`apply_fdr` sets them).
    q_shared: float
    q_below: float
    #: One of :data:`VERDICTS`.
    verdict: Verdict
    #: Why this verdict, in words (with the numbers that decided it).
    reason: str
    #: Prompts in A and in B.
    n_a: int
    n_b: int
    #: Nodes (columns) of the effects.
    n_nodes: int
    #: Decision settings, kept so that :func:`apply_fdr` can re-derive the verdict.
    alpha: float
    shared_margin: float
    min_prompts: int
    n_permutations: int
    n_draws: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (NaN and unbounded interval ends as None, the interval as a list)."""
        out: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, tuple):
                value = [_json_float(v) for v in value]
            elif isinstance(value, float):
                value = _json_float(value)
            out[key] = value
        return out


def _half_norm2(diag_mean: float, u: float, n: int) -> float:
    """Expected squared norm of the mean of a random half (geometric mean of the two halves' sizes)."""
    h1, h2 = n // 2, n - n // 2
    return math.sqrt((diag_mean / h1 + (h1 - 1) / h1 * u) * (diag_mean / h2 + (h2 - 1) / h2 * u))


def _permutation_null(gram: np.ndarray, n_a: int, n_perm: int, gen: np.random.Generator,
                      chunk: int = 2000) -> np.ndarray:
    """Cosine of the two group means for ``n_perm`` random reassignments of the prompts (sizes kept)."""
    n = len(gram)
    out = np.empty(n_perm)
    for start in range(0, n_perm, chunk):
        m = min(chunk, n_perm - start)
        members = np.argsort(gen.random((m, n)), axis=1)[:, :n_a]
        in_a = np.zeros((m, n))
        np.put_along_axis(in_a, members, 1.0, axis=1)
        in_b = 1.0 - in_a
        g_a = in_a @ gram
        ab, aa = (g_a * in_b).sum(1), (g_a * in_a).sum(1)
        bb = ((in_b @ gram) * in_b).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + m] = ab / np.sqrt(aa * bb)
    return out


def _normalised(cross: np.ndarray, u_a: np.ndarray, u_b: np.ndarray) -> np.ndarray:
    """``cross / sqrt(u_a u_b)`` where both ``U`` are positive, else NaN."""
    ok = (u_a > 0) & (u_b > 0)
    return np.where(ok, cross / np.sqrt(np.where(ok, u_a * u_b, 1.0)), np.nan)


def _pair_moments(g: np.ndarray) -> tuple[float, float, np.ndarray, float]:
    """One group's ``U`` (mean inner product of distinct prompts) and its unbiased variance.

    With ``h_ij = G_ij`` the kernel, ``Var U = 2 / (n (n - 1)) (2 (n - 2) zeta_1 + zeta_2)`` (Hoeffding),
    ``zeta_1 = E[h_12 h_13] - E[h_12 h_34]``, ``zeta_2 = E[h_12^2] - E[h_12 h_34]``, each expectation
    estimated without bias by the mean over distinct indices. Also returns the off-diagonal row sums and
    their total (for the covariances with the cross term).
    """
    n = len(g)
    off = g - np.diag(np.diag(g))
    rows = off.sum(1)
    total = float(rows.sum())
    s2 = float((off * off).sum())
    t3 = float(rows @ rows) - s2
    q4 = total * total - 2 * s2 - 4 * t3
    e2, e3, e4 = s2 / (n * (n - 1)), t3 / (n * (n - 1) * (n - 2)), q4 / (n * (n - 1) * (n - 2) * (n - 3))
    var = 2 / (n * (n - 1)) * (2 * (n - 2) * (e3 - e4) + (e2 - e4))
    return total / (n * (n - 1)), var, rows, total


def _moments(g_aa: np.ndarray, g_bb: np.ndarray, g_ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Estimates ``(C, U_A, U_B)`` (``C = a_bar . b_bar``) and their unbiased 3 x 3 covariance.

    ``C`` is a two-sample U-statistic with kernel ``h(a, b) = a . b``:
    ``Var C = ((n_b - 1) zeta_10 + (n_a - 1) zeta_01 + zeta_11) / (n_a n_b)``; ``Cov(C, U_A) = 2 xi_A / n_a``
    with ``xi_A = Cov(h(a_1, b_1), a_1 . a_2)``; ``U_A`` and ``U_B`` are independent. Every expectation is
    a mean over distinct prompts, so the estimate is unbiased (it can be slightly indefinite in small
    samples; the caller clips it).
    """
    n_a, n_b = g_ab.shape
    u_a, var_a, rows_a, tot_a = _pair_moments(g_aa)
    u_b, var_b, rows_b, tot_b = _pair_moments(g_bb)
    r, c = g_ab.sum(1), g_ab.sum(0)
    tot, h2 = float(r.sum()), float((g_ab * g_ab).sum())
    rr, cc = float(r @ r), float(c @ c)
    e11 = h2 / (n_a * n_b)
    e10 = (rr - h2) / (n_a * n_b * (n_b - 1))
    e01 = (cc - h2) / (n_a * n_b * (n_a - 1))
    e22 = (tot * tot - rr - cc + h2) / (n_a * (n_a - 1) * n_b * (n_b - 1))
    var_c = ((n_b - 1) * (e10 - e22) + (n_a - 1) * (e01 - e22) + (e11 - e22)) / (n_a * n_b)
    xi_a = (r @ rows_a) / (n_a * n_b * (n_a - 1)) - (r @ (tot_a - 2 * rows_a)) / (n_a * n_b * (n_a - 1) * (n_a - 2))
    xi_b = (c @ rows_b) / (n_a * n_b * (n_b - 1)) - (c @ (tot_b - 2 * rows_b)) / (n_a * n_b * (n_b - 1) * (n_b - 2))
    cov = np.array([[var_c, 2 * xi_a / n_a, 2 * xi_b / n_b],
                    [2 * xi_a / n_a, var_a, 0.0],
                    [2 * xi_b / n_b, 0.0, var_b]])
    return np.array([tot / (n_a * n_b), u_a, u_b]), cov


def _normalised_draws(estimate: np.ndarray, cov: np.ndarray, df: int, n_draws: int,
                      gen: np.random.Generator) -> np.ndarray:
    """Normalised similarity of ``n_draws`` draws of ``(C, U_A, U_B)`` around the estimate.

    The draws are multivariate Student t with ``df`` degrees of freedom and the estimated covariance:
    normal, widened for the error of the variance estimate itself (as a t interval is).
    """
    vals, vecs = np.linalg.eigh(cov)
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))
    scale = np.sqrt(df / gen.chisquare(df, size=(n_draws, 1)))
    draws = estimate + scale * (gen.standard_normal((n_draws, 3)) @ root.T)
    return _normalised(draws[:, 0], draws[:, 1], draws[:, 2])


def _interval(estimate: float, draws: np.ndarray, level: float) -> tuple[float, float]:
    """Basic (reflected) interval ``[2 T - q_hi, 2 T - q_lo]`` of the draws' quantiles around ``T``.

    Reflecting puts the longer arm on the side where the estimator's error is longer (the ratio is
    skewed); undefined draws (NaN) count against both bounds (as +inf and -inf).
    """
    q_lo, q_hi = (1 - level) / 2, (1 + level) / 2
    low = np.quantile(np.where(np.isnan(draws), np.inf, draws), q_hi, method="higher")
    high = np.quantile(np.where(np.isnan(draws), -np.inf, draws), q_lo, method="lower")
    return float(2 * estimate - low), float(2 * estimate - high)


def _margin_pvalues(estimate: float, draws: np.ndarray, margin: float) -> tuple[float, float]:
    """``(p_shared, p_below)``: the one-sided levels at which the reflected interval of :func:`_interval` has its
    lower end at the margin (``similarity >= m`` shown when ``p_shared < alpha``) and its upper end at the margin
    (``similarity < m`` shown when ``p_below < alpha``). Undefined draws count against both claims."""
    pivot = 2 * estimate - margin
    n = len(draws)
    defined = ~np.isnan(draws)
    p_shared = (np.sum(draws[defined] >= pivot) + np.sum(~defined)) / n
    p_below = (np.sum(draws[defined] <= pivot) + np.sum(~defined)) / n
    return float(p_shared), float(p_below)


def _decide(r: SimilarityResult) -> tuple[Verdict, str]:
    """(verdict, reason) from a result's numbers and its decision settings (q-value when set)."""
    if min(r.n_a, r.n_b) < r.min_prompts:
        return "insufficient", (f"{r.n_a} prompts in A and {r.n_b} in B: at least min_prompts={r.min_prompts} "
                                f"per group are needed")
    for name, ceiling in (("A", r.ceiling_a), ("B", r.ceiling_b)):
        if ceiling != ceiling:
            return "indeterminate", f"group {name}'s effects are all zero"
        if not ceiling > 0:
            return "indeterminate", (f"group {name}'s mean effect does not replicate across halves of its prompts "
                                     f"(noise ceiling {ceiling:.3g} <= 0): no effect above prompt noise")
    use_q = r.q_value == r.q_value
    label, p = ("q", r.q_value) if use_q else ("p", r.p_value)
    p_shared, p_below = (r.q_shared, r.q_below) if use_q else (r.p_shared, r.p_below)
    low, high = r.normalised_ci
    m = r.shared_margin
    ci = f"normalised similarity {r.normalised:.3f}, {r.ci_level:.0%} interval [{low:.3f}, {high:.3f}]"
    if p_shared < r.alpha:
        return "shared", f"{ci}: at least shared_margin={m} ({label}_shared={p_shared:.3g} < alpha={r.alpha})"
    if p < r.alpha and p_below < r.alpha:
        return "distinct", (f"exchangeability rejected ({label}={p:.3g} < alpha={r.alpha}) and {ci} below "
                            f"shared_margin={m} ({label}_below={p_below:.3g})")
    if low > 0:
        return "partly shared", (f"{ci}: positive, but not shown to reach shared_margin={m} "
                                 f"({label}_shared={p_shared:.3g}) nor to stay below it with the groups told apart "
                                 f"({label}={p:.3g}, {label}_below={p_below:.3g})")
    return "indeterminate", (f"{ci} reaches 0 and is not wholly below shared_margin={m} with the groups told apart "
                             f"({label}={p:.3g}, {label}_below={p_below:.3g})")


def similarity_test(effects_a: ArrayLike, effects_b: ArrayLike, *, n_permutations: int = 1000,
                    n_draws: int = 4000, alpha: float = 0.05, shared_margin: float = 0.8,
                    min_prompts: int = 10, rng: RandomLike = 0) -> SimilarityResult:
    """Do two groups of prompts use the same mechanism? Similarity, noise ceilings, tests and a verdict.

    ``effects_a`` ``[n_a, nodes]`` and ``effects_b`` ``[n_b, nodes]`` are per-prompt node effects (the same
    nodes in the same order; all of them are used). Returns a :class:`SimilarityResult`; the module
    docstring and docs/statistics.md derive each number.

    Verdicts, graded against the margin ``m = shared_margin`` (each p-value is replaced by its BH q-value across
    the table when :func:`apply_fdr` sets them):

    * ``insufficient``: ``min(n_a, n_b) < min_prompts`` (the power floor); no test is run.
    * ``shared``: the similarity is shown to be at least ``m`` (equivalence test, ``p_shared < alpha``: the
      lower end of the interval is at least ``m``).
    * ``distinct``: the similarity is shown to be below ``m`` (``p_below < alpha``: the interval's upper end is
      below ``m``) *and* the permutation test rejects exchangeability (``p < alpha``). Not "below 1": two groups
      whose mean effects have a cosine of 0.95 are not distinct.
    * ``partly shared``: neither, with the interval's lower end above 0 (a positive similarity that is not shown
      to reach ``m``).
    * ``indeterminate``: the rest (the interval reaches 0), or a group without a replicable effect
      (ceiling <= 0). A large p-value alone never gives a verdict.

    Options: ``n_permutations`` (>= 1), ``n_draws`` (>= 1; draws of the interval), ``alpha`` in (0, 0.5),
    ``shared_margin`` in (0, 1], ``min_prompts`` (>= 4: the variance estimate needs 4 distinct prompts),
    ``rng`` (seed or Generator). A bad option raises :class:`StatsOptionError` (a ValueError).
    """
    n_permutations = _check_int("n_permutations", n_permutations, 1)
    n_draws = _check_int("n_draws", n_draws, 1)
    alpha = _check_fraction("alpha", alpha, 0.0, 0.5)
    shared_margin = _check_fraction("shared_margin", shared_margin, 0.0, 1.0, high_inclusive=True)
    min_prompts = _check_int("min_prompts", min_prompts, 4)
    gen = _generator(rng)
    ea, eb = _effects(effects_a, "effects_a"), _effects(effects_b, "effects_b")
    if ea.shape[1] != eb.shape[1]:
        raise StatsOptionError(f"effects_a and effects_b must have the same nodes, got {ea.shape[1]} and "
                               f"{eb.shape[1]} columns")
    n_a, n_b = len(ea), len(eb)
    nan = float("nan")
    fields: dict[str, Any] = dict(
        similarity=nan, similarity_full=nan, ceiling_a=nan, ceiling_b=nan, normalised=nan,
        normalised_ci=(nan, nan), ci_level=1 - 2 * alpha, p_value=nan, q_value=nan, p_shared=nan, p_below=nan,
        q_shared=nan, q_below=nan, verdict="insufficient", reason="",
        n_a=n_a, n_b=n_b, n_nodes=ea.shape[1], alpha=alpha, shared_margin=shared_margin,
        min_prompts=min_prompts, n_permutations=n_permutations, n_draws=n_draws)
    if min(n_a, n_b) >= min_prompts:
        fields.update(_similarity_numbers(np.concatenate([ea, eb]), n_a, n_permutations, n_draws, alpha,
                                          shared_margin, gen))
    return _with_verdict(SimilarityResult(**fields))


def _similarity_numbers(pooled: np.ndarray, n_a: int, n_permutations: int, n_draws: int, alpha: float,
                        margin: float, gen: np.random.Generator) -> dict[str, Any]:
    """The numbers of :func:`similarity_test` from the pooled ``[n_a + n_b, nodes]`` effects (A first)."""
    nan = float("nan")
    n_b = len(pooled) - n_a
    gram = pooled @ pooled.T
    g_aa, g_bb, g_ab = gram[:n_a, :n_a], gram[n_a:, n_a:], gram[:n_a, n_a:]
    estimate, cov = _moments(g_aa, g_bb, g_ab)
    cross, u_a, u_b = (float(v) for v in estimate)
    half_a = _half_norm2(float(np.trace(g_aa)) / n_a, u_a, n_a)
    half_b = _half_norm2(float(np.trace(g_bb)) / n_b, u_b, n_b)
    full = math.sqrt(float(g_aa.sum()) / n_a**2 * float(g_bb.sum()) / n_b**2)
    out: dict[str, Any] = dict(
        similarity=cross / math.sqrt(half_a * half_b) if half_a * half_b > 0 else nan,
        similarity_full=cross / full if full > 0 else nan,
        ceiling_a=u_a / half_a if half_a > 0 else nan,
        ceiling_b=u_b / half_b if half_b > 0 else nan)
    if full > 0:
        null = _permutation_null(gram, n_a, n_permutations, gen)
        # A permuted mean of zero norm (undefined cosine) counts as at least as extreme (conservative).
        out["p_value"] = float((1 + np.sum(~(null > out["similarity_full"]))) / (1 + n_permutations))
    normalised = float(_normalised(np.array(cross), np.array(u_a), np.array(u_b)))
    if normalised == normalised:
        out["normalised"] = normalised
        draws = _normalised_draws(estimate, cov, min(n_a, n_b) - 1, n_draws, gen)
        out["normalised_ci"] = _interval(normalised, draws, 1 - 2 * alpha)
        out["p_shared"], out["p_below"] = _margin_pvalues(normalised, draws, margin)
    return out


def _with_verdict(r: SimilarityResult) -> SimilarityResult:
    verdict, reason = _decide(r)
    return dataclasses.replace(r, verdict=verdict, reason=reason)


def apply_fdr(results: Sequence[SimilarityResult], alpha: float | None = None) -> list[SimilarityResult]:
    """The results of one table with BH q-values across its tested pairs and verdicts re-derived from q: the
    exchangeability p-values and each equivalence p-value (``p_shared``, ``p_below``) form their own family.

    Pairs that were not tested (``insufficient``, p-value NaN) keep a NaN q-value and do not count in the
    family. ``alpha``: the FDR level for every pair (default: each result's own ``alpha``).
    """
    if alpha is not None:
        alpha = _check_fraction("alpha", alpha, 0.0, 0.5)
    q = bh_qvalues([r.p_value for r in results])
    q_shared = bh_qvalues([r.p_shared for r in results])
    q_below = bh_qvalues([r.p_below for r in results])
    out = []
    for r, qv, qs, qb in zip(results, q, q_shared, q_below):
        r = dataclasses.replace(r, q_value=float(qv), q_shared=float(qs), q_below=float(qb),
                                alpha=r.alpha if alpha is None else alpha)
        out.append(_with_verdict(r))
    return out


def similarity_table(pairs: Mapping[K, tuple[ArrayLike, ArrayLike]], *, rng: RandomLike = 0,
                     **options: Any) -> dict[K, SimilarityResult]:
    """:func:`similarity_test` for every pair of a table, with BH q-values across the table.

    ``pairs`` maps a key (e.g. ``("violence", "drugs")``) to ``(effects_a, effects_b)``; ``options`` are
    those of :func:`similarity_test`. Each pair gets its own random stream, spawned from ``rng`` in the
    table's order.
    """
    streams = _generator(rng).spawn(len(pairs))
    keys = list(pairs)
    results = [similarity_test(*pairs[k], rng=g, **options) for k, g in zip(keys, streams)]
    return dict(zip(keys, apply_fdr(results, options.get("alpha"))))

