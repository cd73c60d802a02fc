"""What a stage is, and the one implementation of a stage folder's life: prepare, skip, resume, commit.

A **stage** (:class:`Stage`) is an object with five methods (its name, the run folder it writes and its help text
are its row of :data:`refusal_lens.pipeline.STAGES`):

* ``check(ctx)`` — inputs exist and settings make sense; runs before anything is written;
* ``fingerprint(ctx)`` — the mapping that makes two runs of the stage the same (settings and the
  fingerprints of the stages it reads); hashed by :func:`fingerprint_of`;
* ``run(ctx)`` — the work, resuming whatever a killed run had written; returns ``(summary, manifest fields)``;
* ``load(ctx)`` — the summary of a finished folder (a skipped stage, or a rank that did not run it);
* ``outcome(ctx, result)`` — the lines the CLI prints and the stage's entry in ``status.json``;

and optionally ``still_complete(ctx)`` (a finished folder whose files are intact; default: always).

:func:`prepare_folder` and :func:`commit` are the folder's life, used by every stage through
:func:`refusal_lens.pipeline.run_stage`: ``manifest.json`` is written first (fingerprint, ``status:
running``, the resolved config) and last (``status: complete`` and the stage's fields: the commit point);
a folder written with another fingerprint is refused, naming what differs; ``--force`` starts it over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from refusal_lens.config import Config, config_to_dict, dump_config
from refusal_lens.errors import UserError
from refusal_lens.infra import durable
from refusal_lens.infra.distributed import Dist
from refusal_lens.infra.status import StatusFile
from refusal_lens.run.folder import RunFolder, StageFiles

if TYPE_CHECKING:
    from refusal_lens.models.loading import LoadedModel

logger = logging.getLogger(__name__)


class StageFolderError(UserError, RuntimeError):
    """A stage folder written with other settings or inputs, or a folder that is not a stage's."""


class LazyModel:
    """The configured model, loaded once per process on this rank's device when a stage first asks for it."""

    def __init__(self, cfg: Config, dist: Dist, loaded: LoadedModel | None = None):
        self.cfg, self.dist, self._loaded = cfg, dist, loaded

    def get(self) -> LoadedModel:
        from refusal_lens.models.loading import load_model

        if self._loaded is None:
            self._loaded = load_model(dataclasses.replace(self.cfg.model,
                                                          device=self.dist.device(self.cfg.model.device)))
        return self._loaded

    def if_loaded(self) -> LoadedModel | None:
        """The model if a stage has loaded it, without loading it."""
        return self._loaded


@dataclass
class StageContext:
    """Everything a stage runs with: the config, the run folder, the process group, the model (loaded on first
    use), the live status file and the command's flags."""

    cfg: Config
    run: RunFolder
    dist: Dist = field(default_factory=Dist)
    models: LazyModel | None = None
    status: StatusFile = field(default_factory=lambda: StatusFile(None))
    force: bool = False
    show_progress: bool = True
    manifest: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.models is None:
            self.models = LazyModel(self.cfg, self.dist)

    @property
    def loaded(self) -> LoadedModel:
        loaded = self.models.get()
        if self.status.meter is not None:
            self.status.meter.watch_model(loaded)  # once per module: the profile's token counts
        return loaded


@dataclass
class StageResult:
    name: str
    folder: Path
    summary: dict
    skipped: bool = False
    stage: Any = field(default=None, repr=False)  # the Stage object that produced it


class Stage(Protocol):
    #: whether ``run`` runs on every torchrun rank (each doing its share) or on rank 0 while the others wait
    all_ranks: bool
    #: what the folder holds, for messages ("a direction", "SAEs")
    what: str

    def check(self, ctx: StageContext) -> None: ...

    def fingerprint(self, ctx: StageContext) -> dict: ...

    def run(self, ctx: StageContext) -> tuple[dict, dict]: ...

    def load(self, ctx: StageContext) -> dict: ...

    def outcome(self, ctx: StageContext, result: StageResult) -> tuple[list[str], dict]: ...


def fingerprint_of(blob: Any) -> str:
    """The 16-hex-digit SHA-256 of a JSON-able mapping (keys sorted): a stage folder's identity."""
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _config_differences(old: dict, new: dict) -> list[str]:
    return [f"{s}.{k}" for s in new if isinstance(new[s], dict) for k in new[s] if old.get(s, {}).get(k) != new[s][k]]


def read_manifest(files: StageFiles) -> dict:
    return json.loads(files.manifest.read_text()) if files.manifest.is_file() else {}


def prepare_folder(files: StageFiles, fp: str, ctx: StageContext, what: str, replace_on_change: bool = False) -> dict:
    """The stage folder's manifest, the folder created (or, with ``ctx.force``, recreated) when new.

    Every rank checks (so that under torchrun no rank waits at a barrier for one that raised); rank 0 writes.
    A folder with another fingerprint is refused naming the config keys that differ (or the inputs, when none
    does), or replaced when ``replace_on_change`` (a derived, cheap stage); a non-empty folder without a manifest is
    refused as not a stage folder."""
    dist = ctx.dist
    stale = replace_on_change and read_manifest(files).get("fingerprint") not in (None, fp)
    if (ctx.force or stale) and dist.is_main and files.dir.exists():
        shutil.rmtree(files.dir)
    dist.barrier()
    manifest = read_manifest(files)
    if manifest and manifest.get("fingerprint") != fp:
        diffs = _config_differences(manifest.get("config", {}), config_to_dict(ctx.cfg))
        raise StageFolderError(
            f"{files.dir} holds {what} made with other settings or inputs (differs in: "
            f"{', '.join(diffs) or 'the results of an earlier stage, the hooks or the number of processes'}); "
            "rerun with --force to redo it, or set output.run_name to write elsewhere")
    if not manifest and files.dir.exists() and any(files.dir.iterdir()):
        raise StageFolderError(
            f"{files.dir} exists, is not empty and has no {files.manifest.name}: not a refusal_lens {what} folder; "
            "choose another output.run_name or remove it (--force replaces it)")
    dist.barrier()
    if dist.is_main and not manifest:
        files.dir.mkdir(parents=True, exist_ok=True)
        durable.write_text(files.config, dump_config(ctx.cfg))
        durable.write_json(files.manifest, {"fingerprint": fp, "status": "running", "world": dist.world,
                                            "config": config_to_dict(ctx.cfg)})
    dist.barrier()
    return read_manifest(files)


def commit(files: StageFiles, fields: dict) -> dict:
    """Mark the stage folder complete, with the stage's manifest fields: the commit point of the stage."""
    manifest = read_manifest(files)
    manifest.update(fields)
    manifest["status"] = "complete"
    durable.write_json(files.manifest, manifest)
    return manifest


__all__ = ["LazyModel", "Stage", "StageContext", "StageFolderError", "StageResult", "commit", "fingerprint_of",
           "prepare_folder", "read_manifest"]
