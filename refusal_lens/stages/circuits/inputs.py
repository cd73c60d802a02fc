"""Step 1 of discover, the inputs: the spliced hooks and their SAEs (the node space), the per-class baselines, the
refusal direction, the prompt groups (label x category, and pooled per label) of every split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_lens.config import Config
from refusal_lens.core.hooks import hook_sort_key, resolve_layer_specs
from refusal_lens.errors import UserError
from refusal_lens.run.collected import Collected
from refusal_lens.run.direction_file import SavedDirection
from refusal_lens.run.folder import RunFolder
from refusal_lens.stages.circuits.baselines import ClassMeans, means_for, refused_means
from refusal_lens.stages.circuits.nodes import NodeSpace
from refusal_lens.stages.circuits.select import decoder_cosines


class CircuitError(UserError, RuntimeError):
    """Missing SAEs, activations or direction, a bad circuit setting, or a results folder from another config."""


@dataclass
class Inputs:
    data: Collected
    space: NodeSpace
    means: ClassMeans
    refused: ClassMeans | None  # None: no refused toxic discovery prompt (behaviour is skipped)
    direction: SavedDirection
    cosines: torch.Tensor  # [n_features] decoder cosine with the direction


@dataclass
class Group:
    label: str
    category: str  # a category, or "all"
    rows: dict[str, list[int]]  # split -> rows of the prompts table

    @property
    def key(self) -> str:
        return f"{self.label}/{self.category}"



def circuit_hooks(cfg: Config, run: RunFolder, n_layers: int) -> list[str]:
    """The spliced hooks: ``circuits.hooks`` (each must have an SAE), or every SAE passing the bar."""
    if not run.complete("saes"):
        raise CircuitError(f"the SAEs in {run.paths.saes.dir} are not finished: run `refusal-lens train-saes` with "
                           "this config")
    trained = run.sae_hooks()
    if cfg.circuits.hooks:
        wanted = resolve_layer_specs(list(cfg.circuits.hooks), n_layers, valid_hooks=trained)
        missing = [h for h in wanted if h not in trained]
        if missing:
            raise CircuitError(f"circuits.hooks: no SAE for hook(s) {missing}; SAEs exist for {trained}. "
                               "Add them to sae.hooks and run train-saes.")
        return sorted(wanted, key=hook_sort_key)
    passing = run.sae_hooks(passing=True)
    if not passing:
        raise CircuitError(f"no SAE in {run.paths.saes.dir} passes the quality bar; name hooks in circuits.hooks to "
                           "use them anyway")
    return sorted(passing, key=hook_sort_key)


def load_inputs(cfg: Config, loaded, run: RunFolder, hooks: Sequence[str]) -> Inputs:
    data = run.collected()
    n_post = int(data.manifest.get("post_instruction_tokens") or max(r["n_post_instruction_tokens"] for r in data.rows))
    space = NodeSpace(tuple(hooks), run.saes(hooks, loaded.device), n_post)
    c = cfg.circuits
    try:
        means = means_for(space, run, data, c.reference, c.baseline)
    except ValueError as err:
        raise CircuitError(str(err)) from None
    direction = run.direction()
    return Inputs(data, space, means, refused_means(space, run, data), direction,
                  decoder_cosines(space, direction.vector))


def prompt_groups(data: Collected, cfg: Config) -> tuple[list[Group], list[str]]:
    """Groups (label x category, and label x all) of the configured prompt selection, per split; notes on
    groups left out (no discovery prompts)."""
    c = cfg.circuits
    available = sorted({r["category"] for r in data.rows if r["label"] in c.labels})
    for cat in c.categories:
        if cat not in available:
            raise CircuitError(f"circuits.categories: category {cat!r} has no prompts; categories in the data: {available}")
    cats = list(c.categories) or available

    def chosen(r: dict) -> bool:
        return c.select == "all" or (bool(r["refused"]) if c.select == "refused" else not r["refused"])

    groups, skipped = [], []
    for label in c.labels:
        rows = {s: [i for i in data.split_rows(s, label) if chosen(data.rows[i]) and data.rows[i]["category"] in cats]
                for s in ("discovery", "test")}
        if not rows["discovery"]:
            skipped.append(f"{label}: no discovery prompts with circuits.select={c.select!r}")
            continue
        groups.append(Group(label, "all", rows))
        for cat in cats:
            sub = {s: [i for i in r if data.rows[i]["category"] == cat] for s, r in rows.items()}
            if sub["discovery"]:
                groups.append(Group(label, cat, sub))
            else:
                skipped.append(f"{label}/{cat}: no discovery prompts with circuits.select={c.select!r}")
    if not groups:
        raise CircuitError(f"no discovery prompts of circuits.labels={list(c.labels)} with circuits.select={c.select!r}")
    return groups, skipped

