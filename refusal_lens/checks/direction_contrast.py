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

import argparse
import json
import logging
import os
from pathlib import Path


from refusal_lens.checks.common import check_run, last_position_kl, open_run, parse_candidates
from refusal_lens.run.folder import RunFolder

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder whose collect stage finished")
    ap.add_argument("--candidates", default="8:-3,12:-1,15:-2,16:-1", help="LAYER:POSITION,... (position < 0)")
    ap.add_argument("--fit-prompts", type=int, default=64, help="discovery prompts per side for the means")
    ap.add_argument("--eval-prompts", type=int, default=24, help="validation prompts per measure")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an entry point: nothing is downloaded
    run = RunFolder(args.run)
    check_run(ap, run)
    if min(args.fit_prompts, args.eval_prompts, args.batch_size) < 1:
        ap.error("--fit-prompts, --eval-prompts and --batch-size must be integers >= 1")
    picks = parse_candidates(args.candidates)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from refusal_lens.infra import durable
    from refusal_lens.stages.direction.candidates import difference_in_means
    from refusal_lens.core.direction_edits import ablation_edits
    from refusal_lens.stages.direction.select import scores_of

    cfg, data, loaded, iv = open_run(ap, run, picks, args.batch_size)
    n_layers = int(data.manifest["n_layers"])
    d_model = loaded.hf_model.config.hidden_size

    def enc(split: str, label: str, refused: bool, cap: int):
        return data.encoded(loaded.tokenizer, cfg.inference.max_prompt_tokens, data.split_rows(split, label, refused)[:cap])

    harmful = enc("discovery", "toxic", True, args.fit_prompts)
    sides = {"harmless instructions": enc("discovery", "harmless", False, args.fit_prompts),
             "OR-Bench safe, answered": enc("discovery", "safe", False, args.fit_prompts)}
    val_harmful = enc("validation", "toxic", True, args.eval_prompts)
    val_harmless = enc("validation", "harmless", False, args.eval_prompts)
    val_safe = enc("validation", "safe", False, args.eval_prompts)
    sizes = {"fit": {"harmful": len(harmful), **{k: len(v) for k, v in sides.items()}},
             "validation": {"harmful": len(val_harmful), "harmless": len(val_harmless), "safe answered": len(val_safe)}}
    if min(sizes["fit"].values()) == 0 or min(sizes["validation"].values()) == 0:
        raise SystemExit(f"{args.run}: a side has no prompts ({sizes}); this check needs every one")
    log.info("prompts: %s", sizes)
    n_post = harmful[0].n_post_instruction
    if (far := [pos for _, pos in picks if pos < -n_post]):
        raise SystemExit(f"--candidates positions {far}: this template has {n_post} post-instruction positions "
                         f"(allowed: -{n_post}..-1)")
    cands = {name: difference_in_means(iv, harmful, side, n_layers, d_model) for name, side in sides.items()}

    out = {"run": str(args.run), "prompts": sizes,
           "clean_bypass": float(scores_of(iv, val_harmful, data.tokens).mean()), "candidates": {}}
    for layer, pos in picks:
        j = n_post + pos
        vectors = {name: c.vector(layer, j) for name, c in cands.items()}
        a, b = vectors.values()
        row = {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0))}
        for name, v in vectors.items():
            edits = ablation_edits(v, n_layers)
            row[name] = {"bypass": float(scores_of(iv, val_harmful, data.tokens, edits).mean()),
                         "kl_harmless": last_position_kl(iv, val_harmless, edits),
                         "kl_safe_answered": last_position_kl(iv, val_safe, edits)}
        out["candidates"][f"L{layer}/{pos}"] = row
        log.info("L%d/%d: %s", layer, pos, json.dumps(row))
    path = run.check_output("direction_contrast_check")
    durable.write_json(path, out, indent=1)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
