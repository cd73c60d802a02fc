"""Interventions on SAE features and nodes, as :class:`~refusal_lens.core.intervene.Edit` s.

Each edit encodes the hook's activation with its SAE, changes some features (or the error term) and adds
the change of the reconstruction back: ``x' = x + decode(f') - decode(f)`` (the error term is kept, as in
Yeo et al. and Sparse Feature Circuits). The same functions serve the HF Intervener (generation, bf16) and
the TransformerLens runner of the attribution methods.

**Feature interventions** (behaviour; :func:`feature_edit`) act on *active* features only (an inactive
feature has nothing to remove):

* ``zero``: ``f_j <- 0``;
* ``mean``: ``f_j <- mean_j[class]`` (the reference mean of its site class; the template's opening is never
  changed by it: its mean is its own value);
* ``scale``: ``f_j <- -c f_j`` (``circuits.scale_c``, Yeo et al.'s c = -3 / -1 is ``scale_c: 3`` / ``1``);

at ``positions`` = ``all`` (every position, the template's opening and generated tokens included) or
``after_opening`` (every position after the opening, generated tokens included).

**Steering** (induction; :func:`steer_edit`): ``f_j <- target_j[class]`` (the refused-prompt mean) at every
position after the opening, inactive features included: it adds the features.

**Node patches** (faithfulness and completeness; :func:`patch_edit`): at every site of the hook (every
prompt position after the opening: no site is left unpatched), the nodes *outside* ``keep`` (or inside
``ablate``) move to their class means: a feature ``f_j <- mean_j``, the error node ``err <- mean_err``, so
that "every node at baseline" is the class-mean activation itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from refusal_lens.core.chat import GENERATED, OPENING, PAD
from refusal_lens.stages.circuits.baselines import ClassMeans, gather_class
from refusal_lens.stages.circuits.nodes import NOT_A_SITE, NodeSpace, site_classes, split_nodes
from refusal_lens.core.edit import Edit, EditContext

INTERVENTIONS = ("zero", "mean", "scale")
POSITIONS = ("all", "after_opening")


def _mask_rows(selection: Tensor | Mapping[int, Tensor], rows: Sequence[int], d: int, device) -> Tensor:
    """``[B, d]`` (or ``[d]``) 0/1 feature selection: one for all rows, or per row (a dict row -> ``[d]``)."""
    if isinstance(selection, Tensor):
        return selection.to(device)
    return torch.stack([selection.get(r, torch.zeros(d)) for r in rows]).to(device)


def _per_row(mask: Tensor, x: Tensor) -> Tensor:
    """Broadcast a ``[d]`` or ``[B, d]`` mask to ``[B, T, d]``-compatible."""
    return mask[None, None] if mask.dim() == 1 else mask[:, None]


def feature_edit(space: NodeSpace, hook: str, selection: Tensor | Mapping[int, Tensor], mode: str,
                 means: ClassMeans | None, scale_c: float = 1.0, positions: str = "all", *,
                 remove_along: Tensor | None = None, tally: dict | None = None) -> Edit:
    """Ablate the selected features of ``hook`` (see the module docstring); ``selection`` is a ``[d_sae]`` 0/1
    mask, or per prompt row a dict of masks (random control sets in one batch).

    ``remove_along``: a direction whose component is taken out of the edit, ``delta <- delta - (delta . u) u``
    (``u`` its unit vector): what the features change *beyond* that direction. ``tally``: a dict that gets, summed
    over the prompt positions the edit runs on (not padding, the opening or generated tokens), ``along``
    (``(delta . u)^2``, with ``u`` = ``tally["unit"]``), ``total`` (``|delta|^2``), ``norm`` (``|delta|``) and
    ``positions`` (how many): the edit's size and alignment."""
    if mode not in INTERVENTIONS:
        raise ValueError(f"circuits intervention {mode!r}; allowed: {', '.join(INTERVENTIONS)}")
    if positions not in POSITIONS:
        raise ValueError(f"circuits positions {positions!r}; allowed: {', '.join(POSITIONS)}")
    sae = space.saes[hook]

    def fn(x: Tensor, ctx: EditContext) -> Tensor:
        f, _ = split_nodes(sae, x)
        sel = _per_row(_mask_rows(selection, ctx.rows, f.shape[-1], x.device), x).bool() & (f > 0)
        where = (ctx.classes != PAD)
        if positions == "after_opening" or mode == "mean":
            where &= ctx.classes != OPENING
        sel &= where[..., None]
        if mode == "zero":
            new = torch.where(sel, torch.zeros_like(f), f)
        elif mode == "scale":
            new = torch.where(sel, -scale_c * f, f)
        else:
            target = gather_class(means.features[hook], site_classes(ctx.classes, space.n_post))
            new = torch.where(sel, target, f)
        delta = sae.decode(new.to(sae.dtype)).float() - sae.decode(f.to(sae.dtype)).float()
        if remove_along is not None:
            delta = delta - (delta @ u_remove.to(x.device))[..., None] * u_remove.to(x.device)
        if tally is not None:  # the prompts' own positions: not the opening (computed once per pass or batch,
            # not per prompt), not generated tokens (the same tally whether a score pass or a generation runs it)
            _count(tally, delta, (ctx.classes != PAD) & (ctx.classes != OPENING) & (ctx.classes != GENERATED))
        return (x.float() + delta).to(x.dtype)

    u_remove = None if remove_along is None else (remove_along.float() / remove_along.float().norm())
    # a per-row selection (a dict of rows) reads ctx.rows: its opening cannot be shared between rows
    return Edit(hook, fn, opening=positions == "all" and mode != "mean", per_row=not isinstance(selection, Tensor))


def _count(tally: dict, delta: Tensor, where: Tensor) -> None:
    """Add an edit's squared component along ``tally["unit"]``, squared norm, norm and positions to ``tally``."""
    d = delta[where]
    unit = tally["unit"].float().to(d.device)
    unit = unit / unit.norm()
    tally["along"] = tally.get("along", 0.0) + float(((d @ unit) ** 2).sum())
    tally["total"] = tally.get("total", 0.0) + float((d**2).sum())
    tally["norm"] = tally.get("norm", 0.0) + float(d.norm(dim=-1).sum())
    tally["positions"] = tally.get("positions", 0) + int(where.sum())


def steer_edit(space: NodeSpace, hook: str, selection: Tensor, targets: ClassMeans) -> Edit:
    """Set the selected features of ``hook`` to their target class means after the opening (induction)."""
    sae = space.saes[hook]

    def fn(x: Tensor, ctx: EditContext) -> Tensor:
        f, _ = split_nodes(sae, x)
        cls = site_classes(ctx.classes, space.n_post)
        sel = selection.to(x.device).bool()[None, None] & (cls != NOT_A_SITE)[..., None]
        new = torch.where(sel, gather_class(targets.features[hook], cls), f)
        delta = sae.decode(new.to(sae.dtype)).float() - sae.decode(f.to(sae.dtype)).float()
        return (x.float() + delta).to(x.dtype)

    return Edit(hook, fn, opening=False)


def patch_edit(space: NodeSpace, hook: str, features: Tensor, error: bool, means: ClassMeans,
               keep: bool) -> Edit:
    """Move nodes of ``hook`` to their class means at every site: those outside (``keep=True``) or inside
    (``keep=False``) the set given by the ``[d_sae]`` 0/1 mask ``features`` and the flag ``error``."""
    sae = space.saes[hook]

    def fn(x: Tensor, ctx: EditContext) -> Tensor:
        cls = site_classes(ctx.classes, space.n_post)
        site = (cls != NOT_A_SITE)[..., None]
        f, err = split_nodes(sae, x)
        in_set = features.to(x.device).bool()
        move_f = ~in_set if keep else in_set
        move_err = (not error) if keep else error
        new = torch.where(move_f, gather_class(means.features[hook], cls), f)
        delta = sae.decode(new.to(sae.dtype)).float() - sae.decode(f.to(sae.dtype)).float()
        if move_err:
            delta = delta + (gather_class(means.errors[hook], cls) - err)
        return (x.float() + delta * site).to(x.dtype)

    return Edit(hook, fn, opening=False)


def edits_for(space: NodeSpace, per_hook: Mapping[str, Tensor], make: Callable[[str, Tensor], Edit]) -> list[Edit]:
    """One edit per hook with a non-empty selection."""
    return [make(h, sel) for h, sel in per_hook.items() if bool(sel.any())]


def feature_masks(space: NodeSpace, features: Sequence[int]) -> dict[str, Tensor]:
    """Flat feature indices -> per-hook ``[d_sae]`` 0/1 masks (every spliced hook present)."""
    out = {h: torch.zeros(space.d_sae(h)) for h in space.hooks}
    for i in features:
        hook, j = space.locate(int(i))
        out[hook][j] = 1.0
    return out
