"""How big a feature intervention's edit is, and how much of it lies along the refusal direction.

For a set of features and an intervention, any pass that runs its edits over the prompts (a score pass, or the
prefill of its generation) records, at every prompt position the edit runs on (the template's opening and
generated tokens left out) and summed over the hooks, the change it adds to the residual stream ``delta = decode(f') -
decode(f)``: ``fraction_along_direction = sum (delta . r_hat)^2 / sum |delta|^2`` (1: the edit is the direction's
own edit, 0: orthogonal to it; a random edit in a d-wide stream has about 1/d) and ``edit_norm`` (mean ``|delta|``
per position and hook). The matched random controls get the same numbers, so a reader sees whether the circuit
and its controls change the stream by as much, and whether the circuit's effect comes from its alignment with r.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.edit import Edit
from refusal_lens.core.intervene import Intervener
from refusal_lens.stages.circuits.baselines import ClassMeans
from refusal_lens.stages.circuits.edits import feature_edit, feature_masks
from refusal_lens.stages.circuits.nodes import NodeSpace


def tallied_edits(space: NodeSpace, features: Sequence[int], mode: str, means: ClassMeans, scale_c: float,
                  positions: str, direction: Tensor) -> tuple[list[Edit], dict]:
    """The intervention's edits (those of :func:`refusal_lens.stages.circuits.behaviour.ablate`) with a tally that
    any pass running them fills (read by :func:`alignment_of`): a pass that measures something else with the same
    edits gives the alignment too."""
    tally: dict = {"unit": direction}
    edits = [feature_edit(space, h, m, mode, means, scale_c, positions, tally=tally)
             for h, m in feature_masks(space, features).items() if bool(m.any())]
    return edits, tally


def alignment_of(tally: dict) -> dict:
    """``{"fraction_along_direction", "edit_norm", "positions"}`` of a tally filled by one pass of its edits."""
    total, n = tally.get("total", 0.0), tally.get("positions", 0)
    return {"fraction_along_direction": tally["along"] / total if total > 0 else None,
            "edit_norm": tally["norm"] / n if n else 0.0, "positions": int(n)}


def edit_alignment(intervener: Intervener, space: NodeSpace, features: Sequence[int], mode: str, means: ClassMeans,
                   scale_c: float, positions: str, direction: Tensor, prompts: Sequence[EncodedPrompt]) -> dict:
    """``{"fraction_along_direction", "edit_norm", "positions"}`` of the intervention on ``prompts`` (one pass)."""
    edits, tally = tallied_edits(space, features, mode, means, scale_c, positions, direction)
    if edits:
        intervener.last_logits(prompts, edits)
    return alignment_of(tally)
