"""The analysis numbers on hand-made effects: emergence, verdicts, bootstrap intervals."""

import numpy as np
import pytest

from refusal_lens.analysis.metrics import bootstrap_similarity, emergence, layer_profile, similarity, verdict


def test_layer_profile_and_emergence():
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]
    sizes = [3, 3, 3]  # two features + the error node each
    mean = np.array([0.1, -0.1, 0.0, 1.0, -1.0, 2.0, 0.5, 0.0, 0.3])
    prof = layer_profile(mean, hooks, sizes)
    assert [p["total_abs"] for p in prof] == pytest.approx([0.2, 4.0, 0.8])
    assert prof[1]["error_share"] == pytest.approx(0.5) and prof[1]["top_abs"] == pytest.approx(2.0)
    assert prof[1]["signed"] == pytest.approx(2.0)
    e = emergence(prof, 0.5)
    assert e["hook"] == hooks[1] and e["cumulative"] == pytest.approx([0.2 / 5, 4.2 / 5, 1.0])
    assert emergence(prof, 0.03)["hook"] == hooks[0]
    assert emergence(layer_profile(np.zeros(9), hooks, sizes), 0.5)["hook"] is None


def test_verdict_thresholds():
    kw = dict(alpha=0.05, monolithic=0.5, partial=0.2, min_prompts=2)
    assert verdict(0.7, 0.01, 5, 5, **kw) == "monolithic"
    assert verdict(0.3, 0.01, 5, 5, **kw) == "partially modular"
    assert verdict(0.7, 0.2, 5, 5, **kw) == "modular"  # not above chance
    assert verdict(0.1, 0.01, 5, 5, **kw) == "modular"
    assert verdict(0.9, 0.01, 1, 5, **kw) == "insufficient"


def test_bootstrap_similarity_is_tight_for_identical_groups_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    base = rng.normal(size=200) * (rng.random(200) < 0.2)
    ea = base + 0.05 * rng.normal(size=(30, 200))
    eb = base + 0.05 * rng.normal(size=(30, 200))
    lo, hi = bootstrap_similarity(ea, eb, 20, 200, np.random.default_rng(1))
    s = similarity(ea.mean(0), eb.mean(0), 20)
    assert 0.5 < lo <= hi <= 1.0
    assert lo - 0.05 <= s <= hi + 0.05
    other = rng.normal(size=(30, 200)) * (rng.random(200) < 0.2)
    lo2, hi2 = bootstrap_similarity(ea, other, 20, 200, np.random.default_rng(1))
    assert hi2 < lo
