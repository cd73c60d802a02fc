"""One run's folder: every path of a run, and typed readers of what the stages wrote there.

    <output.result_dir>/<run>/
        activations/   collect: prompts, responses, judgements, the split, activations per hook
        direction/     direction: the refusal direction (selected on validation, evaluated on test)
        saes/          train-saes: one SAE-Lens SAE per hook, their quality
        circuits/      discover: circuits over SAE features, validated on test
        analysis/      analyze: the evidence (summary.json) and the report
        status.json    the live status of the running command
        .lock          one writer at a time

``<run>`` is ``output.run_name``, or the model name made path-safe. This module is the only place that
spells out a result's path: stages write through :attr:`RunFolder.paths`, and stages, checks, benches, the
report and the Python API read through the ``RunFolder`` readers (:meth:`RunFolder.collected`,
:meth:`RunFolder.direction`, :meth:`RunFolder.saes`, :meth:`RunFolder.circuit`, :meth:`RunFolder.behaviour`,
...). File formats: docs/outputs.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_lens.errors import UserError
from refusal_lens.run.paths import (
    FOLDERS,
    MANIFEST,
    ActivationFiles,
    AnalysisFiles,
    CircuitFiles,
    DirectionFiles,
    RunPaths,
    SAEFiles,
    StageFiles,
    safe_name,
)

if TYPE_CHECKING:
    from refusal_lens.config import Config
    from refusal_lens.run.collected import Collected
    from refusal_lens.run.direction_file import SavedDirection

class RunFolderError(UserError, FileNotFoundError):
    """A result a reader asked for is not in the run folder (its stage has not run, or not finished)."""


def _read_json(path: Path, what: str, stage: str) -> Any:
    if not path.is_file():
        raise RunFolderError(f"no {what} at {path}: run `refusal-lens {stage}` (or `refusal-lens run`) first")
    return json.loads(path.read_text())


class RunFolder:
    """The folder of one run: paths (:attr:`paths`) and typed readers of its results."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.paths = RunPaths(ActivationFiles(self.root / "activations"), DirectionFiles(self.root / "direction"),
                              SAEFiles(self.root / "saes"), CircuitFiles(self.root / "circuits"),
                              AnalysisFiles(self.root / "analysis"))

    @classmethod
    def of(cls, cfg: Config) -> RunFolder:
        """The run folder a config writes: ``<output.result_dir>/<output.run_name or the model's name>``."""
        name = cfg.output.run_name or safe_name(Path(cfg.model.name).name or cfg.model.name)
        return cls(Path(cfg.output.result_dir) / name)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def check_output(self, name: str) -> Path:
        """Where a check (:mod:`refusal_lens.checks`) writes its result: ``<run>/<name>.json``."""
        return self.root / f"{safe_name(name)}.json"

    # ------------------------------------------------------------------ stage state

    def manifest(self, folder: str) -> dict:
        """A stage folder's manifest (``{}`` when the stage has not started)."""
        path = self.paths.of(folder).manifest
        return json.loads(path.read_text()) if path.is_file() else {}

    def complete(self, folder: str) -> bool:
        return self.manifest(folder).get("status") == "complete"

    def config(self):
        """The resolved config the run's first stage wrote (``activations/config.yaml``)."""
        from refusal_lens.config import load_config

        path = self.paths.activations.config
        if not path.is_file():
            raise RunFolderError(f"no config at {path}: not a run folder, or its collect stage never started")
        return load_config(path)

    # ------------------------------------------------------------------ readers

    def collected(self) -> Collected:
        """The prompts table, manifest and refusal tokens of the finished collect stage."""
        from refusal_lens.run.collected import load_collected

        return load_collected(self.paths.activations)

    def hook_activations(self, hook: str):
        """One hook's stored activations (:class:`refusal_lens.activations.store.HookActivations`)."""
        from refusal_lens.activations.store import HookActivations

        return HookActivations(self.paths.activations.hook(hook))

    def direction(self) -> SavedDirection:
        """The selected refusal direction (raw difference in means) and where it was taken."""
        from refusal_lens.run.direction_file import load_direction

        return load_direction(self.paths.direction)

    def direction_part(self, name: str) -> dict | None:
        """One JSON part of the direction stage by name (see :attr:`DirectionFiles.PARTS`), None when absent."""
        if name not in DirectionFiles.PARTS:
            raise KeyError(f"unknown direction part {name!r}; allowed: {', '.join(DirectionFiles.PARTS)}")
        path = getattr(self.paths.direction, name)
        return json.loads(path.read_text()) if path.is_file() else None

    def direction_summary(self) -> dict:
        return _read_json(self.paths.direction.summary, "direction summary", "direction")

    def sae_quality(self) -> list[dict]:
        """The per-hook SAE quality table (test metrics; ``passes`` = the bar on validation)."""
        return _read_json(self.paths.saes.quality_json, "SAE quality table", "train-saes")

    def sae_hooks(self, passing: bool = False) -> list[str]:
        """The hooks with an SAE (only those passing the quality bar when ``passing``)."""
        return [row["hook"] for row in self.sae_quality() if row["passes"] or not passing]

    def saes(self, hooks=None, device: str = "cpu") -> dict:
        """SAE-Lens ``SAE`` objects of ``hooks`` (default: every trained hook), in eval mode, frozen."""
        from refusal_lens.run.sae_files import load_saes

        return load_saes(self.paths.saes, list(hooks) if hooks is not None else self.sae_hooks(), device)

    def circuits_summary(self) -> dict:
        return _read_json(self.paths.circuits.summary, "circuit summary", "discover")

    def circuit(self, label: str, category: str = "all") -> dict:
        """One signed circuit (``label`` safe/toxic, ``category`` or ``all``): promoting / suppressing nodes."""
        return _read_json(self.paths.circuits.circuit(label, category), f"{label}/{category} circuit", "discover")

    def circuits(self) -> dict[str, dict]:
        """Every circuit of the run by ``label/category``."""
        out = {}
        for label in ("safe", "toxic"):
            folder = self.paths.circuits.label_dir(label)
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                doc = json.loads(path.read_text())
                out[f"{doc['label']}/{doc['category']}"] = doc
        return out

    def behaviour(self) -> dict | None:
        """The circuits' behaviour on test prompts (None when the stage skipped it)."""
        path = self.paths.circuits.behaviour
        return json.loads(path.read_text()) if path.is_file() else None

    def over_refusal_circuit(self) -> dict | None:
        """Over-refusal's own features? (None when the stage did not measure it)."""
        path = self.paths.circuits.over_refusal
        return json.loads(path.read_text()) if path.is_file() else None

    def faithfulness(self) -> dict | None:
        path = self.paths.circuits.faithfulness
        return json.loads(path.read_text()) if path.is_file() else None

    def agreement(self) -> dict | None:
        path = self.paths.circuits.agreement
        return json.loads(path.read_text()) if path.is_file() else None

    def attributed_prompts(self) -> list[dict]:
        return _read_json(self.paths.circuits.prompts, "attributed prompts", "discover")

    def evidence(self) -> dict:
        """The analysis's ``summary.json``: the evidence the report and the README are written from."""
        return _read_json(self.paths.analysis.summary, "analysis summary", "analyze")

    @property
    def report(self) -> Path:
        return self.paths.analysis.report


__all__ = ["FOLDERS", "MANIFEST", "ActivationFiles", "AnalysisFiles", "CircuitFiles", "DirectionFiles", "RunFolder",
           "RunFolderError", "RunPaths", "SAEFiles", "StageFiles", "safe_name"]
