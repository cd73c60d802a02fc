"""The storage estimate of a hook set, printed before collection. Two numbers, both exact for the block hooks
(each ``[batch, pos, width]``):

* ``cache_bytes_per_batch``: what ``run_with_cache`` holds for one batch, every position of every cached hook, in
  the model's compute dtype (it caches whole sequences, whatever is kept later);
* ``disk_bytes_per_1000_prompts``: the activation payload written for 1000 prompts, kept positions only, in the
  storage dtype (dataset metadata and prompt columns come on top, a few percent).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from refusal_lens.core.hooks import layers_of

logger = logging.getLogger(__name__)

#: bytes per element of the dtypes a config may name.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
#: more distinct layers than this gets a warning (the original design's threshold).
MANY_LAYERS = 20


@dataclass(frozen=True)
class StorageEstimate:
    n_hooks: int
    n_layers: int  # distinct block layers touched
    activation_width: int  # sum of hook widths (d_model per block hook)
    batch_size: int
    seq_len: int
    positions_per_prompt: float
    compute_dtype: str
    storage_dtype: str
    cache_bytes_per_batch: int
    disk_bytes_per_1000_prompts: int

    @property
    def many_layers(self) -> bool:
        return self.n_layers > MANY_LAYERS

    def to_dict(self) -> dict:
        return {**asdict(self), "many_layers": self.many_layers}

    def lines(self) -> list[str]:
        out = [
            f"hooks: {self.n_hooks} over {self.n_layers} layers, {self.activation_width} values per position",
            f"cache per batch ({self.batch_size} x {self.seq_len} tokens, {self.compute_dtype}): "
            f"{_human(self.cache_bytes_per_batch)}",
            f"disk per 1000 prompts ({self.positions_per_prompt:g} positions each, {self.storage_dtype}): "
            f"{_human(self.disk_bytes_per_1000_prompts)}",
        ]
        if self.many_layers:
            out.append(
                f"WARNING: {self.n_layers} layers (> {MANY_LAYERS}) make a large cache; "
                "consider a layer range such as residuals_10-21"
            )
        return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def estimate_storage(
    hook_widths: Mapping[str, int],
    *,
    batch_size: int,
    seq_len: int,
    positions_per_prompt: float,
    compute_dtype: str = "float32",
    storage_dtype: str = "float16",
) -> StorageEstimate:
    """Estimate cache memory per batch and disk bytes per 1000 prompts.

    ``hook_widths`` maps each hook name to its values per position (``d_model`` for block hooks).
    ``positions_per_prompt`` is 1 for ``last``, the mean prompt length for ``all``.
    """
    for field, dtype in (("compute_dtype", compute_dtype), ("storage_dtype", storage_dtype)):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{field}={dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    width = int(sum(hook_widths.values()))
    est = StorageEstimate(
        n_hooks=len(hook_widths),
        n_layers=len(layers_of(hook_widths)),
        activation_width=width,
        batch_size=batch_size,
        seq_len=seq_len,
        positions_per_prompt=positions_per_prompt,
        compute_dtype=compute_dtype,
        storage_dtype=storage_dtype,
        cache_bytes_per_batch=batch_size * seq_len * width * DTYPE_BYTES[compute_dtype],
        disk_bytes_per_1000_prompts=int(round(1000 * positions_per_prompt * width * DTYPE_BYTES[storage_dtype])),
    )
    if est.many_layers:
        logger.warning("%d layers requested (> %d): the cache will be large", est.n_layers, MANY_LAYERS)
    return est


def measure_hook_widths(model, hooks: list[str]) -> dict[str, int]:
    """Values per position of each hook (product of the dims after ``[batch, pos]``, so ``hook_z``'s
    ``[head, d_head]`` counts fully), measured with a two-token forward pass of ``model``."""
    import torch

    tokens = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
    return {h: int(cache[h][0, 0].numel()) for h in hooks}


def estimate_for_config(
    hook_widths: Mapping[str, int], inference, compute_dtype: str, mean_prompt_tokens: float | None = None
) -> StorageEstimate:
    """The estimate for a config's inference settings.

    ``seq_len`` is ``inference.max_prompt_tokens`` (an upper bound); the positions kept per prompt are 1
    for ``last`` and ``mean_prompt_tokens`` (default: the upper bound) for ``all``/``post_instruction``,
    plus ``max_new_tokens`` (an upper bound) when response activations are stored.
    """
    positions = 1.0 if inference.positions == "last" else float(mean_prompt_tokens or inference.max_prompt_tokens)
    if inference.store_response_activations:
        positions += inference.max_new_tokens
    batch = inference.batch_size if isinstance(inference.batch_size, int) else 1
    return estimate_storage(
        hook_widths,
        batch_size=batch,
        seq_len=inference.max_prompt_tokens,
        positions_per_prompt=positions,
        compute_dtype=compute_dtype,
        storage_dtype=inference.storage_dtype,
    )


# --------------------------------------------------------------------------------------------
# Memory plan: device memory per stage, from the model config alone
# --------------------------------------------------------------------------------------------
#
