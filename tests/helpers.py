"""How tests run a stage: through the one implementation (:func:`refusal_lens.pipeline.run_stage`), on a run folder
of their own, with a model they loaded once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from refusal_lens.infra.distributed import Dist
from refusal_lens.infra.status import StatusFile
from refusal_lens.pipeline import run_stage
from refusal_lens.run.folder import RunFolder
from refusal_lens.run.stage import LazyModel, StageContext


def stage_ctx(cfg, run: RunFolder | Path, loaded=None, *, force: bool = False, dist: Dist | None = None,
              status: StatusFile | None = None, show_progress: bool = False) -> StageContext:
    dist = dist or Dist()
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    return StageContext(cfg, run, dist, LazyModel(cfg, dist, loaded), status or StatusFile(None), force, show_progress)


def run(name: str, cfg, run_dir: RunFolder | Path, loaded=None, **kw):
    """Stage ``name`` on the run folder ``run_dir``; the :class:`~refusal_lens.run.stage.StageResult`."""
    return run_stage(name, stage_ctx(cfg, run_dir, loaded, **kw))


def collect(loaded, prompts, cfg, acts_dir: Path, **kw):
    """The collect stage on explicit ``prompts`` into ``acts_dir`` (a run folder's ``activations/``): the result's
    summary (``hooks``, ``rates``, ``n_prompts``) with ``skipped``, ``folder`` and rank 0's ``stats`` (manifest)."""
    from refusal_lens.stages.collect.stage import CollectStage

    acts_dir = Path(acts_dir)
    if acts_dir.name != "activations":
        raise ValueError(f"{acts_dir}: a run folder's activations folder is named 'activations'")
    ctx = stage_ctx(cfg, acts_dir.parent, loaded, **kw)
    result = run_stage("collect", ctx, CollectStage(prompts))
    stats = ctx.run.manifest("activations").get("stats_rank0")
    return SimpleNamespace(**result.summary, skipped=result.skipped, folder=result.folder, stats=stats)


def sibling_run(root: Path, name: str) -> Path:
    """A run folder beside ``root`` that reads ``root``'s activations (a symlink): for a later stage written
    several times from one collection."""
    run_dir = Path(root).parent / f"{Path(root).name}-{name}"
    run_dir.mkdir(exist_ok=True)
    link = run_dir / "activations"
    if not link.exists():
        link.symlink_to(Path(root).resolve() / "activations", target_is_directory=True)
    return run_dir


def train_saes(cfg, loaded, run_dir: Path, **kw):
    """The train-saes stage on ``run_dir``: its summary (``quality``, ``trained`` / ``skipped`` hooks) with
    ``folder`` and ``stage_skipped``."""
    result = run("train-saes", cfg, run_dir, loaded, **kw)
    return SimpleNamespace(**result.summary, folder=result.folder, stage_skipped=result.skipped)
