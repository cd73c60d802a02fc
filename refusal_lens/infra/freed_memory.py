"""Give the memory the allocator keeps after a part of the work back to the system.

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

Where the C library has no ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from functools import cache

from refusal_lens.infra.resident_memory import resident_memory_mb

logger = logging.getLogger(__name__)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (looked up once: a read-only fact)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


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
