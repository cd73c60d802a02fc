"""Activation batches for SAE training, read from the collect stage's hook datasets on disk.

The datasets are memory-mapped Arrow files, so reading stays bounded in memory whatever their size:
each epoch draws a seeded permutation of the training rows (balanced by resampling when asked) and
gathers them chunk by chunk with Arrow ``take``.

Held-out prompts are chosen by a hash of their id (:func:`is_heldout`), so the split does not depend
on the order or number of prompts, and the same prompts are held out for every hook.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from refusal_lens.activations.store import HookActivations

logger = logging.getLogger(__name__)


def is_heldout(prompt_id: str, fraction: float) -> bool:
    """Deterministic held-out membership from a hash of the prompt id."""
    bucket = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) / 16**8
    return bucket < fraction


def epoch_order(groups: dict[tuple, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One epoch: every group resampled to the size of the largest, concatenated and shuffled.

    With one group this is a plain permutation. Larger groups are used whole; smaller ones are
    repeated (with a fresh draw each epoch), so each group contributes equally to the batches.
    """
    size = max(len(g) for g in groups.values())
    parts = []
    for g in groups.values():
        if len(g) == size:
            parts.append(g)
        else:
            reps = np.concatenate([g] * (size // len(g)) + [rng.choice(g, size % len(g), replace=False)])
            parts.append(reps)
    order = np.concatenate(parts)
    rng.shuffle(order)
    return order


def split_rows(
    acts: HookActivations, fraction: float, *, min_position: int = 0, exclude_token_ids: Iterable[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of training and held-out prompts of a hook folder.

    Rows at positions below ``min_position`` (the chat template's fixed opening, identical in every
    prompt) and rows of ``exclude_token_ids`` (special tokens, whose activations are outliers, e.g.
    attention sinks) are left out of both.
    """
    held = {pid: is_heldout(pid, fraction) for pid in set(acts.prompt_ids)}
    mask = np.fromiter((held[p] for p in acts.prompt_ids), dtype=bool, count=len(acts.prompt_ids))
    keep = np.ones(len(acts), dtype=bool)
    if min_position > 0:
        keep &= acts.positions >= min_position
    excluded = np.asarray(sorted(set(exclude_token_ids)), dtype=np.int64)
    if len(excluded):
        keep &= ~np.isin(acts.token_ids, excluded)
    return np.flatnonzero(~mask & keep), np.flatnonzero(mask & keep)


def activation_batches(
    acts: HookActivations,
    rows: np.ndarray,
    batch_size: int,
    *,
    balance: str = "none",
    seed: int = 0,
    chunk_batches: int = 32,
) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, width]`` float32 batches of ``rows``, epoch after epoch.

    Rows are gathered ``chunk_batches`` batches at a time (sorted within a chunk for sequential
    reads, then shuffled back), so per-batch cost is one slice of an in-memory chunk.
    """
    if len(rows) == 0:
        raise ValueError(f"{acts.folder}: no training rows")
    rng = np.random.default_rng(seed)
    groups = acts.groups(rows, balance)
    carry = torch.empty((0, acts.width))
    while True:
        order = epoch_order(groups, rng)
        for start in range(0, len(order), chunk_batches * batch_size):
            chunk_rows = order[start : start + chunk_batches * batch_size]
            sort = np.argsort(chunk_rows, kind="stable")
            chunk = torch.empty((len(chunk_rows), acts.width))
            chunk[torch.from_numpy(sort)] = acts.take(chunk_rows[sort])
            chunk = torch.cat([carry, chunk]) if len(carry) else chunk
            n_full = len(chunk) // batch_size
            for b in range(n_full):
                yield chunk[b * batch_size : (b + 1) * batch_size]
            carry = chunk[n_full * batch_size :]


def tensor_batches(data: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The in-memory reference provider (benchmarks): endless shuffled batches of a tensor."""
    gen = torch.Generator().manual_seed(seed)
    carry = data[:0]
    while True:
        perm = data[torch.randperm(len(data), generator=gen)]
        perm = torch.cat([carry, perm])
        n_full = len(perm) // batch_size
        for b in range(n_full):
            yield perm[b * batch_size : (b + 1) * batch_size]
        carry = perm[n_full * batch_size :]
