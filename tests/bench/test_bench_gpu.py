"""bench/bench_gpu.py --tiny on the CPU: the collect, sae and discover parts run end to end and write
their JSON (the pipeline part runs `refusal-lens run` like tests/test_pipeline.py and takes minutes here;
it is run by hand, see bench/README.md). Timings are not asserted; correctness checks of the run are."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_gpu", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_runs_and_reports(tmp_path, capsys):
    bench = load_bench()
    assert bench.main([str(tmp_path / "out"), "--tiny", "--parts", "collect,sae,discover",
                       "--scratch", str(tmp_path / "scratch")]) == 0
    doc = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert doc["meta"]["parts"] == ["collect", "sae", "discover"] and doc["meta"]["device"] == "cpu"
    collect = {r["variant"]: r for r in doc["parts"]["collect"]}
    timed = [r for r in collect.values() if r["ratio"] is not None]
    assert len(timed) == 7 and all(len(r["times_s"]) == bench.TINY.repeats and r["ms"] > 0 for r in timed)
    assert collect["HF forward, sdpa (bare)"]["ratio"] == 1.0
    assert collect["check: hf_hooks == HF hidden states (fp16, layers 0-30)"]["equal"] is True
    assert collect["check: hf_hooks (sdpa) vs bridge (eager-like), max relative L2 over hooks"]["relative_error"] < 1e-2
    sae = doc["parts"]["sae"]
    # a timing difference (long minus short run): its sign is wall-clock noise at tiny shapes, so only its
    # reporting is checked, never its value
    assert math.isfinite(sae[0]["seconds_per_step"]) and [r["note"] for r in sae[1:3]] == ["skipped: needs CUDA"] * 2
    assert (sae[0]["ratio"] == 1.0) == (sae[0]["seconds_per_step"] > 0)
    discover = {r["variant"].split(" (")[0]: r for r in doc["parts"]["discover"]}
    assert "finite: True" in discover["one batch"]["note"]
    assert not any(r["variant"] == "FAILED" for rows in doc["parts"].values() for r in rows)
    out = capsys.readouterr().out
    assert "| collect | TL bridge run_with_cache |" in out and "| discover | one batch" in out
    assert not any((tmp_path / "scratch").glob("collect-*"))  # shard folders are removed after each timing
    with pytest.raises(SystemExit) as info:
        bench.main([str(tmp_path / "o2"), "--tiny", "--parts", "collect,gpu"])
    assert info.value.code == 2 and "--parts: unknown ['gpu']" in capsys.readouterr().err
