"""Which side of the contrast makes the strong direction candidates costly, harmful or harmless? (docs/direction.md)

From a finished run, the layer x position mean differences of the block input are fitted for every pair of a
harmful set and a harmless set (``--harmful`` / ``--harmless``, repeatable, ``NAME=SOURCE``). A source is ``run``
(the run's own **discovery** prompts: refused toxic, or answered harmless, as judged in the run) or a file with a
``prompt`` (or ``instruction``) column, or an embedded set's name (e.g. refusal_direction's
``dataset/splits/harmful_train.json``, ``harmless_train.json``, or ``embedded:harmless-questions``). A file's
prompts are shuffled with ``--seed`` and kept by the reference's filter (refusal score > 0 harmful, < 0
harmless); the first ``--fit-prompts`` fit the means, and of a harmless file the next ``--eval-prompts`` are that
set's KL prompts (disjoint from its fit prompts). For each asked-for candidate and each pair, on the run's
**validation** prompts only (test is never read): the bypass score (mean refusal score) and the judged refusal
rate (greedy, ``--max-new-tokens``) of refused toxic prompts under ablation from every residual write and
position, and the KL of the last-position next-token distribution under that ablation on every harmless set's
KL prompts (``run``: its answered harmless validation prompts); and each pair's cosine with the first pair.
Writes ``<run>/direction_sets_check.json``.

Usage: .venv/bin/python -m refusal_lens.checks.direction_sets --run results/full [--candidates 15:-2,16:-1]
       [--harmful run --harmful advbench=harmful_train.json] [--harmless run --harmless alpaca=harmless_train.json]
       [--fit-prompts 128] [--eval-prompts 32] [--max-new-tokens 16] [--seed 42]
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from refusal_lens.checks.common import check_positions, judged_refusal_rate, last_position_kl, open_run, parse, parser
from refusal_lens.infra import durable

log = logging.getLogger(__name__)


def parse_sets(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["run", "alpaca=path.json"]`` -> ``{"run": "run", "alpaca": "path.json"}`` (a clear error on repeats)."""
    out: dict[str, str] = {}
    for item in items or ["run"]:
        name, sep, source = item.partition("=")
        name, source = (name, source) if sep else (item, item)
        if not name or not source or name in out:
            raise SystemExit(f"{flag} {item!r}: allowed: run or NAME=SOURCE (a file, folder or embedded:... set), "
                             "each NAME once")
        out[name] = source
    return out


def read_texts(source: str) -> list[str]:
    """The prompts of a file (JSON list with ``prompt`` or ``instruction``; anything ``direction.harmless``
    accepts) or an embedded set."""
    from refusal_lens.data.prompts import read_harmless

    path = Path(source).expanduser()
    if path.suffix == ".json" and path.is_file():
        rows = json.loads(path.read_text())
        texts = [r.get("prompt") or r.get("instruction") for r in rows if isinstance(r, dict)]
        if not rows or not all(isinstance(t, str) and t.strip() for t in texts) or len(texts) != len(rows):
            raise SystemExit(f"{source}: allowed: a JSON list of objects with a 'prompt' or 'instruction' text")
        return [t.strip() for t in texts]
    return [p.prompt for p in read_harmless(source)]


def main(argv=None) -> int:
    ap = parser(__doc__, candidates="15:-2,16:-1", fit_prompts=128, eval_prompts=32, max_new_tokens=16)
    ap.add_argument("--harmful", action="append", help="run or NAME=FILE (repeatable; default: run)")
    ap.add_argument("--harmless", action="append", help="run or NAME=FILE (repeatable; default: run)")
    ap.add_argument("--seed", type=int, default=42, help="shuffles each file's prompts before the filter")
    args, run, picks = parse(ap, argv)
    harmful_sets, harmless_sets = parse_sets(args.harmful, "--harmful"), parse_sets(args.harmless, "--harmless")
    cfg, data, loaded, iv = open_run(ap, run, picks, args.batch_size)
    fit, kl_prompts, val_harmful = contrast_sets(args, cfg, data, loaded, iv, harmful_sets, harmless_sets)
    sizes = {"fit": {side: {k: len(v) for k, v in sets.items()} for side, sets in fit.items()},
             "kl": {k: len(v) for k, v in kl_prompts.items()}, "validation_refused_toxic": len(val_harmful)}
    empty = [k for side in sizes["fit"].values() for k, n in side.items() if n == 0] + \
        [k for k, n in sizes["kl"].items() if n == 0] + (["validation"] if not val_harmful else [])
    if empty:
        raise SystemExit(f"{args.run}: no prompts for {empty} ({sizes}); this check needs every set")
    log.info("prompts: %s", json.dumps(sizes))
    check_positions(picks, val_harmful[0].n_post_instruction)
    out = {"run": str(args.run), "sources": {"harmful": harmful_sets, "harmless": harmless_sets}, "prompts": sizes,
           **measure(iv, data, loaded.tokenizer, fit, kl_prompts, val_harmful, picks, args.max_new_tokens)}
    path = run.check_output("direction_sets_check")
    durable.write_json(path, out, indent=1)
    log.info("wrote %s", path)
    return 0


def contrast_sets(args, cfg, data, loaded, iv, harmful_sets: dict, harmless_sets: dict) -> tuple[dict, dict, list]:
    """The fit prompts of every harmful and harmless set, every harmless set's KL prompts, and the run's refused
    toxic validation prompts: a file's prompts shuffled with ``--seed`` and kept by the reference's score filter."""
    from refusal_lens.core.chat import encode_prompt
    from refusal_lens.stages.direction.select import scores_of

    tok, max_tokens = loaded.tokenizer, cfg.inference.max_prompt_tokens

    def run_rows(split: str, label: str, refused: bool):
        return data.encoded(tok, max_tokens, data.split_rows(split, label, refused))

    def from_file(source: str, harmful: bool, n: int):
        texts = read_texts(source)
        random.Random(args.seed).shuffle(texts)
        kept, seen = [], 0
        while len(kept) < n and seen < len(texts):  # score chunks until n are kept (or the file ends)
            enc = [encode_prompt(tok, t, max_tokens) for t in texts[seen: seen + n]]
            seen += len(enc)
            kept += [p for p, s in zip(enc, scores_of(iv, enc, data.tokens)) if (s > 0 if harmful else s < 0)]
        log.info("%s: %d of %d prompts kept by the score filter", source, len(kept), seen)
        return kept[:n]

    fit: dict[str, dict] = {"harmful": {}, "harmless": {}}
    kl_prompts: dict[str, list] = {}
    for name, source in harmful_sets.items():
        fit["harmful"][name] = (run_rows("discovery", "toxic", True) if source == "run"
                                else from_file(source, True, args.fit_prompts))[: args.fit_prompts]
    for name, source in harmless_sets.items():
        if source == "run":
            fit["harmless"][name] = run_rows("discovery", "harmless", False)[: args.fit_prompts]
            kl_prompts[name] = run_rows("validation", "harmless", False)[: args.eval_prompts]
        else:
            kept = from_file(source, False, args.fit_prompts + args.eval_prompts)
            fit["harmless"][name] = kept[: args.fit_prompts]
            kl_prompts[name] = kept[args.fit_prompts: args.fit_prompts + args.eval_prompts]
    return fit, kl_prompts, run_rows("validation", "toxic", True)[: args.eval_prompts]


def measure(iv, data, tok, fit: dict, kl_prompts: dict, val_harmful, picks, max_new_tokens: int) -> dict:
    """Every harmful x harmless pair's candidates; per asked-for candidate and pair: the cosine with the first pair,
    the validation bypass and judged refusal rate under ablation, and the KL on every harmless set's KL prompts."""
    import torch

    from refusal_lens.core.direction_edits import ablation_edits
    from refusal_lens.stages.direction.candidates import difference_in_means
    from refusal_lens.stages.direction.select import scores_of

    n_layers, n_post = int(data.manifest["n_layers"]), val_harmful[0].n_post_instruction
    d_model = iv.model.config.hidden_size

    def refusal_rate(edits=None) -> float:
        return judged_refusal_rate(iv, tok, val_harmful, max_new_tokens, edits)

    pairs = {f"{h}+{ok}": difference_in_means(iv, fit["harmful"][h], fit["harmless"][ok], n_layers, d_model)
             for h in fit["harmful"] for ok in fit["harmless"]}
    out = {"clean": {"bypass": float(scores_of(iv, val_harmful, data.tokens).mean()), "refusal_rate": refusal_rate()},
           "candidates": {}}
    first = next(iter(pairs))
    for layer, pos in picks:
        vectors = {name: c.vector(layer, n_post + pos) for name, c in pairs.items()}
        row = {}
        for name, v in vectors.items():
            edits = ablation_edits(v, n_layers)
            row[name] = {"cosine_with_" + first: float(torch.nn.functional.cosine_similarity(vectors[first], v, dim=0)),
                         "bypass": float(scores_of(iv, val_harmful, data.tokens, edits).mean()),
                         "ablated_refusal_rate": refusal_rate(edits),
                         "kl": {k: last_position_kl(iv, p, edits) for k, p in kl_prompts.items()}}
            log.info("L%d/%d %s: %s", layer, pos, name, json.dumps(row[name]))
        out["candidates"][f"L{layer}/{pos}"] = row
    return out


if __name__ == "__main__":
    raise SystemExit(main())
