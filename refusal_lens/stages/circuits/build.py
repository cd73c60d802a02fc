"""Step 3 of discover: one signed circuit per prompt group — its refusal-promoting and refusal-suppressing features
ranked on discovery (``circuits.top_k`` each), their test effects with bootstrap intervals, and its error nodes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from refusal_lens.config import Config
from refusal_lens.stages.circuits.effects import SplitEffects
from refusal_lens.stages.circuits.inputs import Group, Inputs
from refusal_lens.stages.circuits.nodes import ERROR, NodeSpace
from refusal_lens.stages.circuits.select import Ranking, promoting, suppressing

SCHEMA_VERSION = 2


def bootstrap_ci(values: torch.Tensor, n_boot: int, seed: int, level: float = 0.95) -> np.ndarray:
    """``values`` ``[n_prompts, k]`` -> ``[k, 2]`` percentile interval of the mean over prompts resampled."""
    n, k = values.shape
    if n == 0:
        return np.full((k, 2), np.nan)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    means = counts @ values.double() / n
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return torch.quantile(means, torch.tensor([lo, hi], dtype=torch.float64), dim=0).T.numpy()


def _node_records(space: NodeSpace, inputs: Inputs, ranking: Ranking, test_feats: torch.Tensor, n_boot: int,
                  seed: int) -> list[dict]:
    feats = ranking.features
    if not feats:
        return []
    cols = test_feats[:, :, feats] if len(test_feats) else torch.zeros(0, space.n_classes, len(feats))
    totals = cols.sum(1)
    ci = bootstrap_ci(totals, n_boot, seed)
    out = []
    for k, (i, score) in enumerate(zip(feats, ranking.scores)):
        hook, j = space.locate(i)
        per_class = cols[:, :, k].mean(0).tolist() if len(cols) else None
        out.append({"id": space.feature_id(i), "hook": hook, "feature": j, "kind": "feature", "rank": k + 1,
                    "effect_discovery": float(score),
                    "effect_test": float(totals[:, k].mean()) if len(totals) else None,
                    "ci_low": float(ci[k, 0]), "ci_high": float(ci[k, 1]),
                    "effect_test_by_site": dict(zip(space.class_names(), per_class)) if per_class else None,
                    "cosine_with_direction": float(inputs.cosines[i])})
    return out


def build_circuits(inputs: Inputs, groups: Sequence[Group], effects: dict[str, SplitEffects], cfg: Config) -> dict[str, dict]:
    """One circuit per group: its promoting and suppressing features (ranked on discovery, ``top_k`` each)
    with test effects and intervals, and its error nodes."""
    c = cfg.circuits
    space = inputs.space
    out = {}
    for g in groups:
        d_feats, d_errs = effects["discovery"].of(g.rows["discovery"])
        t_feats, t_errs = effects["test"].of(g.rows["test"]) if g.rows["test"] else (torch.zeros(0), torch.zeros(0))
        total = d_feats.sum(1).mean(0)
        prom, supp = promoting(total), suppressing(total)
        prom.features, prom.scores = prom.features[: c.top_k], prom.scores[: c.top_k]
        supp.features, supp.scores = supp.features[: c.top_k], supp.scores[: c.top_k]
        err_d = d_errs.mean(0)
        err_ci = bootstrap_ci(t_errs, c.bootstrap, c.seed) if len(t_errs) else np.full((len(space.hooks), 2), np.nan)
        errors = [{"id": space.error_id(h), "hook": h, "feature": None, "kind": ERROR,
                   "effect_discovery": float(err_d[k]),
                   "effect_test": float(t_errs[:, k].mean()) if len(t_errs) else None,
                   "ci_low": float(err_ci[k, 0]), "ci_high": float(err_ci[k, 1])} for k, h in enumerate(space.hooks)]
        out[g.key] = {
            "schema_version": SCHEMA_VERSION, "label": g.label, "category": g.category,
            "n_prompts": {s: len(r) for s, r in g.rows.items()},
            "prompt_ids": {s: [inputs.data.rows[i]["prompt_id"] for i in r] for s, r in g.rows.items()},
            "metric_clean_mean": {s: float(effects[s].metric[[effects[s].rows.index(i) for i in r]].mean()) if r else None
                                  for s, r in g.rows.items()},
            "hooks": list(space.hooks),
            "promoting": _node_records(space, inputs, prom, t_feats, c.bootstrap, c.seed),
            "suppressing": _node_records(space, inputs, supp, t_feats, c.bootstrap, c.seed + 1),
            "error_nodes": errors,
        }
    return out

