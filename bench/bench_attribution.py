"""Cost of attributing every node of every spliced SAE for one batch (AtP, IG) against exact patching of
the same nodes, with their agreement, measured in the same run.

Uses a finished run's model, SAEs and mean baseline (default: the main job's `results/default`). For one
batch of prompts: AtP (one forward + backward for all nodes), IG (`--ig-steps` per hook), and exact
patching of `--nodes` sampled nodes (their error node, top nodes by |AtP| and random active ones per
hook, as in the discover stage's validation), timed per node; the exact cost of all nodes is that time
x the node count (running it would take hours). Prints seconds, the speed-up of AtP and IG over exact
patching of all nodes, and the Pearson / Spearman agreement of each with exact patching on the sample.

Usage: .venv/bin/python bench/bench_attribution.py [--run results/default] [--prompts 4] [--nodes 6]
       [--ig-steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from refusal_lens.core.chat import encode_prompt  # noqa: E402
from refusal_lens.stages.circuits.attribution import RefusalScoreMetric, Runner, fixed_baseline, frozen_parameters  # noqa: E402
from refusal_lens.stages.circuits.nodes import NodeSpace, make_batch  # noqa: E402
from refusal_lens.stages.circuits.stage import load_saes, reference_means  # noqa: E402
from refusal_lens.stages.circuits.validate import pearson, sample_agreement_nodes, spearman  # noqa: E402
from refusal_lens.config import load_config  # noqa: E402
from refusal_lens.models.loading import load_model  # noqa: E402
from refusal_lens.core.refusal import RefusalTokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "results/default"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=6, help="sampled nodes per hook (plus its error node)")
    parser.add_argument("--ig-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    run = Path(args.run)
    cfg = load_config(run / "circuits" / "config.yaml")
    torch.set_num_threads(cfg.circuits.num_threads)
    space_info = json.loads((run / "circuits" / "space.json").read_text())
    manifest = json.loads((run / "activations" / "manifest.json").read_text())
    loaded = load_model(cfg.model)
    hooks = space_info["hooks"]
    saes = load_saes(run / "saes", hooks, loaded.device)
    space = NodeSpace(tuple(hooks), saes, 1)
    prompts = json.loads((run / "circuits" / "prompts.json").read_text())
    import datasets

    texts = {r["prompt_id"]: r["prompt"] for r in datasets.load_from_disk(str(run / "activations" / "prompts")).to_list()}
    reference = {p["prompt_id"] for p in prompts if p["label"] == "safe" and not p["refused"]}
    special = list(loaded.tokenizer.all_special_ids)
    base = fixed_baseline(reference_means(saes, run / "activations", hooks, reference, space_info["site_from"], special))
    chosen = [p for p in prompts if p["refused"]][: args.prompts]
    seqs = [encode_prompt(loaded.tokenizer, texts[p["prompt_id"]], cfg.inference.max_prompt_tokens).ids for p in chosen]
    batch = make_batch(seqs, list(range(len(seqs))), loaded.tokenizer.pad_token_id, site_from=space_info["site_from"],
                       skip_token_ids=special, window=1)
    runner = Runner(loaded.model, space, RefusalScoreMetric(RefusalTokens.from_dict(manifest["refusal_tokens"])))
    with frozen_parameters(loaded.model):
        m, values = runner.clean(batch)
        t_fwd, _ = timed(lambda: runner.clean(batch), args.repeats)
        t_atp, atp = timed(lambda: runner.atp(batch, values, base), args.repeats)
        t_ig, ig = timed(lambda: runner.ig(batch, values, base, args.ig_steps), 1)
        nodes = sample_agreement_nodes(space, atp.mean(0), args.nodes, np.random.default_rng(0))
        t0 = time.perf_counter()
        exact = runner.exact(batch, base, nodes, m).mean(0).numpy()
        t_node = (time.perf_counter() - t0) / len(nodes)
    t_exact_all = t_node * space.n_nodes
    pick = ([s for s, _ in nodes], [i for _, i in nodes])
    est = {"atp": atp.mean(0)[pick].numpy(), "ig": ig.mean(0)[pick].numpy()}
    is_err = np.asarray([space.locate(i)[1] == space.d_sae(space.locate(i)[0]) for _, i in nodes])
    print(f"run {run}: {len(hooks)} hooks, {space.n_nodes} nodes, batch of {len(chosen)} prompts "
          f"({int(batch.mask.sum())} tokens), {torch.get_num_threads()} threads")
    print(f"clean forward (nodes split): {t_fwd:.2f} s; exact patching: {t_node:.2f} s per node "
          f"-> {t_exact_all / 3600:.1f} h for all {space.n_nodes} nodes (extrapolated)")
    print(f"{'method':<8}{'seconds':>9}{'speed-up vs exact (all nodes)':>32}{'pearson':>10}{'spearman':>10}"
          f"{'pearson features':>18}{'pearson errors':>16}")
    for name, t in (("atp", t_atp), ("ig", t_ig)):
        e = est[name]
        print(f"{name:<8}{t:>9.2f}{t_exact_all / t:>32.0f}{pearson(e, exact):>10.3f}{spearman(e, exact):>10.3f}"
              f"{pearson(e[~is_err], exact[~is_err]):>18.3f}{pearson(e[is_err], exact[is_err]):>16.3f}")
    print(f"agreement on {len(nodes)} sampled nodes ({int(is_err.sum())} error nodes); IG: {args.ig_steps} steps per hook")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
