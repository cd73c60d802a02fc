"""Behaviour under an intervention, as every stage reports it: judged outcomes, rates with intervals, controls.

A *condition* is one intervention (or none) applied while the model answers a set of prompts greedily;
its responses are judged (:mod:`refusal_lens.core.judge`) and summarised by :func:`summarise`: the counts of
``refused`` / ``complied`` / ``incoherent``, the refusal rate with its Wilson interval, and the share of
incoherent responses (counted apart, never as compliance). :func:`control_summary` compares a
condition with a distribution of matched random controls (each a rate): their mean and 5-95% range, and
the empirical p-value ``(1 + #{control <= observed}) / (1 + n)`` of a condition meant to *lower* refusal
(or ``>=`` for one meant to raise it). :func:`fraction_of` is the share of a reference intervention's
effect that a condition reaches, ``(clean - condition) / (clean - reference)``; :func:`fraction_interval`
its paired bootstrap interval over prompts (unbounded on a side when resamples exist in which the
reference removes nothing: a ratio over a small denominator is not a number to quote alone).

Every condition's responses are kept (:class:`ResponseAudit`) so that a reader can check the judge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from refusal_lens.infra import durable
from refusal_lens.core.metrics import rate
from refusal_lens.core.stats import empirical_pvalue
from refusal_lens.core.judge import judge

if TYPE_CHECKING:
    from refusal_lens.core.chat import EncodedPrompt
    from refusal_lens.core.edit import Edit
    from refusal_lens.core.intervene import Intervener
    from refusal_lens.core.refusal import RefusalTokens


def summarise(texts: Sequence[str]) -> dict:
    """The :func:`refusal_lens.core.metrics.rate` of judged responses."""
    return rate([judge(t).outcome for t in texts])


def control_summary(observed: float, controls: Sequence[float], alternative: str = "less") -> dict:
    """The random controls' distribution and the empirical p of ``observed`` against it."""
    values = np.asarray([c for c in controls if c == c], dtype=float)
    if len(values) == 0:
        return {"n": 0, "mean": None, "q05": None, "q95": None, "p_value": None, "values": []}
    return {"n": int(len(values)), "mean": float(values.mean()), "q05": float(np.quantile(values, 0.05)),
            "q95": float(np.quantile(values, 0.95)),
            "p_value": float(empirical_pvalue(observed, values, alternative)), "values": values.tolist()}


def scored_controls(intervener: Intervener, prompts: Sequence[EncodedPrompt], tokens: RefusalTokens,
                    headline: Sequence[Edit], controls: Sequence[Sequence[Edit]], generated: Sequence[float] = (),
                    bar=None, alternative: str = "less", known: Sequence[Sequence[float]] = (),
                    known_headline: Sequence[float] | None = None) -> dict:
    """Controls measured by the refusal score, one forward pass per prompt (or read from a generation: ``known``): the
    mean refusal score of ``prompts`` under each control's edits against the mean under ``headline``
    (:func:`control_summary`, the p of a lower score; ``alternative="greater"`` for an edit meant to raise refusal).
    ``generated``: the generated refusal rates of the first controls, for the calibration on them: the Spearman
    correlation over controls of the generated rate with the mean score, and the score-based p on that subset (to
    set beside the generated p).

    ``known``: the per-prompt scores of the first controls on ``prompts`` already computed (the first step of their
    generation, :meth:`Runs.scored`), and ``known_headline`` the headline's: no forward pass is run for those."""
    from refusal_lens.core.refusal import refusal_score
    from refusal_lens.core.stats import spearman
    from refusal_lens.core.stem import Stems

    stems = Stems()  # every pass runs on ``prompts``: one whose edits start at layer l > 0 starts there

    def mean_score(edits, given: Sequence[float] | None = None) -> float:
        if given is not None:
            value = float(torch.tensor(given, dtype=torch.float32).mean()) if len(given) else float("nan")
        else:
            value = float(refusal_score(intervener.last_logits(prompts, edits, stems=stems), tokens).mean())
        if bar is not None:
            bar.update(1)
        return value

    own = mean_score(headline, known_headline)
    values = [mean_score(edits, known[k] if k < len(known) else None) for k, edits in enumerate(controls)]
    if own != own:  # no score for the headline (e.g. no prompts): nothing to compare
        return {"measure": "mean refusal score", "headline_mean_score": None, "n_prompts": len(prompts),
                "scores": values, **control_summary(float("inf"), [], alternative)}
    out = {"measure": "mean refusal score", "headline_mean_score": own, "n_prompts": len(prompts),
           "scores": values,  # per control, in order (control k), NaN kept; control_summary's values drop NaN
           "from_generation": len(known) + (known_headline is not None),  # scores read from generations' first step
           **control_summary(own, values, alternative)}
    if generated:
        m = len(generated)
        pairs = [(r, v) for r, v in zip(generated, values[:m]) if v == v]
        out["calibration"] = {"n_controls": len(pairs),
                              "spearman_rate_vs_score": spearman(*zip(*pairs)) if pairs else None,
                              "p_score_on_generated": control_summary(own, values[:m], alternative)["p_value"]}
    return out


def without_values(controls: dict) -> dict:
    """A control summary without its per-control lists (``values``, ``scores``): what a summary quotes."""
    return {k: v for k, v in controls.items() if k not in ("values", "scores")}


def fraction_of(clean: float, condition: float, reference: float) -> float | None:
    """``(clean - condition) / (clean - reference)``; None when the reference moves nothing."""
    den = clean - reference
    if not den or den != den:
        return None
    return (clean - condition) / den


def fraction_interval(clean: Sequence[float], condition: Sequence[float], reference: Sequence[float],
                      draws: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of :func:`fraction_of` over prompts, from per-prompt outcomes (1 refused,
    0 not) of the three conditions on the same prompts, resampled together. A resample in which the
    reference removes nothing gives an infinite share (of the sign of the condition's effect), so a weak
    reference gives an unbounded interval, returned as None on that side."""
    c, x, r = (np.asarray(v, dtype=float) for v in (clean, condition, reference))
    if not (len(c) == len(x) == len(r)) or len(c) == 0:
        raise ValueError("fraction_interval needs the same prompts, at least one, in every condition")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), (draws, len(c)))
    num = c[idx].mean(1) - x[idx].mean(1)
    den = c[idx].mean(1) - r[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.sign(num) * np.inf)
    vals = vals[~((den <= 0) & (num == 0))]  # neither moved anything: no share to speak of
    if len(vals) == 0:
        return None, None
    with np.errstate(invalid="ignore"):  # a quantile between two infinite shares is unbounded too
        lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo) if np.isfinite(lo) else None), (float(hi) if np.isfinite(hi) else None)


def audit_outcomes(path: Path, conditions: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """Per condition (of those asked for; None = every one, in the order they first appear), ``{prompt_id: outcome}``
    from a stage's response audit."""
    wanted = None if conditions is None else set(conditions)
    out: dict[str, dict[str, str]] = {c: {} for c in conditions} if conditions is not None else {}
    with Path(path).open() as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if wanted is None or row["condition"] in wanted:
                out.setdefault(row["condition"], {})[row["prompt_id"]] = row["outcome"]
    return out


def refused_by_prompt(path: Path, conditions: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per condition (of those asked for), ``{prompt_id: 1 if refused else 0}`` from a stage's response audit."""
    return {c: {pid: int(o == "refused") for pid, o in by.items()} for c, by in audit_outcomes(path, conditions).items()}


def paired_fraction_interval(path: Path, clean: str, condition: str, reference: str, draws: int = 2000,
                             seed: int = 0, level: float = 0.95) -> dict | None:
    """:func:`fraction_interval` of three conditions of a response audit, paired by prompt id (the prompts
    every one of them answered); None when the audit holds none of them in common."""
    got = refused_by_prompt(path, [clean, condition, reference])
    ids = sorted(set(got[clean]) & set(got[condition]) & set(got[reference]))
    if not ids:
        return None
    lo, hi = fraction_interval([got[clean][i] for i in ids], [got[condition][i] for i in ids],
                               [got[reference][i] for i in ids], draws, seed, level)
    return {"ci": [lo, hi], "n": len(ids), "level": level, "draws": draws}


@dataclass
class ResponseAudit:
    """Every response of every condition of a stage, written as JSON lines (one file per stage part)."""

    path: Path
    rows: list[dict] = field(default_factory=list)

    def add(self, condition: str, prompt_ids: Sequence[str], texts: Sequence[str], **extra) -> None:
        for pid, text in zip(prompt_ids, texts):
            j = judge(text)
            self.rows.append({"condition": condition, "prompt_id": pid, "response": text, "outcome": j.outcome,
                              "rule": j.rule, **extra})

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))


@dataclass
class Condition:
    """One generation condition: its name, prompts (and their ids), edits and what to record with it."""

    name: str
    prompts: Sequence[EncodedPrompt]
    ids: Sequence[str]
    edits: Sequence[Edit]
    extra: dict


def chunks(conditions: Sequence[Condition], rows: int) -> list[Sequence[Condition]]:
    """Consecutive runs of conditions holding at least ``rows`` prompts together (the last may hold fewer): each
    fills a generation batch of that size."""
    out, start, n = [], 0, 0
    for i, c in enumerate(conditions):
        n += len(c.prompts)
        if n >= rows:
            out.append(conditions[start : i + 1])
            start, n = i + 1, 0
    if start < len(conditions):
        out.append(conditions[start:])
    return out


class Runs:
    """Conditions generated in shared batches (:meth:`Intervener.generate_conditions`), as many at a time as fill
    one generation batch (:func:`chunks`); every response goes to the audit, each condition gets its summary."""

    def __init__(self, intervener: Intervener, max_new_tokens: int, audit: ResponseAudit, bar=None):
        self.intervener, self.max_new_tokens, self.audit, self.bar = intervener, max_new_tokens, audit, bar

    def __call__(self, conditions: Sequence[Condition]) -> list[dict]:
        return self.scored(conditions)[0]

    def scored(self, conditions: Sequence[Condition], tokens: RefusalTokens | None = None
               ) -> tuple[list[dict], list[list[float]] | None]:
        """The summaries, and with ``tokens`` each condition's per-prompt refusal scores at the first response
        position, read from its generation's first step (:meth:`Intervener.generate_scored`; None without)."""
        out: list[dict] = []
        scores: list[list[float]] = []
        for chunk in chunks(conditions, self.intervener.generation_batch_size):
            responses, first = self.intervener.generate_conditions_scored([(c.prompts, c.edits) for c in chunk],
                                                                          self.max_new_tokens, tokens)
            for i, (c, ids) in enumerate(zip(chunk, responses)):
                texts = self.intervener.decode(ids)
                self.audit.add(c.name, c.ids, texts, **c.extra)
                out.append(summarise(texts))
                if first is not None:
                    scores.append(first[i])
            if self.bar is not None:
                self.bar.update(len(chunk))
        return out, (scores if tokens is not None else None)


def audited(path: Path, make):
    """``make(audit)`` with a fresh :class:`ResponseAudit` of ``path``, written once ``make`` returns."""
    audit = ResponseAudit(path)
    value = make(audit)
    audit.write()
    return value
