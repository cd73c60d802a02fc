"""The analyze stage's section, ``analysis:``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refusal_lens.config.typed import ConfigError


@dataclass(frozen=True)
class AnalysisConfig:
    """Stage 5, analyze: the evidence on test prompts, layer by layer and across categories, and the report."""

    #: one mechanism or many: permutation draws per similarity test (refusal_lens/core/stats/).
    permutations: int = 1000
    #: draws of the normalised similarity's interval.
    interval_draws: int = 4000
    #: significance level of the tests (and false-discovery rate of Benjamini-Hochberg across a table).
    alpha: float = 0.05
    #: the power floor: a comparison whose groups have fewer test prompts than this is "insufficient" (no verdict).
    min_prompts: int = 10
    #: the margin m of the graded verdicts (docs/statistics.md): "shared" when the lower confidence bound of the
    #: normalised similarity (circuits) or of the transfer (cross-ablation) reaches m, "distinct" only when the upper
    #: bound is below m, "partly shared" in between (lower bound above 0).
    shared_margin: float = 0.8
    #: top features shown per pooled circuit, with their most activating prompt tokens.
    top_features: int = 8
    #: most activating prompt tokens shown per top feature.
    top_examples: int = 5
    #: also compare with the other runs in output.result_dir that have an analysis.
    compare_runs: bool = True
    #: check the report renders in headless Chromium when it is installed.
    check_render: bool = True

    def __post_init__(self) -> None:
        for name in ("permutations", "interval_draws", "top_features", "top_examples", "min_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"analysis.{name}={getattr(self, name)}; allowed: a positive integer")
        for name in ("alpha", "shared_margin"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"analysis.{name}={getattr(self, name)}; allowed: a number in (0, 1]")

