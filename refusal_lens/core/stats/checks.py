"""Option and input checks shared by the statistics: every bad option raises :class:`StatsOptionError` naming it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from refusal_lens.errors import UserError

ALTERNATIVES = ("greater", "less", "two-sided")

RandomLike = np.random.Generator | int


class StatsOptionError(UserError, ValueError):
    """A bad option or input of a statistic: the message names it and what is allowed."""


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise StatsOptionError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(name: str, value: Any, low: float, high: float, *, high_inclusive: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    ok = ok and low < value and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise StatsOptionError(f"{name} must be a number in ({low}, {high}{bracket}, got {value!r}")
    return float(value)


def _generator(rng: RandomLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise StatsOptionError(f"rng must be a numpy Generator or a non-negative integer seed, got {rng!r}")


def _effects(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise StatsOptionError(f"{name} must be a [prompts, nodes] array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise StatsOptionError(f"{name} must be finite (it has NaN or inf entries)")
    return arr


def _values(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise StatsOptionError(f"{name} must be a 1-D array of values, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise StatsOptionError(f"{name} must not contain NaN")
    return arr


def _alternative(alternative: str) -> str:
    if alternative not in ALTERNATIVES:
        raise StatsOptionError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")
    return alternative

