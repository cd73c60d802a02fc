"""The Python API: what a researcher in a notebook needs without reading the stage code (docs/python_api.md).

* :func:`load_model` — a TransformerLens model (``HookedTransformer`` or ``TransformerBridge``) with the hook names
  of layer specs (``"residuals_10-21"``, ``"mlp_all"``, ...): the embedded models, hub names or local folders;
* :func:`open_run` — a run's folder (:class:`~refusal_lens.run.folder.RunFolder`): its direction, SAEs (SAE-Lens
  objects), circuits, behaviour, evidence;
* :func:`ablate_direction` and :func:`ablate_features` — context managers that apply the project's two ablations
  to a TransformerLens model with its own hooks;
* :func:`run_stage` / :func:`run_pipeline` — any stage, or the whole job, from a :class:`~refusal_lens.config.Config`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from refusal_lens.config import Config, ModelConfig
from refusal_lens.core.hooks import ablation_hooks, resolve_hooks
from refusal_lens.run.folder import RunFolder
from refusal_lens.run.stage import LazyModel, StageContext, StageResult


@dataclass
class ModelAndHooks:
    """What :func:`load_model` gives: the TransformerLens ``model``, the resolved ``hooks`` and everything the
    project loaded with them (``loaded``: tokenizer, the untouched HF model, the family). Unpacks as
    ``model, hooks``."""

    model: Any
    hooks: list[str]
    loaded: Any

    def __iter__(self) -> Iterator:
        return iter((self.model, self.hooks))


def load_model(name: str, hooks: Sequence[str | int] = ("residuals_all",), *, backend: str = "hooked",
               device: str = "cpu", dtype: str = "float32") -> ModelAndHooks:
    """The model ``name`` (an embedded model, a hub name or a local Hugging Face folder) as a TransformerLens model
    (``backend``: ``hooked`` = HookedTransformer, ``bridge`` = TransformerBridge) and the hook names of the layer
    specs ``hooks``; a bad spec fails before any weight is read."""
    from refusal_lens.models.loading import load_model as load

    loaded = load(ModelConfig(name=name, backend=backend, device=device, torch_dtype=dtype,
                              activation_layers=tuple(hooks)))
    return ModelAndHooks(loaded.model, resolve_hooks(loaded.model, list(hooks)), loaded)


def open_run(where: str | Path | Config) -> RunFolder:
    """A run's folder: a path (``results/<run>``) or the run a config writes."""
    return RunFolder.of(where) if isinstance(where, Config) else RunFolder(where)


def _n_layers(model) -> int:
    return int(model.cfg.n_layers)


@contextmanager
def ablate_direction(model, direction: Tensor) -> Iterator[Any]:
    """Directional ablation on a TransformerLens model: ``x <- x - (x . r_hat) r_hat`` at every residual write (each
    block's input, attention output and MLP output), every position, generated tokens included (Arditi et al.
    2024). ``direction`` is ``r`` (normalised here), e.g. ``open_run(path).direction().vector``."""
    unit = (direction / direction.norm()).float()

    def fn(x: Tensor, hook) -> Tensor:  # noqa: ARG001
        v = unit.to(x.device)
        xf = x.float()
        return (xf - (xf @ v)[..., None] * v).to(x.dtype)

    with model.hooks(fwd_hooks=[(name, fn) for name in ablation_hooks(_n_layers(model))]):
        yield model


#: the feature interventions of :func:`ablate_features`
FEATURE_MODES = ("zero", "mean", "scale")


@contextmanager
def ablate_features(model, saes: Mapping[str, Any], features: Mapping[str, Sequence[int]] | Sequence[str],
                    mode: str = "zero", *, c: float = 1.0, means: Mapping[str, Tensor] | None = None) -> Iterator[Any]:
    """SAE features changed on a TransformerLens model, the SAE's error term kept: at each hook of ``features``
    (``{hook: [feature, ...]}``, or node ids ``"<hook>/<feature>"`` as in the circuit files) the hook's SAE
    (``saes[hook]``, SAE-Lens) encodes the activation, the listed features, where active, become ``0`` (``zero``:
    ablation), ``means[hook][feature]`` (``mean``: ablation to a mean) or ``-c f`` (``scale``: steering, not
    ablation), and ``decode(f') - decode(f)`` is added; every position."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(FEATURE_MODES)}")
    if mode == "mean" and means is None:
        raise ValueError("mode='mean' needs means={hook: tensor of the features' means}")
    by_hook: dict[str, list[int]] = {}
    if isinstance(features, Mapping):
        by_hook = {h: [int(j) for j in js] for h, js in features.items()}
    else:
        for node in features:
            hook, _, j = str(node).rpartition("/")
            by_hook.setdefault(hook, []).append(int(j))
    missing = sorted(set(by_hook) - set(saes))
    if missing:
        raise ValueError(f"no SAE for hook(s) {missing}; SAEs given for {sorted(saes)}")

    def make(name: str):
        sae = saes[name]
        mask = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
        mask[by_hook[name]] = True

        def fn(x: Tensor, hook) -> Tensor:  # noqa: ARG001  (TransformerLens passes the hook point by name)
            xf = x.float()
            f = sae.encode(xf.to(sae.dtype)).float()
            sel = mask.to(x.device) & (f > 0)
            if mode == "zero":
                new = torch.where(sel, torch.zeros_like(f), f)
            elif mode == "scale":
                new = torch.where(sel, -c * f, f)
            else:
                new = torch.where(sel, means[name].to(f.device, f.dtype).expand_as(f), f)
            delta = sae.decode(new.to(sae.dtype)).float() - sae.decode(f.to(sae.dtype)).float()
            return (xf + delta).to(x.dtype)

        return fn

    with model.hooks(fwd_hooks=[(hook, make(hook)) for hook in by_hook]):
        yield model


def run_stage(name: str, cfg: Config, *, model=None, force: bool = False, show_progress: bool = True,
              prompts=None) -> StageResult:
    """One stage (``collect``, ``direction``, ``train-saes``, ``discover``, ``analyze``) on the run folder of ``cfg``,
    in this process (no lock, no status file: :func:`run_pipeline` takes them). ``model``: an already loaded model (a
    :class:`ModelAndHooks` or the project's ``LoadedModel``) for the stage to use; ``prompts``: collect these
    :class:`~refusal_lens.data.prompts.Prompt` s instead of the configured sets."""
    from refusal_lens.infra.distributed import Dist
    from refusal_lens.pipeline import STAGES, with_concrete_dtypes
    from refusal_lens.pipeline import run_stage as run_one

    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    stage = None
    if prompts is not None:
        if name != "collect":
            raise ValueError(f"prompts= is for the collect stage, not {name!r}")
        from refusal_lens.stages.collect.stage import CollectStage

        stage = CollectStage(prompts)
    loaded = model.loaded if isinstance(model, ModelAndHooks) else model
    dist = Dist()
    cfg = with_concrete_dtypes(cfg, dist, loaded)
    ctx = StageContext(cfg, RunFolder.of(cfg), dist, LazyModel(cfg, dist, loaded), force=force,
                       show_progress=show_progress)
    return run_one(name, ctx, stage)


def run_pipeline(cfg: Config, stages: Sequence[str] | None = None, *, force: bool = False,
                 show_progress: bool = True) -> dict[str, StageResult]:
    """The main job (or ``stages`` of it, in order) as ``refusal-lens run`` does it: the run folder's lock, the live
    ``status.json``, one model for every stage."""
    from refusal_lens.pipeline import STAGES, run_stages

    return run_stages(cfg, list(stages) if stages is not None else list(STAGES), force=force,
                      show_progress=show_progress)


def with_output(cfg: Config, result_dir: str | Path, run_name: str = "") -> Config:
    """``cfg`` writing to ``<result_dir>/<run_name>`` (a notebook's own results folder)."""
    return replace(cfg, output=replace(cfg.output, result_dir=str(result_dir), run_name=run_name))


__all__ = ["FEATURE_MODES", "ModelAndHooks", "ablate_direction", "ablate_features", "load_model", "open_run", "run_pipeline",
           "run_stage", "with_output"]
