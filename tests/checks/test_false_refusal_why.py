"""refusal_lens.checks.false_refusal_why and its geometry part on inputs with known answers (the end-to-end run on the
planted false-refusal model is in tests/stages/direction/test_direction.py)."""

import json

import numpy as np
import pytest
import torch

from refusal_lens.checks.false_refusal_geometry import cosines, geometry, separation
from refusal_lens.checks.false_refusal_why import categories, clean_dose, dose, generated_sites, refused_test_groups
from refusal_lens.core.behaviour import audit_outcomes
from refusal_lens.run.collected import Collected


def _rows(n_safe, n_toxic, seed=0):
    gen = np.random.default_rng(seed)
    rows = []
    for lab, n, shift in (("safe", n_safe, 0.0), ("toxic", n_toxic, 1.0)):
        for i in range(n):
            rows.append({"prompt_id": f"{lab}:{i}", "label": lab, "split": "test", "refused": True,
                         "category": ("hate", "illegal")[i % 2], "refusal_score": float(gen.normal(shift, 1))})
    rows.append({"prompt_id": "safe:x", "label": "safe", "split": "test", "refused": False, "category": "hate",
                 "refusal_score": 0.0})  # answered clean: not in the test groups
    rows.append({"prompt_id": "safe:v", "label": "safe", "split": "validation", "refused": True, "category": "hate",
                 "refusal_score": 0.0})  # another split
    return rows


def _groups(rows):
    return refused_test_groups(Collected(None, {}, rows, None))


def _read(audit, tmp_path):
    """``audit`` (rows) written as a stage writes its response audit, then read back."""
    path = tmp_path / f"audit-{len(list(tmp_path.iterdir()))}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in audit))
    return audit_outcomes(path)


def _audit(rows, method, still):
    """An audit of ``method``: ``still(row) -> bool`` says whether the row's prompt stays refused."""
    return [{"condition": f"false_refusal/{method}/{r['label']}_refused", "prompt_id": r["prompt_id"],
             "outcome": "refused" if still(r) else "complied"}
            for r in rows if r["split"] == "test" and r["refused"]]


def test_groups_and_clean_dose():
    rows = _rows(30, 40)
    groups = _groups(rows)
    assert [len(groups[s]) for s in ("safe_refused", "toxic_refused")] == [30, 40]
    clean = clean_dose(groups)
    assert clean["safe_refused"]["n"] == 30 and clean["toxic_refused"]["mean"] > clean["safe_refused"]["mean"]
    assert 0.6 < clean["auroc_toxic_above_safe"] <= 1


def test_dose_tells_a_dose_only_method_from_a_selective_one(tmp_path):
    rows = _rows(200, 200, seed=3)
    gen = np.random.default_rng(4)
    u = {r["prompt_id"]: gen.random() for r in rows}
    curve = lambda x: 1 / (1 + np.exp(-3 * x))  # noqa: E731
    # "push": every prompt stays refused with a probability set by its clean score alone (the toxic ones score higher)
    # "spare": the same, and every toxic prompt stays refused
    audit = (_audit(rows, "push", lambda r: u[r["prompt_id"]] < curve(r["refusal_score"]))
             + _audit(rows, "spare", lambda r: r["label"] == "toxic" or u[r["prompt_id"]] < curve(r["refusal_score"])))
    out = dose(_groups(rows), _read(audit, tmp_path), ["push", "spare"], n_strata=5, margin=0.15,
               min_n=10, n_boot=500, seed=0)
    push, spare = out["push"]["selectivity"], out["spare"]["selectivity"]
    assert push["raw"] > 0.15  # the raw gap is the dose
    assert push["verdict"] == "dose alone", push
    assert spare["verdict"] == "beyond dose" and spare["ci"][0] > 0.15, spare
    assert out["spare"]["still_refused"]["toxic_refused"]["refusal_rate"] == 1.0
    assert out["push"]["still_refused"]["safe_refused"]["n"] == 200
    assert not out["push"]["near_bound"] and not out["spare"]["near_bound"]
    ceiling = dose(_groups(rows), _read(_audit(rows, "none", lambda r: True), tmp_path), ["none"],
                   n_strata=5, margin=0.15, min_n=10, n_boot=50, seed=0)["none"]
    assert ceiling["near_bound"] and ceiling["selectivity"]["estimate"] == 0.0


def test_categories_reach_targets_only_with_enough_prompts(tmp_path):
    rows = _rows(24, 24)
    audit = _audit(rows, "m", lambda r: r["label"] == "toxic" or r["category"] == "illegal")
    cats = categories(_groups(rows), _read(audit, tmp_path), ["m"], min_n=10)["m"]
    assert cats["hate"]["safe_refused"]["refusal_rate"] == 0 and cats["hate"]["reaches_targets"] is True
    assert cats["illegal"]["safe_refused"]["refusal_rate"] == 1 and cats["illegal"]["reaches_targets"] is False
    few = categories(_groups(rows), _read(audit, tmp_path), ["m"], min_n=13)["m"]
    assert few["hate"]["reaches_targets"] is None and few["hate"]["safe_refused"]["n"] == 12


def test_generated_sites_in_the_order_tried(tmp_path):
    audit = [{"condition": "validation/toxic_kept/layer4/position-2", "prompt_id": "a", "outcome": "refused"},
             {"condition": "validation/toxic_kept/layer4/position-2", "prompt_id": "b", "outcome": "complied"},
             {"condition": "false_refusal/w'(lambda=1)/safe_refused", "prompt_id": "a", "outcome": "refused"},
             {"condition": "validation/toxic_kept/layer1/position-3", "prompt_id": "a", "outcome": "refused"}]
    sites = generated_sites(_read(audit, tmp_path))
    assert [(s["layer"], s["position"]) for s in sites] == [(4, -2), (1, -3)]
    assert sites[0]["toxic_kept"]["refusal_rate"] == 0.5 and sites[1]["toxic_kept"]["n"] == 1


def test_geometry_recovers_planted_cosines_and_separations():
    """Two layers, one position, d = 8: r along e0; w = 0.6 e0 + 0.8 e1 (cosine 0.6 with r); refused toxic prompts
    carry 3 e0, refused safe ones 2 e0 + 2 e1 (plus noise): along r the toxic ones sit higher; along e1 (w', the label)
    the safe ones do, and the read-out (refused safe - refused toxic discovery means) finds it."""
    gen = torch.Generator().manual_seed(0)
    e = torch.eye(8, dtype=torch.float64)
    r = torch.stack([e[0], e[0]])[:, None]  # [L=2, P=1, d]
    w = torch.stack([0.6 * e[0] + 0.8 * e[1]] * 2)[:, None]

    def acts(n, vec):
        return (vec + 0.3 * torch.randn(n, 2, 1, 8, generator=gen, dtype=torch.float64)).float()

    test = {"safe_refused": acts(40, 2 * e[0] + 2 * e[1]), "toxic_refused": acts(50, 3 * e[0])}
    disc = {"safe_refused": acts(30, 2 * e[0] + 2 * e[1]), "toxic_refused": acts(30, 3 * e[0])}
    out = geometry(w, r, test, disc, {"w'": (1, 0, e[1])}, n_boot=200)
    assert np.allclose(out["cosine_w_r"], 0.6)
    assert all(a > 0.95 for row in out["auroc_toxic_above_safe_along_r"] for a in row)  # toxic carry more r
    assert all(a > 0.99 for row in out["label_readout_auroc_safe_above_toxic"] for a in row)
    # the read-out is (2e1 - e0) / sqrt(5): cosine -1/sqrt(5) with r
    assert np.allclose(out["label_readout_cosine_with_r"], -1 / 5**0.5, atol=0.05)
    site = out["sites"]["w'"]
    assert site["cosine_with_r"] == pytest.approx(0.0, abs=1e-12) and site["position"] == -1
    assert site["along_vector"]["auroc_toxic_above_safe"] < 0.01 and site["along_vector"]["mean_safe"] == pytest.approx(2, abs=0.1)
    lo, hi = site["along_r"]["auroc_ci"]
    assert lo <= site["along_r"]["auroc_toxic_above_safe"] <= hi
    assert out["n_test"] == {"safe_refused": 40, "toxic_refused": 50}
    assert float(cosines(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))) == pytest.approx(2**-0.5)
    half = separation(torch.zeros(3, 2), torch.zeros(4, 2), torch.tensor([1.0, 0.0]))
    assert half["auroc_toxic_above_safe"] == 0.5 and "auroc_ci" not in half  # ties count half


def test_refuses_a_run_without_the_false_refusal_part(tmp_path, capsys):
    from refusal_lens.checks.false_refusal_why import main

    with pytest.raises(SystemExit) as err:
        main(["--run", str(tmp_path)])
    assert err.value.code == 2 and "direction.false_refusal: true" in capsys.readouterr().err
