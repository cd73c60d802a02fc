"""The nodes of a circuit: every feature of every spliced SAE, plus one error node per hook.

A hook's SAE ``sae`` splits its input ``x`` (at one position) into features ``f = encode(x)`` and an
error ``err = x - decode(f)``, so ``x = decode(f) + err`` exactly. Nodes are indexed hook by hook in
the order of :attr:`NodeSpace.hooks`: ``d_sae`` feature nodes, then the error node. Node ids are
``"<hook name>/<feature index>"`` and ``"<hook name>/err"`` (the hook name identifies the site, as
everywhere in refusal_lens).

Nodes live only at *sites*: prompt positions the SAEs were trained on (after the chat template's
fixed opening, not special tokens, not padding). With ``positions: per_position`` a node is also
tied to one of the last ``window`` prompt positions (``-1`` = the last prompt token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.chat import left_pad

ERROR = "err"


@dataclass(frozen=True)
class NodeSpace:
    """The hooks spliced (in model order), their SAEs, and the flat node index over them."""

    hooks: tuple[str, ...]
    saes: dict  # hook -> SAE-Lens SAE
    window: int = 1  # 1 = positions summed; W = per position over the last W prompt tokens

    @property
    def per_position(self) -> bool:
        return self.window > 1

    def d_sae(self, hook: str) -> int:
        return int(self.saes[hook].cfg.d_sae)

    def size(self, hook: str) -> int:
        """Nodes of one hook: its features plus the error node."""
        return self.d_sae(hook) + 1

    def offset(self, hook: str) -> int:
        out = 0
        for h in self.hooks:
            if h == hook:
                return out
            out += self.size(h)
        raise KeyError(hook)

    @property
    def n_nodes(self) -> int:
        return sum(self.size(h) for h in self.hooks)

    def node_id(self, index: int) -> str:
        hook, local = self.locate(index)
        return f"{hook}/{ERROR if local == self.d_sae(hook) else local}"

    def locate(self, index: int) -> tuple[str, int]:
        for h in self.hooks:
            if index < self.size(h):
                return h, index
            index -= self.size(h)
        raise IndexError("node index out of range")

    def index_of(self, node_id: str) -> int:
        hook, _, local = node_id.rpartition("/")
        if hook not in self.hooks:
            raise KeyError(f"node {node_id!r}: hook {hook!r} is not spliced (hooks: {list(self.hooks)})")
        j = self.d_sae(hook) if local == ERROR else int(local)
        return self.offset(hook) + j

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """``[..., n_nodes]`` -> hook -> ``[..., d_sae + 1]`` views."""
        out, start = {}, 0
        for h in self.hooks:
            out[h] = flat[..., start : start + self.size(h)]
            start += self.size(h)
        return out


@dataclass
class PromptBatch:
    """Left-padded prompts: ``ids``/``mask`` ``[batch, pos]`` and ``sites`` (bool ``[batch, pos]``): where
    nodes live. The metric is read at the last column (every prompt's last token, left padding)."""

    ids: Tensor
    mask: Tensor
    sites: Tensor
    rows: list[int]  # indices of these prompts in the stage's prompt list

    def __len__(self) -> int:
        return len(self.rows)


def make_batch(
    sequences: Sequence[Sequence[int]],
    rows: Sequence[int],
    pad_id: int,
    *,
    site_from: int,
    skip_token_ids: Sequence[int],
    window: int,
    device: torch.device | str = "cpu",
) -> PromptBatch:
    """Pad prompts and mark their sites: positions from ``site_from`` on (the template's shared opening
    is not a node), not special tokens, and with ``window > 1`` only the last ``window`` tokens."""
    ids, mask = left_pad(sequences, pad_id)
    pos = mask.cumsum(-1) - 1
    sites = mask.bool() & (pos >= site_from)
    if skip_token_ids:
        sites &= ~torch.isin(ids, torch.tensor(sorted(set(skip_token_ids)), dtype=torch.long))
    if window > 1:
        sites[:, : max(ids.shape[1] - window, 0)] = False
    return PromptBatch(ids.to(device), mask.to(device), sites.to(device), list(rows))


def node_positions(batch: PromptBatch, window: int) -> Tensor:
    """The per-position node axis: index ``[0, window)`` of each column (``window - 1`` = last token), or
    ``0`` everywhere when positions are summed. Columns outside the window get ``-1``."""
    width = batch.ids.shape[1]
    if window <= 1:
        return torch.zeros(width, dtype=torch.long, device=batch.ids.device)
    cols = torch.arange(width, device=batch.ids.device)
    return torch.where(cols >= width - window, cols - (width - window), torch.full_like(cols, -1))


def fold_positions(per_pos: Tensor, batch: PromptBatch, window: int) -> Tensor:
    """``[batch, pos, n]`` per-column values -> ``[batch, window, n]`` node values (summed over positions
    when ``window == 1``); values outside sites are dropped."""
    per_pos = per_pos * batch.sites[..., None]
    if window <= 1:
        return per_pos.sum(1, keepdim=True)
    width = per_pos.shape[1]
    if width >= window:
        return per_pos[:, width - window :]
    pad = per_pos.new_zeros(per_pos.shape[0], window - width, per_pos.shape[2])
    return torch.cat([pad, per_pos], 1)
