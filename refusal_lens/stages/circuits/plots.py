"""Validation figures of the discover stage (plotly, written offline: plotly.js sits next to them)."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusal_lens.infra import durable

STRATUM_COLOURS = {"error": "#d62728", "top": "#1f77b4", "random": "#7f7f7f"}


def agreement_figure(agree: dict) -> go.Figure:
    """Estimated vs exact node effects (node means over the agreement prompts), by stratum, with y = x."""
    methods = list(agree["methods"])
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=[
        f"{m.upper()}: Pearson {agree['methods'][m]['overall']['pearson'] or float('nan'):.3f} over "
        f"{agree['methods'][m]['overall']['n']} (node, prompt) pairs" for m in methods])
    pts = agree["points"]
    exact = [p["exact"] for p in pts]
    lo, hi = min(exact + [0.0]), max(exact + [0.0])
    for k, m in enumerate(methods, start=1):
        for stratum, colour in STRATUM_COLOURS.items():
            sel = [p for p in pts if p["stratum"] == stratum]
            fig.add_trace(go.Scatter(x=[p["exact"] for p in sel], y=[p[m] for p in sel], mode="markers",
                                     name=f"{stratum} ({m})", marker=dict(color=colour), text=[p["node"] for p in sel],
                                     hovertemplate="%{text}<br>exact %{x:.4f}<br>estimate %{y:.4f}"), row=1, col=k)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="gray"),
                                 showlegend=False), row=1, col=k)
        fig.update_xaxes(title_text="exact patching effect", row=1, col=k)
        fig.update_yaxes(title_text="estimated effect", row=1, col=k)
    fig.update_layout(title=f"Attribution vs exact patching on {agree['n_prompts']} test prompts ({agree['n_nodes']} nodes "
                            "in three strata)", height=440)
    return fig


def faithfulness_figure(faith: dict) -> go.Figure:
    fig = go.Figure()
    for key, curve in faith.items():
        sizes = [p["size"] for p in curve["points"]]
        for what, dash in (("faithfulness", None), ("completeness", "dot")):
            ys = [p[what] for p in curve["points"]]
            ci = [p.get(f"{what}_ci") for p in curve["points"]]
            fig.add_trace(go.Scatter(
                x=sizes, y=ys, mode="lines+markers", line=dict(dash=dash), name=f"{key} {what}",
                error_y=dict(type="data", array=[(c[1] - y) if c and y is not None else 0 for c, y in zip(ci, ys)],
                             arrayminus=[(y - c[0]) if c and y is not None else 0 for c, y in zip(ci, ys)])))
            rand = [p.get(f"random_{what}_mean") for p in curve["points"]]
            fig.add_trace(go.Scatter(x=sizes, y=rand, mode="lines+markers", line=dict(dash="dash"),
                                     name=f"{key} random sets ({what}, mean)"))
    fig.add_hline(y=0.5, line_dash="dot", line_color="gray")
    fig.update_xaxes(type="log", title="circuit size (nodes, ranked on discovery)")
    fig.update_yaxes(title="fraction of the score (1 = full model, 0 = every node at its mean)")
    fig.update_layout(title="Faithfulness and completeness on test prompts (bootstrap 95% intervals; random node sets)",
                      height=480)
    return fig


def k_curve_figure(behaviour: dict) -> go.Figure:
    """Refusal rate against K for each selection method, with the clean, direction and random levels."""
    fig = go.Figure()
    h = behaviour["headline"]
    base = [c for c in behaviour["curve"] if c["intervention"] == h["intervention"] and c["positions"] == h["positions"]]
    for method in dict.fromkeys(c["method"] for c in base):
        pts = sorted((c for c in base if c["method"] == method), key=lambda c: c["k"])
        fig.add_trace(go.Scatter(
            x=[c["k"] for c in pts], y=[c["refusal_rate"] for c in pts], mode="lines+markers", name=method,
            error_y=dict(type="data", array=[c["ci"][1] - c["refusal_rate"] for c in pts],
                         arrayminus=[c["refusal_rate"] - c["ci"][0] for c in pts])))
    fig.add_hline(y=behaviour["clean"]["refusal_rate"], line_dash="dot", annotation_text="clean")
    fig.add_hline(y=behaviour["direction"]["refusal_rate"], line_dash="dash", annotation_text="direction ablated")
    r = behaviour["random"]["controls"]
    if r.get("n"):
        fig.add_trace(go.Box(x=[h["k"]] * r["n"], y=r["values"], name=f"random sets at K={h['k']}", boxpoints="all"))
    fig.update_xaxes(type="log", title="refusal-promoting features ablated (K)")
    fig.update_yaxes(title="refusal rate (judged)", range=[0, 1.05])
    fig.update_layout(title=f"Refusal of {behaviour['n_prompts']} refused toxic test prompts with the top-K promoting "
                            f"features ablated ({h['intervention']}, {h['positions']} positions)", height=480)
    return fig


def write_figures(fig_dir: Path, agree: dict | None, faith: dict | None, behaviour: dict | None) -> list[Path]:
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(exist_ok=True)
    figs = {}
    if agree:
        figs["agreement"] = agreement_figure(agree)
    if faith:
        figs["faithfulness"] = faithfulness_figure(faith)
    if behaviour:
        figs["behaviour"] = k_curve_figure(behaviour)
    paths = []
    for name, fig in figs.items():
        path = fig_dir / f"{name}.html"
        durable.write_plotly_html(fig, path, include_plotlyjs="directory")
        paths.append(path)
    return paths
