"""The false-refusal vector of Wang et al. 2025 (ICLR; mainlp/False-Refusal-Mitigation): remove over-refusal while
correct refusal stays.

* **Candidates** (discovery): ``w = mean(safe prompts the model refused) - mean(harmless prompts it answered)`` at
  every post-instruction position x layer (block input), as the refusal direction's candidates are; each
  orthogonalised against the refusal direction's candidate *at the same site*, ``w' = w - lambda (w . r_hat)
  r_hat``, for every lambda of ``direction.false_refusal_lambdas`` (1.0, 0.8, 0.6 as the reference; 0 = no
  orthogonalisation, the plain ablation of w).
* **Selection** (validation, per lambda, the reference's rule): each candidate ablated from every residual write at
  every position; the lowest mean refusal score of the refused safe validation prompts among candidates with KL
  <= ``direction.false_refusal_kl_max`` (0.2) on harmless validation prompts and layer < 0.8 L (KL measured in
  order of that score until a candidate passes, :func:`lowest_within_kl`: the same choice). Keeping the
  refusal of toxic prompts is not a filter: the orthogonalisation is what keeps it (the reference's design). The
  screen of :mod:`.select` shortlists the candidates measured exactly.
* **Selection keeping correct refusal** (:func:`select_keeping_toxic`, ``direction.false_refusal_keep_toxic``; not
  the reference's rule): for the headline lambda, the lowest refused-safe score among the candidates that keep
  correct refusal on that fraction of the refused toxic validation prompts (``direction.false_refusal_keep_by``: the
  refusal score stays > 0, or the judged answers generated under the ablation stay refused); tested as
  ``w'(lambda=1, toxic kept)``.
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

from collections.abc import Callable, Sequence
from dataclasses import replace

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
from refusal_lens.stages.direction.select import Scored, by_bypass, bypass_estimates, scores_of, shortlist


def orthogonalised(w: Candidates, r: Candidates, lam: float) -> Candidates:
    """Every site's ``w - lam (w . r_hat) r_hat`` with ``r_hat`` the refusal candidate of the same site."""
    u = r.diff / r.diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    diff = w.diff - lam * (w.diff * u).sum(-1, keepdim=True) * u
    return Candidates(diff, w.harmful_mean, w.harmless_mean, w.n_harmful, w.n_harmless)


def lowest_within_kl(candidates: Sequence[Scored], kl_of: Callable[[Scored], float], kl_max: float) -> Scored | None:
    """The first candidate in :func:`~refusal_lens.stages.direction.select.by_bypass` order with KL <= ``kl_max``, or
    None when none has.

    KL is measured lazily (``kl_of``, kept on ``s.kl``; a ``kl`` already set is reused), in that order, until one
    passes: the same choice as measuring every candidate's KL and then filtering (the first passing candidate in
    the order is the filtered minimum), at the cost of the KLs up to the choice. When none passes, every KL has
    been measured."""
    for s in sorted(candidates, key=by_bypass):
        if s.kl is None:
            s.kl = kl_of(s)
        if s.kl <= kl_max:
            return s
    return None


def harmless_kl(intervener: Intervener, clean: torch.Tensor, harmless: Sequence[EncodedPrompt], cands: Candidates,
                s: Scored, n_layers: int) -> float:
    """Mean KL(clean || ablated) of the harmless prompts' next token, candidate ``s`` of ``cands`` ablated."""
    edits = ablation_edits(cands.vector(s.layer, s.j), n_layers)
    return float(kl_divergence(clean, intervener.last_logits(harmless, edits).log_softmax(-1)).mean())


def select_false_refusal(intervener: Intervener, w: Candidates, r: Candidates, safe: Sequence[EncodedPrompt],
                         harmless: Sequence[EncodedPrompt], tokens: RefusalTokens, n_layers: int, *,
                         lambdas: Sequence[float], kl_max: float, max_layer_fraction: float,
                         exact_candidates: int | None, exact_per_layer: int,
                         show_progress: bool = True) -> tuple[dict, list[list[Scored]]]:
    """Per lambda: the chosen site (lowest refused-safe validation score with KL <= kl_max) and its numbers; and each
    lambda's scored candidates (those measured exactly have ``bypass``; ``kl`` only those whose KL the choice needed,
    :func:`lowest_within_kl`)."""
    sets = [orthogonalised(w, r, lam) for lam in lambdas]
    clean = intervener.last_logits(harmless).log_softmax(-1)
    clean_safe_score = float(scores_of(intervener, safe, tokens).mean())  # the same for every lambda
    screens = bypass_estimates(intervener, sets, safe, tokens, n_layers)  # one backward pass for every lambda
    out, every = {}, []
    for lam, cands, est in zip(lambdas, sets, screens):
        norms = cands.diff.norm(dim=-1)
        tiny = 1e-6 * float(norms.max())
        scored = [Scored(layer, j, cands.position(j), float(est[layer, j]), 0.0, norm=float(norms[layer, j]),
                         degenerate=bool(norms[layer, j] <= tiny)) for layer, j in cands.flat()]
        short = shortlist(scored, n_layers, max_layer_fraction, exact_candidates, exact_per_layer)
        if not short:
            raise ValueError("no candidate was measured below the layer filter")
        for s in tqdm(short, desc=f"false-refusal candidates (lambda {lam:g})", disable=not show_progress):
            s.bypass = float(scores_of(intervener, safe, tokens, ablation_edits(cands.vector(s.layer, s.j),
                                                                                 n_layers)).mean())
        best = lowest_within_kl(short, lambda s: harmless_kl(intervener, clean, harmless, cands, s, n_layers), kl_max)
        filters = {"kl_max": kl_max, "max_layer": max_layer_fraction * n_layers, "notes": [],
                   "n_measured": len(short), "n_kl_measured": sum(s.kl is not None for s in short)}
        if best is None:  # every KL was measured
            filters["notes"].append(f"no measured candidate has KL <= {kl_max}: the KL filter was dropped")
            filters["kl_max"] = None
            best = min(short, key=by_bypass)
        out[lam] = {"layer": best.layer, "j": best.j, "position": best.position, "bypass": best.bypass, "kl": best.kl,
                    "norm": best.norm, "filters": filters, "vector": cands.vector(best.layer, best.j),
                    "cosine_with_r": float(torch.nn.functional.cosine_similarity(
                        w.vector(best.layer, best.j), r.vector(best.layer, best.j), dim=0)),
                    "clean_safe_score": clean_safe_score}
        every.append(scored)
    return out, every


def select_keeping_toxic(intervener: Intervener, w: Candidates, r: Candidates, lam: float, scored: list[Scored],
                         safe: Sequence[EncodedPrompt], toxic: Sequence[EncodedPrompt], harmless: Sequence[EncodedPrompt],
                         tokens: RefusalTokens, n_layers: int, *, clean_safe_score: float, keep_toxic: float,
                         kl_max: float, max_layer_fraction: float, exact_candidates: int | None, exact_per_layer: int,
                         keep_by: str, runs: Runs | None = None, toxic_ids: Sequence[str] = (),
                         show_progress: bool = True) -> dict:
    """The obvious fix when the reference's w' costs correct refusal (not the reference's rule): among the candidates
    of w'(lam), the lowest mean refusal score of the refused safe validation prompts whose ablation keeps correct
    refusal on at least ``keep_toxic`` of the refused toxic validation prompts, with KL <= kl_max on harmless
    validation prompts and layer < max_layer_fraction L, and that lowers the safe prompts' mean score below its clean
    value (a candidate that removes nothing keeps toxic refusal trivially: it is no fix).

    "Keeps", by ``keep_by``: ``score``, the refusal score stays > 0 on the refused toxic prompts that score > 0 clean
    (one forward pass a candidate; on the full run only 8 prompts pass that base, and the rule overfits: 8 of 8 kept
    on validation, 81% on test at 3ab5c0a); ``generation`` (the config's default), the judged refusal rate of the greedy answers under the ablation on every refused toxic prompt
    (``runs`` generates them, ``toxic_ids`` name them in its audit), candidates generated in order of their safe
    score, a batch at a time, until one keeps with its KL within the bound (:func:`first_kept_by_generation`: the
    choice of generating every candidate and then filtering).

    The shortlist is the reference's (lowest estimated safe score) plus the candidates with the lowest estimated
    safe-minus-toxic score (first-order, one backward pass per side), each measured exactly on the safe side; KL only
    for those that lower the safe score and keep toxic refusal, in order of the safe score until one passes.
    ``scored``: the reference selection's candidates of w'(lam) (:func:`select_false_refusal`; those it measured are
    reused), ``clean_safe_score`` its clean mean score of ``safe``.
    Returns the choice and its numbers, or ``{"note": ...}`` when no candidate passes (then the best kept
    fraction)."""
    if keep_by not in ("score", "generation"):
        raise ValueError(f"keep_by={keep_by!r}; allowed: 'score', 'generation'")
    if keep_by == "generation" and (runs is None or len(toxic_ids) != len(toxic)):
        raise ValueError("keep_by='generation' needs runs and one id per toxic prompt")
    cands = orthogonalised(w, r, lam)
    base = None
    if keep_by == "score":
        base = scores_of(intervener, toxic, tokens) > 0
        if not base.any():
            return {"note": "no refused toxic validation prompt has a refusal score > 0 clean: nothing to keep"}
    lowers = clean_safe_score - 1e-4 * max(1.0, abs(clean_safe_score))  # beyond float32 rounding: a no-op site does not pass
    (est_tox,) = bypass_estimates(intervener, [cands], toxic, tokens, n_layers)
    selective = [Scored(s.layer, s.j, s.position, s.bypass_estimate - float(est_tox[s.layer, s.j]), 0.0, norm=s.norm,
                        degenerate=s.degenerate) for s in scored]
    by_site = {(s.layer, s.j): s for s in scored}
    short = {(s.layer, s.j) for s in shortlist(selective, n_layers, max_layer_fraction, exact_candidates,
                                                 exact_per_layer)}
    short |= {key for key, s in by_site.items() if s.bypass is not None}
    bar = tqdm(sorted(short), desc=f"false-refusal candidates keeping toxic (lambda {lam:g})",
               disable=not show_progress)
    kl_of = _kl_with_clean_once(intervener, harmless, cands, n_layers)
    if keep_by == "score":
        rows = [_both_sides(intervener, cands, by_site[site], safe, toxic, base, tokens, n_layers) for site in bar]
        keeping = {(s.layer, s.j): kept for s, kept in rows if kept >= keep_toxic and s.bypass < lowers}
        eligible = [s for s, _ in rows if (s.layer, s.j) in keeping]
        chosen = lowest_within_kl(eligible, kl_of, kl_max)
        extra: dict = {}
    else:
        measured = [_safe_side(intervener, cands, by_site[site], safe, tokens, n_layers) for site in bar]
        per_batch = max(1, intervener.generation_batch_size // max(1, len(toxic)))
        lowering = [s for s in measured if s.bypass < lowers]
        with tqdm(total=len(lowering), desc=f"false-refusal candidates keeping toxic, generated (lambda {lam:g})",
                  disable=not show_progress) as gen_bar:
            chosen, rates = first_kept_by_generation(Runs(runs.intervener, runs.max_new_tokens, runs.audit, gen_bar),
                                                     cands, lowering, toxic, toxic_ids, keep_toxic, kl_of, kl_max,
                                                     n_layers, per_batch)
        rows = [(s, rates[(s.layer, s.j)]) for s in measured if (s.layer, s.j) in rates]
        keeping = {site: kept for site, kept in rates.items() if kept >= keep_toxic}
        eligible = [s for s, _ in rows if (s.layer, s.j) in keeping]
        extra = {"n_generated": len(rates)}
    record = {"keep_toxic": keep_toxic, "keep_by": keep_by, "kl_max": kl_max, "n_measured": len(short),
              "n_keeping": len(eligible), "n_kl_measured": sum(s.kl is not None for s in eligible),
              "n_toxic_validation": int(base.sum()) if base is not None else len(toxic),
              "clean_safe_score": clean_safe_score, **extra}
    if chosen is None:
        best = max(rows, key=lambda t: t[1] if t[0].bypass < lowers else -1.0) if rows else None
        return {**record, "note": f"no measured candidate lowers the refused safe prompts' score and keeps >= "
                                  f"{keep_toxic:.0%} of the refused toxic validation prompts with KL <= {kl_max}"
                                  + (f" (best kept {best[1]:.0%})" if best else "")}
    s, kept = chosen, keeping[(chosen.layer, chosen.j)]
    vector = cands.vector(s.layer, s.j)
    return {**record, "layer": s.layer, "j": s.j, "position": s.position, "bypass": s.bypass, "kl": s.kl,
            "toxic_kept": kept, "norm": s.norm, "vector": vector,
            "cosine_with_r": float(torch.nn.functional.cosine_similarity(w.vector(s.layer, s.j),
                                                                         r.vector(s.layer, s.j), dim=0))}


def first_kept_by_generation(runs, cands: Candidates, candidates: Sequence[Scored], toxic: Sequence[EncodedPrompt],
                             toxic_ids: Sequence[str], keep_toxic: float, kl_of: Callable[[Scored], float],
                             kl_max: float, n_layers: int, per_batch: int) -> tuple[Scored | None, dict]:
    """In :func:`~refusal_lens.stages.direction.select.by_bypass` order, ``per_batch`` candidates at a time: each
    one's judged refusal rate on ``toxic`` with it ablated (``runs``, a :class:`~refusal_lens.core.behaviour.Runs`;
    an incoherent answer is not a kept refusal), then KL (``kl_of``, lazily, kept on ``s.kl``) for one that keeps
    >= ``keep_toxic``; the first that keeps with KL <= ``kl_max``, or None. The same choice as generating every
    candidate and then taking :func:`lowest_within_kl` of those that keep. Returns it and the rate of every
    candidate generated, by ``(layer, j)``."""
    order = sorted(candidates, key=by_bypass)
    rates: dict[tuple[int, int], float] = {}
    for start in range(0, len(order), per_batch):
        chunk = order[start : start + per_batch]
        summaries = runs([Condition(f"validation/toxic_kept/layer{s.layer}/position{s.position}", toxic, toxic_ids,
                                    ablation_edits(cands.vector(s.layer, s.j), n_layers),
                                    {"split": "validation", "layer": s.layer, "position": s.position})
                          for s in chunk])
        for s, summary in zip(chunk, summaries):
            rates[(s.layer, s.j)] = summary["refused"] / summary["n"] if summary["n"] else 0.0
        for s in chunk:
            if rates[(s.layer, s.j)] >= keep_toxic:
                if s.kl is None:
                    s.kl = kl_of(s)
                if s.kl <= kl_max:
                    return s, rates
    return None, rates


def _safe_side(intervener: Intervener, cands: Candidates, s: Scored, safe: Sequence[EncodedPrompt],
               tokens: RefusalTokens, n_layers: int) -> Scored:
    """A copy of ``s`` (the reference selection's record keeps what it measured) with its safe score measured if it
    was not."""
    s = replace(s)
    if s.bypass is None:
        s.bypass = float(scores_of(intervener, safe, tokens, ablation_edits(cands.vector(s.layer, s.j), n_layers)).mean())
    return s


def _both_sides(intervener: Intervener, cands: Candidates, s: Scored, safe: Sequence[EncodedPrompt],
                toxic: Sequence[EncodedPrompt], base: torch.Tensor, tokens: RefusalTokens, n_layers: int
                ) -> tuple[Scored, float]:
    """:func:`_safe_side`, and the fraction of the ``base`` toxic prompts whose refusal score stays > 0 under its
    ablation."""
    s = _safe_side(intervener, cands, s, safe, tokens, n_layers)
    edits = ablation_edits(cands.vector(s.layer, s.j), n_layers)
    return s, float((scores_of(intervener, toxic, tokens, edits)[base] > 0).mean())


def _kl_with_clean_once(intervener: Intervener, harmless: Sequence[EncodedPrompt], cands: Candidates,
                        n_layers: int) -> Callable[[Scored], float]:
    """:func:`harmless_kl` of a candidate, the harmless prompts' clean pass run at the first call only."""
    clean: list[torch.Tensor] = []

    def kl_of(s: Scored) -> float:
        if not clean:
            clean.append(intervener.last_logits(harmless).log_softmax(-1))
        return harmless_kl(intervener, clean[0], harmless, cands, s, n_layers)

    return kl_of


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
