"""Plotly figures of the analysis report (each returned with its caption)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from refusal_lens.circuits.plots import agreement_figure, behaviour_figure, faithfulness_figure
from refusal_lens.hooks import parse_hook_name


def _hook_label(hook: str) -> str:
    site = parse_hook_name(hook)
    return f"L{site.layer} {site.hook_type or site.point}" if site else hook


def emergence_lines(emerg: dict, keys: Sequence[str], title: str) -> go.Figure:
    fig = go.Figure()
    for k in keys:
        prof = emerg[k]["profile"]
        fig.add_trace(go.Scatter(x=[_hook_label(p["hook"]) for p in prof], y=[p["total_abs"] for p in prof],
                                 mode="lines+markers", name=f"{k} (n={emerg[k]['n_prompts']})"))
    fig.update_layout(title=title, xaxis_title="hook (depth order)", yaxis_title="total |effect| on the refusal metric",
                      height=420)
    return fig


def emergence_heatmap(emerg: dict, label: str) -> go.Figure | None:
    keys = sorted(k for k in emerg if k.startswith(label + "/") and not k.endswith("/all"))
    if not keys:
        return None
    hooks = [p["hook"] for p in emerg[keys[0]]["profile"]]
    z = [[p["total_abs"] / max(sum(q["total_abs"] for q in emerg[k]["profile"]), 1e-12) for p in emerg[k]["profile"]]
         for k in keys]
    fig = go.Figure(go.Heatmap(z=z, x=[_hook_label(h) for h in hooks],
                               y=[f"{k.split('/')[1]} (n={emerg[k]['n_prompts']})" for k in keys],
                               colorscale="Viridis", colorbar=dict(title="share")))
    fig.update_layout(title=f"{label}: share of each category's |effect| by hook", height=80 + 32 * len(keys))
    return fig


def similarity_heatmap(sims: Sequence[dict], cats: Sequence[str], pair: str) -> go.Figure | None:
    rows = [s for s in sims if s["pair"] == pair]
    if not rows:
        return None
    la, lb = pair.split(" x ")
    idx = {c: i for i, c in enumerate(cats)}
    z = np.full((len(cats), len(cats)), np.nan)
    text = np.full((len(cats), len(cats)), "", dtype=object)
    for s in rows:
        i, j = idx[s["a"].split("/")[1]], idx[s["b"].split("/")[1]]
        z[i, j] = s["similarity"]
        text[i, j] = f"{s['similarity']:.2f}<br>p={s['p_value']:.3f}<br>{s['verdict']}"
        if la == lb:
            z[j, i], text[j, i] = z[i, j], text[i, j]
    fig = go.Figure(go.Heatmap(z=z, x=list(cats), y=list(cats), text=text, hoverinfo="text", zmin=0, zmax=1,
                               colorscale="Blues", colorbar=dict(title="similarity")))
    fig.update_layout(title=f"Circuit similarity, {pair} (rows: {la}, columns: {lb})", height=560,
                      xaxis_title=f"{lb} category", yaxis_title=f"{la} category")
    return fig


def direction_auroc(direction: dict) -> go.Figure:
    layers = direction["layers"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[d["layer"] for d in layers], y=[d["auroc"] for d in layers], mode="lines+markers",
                             name="held-out AUROC (toxic vs safe)"))
    fig.add_vline(x=direction["layer"], line_dash="dash", annotation_text=f"chosen layer {direction['layer']}")
    fig.update_layout(title="Refusal direction: held-out separation by layer", xaxis_title="layer (resid_post)",
                      yaxis=dict(title="AUROC", range=[0.4, 1.02]), height=400)
    return fig


def direction_cosines(direction: dict) -> go.Figure | None:
    cos = direction.get("circuit_feature_cosines") or []
    if not cos:
        return None
    fig = go.Figure()
    for key in sorted({c["circuit"] for c in cos}):
        sub = [c for c in cos if c["circuit"] == key]
        fig.add_trace(go.Scatter(x=[c["effect"] for c in sub], y=[c["cosine"] for c in sub], mode="markers", name=key,
                                 text=[c["node"] for c in sub]))
    base = direction.get("random_feature_abs_cosine_mean")
    if base is not None:
        fig.add_hline(y=base, line_dash="dot", annotation_text=f"mean |cos| of random features {base:.3f}")
        fig.add_hline(y=-base, line_dash="dot")
    fig.update_layout(title="Circuit features: decoder direction vs refusal direction", xaxis_title="node effect",
                      yaxis_title="cosine", height=420)
    return fig


def refusal_rates(rates: Sequence[dict]) -> go.Figure:
    cats = sorted({r["category"] for r in rates if r["category"] != "ALL"})
    fig = go.Figure()
    for label in ("safe", "toxic"):
        by = {r["category"]: r for r in rates if r["label"] == label}
        fig.add_trace(go.Bar(x=cats, y=[by[c]["rate"] if c in by else None for c in cats], name=label,
                             text=[f"{by[c]['refused']}/{by[c]['n']}" if c in by else "" for c in cats]))
    fig.update_layout(title="Refusal rate by category (safe = over-refusal)", barmode="group",
                      yaxis=dict(title="refusal rate", range=[0, 1.05]), height=420)
    return fig


def sae_quality(quality: Sequence[dict]) -> go.Figure:
    x = [_hook_label(q["hook"]) for q in quality]
    fig = go.Figure()
    for key in ("explained_variance", "ce_loss_recovered", "dead_fraction"):
        fig.add_trace(go.Scatter(x=x, y=[q.get(key) for q in quality], mode="lines+markers", name=key))
    fig.update_layout(title="SAE quality on held-out prompts", yaxis=dict(range=[0, 1.05]), height=400)
    return fig


def build_figures(emerg, sims, cats, direction, c_summary, quality, rates, hooks) -> dict[str, tuple[go.Figure, str]]:
    """name -> (figure, caption) for every figure the data allows."""
    import json
    from pathlib import Path

    out: dict[str, tuple[go.Figure, str]] = {
        "refusal_rates": (refusal_rates(rates), "Share of prompts refused (keyword rule) per category and label."),
        "sae_quality": (sae_quality(quality), "Held-out explained variance, CE loss recovered and dead features per SAE."),
    }
    circuits_dir = Path(c_summary.get("_folder", ""))
    val = circuits_dir / "validation"
    if (val / "agreement.json").is_file():
        out["agreement"] = (agreement_figure(json.loads((val / "agreement.json").read_text())),
                            "Estimated vs exact node effects (mean over the sample prompts); dashed: y = x.")
    if (val / "faithfulness.json").is_file():
        out["faithfulness"] = (faithfulness_figure(json.loads((val / "faithfulness.json").read_text())),
                               "Faithfulness and completeness of the pooled circuits by size, with random node sets.")
    if c_summary.get("behaviour"):
        out["behaviour"] = (behaviour_figure(c_summary["behaviour"]),
                            "Refusal rate of greedy responses on refused toxic prompts under each intervention.")
    pooled = [k for k in ("toxic/all", "safe/all") if k in emerg]
    if pooled:
        out["emergence_pooled"] = (emergence_lines(emerg, pooled, "Where refusal emerges: pooled circuits"),
                                   "Total |effect| of each hook's nodes, safe vs toxic.")
    for label in ("toxic", "safe"):
        fig = emergence_heatmap(emerg, label)
        if fig is not None:
            out[f"emergence_{label}"] = (fig, f"Per category ({label}): each hook's share of the category's total |effect|.")
    for name, pair in (("similarity_safe", "safe x safe"), ("similarity_toxic", "toxic x toxic"),
                       ("similarity_safe_x_toxic", "safe x toxic")):
        fig = similarity_heatmap(sims, cats, pair)
        if fig is not None:
            out[name] = (fig, f"Circuit similarity between categories ({pair}); hover for p-value and verdict.")
    out["direction_auroc"] = (direction_auroc(direction), "Held-out AUROC of the difference-in-means direction per layer.")
    fig = direction_cosines(direction)
    if fig is not None:
        out["direction_cosines"] = (fig, "Cosine between each circuit feature's decoder vector and the refusal "
                                         "direction at its layer; dotted: mean |cosine| of random features.")
    return out
