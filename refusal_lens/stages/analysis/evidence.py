"""The evidence (``analysis/summary.json``): the headline numbers on test prompts, each with its n and interval,
notes on what is below the power floor, and the report's one-line-each headline table."""

from __future__ import annotations

from refusal_lens.config import Config
from refusal_lens.core.behaviour import without_values
from refusal_lens.core.metrics import RATE_KEYS
from refusal_lens.report.numbers import by_method, fmt_rate, fmt_share, num, share_note
from refusal_lens.stages.analysis.inputs import AnalysisInputs
from refusal_lens.stages.analysis.similarity import verdict_counts


def data_evidence(acts: dict, rates: list[dict]) -> dict:
    """Prompts per split, the refusal rates of the test split per label, the refusal score's AUROC and tokens."""
    test = {r["label"]: {k: r[k] for k in RATE_KEYS} for r in rates if r["split"] == "test" and r["category"] == "ALL"}
    return {"split_counts": acts.get("split_counts"), "refusal_test": test, "score_auroc": acts.get("score_auroc"),
            "refusal_tokens": acts.get("refusal_tokens", {}).get("tokens"),
            "refusal_tokens_source": acts.get("refusal_tokens", {}).get("source")}


def _underpowered(n: int | None, floor: int) -> str | None:
    if n is None or n < floor:
        return f"insufficient: {n or 0} test prompts, below the power floor of {floor} (analysis.min_prompts)"
    return None


def evidence(cfg: Config, inp: AnalysisInputs, sims: list[dict]) -> dict:
    """The headline numbers, each with its n and interval (test split), and notes on what is underpowered.
    ``inp.fraction_ci`` is the paired bootstrap interval of the headline circuit's share of the direction's effect
    (:func:`refusal_lens.core.behaviour.paired_fraction_interval`)."""
    a = cfg.analysis
    d_summary, behaviour, direction, fraction_ci = inp.d_summary, inp.behaviour, inp.direction, inp.fraction_ci
    data = data_evidence(inp.acts, inp.rates)
    out: dict = {"data": data}
    out["direction"] = {k: d_summary[k] for k in ("direction", "harmful_refused", "harmful", "harmless",
                                                   "random_ablated", "random_added", "permuted_ablated", "controls_score", "kl_harmless",
                                                   "ce_harmless", "emergence", "cross_ablation_verdicts",
                                                   "independence", "over_refusal", "false_refusal") if k in d_summary}
    notes = []
    n_ref = (d_summary["harmful_refused"]["clean"] or {}).get("n")
    if (why := _underpowered(n_ref, a.min_prompts)):
        notes.append(f"direction evaluation on refused harmful prompts: {why}")
    fitted, chosen = (d_summary["direction"]["splits"][s] for s in ("discovery", "validation"))
    if min(fitted["harmful"], fitted["harmless"], chosen["harmful"], chosen["harmless"]) < a.min_prompts:
        notes.append(f"the direction is a mean difference of {fitted['harmful']} harmful and {fitted['harmless']} harmless "
                     f"discovery prompts, selected on {chosen['harmful']} harmful and {chosen['harmless']} harmless "
                     f"validation prompts (those direction.keep={cfg.direction.keep!r} kept), fewer than {a.min_prompts} "
                     "on a side")
    if behaviour:
        out["circuit_behaviour"] = _behaviour_evidence(behaviour, fraction_ci, inp.without_direction_ci)
        if (why := _underpowered(behaviour["n_prompts"], a.min_prompts)):
            notes.append(f"circuit behaviour: {why}")
    c_summary = inp.c_summary
    out["faithfulness"] = c_summary.get("faithfulness")
    for key, v in (c_summary.get("faithfulness") or {}).items():
        if (why := _underpowered(v["n_prompts"], a.min_prompts)):
            notes.append(f"faithfulness of {key}: {why}")
    if (over := inp.over_refusal_circuit):
        out["over_refusal_circuit"] = over_refusal_evidence(over)
        if over["verdict"] == "insufficient":
            n = over["n_test"]
            notes.append(f"over-refusal's own features: insufficient ({n['safe_refused']} refused safe and "
                         f"{n['toxic_refused']} refused toxic test prompts; the floor is {a.min_prompts})")
    out["agreement"] = c_summary.get("agreement")
    out["agreement_prompts"] = c_summary.get("agreement_prompts")
    out["similarity"] = {"verdicts": verdict_counts(sims),
                         "pooled_safe_x_toxic": next((s for s in sims if s["table"] == "pooled safe x toxic"), None)}
    insufficient = sum(1 for s in sims if s["verdict"] == "insufficient")
    if sims and insufficient:
        notes.append(f"circuit similarity: {insufficient} of {len(sims)} pairs are insufficient (a group with fewer than "
                     f"{a.min_prompts} refused test prompts)")
    cross = (direction.get("categories") or {}).get("cross_ablation") or {}
    n_cells = sum(1 for c in cross.get("cells", []) if c["direction"] != c["category"])
    n_insuff = sum(1 for c in cross.get("cells", []) if c["direction"] != c["category"] and c["verdict"] == "insufficient")
    if n_insuff:
        notes.append(f"cross-ablation: {n_insuff} of {n_cells} cells are insufficient (fewer than {a.min_prompts} refused "
                     "test prompts in the category, or no effect of its own direction)")
    out["saes"] = [{k: q.get(k) for k in ("hook", "explained_variance", "ce_loss_recovered", "ce_increase", "kl_sae",
                                          "val_explained_variance", "val_ce_loss_recovered", "passes",
                                          "distinct_train_rows")} for q in inp.quality]
    out["underpowered"] = notes
    return out


def _behaviour_evidence(behaviour: dict, fraction_ci: dict | None, without_ci: dict | None = None) -> dict:
    """The headline circuit's test rates beside the clean and direction rates, its matched controls (with their edit
    sizes and alignment with the direction), its edit without the direction's component, the steering rows beside
    the direction's own steering, and induction."""
    h = behaviour["headline"]
    rnd = behaviour["random"]
    extra = {}
    if "without_direction" in h:  # recorded since the headline became an ablation with these checks
        w = h["without_direction"]
        extra = {
            "without_direction": {**_rate_of(w), "fraction_of_direction": w["fraction_of_direction"],
                                  "fraction_ci": (without_ci or {}).get("ci", [None, None])},
            "alignment": h["alignment"],
            "random_matching": {"matched_on": rnd["matched_on"], "edit_norm": rnd["edit_norm"],
                                "fraction_along_direction": rnd["fraction_along_direction"]},
            "other_ablations": [{**_rate_of(c), "intervention": c["intervention"],
                                 "fraction_of_direction": c["fraction_of_direction"]} for c in behaviour["curve"]
                                if (c["method"], c["k"]) == (h["method"], h["k"]) and c.get("kind") == "ablation"
                                and c["intervention"] != h["intervention"]],
            "steering": [{"intervention": s["intervention"], "circuit": s["circuit"],
                          "direction_steered": {**_rate_of(s["direction_steered"]),
                                                "fraction_of_direction": s["direction_steered"]["fraction_of_direction"]},
                          "alignment": s["alignment"]} for s in behaviour.get("steering", [])],
        }
    return extra | {
        "n": behaviour["n_prompts"], "clean": _rate_of(behaviour["clean"]), "direction": _rate_of(behaviour["direction"]),
        "circuit": {k: h.get(k) for k in ("method", "k", "intervention", "kind", "positions", "refusal_rate", "ci",
                                          "n", "fraction_of_direction", "coherent_rate", "incoherent_rate",
                                          "random_p_value", "random_mean", "smallest_k_reaching_90")}
                   | {"fraction_ci": (fraction_ci or {}).get("ci", [None, None])},
        "random": {k: behaviour["random"]["controls"][k] for k in ("n", "mean", "q05", "q95", "p_value")},
        "random_score": (without_values(behaviour["random"]["controls_score"])
                         if behaviour["random"].get("controls_score") else None),
        "random_fraction_of_direction_mean": behaviour["random"]["fraction_of_direction_mean"],
        "induction": {"clean": _rate_of(behaviour["induction"]["clean"]),
                      "direction_actadd": _rate_of(behaviour["induction"]["direction_actadd"]),
                      "circuits": [{"method": i["method"], "k": i["k"], **_rate_of(i)}
                                   for i in behaviour["induction"]["curve"]],
                      "random": {k: behaviour["induction"]["random"][k] for k in ("n", "mean", "p_value")}},
    }

def over_refusal_evidence(over: dict) -> dict:
    """The circuit's over-refusal answer: verdict, and per ranking and K both sides' rates and the selectivity."""
    return {"verdict": over["verdict"], "intervention": over["intervention"], "n_test": over["n_test"],
            "margin": over["margin"], "level": over["level"],
            "curves": {m: {k: {"safe_refused": _rate_of(r["safe_refused"]), "toxic_refused": _rate_of(r["toxic_refused"]),
                               "selectivity": r["selectivity"]}
                           for k, r in curve.items() if "selectivity" in r} for m, curve in over["curves"].items()}}


def _rate_of(s: dict) -> dict:
    return {k: s.get(k) for k in ("n", "refusal_rate", "ci", "incoherent_rate")}


def headline_table(s: dict) -> dict:
    """The report's summary: the evidence on test prompts, one line each."""
    d, data = s["direction"], s["data"]
    out = {}
    auroc = (data.get("score_auroc") or {}).get("test") or {}
    out["refusal score vs judge (test)"] = (f"AUROC {auroc.get('auroc', float('nan')):.3f} "
                                            f"({auroc.get('n_refused')} refused, {auroc.get('n_complied')} complied)")
    for label, r in (data.get("refusal_test") or {}).items():
        out[f"{label} refused (test)"] = fmt_rate(r)
    out["direction"] = f"{d['direction']['hook']}, position {d['direction']['position']}"
    hr = d["harmful_refused"]
    out["refused harmful: clean -> ablated -> ActAdd(-r)"] = " -> ".join(fmt_rate(hr[k]) for k in
                                                                           ("clean", "ablated", "actadd_minus"))
    out["harmless: clean -> ActAdd(+r)"] = " -> ".join(fmt_rate(d["harmless"][k]) for k in ("clean", "actadd_plus"))
    ra = d["random_ablated"]
    if ra.get("n"):
        out["random directions ablated"] = f"mean {ra['mean']:.0%} (5-95%: {ra['q05']:.0%}-{ra['q95']:.0%}, n={ra['n']}); " \
                                           f"p = {ra['p_value']:.3f}"
    if d["kl_harmless"].get("mean") is not None:
        out["KL on harmless under ablation"] = f"{d['kl_harmless']['mean']:.4f} [{d['kl_harmless']['ci'][0]:.4f}, " \
                                               f"{d['kl_harmless']['ci'][1]:.4f}] (n={d['kl_harmless']['n']})"
    b = s.get("circuit_behaviour")
    if b:
        c = b["circuit"]
        out["circuit: clean / circuit / random / direction"] = (
            f"{fmt_rate(b['clean'])} / {fmt_rate(c)} / mean {b['random']['mean']:.0%} (p = {b['random']['p_value']:.3f}, "
            f"{b['random']['n']} sets) / {fmt_rate(b['direction'])}")
        out[f"circuit ({c['method']}, K={c['k']}, {c['intervention']}): share of the direction's effect"] = (
            fmt_share(c["fraction_of_direction"], c.get("fraction_ci")) + share_note(c["fraction_of_direction"]) + f"; coherent {c['coherent_rate']:.0%}; "
            f"smallest K reaching 90%: {by_method(c['smallest_k_reaching_90'])}")
    for key, v in (s.get("faithfulness") or {}).items():
        pts = "; ".join(f"{p['size']}: {num(p['faithfulness'])} (random {num(p['random_faithfulness_mean'])}, p="
                        f"{num(p['faithfulness_p'], '.3f')})" for p in v["points"])
        out[f"faithfulness {key} (n={v['n_prompts']})"] = pts
    for m, v in (s.get("agreement") or {}).items():
        st = v["strata"]
        out[f"agreement {m} vs exact (Pearson; n pairs)"] = ", ".join(
            f"{k} {num(st[k].get('pearson'))} ({st[k].get('n', 0)})" for k in ("error", "top", "random"))
    out["circuit similarity verdicts"] = "; ".join(f"{t}: " + ", ".join(f"{n} {v}" for v, n in c.items() if n)
                                                   for t, c in s["similarity"]["verdicts"].items()) or "-"
    for note in s["underpowered"]:
        out.setdefault("underpowered", "")
        out["underpowered"] = (out["underpowered"] + "; " if out["underpowered"] else "") + note
    return out

