"""Pass 3 of collect, one batch: a plain forward pass through ``inference.collector`` that gives every hook's
kept positions and the refusal score at the last prompt token; the batch's rows of the prompts table.

The kept positions (``inference.positions``: ``last``, ``all`` or ``post_instruction``; padding never; the
response tokens too with ``inference.store_response_activations``) come from one unpadded sequence each
(:func:`positions_to_keep`); the forward pass has an explicit attention mask (never inside ``generate``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from refusal_lens.activations.collector import CollectRequest, make_collector
from refusal_lens.activations.store import STORAGE_TORCH, to_storage
from refusal_lens.config import Config, InferenceConfig
from refusal_lens.core.chat import EncodedPrompt, left_pad
from refusal_lens.core.refusal import RefusalTokens, refusal_score
from refusal_lens.data.prompts import Prompt
from refusal_lens.models.loading import LoadedModel
from refusal_lens.run.collected import Judged


@dataclass
class CollectStats:
    prompts: int = 0
    forward_tokens: int = 0
    generated_tokens: int = 0
    bytes_written: int = 0
    generate_s: float = 0.0
    forward_s: float = 0.0
    write_s: float = 0.0
    batch_size_final: int = 0

    def add(self, other: CollectStats) -> None:
        for f in ("prompts", "forward_tokens", "generated_tokens", "bytes_written"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for f in ("generate_s", "forward_s", "write_s"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class BatchOutput:
    """Everything a batch produced, before it is written."""

    prompt_rows: list[dict]
    hook_values: dict[str, np.ndarray]  # hook -> [n_positions, width] in the storage dtype
    token_ids: np.ndarray
    meta: dict[str, list]
    stats: CollectStats


def positions_to_keep(mode: str, n_prompt: int, n_post: int, n_response: int, with_response: bool) -> list[int]:
    """Indices into one unpadded sequence (prompt then response) to store."""
    if mode == "last":
        keep = [n_prompt - 1]
    elif mode == "post_instruction":
        keep = list(range(n_prompt - n_post, n_prompt))
    else:
        keep = list(range(n_prompt))
    if with_response:
        keep += list(range(n_prompt, n_prompt + n_response))
    return keep


def forward_and_extract(
    loaded: LoadedModel,
    prompts: Sequence[Prompt],
    encoded: Sequence[EncodedPrompt],
    responses: Sequence[Sequence[int]],
    hooks: Sequence[str],
    inf: InferenceConfig,
    tokens: RefusalTokens,
) -> tuple[list[float], dict[str, np.ndarray], np.ndarray, dict[str, list], int]:
    """One plain forward pass through the ``inference.collector`` (:mod:`refusal_lens.activations.collector`);
    the kept positions of every hook, and the refusal score at the first response position. Returns
    (scores, hook values, token ids, row metadata, tokens)."""
    with_response = inf.store_response_activations and inf.save_activations
    seqs = [e.ids + (list(r) if with_response else []) for e, r in zip(encoded, responses)]
    ids, mask = left_pad(seqs, loaded.tokenizer.pad_token_id)
    width = ids.shape[1]
    rows, cols, meta = [], [], defaultdict(list)
    last_prompt_cols = []
    for b, (p, e, r, seq) in enumerate(zip(prompts, encoded, responses, seqs)):
        offset = width - len(seq)
        last_prompt_cols.append(offset + len(e.ids) - 1)
        if not inf.save_activations:
            continue
        keep = positions_to_keep(inf.positions, len(e.ids), e.n_post_instruction, len(r), with_response)
        rows += [b] * len(keep)
        cols += [offset + k for k in keep]
        meta["prompt_id"] += [p.id] * len(keep)
        meta["position"] += keep
        meta["is_response"] += [k >= len(e.ids) for k in keep]
        meta["category"] += [p.category] * len(keep)
        meta["label"] += [p.label] * len(keep)
    row_t, col_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    stored = tuple(hooks) if rows else ()
    request = CollectRequest(ids, mask, stored, row_t, col_t, torch.tensor(last_prompt_cols),
                             STORAGE_TORCH[inf.storage_dtype])
    out = make_collector(loaded, inf.collector, stored, inf.activation_model).submit(request).wait()
    scores = refusal_score(out.logits, tokens).cpu().tolist()
    values = {h: to_storage(out.values[h], inf.storage_dtype) for h in stored}
    token_ids = ids[row_t, col_t].numpy() if rows else np.zeros(0, dtype=np.int64)
    return scores, values, token_ids, dict(meta), int(mask.sum())


def process_batch(
    loaded: LoadedModel,
    prompts: Sequence[Prompt],
    encoded: Sequence[EncodedPrompt],
    judged: Sequence[Judged],
    splits: dict[str, str],
    hooks: Sequence[str],
    cfg: Config,
    tokens: RefusalTokens,
) -> BatchOutput:
    """Collect the activations and refusal scores of a batch of judged prompts (pass 3)."""
    inf = cfg.inference
    stats = CollectStats(prompts=len(prompts), generated_tokens=sum(len(j.response_ids) for j in judged))
    responses = [j.response_ids for j in judged]
    t0 = time.perf_counter()
    scores, values, token_ids, meta, n_tokens = forward_and_extract(
        loaded, prompts, encoded, responses, hooks, inf, tokens
    )
    stats.forward_s = time.perf_counter() - t0
    stats.forward_tokens = n_tokens
    by_prompt = {p.id: b for b, p in enumerate(prompts)}
    meta["refused"] = [judged[by_prompt[pid]].refused for pid in meta.get("prompt_id", [])]
    meta["refusal_score"] = [scores[by_prompt[pid]] for pid in meta.get("prompt_id", [])]
    prompt_rows = [
        {
            "prompt_id": p.id,
            "prompt": p.prompt,
            "category": p.category,
            "label": p.label,
            "source": p.source,
            "response": j.response,
            "outcome": j.outcome,
            "judge_rule": j.rule,
            "refused": j.refused,
            "split": splits[p.id],
            "refusal_score": score,
            "n_prompt_tokens": len(e.ids),
            "n_response_tokens": len(j.response_ids),
            "truncated": e.truncated,
            "n_opening_tokens": e.n_opening,
            "n_post_instruction_tokens": e.n_post_instruction,
        }
        for p, e, j, score in zip(prompts, encoded, judged, scores)
    ]
    return BatchOutput(prompt_rows, values, token_ids, meta, stats)

