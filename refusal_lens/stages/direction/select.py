"""Choosing the refusal direction by what it does (Arditi et al. 2024), on the validation split.

For each candidate ``r`` (layer ``l``, post-instruction position ``p``), three scores on validation prompts:

* **bypass**: the mean refusal score of harmful prompts with ``r_hat`` ablated from every residual write
  (lower = ablating it removes refusal);
* **induce**: the mean refusal score of harmless prompts with ``r`` added at block ``l``'s input (higher =
  adding it induces refusal);
* **KL**: the mean KL(clean || ablated) of harmless prompts' last-position next-token distributions (how
  much ablation disturbs what should not change).

Filters KL <= ``direction.kl_max``, induce > ``direction.induce_min``, ``l < direction.max_layer_fraction * L``;
the lowest bypass wins. When no candidate passes the induce filter it is dropped and the choice says so
(the reference method meets this on some models); likewise for KL.

**Screen.** Measuring the three scores is three interventions per candidate; with every layer x position
that is too slow on a CPU. Every candidate is first *screened* by first-order estimates from one backward
pass per prompt batch: ablating ``r_hat`` moves the score by ``-sum_{writes, positions} (g . r_hat)(x . r_hat)``
(``g`` the gradient of the score at that write), adding ``r`` at block ``l`` by ``sum_positions g_l . r``.
The shortlist measured exactly is the best ``direction.exact_per_layer`` positions of every layer passing the
layer filter (so that every depth is measured: the screen cannot see KL, which rules out many of the
candidates it likes best) plus the best ``direction.exact_candidates`` overall by estimated bypass;
``exact_candidates: null`` measures every candidate. The rank agreement of the screen with the exact bypass
is recorded (``screen_spearman``) so that a reader can judge the shortcut.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.stages.direction.candidates import Candidates
from refusal_lens.core.direction_edits import ablation_edits, addition_edits
from refusal_lens.core.hooks import ablation_hooks, hook_name
from refusal_lens.core.edit import Edit
from refusal_lens.core.intervene import Intervener, frozen
from refusal_lens.core.stem import Stems
from refusal_lens.core.metrics import kl_divergence
from refusal_lens.core.refusal import RefusalTokens, refusal_score
from refusal_lens.core.stats import spearman

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    layer: int
    j: int  # post-instruction index
    position: int  # relative to the prompt's end (-1 = last token)
    bypass_estimate: float
    induce_estimate: float
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    norm: float = 0.0
    degenerate: bool = False  # a zero difference in means: no direction

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Choice:
    layer: int
    j: int
    position: int
    scores: Scored
    filters: dict  # which filters were applied, and notes when one had to be dropped
    screen_spearman: float | None


def scores_of(intervener: Intervener, prompts: Sequence[EncodedPrompt], tokens: RefusalTokens,
              edits: Sequence[Edit] = (), stems: Stems | None = None) -> np.ndarray:
    """Refusal score of each prompt (at its last position) with ``edits`` (``stems``: the caller's clean stems of
    ``prompts``, :mod:`refusal_lens.core.stem`)."""
    return refusal_score(intervener.last_logits(prompts, edits, stems=stems), tokens).numpy()


def _leaves(names: Sequence[str], store: dict) -> list[Edit]:
    def leaf(name: str):
        def fn(x, ctx):  # noqa: ARG001
            z = torch.zeros_like(x, requires_grad=True)
            store[name] = (x.detach(), z)
            return x + z

        return fn

    return [Edit(n, leaf(n)) for n in names]


def linear_screen(intervener: Intervener, cands: Candidates, harmful: Sequence[EncodedPrompt],
                  harmless: Sequence[EncodedPrompt], tokens: RefusalTokens, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """First-order estimates of (bypass, induce) for every candidate: two ``[n_layers, n_post]`` arrays."""
    (bypass,) = bypass_estimates(intervener, [cands], harmful, tokens, n_layers)
    return bypass, induce_estimates(intervener, cands, harmless, tokens, n_layers)


def bypass_estimates(intervener: Intervener, cand_sets: Sequence[Candidates], harmful: Sequence[EncodedPrompt],
                     tokens: RefusalTokens, n_layers: int) -> list[np.ndarray]:
    """First-order estimate of the mean refusal score of ``harmful`` with each candidate ablated, for every
    candidate of every set (one ``[n_layers, n_post]`` array per set). The gradients are the clean model's, so one
    backward pass per batch serves every set."""
    sets = []
    for cands in cand_sets:
        raw = cands.diff.reshape(-1, cands.diff.shape[-1]).float()  # [C, d], C = L x P, layer-major
        sets.append(raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    writes = ablation_hooks(n_layers)
    bypass = [torch.zeros(len(u), dtype=torch.float64) for u in sets]
    with frozen(intervener.model):
        for batch in intervener.batches(harmful, size=intervener.gradient_batch_size):
            store: dict = {}
            with torch.enable_grad():
                score = refusal_score(intervener.last_logits_grad(batch, _leaves(writes, store)), tokens)
                grads = torch.autograd.grad(score.sum(), [store[n][1] for n in writes])
            valid = batch.mask.bool()
            for b in bypass:
                b += float(score.detach().sum())
            for name, g in zip(writes, grads):
                x = store[name][0][valid].float()
                gv = g[valid].float()
                for b, units in zip(bypass, sets):
                    b -= ((gv @ units.T) * (x @ units.T)).sum(0).double()
    return [(b / len(harmful)).numpy().reshape(c.shape) for b, c in zip(bypass, cand_sets)]


def induce_estimates(intervener: Intervener, cands: Candidates, harmless: Sequence[EncodedPrompt],
                     tokens: RefusalTokens, n_layers: int) -> np.ndarray:
    """First-order estimate of the mean refusal score of ``harmless`` with each candidate added at its layer."""
    raw = cands.diff.reshape(-1, cands.diff.shape[-1]).float()
    layer_of = torch.arange(len(raw)) // cands.shape[1]
    induce = torch.zeros(len(raw), dtype=torch.float64)
    pre = [hook_name("resid_pre", layer) for layer in range(n_layers)]
    with frozen(intervener.model):
        for batch in intervener.batches(harmless, size=intervener.gradient_batch_size):
            store: dict = {}
            with torch.enable_grad():
                score = refusal_score(intervener.last_logits_grad(batch, _leaves(pre, store)), tokens)
                grads = torch.autograd.grad(score.sum(), [store[n][1] for n in pre])
            valid = batch.mask.bool()
            induce += float(score.detach().sum())
            g_sum = torch.stack([g[valid].float().sum(0) for g in grads])  # [L, d]
            induce += (g_sum[layer_of] * raw).sum(-1).double()
    return (induce / len(harmless)).numpy().reshape(cands.shape)


def exact_scores(intervener: Intervener, cands: Candidates, chosen: Sequence[Scored], harmful: Sequence[EncodedPrompt],
                 harmless: Sequence[EncodedPrompt], tokens: RefusalTokens, n_layers: int,
                 show_progress: bool = True) -> None:
    """Fill in the exact bypass, induce and KL of ``chosen`` (in place)."""
    clean = intervener.last_logits(harmless).log_softmax(-1)
    stems = Stems()  # the additions act at the candidate's layer: each runs from the clean stem entering it
    for s in tqdm(chosen, desc="direction candidates (exact)", disable=not show_progress):
        ablate = ablation_edits(cands.vector(s.layer, s.j), n_layers)
        s.bypass = float(scores_of(intervener, harmful, tokens, ablate).mean())
        ablated = intervener.last_logits(harmless, ablate).log_softmax(-1)
        s.kl = float(kl_divergence(clean, ablated).mean())
        s.induce = float(scores_of(intervener, harmless, tokens, addition_edits(cands.vector(s.layer, s.j), s.layer),
                                   stems).mean())


def shortlist(scored: Sequence[Scored], n_layers: int, max_layer_fraction: float, n: int | None,
              per_layer: int = 0) -> list[Scored]:
    """The candidates to measure exactly (layers passing the layer filter only): the ``per_layer`` lowest estimated
    bypass of each layer and the ``n`` lowest overall (``n`` None = all), in order of estimated bypass. Degenerate
    candidates (a zero difference: e.g. block 0's input at a template token, identical in every prompt) are left
    out."""
    ok = sorted((s for s in scored if s.layer < max_layer_fraction * n_layers and not s.degenerate),
                key=lambda s: (s.bypass_estimate, s.layer, s.j))
    if n is None:
        return ok
    chosen = {id(s): s for s in ok[:n]}
    for layer in sorted({s.layer for s in ok}):
        for s in [s for s in ok if s.layer == layer][:per_layer]:
            chosen[id(s)] = s
    return sorted(chosen.values(), key=lambda s: (s.bypass_estimate, s.layer, s.j))


def by_bypass(s: Scored) -> tuple:
    """The order of the choice: the lowest measured bypass first, ties by layer then position."""
    return (s.bypass, s.layer, s.j)


def choose(scored: Sequence[Scored], n_layers: int, kl_max: float, induce_min: float,
           max_layer_fraction: float) -> tuple[Scored, dict]:
    """Filters, then the lowest bypass; drops the induce filter (then the KL filter) when nothing passes."""
    measured = [s for s in scored if s.bypass is not None and s.layer < max_layer_fraction * n_layers]
    if not measured:
        raise ValueError("no candidate was measured below the layer filter")
    filters = {"kl_max": kl_max, "induce_min": induce_min, "max_layer": max_layer_fraction * n_layers, "notes": []}
    kl_ok = [s for s in measured if s.kl <= kl_max]
    induce_ok = [s for s in measured if s.induce > induce_min]
    passing = [s for s in kl_ok if s.induce > induce_min]
    if not passing and kl_ok:
        filters["notes"].append(f"no measured candidate with KL <= {kl_max} has induce > {induce_min}: the induce "
                                "filter was dropped")
        filters["induce_min"] = None
        passing = kl_ok
    elif not passing and induce_ok:
        filters["notes"].append(f"no measured candidate has KL <= {kl_max}: the KL filter was dropped")
        filters["kl_max"] = None
        passing = induce_ok
    elif not passing:
        filters["notes"].append(f"no measured candidate has KL <= {kl_max} or induce > {induce_min}: both filters "
                                "were dropped")
        filters["kl_max"] = filters["induce_min"] = None
        passing = measured
    filters["n_passing"] = len(passing)
    filters["n_measured"] = len(measured)
    return min(passing, key=by_bypass), filters


def select_direction(intervener: Intervener, cands: Candidates, harmful: Sequence[EncodedPrompt],
                     harmless: Sequence[EncodedPrompt], tokens: RefusalTokens, n_layers: int, *, exact_candidates: int | None,
                     kl_max: float, induce_min: float, max_layer_fraction: float, exact_per_layer: int = 0,
                     show_progress: bool = True) -> tuple[Choice, list[Scored]]:
    """Screen every candidate, measure the shortlist exactly, choose (see the module docstring)."""
    est_bypass, est_induce = linear_screen(intervener, cands, harmful, harmless, tokens, n_layers)
    norms = cands.diff.norm(dim=-1)
    tiny = 1e-6 * float(norms.max())
    scored = [Scored(layer, j, cands.position(j), float(est_bypass[layer, j]), float(est_induce[layer, j]),
                     norm=float(norms[layer, j]), degenerate=bool(norms[layer, j] <= tiny))
              for layer, j in cands.flat()]
    short = shortlist(scored, n_layers, max_layer_fraction, exact_candidates, exact_per_layer)
    exact_scores(intervener, cands, short, harmful, harmless, tokens, n_layers, show_progress)
    best, filters = choose(scored, n_layers, kl_max, induce_min, max_layer_fraction)
    rho = spearman([s.bypass_estimate for s in short], [s.bypass for s in short])
    logger.info("direction: layer %d, position %d (bypass %.3f, induce %.3f, KL %.4f; screen Spearman %s)",
                best.layer, best.position, best.bypass, best.induce, best.kl, rho)
    return Choice(best.layer, best.j, best.position, best, filters, rho), scored
