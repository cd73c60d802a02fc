"""The direction stage's ``summary.json`` (the numbers later stages and the analysis read) and its printed lines."""

from __future__ import annotations

from refusal_lens.core.behaviour import without_values


def independence_summary(ind: dict | None) -> dict | None:
    """Median and range of the pairs' representational-independence scores (between categories, ``all`` left out)
    against the diagonal (a direction's own ablation): how much ablating one category's direction moves another's."""
    if not ind:
        return None
    names = [k for k in ind["score"] if k != "all"]
    off = [ind["score"][a][b] for i, a in enumerate(names) for b in names[i + 1:]]
    diag = [ind["score"][a][a] for a in names]

    def stats(v):
        return {"median": float(sorted(v)[len(v) // 2]), "min": float(min(v)), "max": float(max(v)), "n": len(v)} \
            if v else None

    return {"n_prompts": ind["n_prompts"], "layers": ind["layers"], "between_categories": stats(off),
            "own": stats(diag)}


def false_refusal_summary(false: dict | None) -> dict | None:
    """The false-refusal experiment's test numbers: each method's refused-safe and refused-toxic rates, the
    headline's KL and controls, and the selected sites."""
    if not false or "conditions" not in false:
        return {"note": false.get("note")} if false else None
    keep = ("n", "refusal_rate", "ci", "incoherent_rate")
    return {"headline": false["headline"], "n_test": false["n_test"],
            "methods": {name: {side: {k: r[side][k] for k in keep} for side in r} for name, r in false["conditions"].items()},
            "kl_harmless": false.get("kl_harmless"),
            "controls": {k: {q: v[q] for q in ("n", "mean", "q05", "q95", "p_value")} for k, v in false["controls"].items()},
            "chosen": false["chosen"], "chosen_keeping_toxic": false.get("chosen_keeping_toxic"),
            "controls_score": score_controls_summary(false.get("controls_score"))}


def score_controls_summary(sc: dict | None) -> dict | None:
    """The score-based controls without their values: each kind's distribution and p, and the calibration."""
    if not sc:
        return None
    return {"headline_mean_score": sc["headline_mean_score"], "n_prompts": sc["n_prompts"],
            "controls": {k: {q: v[q] for q in ("n", "mean", "q05", "q95", "p_value")} for k, v in sc["controls"].items()},
            "calibration": sc.get("calibration")}


def direction_summary(info: dict, evaluation: dict, categories: dict, over: dict, emergence: dict,
                      false: dict | None = None) -> dict:
    cond = evaluation["conditions"]

    def rate(key):
        r = cond.get(key)
        return None if r is None else {k: r[k] for k in ("n", "refusal_rate", "ci", "incoherent_rate")}

    verdicts: dict[str, int] = {}
    for cell in (categories.get("cross_ablation") or {}).get("cells", []):
        if cell["direction"] != cell["category"]:
            verdicts[cell["verdict"]] = verdicts.get(cell["verdict"], 0) + 1
    return {
        "direction": {k: info[k] for k in ("hook", "layer", "position", "norm", "scores", "filters", "splits")},
        "harmful_refused": {k: rate(f"harmful_refused/{k}") for k in ("clean", "ablated", "actadd_minus")},
        "harmful": {k: rate(f"harmful/{k}") for k in ("clean", "ablated", "actadd_minus")},
        "harmless": {k: rate(f"harmless/{k}") for k in ("clean", "actadd_plus")},
        "random_ablated": {k: evaluation["random_ablated"][k] for k in ("n", "mean", "q05", "q95", "p_value")},
        "random_added": {k: evaluation["random_added"][k] for k in ("n", "mean", "q05", "q95", "p_value")},
        "permuted_ablated": {k: (evaluation.get("permuted_ablated") or {}).get(k) for k in
                             ("n", "mean", "q05", "q95", "p_value", "abs_cosine_with_direction_mean")},
        "kl_harmless": evaluation["kl_harmless"], "ce_harmless": evaluation["ce_harmless"],
        "controls_score": ({k: without_values(c) for k, c in evaluation["controls_score"].items()}
                           if evaluation.get("controls_score") else None),
        "cross_ablation_verdicts": verdicts,
        "independence": independence_summary(categories.get("independence")),
        "over_refusal": {k: {side: {m: v[side][m] for m in ("n", "refusal_rate", "ci")} for side in ("safe", "toxic")}
                         for k, v in (over.get("conditions") or {}).items()},
        "emergence": {g: v.get("emergence_layer") for g, v in emergence["groups"].items()},
        "false_refusal": false_refusal_summary(false),
    }


def format_summary(summary: dict) -> str:
    """The key numbers of the direction stage, as printed at its end."""
    d = summary["direction"]

    def r(x):
        if not x or not x["n"]:
            return "- (n=0)"
        lo, hi = x["ci"]
        return f"{x['refusal_rate']:.0%} [{lo:.0%}, {hi:.0%}] (n={x['n']}, incoherent {x['incoherent_rate']:.0%})"

    s = d["scores"]
    lines = [f"refusal direction: {d['hook']} at position {d['position']} (validation: bypass {s['bypass']:.2f}, "
             f"induce {s['induce']:.2f}, KL {s['kl']:.3f}); {'; '.join(d['filters']['notes']) or 'all filters applied'}",
             "test split, refused harmful prompts: clean " + r(summary["harmful_refused"]["clean"]) + " -> ablated "
             + r(summary["harmful_refused"]["ablated"]) + " -> ActAdd(-r) " + r(summary["harmful_refused"]["actadd_minus"]),
             "test split, harmless prompts: clean " + r(summary["harmless"]["clean"]) + " -> ActAdd(+r) "
             + r(summary["harmless"]["actadd_plus"])]
    ra = summary["random_ablated"]
    if ra["n"]:
        lines.append(f"random directions ablated ({ra['n']}): mean refusal {ra['mean']:.0%} "
                     f"(5-95%: {ra['q05']:.0%}-{ra['q95']:.0%}); p = {ra['p_value']:.3f}")
    kl = summary["kl_harmless"]
    ce = summary["ce_harmless"]
    if kl["mean"] is not None:
        lines.append(f"harmless KL under ablation {kl['mean']:.4f} [{kl['ci'][0]:.4f}, {kl['ci'][1]:.4f}] (n={kl['n']}); "
                     f"CE {ce['clean']:.3f} -> {ce['ablated']:.3f} nats/token")
    return "\n".join(lines)

