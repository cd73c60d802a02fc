"""Refusal rates of the collected prompts (per split, category and label, with totals), their table, and how
well the refusal score separates refused from complied responses (AUROC per split)."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence

from refusal_lens.core.metrics import rate
from refusal_lens.core.refusal import auroc
from refusal_lens.core.splits import SPLITS
from refusal_lens.infra import durable
from refusal_lens.run.folder import ActivationFiles

RATE_FIELDS = ["split", "category", "label", "n", "refused", "complied", "incoherent", "refusal_rate", "ci_low", "ci_high"]


def refusal_rates(prompt_rows: Sequence[dict]) -> list[dict]:
    """Outcome counts per split ("all" and each split), category and label (safe: over-refusal; toxic: correct
    refusal; harmless: should be 0), plus per-split totals over categories (category "ALL"); each a
    :func:`refusal_lens.core.metrics.rate`."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for row in prompt_rows:
        outcome = row.get("outcome") or ("refused" if row["refused"] else "complied")
        for split in ("all", row.get("split", "all")):
            groups[(split, row["category"], row["label"])].append(outcome)
            groups[(split, "ALL", row["label"])].append(outcome)
    out = []
    order = {s: i for i, s in enumerate(("all", *SPLITS))}
    for (split, category, label), outcomes in sorted(groups.items(),
                                                     key=lambda kv: (order[kv[0][0]], kv[0][1] == "ALL", kv[0][1:])):
        out.append({"split": split, "category": category, "label": label, **rate(outcomes)})
    return out


def format_rates(rates: Sequence[dict], split: str = "all") -> str:
    """A plain-text table of one split: category x (safe over-refusal, toxic refusal, harmless refusal)."""
    rates = [r for r in rates if r.get("split", "all") == split]
    labels = sorted({r["label"] for r in rates})
    cats = list(dict.fromkeys(r["category"] for r in rates))
    cell = {(r["category"], r["label"]): r for r in rates}
    head = f"{'category':<12}" + "".join(f"{lab + ' refused':>22}" for lab in labels)
    lines = [head, "-" * len(head)]
    for c in cats:
        parts = []
        for lab in labels:
            r = cell.get((c, lab))
            parts.append(f"{'-':>22}" if r is None else f"{r['refused']:>5}/{r['n']:<4} ({r['refusal_rate']:6.1%})".rjust(22))
        lines.append(f"{c:<12}" + "".join(parts))
    return "\n".join(lines)


def score_auroc(rows: Sequence[dict]) -> dict[str, dict]:
    """How well the refusal score separates refused from complied responses (incoherent ones left out), per
    split: AUROC with the counts (the test split's is the one the report states)."""
    out = {}
    for split in SPLITS:
        pos = [r["refusal_score"] for r in rows if r["split"] == split and r["outcome"] == "refused"]
        neg = [r["refusal_score"] for r in rows if r["split"] == split and r["outcome"] == "complied"]
        out[split] = {"auroc": auroc(pos, neg), "n_refused": len(pos), "n_complied": len(neg)}
    return out



def write_rates(files: ActivationFiles, rates: Sequence[dict]) -> None:
    """``refusal_rates.json`` and ``refusal_rates.csv``."""
    durable.write_json(files.rates_json, list(rates))
    with durable.open_atomic(files.rates_csv, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RATE_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "ci_low": r["ci"][0], "ci_high": r["ci"][1]} for r in rates)
