"""Plotly figures of the analysis report (each returned with its caption)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from refusal_lens.stages.circuits.plots import agreement_figure, faithfulness_figure, k_curve_figure
from refusal_lens.stages.direction import figures as D
from refusal_lens.core.hooks import parse_hook_name


def _hook_label(hook: str) -> str:
    site = parse_hook_name(hook)
    return f"L{site.layer} {site.hook_type or site.point}" if site else hook


def similarity_heatmap(sims: Sequence[dict], table: str) -> go.Figure | None:
    rows = [s for s in sims if s["table"] == table]
    if not rows:
        return None
    la, lb = table.split(" x ")
    cats_a = sorted({s["a"].split("/")[1] for s in rows} | ({s["b"].split("/")[1] for s in rows} if la == lb else set()))
    cats_b = cats_a if la == lb else sorted({s["b"].split("/")[1] for s in rows})
    ia, ib = {c: i for i, c in enumerate(cats_a)}, {c: i for i, c in enumerate(cats_b)}
    z = np.full((len(cats_a), len(cats_b)), np.nan)
    text = np.full((len(cats_a), len(cats_b)), "", dtype=object)
    for s in rows:
        i, j = ia[s["a"].split("/")[1]], ib[s["b"].split("/")[1]]
        val = s["normalised"]
        z[i, j] = val if val is not None else np.nan
        text[i, j] = (f"{s['verdict']}<br>normalised {val if val is None else round(val, 2)}<br>q={s['q_value']}"
                      f"<br>n={s['n_a']}/{s['n_b']}")
        if la == lb:
            z[j, i], text[j, i] = z[i, j], text[i, j]
    fig = go.Figure(go.Heatmap(z=z, x=cats_b, y=cats_a, text=text, hoverinfo="text", zmin=0, zmax=1.2,
                               colorscale="Blues", colorbar=dict(title="normalised<br>similarity")))
    fig.update_layout(title=f"Circuit similarity on test prompts, {table} (rows: {la}, columns: {lb})", height=560,
                      xaxis_title=f"{lb} category", yaxis_title=f"{la} category")
    return fig


def refusal_rates(rates: Sequence[dict], split: str = "test") -> go.Figure:
    rows = [r for r in rates if r.get("split", "all") == split]
    cats = sorted({r["category"] for r in rows if r["category"] != "ALL"})
    fig = go.Figure()
    for label in sorted({r["label"] for r in rows}):
        by = {r["category"]: r for r in rows if r["label"] == label}
        fig.add_trace(go.Bar(x=cats, y=[by[c]["refusal_rate"] if c in by else None for c in cats], name=label,
                             text=[f"{by[c]['refused']}/{by[c]['n']}" if c in by else "" for c in cats]))
    fig.update_layout(title=f"Refusal rate by category ({split} split; safe = over-refusal)", barmode="group",
                      yaxis=dict(title="refusal rate", range=[0, 1.05]), height=420)
    return fig


def sae_quality(quality: Sequence[dict]) -> go.Figure:
    x = [_hook_label(q["hook"]) for q in quality]
    fig = go.Figure()
    for key in ("explained_variance", "ce_loss_recovered", "val_explained_variance", "dead_fraction"):
        fig.add_trace(go.Scatter(x=x, y=[q.get(key) for q in quality], mode="lines+markers", name=key))
    fig.update_layout(title="SAE quality (test split; val_ = validation, the bar)", yaxis=dict(range=[0, 1.05]), height=400)
    return fig


def report_figures(rates, quality, direction: dict, behaviour, faithfulness, agreement, sims,
                   over_refusal_circuit: dict | None = None) -> dict[str, tuple]:
    """name -> (figure, caption) for every figure the data allows."""
    out: dict[str, tuple[go.Figure, str]] = {
        "refusal_rates": (refusal_rates(rates), "Share of test prompts refused per category and label."),
        "sae_quality": (sae_quality(quality), "Explained variance and CE loss recovered (vs mean ablation) per SAE."),
    }
    if direction.get("evaluation"):
        out["direction_evaluation"] = (D.evaluation_bars(direction["evaluation"]),
                                       "The selected direction on test prompts; dashed: random directions ablated.")
    if direction.get("candidates"):
        out["direction_candidates"] = (D.candidate_heatmaps(direction["candidates"]),
                                       "Every candidate (layer x post-instruction position) on validation prompts.")
    if direction.get("emergence"):
        out["emergence"] = (D.emergence_figure(direction["emergence"]),
                            "Where refusal emerges, by intervention: the direction ablated from layer l on only.")
    if direction.get("categories"):
        for name, fig in (("cross_ablation", D.cross_ablation_heatmap(direction["categories"])),
                          ("direction_cosines", D.cosine_heatmap(direction["categories"]))):
            if fig is not None:
                out[name] = (fig, "Per-category directions: ablation across categories, and their cosines.")
    if (fig := D.tradeoff_figure(direction.get("false_refusal"), over_refusal_circuit)) is not None:
        out["false_refusal_tradeoff"] = (fig, "Over-refusal removed vs correct refusal kept on test prompts: the "
                                              "false-refusal vector w'(lambda) (Wang et al. 2025), the refusal "
                                              "direction ablated, ActAdd(-a r), the earlier r_over ablation, and "
                                              "(dotted) the safe-minus-toxic and the toxic circuit's features "
                                              "ablated at each K.")
    if behaviour:
        out["k_curve"] = (k_curve_figure(behaviour), "Refusal against K for each selection method; random sets at the "
                                                     "headline K; clean and direction-ablated levels.")
    if faithfulness:
        out["faithfulness"] = (faithfulness_figure(faithfulness), "Faithfulness and completeness by size on test prompts.")
    if agreement:
        out["agreement"] = (agreement_figure(agreement), "Estimated vs exact node effects by stratum; dashed: y = x.")
    for name, table in (("similarity_toxic", "toxic x toxic"), ("similarity_safe", "safe x safe"),
                        ("similarity_safe_x_toxic", "safe x toxic")):
        fig = similarity_heatmap(sims, table)
        if fig is not None:
            out[name] = (fig, f"Normalised circuit similarity between categories ({table}); hover for the verdict.")
    return out
