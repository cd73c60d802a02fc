"""Faithfulness and completeness of a circuit against its size, on test prompts, with random controls.

Nodes (features and error nodes of every spliced hook) are ranked by their mean effect on the **discovery**
prompts of the group (``circuits.faithfulness_order``): ``promoting`` (default) puts the most
refusal-promoting first, so that the circuit of size N is the N nodes whose patching lowers refusal most
(the signed circuit; refusal-suppressing nodes are outside it until every promoting node is in);
``magnitude`` ranks by |effect| as Sparse Feature Circuits do, which mixes promoting and suppressing nodes
(on the main job the top 10 by |effect| kept alone pushed the score *below* every node at its mean:
faithfulness -1.67). The circuit of size N is the top N. On the group's **test** prompts (Sparse Feature
Circuits, with the refusal score as the metric ``m``, mean over prompts):

* ``faithfulness = (m(C) - m(empty)) / (m(model) - m(empty))``: ``m(C)`` keeps only C, every other node of
  every spliced hook at its class mean, at every site (every prompt position after the template's opening:
  no site is left unpatched, so nothing bypasses the nodes; the opening is identical in every prompt and
  carries nothing of it); ``m(empty)`` puts every node at its mean (the class-mean activation itself);
* ``completeness = (m(model) - m(model without C)) / (m(model) - m(empty))``: the share removed by patching C
  alone.

Each point has ``circuits.random_controls`` random node sets of the same size (drawn uniformly from the
nodes with a nonzero discovery effect), the distribution of their faithfulness and completeness, and the
circuit's empirical p-value against it; the circuit's own values get a bootstrap interval over the test
prompts (the ratio of means recomputed). Below a gap ``|m(model) - m(empty)| < circuits.faithfulness_min_gap``
the ratios are noise and reported as null. Passes run on ``loaded.gen_model`` (the gap is several units of
the score; bf16 noise is ~0.03).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.core.stats import empirical_pvalue
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.stages.circuits.baselines import ClassMeans
from refusal_lens.stages.circuits.edits import feature_masks, patch_edit
from refusal_lens.stages.circuits.nodes import NodeSpace
from refusal_lens.core.edit import Edit
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.stem import Stems
from refusal_lens.core.refusal import RefusalTokens, refusal_score

#: a node: ("feature", flat index) or ("error", hook)
Node = tuple[str, object]


ORDERS = ("promoting", "magnitude")


def ranked_nodes(space: NodeSpace, feature_effect: torch.Tensor, error_effect: torch.Tensor,
                 order: str = "promoting") -> list[Node]:
    """All nodes with a nonzero mean effect: ``promoting`` = the most refusal-promoting first (increasing
    signed effect: patching them lowers the score most; refusal-suppressing nodes come last), ``magnitude`` =
    by decreasing |effect| (both signs mixed, as in Sparse Feature Circuits)."""
    if order not in ORDERS:
        raise ValueError(f"circuits.faithfulness_order={order!r}; allowed: {', '.join(ORDERS)}")
    key = (lambda v: v) if order == "promoting" else (lambda v: -abs(v))
    nodes: list[tuple[float, int, Node]] = []
    for i in torch.argwhere(feature_effect != 0).flatten().tolist():
        nodes.append((key(float(feature_effect[i])), i, ("feature", i)))
    for k, h in enumerate(space.hooks):
        if float(error_effect[k]) != 0:
            nodes.append((key(float(error_effect[k])), -1 - k, ("error", h)))
    nodes.sort(key=lambda t: (t[0], t[1]))
    return [n for _, _, n in nodes]


def node_edits(space: NodeSpace, nodes: Sequence[Node], means: ClassMeans, keep: bool) -> list[Edit]:
    """Patch edits at every spliced hook: keep only ``nodes`` (``keep``) or ablate them."""
    masks = feature_masks(space, [i for kind, i in nodes if kind == "feature"])
    errors = {h for kind, h in nodes if kind == "error"}
    return [patch_edit(space, h, masks[h], h in errors, means, keep) for h in space.hooks
            if keep or bool(masks[h].any()) or h in errors]


def _scores(intervener: Intervener, prompts, tokens, edits, stems: Stems | None = None) -> np.ndarray:
    return refusal_score(intervener.last_logits(prompts, edits, stems=stems), tokens).numpy().astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray, min_gap: float) -> float | None:
    d = float(den.mean())
    return float(num.mean() / d) if abs(d) >= min_gap else None


def _boot(num: np.ndarray, den: np.ndarray, n_boot: int, rng: np.random.Generator, min_gap: float) -> list | None:
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(num), len(num))
        r = _ratio(num[idx], den[idx], min_gap)
        if r is not None:
            vals.append(r)
    return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))] if vals else None


def faithfulness_curve(intervener: Intervener, space: NodeSpace, means: ClassMeans, tokens: RefusalTokens,
                       prompts: Sequence[EncodedPrompt], ranked: Sequence[Node], sizes: Sequence[int], n_random: int,
                       min_gap: float, n_boot: int, rng: np.random.Generator, show_progress: bool = True) -> dict:
    stems = Stems()  # every pass runs on these prompts: those with edits from layer l > 0 start there, once per batch
    m_model = _scores(intervener, prompts, tokens, [], stems)
    m_empty = _scores(intervener, prompts, tokens, node_edits(space, [], means, keep=True), stems)
    gap = m_model - m_empty
    pool = list(ranked)
    points = []
    sizes = sorted({min(s, len(pool)) for s in sizes if s > 0})
    bar = tqdm(total=len(sizes) * (2 + 2 * n_random), desc="faithfulness", disable=not show_progress)
    for k in sizes:
        circuit = pool[:k]
        keep = _scores(intervener, prompts, tokens, node_edits(space, circuit, means, keep=True), stems)
        abl = _scores(intervener, prompts, tokens, node_edits(space, circuit, means, keep=False), stems)
        bar.update(2)
        r_faith, r_comp = [], []
        for _ in range(n_random):
            pick = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
            r_keep = _scores(intervener, prompts, tokens, node_edits(space, pick, means, keep=True), stems)
            r_abl = _scores(intervener, prompts, tokens, node_edits(space, pick, means, keep=False), stems)
            r_faith.append(_ratio(r_keep - m_empty, gap, min_gap))
            r_comp.append(_ratio(m_model - r_abl, gap, min_gap))
            bar.update(2)
        faith = _ratio(keep - m_empty, gap, min_gap)
        comp = _ratio(m_model - abl, gap, min_gap)
        rf = [v for v in r_faith if v is not None]
        rc = [v for v in r_comp if v is not None]
        points.append({
            "size": k, "faithfulness": faith, "faithfulness_ci": _boot(keep - m_empty, gap, n_boot, rng, min_gap),
            "completeness": comp, "completeness_ci": _boot(m_model - abl, gap, n_boot, rng, min_gap),
            "random_faithfulness": r_faith, "random_completeness": r_comp,
            "random_faithfulness_mean": float(np.mean(rf)) if rf else None,
            "random_completeness_mean": float(np.mean(rc)) if rc else None,
            "faithfulness_p": float(empirical_pvalue(faith, rf, "greater")) if faith is not None and rf else None,
            "completeness_p": float(empirical_pvalue(comp, rc, "greater")) if comp is not None and rc else None,
            "metric_keep": float(keep.mean()), "metric_ablate": float(abl.mean()),
            "n_features": sum(1 for kind, _ in circuit if kind == "feature"),
            "n_error_nodes": sum(1 for kind, _ in circuit if kind == "error"),
        })
    bar.close()
    reach = next((p["size"] for p in points if (p["faithfulness"] or 0) >= 0.5), None)
    return {"metric_model": float(m_model.mean()), "metric_empty": float(m_empty.mean()), "gap": float(gap.mean()),
            "n_prompts": len(prompts), "n_ranked_nodes": len(pool), "points": points, "size_reaching_half": reach,
            "largest_size": sizes[-1] if sizes else 0}
