"""The resident memory of this process, for the profile: now, its peak so far, and each part's own peak.

Read from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) where it exists, else from ``getrusage`` (peak only). The peak
is never reset (resetting ``VmHWM`` would also erase it from the exit status ``/usr/bin/time -v`` reads), so a
part's ``peak_rss_mb`` is the peak up to the end of that part: the part where it rises is where memory peaked.
Once a part has set the peak, later parts cannot show theirs that way; :class:`PeakSampler` reads ``VmRSS`` in a
thread every ``interval_s`` and gives each part the largest reading within it (``part_peak_rss_mb``: a lower
bound, since a spike shorter than the interval can fall between two readings).
"""

from __future__ import annotations

import re
import resource
import sys
import threading
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


class PeakSampler:
    """The largest resident memory between two calls of :meth:`take`, sampled by a daemon thread (between
    :meth:`start` and :meth:`stop`, or as a context manager). Without ``VmRSS`` (not Linux) every take is None."""

    def __init__(self, interval_s: float = 0.2, status: Path = Path("/proc/self/status")):
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s}; allowed: a positive number of seconds")
        self.interval_s, self._status = interval_s, status
        self._lock = threading.Lock()
        self._peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Read the resident memory now and keep it if it is the largest since the last take."""
        now = resident_memory_mb(self._status).get("rss_mb")
        if now is None:
            return
        with self._lock:
            self._peak = now if self._peak is None else max(self._peak, now)

    def take(self) -> float | None:
        """The largest reading since the previous take (this moment included), in MiB; starts the next span."""
        self.sample()
        with self._lock:
            peak, self._peak = self._peak, None
        return peak

    def start(self) -> PeakSampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["PeakSampler", "resident_memory_mb"]
