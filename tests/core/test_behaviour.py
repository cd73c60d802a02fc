"""The share of the direction's effect and its paired bootstrap interval: exact small cases, a weak
reference, coverage on simulated prompts with a known share, pairing through the response audit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refusal_lens.core.behaviour import Condition, chunks, fraction_interval, fraction_of, paired_fraction_interval, refused_by_prompt
from refusal_lens.report.numbers import fmt_share, share_note


def test_exact_cases():
    ones, zeros = [1] * 10, [0] * 10
    assert fraction_of(1.0, 0.0, 0.0) == 1.0
    assert fraction_of(1.0, 0.5, 1.0) is None
    # every resample: the condition removes all the reference removes -> exactly 1
    assert fraction_interval(ones, zeros, zeros, draws=500) == (1.0, 1.0)
    # the condition removes nothing -> exactly 0
    assert fraction_interval(ones, ones, zeros, draws=500) == (0.0, 0.0)
    # the condition removes every refusal, the reference half of them: share 1 / (reference's removal) >= 1,
    # 2 at the point estimate; a resample without any of the reference's removals (p = 2^-10) is rare
    lo, hi = fraction_interval(ones, zeros, [0, 1] * 5, draws=2000)
    assert lo is not None and hi is not None and 1.0 <= lo < 2.0 < hi


def test_weak_reference_is_unbounded():
    # the reference removes one refusal of three: a third of resamples miss that prompt -> infinite shares
    lo, hi = fraction_interval([1, 1, 1], [0, 0, 1], [0, 1, 1], draws=4000, seed=1)
    assert hi is None
    assert lo is not None and lo >= 0.0
    # a reference that removes nothing anywhere: every resample with an effect is infinite
    assert fraction_interval([1, 1], [0, 1], [1, 1], draws=200) == (None, None)


def test_mismatched_lengths_fail():
    with pytest.raises(ValueError, match="same prompts"):
        fraction_interval([1, 1], [0], [0, 0])


def test_coverage_on_simulated_prompts():
    """Prompts refused clean; the reference removes refusal with p=0.8, the condition with p=0.4 on the same
    prompts (nested: the condition's removals are a subset): true share 0.5. The 95% interval covers it in
    about 95% of studies of 200 prompts."""
    rng = np.random.default_rng(0)
    covered, studies = 0, 200
    for s in range(studies):
        u = rng.random(200)
        clean = np.ones(200)
        reference = (u >= 0.8).astype(float)
        condition = (u >= 0.4).astype(float)
        lo, hi = fraction_interval(clean, condition, reference, draws=1000, seed=s)
        covered += lo is not None and hi is not None and lo <= 0.5 <= hi
    assert 0.90 <= covered / studies <= 0.99


def test_pairing_through_the_audit(tmp_path):
    path = tmp_path / "responses.jsonl"
    rows = []
    for i in range(6):
        rows.append({"condition": "clean", "prompt_id": f"p{i}", "outcome": "refused"})
    # written in another order, one prompt missing from the condition, one incoherent (not refused)
    for i in reversed(range(5)):
        rows.append({"condition": "circuit", "prompt_id": f"p{i}", "outcome": "incoherent" if i == 0 else "refused"})
    for i in range(6):
        rows.append({"condition": "direction", "prompt_id": f"p{i}", "outcome": "complied"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = refused_by_prompt(path, ["clean", "circuit"])
    assert got["circuit"] == {"p0": 0, "p1": 1, "p2": 1, "p3": 1, "p4": 1}
    out = paired_fraction_interval(path, "clean", "circuit", "direction", draws=3000)
    assert out["n"] == 5  # p5 is not in every condition
    lo, hi = out["ci"]
    assert 0.0 <= lo <= 0.2 <= hi <= 1.0  # point share 1/5
    assert paired_fraction_interval(path, "clean", "nothing", "direction") is None


def test_formatting():
    assert fmt_share(1.12, [0.98, 1.3]) == "112% [98%, 130%]"
    assert fmt_share(4.67, [1.5, None]) == "467% [150%, unbounded]"
    assert fmt_share(None) == "- (the reference removed nothing)"
    assert "more refusal than the direction" in share_note(4.67)
    assert share_note(0.9) == ""


def test_chunks_fill_a_generation_batch_and_keep_every_condition_once_in_order():
    def cond(name, n):
        return Condition(name, [None] * n, [str(i) for i in range(n)], [], {})

    cs = [cond("a", 6), cond("b", 6), cond("c", 15), cond("d", 40), cond("e", 80), cond("f", 1)]
    got = chunks(cs, 64)
    assert [[c.name for c in ch] for ch in got] == [["a", "b", "c", "d"], ["e"], ["f"]]
    assert chunks([], 64) == [] and [len(ch) for ch in chunks(cs, 1)] == [1] * 6


def test_scored_controls_exact_on_a_fake_model_and_calibrated_on_null_scores():
    """scored_controls on a fake intervener whose refusal score under an edit is a known number: the headline's mean
    score, each control's, the empirical p of a lower score, and the Spearman correlation with the generated rates
    (exact); on exchangeable null scores the p is uniform (its false-positive rate ~ alpha)."""
    import torch

    from refusal_lens.core.behaviour import scored_controls
    from refusal_lens.core.refusal import RefusalTokens

    class Fake:  # logits [n_prompts, 2]: token 0 is the refusal token; an edit is (offset,), its score = offset + prompt
        def last_logits(self, prompts, edits, stems=None):
            offset = edits[0] if edits else 0.0
            return torch.stack([torch.tensor([offset + p, 0.0]) for p in prompts])

    tokens = RefusalTokens((0,), ("I",), "family")
    prompts = [0.0, 1.0, 2.0]  # mean prompt term 1.0
    out = scored_controls(Fake(), prompts, tokens, [-2.0], [[0.5], [-3.0], [1.5], [2.0]], generated=[0.6, 0.1, 0.8])
    # refusal score = logit(R) - logit(other) = offset + p; means: headline -1, controls 1.5, -2, 2.5, 3
    assert out["headline_mean_score"] == pytest.approx(-1.0)
    assert out["values"] == pytest.approx([1.5, -2.0, 2.5, 3.0])
    assert out["p_value"] == pytest.approx(2 / 5)  # (1 + one control <= -1) / (1 + 4)
    assert out["calibration"]["spearman_rate_vs_score"] == pytest.approx(1.0)  # rates rank as the scores do
    assert out["calibration"]["p_score_on_generated"] == pytest.approx(2 / 4)
    # scores already read from generations: the same record, and no pass for the known ones (a Fake that counts)
    calls = []

    class Counting(Fake):
        def last_logits(self, prompts, edits, stems=None):
            calls.append(edits)
            return super().last_logits(prompts, edits)

    known = scored_controls(Counting(), prompts, tokens, [-2.0], [[0.5], [-3.0], [1.5], [2.0]],
                            generated=[0.6, 0.1, 0.8], known=[[0.5, 1.5, 2.5], [-3.0, -2.0, -1.0]],
                            known_headline=[-2.0, -1.0, 0.0])
    assert calls == [[1.5], [2.0]]  # only the two controls without known scores ran
    assert known["from_generation"] == 3 and out["from_generation"] == 0
    assert {k: v for k, v in known.items() if k != "from_generation"} == \
        {k: v for k, v in out.items() if k != "from_generation"}
    wrong = scored_controls(Fake(), prompts, tokens, [-2.0], [[0.5]], known=[[9.0, 9.0, 9.0]])
    assert wrong["values"] == pytest.approx([9.0])  # the known scores are what is used, not recomputed
    rng = np.random.default_rng(0)
    hits = {0.05: 0, 0.2: 0}
    trials = 400
    for _ in range(trials):
        null = rng.normal(size=20)
        res = scored_controls(Fake(), [0.0], tokens, [float(null[0])], [[float(v)] for v in null[1:]])
        for alpha in hits:
            hits[alpha] += res["p_value"] <= alpha
    for alpha, n in hits.items():  # binomial sd at 400 trials: ~0.011 (0.05), ~0.02 (0.2)
        assert abs(n / trials - alpha) < 0.045, (alpha, n / trials)
