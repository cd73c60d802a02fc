"""Where refusal emerges, by intervention: the direction ablated from layer ``l`` on only.

For each start layer ``l`` (every ``direction.emergence_stride``-th), ``r_hat`` is projected out of every
residual write of blocks ``>= l`` and the mean refusal score of a prompt group (refused toxic, refused safe
test prompts) is measured, with a bootstrap interval over prompts. Layers before ``l`` run clean, so the
curve shows from which depth on the direction is still needed: while ``l`` is early, ablation removes
refusal; once ``l`` passes the layers where the decision is read out, it no longer does. The *emergence
layer* of a group is the last start layer at which ablation still removes at least half of the gap between
the clean score and the score with ablation from layer 0.

(The earlier version summed |attribution| over residual-stream hooks; every such hook carries the whole
effect, so that sum passes 50% near the middle hook by construction. It is gone.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.core.stats import bootstrap_mean_ci
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.direction_edits import ablation_edits
from refusal_lens.stages.direction.select import scores_of
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.stem import Stems
from refusal_lens.core.refusal import RefusalTokens


def emergence_curve(intervener: Intervener, direction: torch.Tensor, n_layers: int, groups: dict[str, Sequence[EncodedPrompt]],
                    tokens: RefusalTokens, stride: int, n_boot: int, seed: int, show_progress: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    starts = list(range(0, n_layers, stride))
    out: dict = {"start_layers": starts, "groups": {}}
    for name, prompts in groups.items():
        if not prompts:
            out["groups"][name] = {"n": 0}
            continue
        clean = scores_of(intervener, prompts, tokens)
        points = []
        stems = Stems()  # the ablation from layer l runs from the clean stem entering l, each from the one below
        for layer in tqdm(starts, desc=f"emergence ({name})", disable=not show_progress):
            s = scores_of(intervener, prompts, tokens, ablation_edits(direction, n_layers, from_layer=layer), stems)
            points.append({"from_layer": layer, "mean": float(s.mean()), "ci": list(bootstrap_mean_ci(s, n_boot, rng=rng))})
        full = points[0]["mean"]
        c = float(clean.mean())
        gap = c - full
        emerge = None
        if gap > 0:
            for p in points:
                if c - p["mean"] >= 0.5 * gap:
                    emerge = p["from_layer"]
        out["groups"][name] = {"n": len(prompts), "clean": c, "clean_ci": list(bootstrap_mean_ci(clean, n_boot, rng=rng)),
                               "points": points, "emergence_layer": emerge}
    return out
