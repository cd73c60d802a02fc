"""Correlations of two paired samples: :func:`pearson` and :func:`spearman` (ties get their average rank).

None, not a number, when fewer than three pairs or a constant side leave the correlation undefined.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def pearson(a: ArrayLike, b: ArrayLike) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def ranks(x: ArrayLike) -> np.ndarray:
    """0-based ranks, ties averaged."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(a: ArrayLike, b: ArrayLike) -> float | None:
    return pearson(ranks(a), ranks(b)) if len(a) >= 3 else None
