"""One forward pass that returns activations under TransformerLens hook names, two ways.

* ``bridge``: the TransformerBridge's ``run_with_cache`` (the reference; its attention runs
  eager-like whatever the HF config says, 1.4-1.5x a bare sdpa forward on an H100/H200, GPU.md);
* ``hf_hooks``: PyTorch hooks on the Hugging Face modules that carry each hook point
  (:func:`refusal_lens.core.hooks.hf_hook_target`, the same map the generation edits use), on the untouched
  HF model with its own attention (sdpa where the family supports it). Same hook names, same values as
  ``run_with_cache`` up to float rounding (tests/activations/test_collector.py).

Either way only the kept positions (``rows``, ``cols``) are returned, as ``[n, width]`` CPU tensors in
the requested dtype, with the logits at one column per prompt. The ``hf_hooks`` collector gathers the
kept positions on the device and asks HF for logits at those columns only (``logits_to_keep``).

On CUDA, ``hf_hooks`` copies each hook's kept positions to pinned host memory on a side stream as soon
as its layer has produced them: the copies overlap the rest of the forward pass and, through
:func:`overlapped`, the next batch's; :meth:`Pending.wait` blocks only for copies still in flight.
Elsewhere copies are plain and synchronous.

``inference.collector: auto`` picks ``hf_hooks`` on CUDA when every requested hook has an HF module
(block hooks; raw hooks such as ``blocks.0.attn.hook_z`` exist only in TransformerLens), else ``bridge``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.errors import UserError
from refusal_lens.core.hooks import LayerSpecError, hf_hook_target

logger = logging.getLogger(__name__)

#: values of ``inference.collector``.
COLLECTORS = ("auto", "bridge", "hf_hooks")


class CollectorError(UserError, ValueError):
    """A collector that cannot serve the requested hooks; the message says which and why."""


@dataclass(frozen=True)
class CollectRequest:
    """One batch: left-padded ``ids``/``mask`` ``[batch, pos]``, the hooks, the kept positions
    (``rows[k]``, ``cols[k]``), the column whose logits each prompt needs, and the dtype of the values."""

    ids: Tensor
    mask: Tensor
    hooks: tuple[str, ...]
    rows: Tensor
    cols: Tensor
    logit_cols: Tensor
    dtype: torch.dtype


@dataclass
class Collected:
    """``logits`` ``[batch, d_vocab]`` at the requested columns (on the model's device) and, per hook,
    the kept positions ``[n, width]`` on the CPU."""

    logits: Tensor
    values: dict[str, Tensor]


class Pending:
    """A submitted batch; :meth:`wait` returns it once its device-to-host copies are done."""

    def __init__(self, collected: Collected, done: torch.cuda.Event | None = None):
        self._collected, self._done = collected, done

    def wait(self) -> Collected:
        if self._done is not None:
            self._done.synchronize()
        return self._collected


def _gather(x: Tensor, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    return x[rows, cols].reshape(len(rows), -1).to(dtype)


class BridgeCollector:
    """``run_with_cache`` on the TransformerLens model (bridge or HookedTransformer): the reference."""

    name = "bridge"

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device

    def submit(self, req: CollectRequest) -> Pending:
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(
                req.ids.to(self.device), attention_mask=req.mask.to(self.device), names_filter=list(req.hooks)
            )
        rows, cols = req.rows.to(self.device), req.cols.to(self.device)
        values = {h: _gather(cache[h], rows, cols, req.dtype).cpu() for h in req.hooks}
        first = logits[torch.arange(len(req.ids), device=logits.device), req.logit_cols.to(logits.device)]
        return Pending(Collected(first, values))


def _module_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _module_output(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


class HFHookCollector:
    """Forward hooks on the HF modules of each hook point (see the module docstring)."""

    name = "hf_hooks"

    def __init__(self, hf_model, device: torch.device, hooks: Sequence[str] = ()):
        self.hf_model, self.device = hf_model, device
        self._targets = {h: hf_hook_target(hf_model, h) for h in hooks}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._logits_to_keep = "logits_to_keep" in inspect.signature(hf_model.forward).parameters

    def _target(self, hook: str) -> tuple[object, str]:
        if hook not in self._targets:
            self._targets[hook] = hf_hook_target(self.hf_model, hook)
        return self._targets[hook]

    def submit(self, req: CollectRequest) -> Pending:
        dev, side = self.device, self._stream
        rows, cols = req.rows.to(dev), req.cols.to(dev)
        values: dict[str, Tensor] = {}

        def take(name: str, x: Tensor) -> None:
            if name in values:
                raise RuntimeError(f"{name}: its Hugging Face module ran twice in one forward pass")
            sel = _gather(x.detach(), rows, cols, req.dtype)
            if side is None:
                values[name] = sel.cpu()
                return
            side.wait_stream(torch.cuda.current_stream(dev))  # the gather above is done before the copy
            with torch.cuda.stream(side):
                host = torch.empty(sel.shape, dtype=sel.dtype, pin_memory=True)
                host.copy_(sel, non_blocking=True)
            sel.record_stream(side)  # its memory is not reused before the copy has read it
            values[name] = host

        def pre(name: str):
            def hook(module, args, kwargs):  # noqa: ARG001
                take(name, _module_input(args, kwargs))

            return hook

        def post(name: str):
            def hook(module, args, output):  # noqa: ARG001
                take(name, _module_output(output))

            return hook

        extra = {}
        logit_cols = req.logit_cols.to(dev)
        if self._logits_to_keep:
            keep = torch.unique(logit_cols)  # sorted
            extra["logits_to_keep"] = keep
            logit_cols = torch.searchsorted(keep, logit_cols)
        handles = []
        try:
            for h in req.hooks:
                module, kind = self._target(h)
                handles.append(module.register_forward_pre_hook(pre(h), with_kwargs=True) if kind == "pre"
                               else module.register_forward_hook(post(h)))
            with torch.no_grad():
                out = self.hf_model(input_ids=req.ids.to(dev), attention_mask=req.mask.to(dev), use_cache=False,
                                    **extra)
        finally:
            for handle in handles:
                handle.remove()
        missing = [h for h in req.hooks if h not in values]
        if missing:
            raise RuntimeError(f"the Hugging Face modules of {missing} did not run in the forward pass")
        first = out.logits[torch.arange(len(req.ids), device=out.logits.device), logit_cols]
        done = None
        if side is not None:
            done = torch.cuda.Event()
            done.record(side)
        return Pending(Collected(first, {h: values[h] for h in req.hooks}), done)


def _hf_unsupported(hf_model, hooks: Sequence[str]) -> dict[str, str]:
    out = {}
    for h in hooks:
        try:
            hf_hook_target(hf_model, h)
        except LayerSpecError as err:
            out[h] = str(err)
    return out


def choose_collector(name: str, device: torch.device, hf_model, hooks: Sequence[str]) -> str:
    """``bridge`` or ``hf_hooks`` for ``inference.collector=name`` (see the module docstring)."""
    if name not in COLLECTORS:
        raise CollectorError(f"inference.collector={name!r}; allowed: {', '.join(COLLECTORS)}")
    if name == "bridge":
        return name
    unsupported = _hf_unsupported(hf_model, hooks)
    if name == "hf_hooks":
        if unsupported:
            first = next(iter(unsupported.values()))
            raise CollectorError(f"inference.collector='hf_hooks' cannot collect {sorted(unsupported)}: {first}; "
                                 "use 'bridge' (or 'auto') for these hooks")
        return name
    if device.type != "cuda":
        return "bridge"
    if unsupported:
        logger.debug("collector auto: the bridge collects %s (no Hugging Face module)", sorted(unsupported))
        return "bridge"
    return "hf_hooks"


def make_collector(loaded, name: str, hooks: Sequence[str], model: str = "model"):
    """The collector ``inference.collector=name`` resolves to for ``loaded`` (a LoadedModel) and ``hooks``;
    ``model="intervention"`` reads the ``loaded.gen_model`` copy through hooks on its HF modules."""
    if model == "intervention":
        choose_collector("hf_hooks", loaded.device, loaded.gen_model, hooks)  # the hooks must have HF modules
        return HFHookCollector(loaded.gen_model, loaded.device, hooks)
    if choose_collector(name, loaded.device, loaded.hf_model, hooks) == "hf_hooks":
        return HFHookCollector(loaded.hf_model, loaded.device, hooks)
    return BridgeCollector(loaded.model, loaded.device)


def overlapped(collector, requests: Iterable[CollectRequest]) -> Iterator[tuple[CollectRequest, Collected]]:
    """``(request, collected)`` in order, each batch submitted before the previous one is waited for, so
    that on CUDA a batch's device-to-host copies (and the caller's work on it) overlap the next batch's
    forward pass. At most two batches are in flight."""
    previous: tuple[CollectRequest, Pending] | None = None
    for req in requests:
        current = (req, collector.submit(req))
        if previous is not None:
            yield previous[0], previous[1].wait()
        previous = current
    if previous is not None:
        yield previous[0], previous[1].wait()
