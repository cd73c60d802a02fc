"""The refusal score: how strongly the model leans to refuse, read at the first response position.

**Score** (:func:`refusal_score`), as in Arditi et al. 2024: with ``R`` the set of tokens that start the
model's refusals, ``log p(R) - log(1 - p(R))`` at the last prompt position (whose logits give the first
response token). It is computed as ``logsumexp(logits[R]) - logsumexp(logits[not R])``, which is exact and
stable (no softmax, no ``log(1 - p)`` underflow). Positive = the model leans to refuse.

**Which tokens start refusals** is learned per model from the discovery split's own responses
(:func:`learn_refusal_tokens`): a first response token belongs to ``R`` when at least ``min_count``
discovery responses start with it and at least ``min_share`` of those are judged refused
(:mod:`refusal_lens.core.judge`). The family's words (:mod:`refusal_lens.core.families`, e.g. ``I`` and
``As`` for ChatML models) are the fallback when no token qualifies, and are always checked to be
single tokens at the response start (:class:`RefusalTokenError` otherwise). How well the score
separates refused from complied responses is measured on the test split (AUROC, in the report).

The judge of the text itself is :mod:`refusal_lens.core.judge`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.errors import UserError


class RefusalTokenError(UserError, ValueError):
    """A refusal word that is not exactly one token at the response start."""


@dataclass(frozen=True)
class RefusalTokens:
    """The refusal-start token set ``R`` and how it was chosen."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]  # their text, for reading
    source: str  # "learned" (from discovery responses) or "family" (the family's words)
    counts: tuple[tuple[int, int, int], ...] = ()  # (id, responses starting with it, of which refused)

    def to_dict(self) -> dict:
        return {"ids": list(self.ids), "tokens": list(self.tokens), "source": self.source,
                "counts": [list(c) for c in self.counts]}

    @classmethod
    def from_dict(cls, d: dict) -> RefusalTokens:
        """The inverse of :meth:`to_dict` (as stored in the collect stage's manifest)."""
        return cls(tuple(d["ids"]), tuple(d["tokens"]), d["source"], tuple(tuple(c) for c in d.get("counts", [])))


def response_start_ids(tokenizer, prefix_text: str, words: Sequence[str], kind: str = "refusal") -> tuple[int, ...]:
    """Token id of each word as the first token of a response that follows ``prefix_text``.

    ``prefix_text`` is a chat-formatted prompt ending in the generation prompt. A word that encodes
    to more or fewer than one token there is an error (a magic number would silently be wrong).
    """
    if not words:
        raise RefusalTokenError(f"the {kind} token set is empty; give at least one word")
    base = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    ids = []
    for word in words:
        full = tokenizer(prefix_text + word, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) - len(base) != 1:
            pieces = tokenizer.convert_ids_to_tokens(full[len(base) :]) if full[: len(base)] == base else "?"
            raise RefusalTokenError(
                f"{kind} token {word!r} encoded to {len(full) - len(base)} tokens {pieces} at the response "
                "start; each must map to exactly one token. Choose other words "
                "(refusal_lens.core.families)"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise RefusalTokenError(f"{kind} tokens {list(words)} map to repeated ids {ids}")
    return tuple(ids)


def family_refusal_tokens(tokenizer, prefix_text: str, words: Sequence[str]) -> RefusalTokens:
    ids = response_start_ids(tokenizer, prefix_text, words)
    return RefusalTokens(ids, tuple(words), "family")


def learn_refusal_tokens(first_ids: Sequence[int], refused: Sequence[bool], fallback: RefusalTokens, tokenizer,
                         min_count: int = 2, min_share: float = 0.8) -> RefusalTokens:
    """``R`` from the first tokens of (discovery) responses and their judgements; ``fallback`` when none qualifies.

    ``first_ids`` holds each response's first token (responses with no token are left out by the caller).
    """
    total: Counter[int] = Counter(first_ids)
    ref: Counter[int] = Counter(t for t, r in zip(first_ids, refused) if r)
    chosen = sorted(t for t, n in total.items() if n >= min_count and ref[t] >= min_share * n)
    counts = tuple((t, total[t], ref[t]) for t in sorted(total, key=lambda t: (-total[t], t)))
    if not chosen:
        return RefusalTokens(fallback.ids, fallback.tokens, "family", counts)
    return RefusalTokens(tuple(chosen), tuple(tokenizer.convert_ids_to_tokens(chosen)), "learned", counts)


def refusal_score(logits: Tensor, tokens: RefusalTokens) -> Tensor:
    """``logsumexp(logits[R]) - logsumexp(logits[not R])`` over the last dimension (``[..., d_vocab]``)."""
    logits = logits.float()
    member = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    member[list(tokens.ids)] = True
    neg = torch.finfo(logits.dtype).min
    in_r = torch.logsumexp(logits.masked_fill(~member, neg), dim=-1)
    out_r = torch.logsumexp(logits.masked_fill(member, neg), dim=-1)
    return in_r - out_r


def auroc(pos, neg) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U / n_pos n_neg)."""
    import numpy as np

    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
