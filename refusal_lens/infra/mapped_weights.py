"""Weights read from a memory-mapped file leave the resident set between parts; the kernel's page cache keeps them.

``transformers`` loads a safetensors checkpoint whose dtype is the one asked for without a copy: every parameter is
a view of the file, mapped privately (measured on the embedded Qwen in float32: its 2.52 GB of weights are one
``rw-p`` mapping of ``model.safetensors``). A page of it becomes resident, and counts in the process's resident set,
once it is read, and stays so while the process lives: the bfloat16 copy made at load reads every float32 weight,
so a part that runs only the bfloat16 model (greedy generation, the intervention passes) carried the 2.5 GB of
float32 weights it never reads (measured: 4.30 GB resident after the load, of which 2.62 GB file pages).

:func:`unmap_file_weights` drops those pages from the process's page tables (``madvise(MADV_DONTNEED)``) at the
start of a part (and after the load's copy). The data stay in the kernel's page cache, which can reclaim them under
memory pressure and re-read them from the file; a part that reads a weight faults it back in from there, the same
bytes. Only pages that are still the file's are dropped: a private mapping turns a page into an anonymous copy
when it is written (copy on write), and dropping that page would bring back the file's bytes, so a tensor with any
such page (``/proc/self/pagemap``: present and not a file page) is left as it is. Tensors in memory that is not a
private file mapping (the bfloat16 copy, anything computed) are never touched.

Where ``/proc/self/maps`` or ``/proc/self/pagemap`` cannot be read, or the C library has no ``madvise``, it does
nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from refusal_lens.infra.freed_memory import _libc_function

if TYPE_CHECKING:  # torch is not imported here: the pipeline imports this module before it takes the run's lock
    import torch

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
#: /proc/self/pagemap bits (Documentation/admin-guide/mm/pagemap.rst)
PRESENT, FILE_PAGE = 1 << 63, 1 << 61


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    private_file: bool  # a private mapping of a file (``p`` and a path that is not ``[heap]``, ``[stack]``, ...)


def read_mappings(maps: str = "/proc/self/maps") -> list[Mapping]:
    """The process's mappings, sorted by start address (empty where the file cannot be read)."""
    out = []
    try:
        lines = Path(maps).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        path = fields[5] if len(fields) > 5 else ""
        out.append(Mapping(lo, hi, fields[1].endswith("p") and path.startswith("/") and int(fields[4]) != 0))
    return sorted(out, key=lambda m: m.start)


def _mapping_of(mappings: list[Mapping], starts: list[int], lo: int, hi: int) -> Mapping | None:
    i = bisect.bisect_right(starts, lo) - 1
    return mappings[i] if i >= 0 and mappings[i].start <= lo and hi <= mappings[i].end else None


def storages(modules: Iterable[torch.nn.Module]) -> list[tuple[int, int]]:
    """``(address, bytes)`` of every distinct CPU storage of the modules' parameters and buffers."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if t.device.type != "cpu":
                continue
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), s.nbytes())
    return sorted(seen.items())


def page_flags(lo: int, hi: int) -> np.ndarray | None:
    """The ``/proc/self/pagemap`` entries of the pages ``[lo, hi)`` (page-aligned addresses); None where it cannot
    be read."""
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(lo // PAGE * 8)
            return np.frombuffer(pagemap.read((hi - lo) // PAGE * 8), dtype=np.uint64)
    except OSError:
        return None


def _present(flags: np.ndarray) -> np.ndarray:
    return (flags & np.uint64(PRESENT)) != 0


def _written(flags: np.ndarray) -> np.ndarray:
    """Pages present and not the file's (a private mapping's copy on write)."""
    return _present(flags) & ((flags & np.uint64(FILE_PAGE)) == 0)


def unmap_file_weights(modules: Iterable[torch.nn.Module]) -> int:
    """Drop from the resident set the pages of the modules' weights that are still those of the file they are
    mapped from (see the module docstring). Returns the bytes that were resident and are no longer."""
    madvise = _libc_function("madvise")
    mappings = read_mappings()
    if madvise is None or not mappings:
        return 0
    starts = [m.start for m in mappings]
    dropped = kept = 0
    for ptr, nbytes in storages(modules):
        where = _mapping_of(mappings, starts, ptr, ptr + nbytes)
        if where is None or not where.private_file:
            continue
        lo, hi = -(-ptr // PAGE) * PAGE, (ptr + nbytes) // PAGE * PAGE  # whole pages inside the storage
        flags = page_flags(lo, hi) if hi > lo else None
        if flags is None:
            continue
        if _written(flags).any():
            kept += nbytes  # a page was written: its bytes are no longer the file's
            continue
        if madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
            dropped += int(_present(flags).sum()) * PAGE
    if kept:
        logger.warning("%.1f MiB of file-mapped weights were written in memory and stay resident", kept / 2**20)
    logger.debug("%.1f MiB of file-mapped weights left the resident set", dropped / 2**20)
    return dropped
