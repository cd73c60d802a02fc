"""Does the harmless side of the contrast make the strong direction candidates costly? (docs/direction.md)

From a finished run's collection, the layer x position mean differences of the block input are fitted on
**discovery** prompts twice, with the same harmful side (refused toxic prompts) and two harmless sides: the
run's harmless instructions the model answered, and OR-Bench *safe* (seemingly toxic) prompts it answered
(topic-matched). For each asked-for candidate, on **validation** prompts only (test is never read): the
bypass score (mean refusal score of refused toxic prompts with the candidate ablated from every residual
write), the KL of the harmless instructions' and of the answered safe prompts' last-position next-token
distributions under that ablation, and the cosine of the two sides' candidates. Writes
``<run>/direction_contrast_check.json`` and logs each candidate's numbers.

Usage: .venv/bin/python -m refusal_lens.checks.direction_contrast --run results/full [--candidates 8:-3,16:-1]
       [--fit-prompts 64] [--eval-prompts 24]
"""

from __future__ import annotations

import json
import logging

from refusal_lens.checks.common import check_positions, last_position_kl, open_run, parse, parser
from refusal_lens.infra import durable

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    ap = parser(__doc__, candidates="8:-3,12:-1,15:-2,16:-1", fit_prompts=64, eval_prompts=24)
    args, run, picks = parse(ap, argv)
    cfg, data, loaded, iv = open_run(ap, run, picks, args.batch_size)

    def enc(split: str, label: str, refused: bool, cap: int):
        return data.encoded(loaded.tokenizer, cfg.inference.max_prompt_tokens, data.split_rows(split, label, refused)[:cap])

    harmful = enc("discovery", "toxic", True, args.fit_prompts)
    sides = {"harmless instructions": enc("discovery", "harmless", False, args.fit_prompts),
             "OR-Bench safe, answered": enc("discovery", "safe", False, args.fit_prompts)}
    val = {"harmful": enc("validation", "toxic", True, args.eval_prompts),
           "harmless": enc("validation", "harmless", False, args.eval_prompts),
           "safe answered": enc("validation", "safe", False, args.eval_prompts)}
    sizes = {"fit": {"harmful": len(harmful), **{k: len(v) for k, v in sides.items()}},
             "validation": {k: len(v) for k, v in val.items()}}
    if min(sizes["fit"].values()) == 0 or min(sizes["validation"].values()) == 0:
        raise SystemExit(f"{args.run}: a side has no prompts ({sizes}); this check needs every one")
    log.info("prompts: %s", sizes)
    check_positions(picks, harmful[0].n_post_instruction)
    out = {"run": str(args.run), "prompts": sizes, **measure(iv, data, harmful, sides, val, picks)}
    path = run.check_output("direction_contrast_check")
    durable.write_json(path, out, indent=1)
    log.info("wrote %s", path)
    return 0


def measure(iv, data, harmful, sides: dict, val: dict, picks) -> dict:
    """Each side's candidates fitted against the same harmful prompts; per asked-for candidate, the two sides'
    cosine and, per side, the validation bypass and the KL of both harmless sets under its ablation."""
    import torch

    from refusal_lens.core.direction_edits import ablation_edits
    from refusal_lens.stages.direction.candidates import difference_in_means
    from refusal_lens.stages.direction.select import scores_of

    n_layers, n_post = int(data.manifest["n_layers"]), harmful[0].n_post_instruction
    d_model = iv.model.config.hidden_size
    cands = {name: difference_in_means(iv, harmful, side, n_layers, d_model) for name, side in sides.items()}
    out = {"clean_bypass": float(scores_of(iv, val["harmful"], data.tokens).mean()), "candidates": {}}
    for layer, pos in picks:
        vectors = {name: c.vector(layer, n_post + pos) for name, c in cands.items()}
        a, b = vectors.values()
        row = {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0))}
        for name, v in vectors.items():
            edits = ablation_edits(v, n_layers)
            row[name] = {"bypass": float(scores_of(iv, val["harmful"], data.tokens, edits).mean()),
                         "kl_harmless": last_position_kl(iv, val["harmless"], edits),
                         "kl_safe_answered": last_position_kl(iv, val["safe answered"], edits)}
        out["candidates"][f"L{layer}/{pos}"] = row
        log.info("L%d/%d: %s", layer, pos, json.dumps(row))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
