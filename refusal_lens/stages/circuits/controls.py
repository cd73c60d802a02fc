"""Random feature sets matched to a circuit: what a circuit's effect is compared with.

A control set has as many features per hook as the circuit and, feature by feature, is drawn among the features
*like* the circuit's own (:func:`matched_random`): from each hook's features active on the prompts, outside the
circuit, one of the ``neighbours`` nearest to the circuit feature in (log firing frequency, log edit size), where a
feature's edit size is its mean activation times its decoder norm where it fires (what zero-ablating it removes
from the residual stream, per position). So a control removes about as much, as often, as the circuit does, and
differs in *which* features it removes. For a method that ranks a pre-selected pool (``combined``: the features
of each hook most aligned with the refusal direction), the controls are drawn from that same pool, per-hook counts
matched (the circuit's own features allowed): they ask whether the ranking inside the pool matters.

:func:`feature_stats` measures the firing frequency and edit size of every feature on the prompts (one forward
pass); the matched sets' realised edit norms are measured beside the circuit's (:mod:`.alignment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.edit import Edit
from refusal_lens.core.intervene import Intervener
from refusal_lens.stages.circuits.nodes import NodeSpace, split_nodes


@dataclass(frozen=True)
class FeatureStats:
    """Per hook (local feature indices): the active features and each feature's firing frequency and edit size."""

    active: dict[str, np.ndarray]
    frequency: dict[str, np.ndarray]
    size: dict[str, np.ndarray]


@torch.no_grad()
def feature_stats(intervener: Intervener, space: NodeSpace, prompts: Sequence[EncodedPrompt]) -> FeatureStats:
    """Firing frequency (share of the positions after the opening where ``f > 0``) and edit size (mean of
    ``f |W_dec|`` where it fires) of every feature on ``prompts``; active = fired at least once."""
    from refusal_lens.core.chat import OPENING, PAD

    fired = {h: torch.zeros(space.d_sae(h), dtype=torch.float64) for h in space.hooks}
    mass = {h: torch.zeros(space.d_sae(h), dtype=torch.float64) for h in space.hooks}
    seen = {h: 0 for h in space.hooks}

    def grab(h):
        norms = space.saes[h].W_dec.detach().float().norm(dim=-1)

        def fn(x, ctx):
            f, _ = split_nodes(space.saes[h], x)
            where = (ctx.classes != PAD) & (ctx.classes != OPENING)
            fa = f[where].float()
            fired[h] += (fa > 0).sum(0).double().cpu()
            mass[h] += (fa.clamp(min=0) * norms.to(fa.device)).sum(0).double().cpu()
            seen[h] += int(where.sum())
            return x

        return fn

    intervener.last_logits(prompts, [Edit(h, grab(h), opening=False) for h in space.hooks])
    active, frequency, size = {}, {}, {}
    for h in space.hooks:
        count = fired[h].numpy()
        active[h] = np.flatnonzero(count > 0)
        frequency[h] = count / max(seen[h], 1)
        size[h] = np.divide(mass[h].numpy(), count, out=np.zeros_like(count), where=count > 0)
    return FeatureStats(active, frequency, size)


def matched_random(space: NodeSpace, features: Sequence[int], pool: dict[str, np.ndarray], rng: np.random.Generator,
                   stats: FeatureStats | None = None, neighbours: int = 10, exclude_circuit: bool = True) -> list[int]:
    """A control set for ``features`` (flat indices): per hook as many features, drawn from ``pool`` (local indices
    per hook) without replacement, outside the circuit when ``exclude_circuit``; with ``stats``, each one uniformly
    among the ``neighbours`` pool features nearest to its circuit feature in (log frequency, log edit size).
    A hook whose pool is too small falls back to all of its features."""
    chosen = {int(i) for i in features}
    out: list[int] = []
    for hook, local in space.by_hook(features).items():
        off = space.offset(hook)
        cand = [int(j) for j in pool[hook] if not (exclude_circuit and off + int(j) in chosen)]
        if len(cand) < len(local):
            cand = [j for j in range(space.d_sae(hook)) if not (exclude_circuit and off + j in chosen)]
        if stats is None:
            out += [off + int(j) for j in rng.choice(np.asarray(cand), size=len(local), replace=False)]
            continue
        key = _log_stats(stats, hook)
        left = np.asarray(cand)
        for j in rng.permutation(np.asarray(local)):  # the circuit's features in random order: no order bias
            dist = np.abs(key[left] - key[int(j)]).sum(1)
            near = left[np.argsort(dist, kind="stable")[:neighbours]]
            pick = int(rng.choice(near))
            out.append(off + pick)
            left = left[left != pick]
    return out


def _log_stats(stats: FeatureStats, hook: str) -> np.ndarray:
    """``[d_sae, 2]``: log firing frequency and log edit size (a floor for features that never fired)."""
    freq, size = stats.frequency[hook], stats.size[hook]
    return np.stack([np.log(np.maximum(freq, 1e-6)), np.log(np.maximum(size, 1e-6))], axis=1)
