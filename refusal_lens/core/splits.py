"""One split of the prompts into ``discovery``, ``validation`` and ``test``, made once and used by every stage.

* **discovery**: everything is fitted or ranked here (SAE training, refusal-token sets, candidate
  directions, node effects that rank circuit features);
* **validation**: every choice among candidates (the direction's layer and position, circuit sizes,
  thresholds, the SAE quality bar);
* **test**: every number the report calls a result.

The split is made by the collect stage, after the responses are judged, and stored with the prompts
(``activations/prompts``, column ``split``; counts in ``activations/split.json``). It is stratified by
label x category x outcome (refused or not), so that each split holds its share of every stratum, and
it is a pure function of the prompt ids, the strata and the seed: within a stratum, prompts are ordered by
``sha256(seed, prompt id)`` and placed on ``[0, 1)`` at ``(rank + offset) / n`` (``offset`` a hash of
the stratum), and the split is the fraction interval that point falls in. It does not depend on the
order of the prompts or on which other strata exist, and a stratum of one prompt goes to a split at
random (by hash) rather than always to the first.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from refusal_lens.errors import UserError

SPLITS: tuple[str, ...] = ("discovery", "validation", "test")


class SplitError(UserError, ValueError):
    """Bad split fractions, or a stage asked for prompts of a split that has none."""


def _unit(*parts: object) -> float:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:13], 16) / 16**13


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise SplitError(f"data.split_discovery/split_validation/split_test = {list(fractions)}; allowed: three "
                         "numbers >= 0 that sum to 1")
    if min(fractions) <= 0:
        raise SplitError(f"data.split_* = {list(fractions)}: every split needs a fraction > 0 (discovery selects, "
                         "validation chooses, test reports)")
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def assign_splits(rows: Iterable[Mapping], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """``prompt_id -> split`` for rows with ``prompt_id``, ``label``, ``category`` and ``refused``."""
    d, v, _ = check_fractions(fractions)
    strata: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        strata[(r["label"], r["category"], bool(r["refused"]))].append(r["prompt_id"])
    out: dict[str, str] = {}
    for key, ids in strata.items():
        ordered = sorted(ids, key=lambda pid: (_unit(seed, pid), pid))
        offset = _unit(seed, "stratum", *key)
        for rank, pid in enumerate(ordered):
            u = ((rank + offset) / len(ordered)) % 1.0
            out[pid] = SPLITS[0] if u < d else SPLITS[1] if u < d + v else SPLITS[2]
    return out


def split_counts(rows: Iterable[Mapping]) -> dict[str, dict[str, int]]:
    """``split -> {label: prompts, label/refused: refused prompts}`` (for split.json and the report)."""
    out: dict[str, dict[str, int]] = {s: defaultdict(int) for s in SPLITS}  # type: ignore[misc]
    for r in rows:
        c = out[r["split"]]
        c[r["label"]] += 1
        c[f"{r['label']}/refused"] += int(bool(r["refused"]))
        c["all"] += 1
    return {s: dict(sorted(c.items())) for s, c in out.items()}


def rows_of(rows: Sequence[Mapping], split: str) -> list[int]:
    """Indices of the rows in ``split``."""
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return [i for i, r in enumerate(rows) if r["split"] == split]


def check_disjoint(assignment: Mapping[str, str]) -> None:
    """Every prompt id in exactly one known split (a dict cannot hold an id twice; the values are checked)."""
    bad = sorted({s for s in assignment.values() if s not in SPLITS})
    if bad:
        raise SplitError(f"unknown split name(s) {bad}; allowed: {', '.join(SPLITS)}")
