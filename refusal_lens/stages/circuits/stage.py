"""Stage 4, discover: refusal circuits over SAE features, selected on discovery, validated on test.

Table of contents (:meth:`DiscoverSteps.run`; each step a function of objects returning a typed result):

1. :func:`~.inputs.load_inputs` — the collected prompts and their split, the SAEs (the node space), the per-class
   baselines, the refusal direction of the direction stage;
2. :func:`~.effects.attribute` — per-prompt node effects on the refusal score (AtP or IG, exact error nodes), on
   the discovery prompts (ranking) and on the test prompts (intervals, agreement, the analysis);
3. :func:`~.build.build_circuits` — signed circuits per label x category and pooled: refusal-promoting and
   refusal-suppressing nodes ranked on discovery, their effects and bootstrap intervals on test;
4. :func:`~.select.rankings` — the promoting features of each selection method;
5. validation on test: :func:`~.agreement.validate_agreement` (exact patching, by stratum),
   :func:`~.faithfulness.faithfulness_curve` (with random distributions), :func:`~.behaviour.behaviour` (the
   K-curve against random sets and the direction, induction), :func:`~.over_refusal.over_refusal_curve` (does
   over-refusal have its own features?);
6. :func:`~.edges.circuit_edges` — edges of the pooled circuits (discovery);
7. :func:`~.outputs.write_outputs` — circuit files, ``summary.json``, figures.

Output folder (``circuits/``, schema in docs/circuits.md, paths in :class:`refusal_lens.run.folder.CircuitFiles`)::

    manifest.json, config.yaml, space.json
    effects/<split>.safetensors   per-prompt effects: features [n, classes, features], errors [n, hooks], metric
    effects/<split>-batch-*.safetensors + ledger.json   per-batch shards while the pass runs (resume point)
    prompts.json                  the attributed prompts (split, label, category, refused, clean metric)
    <label>/<category>.json       one circuit per label and category, and <label>/all.json (pooled)
    validation/agreement.json, faithfulness.json, behaviour.json, edges.json, responses.jsonl
    validation/over_refusal.json, over_refusal_responses.jsonl
    summary.json, figures/*.html

Every part is written once and skipped on rerun; ``--force`` starts over. Under torchrun the work runs on rank 0
and the other ranks wait.
"""

from __future__ import annotations

import logging
import time

import torch

from refusal_lens.config import config_to_dict
from refusal_lens.core.behaviour import audited
from refusal_lens.core.intervene import Intervener, frozen
from refusal_lens.infra import durable
from refusal_lens.infra.status import StageOutcome
from refusal_lens.run.parts import part, part_rng
from refusal_lens.run.stage import StageContext, StageResult
from refusal_lens.stages.circuits.agreement import validate_agreement
from refusal_lens.stages.circuits.attribution import Runner
from refusal_lens.stages.circuits.behaviour import behaviour
from refusal_lens.stages.circuits.build import build_circuits
from refusal_lens.stages.circuits.edges import circuit_edges
from refusal_lens.stages.circuits.effects import attribute
from refusal_lens.stages.circuits.faithfulness import faithfulness_curve, ranked_nodes
from refusal_lens.stages.circuits.inputs import CircuitError, Group, circuit_hooks, load_inputs, prompt_groups
from refusal_lens.stages.circuits.outputs import format_summary, write_outputs
from refusal_lens.stages.circuits.over_refusal import over_refusal_curve, safe_minus_toxic
from refusal_lens.stages.circuits.select import rankings

logger = logging.getLogger(__name__)

PARTS = ("attribution (discovery)", "attribution (test)", "circuits", "agreement", "faithfulness", "behaviour",
         "over-refusal", "edges", "writing")

__all__ = ["CircuitError", "DiscoverStage", "DiscoverSteps", "PARTS"]


class DiscoverStage:
    all_ranks = False
    what = "circuits"

    def check(self, ctx: StageContext) -> None:
        data = ctx.run.collected()
        self.hooks = circuit_hooks(ctx.cfg, ctx.run, int(data.manifest["n_layers"]))
        if not ctx.run.paths.direction.info.is_file():
            raise CircuitError(f"no refusal direction in {ctx.run.paths.direction.dir}: run `refusal-lens direction` "
                               "first")
        prompt_groups(data, ctx.cfg)  # bad settings fail before anything is written

    def fingerprint(self, ctx: StageContext) -> dict:
        c = config_to_dict(ctx.cfg.circuits)
        c.pop("num_threads")
        return {"circuits": c, "hooks": list(self.hooks), "saes": ctx.run.manifest("saes").get("fingerprint"),
                "direction": ctx.run.manifest("direction").get("fingerprint"),
                "intervention_dtype": ctx.cfg.model.intervention_dtype}

    def still_complete(self, ctx: StageContext) -> bool:
        return ctx.run.paths.circuits.summary.is_file()

    def run(self, ctx: StageContext) -> tuple[dict, dict]:
        threads = torch.get_num_threads()
        torch.set_num_threads(ctx.cfg.circuits.num_threads)
        t0 = time.perf_counter()
        try:
            with frozen(ctx.loaded.model):
                summary = DiscoverSteps(ctx, self.hooks).run()
        finally:
            torch.set_num_threads(threads)
        return summary, {"seconds": time.perf_counter() - t0}

    def load(self, ctx: StageContext) -> dict:
        return ctx.run.circuits_summary()

    def outcome(self, ctx: StageContext, result: StageResult) -> tuple[list[str], StageOutcome]:
        s = result.summary
        b = s.get("behaviour") or {}
        return ([format_summary(s), f"circuits: {result.folder}"],
                StageOutcome("skipped" if result.skipped else "done",
                             {"circuits": len(s["circuits"]), "method": s["method"],
                              "fraction_of_direction": (b.get("headline") or {}).get("fraction_of_direction")}))


class DiscoverSteps:
    """The steps of one discover run, sharing its inputs (see the module docstring)."""

    def __init__(self, ctx: StageContext, hooks):
        self.ctx, self.cfg, self.c, self.hooks = ctx, ctx.cfg, ctx.cfg.circuits, hooks
        self.files, self.status, self.show = ctx.run.paths.circuits, ctx.status, ctx.show_progress
        self.loaded, self.tok = ctx.loaded, ctx.loaded.tokenizer

    def done(self, k: int) -> None:
        self.status.progress(k + 1)
        if k + 1 < len(PARTS):
            self.status.set(message=f"discover: {PARTS[k + 1]}")

    def enc(self, rows):
        return self.data.encoded(self.tok, self.cfg.inference.max_prompt_tokens, rows)

    def run(self) -> dict:
        c, t_start = self.c, time.perf_counter()
        self.status.progress(0, len(PARTS), "part")
        self.status.set(message=f"discover: {PARTS[0]}")
        # ---- 1. inputs
        self.inputs = inputs = load_inputs(self.cfg, self.loaded, self.ctx.run, self.hooks)
        self.space, self.data = inputs.space, inputs.data
        groups, skipped = prompt_groups(self.data, self.cfg)
        self.write_space()
        self.runner = Runner(self.loaded.model, self.space, self.data.tokens, inputs.means, c.baseline)
        # ---- 2. attribution: discovery (ranking) and test (intervals, agreement, analysis)
        pooled = {g.label: g for g in groups if g.category == "all"}
        effects = self.attribution(pooled)
        t_attr = time.perf_counter() - t_start
        # ---- 3-4. circuits and the selection methods' rankings
        circuits = build_circuits(inputs, groups, effects, self.cfg)
        toxic = pooled.get("toxic") or next(iter(pooled.values()))
        d_feats, _ = effects["discovery"].of(toxic.rows["discovery"])
        toxic_effect = d_feats.sum(1).mean(0)
        ranks = rankings(self.space, toxic_effect, inputs.direction.vector, c.cosine_preselect, c.methods)
        self.done(2)
        # ---- 5. validation on test: agreement, faithfulness, behaviour
        self.files.validation.mkdir(exist_ok=True)
        self.fast = Intervener(self.loaded, c.intervention_batch_size, generation_batch_size=c.generation_batch_size)
        agree = self.agreement(toxic)
        faithfulness = self.faithfulness(pooled, effects)
        behaviour_out = self.behaviour(toxic, ranks)
        over = self.over_refusal(pooled, effects, toxic_effect, ranks, behaviour_out)
        # ---- 6. edges of the pooled circuits
        edges = {}
        if c.edges:
            edges = part(self.files.edges, lambda: {g.key: circuit_edges(
                self.runner, inputs, circuits[g.key], g.rows["discovery"], self.tok, self.cfg, self.show)
                for g in pooled.values()})
        self.done(7)
        # ---- 7. outputs
        summary = write_outputs(self.files, self.cfg, inputs, groups, skipped, circuits, ranks, agree, faithfulness,
                                behaviour_out, over, edges, t_attr)
        self.done(8)
        return summary

    def write_space(self) -> None:
        c, space, inputs = self.c, self.space, self.inputs
        durable.write_json(self.files.space, {
            "hooks": list(space.hooks), "d_sae": {h: space.d_sae(h) for h in space.hooks},
            "n_features": space.n_features, "site_classes": space.class_names(), "method": c.method,
            "baseline": c.baseline, "reference": c.reference, "error_nodes": c.error_nodes,
            "direction": inputs.direction.info["hook"],
            "reference_tokens": {h: inputs.means.counts[h] for h in space.hooks}})

    def attribution(self, pooled: dict[str, Group]) -> dict:
        effects = {}
        for k, split in enumerate(("discovery", "test")):
            rows = sorted({i for g in pooled.values() for i in g.rows[split]})
            effects[split] = attribute(self.runner, self.data, rows, self.tok, self.cfg, self.files.effects, split,
                                       self.show)
            self.done(k)
        seen = set(effects["discovery"].rows) | set(effects["test"].rows)
        durable.write_json(self.files.prompts, [
            {"index": i, "prompt_id": r["prompt_id"], "split": r["split"], "category": r["category"],
             "label": r["label"], "refused": bool(r["refused"]), "refusal_score": r["refusal_score"],
             "n_content_tokens": r["n_prompt_tokens"] - r["n_opening_tokens"] - r["n_post_instruction_tokens"]}
            for i, r in enumerate(self.data.rows) if i in seen], indent=1)
        return effects

    def agreement(self, toxic: Group) -> dict | None:
        agree = None
        if toxic.rows["test"]:
            agree = part(self.files.agreement, lambda: validate_agreement(
                self.runner, self.inputs, toxic.rows["test"], self.tok, self.cfg, part_rng(self.c.seed, "agreement"),
                self.show))
        self.done(3)
        return agree

    def faithfulness(self, pooled: dict[str, Group], effects: dict) -> dict:
        c, data, fast = self.c, self.data, self.fast

        def faith(g: Group) -> dict:
            feats, errs = effects["discovery"].of(g.rows["discovery"])
            ranked = ranked_nodes(self.space, feats.sum(1).mean(0), errs.mean(0), c.faithfulness_order)
            chosen = sorted(data.hash_order(g.rows["test"])[: c.faithfulness_prompts])
            return faithfulness_curve(fast, self.space, self.inputs.means, data.tokens, self.enc(chosen), ranked,
                                      c.faithfulness_sizes, c.random_controls, c.faithfulness_min_gap, c.bootstrap,
                                      part_rng(c.seed, "faithfulness", g.key), self.show) | {"prompt_ids": data.ids(chosen)}

        out = part(self.files.faithfulness, lambda: {g.key: faith(g) for g in pooled.values()
                                                     if g.rows["test"] and g.label in c.faithfulness_labels})
        self.done(4)
        return out

    def behaviour(self, toxic: Group, ranks) -> dict | None:
        c, data, inputs = self.c, self.data, self.inputs
        test_rows = toxic.rows["test"]
        harmless = data.split_rows("test", "harmless", refused=False)
        val_rows = data.split_rows("validation", "toxic", refused=True)
        if c.behaviour_prompts is not None:
            harmless, test_rows, val_rows = (sorted(data.hash_order(r)[: c.behaviour_prompts])
                                             for r in (harmless, test_rows, val_rows))
        if not (test_rows and val_rows and inputs.refused is not None):
            logger.warning("circuit behaviour skipped: %d refused toxic test, %d validation prompts, %s refused toxic "
                           "discovery prompts (the induction targets)", len(test_rows), len(val_rows),
                           "some" if inputs.refused is not None else "no")
            self.done(5)
            return None
        out = part(self.files.behaviour, lambda: audited(self.files.responses, lambda audit: behaviour(
            self.fast, self.space, ranks, inputs.means, inputs.refused, inputs.direction.vector, inputs.direction.layer,
            int(data.manifest["n_layers"]), prompts=self.enc(test_rows), ids=data.ids(test_rows),
            val_prompts=self.enc(val_rows), val_ids=data.ids(val_rows), harmless=self.enc(harmless),
            harmless_ids=data.ids(harmless), ks=c.behaviour_k, headline_k=c.headline_k,
            headline_method=c.headline_method, interventions=c.interventions, positions=c.positions,
            scale_c=c.scale_c, random_sets=c.random_sets, induction_random_sets=c.induction_random_sets,
            max_new_tokens=c.max_new_tokens or self.cfg.inference.max_new_tokens,
            seed=int(part_rng(c.seed, "behaviour").integers(2**31)), audit=audit, show_progress=self.show,
            random_sets_generated=c.random_sets_generated, score_tokens=data.tokens if c.score_controls else None)))
        self.done(5)
        return out

    def over_refusal(self, pooled: dict[str, Group], effects: dict, toxic_effect, ranks,
                     behaviour_out: dict | None) -> dict | None:
        """Over-refusal's own features? (:mod:`.over_refusal`): needs both pooled circuits' discovery prompts;
        ``toxic_effect`` is the pooled toxic circuit's mean discovery effect (the rankings' own)."""
        c, data = self.c, self.data
        safe, toxic = pooled.get("safe"), pooled.get("toxic")
        out = None
        if c.over_refusal_k and safe is not None and toxic is not None and "attribution" in ranks:
            safe_effect = effects["discovery"].of(safe.rows["discovery"])[0].sum(1).mean(0)
            rankings = {"safe_minus_toxic": safe_minus_toxic(safe_effect, toxic_effect),
                        "attribution": ranks["attribution"]}
            mode, positions = (behaviour_out["headline"]["intervention"].split("/") if behaviour_out
                               else ("zero", "all"))
            rows = {lab: data.split_rows("test", lab, refused=True) for lab in ("safe", "toxic")}
            if c.behaviour_prompts is not None:
                rows = {lab: sorted(data.hash_order(r)[: c.behaviour_prompts]) for lab, r in rows.items()}
            out = part(self.files.over_refusal, lambda: audited(self.files.over_refusal_responses, lambda audit:
                       over_refusal_curve(self.fast, self.space, self.inputs.means, rankings, mode, positions,
                                          c.over_refusal_k, *((self.enc(rows[lab]), data.ids(rows[lab]))
                                                              for lab in ("safe", "toxic")),
                                          c.max_new_tokens or self.cfg.inference.max_new_tokens, audit,
                                          self.cfg.analysis.min_prompts, c.over_refusal_margin,
                                          show_progress=self.show)))
        self.done(6)
        return out
