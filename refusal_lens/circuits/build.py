"""From per-prompt node effects to circuits: selection rule, bootstrap intervals, the JSON schema.

A circuit is built for a group of prompts (one label, one category or all of them). A node's
*effect* is the mean over the group's prompts of its per-prompt effect on the metric (negative =
patching the node to its baseline lowers the refusal metric, i.e. the node drives refusal). Nodes are
ranked by |effect|; the rule keeps the ``top_k``, those with |effect| >= ``node_threshold``, or the
smallest size whose measured faithfulness reaches the target (see :mod:`refusal_lens.circuits.validate`).
Each kept node gets a percentile bootstrap interval over prompts (resampling the group's prompts).
The file schema is documented in docs/circuits.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from refusal_lens.circuits.nodes import ERROR, NodeSpace

SCHEMA_VERSION = 1


@dataclass
class Group:
    label: str
    category: str  # a category, or "all" (pooled)
    rows: list[int]  # indices into the stage's prompt list

    @property
    def key(self) -> str:
        return f"{self.label}/{self.category}"


def ranked_nodes(mean_effect: Tensor) -> list[tuple[int, int]]:
    """``[window, n_nodes]`` mean effects -> ``(slot, node)`` pairs by decreasing |effect| (nonzero only)."""
    flat = mean_effect.abs().flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    order = order[flat[order] > 0]
    n = mean_effect.shape[1]
    return [(int(i) // n, int(i) % n) for i in order]


def select_rule(ranked: Sequence[tuple[int, int]], mean_effect: Tensor, rule: str, top_k: int,
                threshold: float) -> list[tuple[int, int]]:
    if rule == "threshold":
        return [(s, i) for s, i in ranked if abs(float(mean_effect[s, i])) >= threshold]
    return list(ranked[:top_k])


def bootstrap_ci(effects: Tensor, nodes: Sequence[tuple[int, int]], n_boot: int, seed: int,
                 level: float = 0.95) -> np.ndarray:
    """``effects`` ``[n_prompts, window, n_nodes]`` of one group -> ``[len(nodes), 2]`` percentile
    interval of the mean effect over prompts resampled with replacement."""
    if not nodes:
        return np.zeros((0, 2))
    cols = torch.stack([effects[:, s, i] for s, i in nodes], -1).double()  # [n_prompts, k]
    n = cols.shape[0]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    means = counts @ cols / n  # [n_boot, k]
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return torch.quantile(means, torch.tensor([lo, hi], dtype=torch.float64), dim=0).T.numpy()


def node_record(space: NodeSpace, slot: int, index: int, effect: float, ci: Sequence[float], extra: dict) -> dict:
    hook, local = space.locate(index)
    is_error = local == space.d_sae(hook)
    rec = {
        "id": space.node_id(index),
        "hook": hook,
        "feature": None if is_error else local,
        "kind": ERROR if is_error else "feature",
        "effect": effect,
        "ci_low": float(ci[0]),
        "ci_high": float(ci[1]),
        **extra,
    }
    if space.per_position:
        rec["position"] = slot - space.window  # -1 = the last prompt token
    return rec


def circuit_document(space: NodeSpace, group: Group, prompt_ids: Sequence[str], metric_clean: Sequence[float],
                     nodes: list[dict], settings: dict, validation: dict, edges: list[dict] | None = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "label": group.label,
        "category": group.category,
        "n_prompts": len(group.rows),
        "prompt_ids": list(prompt_ids),
        "metric_clean_mean": float(np.mean(metric_clean)) if len(metric_clean) else None,
        "hooks": list(space.hooks),
        "settings": settings,
        "nodes": nodes,
        "edges": edges or [],
        "validation": validation,
    }
