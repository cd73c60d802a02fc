"""An edit: what an intervention does at one hook point, and how the edits of several conditions share a batch.

:class:`Edit` is a TransformerLens hook name and a function ``fn(x, ctx) -> x`` of the activation there
(:class:`EditContext`: each column's position class and each row's index in the caller's list); its flags say
whether it may change the template's opening and whether it differs between rows, which is what lets
:class:`refusal_lens.core.intervene.Intervener` compute the opening once. :func:`per_condition` merges the edits of
several conditions into one edit per hook that touches each condition's rows only, and :func:`opening_groups`
finds the rows of a batch whose opening is edited alike (one opening computed per group).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EditContext:
    classes: Tensor  # [batch, columns] position classes of the columns of x (PAD for padding)
    rows: list[int]  # row of each batch member in the caller's list


EditFn = Callable[[Tensor, EditContext], Tensor]


@dataclass(frozen=True)
class Edit:
    hook: str  # TransformerLens hook name (blocks.{i}.hook_resid_pre, ...hook_attn_out, ...)
    fn: EditFn
    #: whether the edit may change the template's opening positions (``False``: it leaves them as they are,
    #: so the opening's keys and values can be computed once and shared; see :class:`Intervener`).
    opening: bool = True
    #: whether the edit differs between the rows of a batch (it reads ``ctx.rows``): then an opening it
    #: changes is computed with each batch's rows.
    per_row: bool = False
    #: for a per-row edit, a key of each row such that rows with the same key get the same edit of the opening
    #: (e.g. the condition a row belongs to): the opening is then computed once per key, not once per row.
    #: None: every row may differ.
    row_key: Callable[[int], Hashable] | None = None


#: edits for a batch: a fixed list, or a function of the batch's rows (per-prompt conditions).
EditsFor = Sequence[Edit] | Callable[[list[int]], Sequence[Edit]]


def per_condition(edits: Sequence[Sequence[Edit]], owner: Sequence[int]) -> list[Edit]:
    """One edit per hook that applies condition ``c``'s edits to the rows ``r`` with ``owner[r] == c`` only.

    Its ``row_key`` is the row's condition where that condition's edits at the hook change the opening, and one
    shared key for every other row (their opening is left as it is): unless some condition's edit there reads
    ``ctx.rows`` itself (``per_row``), then no key."""
    by_hook: dict[str, dict[int, list[EditFn]]] = {}
    changes: dict[str, set[int]] = {}  # per hook, the conditions whose edits there change the opening
    reads_rows: set[str] = set()
    for c, es in enumerate(edits):
        for e in es:
            by_hook.setdefault(e.hook, {}).setdefault(c, []).append(e.fn)
            changes.setdefault(e.hook, set())
            if e.opening:
                changes[e.hook].add(c)
            if e.per_row:
                reads_rows.add(e.hook)

    def key_of(conditions: frozenset[int]) -> Callable[[int], Hashable]:
        return lambda r: owner[r] if owner[r] in conditions else None

    def dispatch(fns_of: dict[int, list[EditFn]]) -> EditFn:
        def fn(x: Tensor, ctx: EditContext) -> Tensor:
            for c, fns in fns_of.items():
                idx = [b for b, r in enumerate(ctx.rows) if owner[r] == c]
                if not idx:
                    continue
                at = torch.tensor(idx, device=x.device)
                sub = x.index_select(0, at)
                sub_ctx = EditContext(ctx.classes.index_select(0, at.to(ctx.classes.device)), [ctx.rows[b] for b in idx])
                for f in fns:
                    sub = f(sub, sub_ctx)
                x = x.index_copy(0, at, sub.to(x.dtype))
            return x

        return fn

    return [Edit(h, dispatch(fns), opening=bool(changes[h]), per_row=True,
                 row_key=None if h in reads_rows else key_of(frozenset(changes[h]))) for h, fns in by_hook.items()]


def opening_groups(edits: Sequence[Edit], rows: Sequence[int]) -> tuple[list[int], list[int]]:
    """For a batch's ``rows`` under per-row ``edits`` that change the opening: one representative row per distinct
    opening (rows whose every such edit has the same ``row_key``) and, per row, the index of its representative."""
    keyed = [e for e in edits if e.opening and e.per_row]
    reps: list[int] = []
    index: list[int] = []
    seen: dict[tuple, int] = {}
    for r in rows:
        key = tuple(r if e.row_key is None else e.row_key(r) for e in keyed)
        if key not in seen:
            seen[key] = len(reps)
            reps.append(r)
        index.append(seen[key])
    return reps, index
