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
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
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
    save_activations: bool = True
    #: positions stored: the last prompt token, every prompt token, or the template's post-instruction tokens.
    positions: Literal["last", "all", "post_instruction"] = "last"
    #: dtype on disk (Arrow has no bfloat16: its bits are stored as int16, see docs/outputs.md).
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    #: prompts longer than this many tokens have the end of their user message cut.
    max_prompt_tokens: int = 256
    #: also store the activations of the generated response tokens (SAE training wants many tokens).
    store_response_activations: bool = False
    #: buffered activations are written as a shard once they reach this many MiB (bounds memory).
    shard_mb: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ConfigError(f"inference.batch_size={self.batch_size}; allowed: a positive integer or 'auto'")
        for name in ("max_new_tokens", "max_prompt_tokens", "shard_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inference.{name}={getattr(self, name)}; allowed: a positive integer")


@dataclass(frozen=True)
class DataConfig:
    #: an OR-Bench folder, one CSV/JSONL/parquet file or a datasets folder; unset = the embedded sample set.
    path: str | None = None
    #: categories to keep; empty = all.
    categories: tuple[str, ...] = ()
    max_samples_per_category: int | None = None
    #: ``use_all`` keeps every row; ``balance_labels`` equalises safe and toxic rows per category.
    category_balance_strategy: Literal["use_all", "balance_labels"] = "use_all"
    #: OR-Bench files to read (empty = all three).
    splits: tuple[Literal["or-bench-80k", "or-bench-hard-1k", "or-bench-toxic"], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_samples_per_category is not None and self.max_samples_per_category < 1:
            raise ConfigError(
                f"data.max_samples_per_category={self.max_samples_per_category}; allowed: a positive integer or null"
            )


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
    architecture: Literal["standard", "topk", "batchtopk", "jumprelu"] = "topk"
    #: d_sae = d_in x expansion_factor.
    expansion_factor: int = 4
    #: active features per token (topk) or on average per token (batchtopk).
    k: int = 32
    #: sparsity coefficient of the standard (L1) SAE.
    l1_coefficient: float = 5.0
    #: jumprelu: L0 coefficient, initial threshold and bandwidth of the straight-through estimator.
    l0_coefficient: float = 1.0
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    lr: float = 4e-4
    #: learning rate at the end of the decay; null = lr / 10.
    lr_end: float | None = None
    lr_warm_up_steps: int = 0
    #: steps of linear decay at the end of training (0 = constant).
    lr_decay_steps: int = 0
    train_batch_size_tokens: int = 1024
    #: total activation vectors each SAE sees (several epochs of a small prompt set).
    training_tokens: int = 200_000
    #: SAE-Lens's input normalisation, folded into the weights at the end.
    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    #: equalise safe/toxic (labels) or category x label groups in the batches by resampling.
    balance: Literal["none", "labels", "categories"] = "labels"
    #: leave out the chat template's fixed opening (identical in every prompt, e.g. a default system prompt)
    #: and special tokens (attention sinks with huge norms) from training and evaluation, as SAE-Lens's
    #: ``exclude_special_tokens`` does; otherwise they dominate the variance.
    exclude_template_prefix: bool = True
    exclude_special_tokens: bool = True
    #: share of prompts (by a hash of their id) kept out of training for evaluation.
    heldout_fraction: float = 0.2
    #: training metrics (loss, MSE, L0, explained variance, dead features) logged every N steps.
    log_every: int = 20
    dead_feature_window: int = 1000
    seed: int = 0
    device: str = "cpu"
    #: torch threads for training (on 2 shared cores, 2 threads ran 7x slower than 1).
    num_threads: int = 1
    wandb: bool = False
    wandb_project: str = "refusal_lens"
    #: held-out prompts used for CE loss recovered / KL with the SAE spliced in.
    eval_prompts: int = 24
    #: "selective layers": the bar a hook's SAE must pass for later stages.
    min_explained_variance: float = 0.5
    min_ce_recovered: float = 0.5

    def __post_init__(self) -> None:
        if self.source == "path" and not self.path:
            raise ConfigError("sae.path must name a folder of SAE-Lens SAEs when sae.source is 'path'")
        positive = ("expansion_factor", "k", "train_batch_size_tokens", "training_tokens", "log_every",
                    "num_threads", "eval_prompts", "dead_feature_window")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"sae.{name}={getattr(self, name)}; allowed: a positive integer")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"sae.heldout_fraction={self.heldout_fraction}; allowed: a number between 0 and 1")
        if self.lr <= 0:
            raise ConfigError(f"sae.lr={self.lr}; allowed: a positive number")
        if self.hooks:
            try:
                check_layer_specs(self.hooks)
            except LayerSpecError as err:
                raise ConfigError(f"sae.hooks: {err}") from None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)


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
    "Config",
    "ConfigError",
    "DataConfig",
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
