"""One mechanism or many, by circuit similarity: the similarity test of every pair of groups, on test prompts.

Each group (label x category, refused prompts of the **test** split) gives per-prompt node effects: the
features' effects per site (the content class divided by the prompt's content tokens, so that a long prompt
does not weigh more, plus each post-instruction class), measured on test prompts; no node is selected on
them. Pairs are tested with :func:`refusal_lens.core.stats.similarity_test` (a permutation null that
swaps prompts between the groups, split-half noise ceilings, an equivalence bound for ``shared``) and
Benjamini-Hochberg across each table (toxic x toxic, safe x safe, safe x toxic, and the pooled safe x toxic
pair); a group below ``analysis.min_prompts`` test prompts is ``insufficient``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from safetensors.torch import load_file

from refusal_lens.config import Config
from refusal_lens.core.stats import VERDICTS, similarity_table
from refusal_lens.run.folder import RunFolder

TABLES = (("toxic", "toxic"), ("safe", "safe"), ("safe", "toxic"))


def per_site_effects(features: torch.Tensor, n_content: Sequence[int]) -> np.ndarray:
    """``[n, classes, F]`` effects -> ``[n, classes * F]`` with the content class per content token."""
    x = features.double().clone()
    x[:, 0] /= torch.tensor(np.maximum(np.asarray(n_content, dtype=float), 1.0), dtype=torch.float64)[:, None]
    return x.reshape(len(x), -1).numpy()


def similarity_tables(effects: dict[str, np.ndarray], categories: Sequence[str], *, alpha: float, min_prompts: int,
                      shared_margin: float, permutations: int, draws: int, seed: int) -> list[dict]:
    """Every pair of the three tables and the pooled pair, tested; ``effects``: group key -> ``[n, nodes]``."""
    rows = []
    for la, lb in TABLES:
        pairs = {}
        for i, ca in enumerate(categories):
            for j, cb in enumerate(categories):
                if la == lb and j <= i:
                    continue
                ka, kb = f"{la}/{ca}", f"{lb}/{cb}"
                if ka in effects and kb in effects:
                    pairs[(ka, kb)] = (effects[ka], effects[kb])
        rows += _tested(pairs, f"{la} x {lb}", alpha, min_prompts, shared_margin, permutations, draws, seed)
    if "safe/all" in effects and "toxic/all" in effects:
        rows += _tested({("safe/all", "toxic/all"): (effects["safe/all"], effects["toxic/all"])}, "pooled safe x toxic",
                        alpha, min_prompts, shared_margin, permutations, draws, seed)
    return rows


def _tested(pairs, table, alpha, min_prompts, shared_margin, permutations, draws, seed) -> list[dict]:
    if not pairs:
        return []
    results = similarity_table(pairs, rng=seed, n_permutations=permutations, n_draws=draws, alpha=alpha,
                               shared_margin=shared_margin, min_prompts=min_prompts)
    out = []
    for (a, b), r in results.items():
        d = r.to_dict()
        out.append({"table": table, "a": a, "b": b, **{k: d.get(k) for k in (
            "similarity", "similarity_full", "ceiling_a", "ceiling_b", "normalised", "normalised_ci", "ci_level",
            "p_value", "q_value", "p_shared", "q_shared", "p_below", "q_below", "verdict", "reason", "n_a", "n_b")}})
    return out


def verdict_counts(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        c = out.setdefault(r["table"], {v: 0 for v in VERDICTS})
        c[r["verdict"]] += 1
    return out


def circuit_similarity(run: RunFolder, groups: dict[str, dict], cfg: Config) -> list[dict]:
    """Every pair's similarity test on the test prompts' per-prompt effects of each group (``[]`` when the discover
    stage wrote no test effects)."""
    a = cfg.analysis
    path = run.paths.circuits.effects_of("test")
    if not path.is_file():
        return []
    prompts = {p["prompt_id"]: p for p in run.attributed_prompts()}
    t = load_file(str(path))
    index = {int(r): i for i, r in enumerate(t["rows"].tolist())}
    by_index = {p["index"]: p for p in prompts.values()}
    effects = {}
    for key, doc in groups.items():
        rows = [index[p["index"]] for pid in doc["prompt_ids"]["test"] if (p := prompts.get(pid)) and p["index"] in index]
        if rows:
            n_content = [by_index[t["rows"][r].item()]["n_content_tokens"] for r in rows]
            effects[key] = per_site_effects(t["features"][rows], n_content)
    cats = sorted({doc["category"] for doc in groups.values() if doc["category"] != "all"})
    return similarity_tables(effects, cats, alpha=a.alpha, min_prompts=a.min_prompts, shared_margin=a.shared_margin,
                             permutations=a.permutations, draws=a.interval_draws, seed=cfg.circuits.seed)
