"""What durable commits cost the collect stage's shard writes, as ratios against a baseline measured in
the same run.

Variants, each writing the same Arrow record batches (float16 activations of width 896, the embedded
Qwen's d_model) as ``--files`` shard files of ``--mb`` MiB into a fresh folder:

1. baseline: Arrow stream to a temporary file, ``os.replace`` (the commit before durable.py, no fsync);
2. durable: ``write_arrow_file`` (temporary file, fsync, rename, fsync of the folder);
3. durable + record: as 2, plus the size and SHA-256 that collect records per shard file (the file is
   read back from the page cache).

``--smoke``: 2 files of 1 MiB, 2 repeats, in a temporary folder (under a second).

Usage: .venv/bin/python bench/bench_durable.py [--mb 32] [--files 4] [--repeats 3] [--dir DIR] [--smoke]
Rounds of all variants are interleaved so machine noise hits each alike; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from refusal_lens.infra import durable
from refusal_lens.activations.store import hook_features, hook_record_batch, write_arrow_file

WIDTH = 896
HOOK = "blocks.12.hook_resid_post"


def batches(mb: int) -> tuple[list[pa.RecordBatch], pa.Schema]:
    features = hook_features(HOOK, WIDTH, "float16")
    rows = (mb << 20) // (WIDTH * 2)
    values = np.random.default_rng(0).standard_normal((rows, WIDTH)).astype(np.float16)
    meta = {"prompt_id": ["p:0"] * rows, "position": list(range(rows)), "is_response": [False] * rows,
            "category": ["hate"] * rows, "label": ["safe"] * rows, "refused": [False] * rows,
            "refusal_score": [0.0] * rows}
    batch = hook_record_batch(features, HOOK, values, np.zeros(rows, dtype=np.int64), meta)
    return [batch], features.arrow_schema


def plain(path: Path, data: list[pa.RecordBatch], schema: pa.Schema) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for b in data:
            writer.write_batch(b)
    os.replace(tmp, path)


def with_record(path: Path, data: list[pa.RecordBatch], schema: pa.Schema) -> None:
    write_arrow_file(path, data, schema)
    durable.record(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32, help="MiB per shard file")
    parser.add_argument("--files", type=int, default=4, help="shard files per round and variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder on this disk)")
    parser.add_argument("--smoke", action="store_true", help="2 files of 1 MiB, 2 repeats (checks the bench)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.mb, args.files, args.repeats = 1, 2, 2
        print("smoke run (tiny sizes): checks that the bench runs; its timings mean nothing")
    data, schema = batches(args.mb)
    variants = {"os.replace, no fsync (baseline)": plain, "durable (fsync file + folder)": write_arrow_file,
                "durable + size and sha256": with_record}
    times: dict[str, list[float]] = {k: [] for k in variants}
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_durable."))
    try:
        for _ in range(args.repeats):
            for name, write in variants.items():
                folder = root / "shards"
                folder.mkdir()
                t0 = time.perf_counter()
                for i in range(args.files):
                    write(folder / f"shard-000-{i:05d}.arrow", data, schema)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["os.replace, no fsync (baseline)"])
    total_mb = args.mb * args.files
    print(f"{args.files} shard files x {args.mb} MiB per round, median of {args.repeats}")
    print(f"{'variant':<36}{'s':>8}{'MiB/s':>9}{'x baseline':>12}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<36}{t:>8.2f}{total_mb / t:>9.0f}{t / base:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
