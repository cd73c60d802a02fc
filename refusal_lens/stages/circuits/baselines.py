"""What a node is patched to: its mean per site class over reference prompts (or zero).

For each spliced hook and each site class (content pooled; each post-instruction token; generated tokens),
the mean of every feature and of the error term over the reference prompts' stored activations (the
collect stage keeps every position and the responses): ``circuits.reference`` = ``harmless`` (discovery
harmless prompts the model answered: the state of not refusing, the direction's contrast), or
``safe_complied`` (OR-Bench safe prompts it answered), or ``all`` (every discovery prompt). Only discovery
prompts are used. The means of the refused toxic discovery prompts are kept too: steering to them
(induction) adds the promoting features "at their refused-prompt mean".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from refusal_lens.activations.store import HookActivations
from refusal_lens.stages.circuits.nodes import NOT_A_SITE, NodeSpace, split_nodes
from refusal_lens.run.collected import Collected
from refusal_lens.run.folder import RunFolder


@dataclass
class ClassMeans:
    """Per hook: feature means ``[n_post + 2, d_sae]`` and error means ``[n_post + 2, d_in]`` by site class."""

    features: dict[str, Tensor]
    errors: dict[str, Tensor]
    counts: dict[str, list[int]]  # rows per class (the reference tokens each mean is over)

    def zero(self) -> ClassMeans:
        return ClassMeans({h: torch.zeros_like(v) for h, v in self.features.items()},
                          {h: torch.zeros_like(v) for h, v in self.errors.items()}, self.counts)


def row_classes(acts: HookActivations, data: Collected, n_post: int) -> np.ndarray:
    """Site class of every stored row (content 0, post-instruction ``1 + j``, response ``1 + n_post``)."""
    info = {r["prompt_id"]: (int(r["n_opening_tokens"]), int(r["n_prompt_tokens"]), int(r["n_post_instruction_tokens"]))
            for r in data.rows}
    out = np.full(len(acts), NOT_A_SITE, dtype=np.int64)
    for i, (pid, pos) in enumerate(zip(acts.prompt_ids, acts.positions)):
        n_open, n_prompt, n_p = info[pid]
        if pos >= n_prompt:
            out[i] = 1 + n_post
        elif pos >= n_prompt - n_p:
            out[i] = 1 + (pos - (n_prompt - n_p))
        elif pos >= n_open:
            out[i] = 0
    return out


def reference_prompts(data: Collected, reference: str) -> set[str]:
    """Prompt ids of the discovery split's reference prompts for the mean baseline."""
    rows = [r for r in data.rows if r["split"] == "discovery"]
    if reference == "harmless":
        chosen = [r for r in rows if r["label"] == "harmless" and not r["refused"]]
    elif reference == "safe_complied":
        chosen = [r for r in rows if r["label"] == "safe" and not r["refused"]]
    else:
        chosen = rows
    return {r["prompt_id"] for r in chosen}


@torch.no_grad()
def class_means(space: NodeSpace, run: RunFolder, data: Collected, prompt_ids: set[str],
                chunk: int = 4096) -> ClassMeans:
    """Means of features and errors per site class over the stored activations of ``prompt_ids``."""
    n_cls = space.n_post + 2
    feats, errs, counts = {}, {}, {}
    for h in space.hooks:
        acts = run.hook_activations(h)
        cls = row_classes(acts, data, space.n_post)
        member = np.fromiter((p in prompt_ids for p in acts.prompt_ids), dtype=bool, count=len(acts))
        rows = np.flatnonzero(member & (cls != NOT_A_SITE))
        if len(rows) == 0:
            raise ValueError(f"{h}: no reference tokens for the mean baseline")
        sae = space.saes[h]
        sum_f = torch.zeros(n_cls, space.d_sae(h), dtype=torch.float64)
        sum_e = torch.zeros(n_cls, acts.width, dtype=torch.float64)
        n = torch.zeros(n_cls, dtype=torch.float64)
        for s in range(0, len(rows), chunk):
            part = rows[s : s + chunk]
            f, err = split_nodes(sae, acts.take(part).to(sae.device))
            c = torch.from_numpy(cls[part])
            sum_f.index_add_(0, c, f.double().cpu())
            sum_e.index_add_(0, c, err.double().cpu())
            n.index_add_(0, c, torch.ones(len(part), dtype=torch.float64))
        feats[h] = (sum_f / n.clamp_min(1)[:, None]).float()
        errs[h] = (sum_e / n.clamp_min(1)[:, None]).float()
        counts[h] = n.long().tolist()
    return ClassMeans(feats, errs, counts)


def means_for(space: NodeSpace, run: RunFolder, data: Collected, reference: str, baseline: str) -> ClassMeans:
    ids = reference_prompts(data, reference)
    if not ids:
        raise ValueError(f"circuits.reference={reference!r}: no such prompts in the discovery split")
    means = class_means(space, run, data, ids)
    return means.zero() if baseline == "zero" else means


def refused_means(space: NodeSpace, run: RunFolder, data: Collected) -> ClassMeans | None:
    """Class means over the refused toxic discovery prompts (the targets of induction); None when the model
    refused none of them (e.g. random weights): there is then no refusal to induce or remove."""
    ids = {r["prompt_id"] for r in data.rows if r["split"] == "discovery" and r["label"] == "toxic" and r["refused"]}
    return class_means(space, run, data, ids) if ids else None


def gather_class(values: Tensor, site_cls: Tensor) -> Tensor:
    """``values[class]`` per column: ``[n_classes, d]`` and ``[B, T]`` site classes -> ``[B, T, d]`` (zeros where
    ``site_cls`` is NOT_A_SITE)."""
    idx = site_cls.clamp_min(0)
    out = values.to(site_cls.device)[idx]
    return out * (site_cls != NOT_A_SITE)[..., None]
