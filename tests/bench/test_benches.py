"""Every bench (``bench/bench_*.py``, found by glob) runs in its ``--smoke`` mode: a subprocess on a tiny random model
(bench/smoke.py, no download, seconds) that exits 0 and prints its measured table. A bench missing from
:data:`MEASURED` (a new bench) or without ``--smoke`` fails here. Timings are never asserted (a smoke run's mean
nothing); the lines checked are ones a bench prints only once it has measured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted((ROOT / "bench").glob("bench_*.py"))
NUM = r"-?[\d.]+"

#: per bench, regexes (multiline) of its table: the header or baseline row, and a measured ratio row
MEASURED: dict[str, list[str]] = {
    "bench_allocator": [r"^task\s+allocator\s+s\s+x default\s+minor faults$", rf"^forward\s+default\s+{NUM}\s+1\.00\s",
                        rf"^generate\s+keep\s+{NUM}\s+{NUM}\s+[\d,]+$"],
    "bench_attribution": [r"^method\s+seconds\s+speed-up vs exact \(all nodes\)",
                          rf"^atp\s+{NUM}\s+{NUM}\s", rf"^ig\s+{NUM}\s+{NUM}\s"],
    "bench_collect": [rf"^\| HF forward, sdpa \(baseline\) \| {NUM} \|.* \| 1\.00 \|$",
                      rf"^\| collect all positions \+ disk \| {NUM} \|.* \| {NUM} \|$",
                      rf"^\| collect's Intervener\.generate \| {NUM} \| {NUM} \| {NUM} \|$"],
    "bench_durable": [r"^variant\s+s\s+MiB/s\s+x baseline$", rf"^durable \+ size and sha256\s+{NUM}\s+{NUM}\s+{NUM}$"],
    "bench_gpu": [r"^\| part \| variant \| ms \| ratio \| note \|$", rf"^\| sae \| TopK .*fp32 \| {NUM} \| 1\.00 \|"],
    "bench_interventions": [r"^task\s+variant\s+s\s+x baseline$", rf"^forward \(ablation\)\s+bfloat16 shared\s+{NUM}\s+{NUM}$",
                            r"responses identical 12/12$", rf"^opening per row \(baseline\)\s+{NUM}\s+1\.00$",
                            rf"^opening per condition\s+{NUM}\s+{NUM}$",
                            rf"^1\s+whole \(baseline\)\s+{NUM}\s+1\.00  2/2$",
                            rf"^1\s+from the clean stem\s+{NUM}\s+{NUM}  2/2$",
                            rf"^forward\s+in memory \(baseline\)\s+{NUM}\s+1\.00  True$",
                            rf"^generation\s+mapped from the file\s+{NUM}\s+{NUM}  True$"],
    "bench_main_job": [r"^stage\s+seconds\s+share of budget$", rf"^analyze\s+{NUM}\s+{NUM}$", rf"^total\s+{NUM}\s+{NUM}",
                       r"^generation and interventions ran in (float32|bfloat16|float16) ",
                       r"^\| stage \| part \| seconds \| forward positions \|",
                       rf"^\| direction \| evaluation on test \(generation\) \| {NUM} \| [\d,]+ \| [\d,]+ \| [1-9][\d,]* \| "
                       rf"{NUM} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|$"],  # ... floor s, x floor, RSS at end, peak so far,
                                                                 # peak in the part
    "bench_sae_training": [rf"^\| in-memory tensor \(baseline\) \| {NUM} \| {NUM} \| 1\.00 \|$",
                           rf"^\| from disk \(Arrow, memory-mapped\) \| {NUM} \| {NUM} \| {NUM} \|$",
                           rf"^\| SAE-Lens LanguageModelSAETrainingRunner \(runs the model\) \| {NUM} \|"],
    "bench_stats": [r"^\| prompts per group x nodes \|", rf"^\| 10 x 200 \| {NUM} \| {NUM} \| {NUM} \|$"],
}


def smoke_command(path: Path, tmp_path: Path) -> list[str]:
    if path.stem == "bench_gpu":  # its out folder; one light part (tests/bench/test_bench_gpu.py runs three)
        return [sys.executable, str(path), str(tmp_path / "out"), "--smoke", "--parts", "sae",
                "--scratch", str(tmp_path / "scratch")]
    return [sys.executable, str(path), "--smoke"]


def test_benches_are_found():
    assert {p.stem for p in BENCHES} >= {"bench_attribution", "bench_collect", "bench_gpu", "bench_main_job"}


@pytest.mark.parametrize("path", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_smoke_runs_and_measures(path: Path, tmp_path):
    assert path.stem in MEASURED, f"{path.name}: a new bench; give it --smoke and add its table lines to MEASURED"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1",
           "TMPDIR": str(tmp_path)}  # smoke.scratch folders land in tmp_path
    t0 = time.perf_counter()
    proc = subprocess.run(smoke_command(path, tmp_path), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    seconds = time.perf_counter() - t0
    tail = f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{path.name} --smoke exited {proc.returncode} after {seconds:.0f} s{tail}"
    if path.stem != "bench_gpu":  # bench_gpu --smoke says "tiny shapes" in its title
        assert "smoke run" in proc.stdout, f"{path.name} --smoke did not say it is a smoke run{tail}"
    missing = [p for p in MEASURED[path.stem] if not re.search(p, proc.stdout, re.MULTILINE)]
    assert not missing, f"{path.name} --smoke did not print {missing}{tail}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"{path.stem}_smoke_")]
    assert not leftovers, f"{path.name} --smoke left its scratch folders: {leftovers}"
