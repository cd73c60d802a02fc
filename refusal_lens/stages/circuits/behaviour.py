"""What the circuit does to behaviour, on test prompts: refusal against K, matched controls, the direction.

On the **refused toxic test prompts** (the clean model refused them when the responses were collected),
greedy generation (``loaded.gen_model``, judged; incoherent responses counted apart) under:

* ``clean`` (regenerated in the same batches) and ``direction_ablated`` (the selected refusal direction
  projected out of every residual write, every position; :mod:`refusal_lens.core.direction_edits`);
* the top-K **refusal-promoting** features of each selection method (:mod:`.select`) **ablated**, for every K of
  ``circuits.behaviour_k``, with the ablation chosen on validation (below); at the headline K, for the headline
  method, also every other ablation candidate and, in rows of their own named **steering**, ``scale(c)``
  (``f <- -c f``: the feature's contribution subtracted ``1 + c`` times) beside the direction's own steering
  equivalent ``direction_steered(c)``: ``x <- x - (1 + c)(x . r_hat) r_hat`` at every residual write;
* the headline circuit's ablation with its component along the refusal direction removed from the edit
  (``headline_without_direction``: what the features carry *beyond* r), and the share of the edit's norm that
  lies along r (:mod:`.alignment`), for the circuit and for each control;
* ``circuits.random_sets`` random feature sets matched to the headline circuit (:mod:`.controls`: per hook, on
  firing frequency and edit size; for ``combined``, from its pre-selected pool), ablated the same way; each set
  is one refusal rate, the distribution gives the circuit's empirical p-value; the first
  ``circuits.random_sets_generated`` are generated (all by default) and, with ``circuits.score_controls``, every set
  is also measured by the refusal score (``random.controls_score``, calibrated on the generated ones:
  :func:`refusal_lens.core.behaviour.scored_controls`): the generated sets' and the headline's scores are read from
  their generations' first step, the other sets get one forward pass per prompt. The alignment of the headline,
  its steering rows and the generated sets is tallied while they are generated.

**The headline is an ablation chosen on validation** (:func:`choose_on_validation`): every method
(``headline_method: auto``) x ablation candidate (``zero`` / ``mean`` x positions) at the headline K on the refused
toxic *validation* prompts; the most **complied** answers win (an incoherent answer counts against a candidate as a
refusal does). Steering is never the headline. The test split then only measures it.

``fraction_of_direction = (clean - circuit) / (clean - direction)`` (refusal rates) is the share of the
direction's effect the circuit reaches. **Induction**, on the harmless test prompts: the promoting features
set to their refused-prompt means (:func:`~refusal_lens.stages.circuits.edits.steer_edit`: steering, by
construction) against the clean harmless rate, the direction's ActAdd(+r) and matched random sets
(``circuits.induction_random_sets``).

What is changed where, exactly (so that the numbers can be re-run elsewhere): at each spliced hook (the
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

from refusal_lens.core.behaviour import Condition, ResponseAudit, Runs, control_summary, fraction_of, scored_controls
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.direction_edits import ablation_edits, addition_edits
from refusal_lens.core.edit import Edit
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.refusal import RefusalTokens
from refusal_lens.run.folder import CircuitFiles
from refusal_lens.stages.circuits.alignment import alignment_of, tallied_edits
from refusal_lens.stages.circuits.baselines import ClassMeans
from refusal_lens.stages.circuits.controls import feature_stats, matched_random
from refusal_lens.stages.circuits.edits import feature_edit, feature_masks, steer_edit
from refusal_lens.stages.circuits.nodes import NodeSpace
from refusal_lens.stages.circuits.select import Ranking

curve_condition = CircuitFiles.curve_condition
#: feature interventions that remove a feature (ablations); ``scale`` is steering
ABLATIONS = ("zero", "mean")


def ablate(space: NodeSpace, features: Sequence[int], mode: str, means: ClassMeans, scale_c: float,
           positions: str, remove_along: torch.Tensor | None = None) -> list[Edit]:
    return [feature_edit(space, h, m, mode, means, scale_c, positions, remove_along=remove_along)
            for h, m in feature_masks(space, features).items() if bool(m.any())]


def steer(space: NodeSpace, features: Sequence[int], targets: ClassMeans) -> list[Edit]:
    return [steer_edit(space, h, m, targets) for h, m in feature_masks(space, features).items() if bool(m.any())]


@dataclass(frozen=True)
class Intervention:
    mode: str  # zero | mean | scale
    c: float
    positions: str  # all | after_opening

    @property
    def label(self) -> str:
        name = f"scale(c={self.c:g})" if self.mode == "scale" else self.mode
        return f"{name}/{self.positions}"

    @property
    def kind(self) -> str:
        """``ablation`` (zero, mean) or ``steering`` (scale: the feature pushed past zero)."""
        return "steering" if self.mode == "scale" else "ablation"


def intervention_candidates(modes: Sequence[str], scale_c: Sequence[float], positions: Sequence[str]) -> list[Intervention]:
    out = []
    for p in positions:
        for m in modes:
            out += [Intervention("scale", c, p) for c in scale_c] if m == "scale" else [Intervention(m, 1.0, p)]
    return out


def choose_on_validation(runs: Runs, space: NodeSpace, rankings: dict[str, Ranking], means: ClassMeans,
                         prompts: Sequence[EncodedPrompt], ids: Sequence[str], k: int, methods: Sequence[str],
                         candidates: Sequence[Intervention]) -> dict:
    """Every method x ablation at K = ``k`` on the validation prompts; the choice: the most complied answers (a
    refusal and an incoherent answer both count against a candidate; ties: the config's order)."""
    grid = [(m, iv) for m in methods for iv in candidates if iv.kind == "ablation"]
    if not grid:
        raise ValueError("the headline circuit is an ablation: circuits.interventions needs zero or mean")
    summaries = runs([Condition(f"validation/{curve_condition(m, iv.label, k)}", prompts, ids,
                                ablate(space, rankings[m].top(k), iv.mode, means, iv.c, iv.positions),
                                {"split": "validation"}) for m, iv in grid])
    rows = [{"method": m, "intervention": iv.label, "mode": iv.mode, "c": iv.c, "positions": iv.positions,
             "complied_rate": s["complied"] / s["n"] if s["n"] else float("nan"), **s}
            for (m, iv), s in zip(grid, summaries)]
    best = max(rows, key=lambda r: (r["complied_rate"], -rows.index(r)))
    return {"k": k, "n_prompts": len(prompts), "rows": rows, "rule": "most complied (incoherent counts against)",
            "chosen": {q: best[q] for q in ("method", "intervention", "mode", "c", "positions")}}


def control_pool(method: str, ranking: Ranking, space: NodeSpace, active: dict[str, np.ndarray]) -> dict:
    """Where the headline's controls come from: ``combined``'s pre-selected pool, else the active features."""
    if method != "combined":
        return active
    by_hook = space.by_hook(ranking.features)
    return {h: np.asarray(by_hook.get(h, []), dtype=int) for h in space.hooks}


def behaviour(intervener: Intervener, space: NodeSpace, rankings: dict[str, Ranking], means: ClassMeans,
              refused_means: ClassMeans, direction: torch.Tensor, direction_layer: int, n_layers: int, *,
              prompts: Sequence[EncodedPrompt], ids: Sequence[str], val_prompts: Sequence[EncodedPrompt],
              val_ids: Sequence[str], harmless: Sequence[EncodedPrompt], harmless_ids: Sequence[str],
              ks: Sequence[int], headline_k: int, headline_method: str, interventions: Sequence[str],
              positions: Sequence[str], scale_c: Sequence[float], random_sets: int, induction_random_sets: int,
              max_new_tokens: int, seed: int, audit: ResponseAudit, show_progress: bool = True,
              random_sets_generated: int | None = None, score_tokens: RefusalTokens | None = None) -> dict:
    """The behaviour record of the circuits (see the module docstring). The first ``random_sets_generated``
    random sets (None = all) are generated; with ``score_tokens`` every set is also measured by the refusal score
    (``random.controls_score``)."""
    rng = np.random.default_rng(seed)
    candidates = intervention_candidates(interventions, scale_c, positions)
    steering = [iv for iv in candidates if iv.kind == "steering"]
    methods = list(rankings) if headline_method == "auto" else [headline_method]
    n_abl = sum(iv.kind == "ablation" for iv in candidates)
    n_generated = random_sets if random_sets_generated is None else min(random_sets, random_sets_generated)
    total = (len(methods) * n_abl + 2 + len(steering) + len(rankings) * len(ks) + len(candidates) - 1 + 1
             + n_generated + 2 + len(rankings) + induction_random_sets)
    bar = tqdm(total=total, desc="circuit behaviour (generation)", disable=not show_progress)
    runs = Runs(intervener, max_new_tokens, audit, bar)
    selection = choose_on_validation(runs, space, rankings, means, val_prompts, val_ids, headline_k, methods, candidates)
    chosen = next(iv for iv in candidates if iv.label == selection["chosen"]["intervention"])
    method = selection["chosen"]["method"]
    head_feats = rankings[method].top(headline_k)
    stats = feature_stats(intervener, space, prompts)
    pool = control_pool(method, rankings[method], space, stats.active)
    control_sets = [matched_random(space, head_feats, pool, rng, None if method == "combined" else stats,
                                   exclude_circuit=method != "combined") for _ in range(random_sets)]

    plan: list[Condition] = [Condition("clean", prompts, ids, [], {}),
                             Condition("direction_ablated", prompts, ids, ablation_edits(direction, n_layers), {})]
    plan += [Condition(f"direction_steered(c={iv.c:g})", prompts, ids,
                       ablation_edits(direction, n_layers, coefficient=1 + iv.c), {"c": iv.c}) for iv in steering]
    curve_keys = []
    tallies: dict[str, dict] = {}  # the headline circuit's interventions (chosen, steering): the alignment's tallies
    for m, ranking in rankings.items():
        for k in ks:
            head = (k, m) == (headline_k, method)
            variants = [chosen] + ([iv for iv in candidates if iv != chosen] if head else [])
            for iv in variants:
                feats = ranking.top(k)
                if head and (iv == chosen or iv.kind == "steering"):
                    edits, tallies[iv.label] = tallied_edits(space, feats, iv.mode, means, iv.c, iv.positions, direction)
                else:
                    edits = ablate(space, feats, iv.mode, means, iv.c, iv.positions)
                plan.append(Condition(curve_condition(m, iv.label, k), prompts, ids, edits,
                                      {"method": m, "k": k, "intervention": iv.label, "kind": iv.kind}))
                curve_keys.append((m, k, iv, feats))
    plan.append(Condition("headline_without_direction", prompts, ids,
                          ablate(space, head_feats, chosen.mode, means, chosen.c, chosen.positions, direction), {}))
    random_tallied = [tallied_edits(space, f, chosen.mode, means, chosen.c, chosen.positions, direction)
                      for f in control_sets[:n_generated]]
    plan += [Condition("random", prompts, ids, edits, {"control": r}) for r, (edits, _) in enumerate(random_tallied)]
    plan += induction_plan(space, rankings, refused_means, direction, direction_layer, head_feats, harmless,
                           harmless_ids, headline_k, induction_random_sets, rng)
    summaries, first = runs.scored(plan, score_tokens)  # with score_tokens, each row's first-step score
    bar.close()
    named = list(zip(plan, summaries))

    generated = [r["refusal_rate"] for c, r in named if c.name == "random"]  # the first n_generated sets
    head_name = curve_condition(method, chosen.label, headline_k)
    known = None if first is None else ([sc for c, sc in zip(plan, first) if c.name == "random"],
                                        next(sc for c, sc in zip(plan, first) if c.name == head_name))
    scored = measure_random_sets(intervener, prompts, score_tokens, control_sets, chosen, space, means, generated,
                                 known, show_progress)
    alignment = {"headline": alignment_of(tallies[chosen.label]),
                 "steering": {iv.label: alignment_of(tallies[iv.label]) for iv in steering},
                 "random": [alignment_of(t) for _, t in random_tallied]}
    out = summarise(named, space, rankings, curve_keys, chosen, method, selection, headline_k, alignment,
                    n_prompts=len(prompts), n_harmless=len(harmless), max_new_tokens=max_new_tokens)
    if scored is not None:
        out["random"]["controls_score"] = scored
        out["headline"]["random_p_value_score"] = scored["p_value"]
    return out


def measure_random_sets(intervener: Intervener, prompts: Sequence[EncodedPrompt], tokens: RefusalTokens | None,
                        control_sets: list, chosen: Intervention, space: NodeSpace, means: ClassMeans,
                        generated: Sequence[float], known: tuple[list, list] | None, show_progress: bool) -> dict | None:
    """Every matched random set against the headline circuit, ablated as the headline is, by the refusal score
    (:func:`refusal_lens.core.behaviour.scored_controls`, calibrated on the ``generated`` sets' rates); None without
    ``tokens`` or sets. ``known``: the first-step scores of the generated sets and of the headline (their
    generations', :meth:`Runs.scored`): only the sets not generated get a forward pass."""
    if tokens is None or not control_sets or known is None:
        return None
    rest = [ablate(space, f, chosen.mode, means, chosen.c, chosen.positions) for f in control_sets[len(generated):]]
    with tqdm(total=len(control_sets) + 1, desc="random sets by score", disable=not show_progress) as bar:
        return scored_controls(intervener, prompts, tokens, [], [[] for _ in generated] + rest, generated, bar,
                               known=known[0], known_headline=known[1])


def induction_plan(space, rankings, refused_means, direction, direction_layer, head_feats, harmless, harmless_ids,
                   headline_k, induction_random_sets, rng) -> list[Condition]:
    """Induction on harmless prompts: clean, ActAdd(+r), each method's circuit steered in, matched random sets."""
    plan = [Condition("induction/clean", harmless, harmless_ids, [], {}),
            Condition("induction/direction_actadd", harmless, harmless_ids,
                      addition_edits(direction, direction_layer, 1.0), {})]
    for m, ranking in rankings.items():
        plan.append(Condition(f"induction/{m}/k{headline_k}", harmless, harmless_ids,
                              steer(space, ranking.top(headline_k), refused_means), {"method": m, "k": headline_k}))
    everything = {h: np.arange(space.d_sae(h)) for h in space.hooks}
    for r in range(induction_random_sets):
        feats = matched_random(space, head_feats, everything, rng)
        plan.append(Condition("induction/random", harmless, harmless_ids, steer(space, feats, refused_means),
                              {"control": r}))
    return plan


def summarise(named: list[tuple[Condition, dict]], space: NodeSpace, rankings: dict[str, Ranking], curve_keys: list,
              chosen: Intervention, method: str, selection: dict, headline_k: int, alignment: dict, *, n_prompts: int,
              n_harmless: int, max_new_tokens: int) -> dict:
    """The behaviour record from the conditions' summaries (looked up by condition name)."""
    by: dict[str, list[dict]] = {}
    for c, s in named:
        by.setdefault(c.name, []).append(s)
    clean, direct = by["clean"][0], by["direction_ablated"][0]
    c_rate, d_rate = clean["refusal_rate"], direct["refusal_rate"]

    def frac(s: dict) -> float | None:
        return fraction_of(c_rate, s["refusal_rate"], d_rate)

    curve = [{"method": m, "k": k, "n_features": len(feats), "intervention": iv.label, "kind": iv.kind,
              "positions": iv.positions, **by[curve_condition(m, iv.label, k)][0], "fraction_of_direction": None,
              "features": [space.feature_id(i) for i in feats]} for m, k, iv, feats in curve_keys]
    for row in curve:
        row["fraction_of_direction"] = frac(row)
    rand_sets = [{**s, "fraction_of_direction": frac(s), **a} for s, a in zip(by.get("random", []), alignment["random"])]
    head = next(c for c in curve if (c["method"], c["k"], c["intervention"]) == (method, headline_k, chosen.label))
    controls = control_summary(head["refusal_rate"], [s["refusal_rate"] for s in rand_sets], "less")
    rand_fractions = [s["fraction_of_direction"] for s in rand_sets if s["fraction_of_direction"] is not None]
    without = {**by["headline_without_direction"][0]}
    without["fraction_of_direction"] = frac(without)
    steering = [{"intervention": c["intervention"], "c": iv.c,
                 "circuit": {q: c[q] for q in ("n", "refusal_rate", "ci", "incoherent_rate", "fraction_of_direction")},
                 "alignment": alignment["steering"].get(c["intervention"])}
                for c, (_, _, iv, _) in zip(curve, curve_keys)
                if iv.kind == "steering" and (c["method"], c["k"]) == (method, headline_k)]
    for row in steering:
        d = by[f"direction_steered(c={row['c']:g})"][0]
        row["direction_steered"] = {**d, "fraction_of_direction": frac(d)}

    def smallest_k(m: str, target: float = 0.9) -> int | None:
        pts = sorted((c["k"], c["fraction_of_direction"]) for c in curve
                     if c["method"] == m and c["intervention"] == chosen.label)
        return next((k for k, f in pts if f is not None and f >= target), None)

    return {
        "n_prompts": n_prompts, "n_harmless": n_harmless, "max_new_tokens": max_new_tokens,
        "selection": selection, "clean": clean, "direction": direct, "curve": curve, "steering": steering,
        "random": {"k": headline_k, "matched_to": method, "intervention": chosen.label, "controls": controls,
                   "matched_on": ("combined's pre-selected pool (per-hook counts)" if method == "combined" else
                                  "per hook: firing frequency and edit size (nearest 10 active features)"),
                   "sets": rand_sets, "edit_norm": spread(rand_sets, "edit_norm"),
                   "fraction_along_direction": spread(rand_sets, "fraction_along_direction"),
                   "fraction_of_direction_mean": float(np.mean(rand_fractions)) if rand_fractions else None,
                   "fraction_of_direction_q95": float(np.quantile(rand_fractions, 0.95)) if rand_fractions else None},
        "headline": {"method": method, "k": headline_k, "intervention": chosen.label, "kind": chosen.kind,
                     "positions": chosen.positions, "refusal_rate": head["refusal_rate"], "ci": head["ci"],
                     "n": head["n"], "incoherent_rate": head["incoherent_rate"], "coherent_rate": head["coherent_rate"],
                     "fraction_of_direction": head["fraction_of_direction"], "random_p_value": controls["p_value"],
                     "random_mean": controls["mean"], "features": head["features"], "alignment": alignment["headline"],
                     "without_direction": without, "chosen_on": "validation",
                     "smallest_k_reaching_90": {m: smallest_k(m) for m in rankings}},
        "induction": induction_record(by, rankings, headline_k, method),
    }


def spread(rows: list[dict], key: str) -> dict:
    """Mean and 5-95% quantiles of ``key`` over ``rows`` (None when no row has it)."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return {"mean": float(np.mean(vals)), "q05": float(np.quantile(vals, 0.05)),
            "q95": float(np.quantile(vals, 0.95))} if vals else {"mean": None, "q05": None, "q95": None}


def induction_record(by: dict[str, list[dict]], rankings: dict[str, Ranking], headline_k: int, method: str) -> dict:
    """Induction's clean and ActAdd(+r) rates, each method's steered circuit, the headline's random controls."""
    curve = [{"method": m, "k": headline_k, **by[f"induction/{m}/k{headline_k}"][0]} for m in rankings]
    head = next(i for i in curve if i["method"] == method)
    return {"clean": by["induction/clean"][0], "direction_actadd": by["induction/direction_actadd"][0], "curve": curve,
            "random": control_summary(head["refusal_rate"], [s["refusal_rate"] for s in by.get("induction/random", [])],
                                      "greater")}
