"""Representational independence of two refusal directions (Wollschläger et al. 2025), beside cross-ablation.

Cross-ablation asks whether ablating category A's direction removes category B's *refusals*; representational
independence asks whether it changes how B's direction is *represented*: on the refused toxic test prompts, the
cosine of each block input (last prompt position) with ``r_B``, per layer, clean and with ``r_A`` projected out of
every residual write. ``change(A -> B)[l]`` is the mean change of that cosine at layer ``l``; the pair's score is
the mean squared change over the first 90% of layers (the last layers write the output), made symmetric:
``repind(A, B) = (mean_l change(A -> B)^2 + mean_l change(B -> A)^2) / 2``. Zero: ablating either leaves the other's
representation as it was (independent); large: they are read off the same representation. A shared mechanism
needs both: A's ablation removes B's refusals (transfer) and changes B's representation (dependence).

The score is descriptive (no test); the diagonal (A -> A: the direction's own cosine driven to 0 by its ablation)
is the scale a reader compares against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.direction_edits import ablation_edits
from refusal_lens.core.hooks import hook_name
from refusal_lens.core.edit import Edit
from refusal_lens.core.intervene import Intervener

#: the share of layers the score averages over (Wollschläger et al. leave the last 10% out)
LAYER_SHARE = 0.9


@torch.no_grad()
def last_position_cosines(intervener: Intervener, prompts: Sequence[EncodedPrompt], directions: dict[str, torch.Tensor],
                          n_layers: int, edits: Sequence[Edit] = ()) -> dict[str, np.ndarray]:
    """Per direction ``[n_layers]``: the mean over prompts of cos(block input at the last position, direction)."""
    units = {k: (v / v.norm()).float() for k, v in directions.items()}
    sums = {k: np.zeros(n_layers) for k in units}

    def grab(layer: int):
        def fn(x, ctx):
            last = x[:, -1].float()  # prompts are left-padded: the last column is every prompt's last token
            for k, u in units.items():
                cos = torch.nn.functional.cosine_similarity(last, u.to(last.device)[None], dim=-1)
                sums[k][layer] += float(cos.sum())
            return x

        return fn

    capture = [Edit(hook_name("resid_pre", layer), grab(layer), opening=False) for layer in range(n_layers)]
    intervener.last_logits(prompts, [*edits, *capture])
    return {k: v / max(len(prompts), 1) for k, v in sums.items()}


def representational_independence(intervener: Intervener, directions: dict[str, torch.Tensor], n_layers: int,
                                  prompts: Sequence[EncodedPrompt]) -> dict:
    """Every ordered pair's per-layer change and score, and the symmetric score of every pair (module docstring)."""
    names = list(directions)
    upto = max(1, int(LAYER_SHARE * n_layers))
    clean = last_position_cosines(intervener, prompts, directions, n_layers)
    change: dict[str, dict[str, list[float]]] = {}
    for a in names:
        ablated = last_position_cosines(intervener, prompts, directions, n_layers,
                                        ablation_edits(directions[a], n_layers))
        change[a] = {b: (ablated[b] - clean[b]).tolist() for b in names}
    one_way = {a: {b: float(np.mean(np.square(change[a][b][:upto]))) for b in names} for a in names}
    score = {a: {b: (one_way[a][b] + one_way[b][a]) / 2 for b in names} for a in names}
    return {"n_prompts": len(prompts), "layers": upto, "clean_cosine": {k: v.tolist() for k, v in clean.items()},
            "change": change, "one_way": one_way, "score": score}
