"""The interventions of a direction, as :class:`~refusal_lens.core.intervene.Edit` s (Arditi et al. 2024).

* **Directional ablation** (:func:`ablation_edits`): ``x <- x - (x . r_hat) r_hat`` on every write to the
  residual stream: each block's input (``resid_pre``, which for block 0 is the embedding), attention output
  and MLP output, at every position, generated tokens included. ``from_layer`` restricts it to blocks
  ``>= from_layer`` (emergence by intervention).
* **Activation addition** (:func:`addition_edits`): ``x <- x + scale * r`` (``r`` not normalised) at one
  block's input, every position, generated tokens included; ``scale = -1`` is ActAdd(-r).
* :func:`capture_post_instruction` records block inputs at the post-instruction positions (the candidates).

Edits compute in float32 and cast back, so a bfloat16 model gets an exact projection.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from refusal_lens.core.chat import POST
from refusal_lens.core.hooks import ablation_hooks, hook_name, parse_hook_name
from refusal_lens.core.edit import Edit, EditContext


def ablation_edits(unit: Tensor, n_layers: int, from_layer: int = 0, coefficient: float = 1.0) -> list[Edit]:
    """Project ``unit`` (normalised here) out of every residual write of blocks ``>= from_layer``.

    ``coefficient`` != 1 is no longer an ablation but steering: ``x <- x - coefficient (x . r_hat) r_hat``
    (``1 + c`` is the direction's equivalent of a feature intervention ``f <- -c f``: the component flipped)."""
    u = (unit / unit.norm()).float()

    def fn(x: Tensor, ctx: EditContext) -> Tensor:  # noqa: ARG001
        v = u.to(x.device)
        xf = x.float()
        return (xf - coefficient * (xf @ v)[..., None] * v).to(x.dtype)

    return [Edit(name, fn) for name in ablation_hooks(n_layers) if parse_hook_name(name).layer >= from_layer]


def addition_edits(vector: Tensor, layer: int, scale: float = 1.0) -> list[Edit]:
    """Add ``scale * vector`` to block ``layer``'s input at every position."""
    v = (scale * vector).float()

    def fn(x: Tensor, ctx: EditContext) -> Tensor:  # noqa: ARG001
        return (x.float() + v.to(x.device)).to(x.dtype)

    return [Edit(hook_name("resid_pre", layer), fn)]


def capture_post_instruction(layers: Sequence[int], n_post: int, sums: Tensor) -> list[Edit]:
    """Edits that add each block input at post-instruction position ``j`` into ``sums[layer, j]`` (float64)."""
    def capture(layer: int):
        def fn(x: Tensor, ctx: EditContext) -> Tensor:
            if x.shape[1] != ctx.classes.shape[1]:
                return x
            for j in range(n_post):
                at = ctx.classes == POST + j
                if at.any():
                    sums[layer, j] += x[at].double().sum(0).cpu()
            return x

        return fn

    return [Edit(hook_name("resid_pre", layer), capture(layer), opening=False) for layer in layers]
