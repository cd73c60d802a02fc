"""The C allocator's policy for the work: freed memory is kept for reuse within a part and given back between parts.

Within a part (:func:`keep_freed_memory`, once per process before the model loads): every forward pass allocates
and frees the same activations again and again (a [64, 28, 4864] MLP activation is 17 MiB). By default glibc
serves such blocks with ``mmap`` until its threshold has grown past them, and hands the top of its heap back to the
system whenever the free space there exceeds twice that threshold, so the next pass faults the same pages in again,
zeroed by the kernel. :func:`keep_freed_memory` fixes the mmap threshold at glibc's largest (32 MiB: blocks below
it come from the heap) and raises the trim threshold to 1 GiB (freed space stays in the heap for the next pass;
:func:`release_freed_memory` still hands it back between parts). Measured by ``bench/bench_allocator.py`` on the
embedded Qwen in bfloat16 (64 sample prompts, the ablation edit, 2 threads, peak RSS unchanged): on AMD EPYC one
forward pass 4.41 -> 3.65 s (412,166 -> 1,792 minor page faults), a greedy generation of 20 tokens 8.86 -> 8.29 s;
on an Intel Xeon with AMX-BF16 (by hand, before the bench) 1.95 -> 1.49 s and 5.5 -> 4.9 s, an MLP activation's
SiLU 3.3 -> 1.4 ms.

Between parts, give the memory the allocator keeps back to the system.

glibc's ``malloc`` keeps freed blocks below its mmap threshold (up to 32 MiB, raised as large blocks are freed)
in its heaps, resident, and returns only the top of a heap on its own. A part of a stage that frees its
tensors therefore leaves the next part a resident set the size of its own high-water mark, and the next part's
peak stacks on it: measured on the main job's direction stage alone, the evaluation part started at 4.94 GiB
after the selection, 4.32 GiB after a release, and peaked at 5.53 GiB instead of 5.9-6.4 (bench/README.md,
"Memory"). :func:`release_freed_memory` calls ``malloc_trim(0)``, which hands every free page of every arena back
(``madvise``); pages that are reused later are faulted in again, so it never raises what the work needs, only
what it keeps. It takes milliseconds. The garbage collector is not run: on that stage a ``gc.collect()`` before
the part released nothing measurable (4.89 GiB resident after it in one run, 4.94 before it in another) and
takes 0.2 s once TransformerLens is imported.

Where the C library has no ``malloc_trim`` or ``mallopt`` (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from functools import cache

from refusal_lens.infra.resident_memory import resident_memory_mb

logger = logging.getLogger(__name__)


#: glibc's ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` sets
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEPT = {M_MMAP_THRESHOLD: 32 << 20,  # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); a larger one is refused
        M_TRIM_THRESHOLD: 1 << 30,   # free space at the heap's top kept up to 1 GiB (release_freed_memory frees it)
        M_TOP_PAD: 64 << 20}         # the heap grows 64 MiB at a time


@cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """A function of the C library (``malloc_trim``, ``mallopt``, ``madvise``), or None where it has none (looked up
    once: a read-only fact)."""
    lib = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(lib) if lib else ctypes.CDLL(None)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = {"malloc_trim": [ctypes.c_size_t], "mallopt": [ctypes.c_int, ctypes.c_int],
                   "madvise": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]}[name]
    fn.restype = ctypes.c_int
    return fn


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim")


def _mallopt() -> Callable[[int, int], int] | None:
    return _libc_function("mallopt")


def keep_freed_memory() -> bool:
    """Make the allocator keep freed memory for reuse (the values of :data:`KEPT`), for this process. Returns
    whether every value was taken (False where the C library has no ``mallopt``)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    taken = all([mallopt(param, value) == 1 for param, value in KEPT.items()])  # every value set, even past a refusal
    logger.debug("allocator keeps freed memory for reuse: %s", taken)
    return taken


def can_trim() -> bool:
    """Whether this C library can hand freed heap memory back (glibc)."""
    return _malloc_trim() is not None


def release_freed_memory() -> float | None:
    """Give freed heap pages back to the system. Returns the MiB the resident set fell by (None where it cannot be
    read)."""
    before = resident_memory_mb().get("rss_mb")
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    after = resident_memory_mb().get("rss_mb")
    if before is None or after is None:
        return None
    released = round(before - after, 1)
    logger.debug("released %.1f MiB of freed memory (resident %.1f -> %.1f MiB)", released, before, after)
    return released
