"""One refusal mechanism or many, by intervention: per-category directions and the cross-ablation matrix.

* **Per-category directions**: at the selected layer and position, ``r_c = mean(harmful of category c) -
  mean(harmless)`` over the discovery split's contrast prompts. Their cosines (with the global direction as
  one more row) get percentile bootstrap intervals, the prompts of each side resampled.
* **Cross-ablation**: ablate direction A (every residual write, every position) and measure the refusal
  rate on category B's refused toxic test prompts. ``transfer(A -> B) = (clean_B - rate_{A->B}) /
  (clean_B - rate_{B->B})`` is the share of B's own ablation effect that A's direction reaches, with a
  paired bootstrap interval over B's prompts. A cell is *shared* when the interval's lower bound is at
  least ``analysis.shared_margin``, *distinct* when its upper bound is below it, *indeterminate* otherwise,
  and *insufficient* below ``analysis.min_prompts`` test prompts (or when B's own direction removes no
  refusal: there is nothing to transfer).
* **Over-refusal**: ``r_over = mean(refused safe) - mean(refused toxic)`` at the selected layer and
  position (discovery), ablated from every write and subtracted at the layer's input; the refusal rates of
  safe *and* toxic test prompts under each: can over-refusal fall while correct refusal stays?
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.behaviour import Condition, ResponseAudit, Runs, summarise
from refusal_lens.chat import POST, EncodedPrompt
from refusal_lens.direction.edits import ablation_edits, addition_edits
from refusal_lens.hooks import hook_name
from refusal_lens.intervene import Edit, Intervener
from refusal_lens.judge import judge


def site_activations(intervener: Intervener, prompts: Sequence[EncodedPrompt], layer: int, j: int) -> torch.Tensor:
    """``[n, d]`` float64 block input of ``layer`` at post-instruction token ``j`` of each prompt."""
    store: dict[int, torch.Tensor] = {}

    def fn(x, ctx):
        at = ctx.classes == POST + j
        for b, row in enumerate(ctx.rows):
            if at[b].any():
                store[row] = x[b][at[b]][0].double().cpu()
        return x

    intervener.last_logits(prompts, [Edit(hook_name("resid_pre", layer), fn, opening=False)])
    d = intervener.model.config.hidden_size
    return torch.stack([store[i] for i in range(len(prompts))]) if prompts else torch.zeros(0, d, dtype=torch.float64)


def cosine_matrix(vectors: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    names = list(vectors)
    out = {}
    for a in names:
        out[a] = {b: float(torch.nn.functional.cosine_similarity(vectors[a], vectors[b], dim=0)) for b in names}
    return out


def bootstrap_cosines(harmful: dict[str, torch.Tensor], harmless: torch.Tensor, n_boot: int, seed: int,
                      level: float = 0.95) -> dict[str, dict[str, list[float]]]:
    """Percentile intervals of the cosines between per-group mean differences, prompts resampled per side."""
    rng = np.random.default_rng(seed)
    names = list(harmful)
    draws: dict[tuple[str, str], list[float]] = {(a, b): [] for a in names for b in names}
    for _ in range(n_boot):
        base = harmless[rng.integers(0, len(harmless), len(harmless))].mean(0)
        vecs = {g: x[rng.integers(0, len(x), len(x))].mean(0) - base for g, x in harmful.items()}
        for a in names:
            for b in names:
                draws[(a, b)].append(float(torch.nn.functional.cosine_similarity(vecs[a], vecs[b], dim=0)))
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return {a: {b: [float(np.quantile(draws[(a, b)], lo)), float(np.quantile(draws[(a, b)], hi))] for b in names}
            for a in names}


def transfer_interval(clean: np.ndarray, cross: np.ndarray, own: np.ndarray, n_boot: int, rng: np.random.Generator,
                      level: float = 0.95) -> tuple[float | None, list[float] | None]:
    """``(mean clean - mean cross) / (mean clean - mean own)`` over paired prompts (1 = refused), with a paired
    percentile bootstrap interval; None when the own effect is zero."""
    def stat(idx):
        den = clean[idx].mean() - own[idx].mean()
        return (clean[idx].mean() - cross[idx].mean()) / den if den > 0 else np.nan

    full = np.arange(len(clean))
    point = stat(full)
    if point != point:
        return None, None
    vals = np.asarray([stat(rng.integers(0, len(clean), len(clean))) for _ in range(n_boot)])
    vals = vals[vals == vals]
    if len(vals) == 0:
        return float(point), None
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(point), [float(np.quantile(vals, lo)), float(np.quantile(vals, hi))]


def transfer_verdict(ci: list[float] | None, n: int, min_prompts: int, margin: float) -> str:
    if n < min_prompts or ci is None:
        return "insufficient"
    if ci[0] >= margin:
        return "shared"
    if ci[1] < margin:
        return "distinct"
    return "indeterminate"


def cross_ablation(intervener: Intervener, directions: dict[str, torch.Tensor], n_layers: int,
                   prompts: Sequence[EncodedPrompt], ids: Sequence[str], categories: Sequence[str],
                   max_new_tokens: int, n_boot: int, seed: int, min_prompts: int, margin: float,
                   audit: ResponseAudit, show_progress: bool = True) -> dict:
    """Rows: directions (``all`` and each category); columns: categories of the refused toxic test prompts."""
    cols = sorted(set(categories))
    names = ["clean", *directions]
    plan = [Condition("cross/clean", prompts, ids, [], {})] + [
        Condition(f"cross/{name}", prompts, ids, ablation_edits(vec, n_layers), {}) for name, vec in directions.items()]
    start = len(audit.rows)
    with tqdm(total=len(plan), desc="cross-ablation", disable=not show_progress) as bar:
        Runs(intervener, max_new_tokens, audit, bar)(plan)
    texts_of = {name: [r["response"] for r in audit.rows[start + k * len(prompts) : start + (k + 1) * len(prompts)]]
                for k, name in enumerate(names)}
    clean_texts = texts_of["clean"]
    clean = np.asarray([judge(t).refused for t in clean_texts], dtype=float)
    refused: dict[str, np.ndarray] = {}
    rates: dict[str, dict[str, dict]] = {}
    for name in directions:
        texts = texts_of[name]
        refused[name] = np.asarray([judge(t).refused for t in texts], dtype=float)
        rates[name] = {c: summarise([t for t, cat in zip(texts, categories) if cat == c]) for c in cols}
    rng = np.random.default_rng(seed)
    cells = []
    for a in directions:
        for b in cols:
            idx = np.asarray([i for i, cat in enumerate(categories) if cat == b])
            cell = {"direction": a, "category": b, "n": int(len(idx)), **{k: rates[a][b][k] for k in
                    ("refusal_rate", "ci", "incoherent_rate")},
                    "clean_rate": float(clean[idx].mean()) if len(idx) else None}
            if b in directions and len(idx):
                point, ci = transfer_interval(clean[idx], refused[a][idx], refused[b][idx], n_boot, rng)
            else:
                point, ci = None, None
            cell.update(transfer=point, transfer_ci=ci,
                        verdict=transfer_verdict(ci, len(idx), min_prompts, margin) if b in directions
                        else "insufficient")
            cells.append(cell)
    return {"rows": list(directions), "columns": cols, "cells": cells,
            "clean": {c: summarise([t for t, cat in zip(clean_texts, categories) if cat == c]) for c in cols}}


def over_refusal(intervener: Intervener, r_over: torch.Tensor, layer: int, n_layers: int,
                 safe: Sequence[EncodedPrompt], safe_ids: Sequence[str], toxic: Sequence[EncodedPrompt],
                 toxic_ids: Sequence[str], max_new_tokens: int, audit: ResponseAudit,
                 show_progress: bool = True) -> dict:
    """Refusal of safe and toxic test prompts: clean, ``r_over`` ablated, ``r_over`` subtracted at ``layer``."""
    conditions = {"clean": [], "ablated": ablation_edits(r_over, n_layers),
                  "subtracted": addition_edits(r_over, layer, -1.0)}
    plan = [Condition(f"over_refusal/{name}/{side}", ps, pid, edits, {})
            for name, edits in conditions.items() for side, ps, pid in (("safe", safe, safe_ids), ("toxic", toxic, toxic_ids))]
    with tqdm(total=len(plan), desc="over-refusal", disable=not show_progress) as bar:
        summaries = Runs(intervener, max_new_tokens, audit, bar)(plan)
    out: dict = {}
    for c, s in zip(plan, summaries):
        _, name, side = c.name.split("/")
        out.setdefault(name, {})[side] = s
    return out
