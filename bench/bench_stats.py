"""Cost of one circuit similarity test (`refusal_lens.core.stats.similarity_test`) against the direct
permutation test in node space, measured in the same run.

Baseline: the permutation null computed the direct way, every permuted group mean formed in node space
by one ``[permutations, prompts] @ [prompts, nodes]`` matrix product and the cosine taken there (the
permutation part only). ``similarity_test`` does the whole test (permutations, ceilings, interval,
verdict) from the prompts' Gram matrix. Rounds interleaved, medians.

``--smoke``: one tiny shape (10 prompts per group x 200 nodes), 50 permutations, 2 repeats (under a second).

Usage: .venv/bin/python bench/bench_stats.py [--repeats 5] [--permutations 1000] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from refusal_lens.core.stats import similarity_test


def node_space_null(ea: np.ndarray, eb: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    pooled = np.concatenate([ea, eb])
    n, n_a = len(pooled), len(ea)
    members = np.argsort(rng.random((n_perm, n)), axis=1)[:, :n_a]
    in_a = np.zeros((n_perm, n))
    np.put_along_axis(in_a, members, 1.0, axis=1)
    mean_a = in_a @ pooled / n_a
    mean_b = (1.0 - in_a) @ pooled / (n - n_a)
    return (mean_a * mean_b).sum(1) / np.linalg.norm(mean_a, axis=1) / np.linalg.norm(mean_b, axis=1)


SHAPES = [(50, 5000), (20, 15000), (200, 15000)]
SMOKE_SHAPES = [(10, 200)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, few permutations (checks the bench)")
    args = parser.parse_args(argv)
    shapes = SHAPES
    if args.smoke:
        shapes, args.repeats, args.permutations = SMOKE_SHAPES, 2, 50
        print("smoke run (tiny sizes): checks that the bench runs; its timings mean nothing")
    print(f"{args.permutations} permutations, median of {args.repeats}, rounds interleaved")
    print("| prompts per group x nodes | similarity_test s | node-space permutations s | x baseline |")
    print("|---|---|---|---|")
    for n, nodes in shapes:
        rng = np.random.default_rng(0)
        mean = np.zeros(nodes)
        mean[rng.choice(nodes, 50, replace=False)] = rng.normal(0, 1, 50)
        ea, eb = mean + rng.normal(size=(n, nodes)), mean + rng.normal(size=(n, nodes))
        ours, base = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            similarity_test(ea, eb, n_permutations=args.permutations, rng=r)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            node_space_null(ea, eb, args.permutations, np.random.default_rng(r))
            base.append(time.perf_counter() - t0)
        o, b = statistics.median(ours), statistics.median(base)
        print(f"| {n} x {nodes} | {o:.4f} | {b:.4f} | {o / b:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
