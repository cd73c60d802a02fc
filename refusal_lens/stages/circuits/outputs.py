"""Step 7 of discover: the circuit files (``<label>/<category>.json``), ``summary.json``, the figures, and the lines
printed at the end of the stage."""

from __future__ import annotations

from refusal_lens.config import Config, config_to_dict
from refusal_lens.infra import durable
from refusal_lens.run.folder import CircuitFiles
from refusal_lens.stages.circuits.inputs import Inputs


def write_outputs(files: CircuitFiles, cfg: Config, inputs: Inputs, groups, skipped, circuits, ranks, agree,
                  faithfulness, behaviour_out, over, edges, t_attr: float) -> dict:
    c = cfg.circuits
    space = inputs.space
    summary_groups = []
    for g in sorted(groups, key=lambda g: (g.category != "all", g.label, g.category)):
        doc = dict(circuits[g.key])
        doc["settings"] = {k: v for k, v in config_to_dict(c).items() if k != "num_threads"}
        doc["edges"] = edges.get(g.key, [])
        doc["validation"] = {"faithfulness": (faithfulness or {}).get(g.key)}
        if g.key == "toxic/all" and behaviour_out:
            doc["validation"]["behaviour_headline"] = behaviour_out["headline"]
        path = files.circuit(g.label, g.category)
        path.parent.mkdir(exist_ok=True)
        durable.write_json(path, doc, indent=1)
        summary_groups.append({"label": g.label, "category": g.category, "n_discovery": len(g.rows["discovery"]),
                               "n_test": len(g.rows["test"]), "n_promoting": len(doc["promoting"]),
                               "n_suppressing": len(doc["suppressing"]), "file": str(path.relative_to(files.dir))})
    summary = {
        "method": c.method, "baseline": c.baseline, "reference": c.reference, "hooks": list(space.hooks),
        "n_features": space.n_features, "direction": inputs.direction.info["hook"],
        "direction_position": inputs.direction.info["position"], "attribution_seconds": t_attr,
        "error_nodes": c.error_nodes, "circuits": summary_groups, "skipped_groups": skipped,
        "rankings": {m: [space.feature_id(i) for i in r.top(c.headline_k)] for m, r in ranks.items()},
        "agreement": {m: {k: v[k] for k in ("overall", "strata", "by_hook_type", "node_means")}
                      for m, v in (agree or {}).get("methods", {}).items()},
        "agreement_prompts": (agree or {}).get("n_prompts"),
        "faithfulness": {k: {"gap": v["gap"], "n_prompts": v["n_prompts"], "size_reaching_half": v["size_reaching_half"],
                             "largest_size": v["largest_size"],
                             "points": [{q: p[q] for q in ("size", "faithfulness", "faithfulness_ci", "completeness",
                                                          "completeness_ci", "random_faithfulness_mean",
                                                          "random_completeness_mean", "faithfulness_p",
                                                          "completeness_p")} for p in v["points"]]}
                         for k, v in (faithfulness or {}).items()},
        "behaviour": {k: behaviour_out[k] for k in ("headline", "clean", "direction", "n_prompts", "n_harmless")}
        if behaviour_out else None,
        "over_refusal": {k: over[k] for k in ("verdict", "intervention", "n_test", "n_features")} if over else None,
    }
    durable.write_json(files.summary, summary)
    from refusal_lens.stages.circuits.plots import write_figures

    write_figures(files.figures, agree, faithfulness, behaviour_out)
    return summary


def format_summary(summary: dict) -> str:
    """The key numbers of a discover run, as printed at the end of the stage (test split)."""
    def f(v, fmt=".3f"):
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

    lines = [f"circuits by {summary['method'].upper()} over {len(summary['hooks'])} hooks ({summary['n_features']} "
             f"features + {len(summary['hooks'])} error nodes), baseline {summary['baseline']} ({summary['reference']})"]
    for m, v in summary.get("agreement", {}).items():
        s = v["strata"]
        lines.append(f"agreement with exact patching ({m}, {summary.get('agreement_prompts')} test prompts; Pearson / "
                     f"sign agreement): error nodes {f(s['error'].get('pearson'))} / {f(s['error'].get('sign_agreement'))}, "
                     f"top {f(s['top'].get('pearson'))} / {f(s['top'].get('sign_agreement'))}, random "
                     f"{f(s['random'].get('pearson'))} / {f(s['random'].get('sign_agreement'))}")
    for key, v in summary.get("faithfulness", {}).items():
        pts = ", ".join(f"{p['size']}: {f(p['faithfulness'], '.2f')} (random {f(p['random_faithfulness_mean'], '.2f')})"
                        for p in v["points"])
        lines.append(f"faithfulness {key} on {v['n_prompts']} test prompts (gap {f(v['gap'], '.2f')}): {pts}; "
                     f"reaches 0.5 at {v['size_reaching_half'] or 'no size up to ' + str(v['largest_size'])}")
    b = summary.get("behaviour")
    if b:
        h = b["headline"]
        lines.append(
            f"behaviour on {b['n_prompts']} refused toxic test prompts: clean {f(b['clean']['refusal_rate'], '.0%')}, "
            f"direction ablated {f(b['direction']['refusal_rate'], '.0%')}, {h['method']} K={h['k']} ({h['intervention']}, "
            f"{h['positions']}) {f(h['refusal_rate'], '.0%')} [{f(h['ci'][0], '.0%')}, {f(h['ci'][1], '.0%')}] = "
            f"{f(h['fraction_of_direction'], '.0%')} of the direction's effect; random sets {f(h['random_mean'], '.0%')} "
            f"(p = {f(h['random_p_value'])}); coherent {f(h['coherent_rate'], '.0%')}; smallest K reaching 90%: "
            f"{h['smallest_k_reaching_90']}")
    o = summary.get("over_refusal")
    if o:
        lines.append(f"over-refusal's own features ({o['intervention']}; {o['n_test']['safe_refused']} refused safe, "
                     f"{o['n_test']['toxic_refused']} refused toxic test prompts): {o['verdict']}")
    return "\n".join(lines)

