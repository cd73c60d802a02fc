"""Over-refusal's own features (stages/circuits/over_refusal.py): the safe-minus-toxic ranking and the verdict on
exact small cases, Newcombe's interval on the published example and in coverage, and a planted answer: in the
planted false-refusal model (w = e_o) a feature that writes only the pseudo-harmful direction e_o removes the refusal of
the safe "car" prompts and keeps the refusal of toxic ones (own features); the feature writing the refusal
direction e_h removes both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planted import build_false_refusal_model, load_planted_directions, planted_prompts
from refusal_lens.core.behaviour import ResponseAudit
from refusal_lens.core.chat import encode_prompt
from refusal_lens.core.intervene import Intervener, frozen
from refusal_lens.core.judge import is_refusal
from refusal_lens.core.stats import newcombe_difference
from refusal_lens.stages.circuits.baselines import ClassMeans
from refusal_lens.stages.circuits.nodes import NodeSpace
from refusal_lens.stages.circuits.over_refusal import over_refusal_curve, safe_minus_toxic, verdict
from refusal_lens.stages.circuits.select import Ranking


def test_safe_minus_toxic_keeps_features_promoting_safe_refusal_more_most_negative_first():
    safe = torch.tensor([-3.0, -1.0, 0.5, -2.0, -0.5])
    toxic = torch.tensor([-1.0, -3.0, -1.0, -2.5, 0.0])
    r = safe_minus_toxic(safe, toxic)
    # differences -2, 2, 1.5, 0.5, -0.5: features 0 and 4 (safe effect < 0 and difference < 0), 0 first
    assert r.features == [0, 4] and r.scores == pytest.approx([-2.0, -0.5])


def test_verdict_needs_an_interval_above_zero_or_every_interval_below_the_margin():
    def curve(*cis):
        return {k: {"selectivity": {"ci": list(ci)}} for k, ci in enumerate(cis, 1)}

    assert verdict(curve((-0.1, 0.3), (0.05, 0.6)), 12, 12, 10, 0.2) == "own features"
    assert verdict(curve((-0.1, 0.1), (-0.15, 0.19)), 12, 12, 10, 0.2) == "no selective features"
    assert verdict(curve((-0.1, 0.1), (-0.3, 0.4)), 12, 12, 10, 0.2) == "indeterminate"  # not from "not significant"
    assert verdict(curve((0.5, 0.9)), 6, 12, 10, 0.2) == "insufficient"


def test_newcombe_interval_reproduces_the_published_example_and_covers():
    # Newcombe (1998), Statistics in Medicine 17:873, Table II example (56/70 - 48/80): 0.0524 to 0.3339
    lo, hi = newcombe_difference(56, 70, 48, 80)
    assert (lo, hi) == pytest.approx((0.0524, 0.3339), abs=5e-4)
    assert all(np.isnan(newcombe_difference(1, 0, 1, 2)))
    rng = np.random.default_rng(0)
    p1, p2, n1, n2, draws = 0.8, 0.6, 15, 12, 4000
    k1, k2 = rng.binomial(n1, p1, draws), rng.binomial(n2, p2, draws)
    cover = np.mean([lo <= p1 - p2 <= hi for lo, hi in (newcombe_difference(int(a), n1, int(b), n2)
                                                          for a, b in zip(k1, k2))])
    assert 0.93 <= cover <= 0.99, cover  # nominal 0.95 (Newcombe's interval is slightly conservative)


@pytest.fixture(scope="module")
def false_refusal(tmp_path_factory):
    from refusal_lens.config import ModelConfig
    from refusal_lens.models.loading import load_model

    # w = e_o (cosine 0 with e_h): the safe "car" prompts are refused through e_o alone
    folder = build_false_refusal_model(tmp_path_factory.mktemp("over-refusal-circuit") / "model", cosine=0.0)
    loaded = load_model(ModelConfig(name=str(folder)))
    with frozen(loaded.model):
        yield folder, loaded


def test_a_planted_over_refusal_feature_removes_over_refusal_and_keeps_correct_refusal(false_refusal, tmp_path):
    from tests.stages.circuits.test_circuits import sae_from

    folder, loaded = false_refusal
    dirs = load_planted_directions(folder)
    e_h, e_o = dirs["harm"], dirs["pseudo"]
    hook, d, d_sae = "blocks.1.hook_resid_post", loaded.d_model, 16
    gen = torch.Generator().manual_seed(7)
    w_enc, w_dec = torch.randn(d, d_sae, generator=gen) / d**0.5, torch.randn(d_sae, d, generator=gen) / d**0.5
    for u in (e_h, e_o):  # the random features neither read nor write either planted direction
        w_enc -= torch.outer(u, u @ w_enc)
        w_dec -= torch.outer(w_dec @ u, u)
    w_enc[:, 0], w_dec[0], w_enc[:, 1], w_dec[1] = e_o, e_o, e_h, e_h
    b_enc = torch.full((d_sae,), -0.2)
    b_enc[:2] = 0.0
    sae = sae_from(hook, w_enc, w_dec, b_enc, torch.zeros(d))
    enc = lambda texts: [encode_prompt(loaded.tokenizer, t, 64) for t in texts]  # noqa: E731
    iv = Intervener(loaded, 8, model=loaded.hf_model)
    safe = [p for p in enc(["car car", "a car", "print car", "how car ?", "the car", "what car ?"])]
    # toxic prompts without the pseudo-harmful word (those with it carry e_o as well)
    toxic = enc([p.prompt for p in planted_prompts() if p.label == "toxic" and "car" not in p.prompt.split()][:6])
    assert all(is_refusal(t) for t in iv.decode(iv.generate(safe + toxic, 4)))  # both sides refused clean
    space = NodeSpace((hook,), {hook: sae}, safe[0].n_post_instruction)
    n_cls = space.n_post + 2
    means = ClassMeans({hook: torch.zeros(n_cls, d_sae)}, {hook: torch.zeros(n_cls, d)}, {hook: [1] * n_cls})
    rankings = {"safe_minus_toxic": Ranking("safe_minus_toxic", [0], [-1.0]),
                "attribution": Ranking("attribution", [1], [-1.0])}
    audit = ResponseAudit(tmp_path / "responses.jsonl")
    out = over_refusal_curve(iv, space, means, rankings, "zero", "all", [1],
                             (safe, [f"s{i}" for i in range(len(safe))]), (toxic, [f"t{i}" for i in range(len(toxic))]),
                             4, audit, min_prompts=6, margin=0.2, show_progress=False)
    own, dose = out["curves"]["safe_minus_toxic"]["1"], out["curves"]["attribution"]["1"]
    assert own["safe_refused"]["refusal_rate"] == 0.0 and own["toxic_refused"]["refusal_rate"] == 1.0
    assert dose["toxic_refused"]["refusal_rate"] == 0.0  # the refusal feature removes correct refusal too
    assert own["selectivity"]["estimate"] == 1.0 and own["selectivity"]["ci"][0] > 0
    assert out["verdict"] == "own features" and out["n_test"] == {"safe_refused": 6, "toxic_refused": 6}
    assert {r["condition"].rsplit("/", 1)[1] for r in audit.rows} == {"safe_refused", "toxic_refused"}
