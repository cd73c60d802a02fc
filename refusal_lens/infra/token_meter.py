"""How many token positions each part of a run pushes through the model, by kind of pass: the profile's counts.

A :class:`TokenMeter` watches the models of a loaded model (the HF model, its intervention copy, the
TransformerLens model) with forward hooks and adds up, per module role and dtype, the positions of every call
(batch x sequence length, padding included: what the CPU computes; a pass that runs only a window of the decoder
layers counts that share of its positions):

* ``forward`` — a pass without an autograd graph (a prompt's forward, or the prefill of a greedy generation);
* ``autograd`` — a pass whose output requires grad (attribution, the direction's selection screens): its
  backward pass follows, so it costs about three forwards;
* ``decode`` — one generated token per row on top of a KV cache (each greedy step after the prefill; transformers 5 passes it as ``cache=``, earlier
  versions as ``past_key_values=``).

:class:`refusal_lens.infra.status.StatusFile` snapshots it at every part, so ``status.json`` holds each part's
counts beside its seconds; ``bench/bench_main_job.py`` divides them by the throughput of one large batched
forward (the floor) to show which parts are furthest from it. Counting only reads shapes; a pass is never changed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

KINDS = ("forward", "autograd", "decode")


def _positions(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """(batch, new positions) of one call, from ``input_ids`` / ``inputs_embeds`` or the first tensor argument."""
    import torch

    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
        if x is not None:
            return int(x.shape[0]), int(x.shape[1])
    if x is None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None or x.dim() == 0:
        return None
    return (1, int(x.shape[0])) if x.dim() == 1 else (int(x.shape[0]), int(x.shape[1]))


def _layer_share(module: Any) -> float | int:
    """The share of its decoder layers a Hugging Face causal LM runs in this call: 1, or ``run / all`` while a pass
    runs a window of them (:func:`refusal_lens.core.stem.layers_window`: a pass from a clean stem, or the stem's
    own pass), so that the counts stay what the CPU computes."""
    inner = getattr(module, "model", None)
    layers = getattr(inner, "layers", None)
    total = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if layers is None or not total or len(layers) == total:
        return 1
    return len(layers) / total


def _requires_grad(output: Any) -> bool:
    import torch

    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if logits is None:
        logits = output
    return isinstance(logits, torch.Tensor) and logits.requires_grad


class TokenMeter:
    """Positions per ``"<role> <dtype> <kind>"`` over the life of one command (see the module docstring)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._watched: set[int] = set()
        self._pending: tuple[str, int] | None = None  # a TransformerLens pass begun: its label and positions

    def watch(self, module: Any, role: str) -> None:
        """Count the calls of ``module`` (once per module, however often it is asked)."""
        if module is None or id(module) in self._watched:
            return
        self._watched.add(id(module))
        param = next(module.parameters(), None)
        dtype = str(param.dtype).removeprefix("torch.") if param is not None else "unknown"
        label = f"{role} {dtype}"

        def count(_module, args, kwargs, output) -> None:
            shape = _positions(args, kwargs)
            if shape is None:
                return
            batch, new = shape
            if _requires_grad(output):
                kind = "autograd"
            elif new == 1 and (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None):
                kind = "decode"
            else:
                kind = "forward"
            self.counts[f"{label} {kind}"] += batch * new * _layer_share(_module)

        module.register_forward_hook(count, with_kwargs=True)

    def watch_tl(self, model: Any) -> None:
        """A TransformerLens model (bridge or HookedTransformer): its ``run_with_hooks`` calls ``forward`` itself,
        so the module's own hooks never fire; its ``embed`` counts the positions and its ``unembed`` says whether
        the pass built a graph (a pass stopped before the unembedding counts as a forward)."""
        embed, unembed = getattr(model, "embed", None), getattr(model, "unembed", None)
        if embed is None or unembed is None or id(model) in self._watched:
            return
        self._watched.add(id(model))
        param = next(model.parameters(), None)
        label = f"tl {str(param.dtype).removeprefix('torch.') if param is not None else 'unknown'}"

        def started(_module, args, kwargs, _output) -> None:
            self._flush()
            shape = _positions(args, kwargs)
            if shape is not None:
                self._pending = (label, shape[0] * shape[1])

        def ended(_module, _args, _kwargs, output) -> None:
            self._flush("autograd" if _requires_grad(output) else "forward")

        embed.register_forward_hook(started, with_kwargs=True)
        unembed.register_forward_hook(ended, with_kwargs=True)

    def _flush(self, kind: str = "forward") -> None:
        if self._pending is not None:
            label, n = self._pending
            self.counts[f"{label} {kind}"] += n
            self._pending = None

    def watch_model(self, loaded: Any) -> None:
        """The three models of a :class:`refusal_lens.models.loading.LoadedModel`."""
        self.watch(loaded.hf_model, "hf")
        self.watch(loaded.gen_model, "hf")  # the same module when the intervention dtype is the model's
        self.watch_tl(loaded.model)

    def snapshot(self) -> dict[str, int]:
        """The counts so far (a pass over a window of the layers adds its share of its positions: rounded here)."""
        self._flush()
        return {k: round(v) for k, v in self.counts.items()}


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """The counts added between two snapshots (zero entries left out)."""
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


__all__ = ["KINDS", "TokenMeter", "difference"]
