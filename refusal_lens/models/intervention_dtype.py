"""``model.intervention_dtype: auto``: the dtype the interventions run in, chosen by measuring this machine once.

Every generation and intervention pass runs on ``loaded.gen_model`` (:mod:`refusal_lens.core.intervene`). On a CPU
whether bfloat16 is faster than float32 depends on the chip, not on the flag ``avx512_bf16`` alone (bench/README.md:
the main job's floor, one large batched forward of the embedded Qwen, in its records): an AMD EPYC ran it 2.0-2.5x
faster in bfloat16 than in float32, an Intel Xeon with AMX ran a model-sized matrix product 8.7x faster, and an Intel
Xeon with AVX512-BF16 but no AMX ran the forward at 0.64-0.71x float32's speed (oneDNN's ``avx512_core_bf16``
kernels; ``bench_interventions.py --tables dtype``: its generation 1.2x and its forward passes 1.9x slower). So ``auto`` times one matrix product of a transformer MLP's shape in both dtypes and takes bfloat16 only
when it is at least :data:`MARGIN` times as fast; otherwise the model's own dtype (no second copy of the weights).

The choice is made once per machine and kept in ``<cache>/intervention_dtype.json``, keyed by the CPU's name, its
bfloat16 flags, the thread count and the torch version, so that two runs on one machine take the same dtype (their
numbers are comparable: bfloat16 and float32 greedy generation differ on borderline tokens) and a resumed run keeps
the dtype its first stages used. Each stage's saved config records the dtype taken, not ``auto``. On a GPU ``auto``
is the model's dtype (``model.torch_dtype``: a GPU config sets bfloat16 there).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from refusal_lens.infra import durable

logger = logging.getLogger(__name__)

#: bfloat16 is taken when one product in it takes at most 1 / MARGIN of float32's time
MARGIN = 1.25
#: the product timed: [ROWS, D_IN] x [D_IN, D_OUT], a prefill batch through an MLP of a 0.5B model
ROWS, D_IN, D_OUT = 256, 1024, 4096
RECORD = "intervention_dtype.json"

Timer = Callable[[torch.dtype], float]


def product_seconds(dtype: torch.dtype, repeats: int = 7) -> float:
    """Median seconds of one ``[ROWS, D_IN] x [D_IN, D_OUT]`` product in ``dtype`` on the CPU (after warm-up)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, D_IN, generator=g).to(dtype)
    w = torch.randn(D_OUT, D_IN, generator=g).to(dtype)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            F.linear(x, w)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and flags from ``/proc/cpuinfo`` (``platform``'s name and no flags where it is missing)."""
    name, flags = platform.processor() or platform.machine() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, flags


def machine_key() -> str:
    """What the choice depends on: the CPU's name and bfloat16 flags, the thread count, the torch version."""
    name, flags = cpu_info()
    bf16 = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    return f"{name} [{' '.join(bf16) or 'no bf16 flags'}] threads={torch.get_num_threads()} torch={torch.__version__}"


def measure(timer: Timer | None = None) -> dict:
    """Time the product in float32 and bfloat16 (``timer``: :func:`product_seconds`); the record of the choice."""
    timer = timer or product_seconds
    fp32, bf16 = timer(torch.float32), timer(torch.bfloat16)
    choice = "bfloat16" if fp32 >= MARGIN * bf16 else "float32"
    return {"choice": choice, "float32_s": fp32, "bfloat16_s": bf16, "speed_up": fp32 / bf16,
            "rule": f"bfloat16 when float32 takes >= {MARGIN}x its time, else the model's dtype",
            "shape": [ROWS, D_IN, D_OUT]}


def read_records(path: Path) -> dict:
    """The machines' records in ``path``: ``{}`` when it is missing, or (with a warning) not a JSON object."""
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        records = None
    if isinstance(records, dict):
        return records
    logger.warning("%s is unreadable: measuring again", path)
    return {}


def saved_dtype(model: dict) -> str:
    """The dtype a run's interventions ran in, from the ``model`` section of a config a stage saved (``same`` or a
    missing key, as in configs saved before the key existed: ``torch_dtype``; a saved config never holds ``auto``)."""
    name = model.get("intervention_dtype") or "same"
    return str(model["torch_dtype"] if name == "same" else name)


def choose(torch_dtype: str, device: torch.device, folder: Path, timer: Timer | None = None) -> str:
    """The dtype ``auto`` stands for: ``torch_dtype`` off the CPU or when the model already runs in 16 bits; on the
    CPU bfloat16 or ``torch_dtype``, by this machine's record in ``folder`` (measured and written when missing)."""
    if device.type != "cpu" or torch_dtype != "float32":
        return torch_dtype
    path, key = folder / RECORD, machine_key()
    records = read_records(path)
    rec = records.get(key)
    if not (isinstance(rec, dict) and rec.get("choice") in ("bfloat16", "float32")):
        rec = measure(timer)
        records[key] = rec
        try:
            os.makedirs(folder, exist_ok=True)
            durable.write_json(path, records)
        except OSError as err:
            logger.warning("could not record the intervention dtype in %s (%s): it is measured again next time",
                           path, err)
        logger.info("intervention dtype measured on this machine: a product takes %.1f ms in float32, %.1f ms in "
                    "bfloat16 (%.2fx): %s", rec["float32_s"] * 1e3, rec["bfloat16_s"] * 1e3, rec["speed_up"],
                    rec["choice"])
    logger.info("model.intervention_dtype=auto -> %s (%s, %s)", rec["choice"], key, path)
    return rec["choice"]
