"""Candidate refusal directions: difference in means of each block input at each post-instruction position.

For layer ``l`` and post-instruction token ``j`` (position ``j - P`` relative to the prompt's end, ``P`` the
template's post-instruction tokens), ``r[l, j] = mean(harmful) - mean(harmless)`` of ``resid_pre`` of block
``l`` at that token, averaged in float64 over the contrast prompts of the discovery split (Arditi et al.
2024). The positions come from the chat template (:class:`refusal_lens.core.chat.EncodedPrompt`), not from a
count written by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.core.chat import POST, EncodedPrompt
from refusal_lens.core.direction_edits import capture_post_instruction
from refusal_lens.core.hooks import hook_name
from refusal_lens.core.edit import Edit
from refusal_lens.core.intervene import Intervener


@dataclass
class Candidates:
    """Every (layer, position) candidate: raw mean differences ``[L, P, d]`` and the two means."""

    diff: Tensor  # float64 [n_layers, n_post, d_model]
    harmful_mean: Tensor
    harmless_mean: Tensor
    n_harmful: int
    n_harmless: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.diff.shape[0]), int(self.diff.shape[1])

    def position(self, j: int) -> int:
        """Position of post-instruction index ``j`` relative to the prompt's end (-1 = the last token)."""
        return j - self.shape[1]

    def vector(self, layer: int, j: int) -> Tensor:
        return self.diff[layer, j].float()

    def flat(self) -> list[tuple[int, int]]:
        n_layers, n_post = self.shape
        return [(layer, j) for layer in range(n_layers) for j in range(n_post)]


def post_instruction_means(intervener: Intervener, prompts: Sequence[EncodedPrompt], n_layers: int,
                           n_post: int, d_model: int) -> Tensor:
    """``[n_layers, n_post, d_model]`` float64 mean block inputs at the post-instruction tokens of ``prompts``."""
    short = [p for p in prompts if p.n_post_instruction != n_post]
    if short:
        raise ValueError(f"{len(short)} prompts have {short[0].n_post_instruction} post-instruction tokens, not "
                         f"{n_post}: the chat template differs between prompts")
    sums = torch.zeros(n_layers, n_post, d_model, dtype=torch.float64)
    intervener.last_logits(prompts, capture_post_instruction(range(n_layers), n_post, sums))
    return sums / max(len(prompts), 1)


def difference_in_means(intervener: Intervener, harmful: Sequence[EncodedPrompt], harmless: Sequence[EncodedPrompt],
                        n_layers: int, d_model: int) -> Candidates:
    if not harmful or not harmless:
        raise ValueError(f"the contrast needs harmful and harmless prompts (got {len(harmful)} and {len(harmless)})")
    n_post = harmful[0].n_post_instruction
    mean_h = post_instruction_means(intervener, harmful, n_layers, n_post, d_model)
    mean_s = post_instruction_means(intervener, harmless, n_layers, n_post, d_model)
    return Candidates(mean_h - mean_s, mean_h, mean_s, len(harmful), len(harmless))


def site_activations(intervener: Intervener, prompts: Sequence[EncodedPrompt], layer: int, j: int) -> torch.Tensor:
    """``[n, d]`` float64 block input of ``layer`` at post-instruction token ``j`` of each prompt."""
    store: dict[int, torch.Tensor] = {}

    def fn(x, ctx):
        at = ctx.classes == POST + j
        for b, row in enumerate(ctx.rows):
            if at[b].any():
                store[row] = x[b][at[b]][0].double().cpu()
        return x

    intervener.last_logits(prompts, [Edit(hook_name("resid_pre", layer), fn, opening=False)])
    d = intervener.model.config.hidden_size
    return torch.stack([store[i] for i in range(len(prompts))]) if prompts else torch.zeros(0, d, dtype=torch.float64)


def save_candidates(cands: Candidates, path) -> None:
    """Every candidate, as ``candidates.safetensors`` (so that a killed stage does not fit them again)."""
    from refusal_lens.infra import durable

    durable.save_safetensors({"diff": cands.diff.contiguous(), "harmful_mean": cands.harmful_mean.contiguous(),
                              "harmless_mean": cands.harmless_mean.contiguous(),
                              "n": torch.tensor([cands.n_harmful, cands.n_harmless])}, path)


def load_candidates(path) -> Candidates:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return Candidates(t["diff"], t["harmful_mean"], t["harmless_mean"], int(t["n"][0]), int(t["n"][1]))
