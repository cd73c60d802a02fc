"""What the analysis reads: every earlier stage's results, through the run folder (nothing here selects or tunes
anything), and the paired interval of the headline circuit's share of the direction's effect."""

from __future__ import annotations

import json
from dataclasses import dataclass

from refusal_lens.config import Config
from refusal_lens.core.behaviour import paired_fraction_interval
from refusal_lens.run.folder import CircuitFiles, RunFolder


@dataclass
class AnalysisInputs:
    """The earlier stages' results, as the evidence, the figures and the report read them."""

    acts: dict  # the collect stage's manifest
    rates: list[dict]  # refusal rates per split, category and label
    quality: list[dict]  # the SAE quality table
    d_summary: dict  # the direction stage's summary
    direction: dict  # its parts by name (direction.json as "direction", candidates, evaluation, ...)
    c_summary: dict  # the discover stage's summary
    behaviour: dict | None
    faithfulness: dict | None
    agreement: dict | None
    groups: dict[str, dict]  # every circuit by label/category
    fraction_ci: dict | None  # the paired interval of the headline circuit's share of the direction's effect
    #: the same interval for the headline's edit with its component along the direction removed
    without_direction_ci: dict | None = None
    #: over-refusal's own features? (the discover stage's validation/over_refusal.json)
    over_refusal_circuit: dict | None = None


def read_inputs(run: RunFolder, cfg: Config) -> AnalysisInputs:
    acts = run.manifest("activations")
    rates = json.loads(run.paths.activations.rates_json.read_text())
    direction = {"direction" if name == "info" else name: run.direction_part(name)
                 for name in ("info", "candidates", "evaluation", "categories", "over_refusal", "false_refusal",
                              "emergence")}
    behaviour = run.behaviour()
    fraction_ci = without_ci = None
    if behaviour and run.paths.circuits.responses.is_file():
        h = behaviour["headline"]
        head = CircuitFiles.curve_condition(h["method"], h["intervention"], h["k"])
        fraction_ci = paired_fraction_interval(run.paths.circuits.responses, "clean", head, "direction_ablated",
                                               draws=cfg.analysis.interval_draws, seed=cfg.circuits.seed)
        if "without_direction" in h:
            without_ci = paired_fraction_interval(run.paths.circuits.responses, "clean", "headline_without_direction",
                                                  "direction_ablated", draws=cfg.analysis.interval_draws,
                                                  seed=cfg.circuits.seed)
    return AnalysisInputs(acts, rates, run.sae_quality(), run.direction_summary(), direction, run.circuits_summary(),
                          behaviour, run.faithfulness(), run.agreement(), run.circuits(), fraction_ci, without_ci,
                          run.over_refusal_circuit())
