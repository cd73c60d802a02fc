"""Figures of the direction stage (plotly; written offline with plotly.js beside them, and in the report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusal_lens.infra import durable


def candidate_heatmaps(candidates: dict) -> go.Figure:
    """Layer x position heatmaps of bypass (exact where measured, else the screen's estimate), induce and KL."""
    n_layers, n_post = candidates["n_layers"], candidates["n_post_instruction"]
    grids = {k: np.full((n_layers, n_post), np.nan) for k in ("bypass", "bypass_estimate", "induce", "kl")}
    for s in candidates["candidates"]:
        for k in grids:
            if s.get(k) is not None:
                grids[k][s["layer"], s["j"]] = s[k]
    titles = ["bypass, screen estimate (every candidate)", "bypass, measured (shortlist)", "induce, measured",
              "KL, measured"]
    fig = make_subplots(rows=1, cols=4, subplot_titles=titles, horizontal_spacing=0.06)
    x = [str(j - n_post) for j in range(n_post)]
    y = list(range(n_layers))
    for col, (key, scale) in enumerate((("bypass_estimate", "RdBu_r"), ("bypass", "RdBu_r"), ("induce", "RdBu_r"),
                                        ("kl", "Viridis")), start=1):
        fig.add_trace(go.Heatmap(z=grids[key], x=x, y=y, colorscale=scale, showscale=False,
                                 hovertemplate="layer %{y}, position %{x}: %{z:.3f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="position (from the prompt's end)", row=1, col=col)
    fig.update_yaxes(title_text="layer (block input)", row=1, col=1)
    fig.update_layout(title="Refusal-direction candidates (validation split): lower bypass = ablation removes refusal",
                      height=520)
    return fig


def evaluation_bars(evaluation: dict) -> go.Figure:
    cond = evaluation["conditions"]
    keys = ["harmful_refused/clean", "harmful_refused/ablated", "harmful_refused/actadd_minus", "harmless/clean",
            "harmless/actadd_plus"]
    keys = [k for k in keys if k in cond]
    rates = [cond[k]["refusal_rate"] for k in keys]
    err_hi = [cond[k]["ci"][1] - cond[k]["refusal_rate"] for k in keys]
    err_lo = [cond[k]["refusal_rate"] - cond[k]["ci"][0] for k in keys]
    fig = go.Figure(go.Bar(x=[f"{k} (n={cond[k]['n']})" for k in keys], y=rates, text=[f"{r:.0%}" for r in rates],
                           textposition="outside",
                           error_y=dict(type="data", array=err_hi, arrayminus=err_lo)))
    ra = evaluation.get("random_ablated") or {}
    if ra.get("n"):
        fig.add_hline(y=ra["mean"], line_dash="dash", annotation_text=f"random directions ablated: {ra['mean']:.0%}")
    fig.update_layout(title="The refusal direction on the test split (greedy generation, judged; Wilson 95% intervals)",
                      yaxis=dict(title="refusal rate", range=[0, 1.15]), height=460)
    return fig


def cross_ablation_heatmap(categories: dict) -> go.Figure | None:
    cross = categories.get("cross_ablation")
    if not cross or not cross["cells"]:
        return None
    rows, cols = cross["rows"], cross["columns"]
    z = np.full((len(rows), len(cols)), np.nan)
    text = np.full((len(rows), len(cols)), "", dtype=object)
    for cell in cross["cells"]:
        i, j = rows.index(cell["direction"]), cols.index(cell["category"])
        z[i, j] = cell["refusal_rate"]
        lo, hi = cell["ci"]
        text[i, j] = f"{cell['refusal_rate']:.0%} [{lo:.0%}, {hi:.0%}] n={cell['n']}<br>{cell['verdict']}"
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, text=text, hoverinfo="text", zmin=0, zmax=1, colorscale="Reds",
                               colorbar=dict(title="refusal rate")))
    fig.update_layout(title="Cross-ablation: refusal of each category's refused toxic test prompts (columns) with a "
                            "direction ablated (rows)", height=120 + 36 * len(rows),
                      xaxis_title="test prompts of category", yaxis_title="direction ablated")
    return fig


def cosine_heatmap(categories: dict) -> go.Figure | None:
    cos = categories.get("cosines")
    if not cos:
        return None
    names = list(cos)
    z = [[cos[a][b] for b in names] for a in names]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu", colorbar=dict(title="cosine")))
    fig.update_layout(title="Cosines of per-category refusal directions (discovery)", height=120 + 36 * len(names))
    return fig


def emergence_figure(emergence: dict) -> go.Figure:
    fig = go.Figure()
    for name, g in emergence["groups"].items():
        if not g.get("n"):
            continue
        xs = [p["from_layer"] for p in g["points"]]
        ys = [p["mean"] for p in g["points"]]
        lo = [p["ci"][0] for p in g["points"]]
        hi = [p["ci"][1] for p in g["points"]]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"{name} (n={g['n']})",
                                 error_y=dict(type="data", array=[h - y for h, y in zip(hi, ys)],
                                              arrayminus=[y - lo_ for y, lo_ in zip(ys, lo)])))
        fig.add_hline(y=g["clean"], line_dash="dot", annotation_text=f"{name} clean")
    fig.update_layout(title="Where refusal emerges: refusal score with the direction ablated from layer l on only "
                            "(test split, bootstrap 95% intervals)",
                      xaxis_title="first ablated layer l", yaxis_title="mean refusal score", height=440)
    return fig


def tradeoff_figure(false: dict | None, circuit: dict | None = None) -> go.Figure | None:
    """Over-refusal removed (x: 1 - refusal of the refused safe test prompts) against correct refusal kept (y:
    refusal of the refused toxic test prompts) for every method of the false-refusal experiment, and (``circuit``,
    the discover stage's over-refusal record) one line per feature ranking through its K's; the ideal is the
    top-right corner. Error bars: the Wilson intervals."""
    rows = (false or {}).get("conditions") or {}
    points = [(name, r["safe_refused"], r["toxic_refused"]) for name, r in rows.items()
              if "safe_refused" in r and "toxic_refused" in r]
    if not points:
        return None
    fig = go.Figure()
    for name, safe, toxic in points:
        x, y = 1 - safe["refusal_rate"], toxic["refusal_rate"]
        fig.add_trace(go.Scatter(
            x=[x], y=[y], mode="markers+text", text=[name], textposition="top center", name=name,
            error_x=dict(type="data", symmetric=False, array=[safe["ci"][1] - safe["refusal_rate"]],
                         arrayminus=[safe["refusal_rate"] - safe["ci"][0]]),
            error_y=dict(type="data", symmetric=False, array=[toxic["ci"][1] - y], arrayminus=[y - toxic["ci"][0]])))
    for method, curve in ((circuit or {}).get("curves") or {}).items():
        pts = [(int(k), r) for k, r in curve.items() if "safe_refused" in r and "toxic_refused" in r]
        fig.add_trace(go.Scatter(
            x=[1 - r["safe_refused"]["refusal_rate"] for _, r in pts], y=[r["toxic_refused"]["refusal_rate"] for _, r in pts],
            mode="lines+markers+text", text=[f"K={k}" for k, _ in pts], textposition="bottom right",
            name=f"{method} features ({circuit['intervention']})", line=dict(dash="dot")))
    fig.update_layout(title=f"Over-refusal removed vs correct refusal kept (test; {points[0][1]['n']} refused safe, "
                            f"{points[0][2]['n']} refused toxic prompts)",
                      xaxis=dict(title="over-refusal removed (1 - refused safe still refused)", range=[-0.05, 1.05]),
                      yaxis=dict(title="correct refusal kept (refused toxic still refused)", range=[-0.05, 1.05]),
                      showlegend=False, height=500)
    return fig


def figures(candidates: dict, evaluation: dict, categories: dict, emergence: dict,
            false: dict | None = None) -> dict[str, go.Figure]:
    out = {"direction_candidates": candidate_heatmaps(candidates), "direction_evaluation": evaluation_bars(evaluation),
           "emergence": emergence_figure(emergence)}
    if (fig := tradeoff_figure(false)) is not None:
        out["false_refusal_tradeoff"] = fig
    for name, fig in (("cross_ablation", cross_ablation_heatmap(categories)), ("direction_cosines", cosine_heatmap(categories))):
        if fig is not None:
            out[name] = fig
    return out


def write_figures(fig_dir: Path, candidates: dict, evaluation: dict, categories: dict, emergence: dict,
                  false: dict | None = None) -> list[Path]:
    """Every figure of the stage as ``<fig_dir>/<name>.html`` (plotly.js beside them)."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(exist_ok=True)
    paths = []
    for name, fig in figures(candidates, evaluation, categories, emergence, false).items():
        path = fig_dir / f"{name}.html"
        durable.write_plotly_html(fig, path, include_plotlyjs="directory")
        paths.append(path)
    return paths
