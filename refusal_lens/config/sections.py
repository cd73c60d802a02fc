"""The sections every stage shares: which model (``model:``) and where results go (``output:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refusal_lens.config.typed import ConfigError
from refusal_lens.core.hooks import LayerSpecError, check_layer_specs


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
    #: direction selection and evaluation, behaviour checks); ``same`` = torch_dtype; ``auto`` = bfloat16 where a
    #: matrix product measured on this machine (once, then kept in the cache folder) runs >= 1.25x faster in it,
    #: else torch_dtype (models/intervention_dtype.py). One batched forward of the embedded Qwen ran 2.0-2.5x faster
    #: in bfloat16 on an AMD EPYC and 0.64-0.71x as fast on an Intel Xeon with AVX512-BF16 but no AMX (bench/README.md).
    intervention_dtype: Literal["same", "auto", "float32", "float16", "bfloat16"] = "same"
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
class OutputConfig:
    #: results go to ``<result_dir>/<run_name>/``.
    result_dir: str = "results"
    #: empty = derived from the model name.
    run_name: str = ""

