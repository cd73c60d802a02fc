"""Clean stems: the residual stream entering the first layer a pass's edits touch, computed once per batch and
reused by the passes over that batch, which then run only the layers from there on.

Below the first layer an edit touches, a pass with edits computes exactly what a clean pass over the same batch
computes: the same operations on the same numbers (the batch, its padding and the cached opening are the
caller's, not the edits'). So a pass whose edits all sit in layers ``>= l`` can start at layer ``l`` from the
clean residual entering it, computed by a clean pass over layers ``0 .. l-1`` of the same batch: the same logits
bit for bit (tests/core/test_stem.py), at ``(L - l) / L`` of the layers' cost. It pays where many passes with edits
at the same layers run over the same prompts: the circuits' faithfulness curves and their random feature sets
scored in the behaviour part (SAE features at layers 6-18 of 24 in the main job: every such pass starts at
layer 6).

:class:`Stems` holds the stems of one caller's repeated passes (the caller creates it, passes it to
:meth:`refusal_lens.core.intervene.Intervener.last_logits` and drops it: no state outlives it); a stem is keyed
by the layer and the batch's tokens, mask and cut opening. :func:`layers_window` runs a Hugging Face model over a
window of its decoder layers (the stem's pass: ``0 .. l-1``; the pass from the stem: ``l .. L-1``, fed the stem as
``inputs_embeds``); each layer keeps its own index into the KV cache. Where the layers differ in their attention
mask (sliding-window layers mixed with full ones) a window would give the wrong mask to some of them: there
:func:`windowed` says no and passes run whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from refusal_lens.core.edit import Edit
from refusal_lens.core.hooks import hf_decoder_layers, parse_hook_name


def first_edited_layer(edits: Sequence[Edit]) -> int:
    """The lowest decoder layer any of ``edits`` acts in (0 without edits, or when one acts outside the blocks)."""
    layers = []
    for edit in edits:
        site = parse_hook_name(edit.hook)
        if site is None:
            return 0
        layers.append(site.layer)
    return min(layers, default=0)


def windowed(model) -> bool:
    """Whether ``model``'s passes can run a window of its decoder layers: every layer has the same attention kind."""
    kinds = getattr(getattr(model, "config", None), "layer_types", None)
    return not kinds or len(set(kinds)) == 1


@contextmanager
def layers_window(model, start: int, stop: int | None = None) -> Iterator[None]:
    """Inside, ``model`` runs decoder layers ``start .. stop-1`` only (its ``model.layers`` list is swapped for that
    slice and restored after)."""
    layers = hf_decoder_layers(model)
    inner = getattr(model, "model", model)
    inner.layers = nn.ModuleList(list(layers)[start:stop])
    try:
        yield
    finally:
        inner.layers = layers


class Stems:
    """The clean stems of one caller's passes: ``[batch, width, d_model]`` residuals in the model's dtype, per batch
    (its tokens, mask and cut opening) and layer. A stem is computed from the highest stem of the same batch
    below it, when there is one (layers ``lo .. l-1`` only): passes whose edits start at increasing layers (the
    emergence curve, candidates at every layer) run each layer of the clean stem once."""

    def __init__(self) -> None:
        self._memo: dict[tuple, dict[int, torch.Tensor]] = {}
        self.computed = 0  # stems computed (each a pass over the layers between it and the stem below it)
        self.reused = 0

    @staticmethod
    def batch_key(ids: torch.Tensor, mask: torch.Tensor, prefix: tuple[int, ...]) -> tuple:
        return (prefix, tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())

    def get(self, batch: tuple, layer: int) -> torch.Tensor | None:
        stem = self._memo.get(batch, {}).get(layer)
        if stem is not None:
            self.reused += 1
        return stem

    def below(self, batch: tuple, layer: int) -> tuple[int, torch.Tensor | None]:
        """The highest stem of ``batch`` below ``layer``, as ``(its layer, stem)``; ``(0, None)`` without one."""
        mine = self._memo.get(batch, {})
        lower = max((lo for lo in mine if lo < layer), default=0)  # stems are kept for layers >= 1 only
        return (lower, mine[lower]) if lower else (0, None)

    def put(self, batch: tuple, layer: int, stem: torch.Tensor) -> None:
        self._memo.setdefault(batch, {})[layer] = stem
        self.computed += 1


@torch.no_grad()
def clean_stem(model, inputs: dict, layer: int, start: int = 0, below: torch.Tensor | None = None) -> torch.Tensor:
    """The residual entering decoder layer ``layer`` (>= 1) of a clean pass over ``inputs`` (the model inputs of a
    batch: ids, mask, and the opening's positions and cache when it is cut off), from layers ``0 .. layer-1``, or,
    given ``below`` (the residual entering layer ``start``), from layers ``start .. layer-1``."""
    layers = hf_decoder_layers(model)
    seen: list[torch.Tensor] = []

    def keep(_module, _args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    if below is not None:
        inputs = {k: v for k, v in inputs.items() if k != "input_ids"} | {"inputs_embeds": below}
    handle = layers[layer - 1].register_forward_hook(keep)
    try:
        with layers_window(model, start if below is not None else 0, layer):
            model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return seen[0]


__all__ = ["Stems", "clean_stem", "first_edited_layer", "layers_window", "windowed"]
