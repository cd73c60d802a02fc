"""Copies of a model's module tree: one sharing its weights (the bridge's), one in another dtype (generation and
interventions: ``model.intervention_dtype``), in memory or mapped from a file the copy was saved to once.

The file-backed copy is for the parts of a run that do not read it. A copy in memory stays resident from the
load to the end of the process; one whose tensors are views of a mapped safetensors file leaves the resident set
when :func:`refusal_lens.infra.mapped_weights.unmap_file_weights` drops it between parts, and comes back (from the
kernel's page cache) as a part reads it. On the embedded Qwen the bfloat16 copy is 1.26 GB, held through every part
that runs only the float32 model (activations, attribution, the SAE stage). It is written next to the weights it is
converted from (the embedded models' cache folder, which refusal_lens owns) with the size and time of that file,
and rebuilt when they differ. The same bits either way (tests/models/test_models.py).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from refusal_lens.infra import durable

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the module tree by its first name (a tensor shared under several names once)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def tree_copy(module: torch.nn.Module, tensor_for: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """A deep copy of the module tree in which every parameter and buffer ``t`` (named ``name``: see
    :func:`named_tensors`) is ``tensor_for(name, t)``."""
    memo: dict[int, Any] = {id(t): tensor_for(name, t) for name, t in named_tensors(module).items()}
    return copy.deepcopy(module, memo)


def shared_weight_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the module tree whose parameters and buffers are the original tensors."""
    return tree_copy(module, lambda name, t: t)


def _as_before(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else out


def converted(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when it is floating (a copy either way)."""
    return t.detach().to(dtype) if t.is_floating_point() else t.detach().clone()


def converted_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``copy.deepcopy(module).to(dtype)`` built tensor by tensor: every floating parameter and buffer converted
    on its own, so that no full-precision copy of the whole model exists in between (a deep copy first would
    hold a second float32 model at once: measured, the load's memory peak)."""
    return tree_copy(module, lambda name, t: _as_before(t, converted(t, dtype)))


def _stamp(weights: Path, dtype: torch.dtype) -> dict[str, str]:
    st = weights.stat()
    return {"dtype": str(dtype), "from_size": str(st.st_size), "from_mtime_ns": str(st.st_mtime_ns)}


def copy_path(folder: Path, dtype: torch.dtype) -> Path:
    return folder / f"model.{str(dtype).removeprefix('torch.')}.safetensors"


def file_backed_copy(module: torch.nn.Module, dtype: torch.dtype, folder: Path) -> torch.nn.Module:
    """:func:`converted_copy`, its tensors views of ``folder/model.<dtype>.safetensors`` (written atomically on
    first use, from ``module``; rewritten when ``folder/model.safetensors`` has changed since). Where the file
    cannot be written (a full or read-only folder) the copy stays in memory, with a warning."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path, kind = copy_path(folder, dtype), str(dtype).removeprefix("torch.")
    stamp = _stamp(folder / WEIGHTS, dtype)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if f.metadata() != stamp:
                logger.info("%s was written from other weights: writing it again", path)
                path.unlink()
    if not path.is_file():
        tensors = {name: converted(t, dtype).contiguous() for name, t in named_tensors(module).items()}
        logger.info("writing the %s copy of the model to %s (once)", kind, path)
        try:
            durable.save_safetensors(tensors, path, metadata=stamp)
        except OSError as err:  # a full or read-only cache: the copy stays in memory (StorageError is one)
            logger.warning("could not write %s (%s): the %s copy of the model stays in memory", path, err, kind)
            return tree_copy(module, lambda name, t: _as_before(t, tensors[name]))
        del tensors
    mapped = load_file(str(path))  # views of the file, mapped (nothing is read until a tensor is)
    names = named_tensors(module).keys()
    if not names <= mapped.keys():
        raise ValueError(f"{path} lacks tensors of the model: {sorted(names - mapped.keys())[:5]}; delete it")
    return tree_copy(module, lambda name, t: _as_before(t, mapped[name]))
