"""Validation of circuits against real interventions.

* **Agreement**: for a sample of nodes per hook (the hook's error node, the top nodes by |AtP| and
  random active nodes), the exact effect (one forward pass per node) against each estimator; Pearson
  and Spearman correlation of the per-node mean effects, per hook type and overall.
* **Faithfulness** of the circuit ``C`` (mean over prompts of the metric ``m``):
  ``(m(C) - m(empty)) / (m(model) - m(empty))`` where ``m(C)`` keeps only ``C`` (every other node of
  every spliced hook is patched to its baseline) and ``m(empty)`` patches every node. **Completeness**:
  ``(m(model) - m(model without C)) / (m(model) - m(empty))``, the share of the metric removed by
  patching ``C`` alone. Both are compared with random node sets of the same size drawn from the nodes
  with a nonzero estimated effect.
* **Behaviour**: greedy generation on refused toxic prompts with the circuit's features ablated (moved
  to their baseline at every position after the template's opening, generated tokens included),
  judged by the keyword rule; against random feature sets with the same count per hook, and against
  ablating the refusal direction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from refusal_lens.circuits.attribution import BaselineFn, Runner
from refusal_lens.circuits.nodes import NodeSpace, PromptBatch
from refusal_lens.collect import hf_generate
from refusal_lens.hooks import hf_hook_target, parse_hook_name

logger = logging.getLogger(__name__)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            r[x == v] = r[x == v].mean()
        return r

    return pearson(ranks(a), ranks(b)) if len(a) >= 2 else float("nan")


def sample_agreement_nodes(space: NodeSpace, estimate_mean: torch.Tensor, per_hook: int,
                           rng: np.random.Generator) -> list[tuple[int, int]]:
    """Per hook: its error node, the top ``per_hook // 2`` nodes by |estimate| and random active ones."""
    chosen: list[tuple[int, int]] = []
    for hook, part in space.split(estimate_mean).items():
        off = space.offset(hook)
        err = space.d_sae(hook)
        picked = {(s, err) for s in range(part.shape[0])} if per_hook > 0 else set()
        picked = {next(iter(sorted(picked)))} if space.per_position else picked  # one error node slot
        flat = part.abs().flatten()
        n = part.shape[1]
        for i in torch.argsort(flat, descending=True)[: max(per_hook // 2, 1)]:
            if flat[i] > 0:
                picked.add((int(i) // n, int(i) % n))
        active = [int(i) for i in torch.argwhere(flat > 0).flatten()]
        rng.shuffle(active)
        for i in active:
            if len(picked) >= per_hook + 1:
                break
            picked.add((i // n, i % n))
        chosen += [(s, off + j) for s, j in sorted(picked)]
    return chosen


def agreement(space: NodeSpace, nodes: Sequence[tuple[int, int]], exact: np.ndarray,
              estimates: dict[str, np.ndarray]) -> dict:
    """Correlations between node-mean exact effects and each estimator, per hook type and overall."""
    hook_of = [space.locate(i)[0] for _, i in nodes]
    is_err = np.asarray([space.locate(i)[1] == space.d_sae(space.locate(i)[0]) for _, i in nodes])
    types = {h: (parse_hook_name(h).hook_type if parse_hook_name(h) else h) for h in space.hooks}
    out: dict = {"n_nodes": len(nodes), "methods": {}}
    for name, est in estimates.items():
        feats = ~is_err
        entry = {"overall": {"pearson": pearson(est, exact), "spearman": spearman(est, exact), "n": len(nodes)},
                 "features": {"pearson": pearson(est[feats], exact[feats]), "spearman": spearman(est[feats], exact[feats]),
                              "n": int(feats.sum())},
                 "error_nodes": {"pearson": pearson(est[is_err], exact[is_err]),
                                 "spearman": spearman(est[is_err], exact[is_err]), "n": int(is_err.sum())},
                 "by_hook_type": {}, "by_hook": {}}
        for t in sorted(set(types.values())):
            idx = [k for k, h in enumerate(hook_of) if types[h] == t]
            entry["by_hook_type"][t] = {"pearson": pearson(est[idx], exact[idx]),
                                        "spearman": spearman(est[idx], exact[idx]), "n": len(idx)}
        for h in space.hooks:
            idx = [k for k, hh in enumerate(hook_of) if hh == h]
            entry["by_hook"][h] = {"pearson": pearson(est[idx], exact[idx]), "spearman": spearman(est[idx], exact[idx]),
                                   "n": len(idx)}
        out["methods"][name] = entry
    out["points"] = [
        {"node": space.node_id(i), "slot": s, "exact": float(exact[k]), **{m: float(v[k]) for m, v in estimates.items()}}
        for k, (s, i) in enumerate(nodes)
    ]
    return out


def _keep_only(runner: Runner, nodes: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    sel = runner.everything()
    for s, i in nodes:
        hook, local = runner.space.locate(i)
        sel[hook][s, local] = 0.0
    return sel


def _mean_metric(runner: Runner, batches: Sequence[PromptBatch], base: BaselineFn, selection) -> float:
    vals = [runner.patch(b, base, selection) for b in batches]
    return float(torch.cat(vals).mean())


def ratio(num: float, den: float, min_gap: float) -> float | None:
    """``num / den``, or None when ``|den| < min_gap`` (the model and the all-baseline run barely differ)."""
    return num / den if abs(den) >= min_gap and den == den else None


def faithfulness_curve(runner: Runner, batches: Sequence[PromptBatch], base: BaselineFn,
                       ranked: Sequence[tuple[int, int]], sizes: Sequence[int], n_random: int,
                       rng: np.random.Generator, m_clean: float, min_gap: float = 0.0) -> dict:
    """Faithfulness and completeness of the top-``k`` nodes for each size, with random controls."""
    m_empty = _mean_metric(runner, batches, base, runner.everything())
    denom = m_clean - m_empty
    pool = list(ranked)
    points = []
    for k in sorted({min(k, len(pool)) for k in sizes if k > 0}):
        circuit = pool[:k]
        m_keep = _mean_metric(runner, batches, base, _keep_only(runner, circuit))
        m_abl = _mean_metric(runner, batches, base, runner.select_nodes(circuit))
        rand = []
        for _ in range(n_random):
            pick = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
            rand.append(_mean_metric(runner, batches, base, _keep_only(runner, pick)))
        points.append({
            "size": k,
            "faithfulness": ratio(m_keep - m_empty, denom, min_gap),
            "completeness": ratio(m_clean - m_abl, denom, min_gap),
            "random_faithfulness": [ratio(r - m_empty, denom, min_gap) for r in rand],
            "metric_keep": m_keep, "metric_ablate": m_abl, "metric_random": rand,
        })
    return {"metric_clean": m_clean, "metric_empty": m_empty, "gap": denom, "points": points,
            "n_prompts": sum(len(b) for b in batches)}


def group_faithfulness(runner: Runner, batches: Sequence[PromptBatch], base: BaselineFn, group_of_row: dict[int, str],
                       circuits: dict[str, list[tuple[int, int]]], pools: dict[str, list[tuple[int, int]]],
                       m_clean: torch.Tensor, rng: np.random.Generator, min_gap: float) -> dict[str, dict]:
    """Faithfulness and completeness of several circuits at once, each on its own prompts.

    Prompts of different groups share batches: each prompt gets its own group's node selection (one
    forward pass per condition and batch: every node at baseline, keep only the circuit, ablate the
    circuit, keep only a random same-size node set drawn from the group's nodes with a nonzero effect).
    """
    random_sets = {g: [pool[j] for j in rng.choice(len(pool), size=min(len(circuits[g]), len(pool)), replace=False)]
                   for g, pool in pools.items()}
    sums: dict[str, dict[str, float]] = {g: {"clean": 0.0, "empty": 0.0, "keep": 0.0, "ablate": 0.0, "random": 0.0, "n": 0}
                                         for g in circuits}

    def per_row(batch: PromptBatch, make) -> dict[str, torch.Tensor]:
        masks = {g: make(g) for g in {group_of_row[row] for row in batch.rows}}  # once per group, not per prompt
        sel = {h: torch.zeros(len(batch), runner.space.window, runner.space.size(h)) for h in runner.space.hooks}
        for b, row in enumerate(batch.rows):
            for h, mask in masks[group_of_row[row]].items():
                sel[h][b] = mask
        return sel

    def keep(g):
        return _keep_only(runner, circuits[g])

    def ablate(g):
        chosen = runner.select_nodes(circuits[g])
        return {h: chosen.get(h, torch.zeros(runner.space.window, runner.space.size(h))) for h in runner.space.hooks}

    def keep_random(g):
        return _keep_only(runner, random_sets[g])

    for batch in batches:
        empty = runner.patch(batch, base, runner.everything())
        results = {"empty": empty}
        for name, make in (("keep", keep), ("ablate", ablate), ("random", keep_random)):
            results[name] = runner.patch(batch, base, per_row(batch, make))
        for b, row in enumerate(batch.rows):
            acc = sums[group_of_row[row]]
            acc["clean"] += float(m_clean[row])
            for name, vals in results.items():
                acc[name] += float(vals[b])
            acc["n"] += 1
    out = {}
    for g, acc in sums.items():
        n = max(acc["n"], 1)
        m = {k: v / n for k, v in acc.items() if k != "n"}
        gap = m["clean"] - m["empty"]
        out[g] = {
            "size": len(circuits[g]), "n_prompts": acc["n"], "gap": gap,
            "faithfulness": ratio(m["keep"] - m["empty"], gap, min_gap),
            "completeness": ratio(m["clean"] - m["ablate"], gap, min_gap),
            "random_faithfulness": ratio(m["random"] - m["empty"], gap, min_gap),
            **{f"metric_{k}": v for k, v in m.items()},
        }
    return out


# --------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------


def generate(loaded, batch: PromptBatch, max_new_tokens: int, hooks: Sequence = ()) -> list[str]:
    """Greedy responses of a batch with TransformerLens-style ``(hook name, fn(x, hook))`` edits active.

    Generation runs on the untouched Hugging Face model (KV cache; the collect stage's responses come
    from it too), with each edit attached as a PyTorch hook on the module that carries that hook point
    (:func:`refusal_lens.hooks.hf_hook_target`). TransformerLens's own ``generate`` is not used: with
    the KV cache it produced garbage after the first token on the embedded Qwen (measured).
    """
    handles = []

    def post(fn):
        def hook(module, args, output):  # noqa: ARG001
            if isinstance(output, tuple):
                return (fn(output[0], None), *output[1:])
            return fn(output, None)

        return hook

    def pre(fn):
        def hook(module, args, kwargs):  # noqa: ARG001
            if args:
                return (fn(args[0], None), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"], None)}

        return hook

    try:
        for name, fn in hooks:
            module, kind = hf_hook_target(loaded.hf_model, name)
            handles.append(module.register_forward_pre_hook(pre(fn), with_kwargs=True) if kind == "pre"
                           else module.register_forward_hook(post(fn)))
        new = hf_generate(loaded, batch.ids, batch.mask, max_new_tokens)
    finally:
        for h in handles:
            h.remove()
    return loaded.tokenizer.batch_decode(new, skip_special_tokens=True)


def feature_selection(runner: Runner, features: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Selection masks of features for generation: every window slot (all positions)."""
    sel: dict[str, torch.Tensor] = {}
    for _, i in features:
        hook, local = runner.space.locate(i)
        sel.setdefault(hook, torch.zeros(runner.space.window, runner.space.size(hook)))
        sel[hook][:, local] = 1.0
    return sel


def random_features_like(space: NodeSpace, features: Sequence[tuple[int, int]], active: dict[str, np.ndarray],
                         rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random features with the same count per hook, among each hook's active features."""
    out = []
    for hook in space.hooks:
        n = sum(1 for _, i in features if space.locate(i)[0] == hook)
        if n == 0:
            continue
        chosen = {space.locate(i)[1] for _, i in features if space.locate(i)[0] == hook}
        cands = np.asarray([j for j in active[hook] if j not in chosen]) if len(active[hook]) else np.arange(space.d_sae(hook))
        picks = rng.choice(cands, size=min(n, len(cands)), replace=False)
        out += [(0, space.offset(hook) + int(j)) for j in picks]
    return out
