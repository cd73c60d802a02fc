"""Activation batches for SAE training, read from the collect stage's hook datasets on disk.

The datasets are memory-mapped Arrow files, so reading stays bounded in memory whatever their size:
each epoch draws a seeded permutation of the training rows (balanced by resampling when asked) and
gathers them chunk by chunk with Arrow ``take``.

Which rows an SAE trains and is judged on comes from the collect stage's split (:mod:`refusal_lens.core.splits`):
training uses the discovery prompts, the quality bar the validation prompts, the reported quality the test
prompts; the same prompts for every hook. Only *sites* count: positions after the chat template's opening
(which is identical in every prompt and holds the attention sink), i.e. the prompt's content, the
post-instruction tokens (special tokens included: the circuits patch them) and the response tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from refusal_lens.activations.store import HookActivations

logger = logging.getLogger(__name__)


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


def site_rows(acts: HookActivations, split_of: dict[str, str], opening: dict[str, int],
              exclude_token_ids: Iterable[int] = ()) -> dict[str, np.ndarray]:
    """Row indices of a hook folder per split (``discovery`` / ``validation`` / ``test``), at the sites only:
    positions ``>= opening[prompt]`` (the template's opening left out), not ``exclude_token_ids``."""
    pids = acts.prompt_ids
    split = np.fromiter((split_of[p] for p in pids), dtype=object, count=len(pids))
    first = np.fromiter((opening[p] for p in pids), dtype=np.int64, count=len(pids))
    keep = acts.positions >= first
    excluded = np.asarray(sorted(set(exclude_token_ids)), dtype=np.int64)
    if len(excluded):
        keep &= ~np.isin(acts.token_ids, excluded)
    return {s: np.flatnonzero(keep & (split == s)) for s in ("discovery", "validation", "test")}


def distinct_rows(acts: HookActivations, rows: np.ndarray, chunk: int = 8192) -> int:
    """How many different activation vectors ``rows`` hold (identical prompts give identical rows)."""
    seen: set[bytes] = set()
    for start in range(0, len(rows), chunk):
        raw = acts.raw(rows[start : start + chunk]).numpy()
        seen.update(r.tobytes() for r in raw)
    return len(seen)


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
