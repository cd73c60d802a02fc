"""The nodes of a circuit: every feature of every spliced SAE, and one error node per hook.

A hook's SAE ``sae`` splits its input ``x`` (at one position) into features ``f = encode(x)`` and an error
``err = x - decode(f)``, so ``x = decode(f) + err`` exactly.

**Sites** are the positions where nodes live: every position of the prompt after the chat template's
opening (the opening is identical in every prompt, so its activations carry nothing of the prompt and
patching it changes nothing that depends on the prompt: leaving it clean opens no bypass). Sites fall
in *site classes*: class 0 is the prompt's content (pooled over its positions), class ``1 + j`` is
post-instruction token ``j`` (e.g. ``<|im_end|>`` ... ``assistant\\n``), each its own class because each
has its own statistics; generated tokens form class ``1 + P`` (used during generation only).

A **feature node** is one feature at every site; its effect is measured per site class and summed (the
per-class effects are kept, so that a feature active on every content token does not win by prompt
length alone: see ``per_site`` in :mod:`refusal_lens.stages.circuits.stage`). An **error node** is one hook's
whole error term at every site. Node ids: ``"<hook>/<feature>"`` and ``"<hook>/err"`` (the hook name
identifies the site, as everywhere in refusal_lens). Flat feature indices run hook by hook in
:attr:`NodeSpace.hooks` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.core.chat import CONTENT, GENERATED, POST

ERROR = "err"
NOT_A_SITE = -1


@dataclass(frozen=True)
class NodeSpace:
    """The hooks spliced (in model order), their SAEs, and the flat feature index over them."""

    hooks: tuple[str, ...]
    saes: dict  # hook -> SAE-Lens SAE
    n_post: int  # post-instruction tokens of the chat template

    @property
    def n_classes(self) -> int:
        """Site classes of a prompt: content, then each post-instruction token."""
        return 1 + self.n_post

    @property
    def generated_class(self) -> int:
        return 1 + self.n_post

    def class_names(self) -> list[str]:
        return ["content"] + [f"post{j - self.n_post}" for j in range(self.n_post)]

    def d_sae(self, hook: str) -> int:
        return int(self.saes[hook].cfg.d_sae)

    def offset(self, hook: str) -> int:
        out = 0
        for h in self.hooks:
            if h == hook:
                return out
            out += self.d_sae(h)
        raise KeyError(hook)

    @property
    def n_features(self) -> int:
        return sum(self.d_sae(h) for h in self.hooks)

    def locate(self, index: int) -> tuple[str, int]:
        """Flat feature index -> (hook, feature)."""
        for h in self.hooks:
            if index < self.d_sae(h):
                return h, index
            index -= self.d_sae(h)
        raise IndexError("feature index out of range")

    def feature_id(self, index: int) -> str:
        hook, j = self.locate(index)
        return f"{hook}/{j}"

    def error_id(self, hook: str) -> str:
        return f"{hook}/{ERROR}"

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """``[..., n_features]`` -> hook -> ``[..., d_sae]`` views."""
        out, start = {}, 0
        for h in self.hooks:
            out[h] = flat[..., start : start + self.d_sae(h)]
            start += self.d_sae(h)
        return out

    def by_hook(self, features) -> dict[str, list[int]]:
        """Flat feature indices grouped by hook (local indices)."""
        out: dict[str, list[int]] = {}
        for i in features:
            hook, j = self.locate(int(i))
            out.setdefault(hook, []).append(j)
        return out


def site_classes(classes: Tensor, n_post: int) -> Tensor:
    """Position classes (:mod:`refusal_lens.core.chat`) -> site classes: content 0, post-instruction ``j`` ``1 + j``,
    generated ``1 + n_post``, and :data:`NOT_A_SITE` for the opening and padding."""
    out = torch.full_like(classes, NOT_A_SITE)
    out[classes == CONTENT] = 0
    post = (classes >= POST) & (classes < POST + n_post)
    out[post] = classes[post] - POST + 1
    out[classes == GENERATED] = 1 + n_post
    return out


def split_nodes(sae, x: Tensor) -> tuple[Tensor, Tensor]:
    """``x -> (f, err)`` with ``decode(f) + err == x`` (float32)."""
    xf = x.float()
    f = sae.encode(xf.to(sae.dtype)).float()
    err = xf - sae.decode(f.to(sae.dtype)).float()
    return f, err
