"""What the circuit does to behaviour, on test prompts: refusal against K, random controls, the direction.

On the **refused toxic test prompts** (the clean model refused them when the responses were collected),
greedy generation (``loaded.gen_model``, judged; incoherent responses counted apart) under:

* ``clean`` (regenerated in the same batches) and ``direction`` (the selected refusal direction ablated
  from every residual write, every position; :mod:`refusal_lens.core.direction_edits`);
* the top-K **refusal-promoting** features of each selection method (:mod:`.select`) ablated, for every K
  of ``circuits.behaviour_k``, with the intervention chosen on validation (below); the headline method at
  the headline K (``circuits.headline_k``) also with every other candidate intervention
  (:func:`refusal_lens.stages.circuits.edits.feature_edit`: ``zero`` / ``mean`` / ``scale(c)`` x ``all`` /
  ``after_opening``);
* ``circuits.random_sets`` matched random feature sets at the headline K: as many features per hook as the
  headline circuit, drawn without replacement from the features active on these prompts (outside the
  circuit), with the chosen intervention; each set is one refusal rate, the distribution gives the circuit's
  empirical p-value.

**The headline is chosen on validation** (:func:`choose_on_validation`): every method (``headline_method:
auto``) x candidate intervention at the headline K on the refused toxic *validation* prompts; the fewest
refusals among the candidates answered coherently in >= 80% wins. The test split then only measures it.

``fraction_of_direction = (clean - circuit) / (clean - direction)`` (refusal rates) is the share of the
direction's effect the circuit reaches. **Induction**, on the harmless test prompts: the promoting features
set to their refused-prompt means (:func:`~refusal_lens.stages.circuits.edits.steer_edit`) against the clean
harmless rate, the direction's ActAdd(+r) and as many matched random sets (``circuits.induction_random_sets``).

What is ablated where, exactly (so that the numbers can be re-run elsewhere): at each spliced hook (the
TransformerLens hook names of ``space.json``), the SAE of ``saes/<hook>/`` encodes the hook's activation; the
listed features, where active, are changed as the intervention says; ``decode(f') - decode(f)`` is added to
the activation (the SAE's error term is kept); at every position of the mode, generated tokens included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.core.behaviour import Condition, ResponseAudit, Runs, control_summary, fraction_of
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.stages.circuits.baselines import ClassMeans
from refusal_lens.stages.circuits.edits import feature_edit, feature_masks, steer_edit
from refusal_lens.stages.circuits.nodes import NodeSpace, split_nodes
from refusal_lens.stages.circuits.select import Ranking
from refusal_lens.core.direction_edits import ablation_edits, addition_edits
from refusal_lens.core.intervene import Edit, Intervener
from refusal_lens.run.folder import CircuitFiles


curve_condition = CircuitFiles.curve_condition


def ablate(space: NodeSpace, features: Sequence[int], mode: str, means: ClassMeans, scale_c: float,
           positions: str) -> list[Edit]:
    return [feature_edit(space, h, m, mode, means, scale_c, positions)
            for h, m in feature_masks(space, features).items() if bool(m.any())]


def steer(space: NodeSpace, features: Sequence[int], targets: ClassMeans) -> list[Edit]:
    return [steer_edit(space, h, m, targets) for h, m in feature_masks(space, features).items() if bool(m.any())]


@torch.no_grad()
def active_features(intervener: Intervener, space: NodeSpace, prompts: Sequence[EncodedPrompt]) -> dict[str, np.ndarray]:
    """Per hook, the features active somewhere after the opening of these prompts (random sets come from them)."""
    from refusal_lens.core.chat import OPENING, PAD

    fired = {h: torch.zeros(space.d_sae(h), dtype=torch.bool) for h in space.hooks}

    def grab(h):
        def fn(x, ctx):
            f, _ = split_nodes(space.saes[h], x)
            where = (ctx.classes != PAD) & (ctx.classes != OPENING)
            fired[h] |= ((f > 0) & where[..., None]).flatten(0, 1).any(0).cpu()
            return x

        return fn

    intervener.last_logits(prompts, [Edit(h, grab(h), opening=False) for h in space.hooks])
    return {h: torch.argwhere(v).flatten().numpy() for h, v in fired.items()}


def matched_random(space: NodeSpace, features: Sequence[int], active: dict[str, np.ndarray],
                   rng: np.random.Generator) -> list[int]:
    """As many features per hook as ``features``, drawn from each hook's active features outside them."""
    chosen = set(int(i) for i in features)
    out = []
    for hook, local in space.by_hook(features).items():
        off = space.offset(hook)
        pool = np.asarray([j for j in active[hook] if off + int(j) not in chosen])
        if len(pool) < len(local):
            pool = np.asarray([j for j in range(space.d_sae(hook)) if off + j not in chosen])
        out += [off + int(j) for j in rng.choice(pool, size=len(local), replace=False)]
    return out


@dataclass(frozen=True)
class Intervention:
    mode: str  # zero | mean | scale
    c: float
    positions: str  # all | after_opening

    @property
    def label(self) -> str:
        name = f"scale(c={self.c:g})" if self.mode == "scale" else self.mode
        return f"{name}/{self.positions}"


def intervention_candidates(modes: Sequence[str], scale_c: Sequence[float], positions: Sequence[str]) -> list[Intervention]:
    out = []
    for p in positions:
        for m in modes:
            out += [Intervention("scale", c, p) for c in scale_c] if m == "scale" else [Intervention(m, 1.0, p)]
    return out


def choose_on_validation(runs: Runs, space: NodeSpace, rankings: dict[str, Ranking], means: ClassMeans,
                         prompts: Sequence[EncodedPrompt], ids: Sequence[str], k: int, methods: Sequence[str],
                         candidates: Sequence[Intervention], min_coherent: float = 0.8) -> dict:
    """Every method x intervention at K = ``k`` on the validation prompts; the choice: the fewest refusals among
    those answered coherently in at least ``min_coherent`` (ties: the config's order)."""
    grid = [(m, iv) for m in methods for iv in candidates]
    summaries = runs([Condition(f"validation/{curve_condition(m, iv.label, k)}", prompts, ids,
                                ablate(space, rankings[m].top(k), iv.mode, means, iv.c, iv.positions),
                                {"split": "validation"}) for m, iv in grid])
    rows = [{"method": m, "intervention": iv.label, "mode": iv.mode, "c": iv.c, "positions": iv.positions, **s}
            for (m, iv), s in zip(grid, summaries)]
    coherent = [r for r in rows if r["coherent_rate"] >= min_coherent]
    best = min(coherent or rows, key=lambda r: (r["refusal_rate"], rows.index(r)))
    return {"k": k, "n_prompts": len(prompts), "rows": rows, "chosen": {q: best[q] for q in
            ("method", "intervention", "mode", "c", "positions")},
            "note": None if coherent else f"no candidate was coherent in >= {min_coherent:.0%} of validation answers"}


def behaviour(intervener: Intervener, space: NodeSpace, rankings: dict[str, Ranking], means: ClassMeans,
              refused_means: ClassMeans, direction: torch.Tensor, direction_layer: int, n_layers: int, *,
              prompts: Sequence[EncodedPrompt], ids: Sequence[str], val_prompts: Sequence[EncodedPrompt],
              val_ids: Sequence[str], harmless: Sequence[EncodedPrompt], harmless_ids: Sequence[str],
              ks: Sequence[int], headline_k: int, headline_method: str, interventions: Sequence[str],
              positions: Sequence[str], scale_c: Sequence[float], random_sets: int, induction_random_sets: int,
              max_new_tokens: int, seed: int, audit: ResponseAudit, show_progress: bool = True) -> dict:
    """The behaviour record of the circuits (see the module docstring)."""
    rng = np.random.default_rng(seed)
    candidates = intervention_candidates(interventions, scale_c, positions)
    methods = list(rankings) if headline_method == "auto" else [headline_method]
    total = (len(methods) * len(candidates) + 2 + len(rankings) * len(ks) + len(candidates) - 1 + random_sets + 2
             + len(rankings) + induction_random_sets)
    bar = tqdm(total=total, desc="circuit behaviour (generation)", disable=not show_progress)
    runs = Runs(intervener, max_new_tokens, audit, bar)
    selection = choose_on_validation(runs, space, rankings, means, val_prompts, val_ids, headline_k, methods, candidates)
    chosen = next(iv for iv in candidates if iv.label == selection["chosen"]["intervention"])
    method = selection["chosen"]["method"]

    # test: clean, the direction, the K-curve of every method, the headline's other interventions
    plan = [Condition("clean", prompts, ids, [], {}),
            Condition("direction_ablated", prompts, ids, ablation_edits(direction, n_layers), {})]
    curve_keys = []
    for m, ranking in rankings.items():
        for k in ks:
            variants = [chosen] + ([iv for iv in candidates if iv != chosen] if (k, m) == (headline_k, method) else [])
            for iv in variants:
                feats = ranking.top(k)
                plan.append(Condition(curve_condition(m, iv.label, k), prompts, ids,
                                      ablate(space, feats, iv.mode, means, iv.c, iv.positions),
                                      {"method": m, "k": k, "intervention": iv.label}))
                curve_keys.append((m, k, iv, feats))
    headline_feats = rankings[method].top(headline_k)
    active = active_features(intervener, space, prompts)
    for r in range(random_sets):
        feats = matched_random(space, headline_feats, active, rng)
        plan.append(Condition("random", prompts, ids, ablate(space, feats, chosen.mode, means, chosen.c, chosen.positions),
                              {"control": r}))
    # induction on harmless prompts
    plan += [Condition("induction/clean", harmless, harmless_ids, [], {}),
             Condition("induction/direction_actadd", harmless, harmless_ids,
                       addition_edits(direction, direction_layer, 1.0), {})]
    for m, ranking in rankings.items():
        plan.append(Condition(f"induction/{m}/k{headline_k}", harmless, harmless_ids,
                              steer(space, ranking.top(headline_k), refused_means), {"method": m, "k": headline_k}))
    everything = {h: np.arange(space.d_sae(h)) for h in space.hooks}
    for r in range(induction_random_sets):
        feats = matched_random(space, headline_feats, everything, rng)
        plan.append(Condition("induction/random", harmless, harmless_ids, steer(space, feats, refused_means),
                              {"control": r}))
    results = runs(plan)
    bar.close()
    return summarise(results, space, rankings, curve_keys, chosen, method, selection, headline_k, random_sets,
                     n_prompts=len(prompts), n_harmless=len(harmless), max_new_tokens=max_new_tokens)


def summarise(results: list[dict], space: NodeSpace, rankings: dict[str, Ranking], curve_keys: list, chosen,
              method: str, selection: dict, headline_k: int, random_sets: int, *, n_prompts: int, n_harmless: int,
              max_new_tokens: int) -> dict:
    """The behaviour record from the conditions' summaries, in the plan's order: clean, direction, the curve,
    the random sets, then induction (clean, the direction's addition, each method, the random sets)."""
    clean, direct = results[0], results[1]
    c_rate, d_rate = clean["refusal_rate"], direct["refusal_rate"]
    n_curve = len(curve_keys)
    curve = [{"method": m, "k": k, "n_features": len(feats), "intervention": iv.label, "positions": iv.positions, **s,
              "fraction_of_direction": fraction_of(c_rate, s["refusal_rate"], d_rate),
              "features": [space.feature_id(i) for i in feats]}
             for (m, k, iv, feats), s in zip(curve_keys, results[2 : 2 + n_curve])]
    rand_sets = [{**s, "fraction_of_direction": fraction_of(c_rate, s["refusal_rate"], d_rate)}
                 for s in results[2 + n_curve : 2 + n_curve + random_sets]]
    rest = results[2 + n_curve + random_sets :]
    h_clean, h_direction = rest[0], rest[1]
    induction = [{"method": m, "k": headline_k, **s} for m, s in zip(rankings, rest[2 : 2 + len(rankings)])]
    h_rand = [s["refusal_rate"] for s in rest[2 + len(rankings) :]]
    head = next(c for c in curve if (c["method"], c["k"], c["intervention"]) == (method, headline_k, chosen.label))
    controls = control_summary(head["refusal_rate"], [s["refusal_rate"] for s in rand_sets], "less")
    rand_fractions = [s["fraction_of_direction"] for s in rand_sets if s["fraction_of_direction"] is not None]
    head_induced = next(i for i in induction if i["method"] == method)

    def smallest_k(m: str, target: float = 0.9) -> int | None:
        pts = sorted((c["k"], c["fraction_of_direction"]) for c in curve
                     if c["method"] == m and c["intervention"] == chosen.label)
        return next((k for k, f in pts if f is not None and f >= target), None)

    return {
        "n_prompts": n_prompts, "n_harmless": n_harmless, "max_new_tokens": max_new_tokens,
        "selection": selection, "clean": clean, "direction": direct, "curve": curve,
        "random": {"k": headline_k, "matched_to": method, "intervention": chosen.label, "controls": controls,
                   "sets": rand_sets,
                   "fraction_of_direction_mean": float(np.mean(rand_fractions)) if rand_fractions else None,
                   "fraction_of_direction_q95": float(np.quantile(rand_fractions, 0.95)) if rand_fractions else None},
        "headline": {"method": method, "k": headline_k, "intervention": chosen.label, "positions": chosen.positions,
                     "refusal_rate": head["refusal_rate"], "ci": head["ci"], "n": head["n"],
                     "incoherent_rate": head["incoherent_rate"], "coherent_rate": head["coherent_rate"],
                     "fraction_of_direction": head["fraction_of_direction"], "random_p_value": controls["p_value"],
                     "random_mean": controls["mean"], "features": head["features"],
                     "chosen_on": "validation", "smallest_k_reaching_90": {m: smallest_k(m) for m in rankings}},
        "induction": {"clean": h_clean, "direction_actadd": h_direction, "curve": induction,
                      "random": control_summary(head_induced["refusal_rate"], h_rand, "greater")},
    }
