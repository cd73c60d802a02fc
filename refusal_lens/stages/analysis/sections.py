"""The report's sections, one function each, from the evidence and the earlier stages' results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from refusal_lens.config import Config
from refusal_lens.report.html import FigureItem, Section, Table
from refusal_lens.stages.analysis.inputs import AnalysisInputs
from refusal_lens.core.stats import VERDICTS
from refusal_lens.stages.analysis.similarity import verdict_counts


@dataclass
class ReportInputs:
    """What the sections are written from."""

    cfg: Config
    summary: dict  # the evidence (summary.json)
    figs: dict  # name -> (figure, caption)
    inputs: AnalysisInputs
    sims: list[dict]
    top: dict
    comparison: list[dict]

    def figs_of(self, *names: str) -> list[FigureItem]:
        return [FigureItem(n, *self.figs[n]) for n in names if n in self.figs]


def sections(r: ReportInputs) -> list[Section]:
    """Every section of the report, in order."""
    return [s for make in (evidence_section, direction_section, circuits_section, validation_section,
                           mechanisms_section, data_section, features_section, runs_section) for s in make(r)]


def evidence_section(r: ReportInputs) -> list[Section]:
    """The split, the rules, and what is below the power floor."""
    a, summary = r.cfg.analysis, r.summary
    return [Section(
        "evidence", "Evidence (test split)",
        intro_html="<p>The split into discovery / validation / test is made once by the collect stage (stratified by "
                   "label x category x refused). Directions and circuits are fitted on discovery, every choice is made "
                   "on validation, and every number here is measured on test. Rates carry Wilson 95% intervals, means "
                   f"bootstrap intervals over prompts. Entries below {a.min_prompts} test prompts are marked "
                   "insufficient.</p>",
        notes=summary["underpowered"] or ["no entry is below the power floor"])]


def direction_section(r: ReportInputs) -> list[Section]:
    """The refusal direction: the reference's table, its random controls, KL and CE."""
    cfg, direction, figs_of = r.cfg, r.inputs.direction, r.figs_of
    ev = direction.get("evaluation") or {}
    cond = ev.get("conditions", {})
    direction_rows = [{"prompts": k.split("/")[0], "condition": k.split("/")[1], "n": v["n"],
                       "refusal rate": v["refusal_rate"], "95% CI": _ci(v["ci"]), "incoherent": v["incoherent_rate"]}
                      for k, v in cond.items()]
    return [Section(
        "direction", "The refusal direction (Arditi et al. 2024)",
        intro_html="<p>Candidates: difference in means of every block input at every post-instruction position "
                   "(discovery). Selection on validation: bypass (refusal score with the direction ablated everywhere), "
                   "induce (score of harmless prompts with it added), KL on harmless prompts; filters KL &le; "
                   f"{cfg.direction.kl_max}, induce &gt; {cfg.direction.induce_min}, layer &lt; "
                   f"{cfg.direction.max_layer_fraction} L; lowest bypass. Evaluation on test by greedy generation, judged "
                   "(incoherent responses counted apart). Notes of the selection: "
                   f"{'; '.join((direction.get('direction') or {}).get('filters', {}).get('notes', [])) or 'none'}.</p>",
        figures=figs_of("direction_evaluation", "direction_candidates", "emergence"),
        tables=[Table("Refusal rates on test prompts (the reference's layout)",
                      ["prompts", "condition", "n", "refusal rate", "95% CI", "incoherent"], direction_rows),
                Table("Random controls", ["control", "n", "mean", "q05", "q95", "p_value"],
                      [{"control": k, **{q: ev.get(k, {}).get(q) for q in ("n", "mean", "q05", "q95", "p_value")}}
                       for k in ("random_ablated", "random_added", "permuted_ablated") if ev.get(k)]
                      + [{"control": f"{k}, by refusal score (direction {c['headline_mean_score']:.2f}; Spearman with "
                                     f"the generated rate {_num(c.get('calibration', {}).get('spearman_rate_vs_score'))})",
                          **{q: c.get(q) for q in ("n", "mean", "q05", "q95", "p_value")}}
                         for k, c in (ev.get("controls_score") or {}).items()]),
                Table("KL and CE on harmless test prompts under ablation", ["measure", "value"],
                      [{"measure": "KL (first response token)", "value": (ev.get("kl_harmless") or {}).get("mean")},
                       {"measure": "CE clean (nats/token)", "value": (ev.get("ce_harmless") or {}).get("clean")},
                       {"measure": "CE ablated (nats/token)", "value": (ev.get("ce_harmless") or {}).get("ablated")}])])]


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def circuits_section(r: ReportInputs) -> list[Section]:
    """The circuits' behaviour on test prompts: the K-curve and induction."""
    figs_of = r.figs_of
    behaviour = r.inputs.behaviour
    if not behaviour:
        return []
    curve_rows = [{k: c.get(k) for k in ("method", "k", "intervention", "kind", "positions", "n", "refusal_rate",
                                          "incoherent_rate", "fraction_of_direction")} | {"95% CI": _ci(c["ci"])}
                  for c in behaviour["curve"]]
    ind = behaviour["induction"]
    return [Section(
        "circuits", "Refusal circuits: behaviour on test prompts",
        intro_html="<p>Refusal-promoting SAE features (ranked on discovery by each selection method) ablated while "
                   "the model answers the refused toxic test prompts; against matched random feature sets and the "
                   "refusal direction. fraction_of_direction = (clean - circuit) / (clean - direction). Induction: "
                   "the promoting features set to their refused-prompt means on harmless test prompts.</p>",
        figures=figs_of("k_curve"),
        tables=[Table("Refusal rate against K", ["method", "k", "intervention", "kind", "positions", "n",
                                                  "refusal_rate", "95% CI", "incoherent_rate", "fraction_of_direction"],
                      curve_rows),
                *headline_tables(behaviour),
                Table("Induction on harmless test prompts", ["condition", "n", "refusal rate", "95% CI"],
                      [{"condition": "clean", "n": ind["clean"]["n"], "refusal rate": ind["clean"]["refusal_rate"],
                        "95% CI": _ci(ind["clean"]["ci"])},
                       {"condition": "direction ActAdd(+r)", "n": ind["direction_actadd"]["n"],
                        "refusal rate": ind["direction_actadd"]["refusal_rate"],
                        "95% CI": _ci(ind["direction_actadd"]["ci"])}]
                      + [{"condition": f"{i['method']} K={i['k']} steered", "n": i["n"], "refusal rate": i["refusal_rate"],
                          "95% CI": _ci(i["ci"])} for i in ind["curve"]])])]


def headline_tables(behaviour: dict) -> list[Table]:
    """The headline ablation beside its edit without the direction's component, its controls' edit sizes, and the
    steering rows beside the direction's own steering (absent from runs recorded before these checks)."""
    h = behaviour["headline"]
    if "without_direction" not in h:
        return []
    rnd, w = behaviour["random"], h["without_direction"]
    rows = [{"condition": f"headline {h['intervention']} (ablation)", "n": h["n"], "refusal_rate": h["refusal_rate"],
             "95% CI": _ci(h["ci"]), "fraction_of_direction": h["fraction_of_direction"],
             "edit along r": h["alignment"]["fraction_along_direction"], "edit norm": h["alignment"]["edit_norm"]},
            {"condition": "headline, its edit's component along r removed", "n": w["n"],
             "refusal_rate": w["refusal_rate"], "95% CI": _ci(w["ci"]), "fraction_of_direction": w["fraction_of_direction"],
             "edit along r": 0.0, "edit norm": None},
            {"condition": f"{rnd['controls']['n']} matched random sets ({rnd['matched_on']}): mean",
             "n": h["n"], "refusal_rate": rnd["controls"]["mean"], "95% CI": "", "fraction_of_direction":
             rnd["fraction_of_direction_mean"], "edit along r": rnd["fraction_along_direction"]["mean"],
             "edit norm": rnd["edit_norm"]["mean"]}]
    for st in behaviour.get("steering", []):
        rows.append({"condition": f"steering {st['intervention']}", "n": st["circuit"]["n"],
                     "refusal_rate": st["circuit"]["refusal_rate"], "95% CI": _ci(st["circuit"]["ci"]),
                     "fraction_of_direction": st["circuit"]["fraction_of_direction"],
                     "edit along r": (st["alignment"] or {}).get("fraction_along_direction"),
                     "edit norm": (st["alignment"] or {}).get("edit_norm")})
        d = st["direction_steered"]
        rows.append({"condition": f"direction steered x - {1 + st['c']:g}(x.r)r", "n": d["n"],
                     "refusal_rate": d["refusal_rate"], "95% CI": _ci(d["ci"]),
                     "fraction_of_direction": d["fraction_of_direction"], "edit along r": 1.0, "edit norm": None})
    cols = ["condition", "n", "refusal_rate", "95% CI", "fraction_of_direction", "edit along r", "edit norm"]
    tables = [Table(f"Headline circuit (K={h['k']}, {h['method']}): ablation, controls and steering", cols, rows)]
    if sc := rnd.get("controls_score"):
        cal = sc.get("calibration") or {}
        tables.append(Table(
            f"Headline circuit against its matched random sets by the refusal score (one forward pass per prompt, "
            f"{sc['n_prompts']} prompts; p of a lower mean score)",
            ["headline mean score", "sets", "sets mean", "q05", "q95", "p", "generated sets", "Spearman rate vs score",
             "score p on the generated sets", "generated p"],
            [{"headline mean score": sc["headline_mean_score"], "sets": sc["n"], "sets mean": sc["mean"],
              "q05": sc["q05"], "q95": sc["q95"], "p": sc["p_value"], "generated sets": cal.get("n_controls"),
              "Spearman rate vs score": cal.get("spearman_rate_vs_score"),
              "score p on the generated sets": cal.get("p_score_on_generated"),
              "generated p": rnd["controls"]["p_value"]}]))
    return tables


def validation_section(r: ReportInputs) -> list[Section]:
    """Faithfulness, completeness and agreement with exact patching."""
    figs_of, faithfulness, agreement = r.figs_of, r.inputs.faithfulness, r.inputs.agreement
    return [Section(
        "validation", "Faithfulness, completeness, agreement (test prompts)",
        intro_html="<p>Faithfulness = (m(C) - m(empty)) / (m(model) - m(empty)) with every node outside C at its class "
                   "mean at every site after the template's opening (no unpatched site); completeness = the share removed "
                   "by ablating C alone. Each size has random node sets of the same size. Agreement: exact patching of "
                   "error nodes, top features by |estimate| and random active features (equal strata).</p>",
        figures=figs_of("faithfulness", "agreement"),
        tables=[Table("Faithfulness and completeness", ["group", "size", "faithfulness", "faithfulness_ci",
                                                         "random_faithfulness_mean", "faithfulness_p", "completeness",
                                                         "completeness_ci", "random_completeness_mean", "completeness_p"],
                      [{"group": k, **{q: p.get(q) for q in ("size", "faithfulness", "random_faithfulness_mean",
                                                               "faithfulness_p", "completeness", "random_completeness_mean",
                                                               "completeness_p")},
                        "faithfulness_ci": _ci(p.get("faithfulness_ci")), "completeness_ci": _ci(p.get("completeness_ci"))}
                       for k, v in (faithfulness or {}).items() for p in v["points"]]),
                Table("Agreement with exact patching", ["method", "stratum", "n", "pearson", "spearman", "sign_agreement",
                                                        "median_relative_error"],
                      [{"method": m, "stratum": s, **v["strata"][s]} for m, v in (agreement or {}).get("methods", {}).items()
                       for s in ("error", "top", "random")]
                      + [{"method": m, "stratum": f"hook type {t}", **x} for m, v in (agreement or {}).get("methods", {}).items()
                         for t, x in v["by_hook_type"].items()])])]


def mechanisms_section(r: ReportInputs) -> list[Section]:
    """One mechanism or many: cross-ablation, circuit similarity, over-refusal."""
    a, direction, sims, figs_of = r.cfg.analysis, r.inputs.direction, r.sims, r.figs_of
    cats = direction.get("categories") or {}
    cross = cats.get("cross_ablation") or {}
    over = direction.get("over_refusal") or {}
    return [Section(
        "mechanisms", "One mechanism or many?",
        intro_html="<p><b>By intervention</b>: each category's own direction (discovery) ablated, and the refusal rate "
                   "measured on every category's refused toxic test prompts; transfer = the share of B's own ablation "
                   f"effect that A's direction reaches. <b>By circuit similarity</b>: per-prompt test effects of two "
                   "groups, a permutation null (prompts swapped between groups), split-half noise ceilings, normalised "
                   "similarity with its interval, Benjamini-Hochberg across each table (the exchangeability p-values and "
                   f"each equivalence test its own family). Verdicts are graded against the margin m = {a.shared_margin}: "
                   "<i>shared</i> when the interval's lower end is &ge; m; <i>distinct</i> only when its upper end is "
                   "&lt; m (and, for circuits, exchangeability is rejected); <i>partly shared</i> when neither holds and "
                   "the lower end is above 0; <i>indeterminate</i> otherwise. <i>Distinct</i> means &quot;shown below the "
                   "margin&quot;, not &quot;not identical&quot;, and no verdict comes from a large p-value.</p>",
        figures=figs_of("cross_ablation", "direction_cosines", "similarity_toxic", "similarity_safe",
                        "similarity_safe_x_toxic"),
        tables=[Table("Cross-ablation", ["direction", "category", "n", "clean_rate", "refusal_rate", "transfer",
                                         "transfer_ci", "verdict"],
                      [{**c, "transfer_ci": _ci(c.get("transfer_ci"))} for c in cross.get("cells", [])]),
                Table("Representational independence (Wollschläger et al. 2025): mean squared change of B's per-layer "
                      "cosine when A's direction is ablated, symmetric; 0 = independent",
                      ["direction A", *(cats.get("independence") or {}).get("score", {})],
                      [{"direction A": a, **row} for a, row in ((cats.get("independence") or {}).get("score") or {}).items()]),
                Table("Circuit similarity: verdicts", ["table", *VERDICTS],
                      [{"table": t, **c} for t, c in verdict_counts(sims).items()]),
                Table("Circuit similarity: every pair", ["table", "a", "b", "n_a", "n_b", "normalised", "normalised_ci",
                                                         "p_value", "q_value", "verdict", "reason"],
                      [{**s, "normalised_ci": _ci(s.get("normalised_ci"))} for s in sims]),
                *false_refusal_tables(direction.get("false_refusal"), over),
                *over_refusal_circuit_tables(r.inputs.over_refusal_circuit)],
        notes=[f"categories without a direction (fewer than 2 discovery prompts): {cats.get('without_direction')}"]
        if cats.get("without_direction") else [])]


def false_refusal_tables(false: dict | None, over: dict) -> list[Table]:
    """Over-refusal removed while correct refusal stays: every method of the false-refusal experiment on the refused
    safe and refused toxic test prompts, its controls; the earlier r_over experiment when that is all there is."""
    if not false or "conditions" not in false:
        return [Table("Over-refusal direction (refused safe - refused toxic) on test prompts",
                      ["condition", "safe refused", "safe 95% CI", "toxic refused", "toxic 95% CI"],
                      [{"condition": k, "safe refused": v["safe"]["refusal_rate"], "safe 95% CI": _ci(v["safe"]["ci"]),
                        "toxic refused": v["toxic"]["refusal_rate"], "toxic 95% CI": _ci(v["toxic"]["ci"])}
                       for k, v in (over.get("conditions") or {}).items()])]
    rows = []
    for name, r in false["conditions"].items():
        s, t = r.get("safe_refused") or {}, r.get("toxic_refused") or {}
        rows.append({"method": name, "refused safe still refused": s.get("refusal_rate"), "safe 95% CI": _ci(s.get("ci")),
                     "refused toxic still refused": t.get("refusal_rate"), "toxic 95% CI": _ci(t.get("ci")),
                     "incoherent (safe)": s.get("incoherent_rate")})
    ctrl = [{"control": k, "n": v["n"], "mean": v["mean"], "q05": v["q05"], "q95": v["q95"],
             "p (headline below)": v["p_value"]} for k, v in false["controls"].items()]
    sc = false.get("controls_score") or {}
    ctrl += [{"control": f"{k}, by refusal score (headline {sc['headline_mean_score']:.2f})", "n": v["n"],
              "mean": v["mean"], "q05": v["q05"], "q95": v["q95"], "p (headline below)": v["p_value"]}
             for k, v in (sc.get("controls") or {}).items()]
    chosen = [{"lambda": lam, **{k: ch[k] for k in ("layer", "position", "bypass", "kl", "cosine_with_r")}}
              for lam, ch in false["chosen"].items()]
    if (kept := false.get("chosen_keeping_toxic")) and "layer" in kept:
        how = "answers judged refused" if kept.get("keep_by") == "generation" else "refusal score > 0"
        chosen.append({"lambda": f"{false['lambda']:g}, toxic kept ({kept['toxic_kept']:.0%} of "
                                 f"{kept['n_toxic_validation']} refused toxic validation prompts: {how})",
                       **{k: kept[k] for k in ("layer", "position", "bypass", "kl", "cosine_with_r")}})
    elif kept:
        chosen.append({"lambda": f"{false['lambda']:g}, toxic kept: {kept.get('note')}"})
    return [Table(f"False-refusal vector (Wang et al. 2025) and baselines on test prompts ({false['n_test']['safe_refused']} "
                  f"refused safe, {false['n_test']['toxic_refused']} refused toxic; clean: 100% each by construction)",
                  ["method", "refused safe still refused", "safe 95% CI", "refused toxic still refused", "toxic 95% CI",
                   "incoherent (safe)"], rows),
            Table(f"Controls of {false['headline']} on the refused safe test prompts (ablated; generated: refusal rate; "
                  "by refusal score: mean score, one forward pass)",
                  ["control", "n", "mean", "q05", "q95", "p (headline below)"], ctrl),
            Table("False-refusal vector: the site chosen on validation per lambda",
                  ["lambda", "layer", "position", "bypass", "kl", "cosine_with_r"], chosen)]


def over_refusal_circuit_tables(over: dict | None) -> list[Table]:
    """Does over-refusal have its own features? Both rankings ablated at every K, with the selectivity and the
    verdict (stages/circuits/over_refusal.py)."""
    if not over:
        return []
    rows = []
    for method, curve in over["curves"].items():
        for k, row in curve.items():
            s, t, sel = row.get("safe_refused") or {}, row.get("toxic_refused") or {}, row.get("selectivity") or {}
            rows.append({"features": method, "K": int(k), "refused safe still refused": s.get("refusal_rate"),
                         "safe 95% CI": _ci(s.get("ci")), "refused toxic still refused": t.get("refusal_rate"),
                         "toxic 95% CI": _ci(t.get("ci")), "selectivity": sel.get("estimate"),
                         f"selectivity {sel.get('level', 0.95):.0%} CI": _ci(sel.get("ci"))})
    n = over["n_test"]
    return [Table(f"Over-refusal's own features? The safe-minus-toxic features and the toxic circuit's, "
                  f"{over['intervention']} ablated at each K ({n['safe_refused']} refused safe, {n['toxic_refused']} "
                  f"refused toxic test prompts; selectivity = toxic still refused - safe still refused, Newcombe "
                  f"interval, Bonferroni over K). Verdict: {over['verdict']} (margin {over['margin']})",
                  list(rows[0]) if rows else ["features", "K"], rows)]


def data_section(r: ReportInputs) -> list[Section]:
    """Prompts, the judge, the refusal score and the SAEs."""
    summary, rates, quality, figs_of = r.summary, r.inputs.rates, r.inputs.quality, r.figs_of
    return [Section(
        "data", "Prompts, judge and SAEs",
        intro_html="<p>Responses are judged refused / complied / incoherent by documented rules "
                   "(refusal_lens/core/judge.py). The refusal score is the log-odds of the refusal-start tokens learned from "
                   "the discovery responses; its AUROC against the judge is measured on test. SAE quality: test split "
                   "(the bar on validation), CE loss recovered against mean ablation.</p>",
        figures=figs_of("refusal_rates", "sae_quality"),
        tables=[Table("Refusal rates by split", ["split", "label", "category", "refused", "incoherent", "n", "refusal_rate"],
                      [r for r in rates if r["category"] == "ALL"]),
                Table("Refusal score vs judge", ["split", "auroc", "n_refused", "n_complied"],
                      [{"split": k, **v} for k, v in (summary["data"].get("score_auroc") or {}).items()]),
                Table("SAE quality (test; passes = the bar on validation)", ["hook", "explained_variance",
                                                                             "ce_loss_recovered", "ce_increase", "kl_sae",
                                                                             "l0", "dead_fraction", "distinct_train_rows",
                                                                             "val_explained_variance", "passes"], quality)])]


def features_section(r: ReportInputs) -> list[Section]:
    """The top promoting features of the pooled circuits."""
    top = r.top
    return [Section(
        "features", "Top promoting features of the pooled circuits",
        intro_html="<p>Each feature's test effect (bootstrap interval over test prompts), its decoder's cosine with the "
                   "refusal direction, and the prompt token where it fires most.</p>",
        tables=[Table(key, ["node", "effect_test", "ci", "cosine", "token", "context", "activation", "category", "label"],
                      [{"node": t["node"], "effect_test": t["effect_test"], "ci": _ci(t["ci"]), "cosine": t["cosine"],
                        **({k: e[k] for k in ("token", "context", "activation", "category", "label")}
                           if (e := (t["examples"][:1] or [None])[0]) else {})} for t in rows]) for key, rows in top.items()])]


def runs_section(r: ReportInputs) -> list[Section]:
    """Every analysed run of the results folder side by side."""
    comparison = r.comparison
    if not comparison:
        return []
    cols = list(dict.fromkeys(k for row in comparison for k in row))
    return [Section("models", "Runs side by side", intro_html="<p>Every analysed run in this results folder.</p>",
                        tables=[Table("Runs", cols, comparison)])]


def _ci(ci: Sequence | None) -> str:
    if not ci or ci[0] is None or ci[0] != ci[0]:
        return "-"
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"

