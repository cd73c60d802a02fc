"""Layer specs -> TransformerLens hook names.

This is the one module that builds hook names. Everything downstream (dataset
columns, SAE folders, circuit node ids) identifies a site by the hook name this
module returns.

Grammar of one spec (see docs/layer_specs.md):

==========================  ============================================
spec                        hooks
==========================  ============================================
``"all"``                   every ``blocks.{i}.hook_resid_post``
``"<type>_all"``            every layer of that type
``"<type>_<i>-<j>"``        layers i..j inclusive
``"<type>_<i>"``            one layer
``<int>`` (old lists)       ``blocks.{i}.hook_resid_post``
raw hook name               itself, checked against the model's hooks
==========================  ============================================

``<type>`` is one of :data:`HOOK_TYPES` (``residuals``, ``mlp``, ``attention``,
``resid_pre``, ``resid_mid``; ``resid_post`` is accepted as a synonym of
``residuals``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from refusal_lens.errors import UserError

#: spec type -> the TransformerLens hook point inside ``blocks.{i}``.
HOOK_TYPES: dict[str, str] = {
    "residuals": "hook_resid_post",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "mlp": "hook_mlp_out",
    "attention": "hook_attn_out",
}
#: accepted synonyms of a spec type.
TYPE_ALIASES: dict[str, str] = {"resid_post": "residuals"}

_SPEC_RE = re.compile(r"^(?P<type>[a-z_]+?)_(?P<sel>all|\d+|\d+-\d+)$")
_HOOK_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<point>hook_[a-z_]+)$")
_ALLOWED = (
    '"all", "<type>_all", "<type>_<i>", "<type>_<i>-<j>" (inclusive), an integer layer, '
    "or a raw TransformerLens hook name such as blocks.3.hook_resid_post; "
    f"types: {', '.join(sorted([*HOOK_TYPES, *TYPE_ALIASES]))}"
)


class LayerSpecError(UserError, ValueError):
    """A layer spec that cannot be resolved. The message names the spec and what is allowed."""


class HookedModelLike(Protocol):
    """Anything with a TransformerLens config and a hook dictionary (HookedTransformer, TransformerBridge)."""

    cfg: object
    hook_dict: dict


def hook_name(hook_type: str, layer: int) -> str:
    """The TransformerLens hook name of ``hook_type`` (a key of :data:`HOOK_TYPES`) at ``layer``."""
    hook_type = TYPE_ALIASES.get(hook_type, hook_type)
    if hook_type not in HOOK_TYPES:
        raise LayerSpecError(
            f"unknown hook type {hook_type!r}; allowed: {', '.join(sorted(HOOK_TYPES))}"
        )
    return f"blocks.{layer}.{HOOK_TYPES[hook_type]}"


@dataclass(frozen=True)
class HookSite:
    """A parsed block hook name: ``blocks.{layer}.{point}``."""

    layer: int
    point: str  # e.g. "hook_resid_post"

    @property
    def hook_type(self) -> str | None:
        """The spec type of this hook point, or None for a hook with no spec type (raw hook)."""
        for spec_type, point in HOOK_TYPES.items():
            if point == self.point:
                return spec_type
        return None


def parse_hook_name(name: str) -> HookSite | None:
    """Split ``blocks.{i}.hook_x`` into layer and point; None for names outside a block's top level."""
    match = _HOOK_RE.match(name)
    if match is None:
        return None
    return HookSite(layer=int(match["layer"]), point=match["point"])


def hook_sort_key(name: str) -> tuple[int, int, str]:
    """Order hooks by depth in the forward pass: layer, then position inside the block."""
    site = parse_hook_name(name)
    if site is None:
        return (-1 if name.startswith("hook_") else 10**9, 0, name)
    order = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"]
    rank = order.index(site.point) if site.point in order else len(order)
    return (site.layer, rank, name)


def _check_layer(spec: str, layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise LayerSpecError(
            f"layer spec {spec!r}: layer {layer} is out of range; the model has {n_layers} layers "
            f"(valid layers 0-{n_layers - 1})"
        )


@dataclass(frozen=True)
class ParsedSpec:
    """One spec, parsed but not yet expanded: a layer range of a type, or a raw hook name."""

    text: str
    hook_type: str | None = None  # key of HOOK_TYPES; None for a raw hook name
    start: int | None = None  # None = from layer 0
    end: int | None = None  # None = to the last layer
    raw: str | None = None


def parse_layer_spec(spec: object) -> ParsedSpec:
    """Parse one spec without knowing the model; raises :class:`LayerSpecError` on bad syntax."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise LayerSpecError(
            f"layer spec {spec!r} has type {type(spec).__name__}; expected a string or an integer. "
            f"Allowed: {_ALLOWED}"
        )
    if isinstance(spec, int):
        if spec < 0:
            raise LayerSpecError(f"layer spec {spec!r}: layers are numbered from 0. Allowed: {_ALLOWED}")
        return ParsedSpec(str(spec), "residuals", spec, spec)
    if spec.strip() != spec or not spec:
        raise LayerSpecError(f"layer spec {spec!r} is malformed (empty or surrounding spaces). Allowed: {_ALLOWED}")
    if spec == "all":
        return ParsedSpec(spec, "residuals")
    if spec.isdigit():
        return ParsedSpec(spec, "residuals", int(spec), int(spec))
    if "." in spec or spec.startswith("hook_"):
        return ParsedSpec(spec, raw=spec)
    match = _SPEC_RE.match(spec)
    if match is None:
        raise LayerSpecError(f"layer spec {spec!r} is malformed. Allowed: {_ALLOWED}")
    hook_type = TYPE_ALIASES.get(match["type"], match["type"])
    if hook_type not in HOOK_TYPES:
        raise LayerSpecError(
            f"layer spec {spec!r} has unknown type {match['type']!r}; "
            f"allowed types: {', '.join(sorted([*HOOK_TYPES, *TYPE_ALIASES]))}"
        )
    sel = match["sel"]
    if sel == "all":
        return ParsedSpec(spec, hook_type)
    if "-" in sel:
        start, end = (int(x) for x in sel.split("-"))
        if start > end:
            raise LayerSpecError(
                f"layer spec {spec!r} is a reversed range ({start} > {end}); write {match['type']}_{end}-{start}"
            )
        return ParsedSpec(spec, hook_type, start, end)
    return ParsedSpec(spec, hook_type, int(sel), int(sel))


def _expand(parsed: ParsedSpec, n_layers: int, valid_hooks: set[str] | None) -> list[str]:
    if parsed.raw is not None:
        return [_resolve_raw(parsed.raw, n_layers, valid_hooks)]
    assert parsed.hook_type is not None
    start = 0 if parsed.start is None else parsed.start
    end = n_layers - 1 if parsed.end is None else parsed.end
    for layer in {start, end}:
        _check_layer(parsed.text, layer, n_layers)
    return [hook_name(parsed.hook_type, i) for i in range(start, end + 1)]


def _resolve_raw(name: str, n_layers: int, valid_hooks: Iterable[str] | None) -> str:
    site = parse_hook_name(name)
    if site is not None:
        _check_layer(name, site.layer, n_layers)
    if valid_hooks is None:
        if site is None or site.hook_type is None:
            raise LayerSpecError(
                f"raw hook name {name!r} can only be checked against a loaded model's hooks; "
                "without a model only blocks.<i>.{" + ",".join(HOOK_TYPES.values()) + "} are known"
            )
        return name
    valid = set(valid_hooks)
    if name not in valid:
        close = sorted(h for h in valid if h.split(".")[-1] == name.split(".")[-1])[:5]
        hint = f"; hooks with the same point: {', '.join(close)}" if close else ""
        raise LayerSpecError(f"raw hook name {name!r} is not a hook of this model{hint}")
    return name


def resolve_layer_specs(
    specs: str | int | Sequence[str | int],
    n_layers: int,
    valid_hooks: Iterable[str] | None = None,
) -> list[str]:
    """Resolve layer specs into hook names: ordered, de-duplicated, first-seen order kept.

    ``n_layers`` comes from the loaded model (``model.cfg.n_layers``). ``valid_hooks`` (the model's
    hook names) is needed to accept raw hook names other than the block hooks this module builds.
    Raises :class:`LayerSpecError` before any model work on a bad spec.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise LayerSpecError(f"n_layers must be a positive integer, got {n_layers!r}")
    if isinstance(specs, (str, int)):
        specs = [specs]
    valid = None if valid_hooks is None else set(valid_hooks)
    out: dict[str, None] = {}
    for parsed in check_layer_specs(specs):
        for name in _expand(parsed, n_layers, valid):
            out.setdefault(name, None)
    return list(out)


def check_layer_specs(specs: Sequence[object], n_layers: int | None = None) -> list[ParsedSpec]:
    """Check a list of specs without a loaded model.

    Syntax always; layer ranges too when ``n_layers`` is given (e.g. from the HF config, before any
    weights are loaded). Raw hook names other than block hooks need the model's hooks and are checked
    by :func:`resolve_hooks`.
    """
    if isinstance(specs, (str, int)) or not isinstance(specs, Sequence):
        raise LayerSpecError(f"layer specs must be a list, got {specs!r}. Allowed items: {_ALLOWED}")
    if len(specs) == 0:
        raise LayerSpecError(f"the list of layer specs is empty; give at least one. Allowed: {_ALLOWED}")
    parsed = [parse_layer_spec(spec) for spec in specs]
    if n_layers is not None:
        for p in parsed:
            site = parse_hook_name(p.raw) if p.raw is not None else None
            layers = [site.layer] if site is not None else [x for x in (p.start, p.end) if x is not None]
            for layer in layers:
                _check_layer(p.text, layer, n_layers)
    return parsed


def resolve_hooks(model: HookedModelLike, specs: str | int | Sequence[str | int]) -> list[str]:
    """The hook names of ``specs`` on ``model``, ready for ``run_with_cache(names_filter=...)``.

    Works on a HookedTransformer and a TransformerBridge alike: the layer count comes from
    ``model.cfg.n_layers`` and raw hook names are checked against ``model.hook_dict``.
    """
    names = resolve_layer_specs(specs, int(model.cfg.n_layers), valid_hooks=model.hook_dict.keys())
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise LayerSpecError(f"the model has no hook(s) {missing}; this back end does not expose them")
    return names


def layers_of(hook_names: Iterable[str]) -> list[int]:
    """Distinct block indices touched by ``hook_names``, sorted."""
    return sorted({s.layer for s in map(parse_hook_name, hook_names) if s is not None})


#: hook points after the last attention layer, per position: the metric's logits are cut to the last
#: position there (first one the model has wins: the bridge's hook_out, HookedTransformer's hook_normalized;
#: editing the bridge's hook_normalized leaves HF's native norm path).
FINAL_NORM_HOOKS = ("ln_final.hook_out", "ln_final.hook_normalized")


def final_norm_hook(model: HookedModelLike) -> str:
    """The final norm's output hook (per-position work only follows it: the unembedding)."""
    for name in FINAL_NORM_HOOKS:
        if name in model.hook_dict:
            return name
    raise LayerSpecError(f"the model has none of the final-norm hooks {list(FINAL_NORM_HOOKS)}")


def ablation_hooks(n_layers: int) -> list[str]:
    """Every hook that writes into the residual stream, plus the embedding's: ``resid_pre`` of each
    block, and each block's ``attn_out`` and ``mlp_out`` (projecting a direction out of all of them
    removes it from the residual stream everywhere, as in Arditi et al. 2024)."""
    names = []
    for layer in range(n_layers):
        names += [hook_name("resid_pre", layer), hook_name("attention", layer), hook_name("mlp", layer)]
    return names


def hf_decoder_layers(hf_model) -> Sequence:
    """The decoder blocks of a Hugging Face causal LM (``model.layers`` of Llama/Qwen2/Mistral/Gemma)."""
    inner = getattr(hf_model, "model", hf_model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise LayerSpecError(f"{type(hf_model).__name__}: no decoder layers at .model.layers; "
                             "hooks on Hugging Face modules support Llama-style models")
    return layers


#: the block hook points that have a Hugging Face module (all of :data:`HOOK_TYPES`).
HF_HOOK_POINTS = tuple(HOOK_TYPES.values())


def hf_hook_target(hf_model, name: str) -> tuple[object, str]:
    """The Hugging Face module and hook kind carrying TransformerLens hook ``name``: ``(module, "pre")``
    when the value is the module's input (a forward pre-hook), ``(module, "post")`` for its output.

    Where each point sits depends on the family's decoder layer (``BlockLayout`` in
    :mod:`refusal_lens.core.families`): ``resid_pre`` / ``resid_post`` are the layer's input and output;
    ``attn_out`` / ``mlp_out`` the attention and MLP outputs (Llama-style), or the outputs of the norms
    that follow them (Gemma-2's ``post_attention_layernorm`` / ``post_feedforward_layernorm``), before
    the residual add; ``resid_mid`` the input of the MLP's norm.
    """
    from refusal_lens.core.families import block_layout

    site = parse_hook_name(name)
    if site is None or site.point not in HF_HOOK_POINTS:
        raise LayerSpecError(f"{name!r}: only blocks.<i>.{{{','.join(HF_HOOK_POINTS)}}} have a Hugging Face module "
                             "to hook")
    layers = hf_decoder_layers(hf_model)
    if not 0 <= site.layer < len(layers):
        raise LayerSpecError(f"{name!r}: the model has {len(layers)} layers")
    layer = layers[site.layer]
    if site.point in ("hook_resid_pre", "hook_resid_post"):  # the layer's own input and output: any family
        return layer, "pre" if site.point == "hook_resid_pre" else "post"
    model_type = getattr(getattr(hf_model, "config", None), "model_type", "")
    layout, why = block_layout(model_type, layer)
    if layout is None:
        raise LayerSpecError(f"{name!r}: the decoder layer {type(layer).__name__} (model_type {model_type!r}) fits "
                             f"no known block layout ({why}); add one in refusal_lens/core/families.py")
    path, kind = layout.points[site.point]
    return layer.get_submodule(path), kind
