"""How well the attribution estimates agree with exact patching, on test prompts, by stratum.

Nodes are drawn in three strata of (nearly) equal size so that a few large nodes do not decide the
correlation: **error nodes** (one per spliced hook), the **top** features by |estimate| (AtP, mean over the
agreement prompts) and **random** features drawn uniformly among those active on these prompts. Each node
is patched exactly (one forward pass per node, every site, active positions only, to its baseline; error
nodes: the whole error term to its class mean) on every agreement prompt. Per stratum, per hook type and
overall, over the (node, prompt) pairs: Pearson and Spearman correlation, sign agreement (share of pairs
whose estimate has the sign of the exact effect, among pairs with a nonzero exact effect) and the median
relative error ``|estimate - exact| / |exact|``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

import torch
from tqdm.auto import tqdm

from refusal_lens.config import Config
from refusal_lens.core.hooks import parse_hook_name
from refusal_lens.core.stats import pearson, spearman
from refusal_lens.core.intervene import make_batch
from refusal_lens.stages.circuits.nodes import NodeSpace

if TYPE_CHECKING:
    from refusal_lens.stages.circuits.attribution import Runner
    from refusal_lens.stages.circuits.inputs import Inputs


def stats(est: np.ndarray, exact: np.ndarray, tiny: float = 1e-6) -> dict:
    est, exact = np.asarray(est, float).ravel(), np.asarray(exact, float).ravel()
    nz = np.abs(exact) > tiny
    return {"n": int(len(est)), "pearson": pearson(est, exact), "spearman": spearman(est, exact),
            "sign_agreement": float(np.mean(np.sign(est[nz]) == np.sign(exact[nz]))) if nz.any() else None,
            "median_relative_error": float(np.median(np.abs(est[nz] - exact[nz]) / np.abs(exact[nz])))
            if nz.any() else None}


def sample_features(space: NodeSpace, estimate_mean: np.ndarray, active: Sequence[int], n: int,
                    rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(top ``n`` features by |estimate|, ``n`` random active features outside them)."""
    top = [int(i) for i in np.argsort(-np.abs(estimate_mean), kind="stable")[:n] if estimate_mean[i] != 0]
    pool = np.asarray([i for i in active if i not in set(top)])
    rand = [int(i) for i in rng.choice(pool, size=min(n, len(pool)), replace=False)] if len(pool) else []
    return top, rand


def summarise(space: NodeSpace, records: Sequence[dict], methods: Sequence[str]) -> dict:
    """``records``: one per node: ``{"stratum", "hook", "node", "exact": [prompts], <method>: [prompts]}``."""
    out: dict = {"methods": {}, "n_nodes": len(records),
                 "n_prompts": len(records[0]["exact"]) if records else 0}
    types = {h: (parse_hook_name(h).hook_type if parse_hook_name(h) else h) for h in space.hooks}
    for m in methods:
        entry: dict = {}

        def pick(pred):
            sel = [r for r in records if pred(r)]
            if not sel:
                return {"n": 0}
            return stats(np.concatenate([r[m] for r in sel]), np.concatenate([r["exact"] for r in sel]))

        entry["overall"] = pick(lambda r: True)
        entry["strata"] = {s: pick(lambda r, s=s: r["stratum"] == s) for s in ("error", "top", "random")}
        entry["by_hook_type"] = {t: pick(lambda r, t=t: types[r["hook"]] == t) for t in sorted(set(types.values()))}
        entry["node_means"] = stats(np.asarray([np.mean(r[m]) for r in records]),
                                    np.asarray([np.mean(r["exact"]) for r in records]))
        out["methods"][m] = entry
    out["points"] = [{"node": r["node"], "stratum": r["stratum"], "exact": float(np.mean(r["exact"])),
                      **{m: float(np.mean(r[m])) for m in methods}} for r in records]
    return out


def validate_agreement(runner: Runner, inputs: Inputs, rows: Sequence[int], tokenizer, cfg: Config,
                       rng: np.random.Generator, show_progress: bool) -> dict:
    """Exact patching against the estimators on up to ``agreement_prompts`` test prompts, by stratum."""
    c = cfg.circuits
    space, data = inputs.space, inputs.data
    chosen = sorted(data.hash_order(rows)[: c.agreement_prompts])
    enc = data.encoded(tokenizer, cfg.inference.max_prompt_tokens, chosen)
    batches = [make_batch(enc[s : s + c.batch_size], chosen[s : s + c.batch_size], tokenizer.pad_token_id,
                          device=runner.device) for s in range(0, len(chosen), c.batch_size)]
    t0 = time.perf_counter()
    est = {m: [] for m in c.agreement_methods}
    cleans = []
    for b in batches:
        if "atp" in c.agreement_methods:  # AtP's gradients come with the clean values
            m, values, grads = runner.clean_and_gradients(b)
        else:
            (m, values), grads = runner.clean(b), None
        cleans.append(m)
        for name in c.agreement_methods:
            e = runner.atp(b, values, grads) if name == "atp" else runner.ig(b, values, c.ig_steps)
            est[name].append(e)
    atp_feats = torch.cat([e.features for e in est[c.agreement_methods[0]]]).sum(1)  # [n, F]
    fired = np.flatnonzero((atp_feats != 0).any(0).numpy())
    top, rand = sample_features(space, atp_feats.mean(0).numpy(), fired, c.agreement_nodes, rng)
    records = []
    nodes = [("error", k) for k in range(len(space.hooks))] + [("top", i) for i in top] + [("random", i) for i in rand]
    for stratum, i in tqdm(nodes, desc="exact patching (agreement)", disable=not show_progress):
        exact = []
        for b, m in zip(batches, cleans):
            if stratum == "error":
                edit_m = runner.exact_error(b, m, i)
            else:
                edit_m = runner.exact_feature(b, m, i)
            exact.append(edit_m)
        rec = {"stratum": stratum, "hook": space.hooks[i] if stratum == "error" else space.locate(i)[0],
               "node": space.error_id(space.hooks[i]) if stratum == "error" else space.feature_id(i),
               "exact": torch.cat(exact).numpy()}
        for name in c.agreement_methods:
            if stratum == "error":
                rec[name] = torch.cat([e.errors[:, i] for e in est[name]]).numpy()
            else:
                rec[name] = torch.cat([e.features[:, :, i].sum(1) for e in est[name]]).numpy()
        records.append(rec)
    out = summarise(space, records, c.agreement_methods)
    out.update({"prompt_ids": [data.rows[i]["prompt_id"] for i in chosen], "seconds": time.perf_counter() - t0,
                "ig_steps": c.ig_steps if "ig" in c.agreement_methods else None})
    return out

