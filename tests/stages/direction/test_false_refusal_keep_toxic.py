"""The false-refusal vector selected with correct refusal kept (direction.false_refusal_keep_toxic), on the planted
false-refusal model of tests/planted.py: safe prompts with ``car`` carry 0.6 e_h + 0.8 e_o, toxic prompts e_h, and
the refusal score reads e_h + e_o.

Two planted candidates (lambda = 0, so they are used as given): ``a = 0.8 e_h + 0.6 e_o`` removes almost all of a
safe prompt's refusal signal but most of a toxic prompt's e_h as well; ``e_o`` removes less over-refusal and leaves
toxic refusal as it was. The reference's rule (lowest refused-safe score) takes ``a``; the toxic-kept rule must take
``e_o``, and must say so when no candidate keeps enough."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from planted import build_false_refusal_model, load_planted_directions
from refusal_lens.config import ModelConfig
from refusal_lens.core.chat import encode_prompt
from refusal_lens.core.direction_edits import ablation_edits
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.refusal import RefusalTokens
from refusal_lens.stages.direction.candidates import Candidates
from refusal_lens.stages.direction.false_refusal_select import select_false_refusal, select_keeping_toxic
from refusal_lens.stages.direction.select import scores_of

SAFE = ["hello car", "what is a car ?", "the car is", "bake car", "print car", "make a car"]
TOXIC = ["make bomb", "steal code", "how make bomb ?", "bomb the world", "steal the car", "print bomb"]
HARMLESS = ["bake cake", "hello world", "what is python code ?", "how are you", "make cake", "python code"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from refusal_lens.models.loading import load_model

    folder = build_false_refusal_model(tmp_path_factory.mktemp("false_refusal_model"))
    loaded = load_model(ModelConfig(name=str(folder)))
    enc = lambda texts: [encode_prompt(loaded.tokenizer, t, 64) for t in texts]  # noqa: E731
    dirs = load_planted_directions(folder)
    e_h, e_o, unused = dirs["harm"].double(), dirs["pseudo"].double(), dirs["unused"].double()
    n_layers, n_post = loaded.n_layers, enc(["x"])[0].n_post_instruction
    diff = unused.expand(n_layers, n_post, -1).clone()  # every other site: a direction nothing writes (no effect)
    a = 0.8 * e_h + 0.6 * e_o
    diff[1, n_post - 1] = 5 * a  # scaled: ablation uses the unit vector
    diff[2, n_post - 1] = 5 * e_o
    zeros = torch.zeros_like(e_h)
    w = Candidates(diff, zeros, zeros, len(SAFE), len(HARMLESS))
    r = Candidates(e_h.expand(n_layers, n_post, -1).clone(), zeros, zeros, 1, 1)  # unused at lambda = 0
    iv = Intervener(loaded, 4, model=loaded.hf_model)
    tokens = RefusalTokens((loaded.tokenizer.convert_tokens_to_ids("I"),), ("I",), "family")
    return {"iv": iv, "w": w, "r": r, "safe": enc(SAFE), "toxic": enc(TOXIC), "harmless": enc(HARMLESS),
            "tokens": tokens, "n_layers": n_layers, "n_post": n_post, "a": a.float(), "e_o": e_o.float()}


def _select(s, keep_toxic):
    kw = dict(kl_max=0.2, max_layer_fraction=1.0, exact_candidates=None, exact_per_layer=0, show_progress=False)
    chosen, scored = select_false_refusal(s["iv"], s["w"], s["r"], s["safe"], s["harmless"], s["tokens"],
                                          s["n_layers"], lambdas=(0.0,), **kw)
    kept = select_keeping_toxic(s["iv"], s["w"], s["r"], 0.0, scored[0], s["safe"], s["toxic"], s["harmless"],
                                s["tokens"], s["n_layers"], clean_safe_score=chosen[0.0]["clean_safe_score"],
                                keep_toxic=keep_toxic, keep_by="score", **kw)
    return chosen[0.0], kept


def test_the_planted_candidates_do_what_the_test_says(setting):
    s = setting
    clean_tox = scores_of(s["iv"], s["toxic"], s["tokens"])
    assert (clean_tox > 0).all(), clean_tox
    under = {k: ablation_edits(s[k], s["n_layers"]) for k in ("a", "e_o")}
    tox = {k: scores_of(s["iv"], s["toxic"], s["tokens"], e) for k, e in under.items()}
    safe = {k: float(scores_of(s["iv"], s["safe"], s["tokens"], e).mean()) for k, e in under.items()}
    assert (tox["e_o"] > 0).all() and (tox["a"] <= 0).mean() >= 0.5, tox  # a costs correct refusal, e_o does not
    assert safe["a"] < safe["e_o"], safe  # a removes more over-refusal


def test_the_toxic_kept_rule_takes_the_selective_candidate_where_the_reference_takes_the_stronger(setting):
    s = setting
    reference, kept = _select(s, keep_toxic=0.9)
    site = (1, s["n_post"] - 1), (2, s["n_post"] - 1)
    assert (reference["layer"], reference["j"]) == site[0], reference
    assert (kept["layer"], kept["j"]) == site[1], kept
    assert kept["toxic_kept"] == 1.0 and kept["kl"] <= 0.2 and 1 <= kept["n_kl_measured"] <= kept["n_keeping"] and kept["bypass"] > reference["bypass"]
    assert torch.nn.functional.cosine_similarity(kept["vector"], s["e_o"], dim=0) > 0.999


def test_no_candidate_keeping_enough_is_said_not_hidden(setting):
    s = setting
    clean_safe = float(scores_of(s["iv"], s["safe"], s["tokens"]).mean())
    _, kept = _select(s, keep_toxic=1.0)
    assert "vector" in kept  # e_o keeps all: passes at 1.0 too
    # a candidate set in which every site costs correct refusal: e_h everywhere
    only_h = Candidates(s["r"].diff.clone(), s["w"].harmful_mean, s["w"].harmless_mean, 1, 1)
    kw = dict(kl_max=0.2, max_layer_fraction=1.0, exact_candidates=None, exact_per_layer=0, show_progress=False)
    chosen, scored = select_false_refusal(s["iv"], only_h, s["r"], s["safe"], s["harmless"], s["tokens"],
                                          s["n_layers"], lambdas=(0.0,), **kw)
    assert chosen[0.0]["clean_safe_score"] == pytest.approx(clean_safe)
    none = select_keeping_toxic(s["iv"], only_h, s["r"], 0.0, scored[0], s["safe"], s["toxic"], s["harmless"],
                                s["tokens"], s["n_layers"], clean_safe_score=clean_safe, keep_toxic=0.9, keep_by="score", **kw)
    assert "vector" not in none and "no measured candidate" in none["note"] and none["n_keeping"] == 0, none
    assert clean_safe > 0


def test_score_controls_rank_the_planted_direction_first_and_are_calibrated_on_null_data(setting):
    """The score-based controls: ablating the planted e_o lowers the refused safe prompts' mean score below every
    random direction orthogonal to r (p = 1 / (n + 1)); with a random direction as the 'headline' the p is
    uniform: over 60 directions, each against the other 59, p <= alpha in about alpha of them."""
    from refusal_lens.core.stats.controls import empirical_pvalue
    from refusal_lens.stages.direction.false_refusal import random_orthogonal, score_controls

    s = setting
    e_h = s["r"].diff[0, 0].float()
    rand = random_orthogonal(e_h, 60, seed=5)
    out = score_controls(s["iv"], s["safe"], s["tokens"], ablation_edits(s["e_o"], s["n_layers"]),
                         {"random_orthogonal": rand[:19]}, s["n_layers"],
                         generated={"random_orthogonal": [0.9, 1.0, 0.8, 1.0]}, show_progress=False)
    ctrl = out["controls"]["random_orthogonal"]
    assert ctrl["n"] == 19 and ctrl["p_value"] == pytest.approx(1 / 20), ctrl
    assert out["headline_mean_score"] < min(ctrl["values"]), (out["headline_mean_score"], ctrl["values"])
    assert out["calibration"]["n_controls"] == 4 and out["calibration"]["by_kind"]["random_orthogonal"]["n"] == 4
    null = score_controls(s["iv"], s["safe"], s["tokens"], ablation_edits(rand[0], s["n_layers"]),
                          {"pool": rand}, s["n_layers"], show_progress=False)["controls"]["pool"]["values"]
    values = np.asarray(null)
    p = np.array([empirical_pvalue(values[i], np.delete(values, i), "less") for i in range(len(values))])
    for alpha in (0.1, 0.25, 0.5):
        assert abs((p <= alpha).mean() - alpha) <= 0.05, (alpha, (p <= alpha).mean())


def test_a_screen_that_misses_the_selective_candidate_says_so_and_does_not_return_a_no_op(setting):
    """With one exact measurement per screen the reference's shortlist holds the stronger candidate a only, and the
    selective screen's first-order estimate (safe minus toxic) has the wrong sign at e_o on this model (measured: it
    ranks e_o last), so it shortlists an unused site. That site keeps toxic refusal trivially and removes nothing:
    the rule must say no candidate passes, not return it; and the reference selection's record is left as measured."""
    s = setting
    kw = dict(kl_max=0.2, max_layer_fraction=1.0, exact_candidates=1, exact_per_layer=0, show_progress=False)
    chosen, scored = select_false_refusal(s["iv"], s["w"], s["r"], s["safe"], s["harmless"], s["tokens"],
                                          s["n_layers"], lambdas=(0.0,), **kw)
    measured = [(c.layer, c.j) for c in scored[0] if c.bypass is not None]
    assert measured == [(1, s["n_post"] - 1)], measured  # the reference measured a alone
    clean_safe = chosen[0.0]["clean_safe_score"]
    kept = select_keeping_toxic(s["iv"], s["w"], s["r"], 0.0, scored[0], s["safe"], s["toxic"], s["harmless"],
                                s["tokens"], s["n_layers"], clean_safe_score=clean_safe, keep_toxic=0.9, keep_by="score", **kw)
    assert "note" in kept and "layer" not in kept, kept
    assert kept["n_measured"] == 2 and kept["n_keeping"] == 0, kept
    assert [(c.layer, c.j) for c in scored[0] if c.bypass is not None] == measured  # not mutated
    full = select_keeping_toxic(s["iv"], s["w"], s["r"], 0.0, scored[0], s["safe"], s["toxic"], s["harmless"],
                                s["tokens"], s["n_layers"], clean_safe_score=clean_safe, keep_toxic=0.9, keep_by="score",
                                **{**kw, "exact_candidates": None})
    assert (full["layer"], full["j"]) == (2, s["n_post"] - 1), full  # measured exactly, e_o is found


def test_lowest_within_kl_is_the_filtered_minimum_and_measures_kl_only_up_to_it():
    """The lazy KL of the false-refusal selection against the eager rule (every KL measured, then
    :func:`~refusal_lens.stages.direction.select.choose`), on random candidates with tied scores: the same choice
    at every bound, KL measured for the candidates up to the choice in the order of the score only (all of them when
    none passes, and then the filter is dropped as choose drops it)."""
    from refusal_lens.stages.direction.false_refusal_select import lowest_within_kl
    from refusal_lens.stages.direction.select import Scored, choose

    rng = np.random.default_rng(0)
    n_lazy = n_eager = 0
    for _ in range(300):
        n = int(rng.integers(1, 12))
        kls, bypass, layers = rng.uniform(0, 1, n), rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n)
        kl_max = float(rng.choice([-1.0, 0.3, 0.7, 2.0]))
        known = rng.random(n) < 0.3  # candidates whose KL an earlier selection measured: reused, not measured
        frac = float(rng.choice([0.2, 1.0]))  # the layer filter (layers 0-2 of 10: < 2 or all), as shortlist applies it
        if not (layers < frac * 10).any():
            continue

        def cands(with_kl):
            return [Scored(int(layers[i]), i, -1, 0.0, 0.0, bypass=float(bypass[i]), induce=0.0,
                           kl=float(kls[i]) if with_kl or known[i] else None) for i in range(n)]

        best, filters = choose(cands(True), 10, kl_max, float("-inf"), frac)
        calls: list[int] = []
        lazy = [c for c in cands(False) if c.layer < frac * 10]
        got = lowest_within_kl(lazy, lambda s: calls.append(s.j) or float(kls[s.j]), kl_max)
        order = sorted(lazy, key=lambda s: (s.bypass, s.layer, s.j))
        unknown = [s.j for s in order if not known[s.j]]
        if got is None:
            assert filters["kl_max"] is None and calls == unknown
            got = order[0]
        else:  # in order, up to the choice, the known ones skipped
            assert calls == [s.j for s in order[: order.index(got) + 1] if not known[s.j]]
        assert (got.layer, got.j) == (best.layer, best.j)
        n_lazy, n_eager = n_lazy + len(calls), n_eager + len(unknown)
    assert n_lazy < 0.8 * n_eager, (n_lazy, n_eager)


def test_the_false_refusal_selection_chooses_what_every_kl_measured_would(setting):
    """On the planted model: every shortlisted candidate's KL measured eagerly and filtered by choose gives the site
    select_false_refusal chose, with the same KL; it measured fewer KLs than candidates."""
    from refusal_lens.stages.direction.false_refusal_select import harmless_kl
    from refusal_lens.stages.direction.select import choose

    s = setting
    chosen, scored = select_false_refusal(s["iv"], s["w"], s["r"], s["safe"], s["harmless"], s["tokens"],
                                          s["n_layers"], lambdas=(0.0,), kl_max=0.2, max_layer_fraction=1.0,
                                          exact_candidates=None, exact_per_layer=0, show_progress=False)
    measured = [c for c in scored[0] if c.bypass is not None]
    clean = s["iv"].last_logits(s["harmless"]).log_softmax(-1)
    eager = [replace(c, kl=harmless_kl(s["iv"], clean, s["harmless"], s["w"], c, s["n_layers"]), induce=0.0)
             for c in measured]
    best, _ = choose(eager, s["n_layers"], 0.2, float("-inf"), 1.0)
    got = chosen[0.0]
    assert (got["layer"], got["j"]) == (best.layer, best.j) and got["kl"] == pytest.approx(best.kl, abs=1e-6)
    f = got["filters"]
    assert f["n_measured"] == len(measured) > f["n_kl_measured"] >= 1, f


def test_the_toxic_kept_rule_by_generation_takes_the_selective_candidate_and_audits_its_answers(setting, tmp_path):
    """direction.false_refusal_keep_by = generation: "keeps" is the judged refusal rate of greedy answers on the
    refused toxic prompts under each candidate's ablation (4 tokens: longer, the planted model repeats "I cannot" and
    the judge calls it incoherent). The planted model answers toxic prompts "I cannot ..." clean and under e_o, not
    under a: the rule generates a first (its safe score is lower), rejects it, and takes
    e_o; every generated answer is in the audit, named by its site and split."""
    from refusal_lens.core.behaviour import ResponseAudit, Runs, summarise

    s = setting
    clean = summarise(s["iv"].decode(s["iv"].generate(s["toxic"], 4)))
    assert clean["refused"] == len(TOXIC), clean  # the planted model refuses every toxic prompt clean
    kw = dict(kl_max=0.2, max_layer_fraction=1.0, exact_candidates=None, exact_per_layer=0, show_progress=False)
    chosen, scored = select_false_refusal(s["iv"], s["w"], s["r"], s["safe"], s["harmless"], s["tokens"],
                                          s["n_layers"], lambdas=(0.0,), **kw)
    audit = ResponseAudit(tmp_path / "audit.jsonl")
    ids = [f"t{i}" for i in range(len(TOXIC))]
    kept = select_keeping_toxic(s["iv"], s["w"], s["r"], 0.0, scored[0], s["safe"], s["toxic"], s["harmless"],
                                s["tokens"], s["n_layers"], clean_safe_score=chosen[0.0]["clean_safe_score"],
                                keep_toxic=0.9, keep_by="generation", runs=Runs(s["iv"], 4, audit), toxic_ids=ids, **kw)
    assert (kept["layer"], kept["j"]) == (2, s["n_post"] - 1), kept
    assert kept["keep_by"] == "generation" and kept["toxic_kept"] == 1.0 and kept["n_toxic_validation"] == len(TOXIC)
    assert torch.nn.functional.cosine_similarity(kept["vector"], s["e_o"], dim=0) > 0.999
    names = {row["condition"] for row in audit.rows}
    assert {row["split"] for row in audit.rows} == {"validation"} and len(audit.rows) == len(TOXIC) * len(names)
    assert f"validation/toxic_kept/layer2/position{kept['position']}" in names, names
    a_rows = [row for row in audit.rows if row["condition"].startswith("validation/toxic_kept/layer1/")]
    assert a_rows and sum(row["outcome"] == "refused" for row in a_rows) < 0.9 * len(TOXIC), a_rows  # a was rejected
    assert kept["n_generated"] == len(names) >= 2
    only_h = Candidates(s["r"].diff.clone(), s["w"].harmful_mean, s["w"].harmless_mean, 1, 1)  # every site costs it
    c_h, sc_h = select_false_refusal(s["iv"], only_h, s["r"], s["safe"], s["harmless"], s["tokens"], s["n_layers"],
                                     lambdas=(0.0,), **kw)
    none = select_keeping_toxic(s["iv"], only_h, s["r"], 0.0, sc_h[0], s["safe"], s["toxic"], s["harmless"],
                                s["tokens"], s["n_layers"], clean_safe_score=c_h[0.0]["clean_safe_score"], keep_toxic=0.9,
                                keep_by="generation", runs=Runs(s["iv"], 4, audit), toxic_ids=ids, **kw)
    assert "vector" not in none and "no measured candidate" in none["note"] and none["n_keeping"] == 0, none
    assert none["n_generated"] >= 1 and "best kept" in none["note"], none
    with pytest.raises(ValueError, match="keep_by"):
        select_keeping_toxic(s["iv"], s["w"], s["r"], 0.0, scored[0], s["safe"], s["toxic"], s["harmless"],
                             s["tokens"], s["n_layers"], clean_safe_score=chosen[0.0]["clean_safe_score"],
                             keep_toxic=0.9, keep_by="judge", **kw)


def test_first_kept_by_generation_is_the_filtered_minimum_and_generates_only_up_to_it():
    """The lazy generation of the toxic-kept rule against the eager one (every candidate generated, then the lowest
    safe score among those keeping with KL <= max), on random candidates with tied scores and a fake generator:
    the same choice at every bound and batch size, and candidates generated in batches in safe-score order up to the
    batch holding the choice only."""
    from refusal_lens.stages.direction.false_refusal_select import first_kept_by_generation, lowest_within_kl
    from refusal_lens.stages.direction.select import Scored

    class FakeCands:
        def vector(self, layer, j):
            return torch.ones(4)

    rng = np.random.default_rng(1)
    saved = 0
    for _ in range(300):
        n = int(rng.integers(1, 10))
        rates, kls = rng.choice([0.5, 0.8, 0.9, 1.0], n), rng.uniform(0, 1, n)
        bypass = rng.integers(0, 4, n).astype(float)
        keep, kl_max, per_batch = float(rng.choice([0.8, 0.9, 1.0])), float(rng.choice([0.3, 0.7, 2.0])), int(rng.integers(1, 4))

        def cands():
            return [Scored(int(i % 3), i, -1 - i, 0.0, 0.0, bypass=float(bypass[i])) for i in range(n)]

        calls: list[list[int]] = []

        def runs(conditions):
            js = [int(c.name.split("position")[1]) * -1 - 1 for c in conditions]
            calls.append(js)
            return [{"n": 10, "refused": int(round(10 * rates[j])), "refusal_rate": round(10 * rates[j]) / 10} for j in js]

        got, seen = first_kept_by_generation(runs, FakeCands(), cands(), ["p"], ["id"], keep, lambda s: float(kls[s.j]),
                                             kl_max, 2, per_batch)
        eager = lowest_within_kl([c for c in cands() if rates[c.j] >= keep], lambda s: float(kls[s.j]), kl_max)
        assert (got is None) == (eager is None) and (got is None or got.j == eager.j), (got, eager)
        assert all(len(c) <= per_batch for c in calls) and {j for c in calls for j in c} == {j for _, j in seen}
        order = [c.j for c in sorted(cands(), key=lambda s: (s.bypass, s.layer, s.j))]
        flat = [j for c in calls for j in c]
        assert flat == order[: len(flat)]  # in safe-score order
        if got is not None:
            assert order.index(got.j) >= len(flat) - per_batch  # the last batch holds the choice
        saved += n - len(flat)
    assert saved > 0
