"""Pass 2 of collect (rank 0, once every response is judged): the split of every prompt, and the refusal score's
token set learned from the discovery responses (:func:`refusal_lens.core.refusal.learn_refusal_tokens`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from refusal_lens.config import Config
from refusal_lens.core.chat import render
from refusal_lens.core.refusal import family_refusal_tokens, learn_refusal_tokens
from refusal_lens.core.splits import assign_splits, split_counts
from refusal_lens.data.prompts import Prompt
from refusal_lens.infra import durable
from refusal_lens.run.collected import Judged, ResponseLog
from refusal_lens.run.folder import ActivationFiles

logger = logging.getLogger(__name__)


def split_and_tokens(files: ActivationFiles, loaded, prompts: Sequence[Prompt], cfg: Config, world: int) -> dict:
    """Pass 2 (rank 0): the split of every prompt and the refusal tokens learned from the discovery responses."""
    judged: list[Judged] = []
    log = ResponseLog(files, 0)
    for r in range(world):
        judged += log.read(r)
    by_index = {j.index: j for j in judged}
    if len(by_index) != len(prompts):
        raise RuntimeError(f"collect: {len(by_index)} judged responses for {len(prompts)} prompts")  # a bug, not input
    rows = [{"prompt_id": p.id, "label": p.label, "category": p.category, "refused": by_index[i].refused}
            for i, p in enumerate(prompts)]
    d = cfg.data
    splits = assign_splits(rows, d.split_fractions, d.split_seed)
    fallback = family_refusal_tokens(loaded.tokenizer, render(loaded.tokenizer, "Hello"), loaded.family.refusal_words)
    if cfg.inference.refusal_tokens == "learned":
        disc = [by_index[i] for i, p in enumerate(prompts) if splits[p.id] == "discovery" and by_index[i].response_ids]
        tokens = learn_refusal_tokens([j.response_ids[0] for j in disc], [j.refused for j in disc], fallback,
                                      loaded.tokenizer, cfg.inference.refusal_token_min_count,
                                      cfg.inference.refusal_token_share)
    else:
        tokens = fallback
    for r in rows:
        r["split"] = splits[r["prompt_id"]]
    info = {"splits": splits, "counts": split_counts(rows), "fractions": list(d.split_fractions), "seed": d.split_seed,
            "stratified_by": ["label", "category", "refused"], "refusal_tokens": tokens.to_dict()}
    durable.write_json(files.split, info, indent=1)
    logger.info("split: %s; refusal tokens (%s): %s", {s: c.get("all", 0) for s, c in info["counts"].items()},
                tokens.source, list(tokens.tokens))
    return info

