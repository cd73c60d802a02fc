"""Greedy decoding of one batch, each row leaving the batch once it has ended.

``transformers``' ``generate`` keeps every row of a batch until the last one ends, feeding padding to those that
have; :func:`greedy` drops a row (its keys and values leave the cache) at its end token instead. The tokens a row
gets up to its end are the same, so nothing is lost; what is saved is the rows' share of every later step
(a decoding step costs a fixed ~85 ms plus ~2.7 ms a row for the main job's model; refusals end after ~11 of
the controls' 20 tokens, a fifth of their decoding positions). ``tests/core/test_intervene.py`` checks the tokens
against ``generate`` on the whole batch.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor


@torch.no_grad()
def greedy(model, inputs: dict, width: int, eos: Collection[int], max_new_tokens: int, cache_kw: str = "past_key_values",
           alive: list[int] | None = None) -> tuple[list[list[int]], Tensor]:
    """Each row's greedy tokens up to, not including, its first ``eos`` token, and the float32 logits of the first
    step ``[batch, d_vocab]`` (the prompt's last position).

    ``inputs``: the model's inputs for the prompt (``attention_mask`` over every cached and new column, the new
    columns' ``input_ids`` of ``width`` columns, optionally a cache under ``cache_kw``); positions follow the mask,
    as ``generate`` sets them. ``alive``: a list the caller's edits read, kept equal to the batch members still
    decoding (indices into the batch), in the order of the rows of each step."""
    n = inputs["input_ids"].shape[0]
    alive = alive if alive is not None else list(range(n))
    alive[:] = range(n)
    tokens: list[list[int]] = [[] for _ in range(n)]
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = model(**{**inputs, "position_ids": positions[:, -width:]}, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float()
    cache, nxt, last = out.past_key_values, first.argmax(-1), positions[:, -1:]
    ends = torch.tensor(sorted(eos), dtype=torch.long)
    for step in range(max_new_tokens):
        ids = nxt.cpu()
        for b, t in zip(alive, ids.tolist()):
            tokens[b].append(t)
        keep = (~torch.isin(ids, ends)).nonzero().flatten()
        if step == max_new_tokens - 1 or len(keep) == 0:
            break
        if len(keep) < len(alive):  # rows that ended leave the batch
            idx = keep.to(mask.device)
            cache.batch_select_indices(idx)
            mask, last, nxt = mask[idx], last[idx], nxt[idx]
            alive[:] = [alive[i] for i in keep.tolist()]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, use_cache=True, **{cache_kw: cache})
        nxt = out.logits[:, -1].float().argmax(-1)
    cut = [next((i for i, t in enumerate(seq) if t in eos), len(seq)) for seq in tokens]
    return [seq[:c] for seq, c in zip(tokens, cut)], first
