"""The direction stage's section, ``direction:``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refusal_lens.config.typed import ConfigError


@dataclass(frozen=True)
class DirectionConfig:
    """The refusal direction of Arditi et al. 2024: contrast, candidates, selection by cause (docs/direction.md)."""

    #: harmless contrast prompts: null = ``embedded:harmless``, the set of varied task instructions written by the
    #: project (refusal_lens/data/harmless/instructions.csv; ``embedded:harmless-questions``: its how-to questions),
    #: or a CSV/JSONL/parquet file or a datasets folder with a ``prompt`` column (e.g. Alpaca). Collected with
    #: label ``harmless`` (responses, judgements, activations) and split like every prompt.
    harmless: str | None = None
    #: at most this many harmless prompts, drawn with data.seed (null = all).
    harmless_samples: int | None = None
    #: which prompts the model "agrees with" (the contrast keeps only those): ``score`` = the reference's filter
    #: (refusal score > 0 for harmful, < 0 for harmless), ``judged`` = harmful prompts it refused and harmless
    #: ones it did not (by the judge of the responses), ``both`` = both conditions, ``all`` = every toxic and
    #: harmless prompt whatever the model did (no agreement filter: for smoke runs on random weights, which
    #: refuse nothing, and to measure what the filter does).
    keep: Literal["score", "judged", "both", "all"] = "score"
    #: candidates whose selection scores are measured exactly (by intervention) on the validation split, after
    #: the linear screen of every candidate: the best ``exact_per_layer`` positions of each layer below the layer
    #: filter, plus the best ``exact_candidates`` overall (null = every candidate).
    exact_candidates: int | None = 8
    #: see exact_candidates.
    exact_per_layer: int = 1
    #: prompts per side (harmful, harmless) of the validation split used for the selection scores (null = all).
    selection_prompts: int | None = 32
    #: selection filter: KL(clean || ablated) of harmless last-position logits at most this.
    kl_max: float = 0.1
    #: selection filter: induce score (harmless prompts with the vector added) above this; when no candidate
    #: passes, the filter is dropped and the report says so.
    induce_min: float = 0.0
    #: selection filter: layer < this x n_layers (the last layers write the output, not the decision).
    max_layer_fraction: float = 0.8
    #: random directions (ablated) and random vectors of the same norm (added): the control distribution.
    random_directions: int = 20
    #: permutation null of the direction: the difference in means at the selected site of discovery contrast prompts
    #: whose harmful / harmless labels are shuffled (sizes kept), each ablated like the direction: a distribution.
    permuted_directions: int = 20
    #: prompts per side on which each random control is measured (the first by prompt-id hash; null = all); the
    #: direction itself is measured on these too, for its p-value.
    random_prompts: int | None = None
    #: how many of the random and permuted directions are generated and judged (the first of each; null = all:
    #: their p is the table's); with ``score_controls`` every one is also measured by the refusal score.
    random_directions_generated: int | None = None
    #: every random / permuted control also measured by the refusal score (one forward pass per prompt; for a
    #: generated one read from its generation's first step): its p against the direction's mean score, calibrated on
    #: the generated controls (Spearman; p on that subset).
    score_controls: bool = True
    #: per-category directions, their cosines and the cross-ablation matrix.
    per_category: bool = True
    #: the earlier over-refusal experiment on its own: the direction refused safe - refused toxic ablated and
    #: subtracted on every refused safe / toxic test prompt. Off by default: its ablation is a baseline of the
    #: false-refusal experiment (``r_over ablated``, on its table and trade-off figure), which replaces it.
    over_refusal: bool = False
    #: the false-refusal vector of Wang et al. 2025 (docs/direction.md): w = mean(refused safe) - mean(harmless),
    #: orthogonalised to the refusal direction, selected on validation, tested against correct refusal.
    false_refusal: bool = True
    #: its orthogonalisation strengths: w' = w - lambda (w . r_hat) r_hat; the first is the headline (0 = none).
    false_refusal_lambdas: tuple[float, ...] = (1.0, 0.8, 0.6, 0.0)
    #: its selection filter: KL(clean || ablated) on harmless validation prompts at most this (the reference's 0.2).
    false_refusal_kl_max: float = 0.2
    #: the obvious fix when w' costs correct refusal (not the reference's rule): w'(first lambda) also selected with
    #: correct refusal kept on validation: the lowest refused-safe score among candidates whose ablation keeps correct
    #: refusal (``false_refusal_keep_by``) on at least this fraction of the refused toxic validation prompts (null = off).
    false_refusal_keep_toxic: float | None = 0.9
    #: how "keeps" is measured for false_refusal_keep_toxic: ``generation`` = the judged refusal rate of greedy
    #: answers under the candidate's ablation on every refused toxic validation prompt (the quantity reported on test;
    #: candidates generated in order of their safe score until one passes); ``score`` = the refusal score stays > 0
    #: on the refused toxic validation prompts that score > 0 clean (one forward pass a candidate; few prompts pass
    #: that base on this model: 8 in the full configuration, where the rule overfit; docs/direction.md).
    false_refusal_keep_by: Literal["score", "generation"] = "generation"
    #: the baseline ActAdd(-a r) at these strengths a, on the trade-off figure.
    false_refusal_actadd: tuple[float, ...] = (0.25, 0.5, 1.0)
    #: random directions orthogonal to r, and label-permuted differences in means, ablated: its controls (each).
    false_refusal_controls: int = 20
    #: how many of each kind of control are generated and judged (the first; null = all, their p is the table's);
    #: the rest are measured by the refusal score only (below).
    false_refusal_controls_generated: int | None = None
    #: every control also measured by the refusal score (one forward pass per prompt; for a generated one read from
    #: its generation's first step): its p against the headline's score, and its calibration against the generated
    #: controls (Spearman over controls; both p on that subset).
    false_refusal_score_controls: bool = True
    #: emergence by intervention: the direction ablated from layer l on, for every ``emergence_stride``-th layer.
    emergence_stride: int = 1
    #: greedy tokens per response in the evaluations (null = inference.max_new_tokens).
    max_new_tokens: int | None = None
    #: bootstrap resamples (prompts) of every interval of a mean.
    bootstrap: int = 1000
    #: prompts per forward pass.
    batch_size: int = 16
    #: prompts per greedy-generation batch (conditions share it; bench/bench_interventions.py: 64 takes 0.46x the
    #: time of 16 on this CPU).
    generation_batch_size: int = 64
    #: prompts per forward + backward pass of the selection screens (the autograd graph of the float32 model holds
    #: every layer's activations, the main job's memory peak: measured on the main job, the process peaked at
    #: 9.4 GiB with 16, 6.9 with 8 and 5.7 with 4; the selection part alone at 5.69 GiB with 4 and 5.11 with 2,
    #: freed memory given back between parts; each selecting the same candidate; bench/README.md).
    gradient_batch_size: int = 2
    #: seed of every random choice of the stage.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("harmless_samples", "exact_candidates", "selection_prompts", "max_new_tokens", "random_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"direction.{name}={value}; allowed: a positive integer or null")
        for name in ("emergence_stride", "bootstrap", "batch_size", "generation_batch_size",
                     "gradient_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"direction.{name}={getattr(self, name)}; allowed: a positive integer")
        if self.exact_per_layer < 0:
            raise ConfigError(f"direction.exact_per_layer={self.exact_per_layer}; allowed: an integer >= 0")
        if self.random_directions_generated is not None and self.random_directions_generated < 0:
            raise ConfigError(f"direction.random_directions_generated={self.random_directions_generated}; allowed: an "
                              "integer >= 0, or null (all)")
        if self.false_refusal_controls_generated is not None and self.false_refusal_controls_generated < 0:
            raise ConfigError(f"direction.false_refusal_controls_generated={self.false_refusal_controls_generated}; "
                              "allowed: an integer >= 0, or null (all)")
        if self.false_refusal_controls < 0:
            raise ConfigError(f"direction.false_refusal_controls={self.false_refusal_controls}; allowed: an integer >= 0")
        if not self.false_refusal_lambdas or any(not 0 <= x <= 1 for x in self.false_refusal_lambdas):
            raise ConfigError(f"direction.false_refusal_lambdas={list(self.false_refusal_lambdas)}; allowed: a "
                              "non-empty list of numbers in [0, 1]")
        if any(a <= 0 for a in self.false_refusal_actadd):
            raise ConfigError(f"direction.false_refusal_actadd={list(self.false_refusal_actadd)}; allowed: positive "
                              "numbers")
        if self.false_refusal_keep_toxic is not None and not 0 < self.false_refusal_keep_toxic <= 1:
            raise ConfigError(f"direction.false_refusal_keep_toxic={self.false_refusal_keep_toxic}; allowed: a fraction "
                              "in (0, 1], or null (off)")
        if self.false_refusal_kl_max <= 0:
            raise ConfigError(f"direction.false_refusal_kl_max={self.false_refusal_kl_max}; allowed: a positive number")
        if self.permuted_directions < 0:
            raise ConfigError(f"direction.permuted_directions={self.permuted_directions}; allowed: an integer >= 0")
        if self.random_directions < 0:
            raise ConfigError(f"direction.random_directions={self.random_directions}; allowed: an integer >= 0")
        if not 0.0 < self.max_layer_fraction <= 1.0:
            raise ConfigError(f"direction.max_layer_fraction={self.max_layer_fraction}; allowed: a number in (0, 1]")
        if self.kl_max <= 0:
            raise ConfigError(f"direction.kl_max={self.kl_max}; allowed: a positive number")

