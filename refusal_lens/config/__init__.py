"""Typed, frozen configs loaded from YAML: one :class:`Config` of sections, each section beside the code that
reads it (``model`` and ``output`` here, the others in ``refusal_lens/stages/<stage>/config.py``).

See :mod:`refusal_lens.config.typed` for the loading rules (unknown keys and wrong types are errors naming
their dotted path, ``base:`` files, ``--set`` overrides) and docs/configuration.md for every key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from refusal_lens.config.sections import ModelConfig, OutputConfig
from refusal_lens.config.typed import (
    ConfigError,
    _build,
    apply_overrides,
    config_to_dict,
    dump_config,
    read_config_dict,
)
from refusal_lens.stages.analysis.config import AnalysisConfig
from refusal_lens.stages.circuits.config import CircuitConfig
from refusal_lens.stages.collect.config import DataConfig, InferenceConfig
from refusal_lens.stages.direction.config import DirectionConfig
from refusal_lens.stages.saes.config import SAEConfig


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    circuits: CircuitConfig = field(default_factory=CircuitConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


def config_from_dict(raw: Mapping) -> Config:
    return _build(Config, raw, "")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = read_config_dict(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))



__all__ = [
    "AnalysisConfig",
    "CircuitConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DirectionConfig",
    "InferenceConfig",
    "ModelConfig",
    "OutputConfig",
    "SAEConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "read_config_dict",
]
