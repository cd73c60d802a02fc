"""The collect stage's sections: ``inference:`` (responses and activations) and ``data:`` (prompts, split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refusal_lens.config.typed import ConfigError
from refusal_lens.core.splits import SplitError, check_fractions


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
    #: category x refused (refusal_lens/core/splits.py); the three shares sum to 1.
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
        try:
            check_fractions(self.split_fractions)
        except SplitError as err:
            raise ConfigError(str(err)) from None

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        return (self.split_discovery, self.split_validation, self.split_test)

