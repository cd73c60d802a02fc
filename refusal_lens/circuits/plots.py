"""Validation figures of the discover stage (plotly, written offline: plotly.js sits next to them)."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusal_lens import durable


def agreement_figure(agree: dict) -> go.Figure:
    """Estimated vs exact node effects, one panel per estimator, with y = x."""
    methods = list(agree["methods"])
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=[
        f"{m.upper()}: Pearson {agree['methods'][m]['overall']['pearson']:.3f}, "
        f"Spearman {agree['methods'][m]['overall']['spearman']:.3f}" for m in methods])
    pts = agree["points"]
    exact = [p["exact"] for p in pts]
    lo, hi = min(exact + [0.0]), max(exact + [0.0])
    for k, m in enumerate(methods, start=1):
        fig.add_trace(go.Scatter(x=exact, y=[p[m] for p in pts], mode="markers", name=m.upper(),
                                 text=[p["node"] for p in pts], hovertemplate="%{text}<br>exact %{x:.4f}<br>est %{y:.4f}"),
                      row=1, col=k)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="gray"),
                                 showlegend=False), row=1, col=k)
        fig.update_xaxes(title_text="exact patching effect", row=1, col=k)
        fig.update_yaxes(title_text="estimated effect", row=1, col=k)
    fig.update_layout(title=f"Attribution vs exact patching ({agree['n_nodes']} nodes, {agree.get('n_prompts', '?')} prompts)",
                      height=420)
    return fig


def faithfulness_figure(faith: dict) -> go.Figure:
    fig = go.Figure()
    for key, curve in faith["curves"].items():
        sizes = [p["size"] for p in curve["points"]]
        fig.add_trace(go.Scatter(x=sizes, y=[p["faithfulness"] for p in curve["points"]], mode="lines+markers",
                                 name=f"{key} faithfulness"))
        fig.add_trace(go.Scatter(x=sizes, y=[p["completeness"] for p in curve["points"]], mode="lines+markers",
                                 line=dict(dash="dot"), name=f"{key} completeness"))
        rand = []
        for p in curve["points"]:
            vals = [v for v in p["random_faithfulness"] if v is not None]
            rand.append(sum(vals) / len(vals) if vals else None)
        fig.add_trace(go.Scatter(x=sizes, y=rand, mode="lines+markers", line=dict(dash="dash"),
                                 name=f"{key} random sets (faithfulness)"))
    fig.update_xaxes(type="log", title="circuit size (nodes)")
    fig.update_yaxes(title="fraction of the metric (1 = full model, 0 = every node at baseline)")
    fig.update_layout(title="Faithfulness and completeness of the pooled circuits", height=480)
    return fig


def behaviour_figure(behaviour: dict) -> go.Figure:
    names = list(behaviour["conditions"])
    rates = [behaviour["conditions"][n]["refusal_rate"] for n in names]
    fig = go.Figure(go.Bar(x=names, y=rates, text=[f"{r:.0%}" for r in rates], textposition="outside"))
    fig.update_layout(title=f"Refusal rate on {behaviour['n_prompts']} refused toxic prompts "
                            f"({behaviour['n_features']} circuit features ablated)",
                      yaxis=dict(title="refusal rate (keyword rule)", range=[0, 1.1]), height=420)
    return fig


def write_figures(out_dir: Path, agree: dict, faith: dict, behaviour: dict | None) -> list[Path]:
    fig_dir = Path(out_dir) / "figures"
    fig_dir.mkdir(exist_ok=True)
    figs = {"agreement": agreement_figure(agree), "faithfulness": faithfulness_figure(faith)}
    if behaviour:
        figs["behaviour"] = behaviour_figure(behaviour)
    paths = []
    for name, fig in figs.items():
        path = fig_dir / f"{name}.html"
        durable.write_plotly_html(fig, path, include_plotlyjs="directory")
        paths.append(path)
    return paths
