"""The main job, stage by stage. Only this module (with the CLI) knows where results go:

    <output.result_dir>/<run>/
        activations/   stage 1: prompts, responses, refusal judgements, the split, activations per hook
        direction/     stage 2: the refusal direction (selected on validation, evaluated on test)
        saes/          stage 3 (train-saes)
        circuits/      stage 4 (discover)
        analysis/      stage 5 (analyze)

``<run>`` is ``output.run_name``, or the model name made path-safe. Each stage skips when its
folder is complete and ``force`` is false. Stages take the process's :class:`Dist` (one torchrun
process group for the whole command) and a :class:`Models` that loads the model once.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from refusal_lens.config import Config
from refusal_lens.distributed import Dist
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)


def run_dir(cfg: Config) -> Path:
    name = cfg.output.run_name or re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.model.name).name or cfg.model.name)
    return Path(cfg.output.result_dir) / name


def activations_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "activations"


class Models:
    """Loads the configured model once per process, on this rank's device, when a stage first needs it."""

    def __init__(self, cfg: Config, dist: Dist):
        self.cfg, self.dist, self._loaded = cfg, dist, None

    def get(self):
        from refusal_lens.models.loading import load_model

        if self._loaded is None:
            self._loaded = load_model(dataclasses.replace(self.cfg.model, device=self.dist.device(self.cfg.model.device)))
        return self._loaded


def run_collect(cfg: Config, dist: Dist, models: Models, *, force: bool = False, show_progress: bool = True,
                status: StatusFile | None = None):
    """Stage 1: load the prompts (bad data fails before the model loads), collect into ``<run>/activations``."""
    from refusal_lens.collect import collect
    from refusal_lens.prompts import load_harmless, load_prompts

    prompts = load_prompts(cfg.data) + load_harmless(cfg.direction.harmless, cfg.direction.harmless_samples,
                                                     cfg.data.seed)
    return collect(models.get(), prompts, cfg, activations_dir(cfg), force=force, dist=dist,
                   show_progress=show_progress, status=status)


def direction_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "direction"


def run_direction(cfg: Config, dist: Dist, models: Models, *, force: bool = False, show_progress: bool = True,
                  status: StatusFile | None = None):
    """Stage 2: the refusal direction, selected on validation and evaluated on test, into ``<run>/direction``."""
    from refusal_lens.direction.stage import run_direction_stage

    return run_direction_stage(cfg, models.get(), activations_dir(cfg), direction_dir(cfg), force=force, dist=dist,
                               show_progress=show_progress, status=status)


def saes_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "saes"


def run_train_saes(cfg: Config, dist: Dist, models: Models, *, force: bool = False, show_progress: bool = True,
                   status: StatusFile | None = None):
    """Stage 2: one SAE per collected hook into ``<run>/saes`` (the model serves the splice metrics)."""
    from refusal_lens.saes.stage import run_sae_stage

    return run_sae_stage(cfg, models.get(), activations_dir(cfg), saes_dir(cfg), force=force, dist=dist,
                         show_progress=show_progress, status=status)


def circuits_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "circuits"


def run_discover(cfg: Config, dist: Dist, models: Models, *, force: bool = False, show_progress: bool = True,
                 status: StatusFile | None = None):
    """Stage 3: refusal circuits over the SAEs into ``<run>/circuits``."""
    from refusal_lens.circuits.stage import run_discover_stage

    return run_discover_stage(cfg, models.get(), activations_dir(cfg), saes_dir(cfg), direction_dir(cfg),
                              circuits_dir(cfg), force=force, dist=dist, show_progress=show_progress, status=status)


def run_analyze(cfg: Config, dist: Dist, models: Models, *, force: bool = False, show_progress: bool = True,
                status: StatusFile | None = None):
    """Stage 4: analysis and the HTML report into ``<run>/analysis`` (the model loads only if needed)."""
    from refusal_lens.analysis.stage import run_analysis_stage

    return run_analysis_stage(cfg, models.get, run_dir(cfg), force=force, dist=dist, show_progress=show_progress,
                              status=status)
