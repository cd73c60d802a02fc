"""The selected direction on the test split, in the reference's layout (Arditi et al. 2024, Table 1).

Greedy generation, judged (:mod:`refusal_lens.behaviour`; incoherent counted apart):

* harmful (toxic) test prompts: clean -> directional ablation -> ActAdd(-r) at the chosen layer; over all of
  them and over those the clean model refused (the headline: "refused harmful prompts");
* harmless test prompts: clean -> ActAdd(+r);
* controls: ``direction.random_directions`` random unit directions ablated (on the refused harmful prompts)
  and as many random vectors of ``|r|`` added (on the harmless prompts), each one a rate: a distribution,
  with the empirical p-value of the direction against it;
* on harmless prompts with their clean responses teacher-forced: the KL of the next-token distribution at
  the first response position and the cross-entropy (nats per token) of the responses, clean vs ablated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lens.analysis.stats import bootstrap_mean_ci
from refusal_lens.behaviour import ResponseAudit, control_summary, summarise
from refusal_lens.chat import EncodedPrompt
from refusal_lens.direction.edits import ablation_edits, addition_edits
from refusal_lens.intervene import Edit, Intervener


def generate_condition(intervener: Intervener, prompts: Sequence[EncodedPrompt], ids: Sequence[str],
                       max_new_tokens: int, edits: Sequence[Edit], name: str, audit: ResponseAudit,
                       **extra) -> tuple[dict, list[str]]:
    texts = intervener.decode(intervener.generate(prompts, max_new_tokens, edits))
    audit.add(name, ids, texts, **extra)
    return summarise(texts), texts


def random_units(d: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=gen)
    return v / v.norm(dim=-1, keepdim=True)


def evaluate_direction(intervener: Intervener, direction: torch.Tensor, layer: int, n_layers: int, *,
                       harmful: Sequence[EncodedPrompt], harmful_ids: Sequence[str], harmful_refused: Sequence[bool],
                       harmless: Sequence[EncodedPrompt], harmless_ids: Sequence[str],
                       harmless_responses: Sequence[Sequence[int]], max_new_tokens: int, n_random: int,
                       n_bootstrap: int, seed: int, audit: ResponseAudit, show_progress: bool = True) -> dict:
    """The test table; see the module docstring."""
    ablate = ablation_edits(direction, n_layers)
    rows: dict[str, dict] = {}
    refused_idx = [i for i, r in enumerate(harmful_refused) if r]
    conditions = [("harmful", "clean", harmful, harmful_ids, []), ("harmful", "ablated", harmful, harmful_ids, ablate),
                  ("harmful", "actadd_minus", harmful, harmful_ids, addition_edits(direction, layer, -1.0)),
                  ("harmless", "clean", harmless, harmless_ids, []),
                  ("harmless", "actadd_plus", harmless, harmless_ids, addition_edits(direction, layer, 1.0))]
    outcomes: dict[tuple[str, str], list[str]] = {}
    for side, name, prompts, ids, edits in tqdm(conditions, desc="direction evaluation", disable=not show_progress):
        summary, texts = generate_condition(intervener, prompts, ids, max_new_tokens, edits, f"{side}/{name}", audit)
        outcomes[(side, name)] = texts
        rows[f"{side}/{name}"] = summary
        if side == "harmful":
            rows[f"harmful_refused/{name}"] = summarise([texts[i] for i in refused_idx])
    out: dict = {"conditions": rows, "n_harmful": len(harmful), "n_harmful_refused": len(refused_idx),
                 "n_harmless": len(harmless), "layer": layer, "max_new_tokens": max_new_tokens}

    # controls: random directions ablated (refused harmful), random vectors of |r| added (harmless)
    refused_prompts = [harmful[i] for i in refused_idx]
    refused_ids = [harmful_ids[i] for i in refused_idx]
    units = random_units(direction.numel(), n_random, seed)
    ablated_rates, added_rates = [], []
    for k in tqdm(range(n_random), desc="direction random controls", disable=not show_progress or n_random == 0):
        if refused_prompts:
            s, _ = generate_condition(intervener, refused_prompts, refused_ids, max_new_tokens,
                                      ablation_edits(units[k], n_layers), "harmful_refused/random_ablated", audit,
                                      control=k)
            ablated_rates.append(s["refusal_rate"])
        s, _ = generate_condition(intervener, harmless, harmless_ids, max_new_tokens,
                                  addition_edits(units[k] * direction.norm(), layer, 1.0), "harmless/random_added",
                                  audit, control=k)
        added_rates.append(s["refusal_rate"])
    out["random_ablated"] = control_summary(rows["harmful_refused/ablated"]["refusal_rate"], ablated_rates, "less")
    out["random_added"] = control_summary(rows["harmless/actadd_plus"]["refusal_rate"], added_rates, "greater")

    # KL and CE on harmless prompts (clean responses teacher-forced), clean vs ablated
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
