"""Does over-refusal have its own features, or only a weaker dose of the refusal features? The circuit-level
answer beside the false-refusal vector of the direction stage (Wang et al. 2025 ask it of a direction).

* **Ranking** (discovery): every feature's mean effect on the refusal score of the refused *safe* discovery
  prompts minus its mean effect on the refused *toxic* ones (node effects summed over site classes; negative =
  patching the feature lowers refusal). ``safe_minus_toxic``: the features that promote refusal of safe prompts
  (safe effect < 0) more than of toxic ones (difference < 0), most negative difference first. Beside it the
  toxic circuit's own ranking (``attribution``: the refusal features), for the "weaker dose" comparison.
* **Test**: each ranking's top K (``circuits.over_refusal_k``) ablated by the headline's ablation (zero or mean,
  chosen on validation by the behaviour part; ``zero/all`` when it did not run), greedy, on the refused safe test
  prompts (over-refusal, 100% refused clean by construction) and the refused toxic ones (correct refusal).
* **Answer**: per ranking and K, selectivity = (toxic still refused) - (safe still refused), with Newcombe's
  interval at the Bonferroni level over the K's. ``own features`` when some K of ``safe_minus_toxic`` has its
  interval above 0 (over-refusal removed more than correct refusal); ``no selective features`` when every K's
  upper end is below ``circuits.over_refusal_margin``; ``indeterminate`` otherwise; ``insufficient`` when either
  side has fewer than ``analysis.min_prompts`` refused test prompts. Never a verdict from "not significant".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from refusal_lens.core.behaviour import Condition, ResponseAudit, Runs
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.stats import newcombe_difference
from refusal_lens.stages.circuits.behaviour import ablate
from refusal_lens.stages.circuits.nodes import NodeSpace
from refusal_lens.stages.circuits.select import Ranking

VERDICTS = ("own features", "no selective features", "indeterminate", "insufficient")


def safe_minus_toxic(safe_effect: torch.Tensor, toxic_effect: torch.Tensor) -> Ranking:
    """Features promoting refusal of safe prompts more than of toxic ones, most negative difference first."""
    diff = safe_effect - toxic_effect
    order = torch.argsort(diff, stable=True)
    order = order[(diff[order] < 0) & (safe_effect[order] < 0)]
    return Ranking("safe_minus_toxic", order.tolist(), diff[order].tolist())


def selectivity(safe: dict, toxic: dict, level: float) -> dict:
    """``toxic still refused - safe still refused`` with Newcombe's interval at ``level``."""
    lo, hi = newcombe_difference(toxic["refused"], toxic["n"], safe["refused"], safe["n"], level)
    return {"estimate": toxic["refusal_rate"] - safe["refusal_rate"], "ci": [lo, hi], "level": level}


def verdict(curve: dict[int, dict], n_safe: int, n_toxic: int, min_prompts: int, margin: float) -> str:
    """The answer of the module docstring from the ``safe_minus_toxic`` curve (``k -> {"selectivity": ...}``)."""
    if n_safe < min_prompts or n_toxic < min_prompts or not curve:
        return "insufficient"
    cis = [row["selectivity"]["ci"] for row in curve.values()]
    if any(lo > 0 for lo, _ in cis):
        return "own features"
    if all(hi < margin for _, hi in cis):
        return "no selective features"
    return "indeterminate"


def over_refusal_curve(intervener: Intervener, space: NodeSpace, means, rankings: dict[str, Ranking],
                       mode: str, positions: str, ks: Sequence[int], safe: tuple[Sequence[EncodedPrompt], list[str]],
                       toxic: tuple[Sequence[EncodedPrompt], list[str]], max_new_tokens: int, audit: ResponseAudit,
                       min_prompts: int, margin: float, alpha: float = 0.05, show_progress: bool = True) -> dict:
    """The record of the module docstring: per ranking, per K, both sides' refusal and the selectivity."""
    plan = [Condition(f"over_refusal/{m}/{mode}/{positions}/k{k}/{side}", ps, pid,
                      ablate(space, r.top(k), mode, means, 1.0, positions), {"method": m, "k": k})
            for m, r in rankings.items() for k in ks if r.top(k)
            for side, (ps, pid) in (("safe_refused", safe), ("toxic_refused", toxic)) if ps]
    with tqdm(total=len(plan), desc="over-refusal circuit (generation)", disable=not show_progress) as bar:
        summaries = Runs(intervener, max_new_tokens, audit, bar)(plan)
    level = 1 - alpha / max(len(ks), 1)
    curves: dict[str, dict[int, dict]] = {}
    for c, s in zip(plan, summaries):
        curves.setdefault(c.extra["method"], {}).setdefault(c.extra["k"], {})[c.name.rsplit("/", 1)[1]] = s
    for rows in curves.values():
        for row in rows.values():
            if "safe_refused" in row and "toxic_refused" in row:
                row["selectivity"] = selectivity(row["safe_refused"], row["toxic_refused"], level)
    n_safe, n_toxic = len(safe[0]), len(toxic[0])
    own = {k: row for k, row in curves.get("safe_minus_toxic", {}).items() if "selectivity" in row}
    return {"intervention": f"{mode}/{positions}", "ks": list(ks), "n_test": {"safe_refused": n_safe,
                                                                           "toxic_refused": n_toxic},
            "n_features": {m: len(r.features) for m, r in rankings.items()}, "margin": margin, "level": level,
            "curves": {m: {str(k): row for k, row in rows.items()} for m, rows in curves.items()},
            "verdict": verdict(own, n_safe, n_toxic, min_prompts, margin)}
