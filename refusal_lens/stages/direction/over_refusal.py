"""The over-refusal experiment: ``r_over = mean(refused safe) - mean(refused toxic)`` at the selected layer and
position (discovery), ablated from every write and subtracted at the layer's input; the refusal rates of safe *and*
toxic test prompts under each: can over-refusal fall while correct refusal stays?"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from refusal_lens.core.behaviour import Condition, ResponseAudit, Runs
from refusal_lens.core.chat import EncodedPrompt
from refusal_lens.core.direction_edits import ablation_edits, addition_edits
from refusal_lens.core.intervene import Intervener
from refusal_lens.stages.direction.candidates import SiteCache, site_activations


def over_refusal(intervener: Intervener, r_over: torch.Tensor, layer: int, n_layers: int,
                 safe: Sequence[EncodedPrompt], safe_ids: Sequence[str], toxic: Sequence[EncodedPrompt],
                 toxic_ids: Sequence[str], max_new_tokens: int, audit: ResponseAudit,
                 show_progress: bool = True) -> dict:
    """Refusal of safe and toxic test prompts: clean, ``r_over`` ablated, ``r_over`` subtracted at ``layer``."""
    conditions = {"clean": [], "ablated": ablation_edits(r_over, n_layers),
                  "subtracted": addition_edits(r_over, layer, -1.0)}
    plan = [Condition(f"over_refusal/{name}/{side}", ps, pid, edits, {})
            for name, edits in conditions.items() for side, ps, pid in (("safe", safe, safe_ids), ("toxic", toxic, toxic_ids))]
    with tqdm(total=len(plan), desc="over-refusal", disable=not show_progress) as bar:
        summaries = Runs(intervener, max_new_tokens, audit, bar)(plan)
    out: dict = {}
    for c, s in zip(plan, summaries):
        _, name, side = c.name.split("/")
        out.setdefault(name, {})[side] = s
    return out


def over_refusal_experiment(cfg, fast, precise, data, layer, j, n_layers, max_new, audit, show_progress,
                            sites: SiteCache | None = None) -> dict:
    enc = lambda rows: data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens, rows)  # noqa: E731
    safe_ref = data.split_rows("discovery", "safe", refused=True)
    tox_ref = data.split_rows("discovery", "toxic", refused=True)
    if len(safe_ref) < 2 or len(tox_ref) < 2:
        return {"n_refused_safe": len(safe_ref), "n_refused_toxic": len(tox_ref),
                "note": "too few refused safe or toxic discovery prompts for an over-refusal direction"}
    r_over = (site_activations(precise, enc(safe_ref), layer, j, sites).mean(0)
              - site_activations(precise, enc(tox_ref), layer, j, sites).mean(0)).float()
    safe_test, tox_test = data.split_rows("test", "safe"), data.split_rows("test", "toxic")
    rows = over_refusal(fast, r_over, layer, n_layers, enc(safe_test), [data.rows[i]["prompt_id"] for i in safe_test],
                        enc(tox_test), [data.rows[i]["prompt_id"] for i in tox_test], max_new, audit, show_progress)
    return {"n_refused_safe": len(safe_ref), "n_refused_toxic": len(tox_ref), "norm": float(r_over.norm()),
            "conditions": rows}
