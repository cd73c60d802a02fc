"""The paths of a run's stage folders, one class per stage folder (:class:`RunPaths`): the names of every result
file live here and nowhere else. :class:`refusal_lens.run.folder.RunFolder` holds a :class:`RunPaths` and the
readers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
FIGURES = "figures"


def safe_name(name: str) -> str:
    """A file or folder name made of letters, digits, ``.``, ``_`` and ``-`` (other runs of characters -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@dataclass(frozen=True)
class StageFiles:
    """The files every stage folder has: its manifest (fingerprint, status: the stage's commit point), the
    resolved config, and (for most stages) ``summary.json`` and ``figures/``."""

    dir: Path

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    @property
    def config(self) -> Path:
        return self.dir / CONFIG

    @property
    def summary(self) -> Path:
        return self.dir / SUMMARY

    @property
    def figures(self) -> Path:
        return self.dir / FIGURES


@dataclass(frozen=True)
class ActivationFiles(StageFiles):
    """``activations/``: the collect stage."""

    @property
    def prompts(self) -> Path:
        return self.dir / "prompts"

    @property
    def responses(self) -> Path:
        return self.dir / "responses"

    @property
    def progress(self) -> Path:
        return self.dir / "progress"

    @property
    def split(self) -> Path:
        return self.dir / "split.json"

    @property
    def rates_json(self) -> Path:
        return self.dir / "refusal_rates.json"

    @property
    def rates_csv(self) -> Path:
        return self.dir / "refusal_rates.csv"

    def hook(self, hook: str) -> Path:
        """The HF ``datasets`` folder of one hook's activations (column named after the hook)."""
        return self.dir / hook


@dataclass(frozen=True)
class DirectionFiles(StageFiles):
    """``direction/``: the direction stage."""

    @property
    def vector(self) -> Path:
        return self.dir / "direction.safetensors"

    @property
    def info(self) -> Path:
        return self.dir / "direction.json"

    @property
    def candidate_tensors(self) -> Path:
        return self.dir / "candidates.safetensors"

    @property
    def candidates(self) -> Path:
        return self.dir / "candidates.json"

    @property
    def evaluation(self) -> Path:
        return self.dir / "evaluation.json"

    @property
    def categories(self) -> Path:
        return self.dir / "categories.json"

    @property
    def over_refusal(self) -> Path:
        return self.dir / "over_refusal.json"

    @property
    def false_refusal(self) -> Path:
        return self.dir / "false_refusal.json"

    @property
    def false_refusal_why(self) -> Path:
        """Why no single direction separates over-refusal from correct refusal (refusal_lens.checks.false_refusal_why)."""
        return self.dir / "false_refusal_why.json"

    @property
    def false_refusal_vector(self) -> Path:
        """The selected false-refusal vector w' (tensor ``direction``), beside the refusal direction."""
        return self.dir / "false_refusal.safetensors"

    @property
    def emergence(self) -> Path:
        return self.dir / "emergence.json"

    @property
    def responses(self) -> Path:
        return self.dir / "responses"

    def audit(self, part: str) -> Path:
        """The judged responses of one part (``evaluation``, ``categories``, ``over_refusal``, ``false_refusal``)."""
        return self.responses / f"{part}.jsonl"

    #: the parts whose JSON a reader may ask for by name (:meth:`RunFolder.direction_part`)
    PARTS = ("info", "candidates", "evaluation", "categories", "over_refusal", "false_refusal", "emergence")


@dataclass(frozen=True)
class SAEFiles(StageFiles):
    """``saes/``: the train-saes stage; one SAE-Lens folder per hook."""

    @property
    def quality_json(self) -> Path:
        return self.dir / "quality.json"

    @property
    def quality_csv(self) -> Path:
        return self.dir / "quality.csv"

    def hook(self, hook: str) -> Path:
        """SAE-Lens's own format: ``cfg.json`` + ``sae_weights.safetensors`` (+ the files below)."""
        return self.dir / hook

    def partial(self, hook: str) -> Path:
        """Where a hook's SAE is written before it is committed (renamed to :meth:`hook`)."""
        return self.dir / f".{hook}.partial"

    @staticmethod
    def training_log(hook_dir: Path) -> Path:
        return hook_dir / "training_log.jsonl"

    @staticmethod
    def metrics(hook_dir: Path) -> Path:
        return hook_dir / "metrics.json"

    @staticmethod
    def ledger(hook_dir: Path) -> Path:
        """Size and SHA-256 of every other file of the hook's folder, written last."""
        return hook_dir / "files.json"

    @staticmethod
    def sae_config(hook_dir: Path) -> Path:
        return hook_dir / "cfg.json"


@dataclass(frozen=True)
class CircuitFiles(StageFiles):
    """``circuits/``: the discover stage."""

    @property
    def space(self) -> Path:
        return self.dir / "space.json"

    @property
    def prompts(self) -> Path:
        return self.dir / "prompts.json"

    @property
    def effects(self) -> Path:
        return self.dir / "effects"

    def effects_of(self, split: str) -> Path:
        """Per-prompt node effects of one split: features ``[n, classes, features]``, errors, metric, rows."""
        return self.effects / f"{split}.safetensors"

    @property
    def validation(self) -> Path:
        return self.dir / "validation"

    @property
    def agreement(self) -> Path:
        return self.validation / "agreement.json"

    @property
    def faithfulness(self) -> Path:
        return self.validation / "faithfulness.json"

    @property
    def behaviour(self) -> Path:
        return self.validation / "behaviour.json"

    @property
    def edges(self) -> Path:
        return self.validation / "edges.json"

    @property
    def over_refusal(self) -> Path:
        """Over-refusal's own features? (stages/circuits/over_refusal.py)"""
        return self.validation / "over_refusal.json"

    @property
    def over_refusal_responses(self) -> Path:
        """Every generated response of :attr:`over_refusal`, judged (one JSON line each)."""
        return self.validation / "over_refusal_responses.jsonl"

    @property
    def responses(self) -> Path:
        """Every generated response of the behaviour checks, judged (one JSON line each)."""
        return self.validation / "responses.jsonl"

    @staticmethod
    def curve_condition(method: str, intervention: str, k: int) -> str:
        """The name of a K-curve condition in :attr:`responses`, e.g. ``attribution/scale(c=3)/all/k20``;
        validation's are prefixed ``validation/``."""
        return f"{method}/{intervention}/k{k}"

    def circuit(self, label: str, category: str) -> Path:
        """One signed circuit: ``<label>/<category>.json`` (``all`` = pooled over categories)."""
        return self.dir / label / f"{safe_name(category)}.json"

    def label_dir(self, label: str) -> Path:
        return self.dir / label


@dataclass(frozen=True)
class AnalysisFiles(StageFiles):
    """``analysis/``: the analyze stage."""

    @property
    def report(self) -> Path:
        return self.dir / "report.html"

    @property
    def similarity(self) -> Path:
        return self.dir / "similarity.json"

    @property
    def top_features(self) -> Path:
        return self.dir / "top_features.json"


@dataclass(frozen=True)
class RunPaths:
    activations: ActivationFiles
    direction: DirectionFiles
    saes: SAEFiles
    circuits: CircuitFiles
    analysis: AnalysisFiles

    def of(self, folder: str) -> StageFiles:
        """The files of a stage folder by its name (``activations``, ``direction``, ...)."""
        if folder not in FOLDERS:
            raise KeyError(f"unknown stage folder {folder!r}; allowed: {', '.join(FOLDERS)}")
        return getattr(self, folder)


#: the stage folders of a run, in pipeline order
FOLDERS = ("activations", "direction", "saes", "circuits", "analysis")
