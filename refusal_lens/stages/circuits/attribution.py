"""Node effects on the refusal score: linear attribution patching, integrated gradients, exact patching.

The *effect* of a node on one prompt is ``m(node patched to its baseline) - m(clean)``, with ``m`` the
refusal score at the prompt's last position (:func:`refusal_lens.core.refusal.refusal_score`). Negative =
patching the node lowers refusal: the node *promotes* refusal. A feature is patched only where it is
active (``f > 0``), to its reference mean of the site class (or to zero): an inactive feature gets no
effect. Feature effects are returned per site class ``[batch, n_classes, n_features]``, error-node effects
per hook ``[batch, n_hooks]``.

**The splice is the identity.** With its error node, an SAE reproduces its input exactly (``decode(f) + err
= x``), so splicing SAEs at several hooks leaves the model unchanged and the gradient of ``m`` with respect
to a node is the gradient at its hook mapped through the decoder: ``dm/df_j = W_dec[j] . dm/dx`` and
``dm/d err = dm/dx``; downstream splices pass the gradient straight through their error term (as in
Sparse Feature Circuits). SAE-Lens's own ``use_error_term`` computes the error without gradient, which
would cut the upstream hooks off (tests/stages/circuits/test_circuits.py shows both).

* **AtP**: ``effect ~ sum_sites 1[f > 0] (b - f) . grad`` for every node of every hook, one forward and one
  backward pass.
* **IG**: per hook, the hook's nodes move together from clean to baseline in ``steps`` midpoint steps while
  every other hook stays clean; ``effect ~ (b - f) . mean_a grad(a)``. A hook's effects sum to the exact
  effect of patching the whole hook, up to the quadrature error.
* **Exact**: the forward pass with one node patched (the ground truth; one pass per node).

The runner works on the TransformerLens model in ``model.torch_dtype`` (float32 on CPU), and reads logits at
the last position only (the final norm's output is cut to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.stages.circuits.baselines import ClassMeans, gather_class
from refusal_lens.stages.circuits.edits import feature_edit, patch_edit
from refusal_lens.stages.circuits.nodes import NOT_A_SITE, NodeSpace, site_classes, split_nodes
from refusal_lens.core.hooks import final_norm_hook
from refusal_lens.core.edit import Edit, EditContext
from refusal_lens.core.intervene import Batch
from refusal_lens.core.refusal import RefusalTokens, refusal_score


@dataclass
class Values:
    """Per hook: the clean input ``x``, features ``f`` and error ``err`` ``[batch, pos, .]``; site classes ``cls``."""

    x: dict[str, Tensor]
    f: dict[str, Tensor]
    err: dict[str, Tensor]
    cls: Tensor


@dataclass
class Effects:
    features: Tensor  # [batch, n_classes, n_features]
    errors: Tensor  # [batch, n_hooks]


class Runner:
    """Forward passes of the TransformerLens model with :class:`~refusal_lens.core.intervene.Edit` s, over a node space."""

    def __init__(self, model, space: NodeSpace, tokens: RefusalTokens, means: ClassMeans, baseline: str = "mean"):
        self.model, self.space, self.tokens, self.means = model, space, tokens, means
        self.mode = "zero" if baseline == "zero" else "mean"
        self._cut = final_norm_hook(model)
        self.device = next(model.parameters()).device

    def forward(self, batch: Batch, edits: Sequence[Edit] = ()) -> Tensor:
        """The refusal score ``[batch]`` with ``edits`` applied (TransformerLens hook points)."""
        ctx = EditContext(batch.classes, batch.rows)

        def wrap(fn):
            def hook(x, hook=None):  # noqa: ARG001 (TransformerLens passes its hook point)
                return fn(x, ctx)

            return hook

        def last_only(x, hook=None):  # noqa: ARG001
            return x[:, -1:]

        hooks = [(e.hook, wrap(e.fn)) for e in edits] + [(self._cut, last_only)]
        logits = self.model.run_with_hooks(batch.ids, attention_mask=batch.mask, fwd_hooks=hooks)
        return refusal_score(logits[:, -1], self.tokens)

    @torch.no_grad()
    def clean(self, batch: Batch) -> tuple[Tensor, Values]:
        xs: dict[str, Tensor] = {}

        def grab(name):
            def fn(x, ctx):  # noqa: ARG001
                xs[name] = x.detach()
                return x

            return fn

        m = self.forward(batch, [Edit(h, grab(h)) for h in self.space.hooks])
        return m, self._values(batch, xs)

    def clean_and_gradients(self, batch: Batch) -> tuple[Tensor, Values, dict[str, Tensor]]:
        """:meth:`clean` and :meth:`gradients` from one forward and backward pass: the gradient pass adds a zero
        leaf at each hook, so the activations it sees there (and its metric) are the clean pass's."""
        xs: dict[str, Tensor] = {}
        m, grads = self.gradients(batch, seen=xs)
        return m, self._values(batch, xs), grads

    def _values(self, batch: Batch, xs: dict[str, Tensor]) -> Values:
        f, err = {}, {}
        with torch.no_grad():
            for h in self.space.hooks:
                f[h], err[h] = split_nodes(self.space.saes[h], xs[h])
        return Values(xs, f, err, site_classes(batch.classes, self.space.n_post))

    # ---------------------------------------------------------------- gradients

    def gradients(self, batch: Batch, shift: dict[str, Tensor] | None = None, seen: dict[str, Tensor] | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(metric, hook -> dm/dx [batch, pos, d_in])`` in one forward and backward pass, with
        ``x + shift[hook]`` at the shifted hooks (IG's interpolation points); ``seen`` gets each hook's incoming
        activation (detached)."""
        zs: dict[str, Tensor] = {}

        def leaf(name):
            def fn(x, ctx):  # noqa: ARG001
                if seen is not None:
                    seen[name] = x.detach()
                z = torch.zeros_like(x, requires_grad=True)
                zs[name] = z
                if shift and name in shift:
                    x = x + shift[name].to(x.dtype)
                return x + z

            return fn

        with torch.enable_grad():
            m = self.forward(batch, [Edit(h, leaf(h)) for h in self.space.hooks])
            grads = torch.autograd.grad(m.sum(), [zs[h] for h in self.space.hooks], allow_unused=True)
        return m.detach(), {h: (g if g is not None else torch.zeros_like(zs[h])) for h, g in zip(self.space.hooks, grads)}

    def _targets(self, values: Values, hook: str) -> tuple[Tensor, Tensor]:
        """Baseline features (active entries only; inactive stay as they are) and errors, ``[batch, pos, .]``."""
        f = values.f[hook]
        b_f = gather_class(self.means.features[hook], values.cls) if self.mode == "mean" else torch.zeros_like(f)
        b_f = torch.where(f > 0, b_f, f)
        b_err = gather_class(self.means.errors[hook], values.cls) if self.mode == "mean" \
            else torch.zeros_like(values.err[hook])
        site = (values.cls != NOT_A_SITE) & (values.cls < self.space.n_classes)
        return b_f * site[..., None] + f * ~site[..., None], torch.where(site[..., None], b_err, values.err[hook])

    def _effects(self, values: Values, grads: dict[str, Tensor]) -> Effects:
        """``(b - v) . grad`` per node, feature effects summed within each site class."""
        n_cls = self.space.n_classes
        onehot = torch.nn.functional.one_hot(values.cls.clamp(0, n_cls), n_cls + 1)[..., :n_cls].float()
        onehot = onehot * ((values.cls != NOT_A_SITE) & (values.cls < n_cls))[..., None]  # [B, T, C]
        feats, errs = [], []
        for h in self.space.hooks:
            sae = self.space.saes[h]
            b_f, b_err = self._targets(values, h)
            g = grads[h].float()
            per_pos = (b_f - values.f[h]) * (g @ sae.W_dec.detach().float().T)  # [B, T, d_sae]
            feats.append(torch.einsum("btc,btd->bcd", onehot, per_pos))
            errs.append(((b_err - values.err[h]) * g).sum(-1).mul(onehot.sum(-1)).sum(-1))
        return Effects(torch.cat(feats, -1), torch.stack(errs, -1))

    def atp(self, batch: Batch, values: Values, grads: dict[str, Tensor] | None = None) -> Effects:
        """Linear attribution patching from one backward pass (``grads``: that pass's, when it has run already:
        :meth:`clean_and_gradients`)."""
        if grads is None:
            _, grads = self.gradients(batch)
        return self._effects(values, grads)

    def hook_shift(self, values: Values, hook: str) -> Tensor:
        """``x(baseline) - x(clean)`` of one hook with all its nodes patched (zero outside sites)."""
        sae = self.space.saes[hook]
        b_f, b_err = self._targets(values, hook)
        return (sae.decode(b_f.to(sae.dtype)).float() - sae.decode(values.f[hook].to(sae.dtype)).float()
                + (b_err - values.err[hook]))

    def ig(self, batch: Batch, values: Values, steps: int) -> Effects:
        """Integrated gradients, hook by hook; ``steps`` forward and backward passes per hook."""
        grads = {}
        for h in self.space.hooks:
            with torch.no_grad():
                delta = self.hook_shift(values, h)
            acc = torch.zeros_like(values.x[h], dtype=torch.float32)
            for k in range(steps):
                _, g = self.gradients(batch, {h: (k + 0.5) / steps * delta})
                acc += g[h].float()
            grads[h] = acc / steps
        return self._effects(values, grads)

    # ---------------------------------------------------------------- exact patching

    @torch.no_grad()
    def exact_error(self, batch: Batch, m_clean: Tensor, k: int) -> Tensor:
        """Exact effect of hook ``k``'s error node (its error term at every site to the class mean): ``[batch]``."""
        h = self.space.hooks[k]
        edit = patch_edit(self.space, h, torch.zeros(self.space.d_sae(h)), True, self.means, keep=False)
        return self.forward(batch, [edit]) - m_clean

    def exact_errors(self, batch: Batch, m_clean: Tensor) -> Tensor:
        """Exact effect of each hook's error node (one forward pass per hook): ``[batch, n_hooks]``."""
        return torch.stack([self.exact_error(batch, m_clean, k) for k in range(len(self.space.hooks))], -1)

    @torch.no_grad()
    def exact_feature(self, batch: Batch, m_clean: Tensor, index: int) -> Tensor:
        """Exact effect of one feature (every site, active positions only): ``[batch]``."""
        hook, j = self.space.locate(index)
        mask = torch.zeros(self.space.d_sae(hook))
        mask[j] = 1.0
        edit = feature_edit(self.space, hook, mask, self.mode, self.means, positions="after_opening")
        return self.forward(batch, [edit]) - m_clean

    # ---------------------------------------------------------------- edges

    def edges(self, batch: Batch, values: Values, features: Sequence[int],
              grads: dict[str, Tensor] | None = None) -> list[tuple[str, str, float]]:
        """Edges between ``features`` (flat indices) and error nodes of consecutive spliced hooks, as in Sparse
        Feature Circuits: ``e(u -> d) = sum_sites (dm/dd) (dd/du) (b_u - v_u)``, the part of d's attribution that
        flows from u. Upstream nodes are leaves carrying the clean values; each downstream node is recomputed
        from the incoming activation and differentiated back to the leaves (one backward pass per downstream
        node). Returns ``(upstream id, downstream id, mean effect over the batch)``."""
        if grads is None:
            _, grads = self.gradients(batch)
        hooks = list(self.space.hooks)
        site = ((values.cls != NOT_A_SITE) & (values.cls < self.space.n_classes))[..., None]
        leaves: dict[str, tuple[Tensor, Tensor]] = {}
        xs: dict[str, Tensor] = {}

        def splice(name):
            def fn(x, ctx):  # noqa: ARG001
                xs[name] = x
                sae = self.space.saes[name]
                f_leaf = values.f[name].detach().clone().requires_grad_(True)
                e_leaf = values.err[name].detach().clone().requires_grad_(True)
                leaves[name] = (f_leaf, e_leaf)
                return torch.where(site, (sae.decode(f_leaf.to(sae.dtype)).float() + e_leaf).to(x.dtype), x)

            return fn

        by_hook = self.space.by_hook(features)
        out = []
        with torch.enable_grad():
            self.forward(batch, [Edit(h, splice(h)) for h in hooks])
            for up, down in zip(hooks, hooks[1:]):
                sae = self.space.saes[down]
                f_m, err_m = split_nodes(sae, xs[down])
                g = grads[down].float()
                g_feat = g @ sae.W_dec.detach().float().T
                b_f, b_err = self._targets(values, up)
                d_f = (b_f - values.f[up]) * site
                d_err = (b_err - values.err[up]) * site
                targets = [(self.space.error_id(down), (g * err_m * site).sum())]
                targets += [(f"{down}/{j}", (g_feat[..., j] * f_m[..., j] * site[..., 0]).sum()) for j in by_hook.get(down, [])]
                for d_id, target in targets:
                    gf, ge = torch.autograd.grad(target, leaves[up], retain_graph=True, allow_unused=True)
                    w_err = float((ge * d_err).sum()) if ge is not None else 0.0
                    out.append((self.space.error_id(up), d_id, w_err / len(batch)))
                    for k in by_hook.get(up, []):
                        w = float((gf[..., k] * d_f[..., k]).sum()) if gf is not None else 0.0
                        out.append((f"{up}/{k}", d_id, w / len(batch)))
        return out
