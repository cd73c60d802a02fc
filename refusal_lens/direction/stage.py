"""Stage 2, direction: the refusal direction of Arditi et al. 2024, selected by cause and evaluated on test.

Reads the collect stage's prompts (split, judgement, refusal score); runs the model. Table of contents:

1. **contrast** — harmful = toxic prompts the model agrees with (refusal score > 0), harmless = harmless
   prompts it agrees with (score < 0), per split (discovery fits, validation selects, test reports);
2. **candidates** — difference in means of every block input at every post-instruction position
   (:mod:`.candidates`), on discovery;
3. **selection** — screen every candidate, measure bypass / induce / KL of the shortlist, filter, choose
   (:mod:`.select`), on validation; saved as ``direction.safetensors`` + ``direction.json`` (:mod:`.io`);
4. **evaluation** — the reference's table on test, with random controls, KL and CE (:mod:`.evaluate`);
5. **categories** — per-category directions, their cosines, the cross-ablation matrix (:mod:`.categories`);
6. **over-refusal** — the refused-safe vs refused-toxic direction, ablated and subtracted;
7. **emergence** — ablation from layer l on (:mod:`.emergence`).

Output folder (``direction/``): ``direction.safetensors``, ``direction.json``, ``candidates.json`` (every
candidate's estimates and exact scores), ``evaluation.json``, ``categories.json``, ``over_refusal.json``,
``emergence.json``, ``responses/*.jsonl`` (every generated response of every condition, judged),
``figures/*.html``, ``summary.json``, ``manifest.json``. Each part is written once and skipped on rerun;
``--force`` redoes the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_lens import durable
from refusal_lens.behaviour import ResponseAudit
from refusal_lens.collect import MANIFEST, Collected, load_collected
from refusal_lens.config import Config, config_to_dict
from refusal_lens.direction.candidates import Candidates, difference_in_means
from refusal_lens.direction.categories import (
    bootstrap_cosines,
    cosine_matrix,
    cross_ablation,
    over_refusal,
    site_activations,
)
from refusal_lens.direction.emergence import emergence_curve
from refusal_lens.direction.evaluate import evaluate_direction
from refusal_lens.direction.io import DIRECTION_JSON, load_direction, save_direction
from refusal_lens.direction.select import select_direction
from refusal_lens.distributed import Dist
from refusal_lens.errors import UserError
from refusal_lens.hooks import hook_name
from refusal_lens.intervene import Intervener
from refusal_lens.stage_folder import part, prepare
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)

PARTS = ("candidates", "selection", "evaluation", "categories", "over_refusal", "emergence", "figures")


class DirectionError(UserError, RuntimeError):
    """Missing inputs (no harmful or harmless prompts the model agrees with), or a folder of other settings."""


@dataclass
class DirectionResult:
    folder: Path
    summary: dict
    skipped: bool = False


@dataclass
class Contrast:
    """Row indices (into the prompts table) of each split's contrast sets."""

    harmful: dict[str, list[int]]
    harmless: dict[str, list[int]]
    dropped: dict[str, dict[str, int]]  # prompts left out because the model does not agree with their side

    def counts(self) -> dict:
        return {s: {"harmful": len(self.harmful[s]), "harmless": len(self.harmless[s]),
                    "harmful_dropped": self.dropped[s]["harmful"], "harmless_dropped": self.dropped[s]["harmless"]}
                for s in self.harmful}


def agrees(row: dict, harmful: bool, keep: str) -> bool:
    """Whether the model agrees with a prompt's side: ``score`` (refusal score > 0 harmful, < 0 harmless, as
    Arditi et al.), ``judged`` (refused harmful, not refused harmless), ``both``, or ``all`` (always)."""
    by_score = row["refusal_score"] > 0 if harmful else row["refusal_score"] < 0
    by_judge = bool(row["refused"]) if harmful else not row["refused"]
    return {"score": by_score, "judged": by_judge, "both": by_score and by_judge, "all": True}[keep]


def contrast_sets(data: Collected, cap: int | None, keep: str = "score") -> Contrast:
    """Harmful = toxic prompts, harmless = harmless prompts, each kept only when the model agrees (``keep``).
    The validation sets are capped at ``cap`` prompts per side (the first by prompt-id hash order)."""
    harmful, harmless, dropped = {}, {}, {}
    for split in ("discovery", "validation", "test"):
        tox = data.split_rows(split, "toxic")
        safe = data.split_rows(split, "harmless")
        harmful[split] = [i for i in tox if agrees(data.rows[i], True, keep)]
        harmless[split] = [i for i in safe if agrees(data.rows[i], False, keep)]
        dropped[split] = {"harmful": len(tox) - len(harmful[split]), "harmless": len(safe) - len(harmless[split])}
    if cap is not None:
        key = lambda i: hashlib.sha256(data.rows[i]["prompt_id"].encode()).hexdigest()  # noqa: E731
        harmful["validation"] = sorted(sorted(harmful["validation"], key=key)[:cap])
        harmless["validation"] = sorted(sorted(harmless["validation"], key=key)[:cap])
    for split in ("discovery", "validation"):
        if not harmful[split] or not harmless[split]:
            raise DirectionError(
                f"the {split} split has {len(harmful[split])} harmful and {len(harmless[split])} harmless prompts the "
                f"model agrees with (direction.keep={keep!r}); the direction needs both (more prompts, "
                "direction.harmless_samples, direction.keep, or other data.split_* fractions)")
    return Contrast(harmful, harmless, dropped)


def _fingerprint(cfg: Config, data: Collected) -> str:
    d = config_to_dict(cfg.direction)
    blob = json.dumps({"direction": d, "activations": data.manifest["fingerprint"],
                       "analysis": [cfg.analysis.min_prompts, cfg.analysis.shared_margin],
                       "intervention_dtype": cfg.model.intervention_dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_direction_stage(cfg: Config, loaded, acts_dir: Path, out_dir: Path, *, force: bool = False,
                        dist: Dist = Dist(), show_progress: bool = True,
                        status: StatusFile | None = None) -> DirectionResult:
    status = status if status is not None else StatusFile(None)
    data = load_collected(acts_dir)
    contrast = contrast_sets(data, cfg.direction.selection_prompts, cfg.direction.keep)  # fails before any write
    if dist.is_main:
        manifest = prepare(out_dir, _fingerprint(cfg, data), cfg, force, DirectionError, 'a direction')
    dist.barrier()
    if not dist.is_main:
        dist.barrier()
        return DirectionResult(out_dir, json.loads((out_dir / "summary.json").read_text()))
    if manifest.get("status") == "complete" and (out_dir / "summary.json").is_file():
        logger.info("direction already complete in %s (--force redoes it)", out_dir)
        return DirectionResult(out_dir, json.loads((out_dir / "summary.json").read_text()), skipped=True)
    threads = torch.get_num_threads()
    try:
        summary = _direction(cfg, loaded, data, contrast, out_dir, show_progress, status)
    finally:
        torch.set_num_threads(threads)
    dist.barrier()
    return DirectionResult(out_dir, summary)


def _direction(cfg: Config, loaded, data: Collected, contrast: Contrast, out_dir: Path, show_progress: bool,
               status: StatusFile) -> dict:
    c = cfg.direction
    t0 = time.perf_counter()
    n_layers, d_model = loaded.n_layers, loaded.d_model
    max_tokens = cfg.inference.max_prompt_tokens
    max_new = c.max_new_tokens or cfg.inference.max_new_tokens
    tok = loaded.tokenizer
    enc = lambda rows: data.encoded(tok, max_tokens, rows)  # noqa: E731
    ids = lambda rows: [data.rows[i]["prompt_id"] for i in rows]  # noqa: E731
    precise = Intervener(loaded, c.batch_size, model=loaded.hf_model)  # means in torch_dtype
    fast = Intervener(loaded, c.batch_size)  # every intervention: model.intervention_dtype
    status.progress(0, len(PARTS), "part")

    # ---- 1-2. contrast and candidates (discovery)
    cand_path = out_dir / "candidates.safetensors"
    if cand_path.is_file():
        from safetensors.torch import load_file

        t = load_file(str(cand_path))
        cands = Candidates(t["diff"], t["harmful_mean"], t["harmless_mean"], int(t["n"][0]), int(t["n"][1]))
    else:
        status.set(message="direction: difference in means of every candidate (discovery)")
        cands = difference_in_means(precise, enc(contrast.harmful["discovery"]), enc(contrast.harmless["discovery"]),
                                    n_layers, d_model)
        durable.save_safetensors({"diff": cands.diff.contiguous(), "harmful_mean": cands.harmful_mean.contiguous(),
                                  "harmless_mean": cands.harmless_mean.contiguous(),
                                  "n": torch.tensor([cands.n_harmful, cands.n_harmless])}, cand_path)
    status.progress(1)

    # ---- 3. selection (validation)
    if not (out_dir / DIRECTION_JSON).is_file():
        status.set(message="direction: selection by bypass / induce / KL (validation)")
        choice, scored = select_direction(
            fast, cands, enc(contrast.harmful["validation"]), enc(contrast.harmless["validation"]), data.tokens,
            n_layers, exact_candidates=c.exact_candidates, exact_per_layer=c.exact_per_layer, kl_max=c.kl_max,
            induce_min=c.induce_min,
            max_layer_fraction=c.max_layer_fraction, show_progress=show_progress)
        part(out_dir / "candidates.json", lambda: {"n_layers": n_layers, "n_post_instruction": cands.shape[1],
                                              "candidates": [s.to_dict() for s in scored],
                                              "screen_spearman": choice.screen_spearman})
        vector = cands.vector(choice.layer, choice.j)
        save_direction(out_dir, vector, {
            "hook": hook_name("resid_pre", choice.layer), "layer": choice.layer, "position": choice.position,
            "post_instruction_index": choice.j, "post_instruction_tokens": cands.shape[1], "norm": float(vector.norm()),
            "scores": {"bypass": choice.scores.bypass, "induce": choice.scores.induce, "kl": choice.scores.kl},
            "filters": choice.filters, "screen_spearman": choice.screen_spearman,
            "splits": {s: {"harmful": len(contrast.harmful[s]), "harmless": len(contrast.harmless[s])}
                       for s in ("discovery", "validation")},
            "contrast": contrast.counts(), "model": cfg.model.name, "refusal_tokens": data.tokens.tokens})
    saved = load_direction(out_dir)
    layer, j = saved.layer, int(saved.info["post_instruction_index"])
    status.progress(2)

    # ---- 4. evaluation (test)
    tox_test = data.split_rows("test", "toxic")
    harmless_test = data.split_rows("test", "harmless")
    audit_dir = out_dir / "responses"
    status.set(message="direction: evaluation on test (generation)")
    evaluation = part(out_dir / "evaluation.json", lambda: _audited(audit_dir / "evaluation.jsonl", lambda audit: evaluate_direction(
        fast, saved.vector, layer, n_layers, harmful=enc(tox_test), harmful_ids=ids(tox_test),
        harmful_refused=[bool(data.rows[i]["refused"]) for i in tox_test], harmless=enc(harmless_test),
        harmless_ids=ids(harmless_test), harmless_responses=data.response_ids(tok, harmless_test),
        max_new_tokens=max_new, n_random=c.random_directions, n_bootstrap=c.bootstrap, seed=c.seed, audit=audit,
        show_progress=show_progress, random_prompts=c.random_prompts)))
    status.progress(3)

    # ---- 5. per-category directions and cross-ablation (directions: discovery; ablation: test)
    refused_tox_test = data.split_rows("test", "toxic", refused=True)
    categories = {}
    if c.per_category:
        status.set(message="direction: per-category directions and the cross-ablation matrix")
        categories = part(out_dir / "categories.json", lambda: _audited(audit_dir / "categories.jsonl", lambda audit: _categories(
            cfg, fast, precise, data, contrast, saved.vector, layer, j, n_layers, refused_tox_test, max_new, audit,
            show_progress)))
    status.progress(4)

    # ---- 6. over-refusal
    over = {}
    if c.over_refusal:
        status.set(message="direction: the over-refusal direction")
        over = part(out_dir / "over_refusal.json", lambda: _audited(audit_dir / "over_refusal.jsonl", lambda audit: _over_refusal(
            cfg, fast, precise, data, layer, j, n_layers, max_new, audit, show_progress)))
    status.progress(5)

    # ---- 7. emergence (test)
    status.set(message="direction: emergence by intervention")
    emergence = part(out_dir / "emergence.json", lambda: emergence_curve(
        fast, saved.vector, n_layers, {"toxic_refused": enc(refused_tox_test),
                                       "safe_refused": enc(data.split_rows("test", "safe", refused=True))},
        data.tokens, c.emergence_stride, c.bootstrap, c.seed, show_progress))
    status.progress(6)

    from refusal_lens.direction.figures import write_figures

    candidates = json.loads((out_dir / "candidates.json").read_text())
    write_figures(out_dir, candidates, evaluation, categories, emergence)
    summary = direction_summary(saved.info, evaluation, categories, over, emergence)
    summary["seconds"] = time.perf_counter() - t0
    durable.write_json(out_dir / "summary.json", summary)
    man = json.loads((out_dir / MANIFEST).read_text())
    man.update(status="complete")
    durable.write_json(out_dir / MANIFEST, man)  # the commit point of the stage
    status.progress(7)
    return summary


def _audited(path: Path, make):
    audit = ResponseAudit(path)
    value = make(audit)
    audit.write()
    return value


def _categories(cfg, fast, precise, data, contrast, global_vec, layer, j, n_layers, refused_test, max_new, audit,
                show_progress) -> dict:
    a, c = cfg.analysis, cfg.direction
    harmless = site_activations(precise, data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens,
                                                      contrast.harmless["discovery"]), layer, j)
    by_cat: dict[str, list[int]] = {}
    for i in data.split_rows("discovery", "toxic", refused=True):  # the model's refusals of each category
        by_cat.setdefault(data.rows[i]["category"], []).append(i)
    acts = {cat: site_activations(precise, data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens, rows), layer, j)
            for cat, rows in sorted(by_cat.items()) if len(rows) >= 2}
    all_harmful = torch.cat(list(acts.values())) if acts else torch.zeros(0, harmless.shape[1], dtype=torch.float64)
    vectors = {"all": global_vec.double()}
    vectors.update({cat: x.mean(0) - harmless.mean(0) for cat, x in acts.items()})
    cosines = cosine_matrix({k: v.float() for k, v in vectors.items()})
    cis = bootstrap_cosines({"all": all_harmful, **acts}, harmless, min(c.bootstrap, 500), c.seed) if acts else {}
    prompts = data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens, refused_test)
    cross = cross_ablation(fast, {k: v.float() for k, v in vectors.items()}, n_layers, prompts,
                           [data.rows[i]["prompt_id"] for i in refused_test],
                           [data.rows[i]["category"] for i in refused_test], max_new, c.bootstrap, c.seed,
                           a.min_prompts, a.shared_margin, audit, show_progress)
    return {"n_discovery": {cat: len(rows) for cat, rows in sorted(by_cat.items())},
            "without_direction": sorted(cat for cat, rows in by_cat.items() if len(rows) < 2),
            "cosines": cosines, "cosine_ci": cis, "cross_ablation": cross}


def _over_refusal(cfg, fast, precise, data, layer, j, n_layers, max_new, audit, show_progress) -> dict:
    enc = lambda rows: data.encoded(fast.tokenizer, cfg.inference.max_prompt_tokens, rows)  # noqa: E731
    safe_ref = data.split_rows("discovery", "safe", refused=True)
    tox_ref = data.split_rows("discovery", "toxic", refused=True)
    if len(safe_ref) < 2 or len(tox_ref) < 2:
        return {"n_refused_safe": len(safe_ref), "n_refused_toxic": len(tox_ref),
                "note": "too few refused safe or toxic discovery prompts for an over-refusal direction"}
    r_over = (site_activations(precise, enc(safe_ref), layer, j).mean(0)
              - site_activations(precise, enc(tox_ref), layer, j).mean(0)).float()
    safe_test, tox_test = data.split_rows("test", "safe"), data.split_rows("test", "toxic")
    rows = over_refusal(fast, r_over, layer, n_layers, enc(safe_test), [data.rows[i]["prompt_id"] for i in safe_test],
                        enc(tox_test), [data.rows[i]["prompt_id"] for i in tox_test], max_new, audit, show_progress)
    return {"n_refused_safe": len(safe_ref), "n_refused_toxic": len(tox_ref), "norm": float(r_over.norm()),
            "conditions": rows}


def direction_summary(info: dict, evaluation: dict, categories: dict, over: dict, emergence: dict) -> dict:
    cond = evaluation["conditions"]

    def rate(key):
        r = cond.get(key)
        return None if r is None else {k: r[k] for k in ("n", "refusal_rate", "ci", "incoherent_rate")}

    verdicts: dict[str, int] = {}
    for cell in (categories.get("cross_ablation") or {}).get("cells", []):
        if cell["direction"] != cell["category"]:
            verdicts[cell["verdict"]] = verdicts.get(cell["verdict"], 0) + 1
    return {
        "direction": {k: info[k] for k in ("hook", "layer", "position", "norm", "scores", "filters", "splits")},
        "harmful_refused": {k: rate(f"harmful_refused/{k}") for k in ("clean", "ablated", "actadd_minus")},
        "harmful": {k: rate(f"harmful/{k}") for k in ("clean", "ablated", "actadd_minus")},
        "harmless": {k: rate(f"harmless/{k}") for k in ("clean", "actadd_plus")},
        "random_ablated": {k: evaluation["random_ablated"][k] for k in ("n", "mean", "q05", "q95", "p_value")},
        "random_added": {k: evaluation["random_added"][k] for k in ("n", "mean", "q05", "q95", "p_value")},
        "kl_harmless": evaluation["kl_harmless"], "ce_harmless": evaluation["ce_harmless"],
        "cross_ablation_verdicts": verdicts,
        "over_refusal": {k: {side: {m: v[side][m] for m in ("n", "refusal_rate", "ci")} for side in ("safe", "toxic")}
                         for k, v in (over.get("conditions") or {}).items()},
        "emergence": {g: v.get("emergence_layer") for g, v in emergence["groups"].items()},
    }


def format_summary(summary: dict) -> str:
    """The key numbers of the direction stage, as printed at its end."""
    d = summary["direction"]

    def r(x):
        if not x or not x["n"]:
            return "- (n=0)"
        lo, hi = x["ci"]
        return f"{x['refusal_rate']:.0%} [{lo:.0%}, {hi:.0%}] (n={x['n']}, incoherent {x['incoherent_rate']:.0%})"

    s = d["scores"]
    lines = [f"refusal direction: {d['hook']} at position {d['position']} (validation: bypass {s['bypass']:.2f}, "
             f"induce {s['induce']:.2f}, KL {s['kl']:.3f}); {'; '.join(d['filters']['notes']) or 'all filters applied'}",
             "test split, refused harmful prompts: clean " + r(summary["harmful_refused"]["clean"]) + " -> ablated "
             + r(summary["harmful_refused"]["ablated"]) + " -> ActAdd(-r) " + r(summary["harmful_refused"]["actadd_minus"]),
             "test split, harmless prompts: clean " + r(summary["harmless"]["clean"]) + " -> ActAdd(+r) "
             + r(summary["harmless"]["actadd_plus"])]
    ra = summary["random_ablated"]
    if ra["n"]:
        lines.append(f"random directions ablated ({ra['n']}): mean refusal {ra['mean']:.0%} "
                     f"(5-95%: {ra['q05']:.0%}-{ra['q95']:.0%}); p = {ra['p_value']:.3f}")
    kl = summary["kl_harmless"]
    ce = summary["ce_harmless"]
    if kl["mean"] is not None:
        lines.append(f"harmless KL under ablation {kl['mean']:.4f} [{kl['ci'][0]:.4f}, {kl['ci'][1]:.4f}] (n={kl['n']}); "
                     f"CE {ce['clean']:.3f} -> {ce['ablated']:.3f} nats/token")
    return "\n".join(lines)
