"""Typed, frozen configs loaded from YAML.

A config file has the sections of :class:`Config` (``model:``, ``inference:``, ``data:``,
``output:`` …); a missing section or key takes its default, an unknown key or a value of the
wrong type is an error naming its dotted path. A file may start from another one with
``base: other.yaml`` (resolved relative to the file; the file's own keys win, section by section).
``--set section.key=value`` overrides are parsed as YAML values and checked like file values.

Configs have no side effects: constructing one seeds nothing and probes no device.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from refusal_lens.errors import UserError
from refusal_lens.hooks import LayerSpecError, check_layer_specs


class ConfigError(UserError, ValueError):
    """A config value that is missing, unknown or of the wrong type; the message names its dotted path."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    #: an embedded model name (see ``refusal-lens models``), a Hugging Face hub name, or a local folder.
    name: str = "qwen2.5-coder-0.5b-instruct"
    #: TransformerLens back end: ``bridge`` (TransformerBridge) or ``hooked`` (HookedTransformer).
    backend: Literal["bridge", "hooked"] = "bridge"
    #: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (cuda when available).
    device: str = "cpu"
    #: dtype the model runs in (float32 on CPU; bfloat16/float16 on GPU): activations, attribution.
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    #: dtype of the copy of the model that runs greedy generation and every intervention pass (responses,
    #: direction selection and evaluation, behaviour checks); ``same`` = torch_dtype. On CPUs with AVX512-BF16
    #: bfloat16 runs ~2.9x faster than float32 (bench/bench_interventions.py).
    intervention_dtype: Literal["same", "float32", "float16", "bfloat16"] = "same"
    #: layer specs, see docs/layer_specs.md.
    activation_layers: tuple[str | int, ...] = ("residuals_all",)

    def __post_init__(self) -> None:
        try:
            check_layer_specs(self.activation_layers)
        except LayerSpecError as err:
            raise ConfigError(f"model.activation_layers: {err}") from None
        head = self.device.split(":")[0]
        if head not in ("cpu", "cuda", "mps", "auto") or (
            ":" in self.device and not (head == "cuda" and self.device.split(":")[1].isdigit())
        ):
            raise ConfigError(f"model.device={self.device!r}; allowed: cpu, cuda, cuda:<index>, mps, auto")


@dataclass(frozen=True)
class InferenceConfig:
    #: prompts per forward pass; ``auto`` finds the largest that fits (halving on out-of-memory).
    batch_size: int | Literal["auto"] = 8
    #: greedy response length used to judge refusal.
    max_new_tokens: int = 20
    #: store activations (false: responses and refusal judgements only).
    save_activations: bool = True
    #: positions stored: the last prompt token, every prompt token, or the template's post-instruction tokens.
    positions: Literal["last", "all", "post_instruction"] = "last"
    #: dtype on disk (Arrow has no bfloat16: its bits are stored as int16, see docs/outputs.md).
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    #: prompts longer than this many tokens have the end of their user message cut.
    max_prompt_tokens: int = 256
    #: also store the activations of the generated response tokens (SAE training wants many tokens).
    store_response_activations: bool = False
    #: the refusal score's token set R: ``learned`` from the discovery responses' first tokens (a token whose
    #: responses are refused in at least ``refusal_token_share`` of ``refusal_token_min_count`` or more cases), or
    #: the model family's words (``family``; also the fallback when nothing qualifies).
    refusal_tokens: Literal["learned", "family"] = "learned"
    #: learned refusal tokens: minimum number of discovery responses starting with the token.
    refusal_token_min_count: int = 2
    #: learned refusal tokens: minimum share of those responses judged refused.
    refusal_token_share: float = 0.8
    #: buffered activations are written as a shard once they reach this many MiB (bounds memory; a
    #: fraction such as 0.01 makes many small shards, e.g. in tests).
    shard_mb: float = 256
    #: how activations are read: ``bridge`` = TransformerLens ``run_with_cache`` (the reference, eager-like
    #: attention); ``hf_hooks`` = PyTorch hooks on the Hugging Face modules of each hook point (same hook
    #: names and values, the model's own sdpa attention, device-to-host copies overlapped with compute on
    #: CUDA); ``auto`` = ``hf_hooks`` on CUDA when every hook has an HF module, else ``bridge``.
    collector: Literal["auto", "bridge", "hf_hooks"] = "auto"
    #: which copy of the model the activations (and the refusal scores) are read from: ``model``
    #: (model.torch_dtype) or ``intervention`` (model.intervention_dtype, through hf_hooks: bfloat16 is ~3x faster
    #: on AVX512-BF16 CPUs; activations are stored in 16 bits anyway).
    activation_model: Literal["model", "intervention"] = "model"

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ConfigError(f"inference.batch_size={self.batch_size}; allowed: a positive integer or 'auto'")
        for name in ("max_new_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inference.{name}={getattr(self, name)}; allowed: a positive integer")
        if not self.shard_mb > 0:
            raise ConfigError(f"inference.shard_mb={self.shard_mb}; allowed: a positive number")


@dataclass(frozen=True)
class DataConfig:
    #: an OR-Bench folder, one CSV/JSONL/parquet file or a datasets folder; unset = the embedded sample set.
    path: str | None = None
    #: categories to keep; empty = all.
    categories: tuple[str, ...] = ()
    #: at most this many prompts per category and label (null = all), drawn with ``seed``.
    max_samples_per_category: int | None = None
    #: ``use_all`` keeps every row; ``balance_labels`` equalises safe and toxic rows per category.
    category_balance_strategy: Literal["use_all", "balance_labels"] = "use_all"
    #: OR-Bench files to read (empty = all three).
    splits: tuple[Literal["or-bench-80k", "or-bench-hard-1k", "or-bench-toxic"], ...] = ()
    #: seed of the per-category sampling.
    seed: int = 0
    #: share of prompts in the discovery split (everything is fitted and ranked there), stratified by label x
    #: category x refused (refusal_lens/splits.py); the three shares sum to 1.
    split_discovery: float = 0.4
    #: share of prompts in the validation split (every choice among candidates is made there).
    split_validation: float = 0.2
    #: share of prompts in the test split (every reported result is measured there).
    split_test: float = 0.4
    #: seed of the split (a hash of the seed and the prompt id; independent of prompt order).
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.max_samples_per_category is not None and self.max_samples_per_category < 1:
            raise ConfigError(
                f"data.max_samples_per_category={self.max_samples_per_category}; allowed: a positive integer or null"
            )
        from refusal_lens.splits import SplitError, check_fractions

        try:
            check_fractions(self.split_fractions)
        except SplitError as err:
            raise ConfigError(str(err)) from None

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        return (self.split_discovery, self.split_validation, self.split_test)


@dataclass(frozen=True)
class OutputConfig:
    #: results go to ``<result_dir>/<run_name>/``.
    result_dir: str = "results"
    #: empty = derived from the model name.
    run_name: str = ""


@dataclass(frozen=True)
class SAEConfig:
    """Stage 2: one SAE per hook, trained with SAE-Lens from the stored activations."""

    #: ``train`` SAEs here, or load already-trained SAE-Lens folders from ``path`` (one per hook).
    source: Literal["train", "path"] = "train"
    #: with ``source: path``: a folder holding ``<hook name>/`` SAE-Lens folders.
    path: str | None = None
    #: layer specs of the hooks to train; empty = every collected hook.
    hooks: tuple[str | int, ...] = ()
    #: SAE-Lens architecture.
    architecture: Literal["standard", "topk", "batchtopk", "jumprelu"] = "topk"
    #: d_sae = d_in x expansion_factor.
    expansion_factor: int = 4
    #: active features per token (topk) or on average per token (batchtopk).
    k: int = 32
    #: sparsity coefficient of the standard (L1) SAE.
    l1_coefficient: float = 5.0
    #: jumprelu: L0 coefficient, initial threshold and bandwidth of the straight-through estimator.
    l0_coefficient: float = 1.0
    #: jumprelu: initial threshold.
    jumprelu_init_threshold: float = 0.01
    #: jumprelu: bandwidth of the straight-through estimator.
    jumprelu_bandwidth: float = 0.05
    #: Adam learning rate.
    lr: float = 4e-4
    #: learning rate at the end of the decay; null = lr / 10.
    lr_end: float | None = None
    #: linear warm-up steps at the start.
    lr_warm_up_steps: int = 0
    #: steps of linear decay at the end of training (0 = constant).
    lr_decay_steps: int = 0
    #: activation vectors per training step.
    train_batch_size_tokens: int = 1024
    #: total activation vectors each SAE sees (several epochs of a small prompt set).
    training_tokens: int = 200_000
    #: SAE-Lens's input normalisation, folded into the weights at the end.
    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    #: equalise safe/toxic (labels) or category x label groups in the batches by resampling.
    balance: Literal["none", "labels", "categories"] = "labels"
    #: leave out the chat template's opening (identical in every prompt, e.g. a default system prompt, and
    #: holding the attention sink whose norm is ~100x the rest) from training and evaluation; the sites are the
    #: prompt's content, its post-instruction tokens and the response tokens.
    exclude_template_prefix: bool = True
    #: also leave out special tokens (the template's post-instruction <|im_end|>/<|im_start|> are then not
    #: sites, and circuits cannot patch them: off by default).
    exclude_special_tokens: bool = False
    #: train even when the training rows (distinct activation vectors of the discovery split's sites) are
    #: fewer than the SAE's features (it would memorise them); off = an error naming the settings that fix it.
    allow_fewer_rows_than_features: bool = False
    #: training metrics (loss, MSE, L0, explained variance, dead features) logged every N steps.
    log_every: int = 20
    #: steps without firing after which a feature counts as dead (TopK's AuxK revives it).
    dead_feature_window: int = 1000
    #: seed of the SAE's initialisation and batch order.
    seed: int = 0
    #: device of SAE training (cpu, cuda, cuda:N).
    device: str = "cpu"
    #: matmul precision of SAE training: ``fp32``; ``tf32`` = fp32 weights and TF32 matmuls (measured 3.7x
    #: fp32 on an H100); ``bf16`` = SAE-Lens's bf16 autocast, TF32 for what stays in fp32 (4.8x); ``auto`` =
    #: tf32 on CUDA, fp32 elsewhere. tf32 and bf16 need a CUDA ``sae.device``.
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    #: torch threads for training (on 2 shared cores, 2 threads ran 7x slower than 1).
    num_threads: int = 1
    #: log training to Weights & Biases (off by default; nothing leaves the machine otherwise).
    wandb: bool = False
    #: Weights & Biases project name.
    wandb_project: str = "refusal_lens"
    #: prompts per split (validation: the bar; test: the reported quality) on which the SAE is spliced in for
    #: the CE loss and KL.
    eval_prompts: int = 24
    #: "selective layers": the bar a hook's SAE must pass for later stages, on the validation split.
    min_explained_variance: float = 0.5
    #: the bar's minimum CE loss recovered against mean ablation (with min_explained_variance).
    min_ce_recovered: float = 0.5

    def __post_init__(self) -> None:
        if self.source == "path" and not self.path:
            raise ConfigError("sae.path must name a folder of SAE-Lens SAEs when sae.source is 'path'")
        positive = ("expansion_factor", "k", "train_batch_size_tokens", "training_tokens", "log_every",
                    "num_threads", "eval_prompts", "dead_feature_window")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"sae.{name}={getattr(self, name)}; allowed: a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"sae.lr={self.lr}; allowed: a positive number")
        if self.precision in ("tf32", "bf16") and not self.device.startswith("cuda"):
            raise ConfigError(f"sae.precision={self.precision!r} needs a CUDA sae.device (sae.device={self.device!r}); "
                              "allowed here: 'auto' or 'fp32'")
        if self.hooks:
            try:
                check_layer_specs(self.hooks)
            except LayerSpecError as err:
                raise ConfigError(f"sae.hooks: {err}") from None


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
    #: prompts per side on which each random control is measured (the first by prompt-id hash; null = all); the
    #: direction itself is measured on these too, for its p-value.
    random_prompts: int | None = None
    #: per-category directions, their cosines and the cross-ablation matrix.
    per_category: bool = True
    #: the over-refusal direction (refused safe - refused toxic) and its ablation / subtraction.
    over_refusal: bool = True
    #: emergence by intervention: the direction ablated from layer l on, for every ``emergence_stride``-th layer.
    emergence_stride: int = 1
    #: greedy tokens per response in the evaluations (null = inference.max_new_tokens).
    max_new_tokens: int | None = None
    #: bootstrap resamples (prompts) of every interval of a mean.
    bootstrap: int = 1000
    #: prompts per forward pass.
    batch_size: int = 16
    #: seed of every random choice of the stage.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("harmless_samples", "exact_candidates", "selection_prompts", "max_new_tokens", "random_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"direction.{name}={value}; allowed: a positive integer or null")
        for name in ("emergence_stride", "bootstrap", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"direction.{name}={getattr(self, name)}; allowed: a positive integer")
        if self.exact_per_layer < 0:
            raise ConfigError(f"direction.exact_per_layer={self.exact_per_layer}; allowed: an integer >= 0")
        if self.random_directions < 0:
            raise ConfigError(f"direction.random_directions={self.random_directions}; allowed: an integer >= 0")
        if not 0.0 < self.max_layer_fraction <= 1.0:
            raise ConfigError(f"direction.max_layer_fraction={self.max_layer_fraction}; allowed: a number in (0, 1]")
        if self.kl_max <= 0:
            raise ConfigError(f"direction.kl_max={self.kl_max}; allowed: a positive number")


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
    #: the headline circuit's selection method; ``auto`` = chosen on the validation split with the intervention
    #: (the method x intervention x positions whose K = headline_k circuit leaves the fewest validation refusals
    #: among those answered coherently in >= 80%).
    headline_method: Literal["auto", "attribution", "cosine", "combined"] = "auto"
    #: feature interventions of the behaviour checks: zero, mean (class mean of the reference), scale
    #: (f <- -c f, one candidate per c of scale_c). The one chosen on validation runs the K-curve on test; the
    #: others run at the headline K.
    interventions: tuple[Literal["zero", "mean", "scale"], ...] = ("zero", "scale")
    #: where the interventions apply: every position (the template's opening and generated tokens included), or
    #: every position after the opening (generated tokens included); chosen on validation like the intervention.
    positions: tuple[Literal["all", "after_opening"], ...] = ("all",)
    #: the scale intervention's candidates c: f <- -c f (Yeo et al.: c = 3 on Gemma, 1 on Llama).
    scale_c: tuple[float, ...] = (1.0, 3.0)
    #: matched random feature sets (same count per hook) against the headline circuit: the control distribution.
    random_sets: int = 20
    #: matched random feature sets steered on harmless prompts (induction controls).
    induction_random_sets: int = 20
    #: greedy tokens per response in the behaviour checks (null = inference.max_new_tokens).
    max_new_tokens: int | None = None
    #: refused toxic test prompts of the behaviour checks (the first by prompt-id hash; null = all), and as many
    #: validation prompts for the choice of the headline.
    behaviour_prompts: int | None = None
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
    #: seed of every random choice of the stage (samples, random controls, bootstrap).
    seed: int = 0
    #: torch threads for the stage.
    num_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("ig_steps", "top_k", "bootstrap", "batch_size", "intervention_batch_size", "num_threads",
                     "edge_prompts", "agreement_prompts", "agreement_nodes", "faithfulness_prompts", "headline_k",
                     "cosine_preselect"):
            if getattr(self, name) < 1:
                raise ConfigError(f"circuits.{name}={getattr(self, name)}; allowed: a positive integer")
        for name in ("random_controls", "random_sets", "induction_random_sets"):
            if getattr(self, name) < 0:
                raise ConfigError(f"circuits.{name}={getattr(self, name)}; allowed: an integer >= 0")
        for name in ("max_new_tokens", "behaviour_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"circuits.{name}={getattr(self, name)}; allowed: a positive integer or null")
        for name in ("labels", "methods", "interventions", "positions", "behaviour_k", "agreement_methods", "scale_c"):
            if not getattr(self, name):
                raise ConfigError(f"circuits.{name} is empty; give at least one value")
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


@dataclass(frozen=True)
class AnalysisConfig:
    """Stage 5, analyze: the evidence on test prompts, layer by layer and across categories, and the report."""

    #: one mechanism or many: permutation draws per similarity test (refusal_lens/analysis/stats.py).
    permutations: int = 1000
    #: draws of the normalised similarity's interval.
    interval_draws: int = 4000
    #: significance level of the tests (and false-discovery rate of Benjamini-Hochberg across a table).
    alpha: float = 0.05
    #: the power floor: a comparison whose groups have fewer test prompts than this is "insufficient" (no verdict).
    min_prompts: int = 10
    #: equivalence margin of "shared": the lower confidence bound of the normalised similarity (circuits) or of
    #: the transfer (cross-ablation) must reach it.
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


# --------------------------------------------------------------------------------------------
# Typed conversion
# --------------------------------------------------------------------------------------------


def _type_label(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_label(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of ({_type_label(get_args(tp)[0])})"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (Union, types.UnionType):
        arms = get_args(tp)
        if value is None:
            if type(None) in arms:
                return None
            raise ConfigError(f"{path} is null; expected {_type_label(tp)}")
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}={value!r}; expected {_type_label(tp)}")
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}; allowed: {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin is tuple:
        item_tp = get_args(tp)[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}={value!r}; expected {_type_label(tp)}")
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}={value!r}; expected a mapping")
        return {_convert(k, key_tp, path): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}; expected a string")
        return value
    raise TypeError(f"config type {tp!r} at {path} is not supported")  # a bug in a section definition


def _build(cls: type, raw: Any, path: str) -> Any:
    label = path or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label} must be a mapping of keys to values, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown key {where!r}; allowed keys of {label}: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in raw.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------


def _merge(base: Mapping, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a config file, its ``base:`` chain merged in."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"config file {str(path)!r} is its own base (cycle: {' -> '.join(map(str, _seen))})")
    with path.open(encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"base={base!r} in {str(path)!r}; expected a path to another config file")
        raw = _merge(read_config_dict(path.parent / base, (*_seen, resolved)), raw)
    return raw


def apply_overrides(raw: Mapping, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    out = _merge({}, raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[leaf] = value
    return out


def config_from_dict(raw: Mapping) -> Config:
    return _build(Config, raw, "")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = read_config_dict(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def config_to_dict(cfg: Any) -> dict:
    """A plain mapping (lists, not tuples) that :func:`config_from_dict` turns back into ``cfg``."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


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
