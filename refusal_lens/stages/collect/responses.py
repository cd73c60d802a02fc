"""Pass 1 of collect: greedy responses of every prompt (``inference.max_new_tokens``, on ``loaded.gen_model``),
judged ``refused`` / ``complied`` / ``incoherent`` (:mod:`refusal_lens.core.judge`), committed batch by batch
(:class:`refusal_lens.run.collected.ResponseLog`): a killed run resumes after the last committed batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.judge import judge
from refusal_lens.data.prompts import Prompt
from refusal_lens.run.collected import Judged, ResponseLog

logger = logging.getLogger(__name__)


def initial_batch_size(batch_size: int | str, device: torch.device) -> int:
    """``inference.batch_size``, or for ``auto`` the size to start halving from (64 on CUDA, 8 elsewhere)."""
    if isinstance(batch_size, int):
        return batch_size
    return 64 if device.type == "cuda" else 8


def with_oom_halving(batch_size: int, what: str):
    """Run ``fn(batch_size)`` and halve the batch size on out-of-memory until it fits (or is 1)."""
    def run(fn):
        nonlocal batch_size
        while True:
            try:
                return fn(batch_size), batch_size
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                logger.warning("out of memory (%s): batch size halved to %d", what, batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return run


def judge_batch(intervener: Intervener, indices: Sequence[int], prompts: Sequence[Prompt],
                encoded: Sequence[EncodedPrompt], max_new_tokens: int) -> list[Judged]:
    """Greedy responses of the given prompts, judged."""
    responses = intervener.generate([encoded[i] for i in indices], max_new_tokens)
    texts = intervener.decode(responses)
    out = []
    for i, ids, text in zip(indices, responses, texts):
        j = judge(text)
        out.append(Judged(i, prompts[i].id, list(ids), text, j.outcome, j.rule))
    return out


def respond_all(log: ResponseLog, intervener: Intervener, mine: Sequence[int], prompts: Sequence[Prompt],
                encoded: Sequence[EncodedPrompt], max_new_tokens: int, batch_size: int,
                on_batch: Callable[[int], None]) -> tuple[dict[int, Judged], int]:
    """Every prompt of this rank's block (``mine``) answered and judged, resuming from ``log``; ``on_batch(n)``
    after each committed batch of ``n``. Returns the judged responses by prompt index and the batch size reached."""
    judged = {j.index: j for j in log.read()}
    todo = [i for i in mine if i not in judged]
    if judged:
        logger.info("collect: resuming the responses of rank %d at %d of %d", log.rank, len(mine) - len(todo),
                    len(mine))
    while todo:
        def respond(bs: int):
            intervener.batch_size = intervener.generation_batch_size = bs
            return judge_batch(intervener, todo[:bs], prompts, encoded, max_new_tokens)

        batch, batch_size = with_oom_halving(batch_size, "generation")(respond)
        log.commit(batch)
        for j in batch:
            judged[j.index] = j
        todo = todo[len(batch):]
        on_batch(len(batch))
    return judged, batch_size
