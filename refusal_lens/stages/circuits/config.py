"""The discover stage's section, ``circuits:``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refusal_lens.config.typed import ConfigError
from refusal_lens.core.hooks import LayerSpecError, check_layer_specs


@dataclass(frozen=True)
class CircuitConfig:
    """Stage 4, discover: refusal circuits over SAE features, validated on test prompts (docs/circuits.md)."""

    #: hooks to splice SAEs into (layer specs); empty = every hook whose SAE passes the quality bar.
    hooks: tuple[str | int, ...] = ()
    #: estimator of node effects on the refusal score, which ranks the circuits' nodes: linear attribution
    #: patching (one backward pass for all nodes) or integrated gradients (``ig_steps`` passes per hook).
    method: Literal["atp", "ig"] = "atp"
    #: integrated gradients: midpoint steps per hook.
    ig_steps: int = 10
    #: error nodes (one per hook: the SAE's whole error term) patched exactly (one forward pass per hook and
    #: batch) or estimated like the features.
    error_nodes: Literal["exact", "estimate"] = "exact"
    #: what an active feature and an error node are patched to: the ``mean`` of its site class over the
    #: reference prompts, or ``zero``.
    baseline: Literal["mean", "zero"] = "mean"
    #: reference prompts of the mean (discovery split): harmless prompts the model answered (the direction's
    #: contrast), OR-Bench safe prompts it answered, or every prompt.
    reference: Literal["harmless", "safe_complied", "all"] = "harmless"
    #: circuits per category and label (safe, toxic), and pooled over categories.
    labels: tuple[Literal["safe", "toxic"], ...] = ("safe", "toxic")
    #: categories to build circuits for (each must have prompts); empty = every category in the data.
    categories: tuple[str, ...] = ()
    #: which prompts of a group: those the model refused (the decision to refuse; on safe prompts,
    #: over-refusal), all of them, or those it answered.
    select: Literal["all", "refused", "complied"] = "refused"
    #: nodes listed per sign (refusal-promoting, refusal-suppressing) in each circuit file.
    top_k: int = 20
    #: bootstrap resamples over test prompts of each node's interval.
    bootstrap: int = 1000
    #: selection methods of the behaviour checks: attribution, cosine with the refusal direction, both.
    methods: tuple[Literal["attribution", "cosine", "combined"], ...] = ("attribution", "cosine", "combined")
    #: ``combined`` (and the reference's cosine pre-selection): features kept per hook by cosine.
    cosine_preselect: int = 10
    #: behaviour: circuit sizes (refusal-promoting features) of the K-curve.
    behaviour_k: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    #: the headline circuit's size (its share of the direction's effect is the headline number).
    headline_k: int = 20
    #: the headline circuit's selection method; ``auto`` = chosen on the validation split with the ablation
    #: (the method x ablation x positions whose K = headline_k circuit gets the most complied validation answers:
    #: an incoherent answer counts against it).
    headline_method: Literal["auto", "attribution", "cosine", "combined"] = "auto"
    #: feature interventions of the behaviour checks: the ablations zero and mean (class mean of the reference),
    #: and scale (f <- -c f, one per c of scale_c), which is steering. The headline is the ablation chosen on
    #: validation (it runs the K-curve on test); the others run at the headline K, scale in rows named steering
    #: beside the direction's own steering equivalent. At least one ablation is needed.
    interventions: tuple[Literal["zero", "mean", "scale"], ...] = ("zero", "mean", "scale")
    #: where the interventions apply: every position (the template's opening and generated tokens included), or
    #: every position after the opening (generated tokens included); chosen on validation like the intervention.
    positions: tuple[Literal["all", "after_opening"], ...] = ("all",)
    #: the scale intervention's candidates c: f <- -c f (Yeo et al.: c = 3 on Gemma, 1 on Llama).
    scale_c: tuple[float, ...] = (1.0, 3.0)
    #: matched random feature sets (same count per hook) against the headline circuit: the control distribution.
    random_sets: int = 20
    #: how many of the random sets are generated and judged (the first; null = all: their p is the headline's);
    #: with ``score_controls`` every set is also measured by the refusal score (one forward pass per prompt; for a
    #: generated set read from its generation's first step).
    random_sets_generated: int | None = None
    #: every random set also measured by the refusal score: its p against the headline's mean score, and its
    #: calibration against the generated sets (Spearman over sets; the score-based p on the generated subset).
    score_controls: bool = True
    #: matched random feature sets steered on harmless prompts (induction controls).
    induction_random_sets: int = 20
    #: greedy tokens per response in the behaviour checks (null = inference.max_new_tokens).
    max_new_tokens: int | None = None
    #: refused toxic test prompts of the behaviour checks (the first by prompt-id hash; null = all), and as many
    #: validation prompts for the choice of the headline.
    behaviour_prompts: int | None = None
    #: over-refusal's own features? The safe-minus-toxic features (discovery effects) and the toxic circuit's, each
    #: ablated at these K on the refused safe and refused toxic test prompts (stages/circuits/over_refusal.py); empty
    #: = not measured.
    over_refusal_k: tuple[int, ...] = (1, 5, 10, 20, 50)
    #: selectivity (toxic still refused - safe still refused) below this at every K reads "no selective features".
    over_refusal_margin: float = 0.2
    #: faithfulness / completeness of the pooled circuits at these sizes (nodes), on test prompts.
    faithfulness_sizes: tuple[int, ...] = (10, 100, 1000, 5000)
    #: test prompts per pooled group on which faithfulness is measured (the first by prompt-id hash).
    faithfulness_prompts: int = 16
    #: the order in which nodes join the circuit of the faithfulness curve (discovery effects): the most
    #: refusal-promoting first (the signed circuit), or by |effect| (both signs mixed, Sparse Feature Circuits).
    faithfulness_order: Literal["promoting", "magnitude"] = "promoting"
    #: the pooled groups whose faithfulness is measured (labels).
    faithfulness_labels: tuple[Literal["safe", "toxic"], ...] = ("safe", "toxic")
    #: random node sets per faithfulness / completeness point.
    random_controls: int = 20
    #: faithfulness is (m(C) - m(empty)) / (m(model) - m(empty)); below this gap (metric units) between
    #: the model and every node at baseline, the ratio is noise and is reported as null.
    faithfulness_min_gap: float = 0.25
    #: agreement with exact patching: test prompts (refused toxic).
    agreement_prompts: int = 8
    #: agreement: features per stratum (top by |estimate|, random active; plus every error node).
    agreement_nodes: int = 8
    #: agreement: the estimators compared with exact patching.
    agreement_methods: tuple[Literal["atp", "ig"], ...] = ("atp",)
    #: edges between the nodes of the pooled circuits at consecutive spliced hooks (discovery prompts); kept
    #: when |edge| >= ``edge_threshold`` x the largest edge between two features.
    edges: bool = True
    #: see edges.
    edge_threshold: float = 0.05
    #: see edges.
    edge_prompts: int = 8
    #: prompts per attribution pass (TransformerLens, torch_dtype).
    batch_size: int = 8
    #: prompts per intervention pass (generation and faithfulness, model.intervention_dtype).
    intervention_batch_size: int = 32
    #: prompts per greedy-generation batch (conditions share it; see direction.generation_batch_size).
    generation_batch_size: int = 64
    #: seed of every random choice of the stage (samples, random controls, bootstrap).
    seed: int = 0
    #: torch threads for the stage.
    num_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("ig_steps", "top_k", "bootstrap", "batch_size", "intervention_batch_size",
                     "generation_batch_size", "num_threads",
                     "edge_prompts", "agreement_prompts", "agreement_nodes", "faithfulness_prompts", "headline_k",
                     "cosine_preselect"):
            if getattr(self, name) < 1:
                raise ConfigError(f"circuits.{name}={getattr(self, name)}; allowed: a positive integer")
        for name in ("random_controls", "random_sets", "induction_random_sets"):
            if getattr(self, name) < 0:
                raise ConfigError(f"circuits.{name}={getattr(self, name)}; allowed: an integer >= 0")
        if self.random_sets_generated is not None and self.random_sets_generated < 0:
            raise ConfigError(f"circuits.random_sets_generated={self.random_sets_generated}; allowed: an integer >= 0, "
                              "or null (all)")
        for name in ("max_new_tokens", "behaviour_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"circuits.{name}={getattr(self, name)}; allowed: a positive integer or null")
        for name in ("labels", "methods", "interventions", "positions", "behaviour_k", "agreement_methods", "scale_c"):
            if not getattr(self, name):
                raise ConfigError(f"circuits.{name} is empty; give at least one value")
        if not set(self.interventions) & {"zero", "mean"}:
            raise ConfigError(f"circuits.interventions={list(self.interventions)}: the headline circuit is an ablation; "
                              "allowed: a list with zero or mean (and scale, reported as steering)")
        if any(k < 1 for k in self.over_refusal_k):
            raise ConfigError(f"circuits.over_refusal_k={list(self.over_refusal_k)}; allowed: positive integers")
        if not 0 < self.over_refusal_margin <= 1:
            raise ConfigError(f"circuits.over_refusal_margin={self.over_refusal_margin}; allowed: a number in (0, 1]")
        if any(k < 1 for k in self.behaviour_k):
            raise ConfigError(f"circuits.behaviour_k={list(self.behaviour_k)}; allowed: positive integers")
        if self.headline_k not in self.behaviour_k:
            raise ConfigError(f"circuits.headline_k={self.headline_k} must be one of circuits.behaviour_k "
                              f"{list(self.behaviour_k)}")
        if self.headline_method != "auto" and self.headline_method not in self.methods:
            raise ConfigError(f"circuits.headline_method={self.headline_method!r} must be one of circuits.methods "
                              f"{list(self.methods)}")
        if not self.faithfulness_sizes or any(s < 1 for s in self.faithfulness_sizes):
            raise ConfigError(f"circuits.faithfulness_sizes={list(self.faithfulness_sizes)}; allowed: positive integers")
        if self.hooks:
            try:
                check_layer_specs(self.hooks)
            except LayerSpecError as err:
                raise ConfigError(f"circuits.hooks: {err}") from None

