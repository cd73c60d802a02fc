"""Plotly figures of SAE training (see docs/SAE_TRAINING_PLOTS.md for how to read them)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from refusal_lens.infra import durable
from refusal_lens.run.folder import SAEFiles
from refusal_lens.core.hooks import hook_sort_key, parse_hook_name

CURVES = (("mse", "MSE (scaled input)"), ("explained_variance", "explained variance"), ("l0", "L0"),
          ("dead_fraction", "dead feature fraction"))


def training_curves(logs: dict[str, Sequence[dict]]):
    """One panel per metric, one line per hook, x = training tokens."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=[title for _, title in CURVES])
    for hook in sorted(logs, key=hook_sort_key):
        rows = logs[hook]
        for i, (key, _) in enumerate(CURVES):
            fig.add_scatter(
                x=[r["tokens"] for r in rows], y=[r[key] for r in rows], mode="lines", name=hook,
                legendgroup=hook, showlegend=i == 0, row=i // 2 + 1, col=i % 2 + 1,
            )
    fig.update_xaxes(title_text="training tokens")
    fig.update_layout(title="SAE training curves (training batches)", height=700)
    return fig


def layer_metrics(quality: Sequence[dict], min_ev: float, min_ce: float):
    """Held-out explained variance and CE loss recovered by layer, one line per hook type."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=["explained variance (held-out)",
                                                        "CE loss recovered (held-out)", "L0 (held-out)"])
    by_type: dict[str, list[dict]] = {}
    for row in quality:
        site = parse_hook_name(row["hook"])
        by_type.setdefault(site.point if site else row["hook"], []).append(row)
    for point, rows in by_type.items():
        rows = sorted(rows, key=lambda r: r["layer"])
        for col, key in enumerate(("explained_variance", "ce_loss_recovered", "l0"), start=1):
            fig.add_scatter(x=[r["layer"] for r in rows], y=[r[key] for r in rows], mode="lines+markers",
                            name=point, legendgroup=point, showlegend=col == 1, row=1, col=col)
    fig.add_hline(y=min_ev, line_dash="dot", row=1, col=1, annotation_text="bar")
    fig.add_hline(y=min_ce, line_dash="dot", row=1, col=2, annotation_text="bar")
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title="SAE quality by layer (held-out prompts)", height=420)
    return fig


def write_figures(files: SAEFiles, quality: Sequence[dict], min_ev: float, min_ce: float) -> list[Path]:
    """Write the two figures as self-contained HTML (plotly.js embedded: works offline)."""
    logs = {}
    for row in quality:
        path = SAEFiles.training_log(files.hook(row["hook"]))
        if path.is_file():
            logs[row["hook"]] = [json.loads(line) for line in path.read_text().splitlines() if line]
    fig_dir = files.figures
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figures = {"training_curves": training_curves(logs)} if logs else {}
    figures["layer_metrics"] = layer_metrics(quality, min_ev, min_ce)
    for name, fig in figures.items():
        durable.write_plotly_html(fig, fig_dir / f"{name}.html", include_plotlyjs=True)
        written.append(fig_dir / f"{name}.html")
    return written
