"""Stage 5, analyze: the evidence, measured on test prompts, gathered into ``summary.json`` and one offline report.

Reads the earlier stages' folders through the run folder (:mod:`.inputs`; nothing here selects or tunes anything).
Table of contents (:meth:`AnalyzeStage.run`):

1. **inputs** — the data and judge (collect: prompts per split, refusal rates, the refusal score's AUROC), the
   refusal direction (its table on test, controls, KL and CE, candidates, emergence, per-category directions, the
   cross-ablation matrix, over-refusal), the circuits (behaviour against K, random sets and the direction,
   induction, faithfulness, agreement), the SAEs' quality;
2. **one mechanism or many, by circuit similarity** (:mod:`.similarity`, on test effects; computed here);
3. **top features** with their most activating tokens, other runs of the results folder (:mod:`.top_features`);
4. **the evidence** (:mod:`.evidence`): every headline number with its n and interval, and every entry below the
   power floor (``analysis.min_prompts`` test prompts) saying *insufficient* and why;
5. **the report** (:mod:`.sections`, :mod:`.figures`): ``report.html``, checked in headless Chromium when present.

Output folder (``analysis/``): ``report.html``, ``figures/<name>.html`` (+ one shared ``plotly.min.js``),
``summary.json`` (the evidence: what the README's results are written from), ``similarity.json``,
``top_features.json``. Changed analysis settings or new circuits redo the analysis (it is cheap and derived).
"""

from __future__ import annotations

import logging
import time

from refusal_lens.config import config_to_dict
from refusal_lens.errors import UserError
from refusal_lens.infra import durable
from refusal_lens.infra.status import StageOutcome
from refusal_lens.report.html import write_report
from refusal_lens.run.stage import StageContext, StageResult
from refusal_lens.stages.analysis import figures as F
from refusal_lens.stages.analysis.evidence import evidence, headline_table
from refusal_lens.stages.analysis.inputs import read_inputs
from refusal_lens.stages.analysis.sections import ReportInputs, sections
from refusal_lens.stages.analysis.similarity import circuit_similarity
from refusal_lens.stages.analysis.top_features import compare_runs, top_features

logger = logging.getLogger(__name__)


class AnalysisError(UserError, RuntimeError):
    """The circuits (or earlier stages) are missing."""


class AnalyzeStage:
    all_ranks = False
    what = "an analysis"
    #: new circuits or analysis settings replace the folder instead of being refused (it is derived and cheap)
    replace_on_change = True

    def check(self, ctx: StageContext) -> None:
        if not ctx.run.complete("circuits"):
            raise AnalysisError(f"the circuits in {ctx.run.paths.circuits.dir} are not finished: run `refusal-lens "
                                "discover` first")

    def fingerprint(self, ctx: StageContext) -> dict:
        return {"circuits": ctx.run.manifest("circuits")["fingerprint"], "analysis": config_to_dict(ctx.cfg.analysis)}

    def still_complete(self, ctx: StageContext) -> bool:
        return ctx.run.paths.analysis.summary.is_file()

    def run(self, ctx: StageContext) -> tuple[dict, dict]:
        cfg, run, files, status = ctx.cfg, ctx.run, ctx.run.paths.analysis, ctx.status
        a, t0 = cfg.analysis, time.perf_counter()
        files.dir.mkdir(parents=True, exist_ok=True)
        status.progress(0, 4, "part")
        inp = read_inputs(run, cfg)  # ---- 1. the earlier stages' results
        status.progress(1)
        sims = circuit_similarity(run, inp.groups, cfg)  # ---- 2. one mechanism or many: circuit similarity
        durable.write_json(files.similarity, sims)
        status.progress(2)
        top = top_features(cfg, inp.groups, run, ctx.loaded.tokenizer)  # ---- 3. top features
        durable.write_json(files.top_features, top)
        status.progress(3)
        summary = evidence(cfg, inp, sims)  # ---- 4. the evidence
        summary.update({"circuits_fingerprint": run.manifest("circuits")["fingerprint"],
                        "analysis_settings": config_to_dict(a), "run": run.name, "model": cfg.model.name})
        comparison = compare_runs(run) if a.compare_runs else []
        figs = F.report_figures(inp.rates, inp.quality, inp.direction, inp.behaviour, inp.faithfulness,
                                inp.agreement, sims, inp.over_refusal_circuit)
        report = write_report(  # ---- 5. the report
            files.dir, f"refusal_lens: {cfg.model.name}",
            sections(ReportInputs(cfg, summary, figs, inp, sims, top, comparison)), summary=headline_table(summary),
            links={"status.json": "../status.json", "circuits/": "../circuits/", "direction/": "../direction/",
                   "SAE quality": "../saes/quality.csv", "refusal rates": "../activations/refusal_rates.csv"},
            subtitle="Every number below is measured on the test split (prompts never used to select or fit "
                     "anything), with its n and a 95% interval.")
        if a.check_render:
            summary.update(render_check(report))
        status.progress(4)
        summary["seconds"] = time.perf_counter() - t0
        durable.write_json(files.summary, summary)
        return summary, {}

    def load(self, ctx: StageContext) -> dict:
        return ctx.run.evidence()

    def outcome(self, ctx: StageContext, result: StageResult) -> tuple[list[str], StageOutcome]:
        report = ctx.run.report
        lines = [f"{key}: {value}" for key, value in headline_table(result.summary).items()] + [f"report: {report}"]
        return lines, StageOutcome("skipped" if result.skipped else "done", {"report": str(report)})


def render_check(report) -> dict:
    """``{"report_render": ...}`` of the report rendered in headless Chromium (``{}`` when it is not installed)."""
    from refusal_lens.report.browser import find_chromium
    from refusal_lens.report.browser import render_check as check

    if find_chromium() is None:
        return {}
    res = check(report)
    if res.errors or res.rendered != res.expected:
        logger.warning("the report rendered %d of %d figures in headless Chromium; errors: %s", res.rendered,
                       res.expected, res.errors)
    return {"report_render": {"rendered": res.rendered, "expected": res.expected, "errors": res.errors}}
