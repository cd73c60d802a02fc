"""Calibration of refusal_lens.core.stats on synthetic effects with a known truth.

Synthetic groups: per-prompt effects = a sparse mean vector (``k`` active nodes) + independent prompt
noise. "One mechanism": both groups share the mean vector; "independent": each group has its own.
Every simulation has a fixed seed (deterministic) and enough repetitions that a miscalibrated test
fails. The rates these tests measure are quoted in docs/statistics.md. The circuits' random controls
(``feature_stats``, ``matched_random``) are tested on SAEs spliced into the tiny random model of conftest.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from refusal_lens.core.stats import similarity as stats
from refusal_lens.core.stats import (StatsOptionError, apply_fdr, bh_qvalues, bootstrap_mean_ci,
                                         compare_to_random, empirical_pvalue, kolmogorov_sf, ks_uniform,
                                         similarity_table, similarity_test, wilson_interval)
from refusal_lens.errors import UserError


def sparse_mean(rng: np.random.Generator, nodes: int, k: int, heavy: bool = False) -> np.ndarray:
    """``k`` active nodes with N(0, 1) effects, or heavy-tailed ones (Student t, 2 dof: random signs)."""
    mean = np.zeros(nodes)
    mean[rng.choice(nodes, k, replace=False)] = rng.standard_t(2, k) if heavy else rng.normal(0, 1, k)
    return mean


def group(rng: np.random.Generator, mean: np.ndarray, n: int, heavy: bool = False) -> np.ndarray:
    """``n`` prompts: the mean + unit-variance noise on every node (Gaussian, or Student t with 3 dof)."""
    shape = (n, len(mean))
    noise = rng.standard_t(3, shape) / math.sqrt(3) if heavy else rng.normal(0, 1, shape)
    return mean + noise


def verdict_rates(results: list[stats.SimilarityResult]) -> dict[str, float]:
    return {v: sum(r.verdict == v for r in results) / len(results) for v in stats.VERDICTS}


# ---------------------------------------------------------------- the estimator


def test_closed_form_ceiling_and_similarity_equal_the_average_over_random_splits():
    """The closed forms are the limit of averaging many random half splits (odd group size included)."""
    rng = np.random.default_rng(0)
    mean = sparse_mean(rng, 300, 30)
    ea, eb = group(rng, mean, 9), group(rng, 0.7 * mean + sparse_mean(rng, 300, 30), 12)
    res = similarity_test(ea, eb, n_permutations=10, min_prompts=4)

    def halves(e: np.ndarray, splits: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(e)
        order = np.argsort(rng.random((splits, n)), axis=1)
        w1, w2 = np.zeros((splits, n)), np.zeros((splits, n))
        np.put_along_axis(w1, order[:, : n // 2], 1.0 / (n // 2), axis=1)
        np.put_along_axis(w2, order[:, n // 2 :], 1.0 / (n - n // 2), axis=1)
        return w1 @ e, w2 @ e

    a1, a2 = halves(ea, 40000)
    b1, b2 = halves(eb, 40000)
    dot = lambda x, y: float(np.mean(np.sum(x * y, axis=1)))  # noqa: E731
    norm_a = math.sqrt(dot(a1, a1) * dot(a2, a2))
    norm_b = math.sqrt(dot(b1, b1) * dot(b2, b2))
    ceiling_a = dot(a1, a2) / norm_a
    ceiling_b = dot(b1, b2) / norm_b
    cross = np.mean([dot(x, y) for x in (a1, a2) for y in (b1, b2)]) / math.sqrt(norm_a * norm_b)
    assert res.ceiling_a == pytest.approx(ceiling_a, rel=0.01)
    assert res.ceiling_b == pytest.approx(ceiling_b, rel=0.01)
    assert res.similarity == pytest.approx(cross, rel=0.01)
    assert res.normalised == pytest.approx(res.similarity / math.sqrt(res.ceiling_a * res.ceiling_b), rel=1e-9)
    full = ea.mean(0) @ eb.mean(0) / np.linalg.norm(ea.mean(0)) / np.linalg.norm(eb.mean(0))
    assert res.similarity_full == pytest.approx(full, rel=1e-9)


def test_u_statistic_moments_equal_brute_force_sums_over_distinct_prompts():
    """(C, U_A, U_B) and their covariance estimate against explicit loops over distinct index tuples."""
    rng = np.random.default_rng(1)
    ea, eb = rng.normal(size=(5, 7)) + 1.0, rng.normal(size=(6, 7)) + 0.5
    gram = np.concatenate([ea, eb]) @ np.concatenate([ea, eb]).T
    g_aa, g_bb, g_ab = gram[:5, :5], gram[5:, 5:], gram[:5, 5:]
    estimate, cov = stats._moments(g_aa, g_bb, g_ab)

    def mean_over(tuples, f):
        vals = [f(*t) for t in tuples]
        return sum(vals) / len(vals)

    def one_sample(g):
        n = len(g)
        e2 = mean_over(itertools.permutations(range(n), 2), lambda i, j: g[i, j] ** 2)
        e3 = mean_over(itertools.permutations(range(n), 3), lambda i, j, k: g[i, j] * g[i, k])
        e4 = mean_over(itertools.permutations(range(n), 4), lambda i, j, k, m: g[i, j] * g[k, m])
        u = mean_over(itertools.permutations(range(n), 2), lambda i, j: g[i, j])
        return u, 2 / (n * (n - 1)) * (2 * (n - 2) * (e3 - e4) + (e2 - e4))

    u_a, var_a = one_sample(g_aa)
    u_b, var_b = one_sample(g_bb)
    na, nb = g_ab.shape
    pa, pb = list(itertools.permutations(range(na), 2)), list(itertools.permutations(range(nb), 2))
    e11 = float((g_ab ** 2).mean())
    e10 = mean_over([(i, j, m) for i in range(na) for j, m in pb], lambda i, j, m: g_ab[i, j] * g_ab[i, m])
    e01 = mean_over([(i, k, j) for i, k in pa for j in range(nb)], lambda i, k, j: g_ab[i, j] * g_ab[k, j])
    e22 = mean_over([(i, k, j, m) for i, k in pa for j, m in pb], lambda i, k, j, m: g_ab[i, j] * g_ab[k, m])
    var_c = ((nb - 1) * (e10 - e22) + (na - 1) * (e01 - e22) + (e11 - e22)) / (na * nb)
    triples_a = list(itertools.permutations(range(na), 3))
    xi_a = (mean_over([(i, k, j) for i, k in pa for j in range(nb)], lambda i, k, j: g_ab[i, j] * g_aa[i, k])
            - mean_over([(i, k, m, j) for i, k, m in triples_a for j in range(nb)],
                        lambda i, k, m, j: g_ab[i, j] * g_aa[k, m]))
    assert estimate == pytest.approx([g_ab.mean(), u_a, u_b], rel=1e-10)
    assert [cov[0, 0], cov[1, 1], cov[2, 2], cov[0, 1]] == pytest.approx([var_c, var_a, var_b, 2 * xi_a / na],
                                                                         rel=1e-8)


def test_normalised_interval_covers_the_true_cosine():
    """Partial sharing (true cosine about 0.5): each one-sided bound misses in about alpha of groups.

    """
    rng = np.random.default_rng(2)
    low_miss = high_miss = 0
    reps = 300
    for r in range(reps):
        mean_a = sparse_mean(rng, 1000, 50)
        mean_b = mean_a.copy()
        active = np.flatnonzero(mean_a)
        mean_b[active[:25]] = 0.0
        mean_b[rng.choice(np.flatnonzero(mean_a == 0), 25, replace=False)] = rng.normal(0, 1, 25)
        truth = mean_a @ mean_b / np.linalg.norm(mean_a) / np.linalg.norm(mean_b)
        res = similarity_test(group(rng, mean_a, 20), group(rng, mean_b, 20), n_permutations=1, rng=r)
        low_miss += res.normalised_ci[0] > truth
        high_miss += res.normalised_ci[1] < truth
    print(f"interval: lower bound above the truth {low_miss / reps:.3f}, upper below {high_miss / reps:.3f}")
    assert res.ci_level == pytest.approx(0.9)
    assert 0.02 <= low_miss / reps <= 0.09
    assert 0.02 <= high_miss / reps <= 0.09


# ---------------------------------------------------------------- calibration of the verdicts


@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "heavy-tailed"])
def test_one_mechanism_is_rarely_distinct_and_mostly_shared(heavy):
    """Pairs of groups from ONE distribution (3,000 or 2,000 pairs, 20 prompts per group, 1,000 nodes, k = 50).

    The permutation p-values are uniform (KS) and reject at alpha; ``distinct``, which also needs the
    similarity shown below the margin, is rarer still (at most alpha); with 20 prompts most pairs are ``shared``.
    """
    rng = np.random.default_rng(3 + heavy)
    results = []
    for r in range(2000 if heavy else 3000):  # Student t draws are slower
        mean = sparse_mean(rng, 1000, 50, heavy)
        results.append(similarity_test(group(rng, mean, 20, heavy), group(rng, mean, 20, heavy),
                                       n_permutations=200, rng=r))
    rates = verdict_rates(results)
    pvalues = np.array([r.p_value for r in results])
    _, ks_p = ks_uniform(pvalues, grid=np.arange(1, 202) / 201)
    print(f"one mechanism ({'heavy' if heavy else 'gaussian'}): {rates}, p < 0.05: {np.mean(pvalues < 0.05):.3f}, "
          f"KS p {ks_p:.3f}")
    assert rates["distinct"] <= 0.05, rates
    assert 0.02 <= np.mean(pvalues < 0.05) <= 0.08
    assert ks_p > 0.01
    assert rates["shared"] >= 0.8, rates
    assert np.mean([r.normalised for r in results]) == pytest.approx(1.0, abs=0.02)


def independent_pairs(rng: np.random.Generator, pairs: int, n: int, heavy: bool) -> list[tuple[np.ndarray, ...]]:
    """The issue's setting: 5,000 nodes, k = 50 active nodes per mechanism, independent mechanisms."""
    return [(group(rng, sparse_mean(rng, 5000, 50, heavy), n, heavy),
             group(rng, sparse_mean(rng, 5000, 50, heavy), n, heavy)) for _ in range(pairs)]


@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "heavy-tailed"])
def test_independent_mechanisms_are_distinct_and_never_shared(heavy):
    """Pairs with independent means (200 pairs, 15 prompts per group, 5,000 nodes, k = 50).

    (At 10 prompts per group ``distinct`` falls below 0.9 for Gaussian effects: see docs/statistics.md.)
    """
    rng = np.random.default_rng(5 + heavy)
    results = [similarity_test(a, b, n_permutations=200, rng=r)
               for r, (a, b) in enumerate(independent_pairs(rng, 200, 15, heavy))]
    rates = verdict_rates(results)
    print(f"independent ({'heavy' if heavy else 'gaussian'}): {rates}")
    assert rates["distinct"] >= 0.9, rates
    assert rates["shared"] <= 0.05, rates
    assert abs(np.mean([r.normalised for r in results])) < 0.05


def test_the_old_similarity_test_calls_independent_mechanisms_similar():
    """The old ``metrics.permutation_pvalue`` on the group means of the same kind of independent pairs.

    Measured on these 100 pairs (15 prompts x 5,000 nodes, k = 50, pool = all nodes): p < 0.05, i.e.
    "significantly similar", for 0.97 of them, where the new test calls 0.99 distinct and none shared.
    The old function is kept in tests/core/legacy_similarity.py for this comparison only.
    """
    import legacy_similarity as metrics

    rng = np.random.default_rng(7)
    pairs = independent_pairs(rng, 100, 15, heavy=False)
    old = [metrics.permutation_pvalue(a.mean(0), b.mean(0), 50, np.arange(5000), 200, rng)[0] for a, b in pairs]
    new = [similarity_test(a, b, n_permutations=200, rng=r) for r, (a, b) in enumerate(pairs)]
    print(f"old test p < 0.05 on independent pairs: {np.mean(np.array(old) < 0.05):.2f}; new: {verdict_rates(new)}")
    assert np.mean(np.array(old) < 0.05) > 0.5
    assert verdict_rates(new)["shared"] == 0.0


def test_partial_sharing_is_not_shared():
    """Half of the mechanism shared (true cosine 0.5; 100 pairs, 20 prompts, 2,000 nodes): never shared,
    mostly distinct."""
    rng = np.random.default_rng(8)
    results = []
    for r in range(100):
        mean_a = sparse_mean(rng, 2000, 50)
        mean_b = mean_a.copy()
        active = np.flatnonzero(mean_a)
        mean_b[active[:25]] = 0.0
        mean_b[rng.choice(np.flatnonzero(mean_a == 0), 25, replace=False)] = rng.normal(0, 1, 25)
        results.append(similarity_test(group(rng, mean_a, 20), group(rng, mean_b, 20), n_permutations=200, rng=r))
    rates = verdict_rates(results)
    print(f"half shared: {rates}")
    assert rates["shared"] == 0.0, rates
    assert rates["distinct"] >= 0.9, rates


def cosine_pair(rng: np.random.Generator, cosine: float, n: int, nodes: int = 1000, k: int = 100):
    """Two groups of ``n`` prompts whose true mean effects have the given cosine and the same norm: A's mean on k/2
    of ``k`` active nodes, B's ``cosine * A + sqrt(1 - cosine^2) * other`` with ``other`` on the other k/2."""
    both = sparse_mean(rng, nodes, k)
    active = np.flatnonzero(both)
    mean_a, other = np.zeros(nodes), np.zeros(nodes)
    mean_a[active[: k // 2]], other[active[k // 2 :]] = both[active[: k // 2]], both[active[k // 2 :]]
    other *= np.linalg.norm(mean_a) / np.linalg.norm(other)
    mean_b = cosine * mean_a + math.sqrt(max(1 - cosine**2, 0.0)) * other
    return group(rng, mean_a, n), group(rng, mean_b, n)


def test_at_the_margin_neither_shared_nor_distinct():
    """True cosine exactly at shared_margin = 0.8 (600 pairs, 20 prompts, 1,000 nodes): the lower bound
    reaches the margin in at most about alpha of pairs (the size of the equivalence test), so ``shared``
    is at most that, and so is ``distinct`` (the upper bound below the margin); the rest is ``partly shared``."""
    rng = np.random.default_rng(9)
    results = [similarity_test(*cosine_pair(rng, 0.8, 20), n_permutations=200, rng=r) for r in range(600)]
    rates = verdict_rates(results)
    reach = np.mean([r.normalised_ci[0] >= 0.8 for r in results])
    print(f"at the margin: lower bound >= 0.8 in {reach:.3f}; {rates}")
    assert reach <= 0.075
    assert rates["shared"] <= 0.075 and rates["distinct"] <= 0.075, rates
    assert rates["partly shared"] >= 0.8, rates
    assert np.mean([r.normalised for r in results]) == pytest.approx(0.8, abs=0.03)


#: verdict rates measured by the test below (200 pairs per cosine, 32 prompts a group, 1,000 nodes, k = 100,
#: shared_margin 0.8), quoted in docs/statistics.md
GRADED = {1.0: ("shared", 0.8), 0.97: ("shared", 0.8), 0.9: ("shared", 0.5), 0.7: ("distinct", 0.5),
          0.5: ("distinct", 0.9), 0.0: ("distinct", 0.9)}


@pytest.mark.parametrize("cosine", list(GRADED))
def test_graded_verdicts_follow_the_true_cosine(cosine):
    """Groups of 32 prompts whose mean effects have a known cosine: ~0.97 is *shared* in >= 80% of pairs and never
    *distinct*; 0.7 and below are never *shared*; one mechanism is *distinct* in <= 5%. The verdict is about the
    size of the similarity against the margin, not about "identical or not"."""
    rng = np.random.default_rng(int(cosine * 100) + 40)
    results = [similarity_test(*cosine_pair(rng, cosine, 32), n_permutations=200, rng=r) for r in range(200)]
    rates = verdict_rates(results)
    print(f"cosine {cosine}: {rates}, mean normalised {np.mean([r.normalised for r in results]):.3f}")
    word, at_least = GRADED[cosine]
    assert rates[word] >= at_least, rates
    if cosine >= 0.9:
        assert rates["distinct"] <= (0.05 if cosine == 1.0 else 0.0), rates
    if cosine <= 0.7:
        assert rates["shared"] == 0.0, rates


def test_no_effect_above_noise_is_indeterminate():
    """Pure prompt noise in both groups (200 pairs): never shared, distinct at most as often as the
    permutation test's alpha allows, mostly indeterminate; no effect at all in a group: indeterminate."""
    rng = np.random.default_rng(10)
    noise = [similarity_test(rng.normal(size=(12, 500)), rng.normal(size=(12, 500)), n_permutations=100, rng=r)
             for r in range(200)]
    rates = verdict_rates(noise)
    print(f"pure noise: {rates}")
    assert rates["shared"] == 0.0 and rates["distinct"] <= 0.05 and rates["indeterminate"] >= 0.95
    assert any("does not replicate" in r.reason for r in noise)
    zero = similarity_test(np.zeros((12, 50)), rng.normal(size=(12, 50)), n_permutations=50)
    assert zero.verdict == "indeterminate" and "all zero" in zero.reason


def test_insufficient_below_min_prompts():
    rng = np.random.default_rng(11)
    mean = sparse_mean(rng, 200, 20)
    small = similarity_test(group(rng, mean, 9), group(rng, mean, 30))
    assert small.verdict == "insufficient"
    assert "min_prompts=10" in small.reason
    assert math.isnan(small.p_value)
    enough = similarity_test(group(rng, mean, 10), group(rng, mean, 30), n_permutations=100)
    assert enough.verdict != "insufficient"
    assert 0 < enough.p_value <= 1


@pytest.mark.parametrize("option, value", [
    ("n_permutations", 0), ("n_draws", 1.5), ("alpha", 0.7), ("alpha", 0.0), ("shared_margin", 0.0),
    ("shared_margin", 1.2), ("min_prompts", 3), ("rng", -1), ("rng", "seed"),
])
def test_bad_options_raise_naming_the_option(option, value):
    rng = np.random.default_rng(12)
    with pytest.raises(StatsOptionError, match=option) as info:
        similarity_test(rng.normal(size=(10, 5)), rng.normal(size=(10, 5)), **{option: value})
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)


def test_bad_effects_raise():
    rng = np.random.default_rng(13)
    with pytest.raises(StatsOptionError, match="same nodes"):
        similarity_test(rng.normal(size=(10, 5)), rng.normal(size=(10, 6)))
    with pytest.raises(StatsOptionError, match=r"effects_a must be a \[prompts, nodes\]"):
        similarity_test(rng.normal(size=10), rng.normal(size=(10, 6)))
    bad = rng.normal(size=(10, 5))
    bad[0, 0] = np.nan
    with pytest.raises(StatsOptionError, match="effects_b must be finite"):
        similarity_test(rng.normal(size=(10, 5)), bad)


def test_result_is_frozen_and_json_ready():
    rng = np.random.default_rng(14)
    mean = sparse_mean(rng, 100, 10)
    res = similarity_test(group(rng, mean, 12), group(rng, mean, 12), n_permutations=50)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.verdict = "shared"  # type: ignore[misc]
    data = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert data["verdict"] in stats.VERDICTS and data["q_value"] is None and len(data["normalised_ci"]) == 2
    ea, eb = group(rng, mean, 12), group(rng, mean, 12)
    assert (similarity_test(ea, eb, n_permutations=50, rng=3).to_dict()
            == similarity_test(ea, eb, n_permutations=50, rng=3).to_dict())


# ---------------------------------------------------------------- false-discovery control


def test_bh_qvalues_known_values_and_nan_passthrough():
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.005, 0.5])
    # m = 5 sorted: 0.005, 0.01, 0.03, 0.04, 0.5 -> 0.025, 0.025, 0.05, 0.05, 0.5
    q = bh_qvalues(p)
    assert np.isnan(q[1])
    assert q[[4, 0, 3, 2, 5]] == pytest.approx([0.025, 0.025, 0.05, 0.05, 0.5])
    assert bh_qvalues([]).shape == (0,)
    with pytest.raises(StatsOptionError, match="pvalues"):
        bh_qvalues([0.2, 1.5])


def test_bh_controls_the_false_discovery_rate():
    """2,000 families of 100 one-sided z-tests, 80 true nulls: mean FDP at q < 0.05 is about
    0.8 x 0.05 = 0.04, with most true effects found."""
    rng = np.random.default_rng(17)
    z = rng.normal(size=(2000, 100))
    z[:, 80:] += 3.0
    p = 0.5 * np.array([math.erfc(v / math.sqrt(2)) for v in z.ravel()]).reshape(z.shape)
    found = np.array([bh_qvalues(row) < 0.05 for row in p])
    false = found[:, :80].sum(1)
    fdp = false / np.maximum(found.sum(1), 1)
    print(f"BH: mean FDP {fdp.mean():.4f}, power {found[:, 80:].mean():.3f}")
    assert fdp.mean() <= 0.05
    assert fdp.mean() >= 0.03  # BH is not vacuous: it spends the error rate it is allowed
    assert found[:, 80:].mean() > 0.5


def test_table_verdicts_keep_the_false_discovery_rate():
    """End to end: 40 tables of 20 pairs, 20 prompts a group: 16 at the margin's edge (true cosine 0.8 =
    shared_margin, where *distinct* would be a false discovery: half of them are one mechanism in disguise) and 4
    independent. The mean false-discovery proportion of ``distinct`` after BH stays <= alpha.
    """
    rng = np.random.default_rng(18)
    fdps, power = [], []
    for t in range(40):
        pairs = {("pair", i): cosine_pair(rng, 0.8 if i < 16 else 0.0, 20) for i in range(20)}
        table = similarity_table(pairs, n_permutations=200, n_draws=2000, rng=t)
        distinct = np.array([table[("pair", i)].verdict == "distinct" for i in range(20)])
        fdps.append(distinct[:16].sum() / max(distinct.sum(), 1))
        power.append(distinct[16:].mean())
        assert all(not math.isnan(r.q_value) and r.q_value >= r.p_value - 1e-12 for r in table.values())
    print(f"table: mean FDP {np.mean(fdps):.4f}, distinct among independent pairs {np.mean(power):.3f}")
    assert np.mean(fdps) <= 0.05
    assert np.mean(power) >= 0.9


def test_table_shared_verdicts_keep_the_false_discovery_rate():
    """The equivalence verdicts have their own BH family: 40 tables of 20 pairs, 16 at the margin's edge (true
    cosine 0.8 = shared_margin: *shared* would be a false discovery) and 4 of one mechanism; mean false-discovery
    proportion of *shared* <= 0.05 (measured: printed), and the one-mechanism pairs are still found."""
    rng = np.random.default_rng(23)
    fdps, power = [], []
    for t in range(40):
        pairs = {i: cosine_pair(rng, 0.8 if i < 16 else 1.0, 20) for i in range(20)}
        table = similarity_table(pairs, n_permutations=100, n_draws=2000, rng=t)
        shared = np.array([table[i].verdict == "shared" for i in range(20)])
        fdps.append(shared[:16].sum() / max(shared.sum(), 1))
        power.append(shared[16:].mean())
        assert all(r.q_shared >= r.p_shared - 1e-12 for r in table.values())
    print(f"table, shared: mean FDP {np.mean(fdps):.4f}, shared among one-mechanism pairs {np.mean(power):.3f}")
    assert np.mean(fdps) <= 0.05
    assert np.mean(power) >= 0.5


def test_apply_fdr_rederives_verdicts_from_q_values():
    rng = np.random.default_rng(19)
    clear = similarity_test(group(rng, sparse_mean(rng, 400, 40), 20), group(rng, sparse_mean(rng, 400, 40), 20),
                            n_permutations=400)
    assert clear.verdict == "distinct"
    res = stats._with_verdict(dataclasses.replace(clear, p_value=0.01))  # distinct at p, not after BH of 20
    assert res.verdict == "distinct"
    nulls = [dataclasses.replace(res, p_value=0.9) for _ in range(19)]
    insufficient = similarity_test(np.ones((3, 400)), np.ones((3, 400)))
    adjusted = apply_fdr([res, *nulls, insufficient])
    assert adjusted[0].q_value == pytest.approx(res.p_value * 20)
    assert adjusted[0].verdict != "distinct"
    assert "q=" in adjusted[0].reason
    assert math.isnan(adjusted[-1].q_value) and adjusted[-1].verdict == "insufficient"
    assert apply_fdr([res])[0].verdict == "distinct"


# ---------------------------------------------------------------- intervals and controls


def test_wilson_interval_known_values():
    """Newcombe (1998), Table I, method 3 (Wilson score without continuity correction)."""
    known = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
             (1, 29): (0.0061, 0.1718), (29, 29): (0.8830, 1.0), (5, 10): (0.2366, 0.7634)}
    for (k, n), (low, high) in known.items():
        assert wilson_interval(k, n) == pytest.approx((low, high), abs=5e-5)
    assert wilson_interval(5, 10, level=0.99)[0] < wilson_interval(5, 10)[0]
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(StatsOptionError, match="k must be at most n"):
        wilson_interval(3, 2)
    with pytest.raises(StatsOptionError, match="level"):
        wilson_interval(1, 2, level=1.0)


def test_bootstrap_mean_interval_covers_the_mean():
    """400 samples of 40 draws from N(1, 2^2): the 95% percentile interval covers 1 in about 95% of them."""
    rng = np.random.default_rng(20)
    hits = []
    for r in range(400):
        low, high = bootstrap_mean_ci(rng.normal(1.0, 2.0, 40), n_boot=1000, level=0.95, rng=r)
        hits.append(low <= 1.0 <= high)
    print(f"bootstrap mean interval coverage {np.mean(hits):.3f}")
    assert 0.9 <= np.mean(hits) <= 0.98
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))
    with pytest.raises(StatsOptionError, match="values"):
        bootstrap_mean_ci([1.0, np.nan])


def test_empirical_pvalue_exact_values():
    null = [1.0, 2.0, 3.0, 4.0]
    assert empirical_pvalue(3.0, null, "greater") == pytest.approx(3 / 5)
    assert empirical_pvalue(3.0, null, "less") == pytest.approx(4 / 5)
    assert empirical_pvalue(3.0, null, "two-sided") == 1.0
    assert empirical_pvalue(10.0, null, "greater") == pytest.approx(1 / 5)
    assert empirical_pvalue(0.0, null, "two-sided") == pytest.approx(2 / 5)
    with pytest.raises(StatsOptionError, match="alternative"):
        empirical_pvalue(1.0, null, "bigger")


def test_compare_to_random_summary():
    res = compare_to_random(0.1, np.linspace(0.2, 1.0, 21), alternative="less", level=0.9)
    assert res.n == 21 and res.p_value == pytest.approx(1 / 22)
    assert res.mean == pytest.approx(0.6) and res.median == pytest.approx(0.6)
    assert res.low == pytest.approx(0.24) and res.high == pytest.approx(0.96)
    assert json.loads(json.dumps(res.to_dict()))["alternative"] == "less"
    with pytest.raises(StatsOptionError, match="at least one"):
        compare_to_random(0.1, [], alternative="less")


# ---------------------------------------------------------------- matched random controls of a circuit
#
# The circuits stage's random controls (refusal_lens.stages.circuits.controls: ``feature_stats``, ``matched_random``)
# on a NodeSpace of three SAEs spliced into the tiny random model of conftest.py. The SAEs' encoder biases are
# spread so that about half of each hook's features never fire after the chat template's opening on the
# prompts: a sampler that drew from every feature would be visibly different from one that draws from the
# active ones.

CONTROL_HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.2.hook_attn_out")
CONTROL_PROMPTS = ["how make bomb ?", "bake a cake", "what is python code", "steal car", "hello world",
                   "print the code", "make cake", "how are you", "the world is"]
#: the score drop of ablating a feature is its mean peak activation times its hook's weight: a set with
#: another mix of hooks than the circuit's has another behaviour
HOOK_WEIGHT = {"blocks.0.hook_resid_post": 1.0, "blocks.1.hook_mlp_out": 4.0, "blocks.2.hook_attn_out": 0.25}
D_SAE = 96


@pytest.fixture(scope="module")
def control_space(tiny_model_dir):
    """The NodeSpace, the library's ``feature_stats`` and a reference computed by hand: each
    prompt alone (no padding) through TransformerLens's ``run_with_cache``, the SAE's encoder on every
    position from the end of the opening on. Also the per-feature score drop (0 for an inactive feature:
    ablating a feature where it never fires changes nothing)."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from refusal_lens.core.chat import encode_prompt
    from refusal_lens.stages.circuits.controls import feature_stats
    from refusal_lens.stages.circuits.nodes import NodeSpace
    from refusal_lens.config import ModelConfig
    from refusal_lens.core.intervene import Intervener
    from refusal_lens.models.loading import load_model

    loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
    prompts = [encode_prompt(loaded.tokenizer, p, 64) for p in CONTROL_PROMPTS]
    with torch.no_grad():
        acts = [loaded.model.run_with_cache(torch.tensor([p.ids]), names_filter=list(CONTROL_HOOKS))[1]
                for p in prompts]
        saes, gen = {}, torch.Generator().manual_seed(0)
        for h in CONTROL_HOOKS:
            cfg = StandardSAEConfig(d_in=loaded.d_model, d_sae=D_SAE, dtype="float32", device="cpu",
                                    metadata=SAEMetadata(hook_name=h, model_name="tiny", context_size=1,
                                                         prepend_bos=False))
            sae = StandardSAE(cfg).eval()
            w = torch.randn(loaded.d_model, D_SAE, generator=gen)
            w /= w.norm(dim=0)
            pre_std = torch.cat([a[h][0] for a in acts]) @ w
            sae.W_enc.copy_(w), sae.W_dec.copy_(w.T), sae.b_dec.zero_()
            # thresholds from 0.5 to 4 standard deviations of the pre-activations, in random order
            sae.b_enc.copy_(-pre_std.std() * torch.linspace(0.5, 4.0, D_SAE)[torch.randperm(D_SAE, generator=gen)])
            # the last feature reads the opening (identical in every prompt) and fires there only: it is the
            # direction of the opening position that stands out most from every later position
            opening = acts[0][h][0, : prompts[0].n_opening]
            later = torch.cat([a[h][0, p.n_opening :] for a, p in zip(acts, prompts)])
            u = opening / opening.norm(dim=-1, keepdim=True)
            margin = (opening * u).sum(-1) - (later @ u.T).max(0).values
            j = int(margin.argmax())
            assert margin[j] > 0, h
            sae.W_enc[:, -1] = u[j]
            sae.W_dec[-1] = u[j]
            sae.b_enc[-1] = -(opening[j] @ u[j] - margin[j] / 2)
            saes[h] = sae
        space = NodeSpace(CONTROL_HOOKS, saes, prompts[0].n_post_instruction)
        stats = feature_stats(Intervener(loaded, 4), space, prompts)
        active = stats.active
        reference, opening_only, ref_freq, ref_size = {}, {}, {}, {}
        drop = np.zeros(space.n_features)
        for h in CONTROL_HOOKS:
            f = [saes[h].encode(a[h][0]) for a in acts]
            after = torch.stack([fi[p.n_opening:].max(0).values for fi, p in zip(f, prompts)])  # [prompt, d_sae]
            during = torch.stack([fi[: p.n_opening].max(0).values for fi, p in zip(f, prompts)])
            reference[h] = np.flatnonzero((after > 0).any(0).numpy())
            later = torch.cat([fi[p.n_opening:] for fi, p in zip(f, prompts)])  # every position after the opening
            norms = saes[h].W_dec.norm(dim=-1)
            fires = (later > 0).double()
            ref_freq[h] = fires.mean(0).numpy()
            ref_size[h] = np.nan_to_num(((later.clamp(min=0) * norms).double().sum(0) / fires.sum(0)).numpy())
            opening_only[h] = np.flatnonzero(((during > 0).any(0) & ~(after > 0).any(0)).numpy())
            off = space.offset(h)
            drop[off : off + D_SAE] = HOOK_WEIGHT[h] * after.clamp(min=0).mean(0).numpy()
    return space, active, reference, opening_only, drop, stats, (ref_freq, ref_size)


def test_active_features_are_those_firing_after_the_opening(control_space):
    """``feature_stats`` lists, per hook, exactly the features the reference finds firing somewhere after
    the opening; about half the features never do, and the feature firing only in the opening is left out. Its
    firing frequencies and edit sizes equal the reference's (each prompt alone through ``run_with_cache``)."""
    space, active, reference, opening_only, _, stats, (ref_freq, ref_size) = control_space
    for h in space.hooks:
        np.testing.assert_allclose(stats.frequency[h], ref_freq[h], atol=1e-6)
        np.testing.assert_allclose(stats.size[h], ref_size[h], rtol=1e-3, atol=1e-5)
    for h in space.hooks:
        assert np.array_equal(np.sort(active[h]), reference[h]), h
        assert 0.2 * D_SAE <= len(active[h]) <= 0.8 * D_SAE, (h, len(active[h]))
        assert D_SAE - 1 in opening_only[h] and D_SAE - 1 not in active[h]  # it fires, but only in the opening


def _control_circuit(space, active, rng, per_hook=(3, 1, 2)):
    """A circuit of random active features, ``per_hook`` of them on each hook (the null: a random active set)."""
    return [space.offset(h) + int(j) for h, k in zip(space.hooks, per_hook) for j in rng.choice(active[h], k, replace=False)]


def _per_hook(space, features):
    return {h: sorted(v) for h, v in space.by_hook(features).items()}


def test_matched_random_sets_match_per_hook_counts_and_come_from_active_features_outside_the_circuit(control_space):
    """2,000 draws of ``matched_random`` for one circuit (3, 1 and 2 features on the three hooks, the strongest
    active features among them): every draw has the circuit's count on each hook, no repeated feature, only
    features the reference finds active, never one of the circuit's; every active feature outside the circuit
    is drawn (the pool is the whole active set). A hook with too few active features outside the circuit
    falls back to all of its features, still never the circuit's own."""
    from refusal_lens.stages.circuits.controls import matched_random

    space, active, reference, _, drop, stats, _ = control_space
    rng = np.random.default_rng(30)
    circuit = _control_circuit(space, reference, rng)
    circuit[0] = int(np.argmax(drop[: D_SAE]))  # the strongest feature of the first hook is in the circuit
    circuit = list(dict.fromkeys(circuit))
    want = {h: len(v) for h, v in space.by_hook(circuit).items()}
    seen = set()
    for _ in range(2000):
        draw = matched_random(space, circuit, active, rng)
        assert len(set(draw)) == len(draw) and not set(draw) & set(circuit), draw
        got = _per_hook(space, draw)
        assert {h: len(v) for h, v in got.items()} == want, got
        for h, local in got.items():
            assert set(local) <= set(reference[h].tolist()), (h, sorted(set(local) - set(reference[h].tolist())))
        seen.update(draw)
    eligible = {space.offset(h) + int(j) for h in want for j in reference[h]} - set(circuit)
    assert seen == eligible
    # fallback: the circuit holds every active feature of the last hook but one; it asks for two there
    h = space.hooks[-1]
    crowded = [space.offset(h) + int(j) for j in reference[h][1:]]
    for _ in range(200):
        draw = matched_random(space, crowded, active, rng)
        assert len(draw) == len(crowded) and not set(draw) & set(crowded)
        assert all(space.locate(i)[0] == h for i in draw)


def test_matched_random_by_stats_draws_features_like_the_circuits(control_space):
    """With ``stats``, each control feature is one of the 10 active features nearest to its circuit feature in
    (log firing frequency, log edit size): 500 draws for a circuit of strong and weak features are much closer
    to the circuit in those terms than unmatched draws, and keep the per-hook counts and exclusions."""
    from refusal_lens.stages.circuits.controls import _log_stats, matched_random

    space, active, reference, _, drop, stats, _ = control_space
    rng = np.random.default_rng(31)
    circuit = _control_circuit(space, reference, rng)
    want = {h: len(v) for h, v in space.by_hook(circuit).items()}

    def distance(draw) -> float:
        total = 0.0
        for h in want:
            key = _log_stats(stats, h)
            mine, theirs = sorted(space.by_hook(circuit)[h]), space.by_hook(draw)[h]
            total += sum(np.abs(key[theirs] - key[j]).sum(1).min() for j in mine)
        return total

    matched, plain = [], []
    for _ in range(500):
        draw = matched_random(space, circuit, active, rng, stats)
        assert len(set(draw)) == len(draw) and not set(draw) & set(circuit)
        assert {h: len(v) for h, v in space.by_hook(draw).items()} == want
        assert all(space.locate(i)[1] in set(active[space.locate(i)[0]].tolist()) for i in draw)
        matched.append(distance(draw))
        plain.append(distance(matched_random(space, circuit, active, rng)))
    print(f"distance to the circuit in (log frequency, log size): matched {np.mean(matched):.3f}, "
          f"unmatched {np.mean(plain):.3f}")
    assert np.mean(matched) < 0.8 * np.mean(plain)  # measured: 7.3 against 11.8


def test_behaviour_pvalue_of_a_random_set_is_uniform(control_space):
    """The null of the circuits' random-control p-value: a "circuit" that is itself a random set of active
    features (3, 1 and 2 on the three hooks), its behaviour (refusal score left = 1 - the summed drops of its
    features) against 20 sets drawn by ``matched_random`` from the active features (1,000 repetitions, the
    p-value by ``control_summary`` as the stage computes it): uniform on {1/21, ..., 1} (KS on that grid),
    P(p <= 0.05) <= 0.05 + 0.02. Power: controls drawn from every feature (``matched_random`` with all features
    as the pool, as an active-blind sampler would) give non-uniform p-values, and a planted strong circuit
    (the strongest active features) gets the smallest p, 1/21. Controls matched on firing frequency and edit size
    (``stats``, as the stage draws them) compare the circuit with features like its own; here the behaviour is a
    function of those very stats, so the null p-values pile up in the middle (not uniform) and the test is
    conservative: P(p <= 0.05) <= 0.05 (measured 0.029)."""
    from refusal_lens.core.behaviour import control_summary
    from refusal_lens.stages.circuits.controls import matched_random

    space, active, reference, _, drop, stats, _ = control_space
    rng = np.random.default_rng(21)
    everything = {h: np.arange(space.d_sae(h)) for h in space.hooks}
    grid = np.arange(1, 22) / 21

    def left(features):
        return 1.0 - float(drop[list(features)].sum())

    def pvalue(circuit, pool):
        controls = [left(matched_random(space, circuit, pool, rng)) for _ in range(20)]
        return control_summary(left(circuit), controls, "less")["p_value"]

    def pvalue_stats(circuit):
        controls = [left(matched_random(space, circuit, active, rng, stats)) for _ in range(20)]
        return control_summary(left(circuit), controls, "less")["p_value"]

    matched, blind, by_stats = [], [], []
    for _ in range(1000):
        circuit = _control_circuit(space, reference, rng)
        matched.append(pvalue(circuit, active))
        blind.append(pvalue(circuit, everything))
        by_stats.append(pvalue_stats(circuit))
    d_s, p_s = ks_uniform(by_stats, grid=grid)
    low_s = np.mean(np.array(by_stats) <= 0.05)
    print(f"random-set p-values against controls matched on frequency and edit size: KS D {d_s:.4f} p {p_s:.3f}; "
          f"P(p <= 0.05) {low_s:.3f}")
    assert low_s <= 0.05, low_s
    d, p = ks_uniform(matched, grid=grid)
    low = np.mean(np.array(matched) <= 0.05)
    print(f"random-set p-values against matched_random controls: KS D {d:.4f} p {p:.3f}; P(p <= 0.05) {low:.3f}; "
          f"controls from every feature: KS p {ks_uniform(blind, grid=grid)[1]:.2g}")
    # 0.01, not 0.05: drawing outside the circuit makes the null slightly anti-conservative on pools this small
    # (about 50 active features a hook): P(p <= 1/21) 0.052-0.057 in 4,000 repetitions, against 0.048-0.050
    # for controls drawn from every active feature
    assert p > 0.01, (d, p)
    assert low <= 0.05 + 0.02
    assert ks_uniform(blind, grid=grid)[1] < 0.01  # the check has power against an active-blind sampler
    strong = [space.offset(h) + int(j) for h, k in zip(space.hooks, (3, 1, 2))
              for j in np.argsort(-drop[space.offset(h) : space.offset(h) + D_SAE])[:k]]
    assert all(pvalue(strong, active) == pytest.approx(1 / 21) for _ in range(20))


def test_kolmogorov_distribution_and_ks_statistic():
    assert kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=1e-4)
    assert kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=1e-4)
    assert kolmogorov_sf(1.2238) == pytest.approx(0.10, abs=1e-4)
    assert kolmogorov_sf(0.1) == 1.0
    n = 200
    d, p = ks_uniform((np.arange(n) + 0.5) / n)
    assert d == pytest.approx(0.5 / n) and p == 1.0
    rng = np.random.default_rng(22)
    assert ks_uniform(rng.random(500))[1] > 0.05
    assert ks_uniform(rng.random(500) ** 1.5)[1] < 1e-3
