"""The selected direction on the test split, in the reference's layout (Arditi et al. 2024, Table 1).

Greedy generation, judged (:mod:`refusal_lens.core.behaviour`; incoherent counted apart):

* harmful (toxic) test prompts: clean -> directional ablation -> ActAdd(-r) at the chosen layer; over all of
  them and over those the clean model refused (the headline: "refused harmful prompts");
* harmless test prompts: clean -> ActAdd(+r);
* controls: ``direction.random_directions`` random unit directions ablated (on the refused harmful prompts)
  and as many random vectors of ``|r|`` added (on the harmless prompts), each one a rate: a distribution,
  with the empirical p-value of the direction against it; and the **permutation null**
  (``direction.permuted_directions``, :func:`permuted_directions`): the difference in means at the selected site
  of the discovery contrast prompts with their harmful / harmless labels shuffled, each ablated like the
  direction: a random direction drawn from the activations' own geometry, not from the sphere. The first
  ``direction.random_directions_generated`` of each kind are generated (all by default); with
  ``direction.score_controls`` every control is also measured by the refusal score, one forward pass per prompt,
  or for a generated control (and the direction's own conditions) read from its generation's first step
  (``controls_score``: the p of the direction's mean score, calibrated on the generated controls);
* on harmless prompts with their clean responses teacher-forced: the KL of the next-token distribution at
  the first response position and the cross-entropy (nats per token) of the responses, clean vs ablated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.core.stats import bootstrap_mean_ci
from refusal_lens.core.behaviour import Condition, ResponseAudit, Runs, control_summary, scored_controls, summarise
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.direction_edits import ablation_edits, addition_edits
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.refusal import RefusalTokens


def _texts(runs: Runs, plan: Sequence[Condition], audit: ResponseAudit, tokens: RefusalTokens | None = None
           ) -> tuple[list[list[str]], list[list[float]] | None]:
    """Run ``plan`` and return each condition's judged texts (from the audit, in order), and with ``tokens`` its
    per-prompt first-position refusal scores (:meth:`Runs.scored`)."""
    start = len(audit.rows)
    _, scores = runs.scored(plan, tokens)
    out, at = [], start
    for c in plan:
        out.append([r["response"] for r in audit.rows[at : at + len(c.prompts)]])
        at += len(c.prompts)
    return out, scores


def permuted_directions(harmful: torch.Tensor, harmless: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``[n, d]``: mean(A) - mean(B) of the pooled site activations ``harmful`` ``[n_h, d]`` and ``harmless``
    ``[n_ok, d]`` split at random into groups of the same sizes (labels shuffled)."""
    pooled = torch.cat([harmful, harmless]).double()
    n_h = len(harmful)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        order = torch.randperm(len(pooled), generator=gen)
        out.append(pooled[order[:n_h]].mean(0) - pooled[order[n_h:]].mean(0))
    return torch.stack(out).float() if out else torch.zeros(0, pooled.shape[1])


def random_units(d: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=gen)
    return v / v.norm(dim=-1, keepdim=True)


def evaluate_direction(intervener: Intervener, direction: torch.Tensor, layer: int, n_layers: int, *,
                       harmful: Sequence[EncodedPrompt], harmful_ids: Sequence[str], harmful_refused: Sequence[bool],
                       harmless: Sequence[EncodedPrompt], harmless_ids: Sequence[str],
                       harmless_responses: Sequence[Sequence[int]], max_new_tokens: int, n_random: int,
                       n_bootstrap: int, seed: int, audit: ResponseAudit, show_progress: bool = True,
                       random_prompts: int | None = None, permuted: torch.Tensor | None = None,
                       n_generated: int | None = None, score_tokens: RefusalTokens | None = None) -> dict:
    """The test table; see the module docstring. The first ``n_generated`` controls of each kind (None = all) are
    generated; with ``score_tokens`` every control is also measured by the refusal score (``controls_score``)."""
    ablate = ablation_edits(direction, n_layers)
    runs = Runs(intervener, max_new_tokens, audit)
    refused_idx = [i for i, r in enumerate(harmful_refused) if r]
    conditions = [("harmful", "clean", []), ("harmful", "ablated", ablate),
                  ("harmful", "actadd_minus", addition_edits(direction, layer, -1.0)),
                  ("harmless", "clean", []), ("harmless", "actadd_plus", addition_edits(direction, layer, 1.0))]
    sides = {"harmful": (harmful, harmful_ids), "harmless": (harmless, harmless_ids)}
    texts_of: dict[tuple[str, str], list[str]] = {}
    scores_of: dict[tuple[str, str], list[float]] = {}
    plan = [Condition(f"{side}/{name}", *sides[side], edits, {}) for side, name, edits in conditions]
    texts, scores = _texts(runs, plan, audit, score_tokens)
    for k, (side, name, _) in enumerate(conditions):
        texts_of[(side, name)] = texts[k]
        if scores is not None:
            scores_of[(side, name)] = scores[k]
    rows: dict[str, dict] = {}
    for (side, name), texts in texts_of.items():
        rows[f"{side}/{name}"] = summarise(texts)
        if side == "harmful":
            rows[f"harmful_refused/{name}"] = summarise([texts[i] for i in refused_idx])
    out: dict = {"conditions": rows, "n_harmful": len(harmful), "n_harmful_refused": len(refused_idx),
                 "n_harmless": len(harmless), "layer": layer, "max_new_tokens": max_new_tokens}

    out.update(direction_controls(intervener, direction, layer, n_layers, harmful, harmful_ids, refused_idx, harmless,
                                  harmless_ids, texts_of, max_new_tokens, n_random, seed, audit, show_progress,
                                  random_prompts, permuted, n_generated, score_tokens, scores_of))
    out.update(harmless_cost(intervener, harmless, harmless_responses, ablate, n_bootstrap, seed))
    return out


#: the direction's generated control kinds (``<side>/<kind>`` condition names)
CONTROL_KINDS = ("random_ablated", "random_added", "permuted_ablated")


def _by_kind(plan: Sequence[Condition], summaries: Sequence[dict], first: list[list[float]] | None
             ) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """Per control kind, in order: the generated refusal rates, and the first-step refusal scores of each control's
    prompts (empty without scores)."""
    rates: dict[str, list[float]] = {kind: [] for kind in CONTROL_KINDS}
    known: dict[str, list[list[float]]] = {kind: [] for kind in CONTROL_KINDS}
    for i, (c, s) in enumerate(zip(plan, summaries)):
        kind = c.name.split("/")[1]
        rates[kind].append(s["refusal_rate"])
        if first is not None:
            known[kind].append(first[i])
    return rates, known


def direction_controls(intervener: Intervener, direction: torch.Tensor, layer: int, n_layers: int,
                       harmful: Sequence[EncodedPrompt], harmful_ids: Sequence[str], refused_idx: list[int],
                       harmless: Sequence[EncodedPrompt], harmless_ids: Sequence[str],
                       texts_of: dict[tuple[str, str], list[str]], max_new_tokens: int, n_random: int, seed: int,
                       audit: ResponseAudit, show_progress: bool, random_prompts: int | None,
                       permuted: torch.Tensor | None, n_generated: int | None,
                       score_tokens: RefusalTokens | None, scores_of: dict[tuple[str, str], list[float]] | None = None
                       ) -> dict:
    """The direction's controls (module docstring): generated and judged, and by the refusal score; ``texts_of`` holds
    the direction's own responses (for its rates on the controls' prompts), ``scores_of`` their first-position
    refusal scores when they were read from the generation (the score passes of those and of the generated controls
    are then not run again)."""
    out: dict = {}
    # controls: random directions ablated (refused harmful), random vectors of |r| added (harmless), on up to
    # ``random_prompts`` prompts per side; the direction's own rate on the same prompts gives its p-value
    ctrl_h = refused_idx[:random_prompts] if random_prompts else refused_idx
    ctrl_s = list(range(len(harmless)))[:random_prompts] if random_prompts else list(range(len(harmless)))
    units = random_units(direction.numel(), n_random, seed)
    plan = []
    gen = n_random if n_generated is None else min(n_random, n_generated)
    for k in range(gen):
        if ctrl_h:
            plan.append(Condition("harmful_refused/random_ablated", [harmful[i] for i in ctrl_h],
                                  [harmful_ids[i] for i in ctrl_h], ablation_edits(units[k], n_layers), {"control": k}))
        plan.append(Condition("harmless/random_added", [harmless[i] for i in ctrl_s], [harmless_ids[i] for i in ctrl_s],
                              addition_edits(units[k] * direction.norm(), layer, 1.0), {"control": k}))
    gen_permuted = [] if permuted is None or not ctrl_h else permuted if n_generated is None else permuted[:n_generated]
    for k, v in enumerate(gen_permuted):
        plan.append(Condition("harmful_refused/permuted_ablated", [harmful[i] for i in ctrl_h],
                              [harmful_ids[i] for i in ctrl_h], ablation_edits(v, n_layers), {"control": k}))
    with tqdm(total=len(plan), desc="direction random controls", disable=not show_progress or not plan) as bar:
        summaries, first = Runs(intervener, max_new_tokens, audit, bar).scored(plan, score_tokens)
    rates, known = _by_kind(plan, summaries, first)
    ablated_rates, added_rates, permuted_rates = (rates[kind] for kind in CONTROL_KINDS)
    own_ablated = summarise([texts_of[("harmful", "ablated")][i] for i in ctrl_h])["refusal_rate"] if ctrl_h else float("nan")
    own_added = summarise([texts_of[("harmless", "actadd_plus")][i] for i in ctrl_s])["refusal_rate"]
    out["random_ablated"] = control_summary(own_ablated, ablated_rates, "less") | {"n_prompts": len(ctrl_h),
                                                                                   "observed": own_ablated}
    out["random_added"] = control_summary(own_added, added_rates, "greater") | {"n_prompts": len(ctrl_s),
                                                                               "observed": own_added}
    cosines = ([float(torch.nn.functional.cosine_similarity(v, direction.float(), dim=0)) for v in permuted]
               if permuted is not None else [])
    out["permuted_ablated"] = control_summary(own_ablated, permuted_rates, "less") | {
        "n_prompts": len(ctrl_h), "observed": own_ablated, "abs_cosine_with_direction_mean":
            float(np.mean(np.abs(cosines))) if cosines else None}
    if score_tokens is not None:
        scores_of = scores_of or {}
        own = {"random_ablated": ("harmful", "ablated", ctrl_h), "random_added": ("harmless", "actadd_plus", ctrl_s),
               "permuted_ablated": ("harmful", "ablated", ctrl_h)}
        known_own = {kind: [scores_of[(side, name)][i] for i in idx] for kind, (side, name, idx) in own.items()
                     if (side, name) in scores_of}
        out["controls_score"] = score_direction_controls(
            intervener, direction, layer, n_layers, [harmful[i] for i in ctrl_h], [harmless[i] for i in ctrl_s],
            units, permuted, score_tokens, rates, show_progress, known, known_own)
    return out


def score_direction_controls(intervener: Intervener, direction: torch.Tensor, layer: int, n_layers: int,
                             refused: Sequence[EncodedPrompt], harmless: Sequence[EncodedPrompt], units: torch.Tensor,
                             permuted: torch.Tensor | None, tokens: RefusalTokens, generated: dict[str, list[float]],
                             show_progress: bool = True, known: dict[str, list[list[float]]] | None = None,
                             known_own: dict[str, list[float]] | None = None) -> dict:
    """The direction's controls by the refusal score (:func:`refusal_lens.core.behaviour.scored_controls`), on the
    prompts of the generated ones: random directions and permuted differences ablated (the refused harmful
    prompts; p of a lower mean score than r's ablation), random vectors of ``|r|`` added (the harmless prompts;
    p of a higher mean score than ActAdd(+r)); calibrated on the generated controls of each kind. ``known`` /
    ``known_own``: per kind, the per-prompt scores of its first controls and of the direction already read from their
    generations (not computed again)."""
    kinds = {"random_ablated": (refused, ablation_edits(direction, n_layers), [ablation_edits(u, n_layers) for u in units],
                                "less"),
             "random_added": (harmless, addition_edits(direction, layer, 1.0),
                              [addition_edits(u * direction.norm(), layer, 1.0) for u in units], "greater")}
    if permuted is not None:
        kinds["permuted_ablated"] = (refused, ablation_edits(direction, n_layers),
                                     [ablation_edits(v, n_layers) for v in permuted], "less")
    out = {}
    with tqdm(total=sum(len(k[2]) + 1 for k in kinds.values() if k[0]), desc="direction controls by score",
              disable=not show_progress) as bar:
        for name, (prompts, own, edits, alternative) in kinds.items():
            if prompts:
                out[name] = scored_controls(intervener, prompts, tokens, own, edits, generated.get(name, ()), bar,
                                            alternative, (known or {}).get(name, ()), (known_own or {}).get(name))
    return out


def harmless_cost(intervener: Intervener, harmless: Sequence[EncodedPrompt], harmless_responses, ablate,
                  n_bootstrap: int, seed: int) -> dict:
    """KL and CE on harmless prompts (their clean responses teacher-forced), clean vs ablated."""
    out: dict = {}
    conts = [list(r) for r in harmless_responses]
    first_clean, nll_clean, _ = intervener.continuation_logprobs(harmless, conts)
    _, nll_abl, kl = intervener.continuation_logprobs(harmless, conts, ablate, reference=first_clean)
    n_tok = np.asarray([max(len(c), 1) for c in conts], dtype=float)
    rng = np.random.default_rng(seed)
    kl = np.asarray(kl)
    out["kl_harmless"] = {"mean": float(kl.mean()) if len(kl) else None,
                          "ci": list(bootstrap_mean_ci(kl, n_bootstrap, rng=rng)) if len(kl) else None, "n": len(kl)}
    tokens = float(n_tok.sum())
    out["ce_harmless"] = {"clean": float(np.sum(nll_clean) / tokens) if tokens else None,
                          "ablated": float(np.sum(nll_abl) / tokens) if tokens else None, "tokens": int(tokens)}
    return out
