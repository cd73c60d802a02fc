"""Choosing a circuit's features, signed, by three methods side by side (Yeo et al. 2025).

All rankings are made on the **discovery** split (the node effects of its refused toxic prompts) and on the
refusal direction chosen on validation; circuits are only ever evaluated on test prompts.

* ``attribution``: features by their mean effect (AtP or IG, summed over site classes), most negative first:
  the **refusal-promoting** set (patching them lowers refusal). The **refusal-suppressing** set is the
  most positive, in the opposite order. The two are built and reported separately, never mixed.
* ``cosine``: features by the cosine of their decoder vector with the refusal direction (no prompts at all),
  largest first: features that write the direction.
* ``combined`` (the reference's best): the ``circuits.cosine_preselect`` features of each hook with the
  largest cosine, then ranked by attribution (most negative effect first; features whose effect is not
  negative come last, by cosine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.stages.circuits.nodes import NodeSpace

METHODS = ("attribution", "cosine", "combined")


@dataclass
class Ranking:
    method: str
    features: list[int]  # flat indices, best first
    scores: list[float]  # what they were ranked by (effect, or cosine)

    def top(self, k: int) -> list[int]:
        return self.features[:k]


def decoder_cosines(space: NodeSpace, direction: Tensor) -> Tensor:
    """``[n_features]``: cosine of every feature's decoder vector with ``direction``."""
    u = direction.float() / direction.float().norm()
    parts = []
    for h in space.hooks:
        w = space.saes[h].W_dec.detach().float()
        parts.append((w @ u.to(w.device)) / w.norm(dim=-1).clamp_min(1e-12))
    return torch.cat(parts).cpu()


def promoting(effect: Tensor) -> Ranking:
    """Features with a negative mean effect, most negative first."""
    order = torch.argsort(effect, stable=True)
    order = order[effect[order] < 0]
    return Ranking("attribution", order.tolist(), effect[order].tolist())


def suppressing(effect: Tensor) -> Ranking:
    """Features with a positive mean effect, most positive first."""
    order = torch.argsort(-effect, stable=True)
    order = order[effect[order] > 0]
    return Ranking("attribution", order.tolist(), effect[order].tolist())


def by_cosine(cosines: Tensor) -> Ranking:
    order = torch.argsort(-cosines, stable=True)
    order = order[cosines[order] > 0]
    return Ranking("cosine", order.tolist(), cosines[order].tolist())


def combined(space: NodeSpace, effect: Tensor, cosines: Tensor, per_hook: int) -> Ranking:
    """Top ``per_hook`` features of each hook by cosine, ranked by effect (negative first, then by cosine)."""
    pool = []
    for h in space.hooks:
        off, d = space.offset(h), space.d_sae(h)
        local = torch.argsort(-cosines[off : off + d], stable=True)[:per_hook]
        pool += [off + int(j) for j in local]
    pool_t = torch.tensor(pool, dtype=torch.long)
    neg = pool_t[effect[pool_t] < 0]
    rest = pool_t[effect[pool_t] >= 0]
    neg = neg[torch.argsort(effect[neg], stable=True)]
    rest = rest[torch.argsort(-cosines[rest], stable=True)]
    order = torch.cat([neg, rest])
    return Ranking("combined", order.tolist(), effect[order].tolist())


def rankings(space: NodeSpace, effect: Tensor, direction: Tensor, per_hook: int,
             methods=METHODS) -> dict[str, Ranking]:
    """The promoting ranking of every method (``effect``: mean feature effects over discovery prompts)."""
    cos = decoder_cosines(space, direction)
    out = {}
    for m in methods:
        if m == "attribution":
            out[m] = promoting(effect)
        elif m == "cosine":
            out[m] = by_cosine(cos)
        elif m == "combined":
            out[m] = combined(space, effect, cos, per_hook)
        else:
            raise ValueError(f"circuits selection method {m!r}; allowed: {', '.join(METHODS)}")
    return out
