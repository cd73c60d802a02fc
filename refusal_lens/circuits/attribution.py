"""Node effects on the metric: linear attribution patching, integrated gradients, exact patching.

The *effect* of a node on one prompt is ``m(node patched to its baseline) - m(clean)``, where the
metric ``m`` is read at the prompt's last token. All three estimators return it per prompt and node.

**The splice is the identity.** With its error node, an SAE reproduces its input exactly
(``decode(f) + err = x``), so splicing SAEs at several hooks leaves the model unchanged and the
gradient of ``m`` with respect to a node is the gradient at its hook mapped through the decoder:
``dm/df_j = W_dec[j] . dm/dx`` and ``dm/d err = dm/dx``. Downstream splices pass the gradient straight
through (their error term carries it, as in Sparse Feature Circuits). SAE-Lens's own
``use_error_term`` computes the error without gradient, so gradients reaching an upstream hook would
flow only through the downstream reconstructions, which is wrong (tests/test_circuits.py shows both).

* **AtP** (linear): ``effect ~ (b - v) . grad`` for every node of every hook from one forward and one
  backward pass.
* **IG**: per hook, the hook's nodes move together from clean ``v`` to baseline ``b`` in ``steps``
  midpoint steps (``v + a (b - v)``, ``a = (k + 1/2) / steps``) while every other hook stays clean;
  ``effect ~ (b - v) . mean_a grad(a)``. The effects of one hook sum to the exact effect of patching
  that whole hook, up to the quadrature error.
* **Exact**: the forward pass with the node (or node set) patched: the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.circuits.nodes import NodeSpace, PromptBatch, fold_positions, node_positions
from refusal_lens.hooks import final_norm_hook

Hook = tuple[str, Callable]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class Metric:
    """A scalar per prompt read at its last token. ``hooks(store)`` are added to every forward pass;
    ``value(logits_last, store)`` reads the metric (``logits_last`` is ``[batch, d_vocab]``)."""

    name = "metric"

    def hooks(self, store: dict) -> list[Hook]:
        return []

    def value(self, logits_last: Tensor, store: dict) -> Tensor:
        raise NotImplementedError


class RefusalScoreMetric(Metric):
    """``logsumexp(refusal-start logits) - logsumexp(compliance-start logits)`` at the first response
    position (:func:`refusal_lens.refusal.refusal_score`)."""

    name = "refusal_score"

    def __init__(self, tokens):
        self.tokens = tokens

    def value(self, logits_last: Tensor, store: dict) -> Tensor:
        from refusal_lens.refusal import refusal_score

        return refusal_score(logits_last, self.tokens)


class ProjectionMetric(Metric):
    """Projection of the last token's activation at ``hook`` onto the unit vector ``direction``."""

    name = "direction_projection"

    def __init__(self, hook: str, direction: Tensor):
        self.hook, self.direction = hook, direction / direction.norm()

    def hooks(self, store: dict) -> list[Hook]:
        def grab(x, hook):  # noqa: ARG001
            store["projection"] = x[:, -1].float() @ self.direction.to(x.device)
            return x

        return [(self.hook, grab)]

    def value(self, logits_last: Tensor, store: dict) -> Tensor:
        return store["projection"]


# --------------------------------------------------------------------------------------------
# Clean values and baselines
# --------------------------------------------------------------------------------------------


@dataclass
class NodeValues:
    """Per hook: features ``f`` ``[batch, pos, d_sae]`` and error ``err`` ``[batch, pos, d_in]`` (zero
    outside sites), and the clean input ``x``."""

    x: dict[str, Tensor]
    f: dict[str, Tensor]
    err: dict[str, Tensor]


def split_nodes(sae, x: Tensor, sites: Tensor) -> tuple[Tensor, Tensor]:
    """``x -> (f, err)`` with ``decode(f) + err == x`` at sites; both zero elsewhere."""
    s = sites[..., None].to(x.dtype)
    f = sae.encode(x.to(sae.dtype)) * s
    err = (x - sae.decode(f).to(x.dtype)) * s
    return f, err


#: a baseline gives, for a batch and a hook, the target feature values and error (broadcastable to
#: ``[batch, pos, d_sae]`` and ``[batch, pos, d_in]``).
BaselineFn = Callable[[PromptBatch, str], tuple[Tensor, Tensor]]


def fixed_baseline(values: dict[str, tuple[Tensor, Tensor]]) -> BaselineFn:
    """The same target at every prompt and position (the reference mean, or zero)."""

    def fn(batch: PromptBatch, hook: str) -> tuple[Tensor, Tensor]:  # noqa: ARG001
        return values[hook]

    return fn


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------


def capture(names: Sequence[str], store: dict[str, Tensor]) -> list[Hook]:
    """Hooks that record each named activation (detached) into ``store`` under the name asked for (the
    bridge calls hooks with its canonical alias, so the name is bound here, not read from the hook)."""
    def grab(name: str):
        def fn(x, hook):  # noqa: ARG001
            store[name] = x.detach()
            return x

        return fn

    return [(name, grab(name)) for name in names]


@contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """No parameter gradients while attributing (only activations need them); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Runner:
    """Forward passes of one model with a node space and a metric. Logits are computed at the last
    position only (the final norm's output is cut to it), which saves the unembedding elsewhere."""

    def __init__(self, model, space: NodeSpace, metric: Metric):
        self.model, self.space, self.metric = model, space, metric
        self._cut = final_norm_hook(model)

    def forward(self, batch: PromptBatch, edits: Sequence[Hook] = ()) -> tuple[Tensor, dict]:
        """``(metric [batch], store)`` with the given ``(hook, fn)`` edits applied."""
        store: dict = {}

        def last_only(x, hook):  # noqa: ARG001
            return x[:, -1:]

        hooks = [*edits, *self.metric.hooks(store), (self._cut, last_only)]
        logits = self.model.run_with_hooks(batch.ids, attention_mask=batch.mask, fwd_hooks=hooks)
        return self.metric.value(logits[:, -1], store), store

    @torch.no_grad()
    def clean(self, batch: PromptBatch) -> tuple[Tensor, NodeValues]:
        xs: dict[str, Tensor] = {}
        m, _ = self.forward(batch, capture(self.space.hooks, xs))
        f, err = {}, {}
        for h in self.space.hooks:
            f[h], err[h] = split_nodes(self.space.saes[h], xs[h], batch.sites)
        return m, NodeValues(xs, f, err)

    # ---------------------------------------------------------------- gradients

    def gradients(self, batch: PromptBatch, shift: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(metric, hook -> dm/dx [batch, pos, d_in])`` in one forward and backward pass, with
        ``x + shift[hook]`` at the shifted hooks (IG's interpolation points)."""
        zs: dict[str, Tensor] = {}

        def leaf(name):
            def fn(x, hook):  # noqa: ARG001
                z = torch.zeros_like(x, requires_grad=True)
                zs[name] = z
                if shift and name in shift:
                    x = x + shift[name].to(x.dtype)
                return x + z

            return fn

        with torch.enable_grad():
            m, _ = self.forward(batch, [(h, leaf(h)) for h in self.space.hooks])
            grads = torch.autograd.grad(m.sum(), [zs[h] for h in self.space.hooks], allow_unused=True)
        return m.detach(), {h: (g if g is not None else torch.zeros_like(zs[h])) for h, g in zip(self.space.hooks, grads)}

    def _node_effects(self, batch: PromptBatch, values: NodeValues, base: BaselineFn, grads: dict[str, Tensor]) -> Tensor:
        """``(b - v) . grad`` per node: ``[batch, window, n_nodes]``."""
        parts = []
        for h in self.space.hooks:
            sae = self.space.saes[h]
            b_f, b_err = base(batch, h)
            g = grads[h].float()
            feat = (b_f - values.f[h]) * (g @ sae.W_dec.detach().float().T)
            err = ((b_err - values.err[h]) * g).sum(-1, keepdim=True)
            parts.append(fold_positions(torch.cat([feat, err], -1), batch, self.space.window))
        return torch.cat(parts, -1)

    def atp(self, batch: PromptBatch, values: NodeValues, base: BaselineFn) -> Tensor:
        """Linear attribution patching: ``[batch, window, n_nodes]`` from one backward pass."""
        _, grads = self.gradients(batch)
        return self._node_effects(batch, values, base, grads)

    def layer_shift(self, batch: PromptBatch, values: NodeValues, base: BaselineFn, hook: str) -> Tensor:
        """``x(baseline) - x(clean)`` of one hook with all its nodes patched (zero outside sites)."""
        sae = self.space.saes[hook]
        b_f, b_err = base(batch, hook)
        b_f = torch.broadcast_to(b_f, values.f[hook].shape)
        delta = (sae.decode(b_f) - sae.decode(values.f[hook])) + (b_err - values.err[hook])
        return delta * batch.sites[..., None]

    def ig(self, batch: PromptBatch, values: NodeValues, base: BaselineFn, steps: int) -> Tensor:
        """Integrated gradients, hook by hook: ``[batch, window, n_nodes]``; ``steps`` passes per hook."""
        grads = {}
        for h in self.space.hooks:
            with torch.no_grad():
                delta = self.layer_shift(batch, values, base, h)
            acc = torch.zeros_like(values.x[h])
            for k in range(steps):
                alpha = (k + 0.5) / steps
                _, g = self.gradients(batch, {h: alpha * delta})
                acc += g[h]
            grads[h] = acc / steps
        return self._node_effects(batch, values, base, grads)

    # ---------------------------------------------------------------- edges

    def edges(self, batch: PromptBatch, values: NodeValues, base: BaselineFn, nodes: Sequence[int],
              grads: dict[str, Tensor] | None = None) -> list[tuple[int, int, float]]:
        """Edges between ``nodes`` (flat indices, positions summed) of consecutive spliced hooks, as in
        Sparse Feature Circuits: ``e(u -> d) = sum_pos (dm/dd) (dd/du) (b_u - v_u)``, the part of d's
        attribution that flows from u. Each upstream hook's nodes are leaves carrying the clean values;
        each downstream node is recomputed from the incoming activation and differentiated back to the
        leaves (one backward pass per downstream node). Returns ``(upstream, downstream, mean effect)``."""
        if self.space.per_position:
            raise ValueError("edges are computed for positions summed (circuits.positions: sum)")
        if grads is None:
            _, grads = self.gradients(batch)
        hooks = list(self.space.hooks)
        leaves: dict[str, tuple[Tensor, Tensor]] = {}
        xs: dict[str, Tensor] = {}
        sites = batch.sites[..., None]

        def splice(name):
            def fn(x, hook):  # noqa: ARG001
                xs[name] = x
                sae = self.space.saes[name]
                f_leaf = values.f[name].detach().clone().requires_grad_(True)
                e_leaf = values.err[name].detach().clone().requires_grad_(True)
                leaves[name] = (f_leaf, e_leaf)
                return torch.where(sites, (sae.decode(f_leaf) + e_leaf).to(x.dtype), x)

            return fn

        by_hook: dict[str, list[int]] = {h: [] for h in hooks}
        for i in nodes:
            by_hook[self.space.locate(i)[0]].append(i)
        out = []
        with torch.enable_grad():
            self.forward(batch, [(h, splice(h)) for h in hooks])
            for up, down in zip(hooks, hooks[1:]):
                if not by_hook[up] or not by_hook[down]:
                    continue
                sae = self.space.saes[down]
                f_m = sae.encode(xs[down].to(sae.dtype)) * sites
                err_m = (xs[down] - sae.decode(f_m)) * sites
                g = grads[down].float()
                g_feat = g @ sae.W_dec.detach().float().T  # dm/df at the downstream hook
                b_f, b_err = base(batch, up)
                d_f = (b_f - values.f[up]) * sites
                d_err = (b_err - values.err[up]) * sites
                for d in by_hook[down]:
                    j = self.space.locate(d)[1]
                    target = (g * err_m).sum() if j == self.space.d_sae(down) else (g_feat[..., j] * f_m[..., j]).sum()
                    gf, ge = torch.autograd.grad(target, leaves[up], retain_graph=True, allow_unused=True)
                    for u in by_hook[up]:
                        k = self.space.locate(u)[1]
                        if k == self.space.d_sae(up):
                            w = (ge * d_err).sum() if ge is not None else 0.0
                        else:
                            w = (gf[..., k] * d_f[..., k]).sum() if gf is not None else 0.0
                        out.append((u, d, float(w) / len(batch)))
        return out

    # ---------------------------------------------------------------- exact patching

    def node_edit(self, batch: PromptBatch, base: BaselineFn, hook: str, select: Tensor) -> Callable:
        """A hook function that moves the selected nodes of ``hook`` to their baseline.

        ``select`` is ``[window, d_sae + 1]`` for every prompt alike, or ``[batch, window, d_sae + 1]`` per
        prompt (weights in [0, 1], usually 0/1). Features and error are computed from the incoming
        activation, so upstream edits propagate (downstream hooks recompute their nodes). Outside sites
        the activation is untouched. During generation (one new position at a time) every new position
        counts as a site and the last window slot applies.
        """
        sae = self.space.saes[hook]
        cols = node_positions(batch, self.space.window)
        b_f, b_err = base(batch, hook)  # before any forward pass: a baseline may run the model itself

        def fn(x, hook):  # noqa: ARG001 (TransformerLens passes its hook point)
            sel = select.to(x.device)
            if x.shape[1] == batch.sites.shape[1]:
                sites, valid = batch.sites, (cols >= 0).to(x.dtype)
                w = sel[..., cols.clamp(min=0), :] * valid[:, None]
            else:  # generated positions
                sites = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                w = sel[..., -1:, :]
            if b_f.dim() == 3 and b_f.shape[1] != x.shape[1]:  # per-position baselines have no generated positions
                raise ValueError("a per-prompt baseline cannot be used during generation")
            f, err = split_nodes(sae, x, sites)
            new_f = f + (b_f - f) * w[..., :-1]
            new_err = err + (b_err - err) * w[..., -1:]
            out = (sae.decode(new_f) - sae.decode(f)).to(x.dtype) + (new_err - err).to(x.dtype)
            return x + out * sites[..., None]

        return fn

    @torch.no_grad()
    def patch(self, batch: PromptBatch, base: BaselineFn, selection: dict[str, Tensor],
              extra: Sequence[Hook] = ()) -> Tensor:
        """Metric with the selected nodes of each hook patched (``selection``: hook -> ``[window, d_sae+1]``)."""
        edits = [(h, self.node_edit(batch, base, h, sel)) for h, sel in selection.items()]
        m, _ = self.forward(batch, [*edits, *extra])
        return m

    def select_nodes(self, nodes: Sequence[tuple[int, int]], weight: float = 1.0) -> dict[str, Tensor]:
        """``[(window slot, flat node index)]`` -> per-hook selection masks."""
        out: dict[str, Tensor] = {}
        for slot, index in nodes:
            hook, local = self.space.locate(index)
            if hook not in out:
                out[hook] = torch.zeros(self.space.window, self.space.size(hook))
            out[hook][slot, local] = weight
        return out

    def everything(self) -> dict[str, Tensor]:
        return {h: torch.ones(self.space.window, self.space.size(h)) for h in self.space.hooks}

    def exact_error_nodes(self, batch: PromptBatch, base: BaselineFn, effects: Tensor, m_clean: Tensor) -> Tensor:
        """``effects`` with every error node's column replaced by its exact effect (one forward pass per
        hook and window slot): error nodes are large moves that linear estimates get wrong."""
        out = effects.clone()
        for h in self.space.hooks:
            idx = self.space.offset(h) + self.space.d_sae(h)
            for slot in range(self.space.window):
                out[:, slot, idx] = self.exact(batch, base, [(slot, idx)], m_clean)[:, 0].to(out.dtype)
        return out

    def exact(self, batch: PromptBatch, base: BaselineFn, nodes: Sequence[tuple[int, int]], m_clean: Tensor) -> Tensor:
        """Exact effect of each node alone: ``[batch, len(nodes)]`` (one forward pass per node)."""
        cols = [self.patch(batch, base, self.select_nodes([node])) - m_clean for node in nodes]
        return torch.stack(cols, -1) if cols else m_clean.new_zeros(len(batch), 0)
