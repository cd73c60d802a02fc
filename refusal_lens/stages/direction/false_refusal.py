"""The false-refusal vector of Wang et al. 2025 (ICLR; mainlp/False-Refusal-Mitigation): remove over-refusal while
correct refusal stays.

* **Candidates** (discovery): ``w = mean(safe prompts the model refused) - mean(harmless prompts it answered)`` at
  every post-instruction position x layer (block input), as the refusal direction's candidates are; each
  orthogonalised against the refusal direction's candidate *at the same site*, ``w' = w - lambda (w . r_hat)
  r_hat``, for every lambda of ``direction.false_refusal_lambdas`` (1.0, 0.8, 0.6 as the reference; 0 = no
  orthogonalisation, the plain ablation of w).
* **Selection** (validation, :mod:`.false_refusal_select`): per lambda the reference's rule (lowest refused-safe
  score with KL <= ``direction.false_refusal_kl_max`` on harmless prompts, layer < 0.8 L; keeping the refusal of
  toxic prompts is the orthogonalisation's job, not a filter), and for the headline lambda the obvious fix, the
  same with correct refusal kept on validation (``direction.false_refusal_keep_toxic`` / ``false_refusal_keep_by``),
  tested as ``w'(lambda=1, toxic kept)``.
* **Test** (:func:`false_refusal_test`): for each lambda's w', and as baselines the refusal direction's ablation,
  ActAdd(-a r) at ``direction.false_refusal_actadd`` strengths and the earlier ``r_over`` (refused safe - refused
  toxic) ablation: greedy refusal of the refused safe test prompts (over-refusal; 100% clean by construction)
  and of the refused toxic ones (correct refusal), coherence; for the headline w' (lambda = the first of the
  list) also every safe / toxic / harmless test prompt and KL on harmless prompts, per category; controls:
  random unit directions orthogonalised to r and the label-permutation null of the difference in means
  (refused safe vs harmless discovery activations at the selected site, shuffled, orthogonalised), each ablated
  on the refused safe test prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.core.behaviour import Condition, ResponseAudit, Runs, control_summary, scored_controls
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.direction_edits import ablation_edits, addition_edits
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.metrics import kl_divergence
from refusal_lens.core.stats import spearman
from refusal_lens.core.refusal import RefusalTokens
from refusal_lens.stages.direction.candidates import Candidates, SiteCache
from refusal_lens.stages.direction.false_refusal_select import select_false_refusal, select_keeping_toxic


def permuted_false_refusal(safe: torch.Tensor, harmless: torch.Tensor, r: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``[n, d]``: label-shuffled differences in means of the pooled site activations, orthogonalised to ``r``."""
    from refusal_lens.stages.direction.evaluate import permuted_directions

    u = (r / r.norm()).float()
    p = permuted_directions(safe, harmless, n, seed)
    return p - (p @ u)[:, None] * u


def random_orthogonal(r: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``[n, d]`` random unit directions orthogonal to ``r``."""
    gen = torch.Generator().manual_seed(seed)
    u = (r / r.norm()).float()
    v = torch.randn(n, len(u), generator=gen)
    v = v - (v @ u)[:, None] * u
    return v / v.norm(dim=-1, keepdim=True)


def score_controls(intervener: Intervener, safe: Sequence[EncodedPrompt], tokens: RefusalTokens,
                   headline_edits: Sequence, controls: dict[str, torch.Tensor], n_layers: int,
                   generated: dict[str, list[float]] | None = None, show_progress: bool = True,
                   known: dict[str, list[list[float]]] | None = None, known_headline: list[float] | None = None) -> dict:
    """Every control of each kind measured by the refusal score on the refused safe test prompts
    (:func:`refusal_lens.core.behaviour.scored_controls`), calibrated on the generated ones (``generated``: kind ->
    the generated refusal rates of its first controls). ``known`` (kind -> per control) and ``known_headline``: the
    per-prompt scores already read from the generations' first step (not computed again)."""
    generated, known = generated or {}, known or {}
    with tqdm(total=sum(len(v) + 1 for v in controls.values()), desc="false-refusal controls by score",
              disable=not show_progress) as bar:
        by_kind = {kind: scored_controls(intervener, safe, tokens, headline_edits,
                                         [ablation_edits(v, n_layers) for v in vs], generated.get(kind, ()), bar,
                                         known=known.get(kind, ()), known_headline=known_headline)
                   for kind, vs in controls.items()}
    first = next(iter(by_kind.values()), {})
    out: dict = {"headline_mean_score": first.get("headline_mean_score"), "n_prompts": len(safe),
                 "controls": by_kind}
    pairs = [(r, v) for kind, c in by_kind.items() for r, v in zip(generated.get(kind, ()), c["scores"])
             if v == v]  # the raw per-control scores (index k = control k), NaN left out pairwise
    if pairs:
        out["calibration"] = {"n_controls": len(pairs), "spearman_rate_vs_score": spearman(*zip(*pairs)),
                              "by_kind": {kind: {"p_score_on_generated": c["calibration"]["p_score_on_generated"],
                                                 "n": c["calibration"]["n_controls"]}
                                          for kind, c in by_kind.items() if "calibration" in c}}
    return out


def false_refusal_test(intervener: Intervener, conditions: dict[str, list], refused_safe, refused_toxic,
                       headline: str, everything: dict[str, tuple], harmless, controls: dict[str, torch.Tensor],
                       n_layers: int, max_new_tokens: int, audit: ResponseAudit, show_progress: bool = True,
                       generated_controls: int | None = None, tokens: RefusalTokens | None = None) -> dict:
    """Greedy refusal of the refused safe and refused toxic test prompts under each condition (``name -> edits``);
    the headline's every-prompt rows and KL; the controls ablated on the refused safe prompts (their p-values):
    the first ``generated_controls`` of each kind (None = all) generated and judged, and, with ``tokens``, every
    control measured by the refusal score as well (:func:`score_controls`, calibrated on the generated ones)."""
    (safe, safe_ids), (toxic, toxic_ids) = refused_safe, refused_toxic
    plan = [Condition(f"false_refusal/{name}/{side}", ps, pid, edits, {"method": name})
            for name, edits in conditions.items()
            for side, ps, pid in (("safe_refused", safe, safe_ids), ("toxic_refused", toxic, toxic_ids)) if ps]
    plan += [Condition(f"false_refusal/{headline}/all_{side}", ps, pid, conditions[headline], {"method": headline})
             for side, (ps, pid) in everything.items() if ps]
    plan += [Condition(f"false_refusal/control_{kind}/safe_refused", safe, safe_ids, ablation_edits(v, n_layers),
                       {"control": k}) for kind, vs in controls.items() for k, v in enumerate(vs)
             if safe and (generated_controls is None or k < generated_controls)]
    with tqdm(total=len(plan), desc="false refusal (generation)", disable=not show_progress) as bar:
        summaries, first = Runs(intervener, max_new_tokens, audit, bar).scored(plan, tokens if safe else None)
    rows: dict[str, dict] = {}
    ctrl: dict[str, list[float]] = {}
    known: dict[str, list[list[float]]] = {}  # kind -> the generated controls' first-position scores
    known_headline = None
    for i, (c, s) in enumerate(zip(plan, summaries)):
        _, name, side = c.name.split("/")
        if name.startswith("control_"):
            ctrl.setdefault(name[len("control_"):], []).append(s["refusal_rate"])
            if first is not None:
                known.setdefault(name[len("control_"):], []).append(first[i])
        else:
            rows.setdefault(name, {})[side] = s
            if first is not None and name == headline and side == "safe_refused":
                known_headline = first[i]
    own = rows.get(headline, {}).get("safe_refused", {}).get("refusal_rate", float("nan"))
    out = {"conditions": rows, "controls": {k: control_summary(own, v, "less") for k, v in ctrl.items()}}
    if tokens is not None and safe:
        out["controls_score"] = score_controls(intervener, safe, tokens, conditions[headline], controls, n_layers,
                                               ctrl, show_progress, known, known_headline)
    if harmless:
        clean = intervener.last_logits(harmless).log_softmax(-1)
        kl = kl_divergence(clean, intervener.last_logits(harmless, conditions[headline]).log_softmax(-1)).numpy()
        out["kl_harmless"] = {"mean": float(np.mean(kl)), "n": int(len(kl))}
    return out


def actadd_edits(r: torch.Tensor, layer: int, strength: float) -> list:
    """ActAdd(-a r): ``strength * |r|`` subtracted along r_hat at the direction's layer (a = strength)."""
    return addition_edits(r, layer, -strength)


def false_refusal_experiment(cfg, fast: Intervener, precise: Intervener, data, contrast, r_cands: Candidates,
                             saved, n_layers: int, max_new: int, audit: ResponseAudit, show_progress: bool,
                             sites: SiteCache | None = None) -> dict:
    """The whole experiment (module docstring) on a run's collection; ``saved`` is the selected refusal direction.
    Returns the record (the headline w' under ``"vector"``, for the caller to save)."""
    from refusal_lens.stages.direction.candidates import difference_in_means, site_activations

    c = cfg.direction
    enc = lambda rows: data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens, rows)  # noqa: E731
    safe_disc, safe_val = (data.split_rows(s, "safe", refused=True) for s in ("discovery", "validation"))
    counts = {"refused_safe_discovery": len(safe_disc), "refused_safe_validation": len(safe_val)}
    if len(safe_disc) < 2 or not safe_val:
        return {**counts, "note": "too few refused safe discovery / validation prompts for a false-refusal vector"}
    harmless_disc, harmless_val = contrast.harmless["discovery"], contrast.harmless["validation"]
    w = difference_in_means(precise, enc(safe_disc), enc(harmless_disc), n_layers, r_cands.diff.shape[-1], sites)
    lambdas = c.false_refusal_lambdas
    chosen, scored = select_false_refusal(
        fast, w, r_cands, enc(safe_val), enc(harmless_val), data.tokens, n_layers, lambdas=lambdas,
        kl_max=c.false_refusal_kl_max, max_layer_fraction=c.max_layer_fraction, exact_candidates=c.exact_candidates,
        exact_per_layer=c.exact_per_layer, show_progress=show_progress)
    lam0 = c.false_refusal_lambdas[0]
    head = chosen[lam0]
    headline = f"w'(lambda={lam0:g})"
    conditions = {f"w'(lambda={lam:g})": ablation_edits(ch["vector"], n_layers) for lam, ch in chosen.items()}
    tox_val = data.split_rows("validation", "toxic", refused=True)
    kept_choice = None
    if c.false_refusal_keep_toxic is not None and tox_val:
        kept_choice = select_keeping_toxic(
            fast, w, r_cands, lam0, scored[0], enc(safe_val), enc(tox_val), enc(harmless_val), data.tokens, n_layers,
            clean_safe_score=head["clean_safe_score"], keep_toxic=c.false_refusal_keep_toxic, kl_max=c.false_refusal_kl_max,
            max_layer_fraction=c.max_layer_fraction, exact_candidates=c.exact_candidates,
            exact_per_layer=c.exact_per_layer, keep_by=c.false_refusal_keep_by, runs=Runs(fast, max_new, audit),
            toxic_ids=data.ids(tox_val), show_progress=show_progress)
        if "vector" in kept_choice:
            conditions[f"w'(lambda={lam0:g}, toxic kept)"] = ablation_edits(kept_choice["vector"], n_layers)
    conditions["r ablated"] = ablation_edits(saved.vector, n_layers)
    conditions.update({f"ActAdd(-{a:g}r)": actadd_edits(saved.vector, saved.layer, a) for a in c.false_refusal_actadd})
    j = int(saved.info["post_instruction_index"])
    tox_disc = data.split_rows("discovery", "toxic", refused=True)
    if len(tox_disc) >= 2:  # the earlier experiment, as a baseline: r_over = refused safe - refused toxic
        r_over = (site_activations(precise, enc(safe_disc), saved.layer, j, sites).mean(0)
                  - site_activations(precise, enc(tox_disc), saved.layer, j, sites).mean(0)).float()
        conditions["r_over ablated"] = ablation_edits(r_over, n_layers)
    acts = [site_activations(precise, enc(rows), head["layer"], head["j"], sites) for rows in (safe_disc, harmless_disc)]
    controls = {"random_orthogonal": random_orthogonal(saved.vector, c.false_refusal_controls, c.seed),
                "permuted": permuted_false_refusal(*acts, r_cands.vector(head["layer"], head["j"]),
                                                   c.false_refusal_controls, c.seed)}
    safe_t, tox_t = (data.split_rows("test", lab, refused=True) for lab in ("safe", "toxic"))
    every = {lab: data.split_rows("test", lab) for lab in ("safe", "toxic", "harmless")}
    result = false_refusal_test(fast, conditions, (enc(safe_t), data.ids(safe_t)), (enc(tox_t), data.ids(tox_t)),
                                headline, {lab: (enc(rows), data.ids(rows)) for lab, rows in every.items()},
                                enc(every["harmless"]), controls, n_layers, max_new, audit, show_progress,
                                generated_controls=c.false_refusal_controls_generated,
                                tokens=data.tokens if c.false_refusal_score_controls else None)
    result["by_category"] = by_category(audit, f"false_refusal/{headline}/all_safe", data)
    return {**counts, "headline": headline, "lambda": lam0, "vector": head["vector"],
            "chosen": {f"{lam:g}": {k: v for k, v in ch.items() if k != "vector"} for lam, ch in chosen.items()},
            **({"chosen_keeping_toxic": {k: v for k, v in kept_choice.items() if k != "vector"}} if kept_choice else {}),
            "n_test": {"safe_refused": len(safe_t), "toxic_refused": len(tox_t)}, **result}


def by_category(audit: ResponseAudit, condition: str, data) -> dict:
    """Refusal rate per OR-Bench category of one condition's responses (from the audit)."""
    from refusal_lens.core.behaviour import summarise

    cat_of = {r["prompt_id"]: r["category"] for r in data.rows}
    texts: dict[str, list[str]] = {}
    for row in audit.rows:
        if row["condition"] == condition:
            texts.setdefault(cat_of[row["prompt_id"]], []).append(row["response"])
    return {cat: summarise(t) for cat, t in sorted(texts.items())}
