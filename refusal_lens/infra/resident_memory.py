"""The resident memory of this process, for the profile: now and its peak so far.

Read from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) where it exists, else from ``getrusage`` (peak only). The peak
is never reset (resetting ``VmHWM`` would also erase it from the exit status ``/usr/bin/time -v`` reads), so a
part's ``peak_rss_mb`` is the peak up to the end of that part: the part where it rises is where memory peaked.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path


def resident_memory_mb(status: Path = Path("/proc/self/status")) -> dict[str, float]:
    """``{"rss_mb": now, "peak_rss_mb": peak so far}`` in MiB (``rss_mb`` absent where it cannot be read)."""
    try:
        text = status.read_text()
    except OSError:
        text = ""
    now, peak = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M), re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    if now and peak:
        return {"rss_mb": round(int(now.group(1)) / 1024, 1), "peak_rss_mb": round(int(peak.group(1)) / 1024, 1)}
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return {"peak_rss_mb": round(maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}


__all__ = ["resident_memory_mb"]
