"""The typed loader of every config section: YAML -> frozen dataclasses, errors naming the dotted path.

A config file has the sections of :class:`refusal_lens.config.Config` (``model:``, ``inference:``, ``data:``,
``output:`` …); a missing section or key takes its default, an unknown key or a value of the wrong type is an
error naming its dotted path. A file may start from another one with ``base: other.yaml`` (resolved relative to
the file; the file's own keys win, section by section). ``--set section.key=value`` overrides are parsed as YAML
values and checked like file values. Sections are plain frozen dataclasses, each beside the code that reads it
(``refusal_lens/config/sections.py`` for ``model`` and ``output``, ``refusal_lens/stages/<stage>/config.py``
for the others); this module knows none of them.

Configs have no side effects: constructing one seeds nothing and probes no device.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from refusal_lens.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that is missing, unknown or of the wrong type; the message names its dotted path."""


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


def config_to_dict(cfg: Any) -> dict:
    """A plain mapping (lists, not tuples) that :func:`config_from_dict` turns back into ``cfg``."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)



def dump_config(cfg: Any) -> str:
    """The YAML text of a config (every key, defaults included)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
