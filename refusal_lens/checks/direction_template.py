"""Does the chat template's default system prompt make the strong direction candidates costly? (docs/direction.md)

The reference (refusal_direction) formats Qwen prompts with a hand-written template that has no system
prompt; the tokenizer's own template, which the project uses, adds Qwen's default one. From a finished run's
collection, for each template the layer x position mean differences of the block input are fitted on
**discovery** prompts (refused toxic vs answered harmless, as judged in the run) *in that template*, and
each asked-for candidate is measured on **validation** prompts in the same template (test is never read):
the clean and ablated mean refusal score of refused toxic prompts (bypass), the judged refusal rate of
their greedy responses clean and under ablation (every residual write, every position, generated tokens
included), and the KL of the answered harmless prompts' last-position next-token distribution under
ablation; plus the cosine of the two templates' candidates. Writes ``<run>/direction_template_check.json``.

Usage: .venv/bin/python -m refusal_lens.checks.direction_template --run results/full [--candidates 8:-3,16:-1]
       [--template '<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n']
       [--fit-prompts 64] [--eval-prompts 24] [--max-new-tokens 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path


from refusal_lens.checks.common import check_run, judged_refusal_rate, last_position_kl, open_run, parse_candidates
from refusal_lens.run.folder import RunFolder

log = logging.getLogger(__name__)

#: refusal_direction's Qwen chat template (pipeline/model_utils/qwen_model.py): no system prompt
REFERENCE_QWEN = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder whose collect stage finished")
    ap.add_argument("--candidates", default="8:-3,12:-1,15:-2,16:-1", help="LAYER:POSITION,... (position < 0)")
    ap.add_argument("--template", default=REFERENCE_QWEN, help="the other template: one {instruction}")
    ap.add_argument("--fit-prompts", type=int, default=64, help="discovery prompts per side for the means")
    ap.add_argument("--eval-prompts", type=int, default=24, help="validation prompts per measure")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an entry point: nothing is downloaded
    run = RunFolder(args.run)
    check_run(ap, run)
    if min(args.fit_prompts, args.eval_prompts, args.batch_size, args.max_new_tokens) < 1:
        ap.error("--fit-prompts, --eval-prompts, --max-new-tokens and --batch-size must be integers >= 1")
    from refusal_lens.core.chat import check_template

    try:
        check_template(args.template)
    except ValueError as err:
        ap.error(f"--template: {err}")
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
    rows = {"fit harmful": data.split_rows("discovery", "toxic", True)[: args.fit_prompts],
            "fit harmless": data.split_rows("discovery", "harmless", False)[: args.fit_prompts],
            "validation harmful": data.split_rows("validation", "toxic", True)[: args.eval_prompts],
            "validation harmless": data.split_rows("validation", "harmless", False)[: args.eval_prompts]}
    sizes = {k: len(v) for k, v in rows.items()}
    if min(sizes.values()) == 0:
        raise SystemExit(f"{args.run}: a side has no prompts ({sizes}); this check needs every one")
    log.info("prompts: %s", sizes)

    def refusal_rate(prompts, edits=None) -> float:
        return judged_refusal_rate(iv, loaded.tokenizer, prompts, args.max_new_tokens, edits)

    templates = {"tokenizer's template": None, "given template": args.template}
    out: dict = {"run": str(args.run), "prompts": sizes, "template": args.template, "templates": {}}
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    for name, template in templates.items():
        enc = {k: data.encoded(loaded.tokenizer, cfg.inference.max_prompt_tokens, v, template) for k, v in rows.items()}
        n_post = enc["fit harmful"][0].n_post_instruction
        if (far := [pos for _, pos in picks if pos < -n_post]):
            raise SystemExit(f"--candidates positions {far}: the {name} has {n_post} post-instruction positions "
                             f"(allowed: -{n_post}..-1)")
        cands = difference_in_means(iv, enc["fit harmful"], enc["fit harmless"], n_layers, d_model)
        val_h, val_ok = enc["validation harmful"], enc["validation harmless"]
        res = {"n_post_instruction": n_post, "clean_score": float(scores_of(iv, val_h, data.tokens).mean()),
               "clean_refusal_rate": refusal_rate(val_h), "candidates": {}}
        vectors[name] = {}
        for layer, pos in picks:
            v = cands.vector(layer, n_post + pos)
            vectors[name][f"L{layer}/{pos}"] = v
            edits = ablation_edits(v, n_layers)
            res["candidates"][f"L{layer}/{pos}"] = {
                "bypass": float(scores_of(iv, val_h, data.tokens, edits).mean()),
                "ablated_refusal_rate": refusal_rate(val_h, edits), "kl_harmless": last_position_kl(iv, val_ok, edits),
                "norm": float(v.norm())}
            log.info("%s L%d/%d: %s", name, layer, pos, json.dumps(res["candidates"][f"L{layer}/{pos}"]))
        out["templates"][name] = res
    a, b = vectors.values()
    out["cosine"] = {k: float(torch.nn.functional.cosine_similarity(a[k], b[k], dim=0)) for k in a}
    path = run.check_output("direction_template_check")
    durable.write_json(path, out, indent=1)
    log.info("cosine between the templates' candidates: %s", json.dumps(out["cosine"]))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
