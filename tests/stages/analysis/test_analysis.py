"""The analysis stage's own numbers: per-site effects, the similarity tables with BH, the evidence summary."""

import numpy as np
import pytest
import torch

from refusal_lens.stages.analysis.similarity import per_site_effects, similarity_tables, verdict_counts
from refusal_lens.report.numbers import fmt_rate
from refusal_lens.stages.analysis.evidence import headline_table


def test_per_site_effects_divide_the_content_class_by_its_tokens():
    feats = torch.tensor([[[4.0, 2.0], [1.0, 1.0]], [[9.0, 3.0], [0.5, 0.0]]])  # [prompts, classes, features]
    out = per_site_effects(feats, [2, 3])
    np.testing.assert_allclose(out, [[2.0, 1.0, 1.0, 1.0], [3.0, 1.0, 0.5, 0.0]])


def _groups(rng, n, nodes, mean):
    return mean + rng.normal(size=(n, nodes))


def test_similarity_tables_separate_shared_from_distinct_mechanisms_and_mark_small_groups():
    rng = np.random.default_rng(0)
    nodes = 400
    shared = np.zeros(nodes)
    shared[:40] = 3.0
    other = np.zeros(nodes)
    other[200:240] = 3.0
    effects = {"toxic/a": _groups(rng, 30, nodes, shared), "toxic/b": _groups(rng, 30, nodes, shared),
               "toxic/c": _groups(rng, 30, nodes, other), "toxic/d": _groups(rng, 4, nodes, shared),
               "toxic/all": _groups(rng, 60, nodes, shared), "safe/all": _groups(rng, 30, nodes, other)}
    rows = similarity_tables(effects, ["a", "b", "c", "d"], alpha=0.05, min_prompts=10, shared_margin=0.8,
                             permutations=200, draws=1000, seed=0)
    by = {(r["a"], r["b"]): r for r in rows}
    assert by[("toxic/a", "toxic/b")]["verdict"] == "shared"
    assert by[("toxic/a", "toxic/c")]["verdict"] == "distinct" and by[("toxic/b", "toxic/c")]["verdict"] == "distinct"
    assert by[("toxic/a", "toxic/d")]["verdict"] == "insufficient"
    assert by[("safe/all", "toxic/all")]["table"] == "pooled safe x toxic"
    assert by[("safe/all", "toxic/all")]["verdict"] == "distinct"
    q = [r["q_value"] for r in rows if r["table"] == "toxic x toxic" and r["q_value"] is not None]
    p = [r["p_value"] for r in rows if r["table"] == "toxic x toxic" and r["q_value"] is not None]
    assert all(qi >= pi for qi, pi in zip(q, p))  # BH never lowers a p-value
    counts = verdict_counts(rows)
    assert counts["toxic x toxic"]["insufficient"] == 3 and counts["toxic x toxic"]["shared"] == 1


def test_rates_are_printed_with_their_interval_and_n():
    assert fmt_rate({"n": 15, "refusal_rate": 0.2, "ci": [0.07, 0.45]}) == "20% [7%, 45%] (n=15)"
    assert fmt_rate({"n": 0, "refusal_rate": None, "ci": [None, None]}) == "- (n=0)"


def test_headline_table_states_underpowered_entries():
    rate = {"n": 5, "refusal_rate": 1.0, "ci": [0.5, 1.0], "incoherent_rate": 0.0}
    summary = {
        "data": {"score_auroc": {"test": {"auroc": 0.95, "n_refused": 5, "n_complied": 9}},
                 "refusal_test": {"toxic": {"n": 9, "k": 5, "rate": 5 / 9, "ci": [0.27, 0.81]}}},
        "direction": {"direction": {"hook": "blocks.3.hook_resid_pre", "position": -1},
                      "harmful_refused": {"clean": rate, "ablated": rate, "actadd_minus": rate},
                      "harmless": {"clean": rate, "actadd_plus": rate}, "random_ablated": {"n": 0},
                      "kl_harmless": {"mean": None}},
        "similarity": {"verdicts": {"toxic x toxic": {"insufficient": 3}}},
        "underpowered": ["circuit behaviour: insufficient: 5 test prompts, below the power floor of 10"],
    }
    table = headline_table(summary)
    assert table["refusal score vs judge (test)"].startswith("AUROC 0.950")
    assert "insufficient" in table["underpowered"] and table["circuit similarity verdicts"] == "toxic x toxic: 3 insufficient"
    with pytest.raises(KeyError):
        headline_table({})


def test_the_false_refusal_site_table_names_how_the_toxic_kept_rule_measured_keeping():
    """The report's chosen-site table says whether the toxic-kept choice kept correct refusal by judged answers
    (direction.false_refusal_keep_by = generation) or by the refusal score (score; older runs have no keep_by)."""
    from refusal_lens.stages.analysis.sections import false_refusal_tables

    site = {"layer": 7, "position": -5, "bypass": -0.6, "kl": 0.03, "cosine_with_r": 0.5}
    rate = {"refusal_rate": 0.5, "ci": [0.2, 0.8], "incoherent_rate": 0.0}
    for keep_by, words in (("generation", "answers judged refused"), ("score", "refusal score > 0"),
                           (None, "refusal score > 0")):
        kept = {**site, "toxic_kept": 1.0, "n_toxic_validation": 7, **({"keep_by": keep_by} if keep_by else {})}
        false = {"conditions": {"w'(lambda=1)": {"safe_refused": rate, "toxic_refused": rate}}, "controls": {},
                 "chosen": {"1": site}, "chosen_keeping_toxic": kept, "lambda": 1.0, "headline": "w'(lambda=1)",
                 "n_test": {"safe_refused": 6, "toxic_refused": 14}}
        chosen = false_refusal_tables(false, {})[-1]
        label = chosen.rows[-1]["lambda"]
        assert label == f"1, toxic kept (100% of 7 refused toxic validation prompts: {words})", label
