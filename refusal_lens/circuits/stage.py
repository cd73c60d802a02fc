"""Stage 4, discover: refusal circuits over SAE features, selected on discovery, validated on test.

Table of contents (each step a function of objects, returning a typed result):

1. :func:`load_inputs` — the collected prompts and their split, the SAEs (the node space), the per-class
   baselines, the refusal direction of the direction stage;
2. :func:`attribute` — per-prompt node effects on the refusal score (AtP or IG, exact error nodes), on the
   discovery prompts (ranking) and on the test prompts (intervals, agreement, the analysis);
3. :func:`build_circuits` — signed circuits per label x category and pooled: refusal-promoting and
   refusal-suppressing nodes ranked on discovery, their effects and bootstrap intervals on test;
4. :func:`~refusal_lens.circuits.select.rankings` — the promoting features of each selection method;
5. validation on test: :func:`validate_agreement` (exact patching, by stratum),
   :func:`~refusal_lens.circuits.faithfulness.faithfulness_curve` (with random distributions),
   :func:`~refusal_lens.circuits.behaviour.behaviour` (the K-curve against random sets and the direction,
   induction);
6. :func:`circuit_edges` — edges of the pooled circuits (discovery);
7. :func:`write_outputs` — circuit files, ``summary.json``, figures.

Output folder (``circuits/``, schema in docs/circuits.md)::

    manifest.json, config.yaml, space.json
    effects/<split>.safetensors   per-prompt effects: features [n, classes, features], errors [n, hooks], metric
    effects/<split>-batch-*.safetensors + ledger.json   per-batch shards while the pass runs (resume point)
    prompts.json                  the attributed prompts (split, label, category, refused, clean metric)
    <label>/<category>.json       one circuit per label and category, and <label>/all.json (pooled)
    validation/agreement.json, faithfulness.json, behaviour.json, edges.json, responses.jsonl
    summary.json, figures/*.html

Every part is written once and skipped on rerun; ``--force`` starts over. Under torchrun the work runs on
rank 0 and the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from refusal_lens import durable
from refusal_lens.behaviour import ResponseAudit
from refusal_lens.circuits.agreement import sample_features, summarise
from refusal_lens.circuits.attribution import Runner
from refusal_lens.circuits.baselines import ClassMeans, means_for, refused_means
from refusal_lens.circuits.behaviour import behaviour
from refusal_lens.circuits.faithfulness import faithfulness_curve, ranked_nodes
from refusal_lens.circuits.nodes import ERROR, NodeSpace
from refusal_lens.circuits.select import Ranking, decoder_cosines, promoting, rankings, suppressing
from refusal_lens.collect import MANIFEST, Collected, load_collected
from refusal_lens.config import Config, config_to_dict
from refusal_lens.direction.io import SavedDirection, load_direction
from refusal_lens.distributed import Dist
from refusal_lens.errors import UserError
from refusal_lens.hooks import hook_sort_key, resolve_layer_specs
from refusal_lens.intervene import Intervener, make_batch
from refusal_lens.stage_folder import part, prepare
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
PARTS = ("attribution (discovery)", "attribution (test)", "circuits", "agreement", "faithfulness", "behaviour",
         "edges", "writing")


class CircuitError(UserError, RuntimeError):
    """Missing SAEs, activations or direction, a bad circuit setting, or a results folder from another config."""


@dataclass
class DiscoverResult:
    folder: Path
    summary: dict
    skipped: bool = False


@dataclass
class Inputs:
    data: Collected
    space: NodeSpace
    means: ClassMeans
    refused: ClassMeans | None  # None: no refused toxic discovery prompt (behaviour is skipped)
    direction: SavedDirection
    cosines: torch.Tensor  # [n_features] decoder cosine with the direction


@dataclass
class Group:
    label: str
    category: str  # a category, or "all"
    rows: dict[str, list[int]]  # split -> rows of the prompts table

    @property
    def key(self) -> str:
        return f"{self.label}/{self.category}"


@dataclass
class SplitEffects:
    rows: list[int]  # rows of the prompts table, in effect order
    features: torch.Tensor  # [n, n_classes, n_features]
    errors: torch.Tensor  # [n, n_hooks]
    metric: torch.Tensor  # [n]

    def of(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pos = {r: i for i, r in enumerate(self.rows)}
        idx = torch.tensor([pos[r] for r in rows], dtype=torch.long)
        return self.features[idx], self.errors[idx]


# --------------------------------------------------------------------------------------------
# 1. Inputs
# --------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise CircuitError(f"no {what} at {path}")
    return json.loads(path.read_text())


def circuit_hooks(cfg: Config, saes_dir: Path, n_layers: int) -> list[str]:
    """The spliced hooks: ``circuits.hooks`` (each must have an SAE), or every SAE passing the bar."""
    manifest = _read_json(saes_dir / MANIFEST, "finished SAEs (run `refusal-lens train-saes` first)")
    if manifest.get("status") != "complete":
        raise CircuitError(f"the SAEs in {saes_dir} are not finished: run `refusal-lens train-saes` with this config")
    quality = _read_json(saes_dir / "quality.json", "SAE quality table")
    trained = [row["hook"] for row in quality]
    if cfg.circuits.hooks:
        wanted = resolve_layer_specs(list(cfg.circuits.hooks), n_layers, valid_hooks=trained)
        missing = [h for h in wanted if h not in trained]
        if missing:
            raise CircuitError(f"circuits.hooks: no SAE for hook(s) {missing}; SAEs exist for {trained}. "
                               "Add them to sae.hooks and run train-saes.")
        return sorted(wanted, key=hook_sort_key)
    passing = [row["hook"] for row in quality if row["passes"]]
    if not passing:
        raise CircuitError(f"no SAE in {saes_dir} passes the quality bar; name hooks in circuits.hooks to use them anyway")
    return sorted(passing, key=hook_sort_key)


def load_saes(saes_dir: Path, hooks: Sequence[str], device) -> dict:
    from sae_lens import SAE

    saes = {}
    for h in hooks:
        sae = SAE.load_from_disk(str(saes_dir / h), device=str(device))
        sae.eval()
        for p in sae.parameters():
            p.requires_grad_(False)
        saes[h] = sae
    return saes


def load_inputs(cfg: Config, loaded, acts_dir: Path, saes_dir: Path, direction_dir: Path, hooks: Sequence[str]) -> Inputs:
    data = load_collected(acts_dir)
    n_post = int(data.manifest.get("post_instruction_tokens") or max(r["n_post_instruction_tokens"] for r in data.rows))
    space = NodeSpace(tuple(hooks), load_saes(saes_dir, hooks, loaded.device), n_post)
    c = cfg.circuits
    try:
        means = means_for(space, acts_dir, data, c.reference, c.baseline)
    except ValueError as err:
        raise CircuitError(str(err)) from None
    direction = load_direction(direction_dir)
    return Inputs(data, space, means, refused_means(space, acts_dir, data), direction,
                  decoder_cosines(space, direction.vector))


def prompt_groups(data: Collected, cfg: Config) -> tuple[list[Group], list[str]]:
    """Groups (label x category, and label x all) of the configured prompt selection, per split; notes on
    groups left out (no discovery prompts)."""
    c = cfg.circuits
    available = sorted({r["category"] for r in data.rows if r["label"] in c.labels})
    for cat in c.categories:
        if cat not in available:
            raise CircuitError(f"circuits.categories: category {cat!r} has no prompts; categories in the data: {available}")
    cats = list(c.categories) or available

    def chosen(r: dict) -> bool:
        return c.select == "all" or (bool(r["refused"]) if c.select == "refused" else not r["refused"])

    groups, skipped = [], []
    for label in c.labels:
        rows = {s: [i for i in data.split_rows(s, label) if chosen(data.rows[i]) and data.rows[i]["category"] in cats]
                for s in ("discovery", "test")}
        if not rows["discovery"]:
            skipped.append(f"{label}: no discovery prompts with circuits.select={c.select!r}")
            continue
        groups.append(Group(label, "all", rows))
        for cat in cats:
            sub = {s: [i for i in r if data.rows[i]["category"] == cat] for s, r in rows.items()}
            if sub["discovery"]:
                groups.append(Group(label, cat, sub))
            else:
                skipped.append(f"{label}/{cat}: no discovery prompts with circuits.select={c.select!r}")
    if not groups:
        raise CircuitError(f"no discovery prompts of circuits.labels={list(c.labels)} with circuits.select={c.select!r}")
    return groups, skipped


# --------------------------------------------------------------------------------------------
# 2. Attribution
# --------------------------------------------------------------------------------------------


def attribute(runner: Runner, data: Collected, rows: Sequence[int], tokenizer, cfg: Config, folder: Path, split: str,
              show_progress: bool, status: StatusFile | None = None) -> SplitEffects:
    """Per-prompt effects of every node on the refusal score, batch by batch (resumable, shards checked)."""
    c = cfg.circuits
    path = folder / f"{split}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return SplitEffects(t["rows"].tolist(), t["features"], t["errors"], t["metric"])
    folder.mkdir(parents=True, exist_ok=True)
    ledger = durable.Ledger(folder / "ledger.json")
    encoded = data.encoded(tokenizer, cfg.inference.max_prompt_tokens, rows)
    order = sorted(range(len(rows)), key=lambda i: (len(encoded[i].ids), rows[i]))
    chunks = [order[s : s + c.batch_size] for s in range(0, len(order), c.batch_size)]
    feats, errs, metric, done_rows = [], [], [], []
    for bi, chunk in enumerate(tqdm(chunks, desc=f"attribution ({c.method}, {split})", disable=not show_progress)):
        shard = folder / f"{split}-batch-{bi:04d}.safetensors"
        batch_rows = [rows[i] for i in chunk]
        if ledger.verified(shard):
            t = load_file(str(shard))
            if t["rows"].tolist() == batch_rows:
                feats.append(t["features"]), errs.append(t["errors"]), metric.append(t["metric"])
                done_rows += batch_rows
                continue
        batch = make_batch([encoded[i] for i in chunk], batch_rows, tokenizer.pad_token_id, device=runner.device)
        m, values = runner.clean(batch)
        eff = runner.atp(batch, values) if c.method == "atp" else runner.ig(batch, values, c.ig_steps)
        errors = runner.exact_errors(batch, m) if c.error_nodes == "exact" else eff.errors
        t = {"features": eff.features.detach().float().cpu().contiguous(),
             "errors": errors.detach().float().cpu().contiguous(), "metric": m.float().cpu(),
             "rows": torch.tensor(batch_rows)}
        durable.save_safetensors(t, shard)
        ledger.add(shard)
        feats.append(t["features"]), errs.append(t["errors"]), metric.append(t["metric"])
        done_rows += batch_rows
    out = SplitEffects(done_rows, torch.cat(feats) if feats else torch.zeros(0), torch.cat(errs) if errs else torch.zeros(0),
                       torch.cat(metric) if metric else torch.zeros(0))
    durable.save_safetensors({"rows": torch.tensor(out.rows), "features": out.features.contiguous(),
                              "errors": out.errors.contiguous(), "metric": out.metric.contiguous()}, path)
    return out


# --------------------------------------------------------------------------------------------
# 3. Circuits
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# 5. Validation on test
# --------------------------------------------------------------------------------------------


def _hash_order(data: Collected, rows: Sequence[int]) -> list[int]:
    return sorted(rows, key=lambda i: hashlib.sha256(data.rows[i]["prompt_id"].encode()).hexdigest())


def validate_agreement(runner: Runner, inputs: Inputs, rows: Sequence[int], tokenizer, cfg: Config,
                       rng: np.random.Generator, show_progress: bool) -> dict:
    """Exact patching against the estimators on up to ``agreement_prompts`` test prompts, by stratum."""
    c = cfg.circuits
    space, data = inputs.space, inputs.data
    chosen = sorted(_hash_order(data, rows)[: c.agreement_prompts])
    enc = data.encoded(tokenizer, cfg.inference.max_prompt_tokens, chosen)
    batches = [make_batch(enc[s : s + c.batch_size], chosen[s : s + c.batch_size], tokenizer.pad_token_id,
                          device=runner.device) for s in range(0, len(chosen), c.batch_size)]
    t0 = time.perf_counter()
    est = {m: [] for m in c.agreement_methods}
    cleans = []
    for b in batches:
        m, values = runner.clean(b)
        cleans.append(m)
        for name in c.agreement_methods:
            e = runner.atp(b, values) if name == "atp" else runner.ig(b, values, c.ig_steps)
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


# --------------------------------------------------------------------------------------------
# 6. Edges
# --------------------------------------------------------------------------------------------


def circuit_edges(runner: Runner, inputs: Inputs, circuit: dict, rows: Sequence[int], tokenizer, cfg: Config,
                  show_progress: bool) -> list[dict]:
    c = cfg.circuits
    space, data = inputs.space, inputs.data
    feats = [space.offset(n["hook"]) + n["feature"] for n in circuit["promoting"] + circuit["suppressing"]]
    chosen = sorted(_hash_order(data, rows)[: c.edge_prompts])
    enc = data.encoded(tokenizer, cfg.inference.max_prompt_tokens, chosen)
    total: dict[tuple[str, str], float] = {}
    for s in tqdm(range(0, len(chosen), c.batch_size), desc="edges", disable=not show_progress):
        b = make_batch(enc[s : s + c.batch_size], chosen[s : s + c.batch_size], tokenizer.pad_token_id,
                       device=runner.device)
        _, values = runner.clean(b)
        for u, d, w in runner.edges(b, values, feats):
            total[(u, d)] = total.get((u, d), 0.0) + w * len(b)
    weights = {k: v / max(len(chosen), 1) for k, v in total.items()}
    # the bar is relative to the largest edge between two features: edges between error nodes (whole
    # residual-stream remainders) are orders of magnitude larger and would hide the rest
    feature_edges = [abs(v) for (u, d), v in weights.items() if not (u.endswith("/" + ERROR) or d.endswith("/" + ERROR))]
    top = max(feature_edges or [abs(v) for v in weights.values()] or [0.0])
    return [{"from": u, "to": d, "effect": w} for (u, d), w in sorted(weights.items(), key=lambda kv: -abs(kv[1]))
            if top > 0 and abs(w) >= c.edge_threshold * top]


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _fingerprint(cfg: Config, saes_dir: Path, direction_dir: Path, hooks: Sequence[str]) -> str:
    c = config_to_dict(cfg.circuits)
    c.pop("num_threads")
    sae_fp = json.loads((saes_dir / MANIFEST).read_text()).get("fingerprint")
    dir_fp = json.loads((direction_dir / MANIFEST).read_text()).get("fingerprint") \
        if (direction_dir / MANIFEST).is_file() else None
    blob = json.dumps({"circuits": c, "hooks": list(hooks), "saes": sae_fp, "direction": dir_fp,
                       "intervention_dtype": cfg.model.intervention_dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def part_rng(seed: int, *part: str) -> np.random.Generator:
    """A generator of its own per resumable part, so that a resumed run draws what an uninterrupted one draws."""
    digest = hashlib.sha256("\x1f".join((str(seed), *part)).encode()).hexdigest()
    return np.random.default_rng(int(digest[:16], 16))


def run_discover_stage(cfg: Config, loaded, acts_dir: Path, saes_dir: Path, direction_dir: Path, out_dir: Path, *,
                       force: bool = False, dist: Dist = Dist(), show_progress: bool = True,
                       status: StatusFile | None = None) -> DiscoverResult:
    status = status if status is not None else StatusFile(None)
    data = load_collected(acts_dir)
    hooks = circuit_hooks(cfg, saes_dir, int(data.manifest["n_layers"]))
    if not (direction_dir / "direction.json").is_file():
        raise CircuitError(f"no refusal direction in {direction_dir}: run `refusal-lens direction` first")
    prompt_groups(data, cfg)  # bad settings fail before anything is written
    if dist.is_main:
        manifest = prepare(out_dir, _fingerprint(cfg, saes_dir, direction_dir, hooks), cfg, force, CircuitError, 'circuits')
    dist.barrier()
    if not dist.is_main:
        dist.barrier()
        return DiscoverResult(out_dir, json.loads((out_dir / "summary.json").read_text()))
    if manifest.get("status") == "complete" and (out_dir / "summary.json").is_file():
        logger.info("circuits already complete in %s (--force redoes them)", out_dir)
        return DiscoverResult(out_dir, json.loads((out_dir / "summary.json").read_text()), skipped=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.circuits.num_threads)
    try:
        from refusal_lens.intervene import frozen

        with frozen(loaded.model):
            summary = _discover(cfg, loaded, acts_dir, saes_dir, direction_dir, out_dir, hooks, show_progress, status)
    finally:
        torch.set_num_threads(threads)
    dist.barrier()
    return DiscoverResult(out_dir, summary)


def _discover(cfg, loaded, acts_dir, saes_dir, direction_dir, out_dir, hooks, show_progress, status) -> dict:
    c = cfg.circuits
    t_start = time.perf_counter()
    tok = loaded.tokenizer
    status.progress(0, len(PARTS), "part")

    def done(k: int) -> None:
        status.progress(k + 1)
        if k + 1 < len(PARTS):
            status.set(message=f"discover: {PARTS[k + 1]}")

    status.set(message=f"discover: {PARTS[0]}")
    inputs = load_inputs(cfg, loaded, acts_dir, saes_dir, direction_dir, hooks)
    space, data = inputs.space, inputs.data
    groups, skipped = prompt_groups(data, cfg)
    durable.write_json(out_dir / "space.json", {
        "hooks": list(space.hooks), "d_sae": {h: space.d_sae(h) for h in space.hooks}, "n_features": space.n_features,
        "site_classes": space.class_names(), "method": c.method, "baseline": c.baseline, "reference": c.reference,
        "error_nodes": c.error_nodes, "direction": inputs.direction.info["hook"],
        "reference_tokens": {h: inputs.means.counts[h] for h in space.hooks}})
    runner = Runner(loaded.model, space, data.tokens, inputs.means, c.baseline)

    # ---- 2. attribution: discovery (ranking) and test (intervals, agreement, analysis)
    pooled = {g.label: g for g in groups if g.category == "all"}
    effects = {}
    for k, split in enumerate(("discovery", "test")):
        rows = sorted({i for g in pooled.values() for i in g.rows[split]})
        effects[split] = attribute(runner, data, rows, tok, cfg, out_dir / "effects", split, show_progress, status)
        done(k)
    t_attr = time.perf_counter() - t_start
    durable.write_json(out_dir / "prompts.json", [
        {"index": i, "prompt_id": r["prompt_id"], "split": r["split"], "category": r["category"], "label": r["label"],
         "refused": bool(r["refused"]), "refusal_score": r["refusal_score"],
         "n_content_tokens": r["n_prompt_tokens"] - r["n_opening_tokens"] - r["n_post_instruction_tokens"]}
        for i, r in enumerate(data.rows) if i in set(effects["discovery"].rows) | set(effects["test"].rows)], indent=1)

    # ---- 3-4. circuits and the selection methods' rankings
    circuits = build_circuits(inputs, groups, effects, cfg)
    toxic = pooled.get("toxic") or next(iter(pooled.values()))
    d_feats, _ = effects["discovery"].of(toxic.rows["discovery"])
    ranks = rankings(space, d_feats.sum(1).mean(0), inputs.direction.vector, c.cosine_preselect, c.methods)
    done(2)

    # ---- 5. validation on test
    val = out_dir / "validation"
    val.mkdir(exist_ok=True)
    test_rows = toxic.rows["test"]
    agree = None
    if test_rows:
        agree = part(val / "agreement.json", lambda: validate_agreement(
            runner, inputs, test_rows, tok, cfg, part_rng(c.seed, "agreement"), show_progress))
    done(3)
    fast = Intervener(loaded, c.intervention_batch_size)

    def faith(g: Group) -> dict:
        feats, errs = effects["discovery"].of(g.rows["discovery"])
        ranked = ranked_nodes(space, feats.sum(1).mean(0), errs.mean(0), c.faithfulness_order)
        chosen = sorted(_hash_order(data, g.rows["test"])[: c.faithfulness_prompts])
        return faithfulness_curve(fast, space, inputs.means, data.tokens,
                                  data.encoded(tok, cfg.inference.max_prompt_tokens, chosen), ranked,
                                  c.faithfulness_sizes, c.random_controls, c.faithfulness_min_gap, c.bootstrap,
                                  part_rng(c.seed, "faithfulness", g.key), show_progress) | {
            "prompt_ids": [data.rows[i]["prompt_id"] for i in chosen]}

    faithfulness = part(val / "faithfulness.json",
                         lambda: {g.key: faith(g) for g in pooled.values()
                                  if g.rows["test"] and g.label in c.faithfulness_labels})
    done(4)
    max_new = c.max_new_tokens or cfg.inference.max_new_tokens
    harmless = data.split_rows("test", "harmless", refused=False)
    if c.behaviour_prompts is not None:
        harmless = sorted(_hash_order(data, harmless)[: c.behaviour_prompts])

    val_rows = data.split_rows("validation", "toxic", refused=True)
    if c.behaviour_prompts is not None:
        test_rows = sorted(_hash_order(data, test_rows)[: c.behaviour_prompts])
        val_rows = sorted(_hash_order(data, val_rows)[: c.behaviour_prompts])

    def run_behaviour() -> dict:
        audit = ResponseAudit(val / "responses.jsonl")
        out = behaviour(
            fast, space, ranks, inputs.means, inputs.refused, inputs.direction.vector, inputs.direction.layer,
            int(data.manifest["n_layers"]), prompts=data.encoded(tok, cfg.inference.max_prompt_tokens, test_rows),
            ids=[data.rows[i]["prompt_id"] for i in test_rows],
            val_prompts=data.encoded(tok, cfg.inference.max_prompt_tokens, val_rows),
            val_ids=[data.rows[i]["prompt_id"] for i in val_rows],
            harmless=data.encoded(tok, cfg.inference.max_prompt_tokens, harmless),
            harmless_ids=[data.rows[i]["prompt_id"] for i in harmless], ks=c.behaviour_k, headline_k=c.headline_k,
            headline_method=c.headline_method, interventions=c.interventions, positions=c.positions,
            scale_c=c.scale_c, random_sets=c.random_sets, induction_random_sets=c.induction_random_sets,
            max_new_tokens=max_new, seed=int(part_rng(c.seed, "behaviour").integers(2**31)), audit=audit,
            show_progress=show_progress)
        audit.write()
        return out

    if test_rows and val_rows and inputs.refused is not None:
        behaviour_out = part(val / "behaviour.json", run_behaviour)
    else:
        behaviour_out = None
        logger.warning("circuit behaviour skipped: %d refused toxic test, %d validation prompts, %s refused toxic "
                       "discovery prompts (the induction targets)", len(test_rows), len(val_rows),
                       "some" if inputs.refused is not None else "no")
    done(5)

    # ---- 6. edges of the pooled circuits
    edges = {}
    if c.edges:
        edges = part(val / "edges.json", lambda: {g.key: circuit_edges(runner, inputs, circuits[g.key], g.rows["discovery"],
                                                                         tok, cfg, show_progress)
                                                   for g in pooled.values()})
    done(6)

    # ---- 7. outputs
    summary = write_outputs(out_dir, cfg, inputs, groups, skipped, circuits, ranks, agree, faithfulness, behaviour_out,
                            edges, t_attr)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    manifest.update({"status": "complete", "seconds": time.perf_counter() - t_start})
    durable.write_json(out_dir / MANIFEST, manifest)  # the commit point of the stage
    done(7)
    return summary


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_outputs(out_dir: Path, cfg: Config, inputs: Inputs, groups, skipped, circuits, ranks, agree, faithfulness,
                  behaviour_out, edges, t_attr: float) -> dict:
    c = cfg.circuits
    space = inputs.space
    summary_groups = []
    for g in sorted(groups, key=lambda g: (g.category != "all", g.label, g.category)):
        doc = dict(circuits[g.key])
        doc["settings"] = {k: v for k, v in config_to_dict(c).items() if k != "num_threads"}
        doc["edges"] = edges.get(g.key, [])
        doc["validation"] = {"faithfulness": (faithfulness or {}).get(g.key)}
        if g.key == "toxic/all" and behaviour_out:
            doc["validation"]["behaviour_headline"] = behaviour_out["headline"]
        path = out_dir / g.label / f"{_safe_name(g.category)}.json"
        path.parent.mkdir(exist_ok=True)
        durable.write_json(path, doc, indent=1)
        summary_groups.append({"label": g.label, "category": g.category, "n_discovery": len(g.rows["discovery"]),
                               "n_test": len(g.rows["test"]), "n_promoting": len(doc["promoting"]),
                               "n_suppressing": len(doc["suppressing"]), "file": str(path.relative_to(out_dir))})
    summary = {
        "method": c.method, "baseline": c.baseline, "reference": c.reference, "hooks": list(space.hooks),
        "n_features": space.n_features, "direction": inputs.direction.info["hook"],
        "direction_position": inputs.direction.info["position"], "attribution_seconds": t_attr,
        "error_nodes": c.error_nodes, "circuits": summary_groups, "skipped_groups": skipped,
        "rankings": {m: [space.feature_id(i) for i in r.top(c.headline_k)] for m, r in ranks.items()},
        "agreement": {m: {k: v[k] for k in ("overall", "strata", "by_hook_type", "node_means")}
                      for m, v in (agree or {}).get("methods", {}).items()},
        "agreement_prompts": (agree or {}).get("n_prompts"),
        "faithfulness": {k: {"gap": v["gap"], "n_prompts": v["n_prompts"], "size_reaching_half": v["size_reaching_half"],
                             "largest_size": v["largest_size"],
                             "points": [{q: p[q] for q in ("size", "faithfulness", "faithfulness_ci", "completeness",
                                                          "completeness_ci", "random_faithfulness_mean",
                                                          "random_completeness_mean", "faithfulness_p",
                                                          "completeness_p")} for p in v["points"]]}
                         for k, v in (faithfulness or {}).items()},
        "behaviour": {k: behaviour_out[k] for k in ("headline", "clean", "direction", "n_prompts", "n_harmless")}
        if behaviour_out else None,
    }
    durable.write_json(out_dir / "summary.json", summary)
    from refusal_lens.circuits.plots import write_figures

    write_figures(out_dir, agree, faithfulness, behaviour_out)
    return summary


def format_summary(summary: dict) -> str:
    """The key numbers of a discover run, as printed at the end of the stage (test split)."""
    def f(v, fmt=".3f"):
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

    lines = [f"circuits by {summary['method'].upper()} over {len(summary['hooks'])} hooks ({summary['n_features']} "
             f"features + {len(summary['hooks'])} error nodes), baseline {summary['baseline']} ({summary['reference']})"]
    for m, v in summary.get("agreement", {}).items():
        s = v["strata"]
        lines.append(f"agreement with exact patching ({m}, {summary.get('agreement_prompts')} test prompts; Pearson / "
                     f"sign agreement): error nodes {f(s['error'].get('pearson'))} / {f(s['error'].get('sign_agreement'))}, "
                     f"top {f(s['top'].get('pearson'))} / {f(s['top'].get('sign_agreement'))}, random "
                     f"{f(s['random'].get('pearson'))} / {f(s['random'].get('sign_agreement'))}")
    for key, v in summary.get("faithfulness", {}).items():
        pts = ", ".join(f"{p['size']}: {f(p['faithfulness'], '.2f')} (random {f(p['random_faithfulness_mean'], '.2f')})"
                        for p in v["points"])
        lines.append(f"faithfulness {key} on {v['n_prompts']} test prompts (gap {f(v['gap'], '.2f')}): {pts}; "
                     f"reaches 0.5 at {v['size_reaching_half'] or 'no size up to ' + str(v['largest_size'])}")
    b = summary.get("behaviour")
    if b:
        h = b["headline"]
        lines.append(
            f"behaviour on {b['n_prompts']} refused toxic test prompts: clean {f(b['clean']['refusal_rate'], '.0%')}, "
            f"direction ablated {f(b['direction']['refusal_rate'], '.0%')}, {h['method']} K={h['k']} ({h['intervention']}, "
            f"{h['positions']}) {f(h['refusal_rate'], '.0%')} [{f(h['ci'][0], '.0%')}, {f(h['ci'][1], '.0%')}] = "
            f"{f(h['fraction_of_direction'], '.0%')} of the direction's effect; random sets {f(h['random_mean'], '.0%')} "
            f"(p = {f(h['random_p_value'])}); coherent {f(h['coherent_rate'], '.0%')}; smallest K reaching 90%: "
            f"{h['smallest_k_reaching_90']}")
    return "\n".join(lines)
