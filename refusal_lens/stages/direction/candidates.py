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


class SiteCache:
    """Every post-instruction block input of each prompt list one model pass ran, for the parts of a stage that
    read the same sites again (the permutation null, the per-category harmless side, the over-refusal and
    false-refusal vectors all read discovery lists the candidates or an earlier part already ran).

    One pass per distinct list (the same prompts in the same order, so the same batches: the numbers are those a
    fresh pass gives, bit for bit; a test checks it): the float64 sums of :func:`capture_post_instruction`, exactly
    as :func:`post_instruction_means` accumulates them, and each prompt's float32 block inputs ``[n, L, P, d]``
    (430 KB a prompt for the embedded Qwen). Bound to one :class:`Intervener` and no edits; held by the stage, in
    memory only (a resumed stage computes again, to the same numbers)."""

    def __init__(self, intervener: Intervener, n_layers: int, d_model: int):
        self.intervener, self.n_layers, self.d_model = intervener, n_layers, d_model
        self._lists: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def passes(self) -> int:
        """Model passes run: one per distinct list (every other read is from memory)."""
        return len(self._lists)

    def usable(self, intervener: Intervener, prompts: Sequence[EncodedPrompt]) -> bool:
        return (intervener is self.intervener and bool(prompts)
                and len({p.n_post_instruction for p in prompts}) == 1)

    def sites(self, prompts: Sequence[EncodedPrompt]) -> tuple[Tensor, Tensor]:
        """``(sums [L, P, d] float64, block inputs [n, L, P, d] float32)`` of ``prompts``."""
        key = tuple(tuple(p.ids) for p in prompts)
        if key not in self._lists:
            n_post = prompts[0].n_post_instruction
            sums = torch.zeros(self.n_layers, n_post, self.d_model, dtype=torch.float64)
            rows = torch.zeros(len(prompts), self.n_layers, n_post, self.d_model, dtype=torch.float32)
            edits = capture_post_instruction(range(self.n_layers), n_post, sums)
            edits += [Edit(hook_name("resid_pre", layer), _capture_rows(rows, layer, n_post), opening=False)
                      for layer in range(self.n_layers)]
            self.intervener.last_logits(prompts, edits)
            self._lists[key] = (sums, rows)
        return self._lists[key]


def _capture_rows(rows: Tensor, layer: int, n_post: int):
    def fn(x: Tensor, ctx) -> Tensor:
        if x.shape[1] != ctx.classes.shape[1]:
            return x
        for b, row in enumerate(ctx.rows):
            for j in range(n_post):
                at = ctx.classes[b] == POST + j
                if at.any():
                    rows[row, layer, j] = x[b][at][0].float().cpu()
        return x

    return fn


def post_instruction_means(intervener: Intervener, prompts: Sequence[EncodedPrompt], n_layers: int,
                           n_post: int, d_model: int, sites: SiteCache | None = None) -> Tensor:
    """``[n_layers, n_post, d_model]`` float64 mean block inputs at the post-instruction tokens of ``prompts``
    (read from ``sites`` when it holds them, or run there to be kept)."""
    short = [p for p in prompts if p.n_post_instruction != n_post]
    if short:
        raise ValueError(f"{len(short)} prompts have {short[0].n_post_instruction} post-instruction tokens, not "
                         f"{n_post}: the chat template differs between prompts")
    if sites is not None and sites.usable(intervener, prompts) and sites.n_layers == n_layers:
        return sites.sites(prompts)[0] / len(prompts)
    sums = torch.zeros(n_layers, n_post, d_model, dtype=torch.float64)
    intervener.last_logits(prompts, capture_post_instruction(range(n_layers), n_post, sums))
    return sums / max(len(prompts), 1)


def difference_in_means(intervener: Intervener, harmful: Sequence[EncodedPrompt], harmless: Sequence[EncodedPrompt],
                        n_layers: int, d_model: int, sites: SiteCache | None = None) -> Candidates:
    if not harmful or not harmless:
        raise ValueError(f"the contrast needs harmful and harmless prompts (got {len(harmful)} and {len(harmless)})")
    n_post = harmful[0].n_post_instruction
    mean_h = post_instruction_means(intervener, harmful, n_layers, n_post, d_model, sites)
    mean_s = post_instruction_means(intervener, harmless, n_layers, n_post, d_model, sites)
    return Candidates(mean_h - mean_s, mean_h, mean_s, len(harmful), len(harmless))


def site_activations(intervener: Intervener, prompts: Sequence[EncodedPrompt], layer: int, j: int,
                     sites: SiteCache | None = None) -> torch.Tensor:
    """``[n, d]`` float64 block input of ``layer`` at post-instruction token ``j`` of each prompt (read from
    ``sites`` when it holds them, or run there to be kept)."""
    if sites is not None and sites.usable(intervener, prompts):
        return sites.sites(prompts)[1][:, layer, j].double()
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
