"""Choosing the false-refusal vector on validation (:mod:`.false_refusal` builds the candidates and tests the choice).

* :func:`select_false_refusal`, **the reference's rule** (Wang et al. 2025), per lambda: each candidate
  ``w' = w - lambda (w . r_hat) r_hat`` (:func:`orthogonalised`) ablated from every residual write at every position;
  the lowest mean refusal score of the refused safe validation prompts among candidates with KL <=
  ``direction.false_refusal_kl_max`` on harmless validation prompts and layer < 0.8 L (KL measured in order of that
  score until a candidate passes, :func:`lowest_within_kl`: the same choice). The screen of :mod:`.select`
  shortlists the candidates measured exactly.
* :func:`select_keeping_toxic`, **the obvious fix** when the reference's w' costs correct refusal (not the
  reference's rule; ``direction.false_refusal_keep_toxic`` and ``false_refusal_keep_by``): the lowest refused-safe
  score among the candidates that keep correct refusal on that fraction of the refused toxic validation prompts,
  measured by the judged answers generated under each candidate's ablation (:func:`first_kept_by_generation`) or
  by the refusal score staying > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from refusal_lens.core.behaviour import Condition, Runs
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.direction_edits import ablation_edits
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.metrics import kl_divergence
from refusal_lens.core.refusal import RefusalTokens
from refusal_lens.stages.direction.candidates import Candidates
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
    """The obvious fix when the reference's w' costs correct refusal (module docstring): among the candidates of
    w'(lam), the lowest refused-safe validation score of those that keep correct refusal on >= ``keep_toxic`` of the
    refused ``toxic`` validation prompts, with KL <= kl_max, layer < max_layer_fraction L, and a safe score below
    ``clean_safe_score`` (a candidate that removes nothing keeps toxic refusal trivially: it is no fix). "Keeps"
    (``keep_by``): ``generation``, the judged refusal rate of greedy answers under the ablation (``runs`` generates
    them, ``toxic_ids`` name them in its audit; :func:`first_kept_by_generation`); ``score``, the refusal score stays
    > 0 on the prompts that score > 0 clean (on the full run only 8 do, and the rule overfit: 8 of 8 kept on
    validation, 81% on test at 3ab5c0a). Sites: :func:`_keeping_shortlist`; ``scored`` is the reference selection's
    record of w'(lam) (:func:`select_false_refusal`; what it measured is reused, not changed). Returns the choice and
    its numbers, or ``{"note": ...}`` when no candidate passes (with the best kept fraction)."""
    if keep_by not in ("score", "generation") or (keep_by == "generation" and (runs is None or len(toxic_ids) != len(toxic))):
        raise ValueError(f"keep_by={keep_by!r}; allowed: 'score', or 'generation' with runs and one id per toxic prompt")
    cands = orthogonalised(w, r, lam)
    base = None
    if keep_by == "score":
        base = scores_of(intervener, toxic, tokens) > 0
        if not base.any():
            return {"note": "no refused toxic validation prompt has a refusal score > 0 clean: nothing to keep"}
    lowers = clean_safe_score - 1e-4 * max(1.0, abs(clean_safe_score))  # beyond float32 rounding: a no-op site does not pass
    by_site = {(s.layer, s.j): s for s in scored}
    short = _keeping_shortlist(intervener, cands, scored, toxic, tokens, n_layers, max_layer_fraction, exact_candidates,
                               exact_per_layer)
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
            chosen, rates = first_kept_by_generation(Runs(runs.intervener, runs.max_new_tokens, runs.audit, gen_bar), cands,
                                                     lowering, toxic, toxic_ids, keep_toxic, kl_of, kl_max, n_layers, per_batch)
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
    return {**record, **_choice(chosen, keeping[(chosen.layer, chosen.j)], cands, w, r)}


def _keeping_shortlist(intervener: Intervener, cands: Candidates, scored: list[Scored], toxic: Sequence[EncodedPrompt],
                       tokens: RefusalTokens, n_layers: int, max_layer_fraction: float, exact_candidates: int | None,
                       exact_per_layer: int) -> set[tuple[int, int]]:
    """The sites the toxic-kept rule measures: the lowest estimated safe-minus-toxic scores (first-order, one backward
    pass on ``toxic``; :func:`~refusal_lens.stages.direction.select.shortlist`) and every site the reference measured."""
    (est_tox,) = bypass_estimates(intervener, [cands], toxic, tokens, n_layers)
    selective = [Scored(s.layer, s.j, s.position, s.bypass_estimate - float(est_tox[s.layer, s.j]), 0.0, norm=s.norm,
                        degenerate=s.degenerate) for s in scored]
    short = {(s.layer, s.j) for s in shortlist(selective, n_layers, max_layer_fraction, exact_candidates,
                                                 exact_per_layer)}
    return short | {(s.layer, s.j) for s in scored if s.bypass is not None}


def _choice(s: Scored, kept: float, cands: Candidates, w: Candidates, r: Candidates) -> dict:
    """The chosen candidate's record: its site, numbers, vector and the cosine of its unorthogonalised w with r."""
    return {"layer": s.layer, "j": s.j, "position": s.position, "bypass": s.bypass, "kl": s.kl, "toxic_kept": kept,
            "norm": s.norm, "vector": cands.vector(s.layer, s.j),
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
            rates[(s.layer, s.j)] = summary["refusal_rate"]
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
