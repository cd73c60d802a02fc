"""Collection overhead and generation throughput, as ratios against baselines measured in the same run.

1. Collecting all ``resid_post`` layers (run_with_cache + position extraction + Arrow shard writes to
   disk) versus a bare HF forward pass (default sdpa attention) over the same batches.
   Target: <= 1.10x. Intermediate variants show where the time goes.
2. Generation (the collect stage's responses pass: ``Intervener(loaded).generate``, as
   :func:`refusal_lens.stages.collect.responses.judge_batch` calls it) versus HF ``generate`` on a freshly
   loaded model, same prompts and settings. Target: >= 0.9x throughput.

The collect variants write through the stage's own :class:`~refusal_lens.stages.collect.shards.ShardWriter`
into a scratch run folder's ``activations/`` (:class:`refusal_lens.run.folder.RunFolder`).

``--smoke``: a tiny random 2-layer model (bench/smoke.py, no download) and its tiny prompts in a temporary
folder, 8 prompts in batches of 4, 4 new tokens, 1 repeat (seconds).

Usage: .venv/bin/python bench/bench_collect.py [--model NAME] [--prompts N] [--repeats R] [--smoke]
Rounds of all variants are interleaved so machine noise hits each alike; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from refusal_lens.core.chat import encode_prompt, left_pad, render  # noqa: E402
from refusal_lens.core.intervene import Intervener  # noqa: E402
from refusal_lens.stages.collect.extraction import BatchOutput, CollectStats, forward_and_extract  # noqa: E402
from refusal_lens.stages.collect.shards import ShardWriter  # noqa: E402
from refusal_lens.config import InferenceConfig, ModelConfig  # noqa: E402
from refusal_lens.infra.storage_estimate import measure_hook_widths  # noqa: E402
from refusal_lens.core.hooks import resolve_hooks  # noqa: E402
from refusal_lens.models.loading import load_hf_model, load_model  # noqa: E402
from refusal_lens.data.prompts import read_prompts  # noqa: E402
from refusal_lens.core.refusal import family_refusal_tokens  # noqa: E402
from refusal_lens.run.folder import RunFolder  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--only", choices=["collect", "generate"], help="run one of the two benchmarks")
    ap.add_argument("--smoke", action="store_true", help="tiny random model and sizes (checks the bench)")
    args = ap.parse_args(argv)
    if not args.smoke:
        bench(args, read_prompts(None))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smoke

    print(smoke.smoke_note())
    args.prompts, args.batch_size, args.repeats, args.gen_prompts, args.max_new_tokens = 8, 4, 1, 4, 4
    with smoke.scratch("bench_collect") as folder:
        args.model = str(smoke.tiny_model(folder / "model"))
        bench(args, smoke.tiny_prompts(folder / "data"))
    return 0


def bench(args, all_prompts) -> None:
    loaded = load_model(ModelConfig(name=args.model, activation_layers=("residuals_all",)))
    hf_plain = load_hf_model(loaded.source, torch.float32, torch.device("cpu"))  # the baseline: HF defaults (sdpa)
    hf_eager = load_hf_model(loaded.source, torch.float32, torch.device("cpu"), "eager")
    prompts = all_prompts[: args.prompts]
    encoded = [encode_prompt(loaded.tokenizer, p.prompt, 256) for p in prompts]
    hooks = resolve_hooks(loaded.model, ["residuals_all"])
    widths = measure_hook_widths(loaded.model, hooks)
    tokens = family_refusal_tokens(loaded.tokenizer, render(loaded.tokenizer, "Hello"), loaded.family.refusal_words)
    bs = args.batch_size
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    padded = [left_pad([encoded[j].ids for j in b], loaded.tokenizer.pad_token_id) for b in batches]
    n_tokens = sum(int(m.sum()) for _, m in padded)
    empty = [[] for _ in range(bs)]

    def hf_forward(model):
        with torch.no_grad():
            for ids, mask in padded:
                model(input_ids=ids, attention_mask=mask)

    def bridge_forward():
        with torch.no_grad():
            for ids, mask in padded:
                loaded.model(ids, attention_mask=mask)

    written = {}

    def collect(positions: str):
        inf = InferenceConfig(positions=positions, storage_dtype="float16")
        with tempfile.TemporaryDirectory() as tmp:
            files = RunFolder(tmp).paths.activations  # a scratch run folder's activations/
            writer = ShardWriter(files, hooks, widths, "float16", 0, 1 << 40)
            for b in batches:
                ps, es = [prompts[j] for j in b], [encoded[j] for j in b]
                scores, values, tids, meta, _ = forward_and_extract(loaded, ps, es, empty[: len(b)], hooks, inf, tokens)
                meta["refused"] = [False] * len(tids)
                meta["refusal_score"] = [0.0] * len(tids)
                writer.add(BatchOutput([_row(p) for p in ps], values, tids, meta, CollectStats()))
            written[positions] = writer.flush(0, len(prompts))

    variants = {
        "HF forward, sdpa (baseline)": lambda: hf_forward(hf_plain),
        "HF forward, eager": lambda: hf_forward(hf_eager),
        "bridge forward": bridge_forward,
        f"collect last, {len(hooks)} resid_post + disk": lambda: collect("last"),
        "collect all positions + disk": lambda: collect("all"),
    }
    if args.only == "generate":
        variants = {}
    for fn in variants.values():  # warm-up
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.repeats if variants else 0):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    if variants:
        _report_collection(args, times, written, len(prompts), n_tokens, bs)
    if args.only != "collect":
        _bench_generation(args, loaded, hf_plain, encoded, bs)


def _report_collection(args, times, written, n_prompts, n_tokens, bs) -> None:
    base = statistics.median(times["HF forward, sdpa (baseline)"])
    print(f"\n## Collection ({args.model}, {n_prompts} prompts, {n_tokens} tokens, batches of {bs}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats})")
    print("| variant | s | prompts/s | tokens/s | MB/s written | x baseline |\n|---|---|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        mb = written.get("last" if "last" in name else "all", 0) / 1e6 / t if name.startswith("collect") else 0
        print(f"| {name} | {t:.3f} | {n_prompts / t:.1f} | {n_tokens / t:.0f} | "
              f"{mb:.1f} | {t / base:.2f} |")


def _bench_generation(args, loaded, hf_plain, encoded, bs) -> None:
    gen = [encoded[i] for i in range(min(args.gen_prompts, len(encoded)))]
    gen_batches = [gen[i : i + bs] for i in range(0, len(gen), bs)]

    intervener = Intervener(loaded, bs)  # the collect stage's responses pass (stages/collect/responses.py)

    def ours():
        return sum(len(r) for b in gen_batches for r in intervener.generate(b, args.max_new_tokens))

    def hf_generate():
        n = 0
        with torch.no_grad():
            for b in gen_batches:
                ids, mask = left_pad([e.ids for e in b], loaded.tokenizer.pad_token_id)
                out = hf_plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                        do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
                n += out.shape[0] * (out.shape[1] - ids.shape[1])
        return n

    ours()
    g = {"HF generate (baseline)": [], "collect's Intervener.generate": []}
    for _ in range(args.repeats):
        g["HF generate (baseline)"].append(timed(hf_generate))
        g["collect's Intervener.generate"].append(timed(ours))
    gbase = statistics.median(g["HF generate (baseline)"])
    print(f"\n## Generation ({len(gen)} prompts, max_new_tokens {args.max_new_tokens}, batches of {bs}, "
          f"median of {args.repeats})")
    print("| variant | s | prompts/s | throughput x baseline |\n|---|---|---|---|")
    for name, ts in g.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {len(gen) / t:.2f} | {gbase / t:.2f} |")


def _row(p) -> dict:
    return {"prompt_id": p.id, "prompt": p.prompt, "category": p.category, "label": p.label, "source": p.source,
            "response": "", "refused": False, "refusal_score": 0.0, "n_prompt_tokens": 0, "n_response_tokens": 0,
            "truncated": False}


if __name__ == "__main__":
    raise SystemExit(main())
