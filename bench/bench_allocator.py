"""The C allocator's policy (refusal_lens.infra.freed_memory.keep_freed_memory) on intervention passes.

Every forward pass allocates and frees the same activations again; by default glibc maps large ones with ``mmap``
and trims its heap, so each pass faults the same pages in again. This times, in two fresh processes (mallopt is
process-wide and cannot be undone), the default allocator (the baseline) and ``keep_freed_memory()`` called before
the model loads, on the same sample prompts (bfloat16, shared opening, the ablation edit): one forward pass
(``Intervener.last_logits``) and a greedy generation of ``--new-tokens`` tokens, median of ``--repeats`` after one
warm-up each. Minor page faults (``ru_minflt``) of the timed passes and the process's peak RSS are printed with
the times; ratios are against the default of the same run.

``--smoke``: a tiny random 2-layer model (bench/smoke.py, no download), 8 prompts, 4 new tokens, 1 repeat (seconds).

Usage: .venv/bin/python bench/bench_allocator.py [--prompts 64] [--new-tokens 20] [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

POLICIES = ("default", "keep")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--smoke", action="store_true", help="tiny random model and sizes (checks the bench)")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)  # one measured process
    parser.add_argument("--prompt-folder", help=argparse.SUPPRESS)  # the smoke's OR-Bench folder
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    if not args.smoke:
        compare(args, [])
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smoke

    print(smoke.smoke_note())
    with smoke.scratch("bench_allocator") as folder:
        model = smoke.tiny_model(folder / "model")
        bench, _ = smoke.tiny_data(folder / "data")
        args.prompts, args.new_tokens, args.repeats, args.batch_size = 8, 4, 1, 8
        compare(args, ["--model", str(model), "--prompt-folder", str(bench)])
    return 0


def compare(args, extra: list[str]) -> None:
    """Run one child per policy (the default first) and print their table."""
    sizes = ["--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
             "--batch-size", str(args.batch_size)]
    if not extra:
        extra = ["--model", args.model]
    results = {}
    for policy in POLICIES:
        proc = subprocess.run([sys.executable, __file__, "--child", policy, *sizes, *extra], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the {policy} child exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        results[policy] = json.loads(proc.stdout.strip().splitlines()[-1])
    first = results["default"]
    print(f"{first['prompts']} sample prompts ({first['prompt_tokens']} prompt tokens), {args.new_tokens} new tokens, "
          f"batch {args.batch_size}, bfloat16 shared opening, ablation edit, 2 threads, median of {args.repeats}; "
          f"keep: mallopt taken = {results['keep']['taken']}")
    print(f"{'task':<14}{'allocator':<11}{'s':>8}{'x default':>11}{'minor faults':>14}")
    for task in ("forward", "generate"):
        base = first[task]["s"]
        for policy in POLICIES:
            r = results[policy][task]
            print(f"{task:<14}{policy:<11}{r['s']:>8.2f}{r['s'] / base:>11.2f}{r['faults']:>14,}")
    print(f"{'peak RSS MiB':<25}" + "".join(f"{p} {results[p]['peak_rss_mib']:,.0f}   " for p in POLICIES))


def measure(args) -> dict:
    """In this (fresh) process: set the policy, load the model, time both tasks; the numbers as a dict."""
    from refusal_lens.infra.freed_memory import keep_freed_memory

    taken = keep_freed_memory() if args.child == "keep" else False  # before torch allocates anything large
    import torch

    from refusal_lens.config import ModelConfig
    from refusal_lens.core.chat import encode_prompt
    from refusal_lens.core.direction_edits import ablation_edits
    from refusal_lens.core.intervene import Intervener
    from refusal_lens.data.prompts import read_prompts
    from refusal_lens.models.loading import load_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(name=args.model, intervention_dtype="bfloat16"))
    source = read_prompts(Path(args.prompt_folder) if args.prompt_folder else None)
    prompts = [encode_prompt(loaded.tokenizer, p.prompt, 256) for p in source[: args.prompts]]
    edit = ablation_edits(torch.randn(loaded.d_model), loaded.n_layers)
    iv = Intervener(loaded, args.batch_size)
    tasks = {"forward": lambda: iv.last_logits(prompts, edit),
             "generate": lambda: iv.generate(prompts, args.new_tokens, edit)}
    out = {"prompts": len(prompts), "prompt_tokens": sum(len(p.ids) for p in prompts), "taken": taken}
    for name, fn in tasks.items():
        fn()  # warm-up: the first pass allocates what later ones may reuse
        seconds, faults = [], []
        for _ in range(args.repeats):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        out[name] = {"s": statistics.median(seconds), "faults": int(statistics.median(faults))}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


if __name__ == "__main__":
    raise SystemExit(main())
