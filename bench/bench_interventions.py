"""Intervention passes (generation and forward) on the embedded Qwen: the model's dtype and the shared opening.

Every behaviour number of refusal_lens is a greedy generation (or a forward pass) under an edit, on
``loaded.gen_model``. This measures, on the sample prompts (interleaved, median of ``--repeats``), the
time of 32 prompts for: float32 whole prompts (the baseline), float32 with the template's opening computed once
and shared, bfloat16 whole, bfloat16 shared; with a directional-ablation edit (which changes the opening, so the
shared opening is recomputed once per call) and with no edit. Ratios are against the baseline of the same run.

A second table times greedy generation with the ablation edit (bfloat16, shared opening) at each batch size of
``--gen-batches`` on the same prompts: on a CPU one decoding step reads every weight whatever the batch, so larger
batches should cost little more per step. Ratios against the first batch size.

A third table times greedy generation under several conditions in shared batches (``Intervener.generate_conditions``:
``--conditions`` random-direction ablations, each on its own ``--condition-prompts`` prompts, bfloat16, shared
opening): the opening computed once per condition (``Edit.row_key``) against once per row (the same edits with
their ``row_key`` removed, as before 6a672bb), and whether the responses are identical.

A fourth table times forward passes from a clean stem (:mod:`refusal_lens.core.stem`): ``--stem-passes`` passes of
an activation addition at one layer (a quarter, half and three quarters of the way up), bfloat16 shared, each
batch run whole (the baseline) against from the clean residual entering that layer (computed by the first pass,
reused by the rest), and whether the logits are identical bit for bit.

A fifth table times the intervention copy's storage (:mod:`refusal_lens.models.dtype_copy`): a forward pass of every
prompt and a greedy generation of half of them (ablation edit, bfloat16 shared) on the copy in memory (the baseline)
against the copy mapped from ``model.bfloat16.safetensors`` in the model's folder (written there if missing), every
file-mapped weight dropped from the resident set before each (as at a part's opening:
:func:`refusal_lens.infra.mapped_weights.unmap_file_weights`), rounds interleaved; and whether the logits and the
responses are identical.

``--tables`` picks the tables (``dtype,batch,conditions,stems,mapped``).

``--smoke``: a tiny random 2-layer model (bench/smoke.py, no download) and its tiny prompts in a temporary
folder, 8 prompts, 4 new tokens, 1 repeat (seconds).

Usage: .venv/bin/python bench/bench_interventions.py [--prompts 32] [--new-tokens 20] [--repeats 3]
       [--tables dtype,batch,conditions,stems,mapped] [--conditions 8] [--condition-prompts 8] [--stem-passes 5] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from refusal_lens.core.chat import encode_prompt  # noqa: E402
from refusal_lens.config import ModelConfig  # noqa: E402
from refusal_lens.core.direction_edits import ablation_edits, addition_edits  # noqa: E402
from refusal_lens.core.edit import per_condition  # noqa: E402
from refusal_lens.core.intervene import Intervener  # noqa: E402
from refusal_lens.core.stem import Stems  # noqa: E402
from refusal_lens.infra.mapped_weights import unmap_file_weights  # noqa: E402
from refusal_lens.models.dtype_copy import converted_copy, file_backed_copy  # noqa: E402
from refusal_lens.models.loading import load_model  # noqa: E402
from refusal_lens.data.prompts import read_prompts  # noqa: E402


TABLES = ("dtype", "batch", "conditions", "stems", "mapped")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gen-batches", default="16,32,64", help="generation batch sizes to compare")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--conditions", type=int, default=8, help="conditions of the third table")
    parser.add_argument("--condition-prompts", type=int, default=8, help="prompts per condition of the third table")
    parser.add_argument("--stem-passes", type=int, default=5, help="passes per edit layer of the fourth table")
    parser.add_argument("--tables", default=",".join(TABLES), help="which tables (comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and sizes (checks the bench)")
    args = parser.parse_args(argv)
    if unknown := set(args.tables.split(",")) - set(TABLES):
        parser.error(f"--tables {args.tables}: unknown {sorted(unknown)}; allowed: a comma-separated subset of "
                     f"{','.join(TABLES)}")
    if not args.smoke:
        bench(args, read_prompts(None))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smoke

    print(smoke.smoke_note())
    args.prompts, args.new_tokens, args.repeats, args.batch_size, args.gen_batches = 8, 4, 1, 8, "4,8"
    args.conditions, args.condition_prompts, args.stem_passes = 3, 4, 2
    with smoke.scratch("bench_interventions") as folder:
        args.model = str(smoke.tiny_model(folder / "model"))
        bench(args, smoke.tiny_prompts(folder / "data"))
    return 0


def bench(args, all_prompts) -> None:
    torch.set_num_threads(2)
    loaded = load_model(ModelConfig(name=args.model, intervention_dtype="bfloat16"))
    prompts = [encode_prompt(loaded.tokenizer, p.prompt, 256) for p in all_prompts[: args.prompts]]
    edit = ablation_edits(torch.randn(loaded.d_model), loaded.n_layers)
    tables = set(args.tables.split(","))
    if "dtype" in tables:
        dtype_table(args, loaded, prompts, edit)
    if "batch" in tables:
        batch_table(args, loaded, prompts, edit)
    if "conditions" in tables:
        conditions_table(args, loaded, all_prompts)
    if "stems" in tables:
        stems_table(args, loaded, prompts)
    if "mapped" in tables:
        mapped_table(args, loaded, prompts, edit)


def dtype_table(args, loaded, prompts, edit) -> None:
    variants = {f"{dtype} {'shared' if share else 'whole'}": Intervener(
        loaded, args.batch_size, model=loaded.hf_model if dtype == "float32" else loaded.gen_model, share_opening=share)
        for dtype in ("float32", "bfloat16") for share in (False, True)}
    tasks = {"generate (no edit)": lambda iv: iv.generate(prompts, args.new_tokens),
             "generate (ablation)": lambda iv: iv.generate(prompts, args.new_tokens, edit),
             "forward (no edit)": lambda iv: iv.last_logits(prompts),
             "forward (ablation)": lambda iv: iv.last_logits(prompts, edit)}
    times = {(t, v): [] for t in tasks for v in variants}
    for _ in range(args.repeats):
        for t, fn in tasks.items():
            for v, iv in variants.items():
                t0 = time.perf_counter()
                fn(iv)
                times[(t, v)].append(time.perf_counter() - t0)
    n_tok = sum(len(p.ids) for p in prompts)
    print(f"{len(prompts)} sample prompts ({n_tok} prompt tokens, opening {prompts[0].n_opening} tokens each), "
          f"{args.new_tokens} new tokens, batch {args.batch_size}, 2 threads, median of {args.repeats}")
    print(f"{'task':<22}{'variant':<18}{'s':>8}{'x baseline':>12}")
    for t in tasks:
        base = statistics.median(times[(t, "float32 whole")])
        for v in variants:
            m = statistics.median(times[(t, v)])
            print(f"{t:<22}{v:<18}{m:>8.2f}{m / base:>12.2f}")


def batch_table(args, loaded, prompts, edit) -> None:
    sizes = [int(x) for x in args.gen_batches.split(",")]
    gen = {b: [] for b in sizes}
    for _ in range(args.repeats):
        for b in sizes:
            iv = Intervener(loaded, b)
            t0 = time.perf_counter()
            iv.generate(prompts, args.new_tokens, edit)
            gen[b].append(time.perf_counter() - t0)
    print(f"generation with the ablation edit, bfloat16 shared, {len(prompts)} prompts, {args.new_tokens} new tokens")
    print(f"{'generation batch':<18}{'s':>8}{'x first':>10}")
    first = statistics.median(gen[sizes[0]])
    for b in sizes:
        m = statistics.median(gen[b])
        print(f"{b:<18}{m:>8.2f}{m / first:>10.2f}")


def conditions_table(args, loaded, all_prompts) -> None:
    n, k = args.conditions, args.condition_prompts
    texts = [p.prompt for p in all_prompts]
    prompts = [encode_prompt(loaded.tokenizer, texts[i % len(texts)], 256) for i in range(n * k)]
    torch.manual_seed(0)
    conditions = [(prompts[c * k:(c + 1) * k], ablation_edits(torch.randn(loaded.d_model), loaded.n_layers))
                  for c in range(n)]
    owner = [c for c in range(n) for _ in range(k)]
    per_row = [replace(e, row_key=None) for e in per_condition([e for _, e in conditions], owner)]
    iv = Intervener(loaded, n * k)
    variants = {"opening per row (baseline)": lambda: iv.generate(prompts, args.new_tokens, per_row),
                "opening per condition": lambda: [r for rs in iv.generate_conditions(conditions, args.new_tokens)
                                                  for r in rs]}
    times = {v: [] for v in variants}
    out = {}
    for _ in range(args.repeats):
        for v, fn in variants.items():
            t0 = time.perf_counter()
            out[v] = fn()
            times[v].append(time.perf_counter() - t0)
    same = sum(a == b for a, b in zip(*out.values()))
    print(f"generation under {n} conditions (random-direction ablations) x {k} prompts in one batch, bfloat16 shared, "
          f"{args.new_tokens} new tokens, median of {args.repeats}; responses identical {same}/{n * k}")
    print(f"{'variant':<30}{'s':>8}{'x baseline':>12}")
    base = statistics.median(times["opening per row (baseline)"])
    for v in variants:
        m = statistics.median(times[v])
        print(f"{v:<30}{m:>8.2f}{m / base:>12.2f}")


def stems_table(args, loaded, prompts) -> None:
    L = loaded.n_layers
    iv = Intervener(loaded, args.batch_size)
    iv.last_logits(prompts)  # the clean opening cached before anything is timed
    torch.manual_seed(0)
    layers = sorted({max(1, L // 4), max(1, L // 2), max(1, 3 * L // 4)})
    edits = {layer: [addition_edits(torch.randn(loaded.d_model) * (k + 1), layer) for k in range(args.stem_passes)]
             for layer in layers}
    print(f"{args.stem_passes} forward passes of an activation addition at one layer of {L}, {len(prompts)} prompts, "
          f"batch {args.batch_size}, bfloat16 shared, median of {args.repeats}")
    print(f"{'edits from layer':<18}{'variant':<26}{'s':>8}{'x whole':>9}  logits identical")
    for layer in layers:
        times = {"whole (baseline)": [], "from the clean stem": []}
        out = {}
        for _ in range(args.repeats):
            for variant in times:
                stems = Stems() if variant != "whole (baseline)" else None
                t0 = time.perf_counter()
                out[variant] = [iv.last_logits(prompts, e, stems=stems) for e in edits[layer]]
                times[variant].append(time.perf_counter() - t0)
        same = sum(torch.equal(a, b) for a, b in zip(*out.values()))
        base = statistics.median(times["whole (baseline)"])
        for variant, ts in times.items():
            m = statistics.median(ts)
            print(f"{layer:<18}{variant:<26}{m:>8.2f}{m / base:>9.2f}  {same}/{len(edits[layer])}")


def mapped_table(args, loaded, prompts, edit) -> None:
    copies = {"in memory (baseline)": converted_copy(loaded.hf_model, torch.bfloat16).eval(),
              "mapped from the file": file_backed_copy(loaded.hf_model, torch.bfloat16, Path(loaded.source)).eval()}
    ivs = {k: Intervener(loaded, args.batch_size, model=m) for k, m in copies.items()}
    half = prompts[: max(1, len(prompts) // 2)]
    print(f"the bfloat16 copy: forward of {len(prompts)} prompts, generation of {len(half)} x {args.new_tokens} tokens "
          f"(ablation edit, shared opening), weights dropped before each, median of {args.repeats}")
    print(f"{'task':<12}{'variant':<24}{'s':>8}{'x memory':>10}  identical")
    times = {k: {"forward": [], "generation": []} for k in ivs}
    out: dict[str, dict] = {}
    for r in range(args.repeats):
        for k in (list(ivs) if r % 2 == 0 else list(ivs)[::-1]):
            unmap_file_weights([loaded.hf_model, *copies.values()])
            t0 = time.perf_counter()
            logits = ivs[k].last_logits(prompts, edit)
            t1 = time.perf_counter()
            responses = ivs[k].generate(half, args.new_tokens, edit)
            times[k]["forward"].append(t1 - t0)
            times[k]["generation"].append(time.perf_counter() - t1)
            out[k] = {"forward": logits, "generation": responses}
    (a, b) = out.values()
    same = {"forward": torch.equal(a["forward"], b["forward"]), "generation": a["generation"] == b["generation"]}
    for task in ("forward", "generation"):
        base = statistics.median(times["in memory (baseline)"][task])
        for k in ivs:
            m = statistics.median(times[k][task])
            print(f"{task:<12}{k:<24}{m:>8.2f}{m / base:>10.2f}  {same[task]}")


if __name__ == "__main__":
    raise SystemExit(main())
