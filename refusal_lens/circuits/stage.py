"""Stage 3, discover: refusal circuits over SAE features, validated by intervention.

Output folder (``circuits/``, schema in docs/circuits.md)::

    manifest.json            fingerprint (circuit settings + the SAEs), status
    config.yaml              the resolved config
    space.json               spliced hooks, d_sae per hook, window, metric, baseline
    prompts.json             the prompts attributed (id, category, label, refused, clean metric)
    effects.safetensors      per-prompt node effects [n_prompts, window, n_nodes] (+ metric_clean)
    effects/batch-*.safetensors   per-batch shards while the pass runs (resume point; effects/ledger.json
                             holds their size and sha256, checked before a shard is reused)
    direction.json / directions.safetensors   refusal direction per layer (held-out AUROC, effect size)
    <label>/<category>.json  one circuit per label and category, and <label>/all.json (pooled)
    validation/agreement.json, faithfulness.json, behaviour.json
    summary.json             the key numbers of every circuit
    figures/*.html           agreement scatter, faithfulness curves, behaviour

Rerunning skips finished parts (batches of the attribution pass, validation files); ``--force``
starts over. Under torchrun the work runs on rank 0 and the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from refusal_lens import durable
from refusal_lens.activations.store import HookActivations
from refusal_lens.chat import encode_prompt
from refusal_lens.circuits.attribution import (
    ProjectionMetric,
    RefusalScoreMetric,
    Runner,
    capture,
    fixed_baseline,
    frozen_parameters,
    split_nodes,
)
from refusal_lens.circuits.build import Group, bootstrap_ci, circuit_document, node_record, ranked_nodes, select_rule
from refusal_lens.circuits.nodes import NodeSpace, PromptBatch, make_batch
from refusal_lens.circuits.validate import (
    agreement,
    group_faithfulness,
    faithfulness_curve,
    feature_selection,
    generate,
    random_features_like,
    sample_agreement_nodes,
)
from refusal_lens.collect import MANIFEST, PROMPTS_DIR
from refusal_lens.config import Config, config_to_dict, dump_config
from refusal_lens.direction import ablate_direction_hooks, choose_layer, refusal_directions
from refusal_lens.distributed import Dist
from refusal_lens.errors import UserError
from refusal_lens.hooks import hook_name, hook_sort_key, parse_hook_name, resolve_layer_specs
from refusal_lens.refusal import RefusalTokens, is_refusal
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)

#: exact patching of every node is one forward pass per node: refused above this many nodes.
EXACT_MAX_NODES = 4096


class CircuitError(UserError, RuntimeError):
    """Missing SAEs or activations, a bad circuit setting, or a results folder from another config."""


@dataclass
class DiscoverResult:
    folder: Path
    summary: dict
    skipped: bool = False  # the circuits were already complete


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict | list:
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


def _fingerprint(cfg: Config, saes_dir: Path, hooks: Sequence[str]) -> str:
    c = config_to_dict(cfg.circuits)
    c.pop("num_threads")
    sae_fp = json.loads((saes_dir / MANIFEST).read_text()).get("fingerprint")
    blob = json.dumps({"circuits": c, "hooks": list(hooks), "saes": sae_fp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _prepare(out_dir: Path, fp: str, cfg: Config, force: bool) -> None:
    path = out_dir / MANIFEST
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    if path.is_file() and json.loads(path.read_text()).get("fingerprint") != fp:
        raise CircuitError(f"{out_dir} holds circuits from other settings or SAEs; rerun with --force to redo them, "
                           "or set output.run_name to write elsewhere")
    if not path.is_file():
        durable.write_text(path, json.dumps({"fingerprint": fp, "status": "running"}, indent=2))
        durable.write_text(out_dir / "config.yaml", dump_config(cfg))


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


def prompt_groups(rows: Sequence[dict], cfg: Config) -> tuple[list[Group], list[str]]:
    """Circuit groups (label x category, and label x all) with the configured prompt selection.
    Returns the non-empty groups and notes on the skipped ones."""
    c = cfg.circuits
    available = sorted({r["category"] for r in rows})
    for cat in c.categories:
        if cat not in available:
            raise CircuitError(f"circuits.categories: category {cat!r} has no prompts; categories in the data: {available}")
    cats = list(c.categories) or available

    def chosen(r: dict) -> bool:
        return c.select == "all" or (r["refused"] if c.select == "refused" else not r["refused"])

    groups, skipped = [], []
    for label in c.labels:
        pooled = [i for i, r in enumerate(rows) if r["label"] == label and r["category"] in cats and chosen(r)]
        if not pooled:
            raise CircuitError(f"circuits.labels: no {label} prompts left (circuits.select={c.select!r}, "
                               f"categories {cats})")
        groups.append(Group(label, "all", pooled))
        for cat in cats:
            members = [i for i in pooled if rows[i]["category"] == cat]
            if members:
                groups.append(Group(label, cat, members))
            else:
                skipped.append(f"{label}/{cat}: no prompts with circuits.select={c.select!r}")
    return groups, skipped


def part_rng(seed: int, *part: str) -> np.random.Generator:
    """The random generator of one resumable part (agreement, a faithfulness curve, ...): its draws do not
    depend on which other parts a resumed run skipped."""
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in part)])


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def reference_means(saes: dict, acts_dir: Path, hooks: Sequence[str], reference: set[str], prefix: int,
                    special: Sequence[int], chunk: int = 4096) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean features and mean error of each hook over the reference prompts' prompt tokens (the same
    positions as the sites: after the template's opening, no special tokens), from stored activations."""
    out = {}
    for h in hooks:
        acts = HookActivations(acts_dir / h)
        is_response = np.asarray(acts.table.column("is_response").to_pylist(), dtype=bool)
        keep = ~is_response & (acts.positions >= prefix) & ~np.isin(acts.token_ids, np.asarray(list(special), dtype=np.int64))
        keep &= np.fromiter((p in reference for p in acts.prompt_ids), dtype=bool, count=len(acts))
        rows = np.flatnonzero(keep)
        if len(rows) == 0:
            raise CircuitError(f"{h}: no reference tokens for the mean baseline (circuits.reference)")
        sae = saes[h]
        sum_f = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
        sum_e = torch.zeros(acts.width, dtype=torch.float64)
        with torch.no_grad():
            for s in range(0, len(rows), chunk):
                x = acts.take(rows[s : s + chunk]).to(sae.device)
                f, err = split_nodes(sae, x, torch.ones(len(x), dtype=torch.bool, device=x.device))
                sum_f += f.double().sum(0).cpu()
                sum_e += err.double().sum(0).cpu()
        out[h] = ((sum_f / len(rows)).float().to(sae.device), (sum_e / len(rows)).float().to(sae.device))
    return out


class DirectionAblatedBaseline:
    """Per prompt and position: node values in the run with the refusal direction ablated everywhere."""

    def __init__(self, runner: Runner, n_layers: int, unit: torch.Tensor):
        self.runner, self.hooks = runner, ablate_direction_hooks(n_layers, unit)
        self._cache: dict[tuple, dict] = {}

    def __call__(self, batch: PromptBatch, hook: str):
        key = tuple(batch.rows)
        if key not in self._cache:
            xs: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                # the ablation hooks run first; the capture then sees the ablated activation
                self.runner.forward(batch, [*self.hooks, *capture(self.runner.space.hooks, xs)])
            self._cache = {key: {h: split_nodes(self.runner.space.saes[h], xs[h], batch.sites) for h in xs}}
        return self._cache[key][hook]


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run_discover_stage(cfg: Config, loaded, acts_dir: Path, saes_dir: Path, out_dir: Path, *, force: bool = False,
                       dist: Dist = Dist(), show_progress: bool = True, status: StatusFile | None = None) -> DiscoverResult:
    status = status if status is not None else StatusFile(None)
    c = cfg.circuits
    manifest = _read_json(acts_dir / MANIFEST, "activations (run `refusal-lens collect` first)")
    if manifest.get("status") != "complete":
        raise CircuitError(f"the activations in {acts_dir} are not finished: run `refusal-lens collect` first")
    n_layers = int(manifest["n_layers"])
    hooks = circuit_hooks(cfg, saes_dir, n_layers)
    import datasets

    rows = datasets.load_from_disk(str(acts_dir / PROMPTS_DIR)).to_list()
    groups, skipped = prompt_groups(rows, cfg)
    _check_settings(cfg, manifest, saes_dir, hooks)  # before anything is written
    if dist.is_main:
        _prepare(out_dir, _fingerprint(cfg, saes_dir, hooks), cfg, force)
    dist.barrier()
    if json.loads((out_dir / MANIFEST).read_text()).get("status") == "complete" and (out_dir / "summary.json").is_file():
        logger.info("circuits already complete in %s (--force redoes them)", out_dir)
        return DiscoverResult(out_dir, json.loads((out_dir / "summary.json").read_text()), skipped=True)
    if not dist.is_main:
        dist.barrier()
        return DiscoverResult(out_dir, json.loads((out_dir / "summary.json").read_text()))
    threads = torch.get_num_threads()
    torch.set_num_threads(c.num_threads)
    try:
        with frozen_parameters(loaded.model):
            summary = _discover(cfg, loaded, manifest, rows, groups, skipped, hooks, acts_dir, saes_dir, out_dir,
                                show_progress, status)
    finally:
        torch.set_num_threads(threads)
    dist.barrier()
    return DiscoverResult(out_dir, summary)


def _check_settings(cfg: Config, manifest: dict, saes_dir: Path, hooks: Sequence[str]) -> None:
    c = cfg.circuits
    window = c.window if c.positions == "per_position" else 1
    n_nodes = sum(int(json.loads((saes_dir / h / "cfg.json").read_text())["d_sae"]) + 1 for h in hooks)
    if c.method == "exact" and n_nodes * window > EXACT_MAX_NODES:
        raise CircuitError(f"circuits.method='exact' needs one forward pass per node ({n_nodes * window} nodes "
                           f"here, limit {EXACT_MAX_NODES}); use 'atp' or 'ig' and exact patching for validation")
    layers = sorted(site.layer for site in map(parse_hook_name, manifest["hooks"])
                    if site is not None and site.point == "hook_resid_post")
    if not layers:
        raise CircuitError("the refusal direction needs resid_post activations: add residual layers to "
                           "model.activation_layers and collect again")
    if c.direction_layer is not None and c.direction_layer not in layers:
        raise CircuitError(f"circuits.direction_layer={c.direction_layer}: no resid_post activations there; "
                           f"collected layers: {layers}")


def _discover(cfg, loaded, manifest, rows, groups, skipped, hooks, acts_dir, saes_dir, out_dir, show_progress, status):
    c = cfg.circuits
    t_start = time.perf_counter()
    device = loaded.device
    n_layers = int(manifest["n_layers"])
    saes = load_saes(saes_dir, hooks, device)
    window = c.window if c.positions == "per_position" else 1
    space = NodeSpace(tuple(hooks), saes, window)
    from refusal_lens.saes.stage import template_prefix

    prefix = 0
    if cfg.sae.exclude_template_prefix:  # the SAEs never saw the template's shared opening: no nodes there
        prefix = int(manifest.get("template_prefix_tokens",
                                  template_prefix(loaded, acts_dir, cfg.inference.max_prompt_tokens)))
    special = list(loaded.tokenizer.all_special_ids) if cfg.sae.exclude_special_tokens else []

    # refusal direction (from stored activations; no model run)
    directions = refusal_directions(acts_dir, manifest["hooks"], cfg.sae.heldout_fraction)
    layer = c.direction_layer if c.direction_layer is not None else choose_layer(directions, n_layers)
    unit = directions[layer].unit.to(device)
    durable.write_text(out_dir / "direction.json", json.dumps(
        {"layer": layer, "chosen_by": "config" if c.direction_layer is not None
         else "held-out AUROC, then effect size, among layers [n/4, 3n/4)",
         "layers": [d.summary() for d in directions.values()]}, indent=2))
    durable.save_safetensors({f"layer_{k}": d.direction.contiguous() for k, d in directions.items()}, out_dir / "directions.safetensors")

    metric = (RefusalScoreMetric(RefusalTokens.from_dict(manifest["refusal_tokens"])) if c.metric == "refusal_score"
              else ProjectionMetric(hook_name("residuals", layer), unit))
    runner = Runner(loaded.model, space, metric)

    # baseline
    if c.baseline == "direction_ablated":
        base = DirectionAblatedBaseline(runner, n_layers=int(manifest["n_layers"]), unit=unit)
    else:
        if c.reference == "safe_complied":
            reference = {r["prompt_id"] for r in rows if r["label"] == "safe" and not r["refused"]}
        elif c.reference == "safe":
            reference = {r["prompt_id"] for r in rows if r["label"] == "safe"}
        else:
            reference = {r["prompt_id"] for r in rows}
        if not reference:
            raise CircuitError(f"circuits.reference={c.reference!r}: no such prompts for the mean baseline")
        means = reference_means(saes, acts_dir, hooks, reference, prefix, special)
        if c.baseline == "zero":
            means = {h: (torch.zeros_like(f), torch.zeros_like(e)) for h, (f, e) in means.items()}
        base = fixed_baseline(means)

    # prompts -> batches (by length, to pad little)
    seqs = [encode_prompt(loaded.tokenizer, r["prompt"], cfg.inference.max_prompt_tokens).ids for r in rows]
    wanted = sorted({i for g in groups for i in g.rows})
    pad = loaded.tokenizer.pad_token_id

    def batches_of(idx: Sequence[int]) -> list[PromptBatch]:
        idx = sorted(idx, key=lambda i: (len(seqs[i]), i))
        return [make_batch([seqs[i] for i in idx[s : s + c.batch_size]], idx[s : s + c.batch_size], pad,
                           site_from=prefix, skip_token_ids=special, window=window, device=device)
                for s in range(0, len(idx), c.batch_size)]

    durable.write_text(out_dir / "space.json", json.dumps({
        "hooks": list(hooks), "d_sae": {h: space.d_sae(h) for h in hooks}, "window": window, "n_nodes": space.n_nodes,
        "metric": c.metric, "baseline": c.baseline, "reference": c.reference, "method": c.method,
        "direction_layer": layer, "site_from": prefix}, indent=2))

    # ---- 1. the attribution pass, batch by batch (resumable)
    batches = batches_of(wanted)
    shard_dir = out_dir / "effects"
    shard_dir.mkdir(exist_ok=True)
    ledger = durable.Ledger(shard_dir / "ledger.json")  # size and sha256 of each finished batch (the resume check)
    # progress: one step per attribution batch, then the validation parts
    parts = ["agreement with exact patching", "faithfulness", "edges", "behaviour (generation)", "writing circuits"]
    n_steps = len(batches) + len(parts)

    def part_done(k: int) -> None:
        status.progress(len(batches) + k + 1, n_steps)
        if k + 1 < len(parts):
            status.set(message=f"discover: {parts[k + 1]}")

    status.progress(0, n_steps, "step")
    status.set(message=f"discover: attribution ({c.method}) of {len(wanted)} prompts in {len(batches)} batches")
    effects = torch.zeros(len(rows), window, space.n_nodes)
    m_clean = torch.full((len(rows),), float("nan"))
    for bi, batch in enumerate(tqdm(batches, desc=f"attribution ({c.method})", disable=not show_progress)):
        shard = shard_dir / f"batch-{bi:04d}.safetensors"
        if ledger.verified(shard):
            data = load_file(str(shard))
            if data["rows"].tolist() == batch.rows:
                effects[batch.rows], m_clean[batch.rows] = data["effects"], data["metric_clean"]
                status.progress(bi + 1)
                continue
        m, values = runner.clean(batch)
        if c.method == "atp":
            eff = runner.atp(batch, values, base)
        elif c.method == "ig":
            eff = runner.ig(batch, values, base, c.ig_steps)
        else:
            all_nodes = [(s, i) for s in range(window) for i in range(space.n_nodes)]
            eff = runner.exact(batch, base, all_nodes, m).reshape(len(batch), window, space.n_nodes)
        if c.error_nodes == "exact" and c.method != "exact":
            eff = runner.exact_error_nodes(batch, base, eff, m)
        eff = eff.detach().float().cpu()
        durable.save_safetensors({"effects": eff.contiguous(), "metric_clean": m.float().cpu(),
                                  "rows": torch.tensor(batch.rows)}, shard)
        ledger.add(shard)
        effects[batch.rows], m_clean[batch.rows] = eff, m.float().cpu()
        status.progress(bi + 1)
    durable.save_safetensors({"effects": effects.contiguous(), "metric_clean": m_clean}, out_dir / "effects.safetensors")
    t_attr = time.perf_counter() - t_start
    attributed = set(wanted)
    durable.write_text(out_dir / "prompts.json", json.dumps([
        {"index": i, "prompt_id": r["prompt_id"], "category": r["category"], "label": r["label"],
         "refused": bool(r["refused"]), "refusal_score": r["refusal_score"],
         "metric_clean": float(m_clean[i]) if i in attributed else None} for i, r in enumerate(rows)], indent=1))

    val_dir = out_dir / "validation"
    val_dir.mkdir(exist_ok=True)

    # ---- 2. agreement with exact patching
    agree_path = val_dir / "agreement.json"
    if not agree_path.is_file():
        rng = part_rng(c.seed, "agreement")
        t0 = time.perf_counter()
        by_label = {lab: [i for i in wanted if rows[i]["label"] == lab] for lab in c.labels}
        sample: list[int] = []
        for lab in c.labels:
            pool = by_label[lab]
            take = min(len(pool), max(1, c.agreement_prompts // len(c.labels)))
            sample += [int(i) for i in rng.choice(pool, size=take, replace=False)]
        sample_batches = batches_of(sample)
        est = {"atp": [], "ig": []}
        cleans = []
        for b in sample_batches:
            m, values = runner.clean(b)
            cleans.append((b, m))
            est["atp"].append(runner.atp(b, values, base).detach())
            est["ig"].append(runner.ig(b, values, base, c.ig_steps).detach())
        atp_mean = torch.cat(est["atp"]).mean(0)
        nodes = sample_agreement_nodes(space, atp_mean, c.agreement_nodes, rng)
        exact = torch.cat([runner.exact(b, base, nodes, m) for b, m in tqdm(
            cleans, desc="exact patching (agreement)", disable=not show_progress)]).mean(0).cpu().numpy()
        estimates = {name: torch.cat(v).mean(0)[[s for s, _ in nodes], [i for _, i in nodes]].cpu().numpy()
                     for name, v in est.items()}
        result = agreement(space, nodes, exact, estimates)
        result.update({"n_prompts": len(sample), "ig_steps": c.ig_steps, "seconds": time.perf_counter() - t0})
        durable.write_text(agree_path, json.dumps(result, indent=2))
    agree = json.loads(agree_path.read_text())
    part_done(0)

    # ---- 3. circuits per group; faithfulness curves of the pooled circuits; every circuit's faithfulness
    group_means = {g.key: effects[g.rows].mean(0) for g in groups}
    ranked = {g.key: ranked_nodes(group_means[g.key]) for g in groups}
    faith_path = val_dir / "faithfulness.json"
    faith = json.loads(faith_path.read_text()) if faith_path.is_file() else {"curves": {}, "circuits": {}}

    def sample(g: Group) -> list[int]:
        if len(g.rows) <= c.faithfulness_prompts:
            return list(g.rows)
        return sorted(int(i) for i in np.random.default_rng(c.seed).choice(g.rows, c.faithfulness_prompts, replace=False))

    needs_curve = [g for g in groups if g.category == "all" or c.rule == "faithfulness"]
    for g in tqdm(needs_curve, desc="faithfulness curves", disable=not show_progress):
        if g.key not in faith["curves"]:
            sub = sample(g)
            faith["curves"][g.key] = faithfulness_curve(runner, batches_of(sub), base, ranked[g.key], c.faithfulness_sizes,
                                                        c.random_controls, part_rng(c.seed, "curve", g.key),
                                                        float(m_clean[sub].mean()),
                                                        c.faithfulness_min_gap)
            durable.write_text(faith_path, json.dumps(faith, indent=2))
    circuits: dict[str, list[tuple[int, int]]] = {}
    for g in groups:
        if c.rule == "faithfulness":
            pts = faith["curves"][g.key]["points"]
            size = next((p["size"] for p in pts if (p["faithfulness"] or 0) >= c.target_faithfulness),
                        pts[-1]["size"] if pts else 0)
            circuits[g.key] = ranked[g.key][:size]
        else:
            circuits[g.key] = select_rule(ranked[g.key], group_means[g.key], c.rule, c.top_k, c.node_threshold)
    if not faith["circuits"]:
        # pooled circuits on their own pass (a prompt is in its label's pooled group and in its category's)
        for pooled in (True, False):
            part = [g for g in groups if (g.category == "all") == pooled]
            group_of_row = {r: g.key for g in part for r in sample(g)}
            faith["circuits"].update(group_faithfulness(
                runner, batches_of(sorted(group_of_row)), base, group_of_row, {g.key: circuits[g.key] for g in part},
                {g.key: ranked[g.key] for g in part}, m_clean, part_rng(c.seed, "faithfulness", str(pooled)),
                c.faithfulness_min_gap))
        durable.write_text(faith_path, json.dumps(faith, indent=2))
    part_done(1)

    # ---- 3b. edges of the pooled circuits (features of consecutive hooks)
    edges_path = val_dir / "edges.json"
    edges = json.loads(edges_path.read_text()) if edges_path.is_file() else {}
    if c.edges and window == 1:
        for g in groups:
            if g.category != "all" or g.key in edges:
                continue
            sub = g.rows if len(g.rows) <= c.edge_prompts else sorted(
                int(i) for i in np.random.default_rng(c.seed).choice(g.rows, c.edge_prompts, replace=False))
            total: dict[tuple[int, int], float] = {}
            for b in tqdm(batches_of(sub), desc=f"edges {g.key}", disable=not show_progress):
                _, values = runner.clean(b)
                for u, d, w in runner.edges(b, values, base, [i for _, i in circuits[g.key]]):
                    total[(u, d)] = total.get((u, d), 0.0) + w * len(b)
            weights = {k: v / len(sub) for k, v in total.items()}
            # the bar is relative to the largest edge between two features: edges between error nodes
            # (whole residual-stream remainders) are orders of magnitude larger and would hide the rest
            feature_edges = [abs(v) for (u, d), v in weights.items() if not (_is_error(space, u) or _is_error(space, d))]
            top = max(feature_edges or [abs(v) for v in weights.values()] or [0.0])
            edges[g.key] = [{"from": space.node_id(u), "to": space.node_id(d), "effect": w}
                            for (u, d), w in sorted(weights.items(), key=lambda kv: -abs(kv[1]))
                            if top > 0 and abs(w) >= c.edge_threshold * top]
            durable.write_text(edges_path, json.dumps(edges, indent=2))

    part_done(2)

    # ---- 4. behaviour: generation with the pooled toxic circuit's features ablated
    behaviour = _behaviour(cfg, loaded, runner, space, base, circuits, rows, seqs, batches_of,
                           part_rng(c.seed, "behaviour"), unit,
                           int(manifest["n_layers"]), val_dir / "behaviour.json", show_progress)

    part_done(3)

    # ---- 5. write the circuits
    groups_sorted = sorted(groups, key=lambda g: (g.category != "all", g.label, g.category))
    settings = {k: v for k, v in config_to_dict(c).items() if k not in ("num_threads",)}
    settings.update({"direction_layer": layer, "site_from": prefix})
    summary_groups = []
    for g in groups_sorted:
        chosen = circuits[g.key]
        mean = group_means[g.key]
        ci = bootstrap_ci(effects[g.rows], chosen, c.bootstrap, c.seed)
        nodes = [node_record(space, s, i, float(mean[s, i]), ci[k], {"rank": k + 1}) for k, (s, i) in enumerate(chosen)]
        validation = {"faithfulness": faith["circuits"].get(g.key), "curve": faith["curves"].get(g.key),
                      "agreement": {m: agree["methods"][m]["overall"] for m in agree["methods"]}}
        if g.key == "toxic/all" and behaviour:
            validation["behaviour"] = behaviour
        doc = circuit_document(space, g, [rows[i]["prompt_id"] for i in g.rows], m_clean[g.rows].tolist(), nodes,
                               settings, validation, edges.get(g.key))
        path = out_dir / g.label / f"{_safe_name(g.category)}.json"
        path.parent.mkdir(exist_ok=True)
        durable.write_text(path, json.dumps(doc, indent=1))
        f = faith["circuits"].get(g.key) or {}
        summary_groups.append({"label": g.label, "category": g.category, "n_prompts": len(g.rows), "size": len(chosen),
                               "metric_clean_mean": doc["metric_clean_mean"], "faithfulness": f.get("faithfulness"),
                               "completeness": f.get("completeness"),
                               "random_faithfulness": f.get("random_faithfulness"), "gap": f.get("gap"),
                               "error_nodes": sum(1 for n in nodes if n["kind"] == "err"),
                               "edges": len(edges.get(g.key, [])),
                               "file": str(path.relative_to(out_dir))})
    summary = {
        "method": c.method, "metric": c.metric, "baseline": c.baseline, "hooks": list(hooks), "window": window,
        "n_nodes": space.n_nodes, "n_prompts": len(wanted), "direction_layer": layer,
        "direction_auroc": directions[layer].auroc, "attribution_seconds": t_attr,
        "agreement": {m: {k: v[k] for k in ("overall", "features", "error_nodes", "by_hook_type")}
                      for m, v in agree["methods"].items()},
        "error_nodes": c.error_nodes,
        "circuits": summary_groups, "skipped_groups": skipped, "behaviour": behaviour,
    }
    durable.write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    from refusal_lens.circuits.plots import write_figures

    write_figures(out_dir, agree, faith, behaviour)
    part_done(4)
    shutil.rmtree(shard_dir, ignore_errors=True)
    manifest_path = out_dir / MANIFEST
    man = json.loads(manifest_path.read_text())
    man.update({"status": "complete", "seconds": time.perf_counter() - t_start})
    durable.write_text(manifest_path, json.dumps(man, indent=2))
    return summary


def _behaviour(cfg, loaded, runner, space, base, circuits, rows, seqs, batches_of, rng, unit, n_layers, path,
               show_progress) -> dict | None:
    c = cfg.circuits
    if c.behaviour_prompts == 0 or "toxic/all" not in circuits or c.baseline == "direction_ablated":
        return None
    if path.is_file():
        return json.loads(path.read_text())
    features = [(s, i) for s, i in circuits["toxic/all"] if space.locate(i)[1] != space.d_sae(space.locate(i)[0])]
    refused = [i for i, r in enumerate(rows) if r["label"] == "toxic" and r["refused"]]
    if not features or not refused:
        return None
    pick = sorted(int(i) for i in rng.choice(refused, size=min(c.behaviour_prompts, len(refused)), replace=False))
    batches = batches_of(pick)
    active = _active_features(runner, batches)
    conditions = {"clean": lambda b: [],
                  "circuit_features_ablated": lambda b: _edits(runner, b, base, feature_selection(runner, features)),
                  "direction_ablated": lambda b: ablate_direction_hooks(n_layers, unit)}
    for k in range(max(c.random_controls, 1)):
        rand = random_features_like(space, features, active, rng)
        conditions[f"random_features_{k}"] = (lambda sel: lambda b: _edits(runner, b, base, sel))(
            feature_selection(runner, rand))
    out = {"n_prompts": len(pick), "n_features": len(features), "max_new_tokens": cfg.inference.max_new_tokens,
           "conditions": {}}
    for name, make in tqdm(conditions.items(), desc="behaviour (generation)", disable=not show_progress):
        texts = []
        for b in batches:
            texts += generate(loaded, b, cfg.inference.max_new_tokens, make(b))
        refused_now = [is_refusal(t) for t in texts]
        out["conditions"][name] = {"refusal_rate": float(np.mean(refused_now)), "refused": int(sum(refused_now)),
                                   "examples": texts[:3]}
    rand = [v["refusal_rate"] for k, v in out["conditions"].items() if k.startswith("random_features")]
    out["random_features_refusal_rate_mean"] = float(np.mean(rand))
    durable.write_text(path, json.dumps(out, indent=2))
    return out


def _is_error(space: NodeSpace, index: int) -> bool:
    hook, local = space.locate(index)
    return local == space.d_sae(hook)


def _edits(runner: Runner, batch: PromptBatch, base, selection: dict) -> list:
    return [(h, runner.node_edit(batch, base, h, sel)) for h, sel in selection.items()]


def _active_features(runner: Runner, batches: Sequence[PromptBatch]) -> dict[str, np.ndarray]:
    """Features that fire somewhere on these prompts (random controls are drawn from them)."""
    fired = {h: torch.zeros(runner.space.d_sae(h), dtype=torch.bool) for h in runner.space.hooks}
    for b in batches:
        _, values = runner.clean(b)
        for h in runner.space.hooks:
            fired[h] |= (values.f[h] != 0).flatten(0, 1).any(0).cpu()
    return {h: torch.argwhere(v).flatten().numpy() for h, v in fired.items()}


def format_summary(summary: dict) -> str:
    """The validation numbers of a discover run, as printed at the end of the stage."""
    def f(v, fmt=".3f"):
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

    lines = [f"circuits by {summary['method'].upper()} over {len(summary['hooks'])} hooks ({summary['n_nodes']} nodes), "
             f"metric {summary['metric']}, baseline {summary['baseline']}, {summary['n_prompts']} prompts"]
    lines.append("agreement with exact patching (node means; Pearson / Spearman):")
    for m, v in summary["agreement"].items():
        per_type = ", ".join(f"{t} {f(x['pearson'])}/{f(x['spearman'])}" for t, x in v["by_hook_type"].items())
        lines.append(f"  {m:<4} all nodes {f(v['overall']['pearson'])} / {f(v['overall']['spearman'])} "
                     f"(n={v['overall']['n']}); features {f(v['features']['pearson'])} / {f(v['features']['spearman'])}; "
                     f"error nodes {f(v['error_nodes']['pearson'])} / {f(v['error_nodes']['spearman'])}; by hook type: {per_type}")
    if summary.get("error_nodes") == "exact":
        lines.append("  (circuits use exact patching for the error nodes and the estimate for features)")
    head = (f"  {'label/category':<28}{'prompts':>8}{'nodes':>7}{'gap':>8}{'faithful':>10}{'complete':>10}{'random':>8}"
            f"{'err':>5}")
    lines += ["circuits (faithfulness / completeness on the group's prompts, null when the gap m(model) - m(every node "
              "at baseline) is too small; random = a same-size random node set):", head]
    for g in summary["circuits"]:
        lines.append(f"  {g['label'] + '/' + g['category']:<28}{g['n_prompts']:>8}{g['size']:>7}{f(g.get('gap'), '.2f'):>8}"
                     f"{f(g['faithfulness']):>10}"
                     f"{f(g['completeness']):>10}{f(g['random_faithfulness']):>8}{g['error_nodes']:>5}")
    b = summary.get("behaviour")
    if b:
        rates = ", ".join(f"{k} {v['refusal_rate']:.0%}" for k, v in b["conditions"].items())
        lines.append(f"behaviour on {b['n_prompts']} refused toxic prompts ({b['n_features']} features): {rates}")
    return "\n".join(lines)
