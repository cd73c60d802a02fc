"""refusal_lens: where and how does a chat model decide to refuse?

The Python API (docs/python_api.md), imported on first use so that ``import refusal_lens`` and the CLI stay light:

* ``load_model(name, hooks=["residuals_10-21"])`` -> a TransformerLens model and its hook names;
* ``open_run(path_or_config)`` -> a :class:`~refusal_lens.run.folder.RunFolder` (direction, SAEs, circuits, ...);
* ``ablate_direction(model, r)``, ``ablate_features(model, saes, features, mode)`` -> context managers;
* ``run_stage(name, cfg)``, ``run_pipeline(cfg)`` -> any stage, or the whole job, from a :class:`Config`;
* ``Config``, ``load_config``, ``resolve_hooks``, ``RunFolder``, ``STAGES``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "refusal_lens.api", "open_run": "refusal_lens.api", "ablate_direction": "refusal_lens.api",
    "ablate_features": "refusal_lens.api", "run_stage": "refusal_lens.api", "run_pipeline": "refusal_lens.api",
    "with_output": "refusal_lens.api", "ModelAndHooks": "refusal_lens.api",
    "Config": "refusal_lens.config", "load_config": "refusal_lens.config",
    "resolve_hooks": "refusal_lens.core.hooks", "resolve_layer_specs": "refusal_lens.core.hooks",
    "RunFolder": "refusal_lens.run.folder", "STAGES": "refusal_lens.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refusal_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
