"""The main job, stage by stage: :data:`STAGES` is the one table the CLI, ``run`` and the docs are built from, and
:func:`run_stage` the one place where a stage's folder is prepared, skipped, resumed, forced and committed.

    1. collect     -> <run>/activations/   prompts, responses, judgements, the split, activations per hook
    2. direction   -> <run>/direction/     the refusal direction (selected on validation, evaluated on test)
    3. train-saes  -> <run>/saes/          one SAE per collected hook (SAE-Lens format)
    4. discover    -> <run>/circuits/      refusal circuits over SAE features, validated on test
    5. analyze     -> <run>/analysis/      the evidence on test and the offline HTML report

A command (:func:`run_stages`) takes the run folder's lock (one writer at a time), opens one torchrun process
group for all its stages, loads the model once (when a stage first needs it) and keeps ``status.json`` live.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from refusal_lens.config import Config
from refusal_lens.infra.status import StageOutcome, StatusFile
from refusal_lens.infra.token_meter import TokenMeter
from refusal_lens.infra.freed_memory import keep_freed_memory, release_freed_memory
from refusal_lens.infra.mapped_weights import unmap_file_weights
from refusal_lens.infra.resident_memory import PeakSampler
from refusal_lens.run.folder import RunFolder
from refusal_lens.run.stage import (
    LazyModel,
    Stage,
    StageContext,
    StageResult,
    commit,
    fingerprint_of,
    prepare_folder,
)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """One row of the pipeline: the stage's name (its CLI command and status name), the run folder it writes, what
    it does, and where its :class:`~refusal_lens.run.stage.Stage` lives (imported when the stage runs, so that the
    CLI answers and takes the run's lock before torch is imported)."""

    name: str
    folder: str
    help: str
    target: str  # "module:Class"

    def load(self) -> Stage:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)()


#: every stage, in pipeline order; ``refusal-lens <name>`` runs one, ``refusal-lens run`` all of them
STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("collect", "activations", "collect prompts, responses, refusal judgements, the split and activations",
              "refusal_lens.stages.collect.stage:CollectStage"),
    StageSpec("direction", "direction", "select the refusal direction by cause (validation) and evaluate it (test)",
              "refusal_lens.stages.direction.stage:DirectionStage"),
    StageSpec("train-saes", "saes", "train one SAE per collected hook", "refusal_lens.stages.saes.stage:TrainSAEsStage"),
    StageSpec("discover", "circuits", "discover refusal circuits by attribution patching",
              "refusal_lens.stages.circuits.stage:DiscoverStage"),
    StageSpec("analyze", "analysis", "analyse circuits and write the report",
              "refusal_lens.stages.analysis.stage:AnalyzeStage"),
)}
#: the commands that run stages: each stage alone, and ``run`` (all of them in order)
COMMANDS: dict[str, tuple[str, ...]] = {**{name: (name,) for name in STAGES}, "run": tuple(STAGES)}


def stage_table() -> str:
    """The pipeline as a Markdown table (docs/outputs.md holds it; a test keeps it current)."""
    rows = ["| # | command | folder | what |", "|---|---|---|---|"]
    rows += [f"| {i} | `refusal-lens {s.name}` | `<run>/{s.folder}/` | {s.help} |" for i, s in enumerate(STAGES.values(), 1)]
    return "\n".join(rows)


def run_stage(spec: StageSpec | str, ctx: StageContext, stage: Stage | None = None) -> StageResult:
    """One stage: check its inputs, prepare its folder (refusing one of other settings), skip it when it is
    complete and intact, else run it (resuming what a killed run wrote) and commit it. Under torchrun, a stage
    that is not ``all_ranks`` runs on rank 0 while the others wait, then read its result. ``stage`` replaces the
    spec's own stage object (e.g. a :class:`~refusal_lens.stages.collect.stage.CollectStage` given its prompts)."""
    spec = STAGES[spec] if isinstance(spec, str) else spec
    stage, files = stage or spec.load(), ctx.run.paths.of(spec.folder)
    stage.check(ctx)  # bad settings and missing inputs fail before anything is written
    ctx.manifest = prepare_folder(files, fingerprint_of(stage.fingerprint(ctx)), ctx, stage.what,
                                  getattr(stage, "replace_on_change", False))
    if ctx.manifest.get("status") == "complete" and getattr(stage, "still_complete", lambda _: True)(ctx):
        logger.info("%s: %s is complete (--force redoes it)", spec.name, files.dir)
        summary = stage.load(ctx)
        if hasattr(stage, "on_skip"):
            stage.on_skip(ctx, summary)
        return StageResult(spec.name, files.dir, summary, skipped=True, stage=stage)
    summary, fields = None, {}
    if stage.all_ranks or ctx.dist.is_main:
        summary, fields = stage.run(ctx)
    ctx.dist.barrier()
    if ctx.dist.is_main:
        ctx.manifest = commit(files, fields)
    ctx.dist.barrier()
    return StageResult(spec.name, files.dir, summary if summary is not None else stage.load(ctx), stage=stage)


def run_stages(cfg: Config, names: Sequence[str], *, force: bool = False, command: str | None = None,
               show_progress: bool = True, on_result: Callable[[StageContext, list[str], StageResult], None] | None = None,
               models: LazyModel | None = None) -> dict[str, StageResult]:
    """Run ``names`` (stage names, in order) on the run folder of ``cfg``: the lock, one process group, one model,
    the live status. ``on_result(ctx, lines, result)`` is called after each stage with the lines it reports (the CLI
    prints them)."""
    from refusal_lens.infra.distributed import distributed, launch_rank
    from refusal_lens.infra.lock import run_lock

    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; allowed: {', '.join(STAGES)}")
    command = command or (names[0] if len(names) == 1 else "run")
    run = RunFolder.of(cfg)
    results: dict[str, StageResult] = {}
    # one writer per run folder, for the whole command: taken (by rank 0) before torch is imported, so that a
    # second writer is refused at once and before it touches anything, status.json included
    with run_lock(run.root, command, is_main=launch_rank() == 0), distributed() as dist:
        keep_freed_memory()  # freed activations are reused within a part, not faulted in again (infra.freed_memory)
        cfg = with_concrete_dtypes(cfg, dist, models.if_loaded() if models is not None else None)
        if dist.is_main:
            log_memory_plan(cfg)
        models = models if models is not None else LazyModel(cfg, dist)
        status = StatusFile(run.status_file, enabled=dist.is_main, meter=TokenMeter(), memory=PeakSampler(),
                            at_part=lambda: between_parts(models))
        status.begin(command, list(names))
        try:
            for name in names:
                status.start_stage(name)
                ctx = StageContext(cfg, run, dist, models, status, force, show_progress)
                results[name] = result = run_stage(name, ctx)
                lines, outcome = result.stage.outcome(ctx, result)
                if on_result is not None:
                    on_result(ctx, lines, result)
                outcome = outcome or StageOutcome()
                status.finish_stage(name, outcome.state, outcome.summary)
        except KeyboardInterrupt:
            status.finish("interrupted")
            raise
        except Exception as err:
            status.finish("failed", error=str(err) or type(err).__name__)
            raise
        status.finish("done")
    return results


def with_concrete_dtypes(cfg: Config, dist, loaded=None) -> Config:
    """``cfg`` with ``model.intervention_dtype: auto`` replaced by the dtype it stands for (that of the given model,
    else this machine's choice: :func:`refusal_lens.models.loading.concrete_intervention_dtype`), rank 0 first so
    that every rank reads the choice rank 0 recorded."""
    import dataclasses

    from refusal_lens.models.loading import concrete_intervention_dtype

    if cfg.model.intervention_dtype != "auto":
        return cfg
    model_cfg = dataclasses.replace(cfg.model, device=dist.device(cfg.model.device))
    if not dist.is_main:
        dist.barrier()
    name = concrete_intervention_dtype(model_cfg, loaded).intervention_dtype
    if dist.is_main:
        dist.barrier()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, intervention_dtype=name))


def between_parts(models: LazyModel) -> None:
    """What a part leaves resident and the next need not hold: freed heap (:mod:`refusal_lens.infra.freed_memory`)
    and the file-mapped weights of the model (:mod:`refusal_lens.infra.mapped_weights`: a part that reads them
    faults them back in from the page cache)."""
    release_freed_memory()
    loaded = models.if_loaded()
    if loaded is not None:
        unmap_file_weights([loaded.hf_model, loaded.gen_model])


def log_memory_plan(cfg: Config) -> None:
    """The memory plan in the log before any model loads. It only informs: a model whose config cannot be read
    here (a hub name offline, a missing folder, an architecture transformers lacks) gets a warning, and the stage
    itself reports the real error."""
    from refusal_lens.infra.memory_plan import device_capacity, plan_for_config

    try:
        plan = plan_for_config(cfg)
    except Exception as err:  # noqa: BLE001 (never changes what the command does)
        logger.warning("no memory plan for %s: %s", cfg.model.name, err)
        return
    for line in plan.lines(device_capacity(cfg.model.device)):
        logger.info("%s", line)


__all__ = ["COMMANDS", "STAGES", "StageSpec", "log_memory_plan", "run_stage", "run_stages", "stage_table",
           "with_concrete_dtypes"]
