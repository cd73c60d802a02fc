"""One refusal mechanism or many, by intervention: per-category directions and the cross-ablation matrix.

* **Per-category directions**: at the selected layer and position, ``r_c = mean(harmful of category c) -
  mean(harmless)`` over the discovery split's contrast prompts. Their cosines (with the global direction as
  one more row) get percentile bootstrap intervals, the prompts of each side resampled.
* **Cross-ablation**: ablate direction A (every residual write, every position) and measure the refusal
  rate on category B's refused toxic test prompts. ``transfer(A -> B) = (clean_B - rate_{A->B}) /
  (clean_B - rate_{B->B})`` is the share of B's own ablation effect that A's direction reaches, with a
  paired bootstrap interval over B's prompts. A cell is *shared* when the interval's lower bound is at
  least ``analysis.shared_margin``, *distinct* when its upper bound is below it, *partly shared* when neither
  holds and the lower bound is above 0, *indeterminate* otherwise (the graded words of the circuit similarity
  test), and *insufficient* below ``analysis.min_prompts`` test prompts (or when B's own direction removes no
  refusal: there is nothing to transfer).
* **Representational independence** (:mod:`.independence`): whether ablating A changes how B is represented
  (per-layer cosine with ``r_B``), the second half of "one mechanism".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.core.behaviour import Condition, ResponseAudit, Runs, summarise
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.direction_edits import ablation_edits
from refusal_lens.core.intervene import Intervener
from refusal_lens.stages.direction.candidates import SiteCache, site_activations
from refusal_lens.stages.direction.independence import representational_independence
from refusal_lens.core.judge import judge


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
    if ci[0] > 0:
        return "partly shared"
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


def per_category(cfg, fast, precise, data, contrast, global_vec, layer, j, n_layers, refused_test, max_new, audit,
                show_progress, sites: SiteCache | None = None) -> dict:
    a, c = cfg.analysis, cfg.direction
    harmless = site_activations(precise, data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens,
                                                      contrast.harmless["discovery"]), layer, j, sites)
    by_cat: dict[str, list[int]] = {}
    for i in data.split_rows("discovery", "toxic", refused=True):  # the model's refusals of each category
        by_cat.setdefault(data.rows[i]["category"], []).append(i)
    acts = {cat: site_activations(precise, data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens, rows), layer, j,
                                  sites) for cat, rows in sorted(by_cat.items()) if len(rows) >= 2}
    all_harmful = torch.cat(list(acts.values())) if acts else torch.zeros(0, harmless.shape[1], dtype=torch.float64)
    vectors = {"all": global_vec.double()}
    vectors.update({cat: x.mean(0) - harmless.mean(0) for cat, x in acts.items()})
    cosines = cosine_matrix({k: v.float() for k, v in vectors.items()})
    cis = bootstrap_cosines({"all": all_harmful, **acts}, harmless, min(c.bootstrap, 500), c.seed) if acts else {}
    prompts = data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens, refused_test)
    cross = cross_ablation(fast, {k: v.float() for k, v in vectors.items()}, n_layers, prompts,
                           [data.rows[i]["prompt_id"] for i in refused_test],
                           [data.rows[i]["category"] for i in refused_test], max_new, c.bootstrap, c.seed,
                           a.min_prompts, a.shared_margin, audit, show_progress)
    independence = (representational_independence(fast, {k: v.float() for k, v in vectors.items()}, n_layers, prompts)
                    if prompts else None)  # no refused toxic test prompt: nothing to measure
    return {"n_discovery": {cat: len(rows) for cat, rows in sorted(by_cat.items())},
            "without_direction": sorted(cat for cat, rows in by_cat.items() if len(rows) < 2),
            "cosines": cosines, "cosine_ci": cis, "cross_ablation": cross, "independence": independence}
