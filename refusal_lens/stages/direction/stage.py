"""Stage 2, direction: the refusal direction of Arditi et al. 2024, selected by cause and evaluated on test.

Reads the collect stage's prompts (split, judgement, refusal score); runs the model. Table of contents
(:meth:`DirectionSteps.run`):

1. **contrast** — harmful = toxic prompts the model agrees with, harmless = harmless prompts it agrees with, per
   split (:mod:`.contrast`; checked before anything is written);
2. **candidates** — difference in means of every block input at every post-instruction position, on discovery
   (:mod:`.candidates`);
3. **selection** — screen every candidate, measure bypass / induce / KL of the shortlist, filter, choose, on
   validation (:mod:`.select`); saved as ``direction.safetensors`` + ``direction.json``
   (:mod:`refusal_lens.run.direction_file`);
4. **evaluation** — the reference's table on test, with random controls, KL and CE (:mod:`.evaluate`);
5. **categories** — per-category directions, their cosines, the cross-ablation matrix (:mod:`.categories`);
6. **over-refusal** — the refused-safe vs refused-toxic direction, ablated and subtracted (:mod:`.over_refusal`),
   and the false-refusal vector of Wang et al. 2025 against correct refusal (:mod:`.false_refusal`);
7. **emergence** — ablation from layer l on (:mod:`.emergence`); then the figures and ``summary.json``.

Each part is written once and skipped on rerun (:func:`refusal_lens.run.parts.part`); ``--force`` redoes the
stage. Paths: :class:`refusal_lens.run.folder.DirectionFiles`.
"""

from __future__ import annotations

import json
import time

import torch

from refusal_lens.config import config_to_dict
from refusal_lens.core.behaviour import audited
from refusal_lens.core.hooks import hook_name
from refusal_lens.core.intervene import Intervener
from refusal_lens.infra import durable
from refusal_lens.infra.status import StageOutcome
from refusal_lens.run.collected import Collected
from refusal_lens.run.direction_file import SavedDirection, load_direction, save_direction
from refusal_lens.run.parts import part
from refusal_lens.run.stage import StageContext, StageResult
from refusal_lens.stages.direction.candidates import (Candidates, SiteCache, difference_in_means, load_candidates,
                                                     save_candidates, site_activations)
from refusal_lens.stages.direction.categories import per_category
from refusal_lens.stages.direction.contrast import Contrast, DirectionError, contrast_sets
from refusal_lens.stages.direction.emergence import emergence_curve
from refusal_lens.stages.direction.evaluate import evaluate_direction, permuted_directions
from refusal_lens.stages.direction.false_refusal import false_refusal_experiment
from refusal_lens.stages.direction.over_refusal import over_refusal_experiment
from refusal_lens.stages.direction.select import select_direction
from refusal_lens.stages.direction.summary import direction_summary, format_summary

PARTS = ("candidates", "selection", "evaluation", "categories", "over_refusal", "false_refusal", "emergence",
         "figures")

__all__ = ["DirectionError", "DirectionStage", "DirectionSteps", "PARTS"]


class DirectionStage:
    all_ranks = False
    what = "a direction"

    def check(self, ctx: StageContext) -> None:
        self.data = ctx.run.collected()
        self.contrast = contrast_sets(self.data, ctx.cfg.direction.selection_prompts, ctx.cfg.direction.keep)

    def fingerprint(self, ctx: StageContext) -> dict:
        cfg = ctx.cfg
        return {"direction": config_to_dict(cfg.direction), "activations": self.data.manifest["fingerprint"],
                "analysis": [cfg.analysis.min_prompts, cfg.analysis.shared_margin],
                "intervention_dtype": cfg.model.intervention_dtype}

    def still_complete(self, ctx: StageContext) -> bool:
        return ctx.run.paths.direction.summary.is_file()

    def run(self, ctx: StageContext) -> tuple[dict, dict]:
        threads = torch.get_num_threads()
        try:
            return DirectionSteps(ctx, self.data, self.contrast).run(), {}
        finally:
            torch.set_num_threads(threads)

    def load(self, ctx: StageContext) -> dict:
        return ctx.run.direction_summary()

    def outcome(self, ctx: StageContext, result: StageResult) -> tuple[list[str], StageOutcome]:
        d = result.summary["direction"]
        return ([format_summary(result.summary), f"direction: {result.folder}"],
                StageOutcome("skipped" if result.skipped else "done", {"hook": d["hook"], "position": d["position"]}))


class DirectionSteps:
    """The steps of one direction run, sharing the stage's inputs (see the module docstring)."""

    def __init__(self, ctx: StageContext, data: Collected, contrast: Contrast):
        self.ctx, self.cfg, self.c, self.data, self.contrast = ctx, ctx.cfg, ctx.cfg.direction, data, contrast
        self.files, self.status, self.show = ctx.run.paths.direction, ctx.status, ctx.show_progress
        loaded = ctx.loaded
        self.n_layers, self.d_model, self.tok = loaded.n_layers, loaded.d_model, loaded.tokenizer
        self.max_new = self.c.max_new_tokens or self.cfg.inference.max_new_tokens
        self.precise = Intervener(loaded, self.c.batch_size, model=loaded.hf_model,  # means in torch_dtype
                                  gradient_batch_size=self.c.gradient_batch_size)
        # every intervention: model.intervention_dtype
        self.fast = Intervener(loaded, self.c.batch_size, generation_batch_size=self.c.generation_batch_size,
                               gradient_batch_size=self.c.gradient_batch_size)
        # the float32 model's post-instruction sites of every discovery list, read again by later parts
        self.sites = SiteCache(self.precise, self.n_layers, self.d_model)

    def enc(self, rows):
        return self.data.encoded(self.tok, self.cfg.inference.max_prompt_tokens, rows)

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.status.progress(0, len(PARTS), "part")
        cands = self.candidates()  # 1-2. contrast and candidates (discovery)
        saved = self.selection(cands)  # 3. selection (validation)
        evaluation = self.evaluation(saved)  # 4. evaluation (test)
        categories = self.categories(saved)  # 5. per-category directions and cross-ablation
        over = self.over_refusal(saved)  # 6. over-refusal, and the false-refusal vector
        false = self.false_refusal(saved, cands)
        emergence = self.emergence(saved)  # 7. emergence (test)
        return self.write(saved, evaluation, categories, over, false, emergence, time.perf_counter() - t0)

    def candidates(self) -> Candidates:
        if self.files.candidate_tensors.is_file():
            cands = load_candidates(self.files.candidate_tensors)
        else:
            self.status.set(message="direction: difference in means of every candidate (discovery)")
            cands = difference_in_means(self.precise, self.enc(self.contrast.harmful["discovery"]),
                                        self.enc(self.contrast.harmless["discovery"]), self.n_layers, self.d_model,
                                        self.sites)
            save_candidates(cands, self.files.candidate_tensors)
        self.status.progress(1)
        return cands

    def selection(self, cands: Candidates) -> SavedDirection:
        c, contrast = self.c, self.contrast
        if not self.files.info.is_file():
            self.status.set(message="direction: selection by bypass / induce / KL (validation)")
            choice, scored = select_direction(
                self.fast, cands, self.enc(contrast.harmful["validation"]), self.enc(contrast.harmless["validation"]),
                self.data.tokens, self.n_layers, exact_candidates=c.exact_candidates, exact_per_layer=c.exact_per_layer,
                kl_max=c.kl_max, induce_min=c.induce_min, max_layer_fraction=c.max_layer_fraction,
                show_progress=self.show)
            part(self.files.candidates, lambda: {"n_layers": self.n_layers, "n_post_instruction": cands.shape[1],
                                                 "candidates": [s.to_dict() for s in scored],
                                                 "screen_spearman": choice.screen_spearman})
            vector = cands.vector(choice.layer, choice.j)
            save_direction(self.files, vector, {
                "hook": hook_name("resid_pre", choice.layer), "layer": choice.layer, "position": choice.position,
                "post_instruction_index": choice.j, "post_instruction_tokens": cands.shape[1],
                "norm": float(vector.norm()),
                "scores": {"bypass": choice.scores.bypass, "induce": choice.scores.induce, "kl": choice.scores.kl},
                "filters": choice.filters, "screen_spearman": choice.screen_spearman,
                "splits": {s: {"harmful": len(contrast.harmful[s]), "harmless": len(contrast.harmless[s])}
                           for s in ("discovery", "validation")},
                "contrast": contrast.counts(), "model": self.cfg.model.name,
                "refusal_tokens": self.data.tokens.tokens})
        self.status.progress(2)
        return load_direction(self.files)

    def evaluation(self, saved: SavedDirection) -> dict:
        c, data = self.c, self.data
        tox, harmless = data.split_rows("test", "toxic"), data.split_rows("test", "harmless")
        permuted = None
        if c.permuted_directions and not self.files.evaluation.is_file():
            j = int(saved.info["post_instruction_index"])
            sides = [site_activations(self.precise, self.enc(self.contrast.harmful["discovery"]), saved.layer, j,
                                      self.sites),
                     site_activations(self.precise, self.enc(self.contrast.harmless["discovery"]), saved.layer, j,
                                      self.sites)]
            permuted = permuted_directions(*sides, c.permuted_directions, c.seed)
        self.status.set(message="direction: evaluation on test (generation)")
        out = part(self.files.evaluation, lambda: audited(self.files.audit("evaluation"), lambda audit: evaluate_direction(
            self.fast, saved.vector, saved.layer, self.n_layers, harmful=self.enc(tox), harmful_ids=data.ids(tox),
            harmful_refused=[bool(data.rows[i]["refused"]) for i in tox], harmless=self.enc(harmless),
            harmless_ids=data.ids(harmless), harmless_responses=data.response_ids(self.tok, harmless),
            max_new_tokens=self.max_new, n_random=c.random_directions, n_bootstrap=c.bootstrap, seed=c.seed,
            audit=audit, show_progress=self.show, random_prompts=c.random_prompts, permuted=permuted,
            n_generated=c.random_directions_generated, score_tokens=data.tokens if c.score_controls else None)))
        self.status.progress(3)
        return out

    def categories(self, saved: SavedDirection) -> dict:
        out = {}
        if self.c.per_category:
            self.status.set(message="direction: per-category directions and the cross-ablation matrix")
            refused = self.data.split_rows("test", "toxic", refused=True)
            out = part(self.files.categories, lambda: audited(self.files.audit("categories"), lambda audit: per_category(
                self.cfg, self.fast, self.precise, self.data, self.contrast, saved.vector, saved.layer,
                int(saved.info["post_instruction_index"]), self.n_layers, refused, self.max_new, audit, self.show,
                sites=self.sites)))
        self.status.progress(4)
        return out

    def over_refusal(self, saved: SavedDirection) -> dict:
        out = {}
        if self.c.over_refusal:
            self.status.set(message="direction: the over-refusal direction")
            out = part(self.files.over_refusal, lambda: audited(
                self.files.audit("over_refusal"), lambda audit: over_refusal_experiment(
                    self.cfg, self.fast, self.precise, self.data, saved.layer, int(saved.info["post_instruction_index"]),
                    self.n_layers, self.max_new, audit, self.show, sites=self.sites)))
        self.status.progress(5)
        return out

    def false_refusal(self, saved: SavedDirection, cands: Candidates) -> dict:
        out: dict = {}
        if self.c.false_refusal:
            self.status.set(message="direction: the false-refusal vector (Wang et al. 2025)")

            def make() -> dict:
                doc = audited(self.files.audit("false_refusal"), lambda audit: false_refusal_experiment(
                    self.cfg, self.fast, self.precise, self.data, self.contrast, cands, saved, self.n_layers,
                    self.max_new, audit, self.show, sites=self.sites))
                if (vector := doc.pop("vector", None)) is not None:
                    durable.save_safetensors({"direction": vector.detach().float().contiguous()},
                                             self.files.false_refusal_vector)
                return doc

            out = part(self.files.false_refusal, make)
        self.status.progress(6)
        return out

    def emergence(self, saved: SavedDirection) -> dict:
        c, data = self.c, self.data
        self.status.set(message="direction: emergence by intervention")
        groups = {"toxic_refused": self.enc(data.split_rows("test", "toxic", refused=True)),
                  "safe_refused": self.enc(data.split_rows("test", "safe", refused=True))}
        out = part(self.files.emergence, lambda: emergence_curve(
            self.fast, saved.vector, self.n_layers, groups, data.tokens, c.emergence_stride, c.bootstrap, c.seed,
            self.show))
        self.status.progress(7)
        return out

    def write(self, saved: SavedDirection, evaluation: dict, categories: dict, over: dict, false: dict,
              emergence: dict, seconds: float) -> dict:
        from refusal_lens.stages.direction.figures import write_figures

        self.status.set(message="direction: writing figures and the summary")
        candidates = json.loads(self.files.candidates.read_text())
        write_figures(self.files.figures, candidates, evaluation, categories, emergence, false)
        summary = direction_summary(saved.info, evaluation, categories, over, emergence, false)
        summary["seconds"] = seconds
        durable.write_json(self.files.summary, summary)
        self.status.progress(8)
        return summary
