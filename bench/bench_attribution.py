"""Cost of attributing every node of every spliced SAE for one batch (AtP, IG) against exact patching of
the same nodes, with their agreement, measured in the same run.

Uses a finished run's model, SAEs and mean baseline (default: the main job's `results/default`; its collect
and train-saes stages are enough), read through :class:`refusal_lens.run.folder.RunFolder` and set up as the
discover stage does (:func:`refusal_lens.stages.circuits.inputs.load_inputs` without the direction: the
spliced hooks of ``circuits.hooks`` or every SAE passing the bar, their node space, the per-class baseline). For one batch of refused toxic discovery prompts: AtP (one
forward + backward for all nodes), IG (`--ig-steps` per hook), and exact patching of sampled nodes (per hook:
its error node, the top `--nodes`/2 features by |AtP| and as many random active ones, as in the discover
stage's agreement check), timed per node; the exact cost of all nodes is that time x the node count (running
it would take hours). Prints seconds, the speed-up of AtP and IG over exact patching of all nodes, and the
Pearson / Spearman agreement of each with exact patching on the sample.

``--smoke``: a tiny run (bench/smoke.py: random 2-layer model, collect + train-saes, seconds) in
a temporary folder, 2 prompts, 2 IG steps, 1 repeat. Random weights refuse nothing: the batch then takes
toxic discovery prompts whatever the model did (and says so).

Usage: .venv/bin/python bench/bench_attribution.py [--run results/default] [--prompts 4] [--nodes 6]
       [--ig-steps 10] [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from refusal_lens.config import load_config  # noqa: E402
from refusal_lens.core.intervene import frozen, make_batch  # noqa: E402
from refusal_lens.models.loading import load_model  # noqa: E402
from refusal_lens.run.folder import RunFolder  # noqa: E402
from refusal_lens.core.stats import pearson, spearman  # noqa: E402
from refusal_lens.stages.circuits.agreement import sample_features  # noqa: E402
from refusal_lens.stages.circuits.attribution import Runner  # noqa: E402
from refusal_lens.stages.circuits.baselines import means_for  # noqa: E402
from refusal_lens.stages.circuits.inputs import circuit_hooks  # noqa: E402
from refusal_lens.stages.circuits.nodes import NodeSpace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def sample_nodes(space, atp_mean: np.ndarray, per_hook: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """Per hook: ``("error", k)`` and the top ``per_hook // 2`` and as many random active features
    (``("feature", flat index)``)."""
    nodes = []
    for k, hook in enumerate(space.hooks):
        off, n = space.offset(hook), space.d_sae(hook)
        part = atp_mean[off : off + n]
        top, rand = sample_features(space, part, np.flatnonzero(part != 0), max(per_hook // 2, 1), rng)
        nodes += [("error", k)] + [("feature", off + i) for i in top + rand]
    return nodes


def fmt(x: float | None, width: int) -> str:
    return f"{x:>{width}.3f}" if x is not None else f"{'-':>{width}}"


def bench(run: RunFolder, args) -> None:
    path = run.paths.circuits.config
    cfg = load_config(path) if path.is_file() else run.config()  # the discover stage's config, else the run's
    torch.set_num_threads(cfg.circuits.num_threads)
    data = run.collected()
    hooks = circuit_hooks(cfg, run, int(data.manifest["n_layers"]))
    loaded = load_model(cfg.model)
    # as stages.circuits.inputs.load_inputs (the direction aside: attribution does not use it)
    n_post = int(data.manifest.get("post_instruction_tokens") or max(r["n_post_instruction_tokens"] for r in data.rows))
    space = NodeSpace(tuple(hooks), run.saes(hooks, loaded.device), n_post)
    means = means_for(space, run, data, cfg.circuits.reference, cfg.circuits.baseline)
    runner = Runner(loaded.model, space, data.tokens, means, cfg.circuits.baseline)
    rows = data.split_rows("discovery", "toxic", refused=True)
    note = "refused toxic discovery prompts"
    if not rows:
        rows, note = data.split_rows("discovery", "toxic"), "toxic discovery prompts (the model refused none)"
    chosen = rows[: args.prompts]
    enc = data.encoded(loaded.tokenizer, cfg.inference.max_prompt_tokens, chosen)
    batch = make_batch(enc, chosen, loaded.tokenizer.pad_token_id, device=runner.device)
    with frozen(loaded.model):
        m, values = runner.clean(batch)
        t_fwd, _ = timed(lambda: runner.clean(batch), args.repeats)
        t_atp, atp = timed(lambda: runner.atp(batch, values), args.repeats)
        t_ig, ig = timed(lambda: runner.ig(batch, values, args.ig_steps), 1)
        nodes = sample_nodes(space, atp.features.sum(1).mean(0).numpy(), args.nodes, np.random.default_rng(0))
        t0 = time.perf_counter()
        exact = np.asarray([float((runner.exact_error(batch, m, i) if kind == "error"
                                   else runner.exact_feature(batch, m, i)).mean()) for kind, i in nodes])
        t_node = (time.perf_counter() - t0) / len(nodes)
    n_nodes = space.n_features + len(space.hooks)
    t_exact_all = t_node * n_nodes

    def estimate(e) -> np.ndarray:
        feats, errs = e.features.sum(1).mean(0), e.errors.mean(0)
        return np.asarray([float(errs[i] if kind == "error" else feats[i]) for kind, i in nodes])

    est = {"atp": estimate(atp), "ig": estimate(ig)}
    is_err = np.asarray([kind == "error" for kind, _ in nodes])
    print(f"run {run.root}: {len(hooks)} hooks, {n_nodes} nodes, batch of {len(chosen)} {note} "
          f"({int(batch.mask.sum())} tokens), {torch.get_num_threads()} threads")
    print(f"clean forward (nodes split): {t_fwd:.2f} s; exact patching: {t_node:.2f} s per node "
          f"-> {t_exact_all / 3600:.1f} h for all {n_nodes} nodes (extrapolated)")
    print(f"{'method':<8}{'seconds':>9}{'speed-up vs exact (all nodes)':>32}{'pearson':>10}{'spearman':>10}"
          f"{'pearson features':>18}{'pearson errors':>16}")
    for name, t in (("atp", t_atp), ("ig", t_ig)):
        e = est[name]
        print(f"{name:<8}{t:>9.2f}{t_exact_all / t:>32.0f}{fmt(pearson(e, exact), 10)}{fmt(spearman(e, exact), 10)}"
              f"{fmt(pearson(e[~is_err], exact[~is_err]), 18)}{fmt(pearson(e[is_err], exact[is_err]), 16)}")
    print(f"agreement on {len(nodes)} sampled nodes ({int(is_err.sum())} error nodes); IG: {args.ig_steps} steps per hook")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "results/default"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=6, help="sampled features per hook (plus its error node)")
    parser.add_argument("--ig-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny run in a temporary folder (checks the bench)")
    args = parser.parse_args(argv)
    if not args.smoke:
        bench(RunFolder(args.run), args)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smoke

    print(smoke.smoke_note())
    args.prompts, args.nodes, args.ig_steps, args.repeats = 2, 2, 2, 1
    with smoke.scratch("bench_attribution") as folder:
        bench(smoke.tiny_run(folder, ["collect", "train-saes"]), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
