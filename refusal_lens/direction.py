"""The difference-in-means refusal direction (Arditi et al. 2024), from the stored activations.

At each collected ``resid_post`` hook, at the last prompt token (the position whose logits give the
first response token): ``r = mean(toxic) - mean(safe)`` over the *training* prompts (the SAE stage's
held-out split, by prompt-id hash, is kept for evaluation). Held-out separation: the AUROC of the
projection ``x . r / |r|`` for toxic against safe prompts, and the effect size (Cohen's d).

Interventions (hook functions for TransformerLens): *ablation* projects ``r_hat`` out of everything
written to the residual stream (``resid_pre``, ``attn_out`` and ``mlp_out`` of every block);
*addition* adds ``r`` to one layer's ``resid_post`` at every position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from refusal_lens.activations.store import HookActivations
from refusal_lens.hooks import ablation_hooks, hook_name, parse_hook_name
from refusal_lens.saes.data import is_heldout

logger = logging.getLogger(__name__)


@dataclass
class LayerDirection:
    hook: str
    layer: int
    direction: Tensor  # r (not normalised): toxic mean - safe mean
    auroc: float  # held-out
    effect_size: float  # held-out Cohen's d of the projection
    n_train: int
    n_heldout: int

    @property
    def unit(self) -> Tensor:
        return self.direction / self.direction.norm()

    def summary(self) -> dict:
        return {"hook": self.hook, "layer": self.layer, "auroc": self.auroc, "effect_size": self.effect_size,
                "norm": float(self.direction.norm()), "n_train": self.n_train, "n_heldout": self.n_heldout}


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U / n_pos n_neg)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def last_prompt_rows(acts: HookActivations) -> np.ndarray:
    """Row of each prompt's last prompt token (the largest stored non-response position)."""
    is_response = np.asarray(acts.table.column("is_response").to_pylist(), dtype=bool)
    best: dict[str, tuple[int, int]] = {}
    for row in np.flatnonzero(~is_response):
        pid, pos = acts.prompt_ids[row], int(acts.positions[row])
        if pid not in best or pos > best[pid][0]:
            best[pid] = (pos, int(row))
    return np.asarray([r for _, r in best.values()], dtype=np.int64)


def layer_direction(acts: HookActivations, heldout_fraction: float) -> LayerDirection:
    rows = last_prompt_rows(acts)
    x = acts.take(rows).double()
    labels = acts.labels[rows]
    held = np.asarray([is_heldout(p, heldout_fraction) for p in acts.prompt_ids[rows]])
    toxic, safe = labels == "toxic", labels == "safe"
    if not (toxic & ~held).any() or not (safe & ~held).any():
        raise ValueError(f"{acts.hook}: the refusal direction needs safe and toxic training prompts")
    r = x[torch.from_numpy(toxic & ~held)].mean(0) - x[torch.from_numpy(safe & ~held)].mean(0)
    proj = (x @ (r / r.norm())).numpy()
    pos, neg = proj[toxic & held], proj[safe & held]
    pooled = np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2) if len(pos) > 1 and len(neg) > 1 else float("nan")
    d = float((pos.mean() - neg.mean()) / pooled) if pooled and pooled == pooled else float("nan")
    site = parse_hook_name(acts.hook)
    return LayerDirection(acts.hook, site.layer if site else -1, r.float(), auroc(pos, neg), d,
                          int((~held).sum()), int(held.sum()))


def refusal_directions(acts_dir: Path, hooks: Sequence[str], heldout_fraction: float) -> dict[int, LayerDirection]:
    """The direction at every collected ``resid_post`` hook among ``hooks``, by layer."""
    out = {}
    for hook in hooks:
        site = parse_hook_name(hook)
        if site is None or site.point != "hook_resid_post":
            continue
        out[site.layer] = layer_direction(HookActivations(Path(acts_dir) / hook), heldout_fraction)
    if not out:
        raise ValueError(f"no resid_post activations in {acts_dir}: the refusal direction needs them")
    return out


def choose_layer(directions: dict[int, LayerDirection], n_layers: int) -> int:
    """The layer whose direction best separates held-out prompts, among the middle layers
    ``[n_layers / 4, 3 n_layers / 4)`` (early layers separate by wording, the last ones write the
    output; Arditi et al. also leave out the last 20%): highest AUROC, then effect size, then the
    earlier layer. Falls back to every layer when none is collected in that range."""
    middle = [k for k in directions if n_layers / 4 <= k < 3 * n_layers / 4] or list(directions)

    def key(layer: int) -> tuple:
        d = directions[layer]
        return (np.nan_to_num(d.auroc, nan=-1.0), np.nan_to_num(d.effect_size, nan=-1e9), -layer)

    return max(middle, key=key)


def ablate_direction_hooks(n_layers: int, unit: Tensor) -> list[tuple[str, callable]]:
    """Hooks that project ``unit`` out of every write to the residual stream."""
    def fn(x, hook):  # noqa: ARG001
        u = unit.to(device=x.device, dtype=x.dtype)
        return x - (x @ u)[..., None] * u

    return [(name, fn) for name in ablation_hooks(n_layers)]


def add_direction_hooks(layer: int, direction: Tensor, scale: float = 1.0) -> list[tuple[str, callable]]:
    """Hook that adds ``scale * direction`` to ``blocks.{layer}.hook_resid_post`` at every position."""
    def fn(x, hook):  # noqa: ARG001
        return x + scale * direction.to(device=x.device, dtype=x.dtype)

    return [(hook_name("residuals", layer), fn)]
