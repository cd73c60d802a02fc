"""False-discovery control across a table of tests: Benjamini-Hochberg q-values."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from refusal_lens.core.stats.checks import StatsOptionError


def bh_qvalues(pvalues: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg q-values (adjusted p-values) of a family of tests; NaNs pass through.

    ``q_(i) = min_{j >= i} m p_(j) / j`` over the ``m`` non-NaN p-values sorted ascending, capped at 1.
    Rejecting ``q < alpha`` keeps the false-discovery rate at most ``alpha`` for independent (or
    positively dependent) tests. Same shape as the input.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.ravel()
    ok = ~np.isnan(flat)
    if ((flat[ok] < 0) | (flat[ok] > 1)).any():
        raise StatsOptionError("pvalues must lie in [0, 1] (or be NaN)")
    q = np.full(flat.shape, np.nan)
    vals = flat[ok]
    m = len(vals)
    if m:
        order = np.argsort(vals)
        scaled = vals[order] * m / np.arange(1, m + 1)
        adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
        out = np.empty(m)
        out[order] = adjusted
        q[ok] = out
    return q.reshape(p.shape)

