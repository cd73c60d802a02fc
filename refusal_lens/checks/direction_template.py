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

import json
import logging

from refusal_lens.checks.common import check_positions, judged_refusal_rate, last_position_kl, open_run, parse, parser
from refusal_lens.infra import durable

log = logging.getLogger(__name__)

#: refusal_direction's Qwen chat template (pipeline/model_utils/qwen_model.py): no system prompt
REFERENCE_QWEN = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def main(argv=None) -> int:
    from refusal_lens.core.chat import check_template

    ap = parser(__doc__, candidates="8:-3,12:-1,15:-2,16:-1", fit_prompts=64, eval_prompts=24, max_new_tokens=20)
    ap.add_argument("--template", default=REFERENCE_QWEN, help="the other template: one {instruction}")
    args, run, picks = parse(ap, argv)
    try:
        check_template(args.template)
    except ValueError as err:
        ap.error(f"--template: {err}")
    cfg, data, loaded, iv = open_run(ap, run, picks, args.batch_size)
    rows = {"fit harmful": data.split_rows("discovery", "toxic", True)[: args.fit_prompts],
            "fit harmless": data.split_rows("discovery", "harmless", False)[: args.fit_prompts],
            "validation harmful": data.split_rows("validation", "toxic", True)[: args.eval_prompts],
            "validation harmless": data.split_rows("validation", "harmless", False)[: args.eval_prompts]}
    sizes = {k: len(v) for k, v in rows.items()}
    if min(sizes.values()) == 0:
        raise SystemExit(f"{args.run}: a side has no prompts ({sizes}); this check needs every one")
    log.info("prompts: %s", sizes)
    out: dict = {"run": str(args.run), "prompts": sizes, "template": args.template,
                 **measure(args, cfg, data, loaded, iv, rows, picks)}
    path = run.check_output("direction_template_check")
    durable.write_json(path, out, indent=1)
    log.info("cosine between the templates' candidates: %s", json.dumps(out["cosine"]))
    log.info("wrote %s", path)
    return 0


def measure(args, cfg, data, loaded, iv, rows: dict, picks) -> dict:
    """For the tokenizer's template and the given one: the candidates fitted in that template and, per asked-for
    candidate, the validation bypass, judged refusal rate and harmless KL under ablation; and the cosine of the
    two templates' candidates."""
    import torch

    from refusal_lens.core.direction_edits import ablation_edits
    from refusal_lens.stages.direction.candidates import difference_in_means
    from refusal_lens.stages.direction.select import scores_of

    n_layers, d_model = int(data.manifest["n_layers"]), loaded.hf_model.config.hidden_size

    def refusal_rate(prompts, edits=None) -> float:
        return judged_refusal_rate(iv, loaded.tokenizer, prompts, args.max_new_tokens, edits)

    out: dict = {"templates": {}}
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    for name, template in {"tokenizer's template": None, "given template": args.template}.items():
        enc = {k: data.encoded(loaded.tokenizer, cfg.inference.max_prompt_tokens, v, template) for k, v in rows.items()}
        n_post = enc["fit harmful"][0].n_post_instruction
        check_positions(picks, n_post)
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
    return out


if __name__ == "__main__":
    raise SystemExit(main())
