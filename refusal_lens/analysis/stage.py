"""Stage 4, analyze: where refusal emerges, one mechanism or many, the refusal direction, top features,
over-refusal, other models; written as one offline HTML report.

Output folder (``analysis/``)::

    report.html              the report (plotly inlined; opens offline)
    figures/<name>.html      each figure on its own page (+ plotly.min.js)
    summary.json             key numbers: refusal rates, SAE quality, validation, emergence, verdicts
    emergence.json           per group and hook: total / top |effect|, error share, cumulative share
    similarity.json          per label pair of categories: similarity, bootstrap CI, p-value, verdict
    direction.json           AUROC per layer, interventions, cosines of circuit features
    top_features.json        top features of the pooled circuits with their most activating tokens

The analysis reads the earlier stages' folders; only the direction-addition check runs the model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from refusal_lens import durable
from refusal_lens.activations.store import HookActivations
from refusal_lens.analysis import figures as F
from refusal_lens.analysis.metrics import (
    bootstrap_similarity,
    emergence,
    layer_profile,
    permutation_pvalue,
    similarity,
    verdict,
)
from refusal_lens.collect import MANIFEST
from refusal_lens.config import Config, config_to_dict
from refusal_lens.direction import add_direction_hooks, last_prompt_rows
from refusal_lens.distributed import Dist
from refusal_lens.errors import UserError
from refusal_lens.hooks import parse_hook_name
from refusal_lens.report.html import FigureItem, Section, Table, write_report
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)


class AnalysisError(UserError, RuntimeError):
    """The circuits (or earlier stages) are missing."""


@dataclass
class AnalysisResult:
    folder: Path
    report: Path
    summary: dict
    skipped: bool = False  # the analysis of these circuits was already written


def _load(path: Path, what: str):
    if not path.is_file():
        raise AnalysisError(f"no {what} at {path}: run the earlier stages (`refusal-lens run`) first")
    return json.loads(path.read_text())


def _groups(circuits_dir: Path, labels: Sequence[str]) -> dict[str, dict]:
    out = {}
    for label in labels:
        for path in sorted((circuits_dir / label).glob("*.json")):
            doc = json.loads(path.read_text())
            out[f"{doc['label']}/{doc['category']}"] = doc
    return out


def run_analysis_stage(cfg: Config, loaded_fn, run_dir: Path, *, force: bool = False, dist: Dist = Dist(),
                       show_progress: bool = True, status: StatusFile | None = None) -> AnalysisResult:
    """Analyse ``run_dir``'s circuits and write ``run_dir/analysis``. ``loaded_fn()`` gives the model
    (loaded only for the direction-addition check). Runs on rank 0; the others wait."""
    status = status if status is not None else StatusFile(None)
    out_dir = run_dir / "analysis"
    circuits_dir = run_dir / "circuits"
    c_manifest = _load(circuits_dir / MANIFEST, "circuits")
    if c_manifest.get("status") != "complete":
        raise AnalysisError(f"the circuits in {circuits_dir} are not finished: run `refusal-lens discover` first")
    done = out_dir / "summary.json"
    if done.is_file() and not force:
        prev = json.loads(done.read_text())
        if prev.get("circuits_fingerprint") == c_manifest["fingerprint"] and \
                prev.get("analysis_settings") == config_to_dict(cfg.analysis):
            logger.info("analysis already written for these circuits (--force redoes it): %s", out_dir / "report.html")
            return AnalysisResult(out_dir, out_dir / "report.html", prev, skipped=True)
    if not dist.is_main:
        dist.barrier()
        return AnalysisResult(out_dir, out_dir / "report.html", json.loads(done.read_text()))
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _analyse(cfg, loaded_fn, run_dir, out_dir, c_manifest, show_progress, status)
    result.summary["seconds"] = time.perf_counter() - t0
    durable.write_text(done, json.dumps(result.summary, indent=2))
    dist.barrier()
    return result


def _analyse(cfg, loaded_fn, run_dir, out_dir, c_manifest, show_progress, status) -> AnalysisResult:
    a = cfg.analysis
    circuits_dir, acts_dir, saes_dir = run_dir / "circuits", run_dir / "activations", run_dir / "saes"
    space = _load(circuits_dir / "space.json", "circuit node space")
    c_summary = _load(circuits_dir / "summary.json", "circuit summary")
    prompts = _load(circuits_dir / "prompts.json", "attributed prompts")
    rates = _load(acts_dir / "refusal_rates.json", "refusal rates")
    quality = _load(saes_dir / "quality.json", "SAE quality table")
    hooks = space["hooks"]
    sizes = [space["d_sae"][h] + 1 for h in hooks]
    data = load_file(str(circuits_dir / "effects.safetensors"))
    effects = data["effects"].sum(1).numpy()  # [prompts, nodes]: per-position nodes summed for the analysis
    index_of = {p["prompt_id"]: p["index"] for p in prompts}
    labels = sorted({g["label"] for g in c_summary["circuits"]})
    groups = _groups(circuits_dir, labels)
    rows_of = {k: np.asarray([index_of[p] for p in g["prompt_ids"]]) for k, g in groups.items()}
    means = {k: effects[r].mean(0) for k, r in rows_of.items()}
    rng = np.random.default_rng(cfg.circuits.seed)
    status.progress(0, 6, "part")

    # ---- 1. where refusal emerges
    emerg = {}
    for k in groups:
        prof = layer_profile(means[k], hooks, sizes)
        emerg[k] = {"profile": prof, "emergence": emergence(prof, a.emergence_share), "n_prompts": len(rows_of[k])}
    durable.write_text(out_dir / "emergence.json", json.dumps(emerg, indent=2))
    status.progress(1)

    # ---- 2. one mechanism or many
    pool = np.flatnonzero(np.abs(np.stack(list(means.values()))).max(0) > 0)
    cats = sorted({g["category"] for g in groups.values() if g["category"] != "all"})
    pairs = []
    for la, lb in [("safe", "safe"), ("toxic", "toxic"), ("safe", "toxic")]:
        if la not in labels or lb not in labels:
            continue
        for i, ca in enumerate(cats):
            for j, cb in enumerate(cats):
                if la == lb and j <= i:
                    continue
                ka, kb = f"{la}/{ca}", f"{lb}/{cb}"
                if ka not in groups or kb not in groups:
                    continue
                pairs.append((la, lb, ca, cb, ka, kb))
    sims = []
    for la, lb, ca, cb, ka, kb in tqdm(pairs, desc="circuit similarity", disable=not show_progress):
        s = similarity(means[ka], means[kb], a.similarity_top_k)
        na, nb = len(rows_of[ka]), len(rows_of[kb])
        if min(na, nb) < a.min_prompts:  # no verdict: spare the tests
            p = null_mean = lo = hi = float("nan")
        else:
            p, null_mean = permutation_pvalue(means[ka], means[kb], a.similarity_top_k, pool, a.permutations, rng)
            lo, hi = bootstrap_similarity(effects[rows_of[ka]], effects[rows_of[kb]], a.similarity_top_k,
                                          a.bootstrap, rng)
        sims.append({"pair": f"{la} x {lb}", "a": ka, "b": kb, "similarity": s, "ci_low": lo, "ci_high": hi,
                     "p_value": p, "null_mean": null_mean, "n_a": na, "n_b": nb,
                     "verdict": verdict(s, p, na, nb, alpha=a.alpha, monolithic=a.monolithic_threshold,
                                        partial=a.partial_threshold, min_prompts=a.min_prompts)})
    durable.write_text(out_dir / "similarity.json", json.dumps(sims, indent=2))
    verdicts = {}
    for kind in ("safe x safe", "toxic x toxic", "safe x toxic"):
        vs = [s["verdict"] for s in sims if s["pair"] == kind and s["verdict"] != "insufficient"]
        verdicts[kind] = {v: vs.count(v) for v in ("monolithic", "partially modular", "modular")}
        verdicts[kind]["insufficient"] = sum(1 for s in sims if s["pair"] == kind and s["verdict"] == "insufficient")
        verdicts[kind]["median_similarity"] = float(np.median([s["similarity"] for s in sims if s["pair"] == kind
                                                               and s["verdict"] != "insufficient"])) if vs else None
    pooled = {}
    if "safe/all" in means and "toxic/all" in means:
        s = similarity(means["safe/all"], means["toxic/all"], a.similarity_top_k)
        p, _ = permutation_pvalue(means["safe/all"], means["toxic/all"], a.similarity_top_k, pool, a.permutations, rng)
        lo, hi = bootstrap_similarity(effects[rows_of["safe/all"]], effects[rows_of["toxic/all"]], a.similarity_top_k,
                                      a.bootstrap, rng)
        pooled = {"similarity": s, "p_value": p, "ci_low": lo, "ci_high": hi}
    status.progress(2)

    # ---- 3. refusal direction
    direction = _direction_analysis(cfg, loaded_fn, circuits_dir, saes_dir, groups, hooks, rows_of, prompts, acts_dir,
                                    c_summary, show_progress)
    durable.write_text(out_dir / "direction.json", json.dumps(direction, indent=2))
    status.progress(3)

    # ---- 4. top features with their most activating tokens
    top = _top_features(cfg, groups, acts_dir, saes_dir, loaded_fn)
    durable.write_text(out_dir / "top_features.json", json.dumps(top, indent=2))
    status.progress(4)

    # ---- 5. over-refusal: what drives refusal on safe prompts the model refuses
    over = _over_refusal(groups, means, effects, prompts, hooks, sizes, a.similarity_top_k)
    status.progress(5)

    # ---- 6. other runs in the same results folder
    comparison = _compare_runs(run_dir) if a.compare_runs else []

    # ---- summary + report
    validation = {"agreement": c_summary["agreement"], "behaviour": c_summary.get("behaviour"),
                  "circuits": c_summary["circuits"]}
    summary = {
        "run": str(run_dir), "model": cfg.model.name, "circuits_fingerprint": c_manifest["fingerprint"],
        "analysis_settings": config_to_dict(cfg.analysis),
        "refusal_rates": rates, "sae_quality": [{k: q.get(k) for k in ("hook", "explained_variance", "ce_loss_recovered",
                                                                       "passes")} for q in quality],
        "method": c_summary["method"], "metric": c_summary["metric"], "baseline": c_summary["baseline"],
        "validation": validation,
        "emergence": {k: v["emergence"]["hook"] for k, v in emerg.items() if k.endswith("/all")},
        "modularity": {"verdicts": verdicts, "pooled_safe_vs_toxic": pooled},
        "direction": {k: direction[k] for k in ("layer", "auroc", "interventions") if k in direction},
        "over_refusal": {k: over[k] for k in ("n_prompts", "similarity_to_toxic") if k in over},
        "compared_runs": [r["run"] for r in comparison],
    }
    figs = F.build_figures(emerg, sims, cats, direction, {**c_summary, "_folder": str(circuits_dir)}, quality, rates, hooks)
    report = write_report(out_dir, f"refusal_lens report: {cfg.model.name}", _sections(
        summary, figs, emerg, sims, verdicts, pooled, direction, top, over, comparison, c_summary, quality, rates, cfg),
        summary=_headline(summary, c_summary), subtitle=f"run {run_dir}",
        links={"live status (status.json)": "../status.json", "circuits folder": "../circuits/",
               "circuit summary (JSON)": "../circuits/summary.json", "analysis summary (JSON)": "summary.json",
               "SAE quality table": "../saes/quality.csv", "refusal rates": "../activations/refusal_rates.csv"})
    if a.check_render:
        from refusal_lens.report.browser import find_chromium, render_check

        if find_chromium():
            res = render_check(report)
            summary["report_render"] = {"rendered": res.rendered, "expected": res.expected, "errors": res.errors}
            if res.errors or res.rendered != res.expected:
                logger.warning("the report rendered %d of %d figures in headless Chromium; errors: %s",
                               res.rendered, res.expected, res.errors)
    status.progress(6)
    return AnalysisResult(out_dir, report, summary)


def _headline(summary: dict, c_summary: dict) -> dict:
    rates = {f"refusal rate {r['label']}": f"{r['refused']}/{r['n']} ({r['rate']:.0%})" for r in summary["refusal_rates"]
             if r.get("category") == "ALL"} if summary["refusal_rates"] else {}
    ag = c_summary["agreement"]
    out = {**rates, "model": summary["model"], "method / metric / baseline":
           f"{summary['method']} / {summary['metric']} / {summary['baseline']}"}
    for m, v in ag.items():
        out[f"agreement {m} vs exact (features, Pearson)"] = v["features"]["pearson"]
    for k, v in summary["emergence"].items():
        out[f"emergence {k}"] = v
    for kind, v in summary["modularity"]["verdicts"].items():
        out[f"verdicts {kind}"] = ", ".join(f"{n} {k}" for k, n in v.items() if k != "median_similarity" and n)
    if summary["direction"].get("layer") is not None:
        out["refusal direction layer (held-out AUROC)"] = f"{summary['direction']['layer']} ({summary['direction']['auroc']:.3f})"
    return out


def _direction_analysis(cfg, loaded_fn, circuits_dir, saes_dir, groups, hooks, rows_of, prompts, acts_dir, c_summary,
                        show_progress) -> dict:
    from sae_lens import SAE

    info = _load(circuits_dir / "direction.json", "refusal direction")
    vectors = load_file(str(circuits_dir / "directions.safetensors"))
    layer = info["layer"]
    out = {"layer": layer, "layers": info["layers"],
           "auroc": next(d["auroc"] for d in info["layers"] if d["layer"] == layer), "interventions": {}}
    b = c_summary.get("behaviour")
    if b:
        out["interventions"]["toxic_refused_clean"] = b["conditions"]["clean"]["refusal_rate"]
        out["interventions"]["toxic_refused_direction_ablated"] = b["conditions"]["direction_ablated"]["refusal_rate"]
        out["interventions"]["toxic_refused_circuit_features_ablated"] = b["conditions"]["circuit_features_ablated"]["refusal_rate"]
        out["interventions"]["n_toxic_prompts"] = b["n_prompts"]
    a = cfg.analysis
    harmless = [p for p in prompts if p["label"] == "safe" and not p["refused"]][: a.direction_prompts]
    if harmless:
        from refusal_lens.chat import encode_prompt
        from refusal_lens.circuits.nodes import make_batch
        from refusal_lens.circuits.validate import generate
        from refusal_lens.refusal import is_refusal
        import datasets

        loaded = loaded_fn()
        texts = {r["prompt_id"]: r["prompt"] for r in datasets.load_from_disk(str(acts_dir / "prompts")).to_list()}
        seqs = [encode_prompt(loaded.tokenizer, texts[p["prompt_id"]], cfg.inference.max_prompt_tokens).ids for p in harmless]
        add = add_direction_hooks(layer, vectors[f"layer_{layer}"], a.direction_scale)
        clean, added = [], []
        for s in range(0, len(seqs), cfg.circuits.batch_size):
            batch = make_batch(seqs[s : s + cfg.circuits.batch_size], list(range(s, min(s + cfg.circuits.batch_size, len(seqs)))),
                               loaded.tokenizer.pad_token_id, site_from=0, skip_token_ids=(), window=1, device=loaded.device)
            clean += generate(loaded, batch, cfg.inference.max_new_tokens)
            added += generate(loaded, batch, cfg.inference.max_new_tokens, add)
        out["interventions"]["harmless_clean"] = float(np.mean([is_refusal(t) for t in clean]))
        out["interventions"]["harmless_direction_added"] = float(np.mean([is_refusal(t) for t in added]))
        out["interventions"]["n_harmless_prompts"] = len(harmless)
        out["interventions"]["added_examples"] = added[:3]
    # cosine of each pooled-circuit feature's decoder direction with the refusal direction at its layer
    cos, decoders = [], {}
    for key in ("toxic/all", "safe/all"):
        if key not in groups:
            continue
        for node in groups[key]["nodes"]:
            site = parse_hook_name(node["hook"])
            if node["kind"] != "feature" or site is None or site.point != "hook_resid_post" \
                    or f"layer_{site.layer}" not in vectors:
                continue
            w = _decoder(saes_dir, node["hook"], SAE, decoders)[node["feature"]]
            r = vectors[f"layer_{site.layer}"]
            cos.append({"circuit": key, "node": node["id"], "effect": node["effect"],
                        "cosine": float(torch.nn.functional.cosine_similarity(w, r, dim=0))})
    out["circuit_feature_cosines"] = cos
    # the same for random features of those hooks: the chance level
    rand = []
    g = torch.Generator().manual_seed(0)
    for hook in {c["node"].rsplit("/", 1)[0] for c in cos}:
        site = parse_hook_name(hook)
        w = _decoder(saes_dir, hook, SAE, decoders)
        idx = torch.randint(0, w.shape[0], (200,), generator=g)
        r = vectors[f"layer_{site.layer}"]
        rand += torch.nn.functional.cosine_similarity(w[idx], r[None], dim=1).tolist()
    out["random_feature_abs_cosine_mean"] = float(np.mean(np.abs(rand))) if rand else None
    out["circuit_feature_abs_cosine_mean"] = float(np.mean([abs(c["cosine"]) for c in cos])) if cos else None
    return out


def _decoder(saes_dir: Path, hook: str, sae_cls, cache: dict) -> torch.Tensor:
    if hook not in cache:
        cache[hook] = sae_cls.load_from_disk(str(saes_dir / hook), device="cpu").W_dec.detach().float()
    return cache[hook]


def _top_features(cfg, groups, acts_dir, saes_dir, loaded_fn) -> dict:
    """For the pooled circuits' top features: the prompt tokens (any prompt) where they fire most."""
    from sae_lens import SAE

    a = cfg.analysis
    tok = loaded_fn().tokenizer
    wanted: dict[str, set[int]] = {}
    for key in ("toxic/all", "safe/all"):
        if key in groups:
            for node in [n for n in groups[key]["nodes"] if n["kind"] == "feature"][: a.top_features]:
                wanted.setdefault(node["hook"], set()).add(node["feature"])
    examples: dict[str, list] = {}
    for hook, feats in wanted.items():
        acts = HookActivations(acts_dir / hook)
        is_response = np.asarray(acts.table.column("is_response").to_pylist(), dtype=bool)
        rows = np.flatnonzero(~is_response)
        sae = SAE.load_from_disk(str(saes_dir / hook), device="cpu")
        feats = sorted(feats)
        best = {f: [] for f in feats}
        with torch.no_grad():
            for s in range(0, len(rows), 4096):
                chunk = rows[s : s + 4096]
                fa = sae.encode(acts.take(chunk))[:, feats]
                for j, f in enumerate(feats):
                    vals, idx = torch.topk(fa[:, j], min(a.top_examples, len(chunk)))
                    best[f] += [(float(v), int(chunk[i])) for v, i in zip(vals, idx) if v > 0]
        by_prompt: dict[str, dict[int, int]] = {}
        for r in rows:
            by_prompt.setdefault(acts.prompt_ids[r], {})[int(acts.positions[r])] = int(acts.token_ids[r])
        for f in feats:
            top = sorted(best[f], reverse=True)[: a.top_examples]
            out = []
            for v, r in top:
                pid, pos = acts.prompt_ids[r], int(acts.positions[r])
                toks = by_prompt[pid]
                left = "".join(tok.decode([toks[p]]) for p in range(pos - 8, pos) if p in toks)
                out.append({"prompt_id": pid, "category": acts.categories[r], "label": acts.labels[r],
                            "activation": v, "token": tok.decode([toks[pos]]), "context": left})
            examples[f"{hook}/{f}"] = out
    result = {}
    for key in ("toxic/all", "safe/all"):
        if key in groups:
            result[key] = [{"node": n["id"], "effect": n["effect"], "ci": [n["ci_low"], n["ci_high"]],
                            "examples": examples.get(n["id"], [])}
                           for n in [n for n in groups[key]["nodes"] if n["kind"] == "feature"][: a.top_features]]
    return result


def _over_refusal(groups, means, effects, prompts, hooks, sizes, k) -> dict:
    """Safe prompts the model refuses: their top nodes, and how close they are to the toxic circuit."""
    over_rows = np.asarray([p["index"] for p in prompts if p["label"] == "safe" and p["refused"]
                            and p["metric_clean"] is not None])
    if len(over_rows) == 0:
        return {"n_prompts": 0}
    mean = effects[over_rows].mean(0)
    offsets = np.cumsum([0, *sizes])
    order = np.argsort(-np.abs(mean))[:k]
    nodes = []
    for i in order[:15]:
        h = int(np.searchsorted(offsets, i, side="right") - 1)
        local = int(i - offsets[h])
        nodes.append({"node": f"{hooks[h]}/{'err' if local == sizes[h] - 1 else local}", "effect": float(mean[i])})
    out = {"n_prompts": int(len(over_rows)), "top_nodes": nodes}
    if "toxic/all" in means:
        out["similarity_to_toxic"] = similarity(mean, means["toxic/all"], k)
        tox = {n["id"] for n in groups["toxic/all"]["nodes"]}
        out["shared_with_toxic_circuit"] = [n["node"] for n in nodes if n["node"] in tox]
    return out


def _compare_runs(run_dir: Path) -> list[dict]:
    rows = []
    for other in sorted(p for p in run_dir.parent.iterdir() if (p / "circuits" / "summary.json").is_file()):
        s = json.loads((other / "circuits" / "summary.json").read_text())
        cfg_text = (other / "circuits" / "config.yaml").read_text() if (other / "circuits" / "config.yaml").is_file() else ""
        model = next((line.split(":", 1)[1].strip() for line in cfg_text.splitlines() if line.strip().startswith("name:")), "?")
        rates = json.loads((other / "activations" / "refusal_rates.json").read_text()) \
            if (other / "activations" / "refusal_rates.json").is_file() else []
        pooled = {g["label"]: g for g in s["circuits"] if g["category"] == "all"}
        rows.append({
            "run": other.name, "model": model, "this run": other.resolve() == run_dir.resolve(),
            **{f"refusal {r['label']}": r["rate"] for r in rates if r.get("category") == "ALL"},
            "direction layer": s.get("direction_layer"), "direction AUROC": s.get("direction_auroc"),
            **{f"agreement {m} (features)": v["features"]["pearson"] for m, v in s["agreement"].items()},
            **{f"faithfulness {lab}": g.get("faithfulness") for lab, g in pooled.items()},
            **{f"completeness {lab}": g.get("completeness") for lab, g in pooled.items()},
        })
    return rows


def _sections(summary, figs, emerg, sims, verdicts, pooled, direction, top, over, comparison, c_summary, quality,
              rates, cfg) -> list[Section]:
    a = cfg.analysis
    fig = {name: FigureItem(name, f, cap) for name, (f, cap) in figs.items()}
    secs = [
        Section("overview", "Model, prompts and SAEs",
                intro_html="<p>Refusal is judged by the keyword rule on greedy responses; safe prompts refused are "
                           "over-refusals. SAEs are judged on held-out prompts.</p>",
                figures=[fig[n] for n in ("refusal_rates", "sae_quality") if n in fig],
                tables=[Table("Refusal rates", ["label", "category", "refused", "n", "rate"], rates),
                        Table("SAE quality (held-out)", ["hook", "explained_variance", "ce_loss_recovered", "kl_sae", "l0",
                                                         "dead_fraction", "passes"], quality)]),
        Section("validation", "Validation of the circuits by intervention",
                intro_html=f"<p>Node effects by {c_summary['method'].upper()} (error nodes: {c_summary.get('error_nodes')}) "
                           f"against exact activation patching; faithfulness = (m(C) - m(empty)) / (m(model) - m(empty)), "
                           "completeness = share of the metric removed by ablating C; behaviour = greedy generation with "
                           "the circuit's features ablated.</p>",
                figures=[fig[n] for n in ("agreement", "faithfulness", "behaviour") if n in fig],
                tables=[Table("Agreement with exact patching", ["method", "nodes", "pearson", "spearman", "n"],
                              [{"method": m, "nodes": kind, **v[kind]} for m, v in c_summary["agreement"].items()
                               for kind in ("overall", "features", "error_nodes")]),
                        Table("Circuits", ["label", "category", "n_prompts", "size", "gap", "faithfulness", "completeness",
                                           "random_faithfulness", "error_nodes"], c_summary["circuits"])]),
        Section("emergence", "Where refusal emerges",
                intro_html=f"<p>Total |effect| of each hook's nodes (mean over a group's prompts); the emergence hook is "
                           f"the first where the cumulative share reaches {a.emergence_share:.0%}. Residual-stream hooks "
                           "carry overlapping information, so totals are not additive across layers.</p>",
                figures=[fig[n] for n in ("emergence_pooled", "emergence_toxic", "emergence_safe") if n in fig],
                tables=[Table("Emergence hook per group", ["group", "n_prompts", "emergence"],
                              [{"group": k, "n_prompts": v["n_prompts"], "emergence": v["emergence"]["hook"]}
                               for k, v in emerg.items()])]),
        Section("modularity", "One mechanism or many?",
                intro_html=f"<p>Similarity = weighted Jaccard of node effects over the union of both circuits' top "
                           f"{a.similarity_top_k} nodes (same sign only). p = permutation test against random circuits "
                           f"of the same size ({a.permutations} draws); CI = bootstrap over prompts ({a.bootstrap}). "
                           f"Verdict: monolithic if similarity &ge; {a.monolithic_threshold} and p &lt; {a.alpha}; "
                           f"partially modular if &ge; {a.partial_threshold} and p &lt; {a.alpha}; else modular; "
                           f"insufficient below {a.min_prompts} prompts per group.</p>",
                figures=[fig[n] for n in ("similarity_safe", "similarity_toxic", "similarity_safe_x_toxic") if n in fig],
                tables=[Table("Verdicts", ["pair type", "monolithic", "partially modular", "modular", "insufficient",
                                           "median_similarity"],
                              [{"pair type": k, **v} for k, v in verdicts.items()]),
                        Table("Pooled safe vs toxic circuit", ["similarity", "ci_low", "ci_high", "p_value"],
                              [pooled] if pooled else []),
                        Table("Every pair", ["pair", "a", "b", "similarity", "ci_low", "ci_high", "p_value", "n_a", "n_b",
                                             "verdict"], sims)]),
        Section("direction", "The refusal direction (difference in means)",
                intro_html="<p>Arditi et al. 2024: mean(toxic) - mean(safe) at the last prompt token, per layer; AUROC "
                           "on held-out prompts. Ablation projects it out of every write to the residual stream; "
                           "addition adds it at the chosen layer.</p>",
                figures=[fig[n] for n in ("direction_auroc", "direction_cosines") if n in fig],
                tables=[Table("Interventions (refusal rate, keyword rule)", ["intervention", "value"],
                              [{"intervention": k, "value": v} for k, v in direction.get("interventions", {}).items()
                               if not isinstance(v, list)])]),
        Section("features", "Top features of the pooled circuits",
                intro_html="<p>Each feature's effect (with its bootstrap CI) and the prompt tokens where it fires most "
                           "(from the stored activations of every prompt).</p>",
                tables=[Table(f"{key}", ["node", "effect", "ci", "token", "context", "activation", "category", "label"],
                              [{"node": t["node"], "effect": t["effect"], "ci": f"[{t['ci'][0]:.3g}, {t['ci'][1]:.3g}]",
                                **({k: e[k] for k in ("token", "context", "activation", "category", "label")}
                                   if (e := (t["examples"][:1] or [None])[0]) else {})}
                               for t in rows]) for key, rows in top.items()]),
        Section("over_refusal", "Over-refusal",
                intro_html=f"<p>Safe prompts the model refuses ({over.get('n_prompts', 0)}): the nodes that drive the "
                           f"refusal score there, and their similarity to the pooled toxic circuit "
                           f"({over.get('similarity_to_toxic', float('nan')):.3f}).</p>",
                tables=[Table("Top nodes on over-refused safe prompts", ["node", "effect"], over.get("top_nodes", []))],
                notes=[f"shared with the toxic circuit: {', '.join(over.get('shared_with_toxic_circuit', [])) or 'none'}"]),
    ]
    if comparison:
        cols = list(dict.fromkeys(k for r in comparison for k in r))
        secs.append(Section("models", "Runs side by side", intro_html="<p>Every run in this results folder with circuits.</p>",
                            tables=[Table("Runs", cols, comparison)]))
    return secs
