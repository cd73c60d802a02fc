"""Stage 5, analyze: the evidence, measured on test prompts, gathered into ``summary.json`` and one offline report.

Reads the earlier stages' folders (nothing here selects or tunes anything):

* **data and judge** (collect): prompts per split, refusal rates with Wilson intervals, the refusal score's
  AUROC against the judge on test prompts;
* **the refusal direction** (direction): the reference's table (test), its random controls, KL and CE, the
  candidates, emergence by intervention, per-category directions and the cross-ablation matrix, the
  over-refusal experiment;
* **the circuits** (discover): behaviour against K, random sets and the direction (test), induction,
  faithfulness and completeness with random distributions, agreement with exact patching by stratum;
* **one mechanism or many, by circuit similarity** (:mod:`.similarity`, on test effects; computed here);
* the SAEs' quality (test; the bar on validation), the top features with their most activating tokens,
  other runs of the results folder.

Every entry below the power floor (``analysis.min_prompts`` test prompts) says *insufficient* and why.

Output folder (``analysis/``): ``report.html``, ``figures/<name>.html`` (+ one shared ``plotly.min.js``),
``summary.json`` (the evidence: what the README's results are written from), ``similarity.json``,
``top_features.json``.
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

from refusal_lens import durable
from refusal_lens.activations.store import HookActivations
from refusal_lens.analysis import figures as F
from refusal_lens.analysis.similarity import per_site_effects, similarity_tables, verdict_counts
from refusal_lens.analysis.stats import wilson_interval
from refusal_lens.behaviour import paired_fraction_interval
from refusal_lens.circuits.behaviour import curve_condition
from refusal_lens.collect import MANIFEST
from refusal_lens.config import Config, config_to_dict
from refusal_lens.distributed import Dist
from refusal_lens.errors import UserError
from refusal_lens.report.html import FigureItem, Section, Table, write_report
from refusal_lens.report.numbers import by_method, fmt_rate, fmt_share, num, share_note
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)


class AnalysisError(UserError, RuntimeError):
    """The circuits (or earlier stages) are missing."""


@dataclass
class AnalysisResult:
    folder: Path
    report: Path
    summary: dict
    skipped: bool = False


def _load(path: Path, what: str):
    if not path.is_file():
        raise AnalysisError(f"no {what} at {path}: run the earlier stages (`refusal-lens run`) first")
    return json.loads(path.read_text())


def _optional(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def run_analysis_stage(cfg: Config, loaded_fn, run_dir: Path, *, force: bool = False, dist: Dist = Dist(),
                       show_progress: bool = True, status: StatusFile | None = None) -> AnalysisResult:
    """Analyse ``run_dir`` and write ``run_dir/analysis``. ``loaded_fn()`` gives the model (its tokenizer decodes
    the top features' examples). Runs on rank 0; the others wait."""
    status = status if status is not None else StatusFile(None)
    out_dir = run_dir / "analysis"
    c_manifest = _load(run_dir / "circuits" / MANIFEST, "circuits")
    if c_manifest.get("status") != "complete":
        raise AnalysisError(f"the circuits in {run_dir / 'circuits'} are not finished: run `refusal-lens discover` first")
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
    result = _analyse(cfg, loaded_fn, run_dir, out_dir, c_manifest, status)
    result.summary["seconds"] = time.perf_counter() - t0
    durable.write_json(done, result.summary)
    dist.barrier()
    return result


def rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n) if n else (None, None)
    return {"n": n, "k": k, "rate": k / n if n else None, "ci": [lo, hi]}


def _data_evidence(acts: dict, rates: list[dict]) -> dict:
    test = {r["label"]: rate(r["refused"], r["n"]) | {"incoherent": r["incoherent"]}
            for r in rates if r["split"] == "test" and r["category"] == "ALL"}
    return {"split_counts": acts.get("split_counts"), "refusal_test": test, "score_auroc": acts.get("score_auroc"),
            "refusal_tokens": acts.get("refusal_tokens", {}).get("tokens"),
            "refusal_tokens_source": acts.get("refusal_tokens", {}).get("source")}


def _analyse(cfg: Config, loaded_fn, run_dir: Path, out_dir: Path, c_manifest: dict, status: StatusFile) -> AnalysisResult:
    a = cfg.analysis
    acts_dir, circuits_dir, direction_dir = run_dir / "activations", run_dir / "circuits", run_dir / "direction"
    status.progress(0, 4, "part")
    acts = _load(acts_dir / MANIFEST, "activations")
    rates = _load(acts_dir / "refusal_rates.json", "refusal rates")
    quality = _load(run_dir / "saes" / "quality.json", "SAE quality table")
    c_summary = _load(circuits_dir / "summary.json", "circuit summary")
    d_summary = _load(direction_dir / "summary.json", "direction summary")
    direction = {name: _optional(direction_dir / f"{name}.json")
                 for name in ("direction", "candidates", "evaluation", "categories", "over_refusal", "emergence")}
    val = circuits_dir / "validation"
    behaviour = _optional(val / "behaviour.json")
    faithfulness = _optional(val / "faithfulness.json")
    agreement = _optional(val / "agreement.json")
    fraction_ci = None
    if behaviour and (val / "responses.jsonl").is_file():
        h = behaviour["headline"]
        head = curve_condition(h["method"], h["intervention"], h["k"])
        fraction_ci = paired_fraction_interval(val / "responses.jsonl", "clean", head, "direction_ablated",
                                               draws=a.interval_draws, seed=cfg.circuits.seed)
    groups = {}
    for label in ("safe", "toxic"):
        for path in sorted((circuits_dir / label).glob("*.json")):
            doc = json.loads(path.read_text())
            groups[f"{doc['label']}/{doc['category']}"] = doc
    status.progress(1)

    # ---- one mechanism or many: circuit similarity on test effects
    prompts = {p["prompt_id"]: p for p in _load(circuits_dir / "prompts.json", "attributed prompts")}
    eff_path = circuits_dir / "effects" / "test.safetensors"
    sims: list[dict] = []
    if eff_path.is_file():
        t = load_file(str(eff_path))
        index = {int(r): i for i, r in enumerate(t["rows"].tolist())}
        by_index = {p["index"]: p for p in prompts.values()}
        effects = {}
        for key, doc in groups.items():
            rows = [index[p["index"]] for pid in doc["prompt_ids"]["test"] if (p := prompts.get(pid)) and p["index"] in index]
            if rows:
                n_content = [by_index[t["rows"][r].item()]["n_content_tokens"] for r in rows]
                effects[key] = per_site_effects(t["features"][rows], n_content)
        cats = sorted({doc["category"] for doc in groups.values() if doc["category"] != "all"})
        sims = similarity_tables(effects, cats, alpha=a.alpha, min_prompts=a.min_prompts, shared_margin=a.shared_margin,
                                 permutations=a.permutations, draws=a.interval_draws, seed=cfg.circuits.seed)
    durable.write_json(out_dir / "similarity.json", sims)
    status.progress(2)

    # ---- top features
    top = _top_features(cfg, groups, acts_dir, run_dir / "saes", loaded_fn)
    durable.write_json(out_dir / "top_features.json", top)
    status.progress(3)

    summary = evidence(cfg, acts, rates, quality, d_summary, direction, c_summary, behaviour, faithfulness, agreement,
                       sims, groups, fraction_ci)
    summary.update({"circuits_fingerprint": c_manifest["fingerprint"], "analysis_settings": config_to_dict(a),
                    "run": run_dir.name, "model": cfg.model.name})
    comparison = _compare_runs(run_dir) if a.compare_runs else []
    figs = F.report_figures(rates, quality, direction, behaviour, faithfulness, agreement, sims)
    sections = _sections(summary, figs, rates, quality, direction, behaviour, faithfulness, agreement, sims, top,
                         comparison, cfg)
    report = write_report(out_dir, f"refusal_lens: {cfg.model.name}", sections, summary=headline_table(summary),
                          links={"status.json": "../status.json", "circuits/": "../circuits/",
                                 "direction/": "../direction/", "SAE quality": "../saes/quality.csv",
                                 "refusal rates": "../activations/refusal_rates.csv"},
                          subtitle="Every number below is measured on the test split (prompts never used to select "
                                   "or fit anything), with its n and a 95% interval.")
    if a.check_render:
        from refusal_lens.report.browser import find_chromium, render_check

        if find_chromium() is not None:
            res = render_check(report)
            summary["report_render"] = {"rendered": res.rendered, "expected": res.expected, "errors": res.errors}
            if res.errors or res.rendered != res.expected:
                logger.warning("the report rendered %d of %d figures in headless Chromium; errors: %s",
                               res.rendered, res.expected, res.errors)
    status.progress(4)
    return AnalysisResult(out_dir, report, summary)


# --------------------------------------------------------------------------------------------
# The evidence
# --------------------------------------------------------------------------------------------


def _underpowered(n: int | None, floor: int) -> str | None:
    if n is None or n < floor:
        return f"insufficient: {n or 0} test prompts, below the power floor of {floor} (analysis.min_prompts)"
    return None


def evidence(cfg, acts, rates, quality, d_summary, direction, c_summary, behaviour, faithfulness, agreement, sims,
             groups, fraction_ci: dict | None = None) -> dict:
    """The headline numbers, each with its n and interval (test split), and notes on what is underpowered.
    ``fraction_ci`` is the paired bootstrap interval of the headline circuit's share of the direction's effect
    (:func:`refusal_lens.behaviour.paired_fraction_interval`)."""
    a = cfg.analysis
    data = _data_evidence(acts, rates)
    out: dict = {"data": data}
    out["direction"] = {k: d_summary[k] for k in ("direction", "harmful_refused", "harmful", "harmless", "random_ablated",
                                                   "random_added", "kl_harmless", "ce_harmless", "emergence",
                                                   "cross_ablation_verdicts", "over_refusal")}
    notes = []
    n_ref = (d_summary["harmful_refused"]["clean"] or {}).get("n")
    if (why := _underpowered(n_ref, a.min_prompts)):
        notes.append(f"direction evaluation on refused harmful prompts: {why}")
    fitted, chosen = (d_summary["direction"]["splits"][s] for s in ("discovery", "validation"))
    if min(fitted["harmful"], fitted["harmless"], chosen["harmful"], chosen["harmless"]) < a.min_prompts:
        notes.append(f"the direction is a mean difference of {fitted['harmful']} harmful and {fitted['harmless']} harmless "
                     f"discovery prompts, selected on {chosen['harmful']} harmful and {chosen['harmless']} harmless "
                     f"validation prompts (those direction.keep={cfg.direction.keep!r} kept), fewer than {a.min_prompts} "
                     "on a side")
    if behaviour:
        h = behaviour["headline"]
        out["circuit_behaviour"] = {
            "n": behaviour["n_prompts"], "clean": _rate_of(behaviour["clean"]), "direction": _rate_of(behaviour["direction"]),
            "circuit": {k: h[k] for k in ("method", "k", "intervention", "positions", "refusal_rate", "ci", "n",
                                          "fraction_of_direction", "coherent_rate", "incoherent_rate", "random_p_value",
                                          "random_mean", "smallest_k_reaching_90")}
                       | {"fraction_ci": (fraction_ci or {}).get("ci", [None, None])},
            "random": {k: behaviour["random"]["controls"][k] for k in ("n", "mean", "q05", "q95", "p_value")},
            "random_fraction_of_direction_mean": behaviour["random"]["fraction_of_direction_mean"],
            "induction": {"clean": _rate_of(behaviour["induction"]["clean"]),
                          "direction_actadd": _rate_of(behaviour["induction"]["direction_actadd"]),
                          "circuits": [{"method": i["method"], "k": i["k"], **_rate_of(i)}
                                       for i in behaviour["induction"]["curve"]],
                          "random": {k: behaviour["induction"]["random"][k] for k in ("n", "mean", "p_value")}},
        }
        if (why := _underpowered(behaviour["n_prompts"], a.min_prompts)):
            notes.append(f"circuit behaviour: {why}")
    out["faithfulness"] = c_summary.get("faithfulness")
    for key, v in (c_summary.get("faithfulness") or {}).items():
        if (why := _underpowered(v["n_prompts"], a.min_prompts)):
            notes.append(f"faithfulness of {key}: {why}")
    out["agreement"] = c_summary.get("agreement")
    out["agreement_prompts"] = c_summary.get("agreement_prompts")
    out["similarity"] = {"verdicts": verdict_counts(sims),
                         "pooled_safe_x_toxic": next((s for s in sims if s["table"] == "pooled safe x toxic"), None)}
    insufficient = sum(1 for s in sims if s["verdict"] == "insufficient")
    if sims and insufficient:
        notes.append(f"circuit similarity: {insufficient} of {len(sims)} pairs are insufficient (a group with fewer than "
                     f"{a.min_prompts} refused test prompts)")
    cross = (direction.get("categories") or {}).get("cross_ablation") or {}
    n_cells = sum(1 for c in cross.get("cells", []) if c["direction"] != c["category"])
    n_insuff = sum(1 for c in cross.get("cells", []) if c["direction"] != c["category"] and c["verdict"] == "insufficient")
    if n_insuff:
        notes.append(f"cross-ablation: {n_insuff} of {n_cells} cells are insufficient (fewer than {a.min_prompts} refused "
                     "test prompts in the category, or no effect of its own direction)")
    out["saes"] = [{k: q.get(k) for k in ("hook", "explained_variance", "ce_loss_recovered", "ce_increase", "kl_sae",
                                          "val_explained_variance", "val_ce_loss_recovered", "passes",
                                          "distinct_train_rows")} for q in quality]
    out["underpowered"] = notes
    return out


def _rate_of(s: dict) -> dict:
    return {k: s.get(k) for k in ("n", "refusal_rate", "ci", "incoherent_rate")}


def headline_table(s: dict) -> dict:
    """The report's summary: the evidence on test prompts, one line each."""
    d, data = s["direction"], s["data"]
    out = {}
    auroc = (data.get("score_auroc") or {}).get("test") or {}
    out["refusal score vs judge (test)"] = (f"AUROC {auroc.get('auroc', float('nan')):.3f} "
                                            f"({auroc.get('n_refused')} refused, {auroc.get('n_complied')} complied)")
    for label, r in (data.get("refusal_test") or {}).items():
        out[f"{label} refused (test)"] = fmt_rate(r)
    out["direction"] = f"{d['direction']['hook']}, position {d['direction']['position']}"
    hr = d["harmful_refused"]
    out["refused harmful: clean -> ablated -> ActAdd(-r)"] = " -> ".join(fmt_rate(hr[k]) for k in
                                                                           ("clean", "ablated", "actadd_minus"))
    out["harmless: clean -> ActAdd(+r)"] = " -> ".join(fmt_rate(d["harmless"][k]) for k in ("clean", "actadd_plus"))
    ra = d["random_ablated"]
    if ra.get("n"):
        out["random directions ablated"] = f"mean {ra['mean']:.0%} (5-95%: {ra['q05']:.0%}-{ra['q95']:.0%}, n={ra['n']}); " \
                                           f"p = {ra['p_value']:.3f}"
    if d["kl_harmless"].get("mean") is not None:
        out["KL on harmless under ablation"] = f"{d['kl_harmless']['mean']:.4f} [{d['kl_harmless']['ci'][0]:.4f}, " \
                                               f"{d['kl_harmless']['ci'][1]:.4f}] (n={d['kl_harmless']['n']})"
    b = s.get("circuit_behaviour")
    if b:
        c = b["circuit"]
        out["circuit: clean / circuit / random / direction"] = (
            f"{fmt_rate(b['clean'])} / {fmt_rate(c)} / mean {b['random']['mean']:.0%} (p = {b['random']['p_value']:.3f}, "
            f"{b['random']['n']} sets) / {fmt_rate(b['direction'])}")
        out[f"circuit ({c['method']}, K={c['k']}, {c['intervention']}): share of the direction's effect"] = (
            fmt_share(c["fraction_of_direction"], c.get("fraction_ci")) + share_note(c["fraction_of_direction"]) + f"; coherent {c['coherent_rate']:.0%}; "
            f"smallest K reaching 90%: {by_method(c['smallest_k_reaching_90'])}")
    for key, v in (s.get("faithfulness") or {}).items():
        pts = "; ".join(f"{p['size']}: {num(p['faithfulness'])} (random {num(p['random_faithfulness_mean'])}, p="
                        f"{num(p['faithfulness_p'], '.3f')})" for p in v["points"])
        out[f"faithfulness {key} (n={v['n_prompts']})"] = pts
    for m, v in (s.get("agreement") or {}).items():
        st = v["strata"]
        out[f"agreement {m} vs exact (Pearson; n pairs)"] = ", ".join(
            f"{k} {num(st[k].get('pearson'))} ({st[k].get('n', 0)})" for k in ("error", "top", "random"))
    out["circuit similarity verdicts"] = "; ".join(f"{t}: " + ", ".join(f"{n} {v}" for v, n in c.items() if n)
                                                   for t, c in s["similarity"]["verdicts"].items()) or "-"
    for note in s["underpowered"]:
        out.setdefault("underpowered", "")
        out["underpowered"] = (out["underpowered"] + "; " if out["underpowered"] else "") + note
    return out


# --------------------------------------------------------------------------------------------
# Top features, other runs
# --------------------------------------------------------------------------------------------


def _top_features(cfg, groups, acts_dir: Path, saes_dir: Path, loaded_fn) -> dict:
    """For the pooled circuits' top promoting features: the prompt tokens (any prompt) where they fire most."""
    from sae_lens import SAE

    a = cfg.analysis
    tok = loaded_fn().tokenizer
    wanted: dict[str, set[int]] = {}
    for key in ("toxic/all", "safe/all"):
        for node in (groups.get(key) or {}).get("promoting", [])[: a.top_features]:
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
            out = []
            for v, r in sorted(best[f], reverse=True)[: a.top_examples]:
                pid, pos = acts.prompt_ids[r], int(acts.positions[r])
                toks = by_prompt[pid]
                left = "".join(tok.decode([toks[p]]) for p in range(pos - 8, pos) if p in toks)
                out.append({"prompt_id": pid, "category": acts.categories[r], "label": acts.labels[r],
                            "activation": v, "token": tok.decode([toks[pos]]), "context": left})
            examples[f"{hook}/{f}"] = out
    return {key: [{"node": n["id"], "effect_test": n["effect_test"], "ci": [n["ci_low"], n["ci_high"]],
                   "cosine": n["cosine_with_direction"], "examples": examples.get(n["id"], [])}
                  for n in (groups.get(key) or {}).get("promoting", [])[: a.top_features]]
            for key in ("toxic/all", "safe/all") if key in groups}


def _compare_runs(run_dir: Path) -> list[dict]:
    rows = []
    for other in sorted(p for p in run_dir.parent.iterdir() if (p / "analysis" / "summary.json").is_file()
                        or p.resolve() == run_dir.resolve()):
        path = other / "analysis" / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        d = s.get("direction", {})
        b = s.get("circuit_behaviour") or {}
        rows.append({"run": other.name, "model": s.get("model"), "this run": other.resolve() == run_dir.resolve(),
                     "direction": (d.get("direction") or {}).get("hook"),
                     "refused harmful ablated": ((d.get("harmful_refused") or {}).get("ablated") or {}).get("refusal_rate"),
                     "circuit share of direction": (b.get("circuit") or {}).get("fraction_of_direction")})
    return rows


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _sections(summary, figs, rates, quality, direction, behaviour, faithfulness, agreement, sims, top, comparison,
              cfg) -> list[Section]:
    a = cfg.analysis
    fig = {name: FigureItem(name, f, cap) for name, (f, cap) in figs.items()}

    def figs_of(*names):
        return [fig[n] for n in names if n in fig]

    ev = direction.get("evaluation") or {}
    cond = ev.get("conditions", {})
    direction_rows = [{"prompts": k.split("/")[0], "condition": k.split("/")[1], "n": v["n"],
                       "refusal rate": v["refusal_rate"], "95% CI": _ci(v["ci"]), "incoherent": v["incoherent_rate"]}
                      for k, v in cond.items()]
    secs = [Section(
        "evidence", "Evidence (test split)",
        intro_html="<p>The split into discovery / validation / test is made once by the collect stage (stratified by "
                   "label x category x refused). Directions and circuits are fitted on discovery, every choice is made "
                   "on validation, and every number here is measured on test. Rates carry Wilson 95% intervals, means "
                   f"bootstrap intervals over prompts. Entries below {a.min_prompts} test prompts are marked "
                   "insufficient.</p>",
        notes=summary["underpowered"] or ["no entry is below the power floor"])]
    secs.append(Section(
        "direction", "The refusal direction (Arditi et al. 2024)",
        intro_html="<p>Candidates: difference in means of every block input at every post-instruction position "
                   "(discovery). Selection on validation: bypass (refusal score with the direction ablated everywhere), "
                   "induce (score of harmless prompts with it added), KL on harmless prompts; filters KL &le; "
                   f"{cfg.direction.kl_max}, induce &gt; {cfg.direction.induce_min}, layer &lt; "
                   f"{cfg.direction.max_layer_fraction} L; lowest bypass. Evaluation on test by greedy generation, judged "
                   "(incoherent responses counted apart). Notes of the selection: "
                   f"{'; '.join((direction.get('direction') or {}).get('filters', {}).get('notes', [])) or 'none'}.</p>",
        figures=figs_of("direction_evaluation", "direction_candidates", "emergence"),
        tables=[Table("Refusal rates on test prompts (the reference's layout)",
                      ["prompts", "condition", "n", "refusal rate", "95% CI", "incoherent"], direction_rows),
                Table("Random controls", ["control", "n", "mean", "q05", "q95", "p_value"],
                      [{"control": k, **{q: ev.get(k, {}).get(q) for q in ("n", "mean", "q05", "q95", "p_value")}}
                       for k in ("random_ablated", "random_added")]),
                Table("KL and CE on harmless test prompts under ablation", ["measure", "value"],
                      [{"measure": "KL (first response token)", "value": (ev.get("kl_harmless") or {}).get("mean")},
                       {"measure": "CE clean (nats/token)", "value": (ev.get("ce_harmless") or {}).get("clean")},
                       {"measure": "CE ablated (nats/token)", "value": (ev.get("ce_harmless") or {}).get("ablated")}])]))
    if behaviour:
        curve_rows = [{k: c[k] for k in ("method", "k", "intervention", "positions", "n", "refusal_rate",
                                          "incoherent_rate", "fraction_of_direction")} | {"95% CI": _ci(c["ci"])}
                      for c in behaviour["curve"]]
        ind = behaviour["induction"]
        secs.append(Section(
            "circuits", "Refusal circuits: behaviour on test prompts",
            intro_html="<p>Refusal-promoting SAE features (ranked on discovery by each selection method) ablated while "
                       "the model answers the refused toxic test prompts; against matched random feature sets and the "
                       "refusal direction. fraction_of_direction = (clean - circuit) / (clean - direction). Induction: "
                       "the promoting features set to their refused-prompt means on harmless test prompts.</p>",
            figures=figs_of("k_curve"),
            tables=[Table("Refusal rate against K", ["method", "k", "intervention", "positions", "n", "refusal_rate",
                                                      "95% CI", "incoherent_rate", "fraction_of_direction"], curve_rows),
                    Table("Induction on harmless test prompts", ["condition", "n", "refusal rate", "95% CI"],
                          [{"condition": "clean", "n": ind["clean"]["n"], "refusal rate": ind["clean"]["refusal_rate"],
                            "95% CI": _ci(ind["clean"]["ci"])},
                           {"condition": "direction ActAdd(+r)", "n": ind["direction_actadd"]["n"],
                            "refusal rate": ind["direction_actadd"]["refusal_rate"],
                            "95% CI": _ci(ind["direction_actadd"]["ci"])}]
                          + [{"condition": f"{i['method']} K={i['k']} steered", "n": i["n"], "refusal rate": i["refusal_rate"],
                              "95% CI": _ci(i["ci"])} for i in ind["curve"]])]))
    secs.append(Section(
        "validation", "Faithfulness, completeness, agreement (test prompts)",
        intro_html="<p>Faithfulness = (m(C) - m(empty)) / (m(model) - m(empty)) with every node outside C at its class "
                   "mean at every site after the template's opening (no unpatched site); completeness = the share removed "
                   "by ablating C alone. Each size has random node sets of the same size. Agreement: exact patching of "
                   "error nodes, top features by |estimate| and random active features (equal strata).</p>",
        figures=figs_of("faithfulness", "agreement"),
        tables=[Table("Faithfulness and completeness", ["group", "size", "faithfulness", "faithfulness_ci",
                                                         "random_faithfulness_mean", "faithfulness_p", "completeness",
                                                         "completeness_ci", "random_completeness_mean", "completeness_p"],
                      [{"group": k, **{q: p.get(q) for q in ("size", "faithfulness", "random_faithfulness_mean",
                                                               "faithfulness_p", "completeness", "random_completeness_mean",
                                                               "completeness_p")},
                        "faithfulness_ci": _ci(p.get("faithfulness_ci")), "completeness_ci": _ci(p.get("completeness_ci"))}
                       for k, v in (faithfulness or {}).items() for p in v["points"]]),
                Table("Agreement with exact patching", ["method", "stratum", "n", "pearson", "spearman", "sign_agreement",
                                                        "median_relative_error"],
                      [{"method": m, "stratum": s, **v["strata"][s]} for m, v in (agreement or {}).get("methods", {}).items()
                       for s in ("error", "top", "random")]
                      + [{"method": m, "stratum": f"hook type {t}", **x} for m, v in (agreement or {}).get("methods", {}).items()
                         for t, x in v["by_hook_type"].items()])]))
    cats = direction.get("categories") or {}
    cross = cats.get("cross_ablation") or {}
    over = direction.get("over_refusal") or {}
    secs.append(Section(
        "mechanisms", "One mechanism or many?",
        intro_html="<p><b>By intervention</b>: each category's own direction (discovery) ablated, and the refusal rate "
                   "measured on every category's refused toxic test prompts; transfer = the share of B's own ablation "
                   f"effect that A's direction reaches (shared: its lower bound &ge; {a.shared_margin}; distinct: its upper "
                   f"bound &lt; {a.shared_margin}). <b>By circuit similarity</b>: per-prompt test effects of two groups, a "
                   "permutation null (prompts swapped between groups), split-half noise ceilings, normalised similarity "
                   "with its interval, Benjamini-Hochberg across each table; shared only from positive evidence "
                   f"(lower bound &ge; {a.shared_margin}), never from a large p-value.</p>",
        figures=figs_of("cross_ablation", "direction_cosines", "similarity_toxic", "similarity_safe",
                        "similarity_safe_x_toxic"),
        tables=[Table("Cross-ablation", ["direction", "category", "n", "clean_rate", "refusal_rate", "transfer",
                                         "transfer_ci", "verdict"],
                      [{**c, "transfer_ci": _ci(c.get("transfer_ci"))} for c in cross.get("cells", [])]),
                Table("Circuit similarity: verdicts", ["table", "shared", "distinct", "indeterminate", "insufficient"],
                      [{"table": t, **c} for t, c in verdict_counts(sims).items()]),
                Table("Circuit similarity: every pair", ["table", "a", "b", "n_a", "n_b", "normalised", "normalised_ci",
                                                         "p_value", "q_value", "verdict", "reason"],
                      [{**s, "normalised_ci": _ci(s.get("normalised_ci"))} for s in sims]),
                Table("Over-refusal direction (refused safe - refused toxic) on test prompts",
                      ["condition", "safe refused", "safe 95% CI", "toxic refused", "toxic 95% CI"],
                      [{"condition": k, "safe refused": v["safe"]["refusal_rate"], "safe 95% CI": _ci(v["safe"]["ci"]),
                        "toxic refused": v["toxic"]["refusal_rate"], "toxic 95% CI": _ci(v["toxic"]["ci"])}
                       for k, v in (over.get("conditions") or {}).items()])],
        notes=[f"categories without a direction (fewer than 2 discovery prompts): {cats.get('without_direction')}"]
        if cats.get("without_direction") else []))
    secs.append(Section(
        "data", "Prompts, judge and SAEs",
        intro_html="<p>Responses are judged refused / complied / incoherent by documented rules "
                   "(refusal_lens/judge.py). The refusal score is the log-odds of the refusal-start tokens learned from "
                   "the discovery responses; its AUROC against the judge is measured on test. SAE quality: test split "
                   "(the bar on validation), CE loss recovered against mean ablation.</p>",
        figures=figs_of("refusal_rates", "sae_quality"),
        tables=[Table("Refusal rates by split", ["split", "label", "category", "refused", "incoherent", "n", "rate"],
                      [r for r in rates if r["category"] == "ALL"]),
                Table("Refusal score vs judge", ["split", "auroc", "n_refused", "n_complied"],
                      [{"split": k, **v} for k, v in (summary["data"].get("score_auroc") or {}).items()]),
                Table("SAE quality (test; passes = the bar on validation)", ["hook", "explained_variance",
                                                                             "ce_loss_recovered", "ce_increase", "kl_sae",
                                                                             "l0", "dead_fraction", "distinct_train_rows",
                                                                             "val_explained_variance", "passes"], quality)]))
    secs.append(Section(
        "features", "Top promoting features of the pooled circuits",
        intro_html="<p>Each feature's test effect (bootstrap interval over test prompts), its decoder's cosine with the "
                   "refusal direction, and the prompt token where it fires most.</p>",
        tables=[Table(key, ["node", "effect_test", "ci", "cosine", "token", "context", "activation", "category", "label"],
                      [{"node": t["node"], "effect_test": t["effect_test"], "ci": _ci(t["ci"]), "cosine": t["cosine"],
                        **({k: e[k] for k in ("token", "context", "activation", "category", "label")}
                           if (e := (t["examples"][:1] or [None])[0]) else {})} for t in rows]) for key, rows in top.items()]))
    if comparison:
        cols = list(dict.fromkeys(k for r in comparison for k in r))
        secs.append(Section("models", "Runs side by side", intro_html="<p>Every analysed run in this results folder.</p>",
                            tables=[Table("Runs", cols, comparison)]))
    return secs


def _ci(ci: Sequence | None) -> str:
    if not ci or ci[0] is None or ci[0] != ci[0]:
        return "-"
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"
