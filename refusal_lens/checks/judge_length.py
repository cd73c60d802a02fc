"""Would fewer greedy tokens give the same judgements? Every response of a finished run re-judged on its first N tokens.

Greedy decoding is prefix-consistent: the first N tokens of a greedy response of M > N tokens are the greedy
response of N tokens (up to floating-point ties between batches). So judging the first N tokens of each stored
response measures, without the model, what ``max_new_tokens = N`` would have reported: for each N, the share of
responses whose judgement (refused / complied / incoherent) stays the same, the share whose *refused or not*
flips, and the largest change of a condition's refusal rate (conditions with >= ``--min-n`` responses). Generation
is most of the cost of the interventions (issue 23's profile), so this is the evidence a shorter generation needs.

Responses: collect's (``activations/responses/*.json``, with their token ids) and every response audit of the later
stages (``*/responses/*.jsonl`` and ``circuits/validation/responses.jsonl``: text, re-tokenised with the model's
tokenizer, so the first N tokens are those of the re-tokenised text). Written to ``<run>/judge_length.json``.

Usage: .venv/bin/python -m refusal_lens.checks.judge_length --run results/full [--n 8 12 16] [--min-n 20]
       [--reference 20]   (the reference judged on the first 20 tokens: the interventions' generation length)
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from refusal_lens.core.judge import judge
from refusal_lens.infra import durable
from refusal_lens.run.folder import RunFolder

logger = logging.getLogger(__name__)


def responses_of(run: RunFolder, tokenizer) -> dict[str, list[tuple[str, list[int]]]]:
    """``source -> [(condition, token ids)]``: collect's responses (condition ``collect``) and every audit's."""
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for path in sorted(run.paths.activations.responses.glob("*.json")):
        out.setdefault("collect", []).extend(("collect", list(r["response_ids"])) for r in json.loads(path.read_text()))
    audits = sorted(run.root.glob("*/responses/*.jsonl")) + sorted(run.root.glob("circuits/validation/responses.jsonl"))
    for path in audits:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ids = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
        out[str(path.relative_to(run.root))] = [(r["condition"], list(i)) for r, i in zip(rows, ids)]
    return out


def compare(responses: Sequence[tuple[str, list[int]]], n: int, decode, min_n: int, reference: int | None = None) -> dict:
    """Judgement on the first ``n`` tokens against the judgement on the whole response (or on its first
    ``reference`` tokens: what a generation of that length reports), for ``responses``."""
    if reference is not None:
        responses = [(c, ids[:reference]) for c, ids in responses]
    same = flips = longer = 0
    by_condition: dict[str, list[tuple[bool, bool]]] = {}
    for condition, ids in responses:
        if len(ids) <= n:
            same += 1  # as long as the cut or shorter: the same text
            by_condition.setdefault(condition, []).append((True, True) if judge(decode(ids)).refused else (False, False))
            continue
        longer += 1
        full, cut = judge(decode(ids)), judge(decode(ids[:n]))
        same += full.outcome == cut.outcome
        flips += full.refused != cut.refused
        by_condition.setdefault(condition, []).append((full.refused, cut.refused))
    total = len(responses)
    shifts = {c: abs(sum(a for a, _ in v) - sum(b for _, b in v)) / len(v) for c, v in by_condition.items()
              if len(v) >= min_n}
    worst = max(shifts, key=shifts.get) if shifts else None
    return {"n_responses": total, "n_longer_than_cut": longer, "same_judgement": same / total if total else None,
            "refused_flips": flips / total if total else None,
            "max_rate_change": shifts[worst] if worst else None, "max_rate_change_condition": worst,
            "n_conditions": len(shifts), "reference_tokens": reference}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (results/<run_name>)")
    ap.add_argument("--n", type=int, nargs="+", default=[8, 12, 16], help="the cuts, in tokens")
    ap.add_argument("--min-n", type=int, default=20, help="responses a condition needs for its rate change")
    ap.add_argument("--reference", type=int, help="judge the reference on the first this many tokens (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = RunFolder(args.run)
    if not run.paths.activations.responses.is_dir():
        ap.error(f"--run {args.run}: no activations/responses; allowed: a run whose collect stage ran")
    if any(n < 1 for n in args.n) or (args.reference is not None and args.reference < 1):
        ap.error(f"--n {args.n}: allowed: positive token counts")
    from refusal_lens.models.loading import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source(run.config().model.name))

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    sources = responses_of(run, tokenizer)
    doc = {"cuts": args.n, "min_n": args.min_n, "sources": {}}
    for source, rows in sources.items():
        longest = max((len(ids) for _, ids in rows), default=0)
        doc["sources"][source] = {"longest_response": longest,
                                  "reference_tokens": args.reference,
                                  **{str(n): compare(rows, n, decode, args.min_n, args.reference) for n in args.n
                                     if n < min(longest, args.reference or longest)}}
        for n, r in ((n, doc["sources"][source].get(str(n))) for n in args.n):
            if r:
                logger.info("%s, first %d tokens: same judgement %.3f, refused flips %.3f, largest rate change %s (%s)",
                            source, n, r["same_judgement"], r["refused_flips"], r["max_rate_change"],
                            r["max_rate_change_condition"])
    out = run.root / "judge_length.json"
    durable.write_json(out, doc, indent=1)
    logger.info("written %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
