"""The train-saes stage's section, ``sae:``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refusal_lens.config.typed import ConfigError
from refusal_lens.core.hooks import LayerSpecError, check_layer_specs


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

