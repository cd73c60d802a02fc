"""Statistics that hold: the circuit similarity test, false-discovery control, intervals and random controls.

Numpy only, vectorised, deterministic for a given ``rng`` (an int seed or a ``numpy.random.Generator``; no global
random state). docs/statistics.md has the design, the verdict rules and the calibration the suite measures.

* :mod:`.similarity` — :func:`similarity_test` / :func:`similarity_table` (one mechanism or many);
* :mod:`.fdr` — :func:`bh_qvalues`;
* :mod:`.intervals` — :func:`wilson_interval`, :func:`newcombe_difference`, :func:`bootstrap_mean_ci`;
* :mod:`.controls` — :func:`empirical_pvalue`, :func:`compare_to_random`, :func:`ks_uniform`;
* :mod:`.correlation` — :func:`pearson`, :func:`spearman`;
* :mod:`.checks` — :class:`StatsOptionError` and the option checks.
"""

from refusal_lens.core.stats.checks import ALTERNATIVES, RandomLike, StatsOptionError
from refusal_lens.core.stats.controls import (
    RandomControlSummary,
    compare_to_random,
    empirical_pvalue,
    kolmogorov_sf,
    ks_uniform,
)
from refusal_lens.core.stats.correlation import pearson, spearman
from refusal_lens.core.stats.fdr import bh_qvalues
from refusal_lens.core.stats.intervals import bootstrap_mean_ci, newcombe_difference, normal_quantile, wilson_interval
from refusal_lens.core.stats.similarity import (
    VERDICTS,
    SimilarityResult,
    Verdict,
    apply_fdr,
    similarity_table,
    similarity_test,
)

__all__ = ["ALTERNATIVES", "VERDICTS", "RandomControlSummary", "RandomLike", "SimilarityResult", "StatsOptionError",
           "Verdict", "apply_fdr", "bh_qvalues", "bootstrap_mean_ci", "compare_to_random", "empirical_pvalue",
           "kolmogorov_sf", "ks_uniform", "newcombe_difference", "normal_quantile", "pearson", "similarity_table",
           "similarity_test", "spearman", "wilson_interval"]
