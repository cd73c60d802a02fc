"""Live status of a pipeline command: ``<run>/status.json``, rewritten atomically as it progresses.

The main process of ``refusal-lens collect|train-saes|run`` keeps one :class:`StatusFile` (other
torchrun ranks get a disabled one, a no-op). Stages report ``progress(done, total, unit)`` per batch
or per hook; writes are throttled to one per ``min_interval_s`` (a finished count always writes).
``refusal-lens status <run or results folder>`` reads it back
(:mod:`refusal_lens.infra.status_report`). The file holds::

    run, command, pid, host, started_at, updated_at, state (running/done/failed/interrupted),
    stages: [{name, state (pending/running/done/skipped/failed/interrupted), started_at, finished_at,
              elapsed_s, progress: {done, total, unit}, eta_s, summary,
              parts: [{part, seconds, positions, rss_mb, peak_rss_mb, part_peak_rss_mb}]}],
    current_stage, message, rates, error

A stage's **parts** are the spans between its messages (``set(message=...)``: the stage names what it is doing);
each has its seconds and, with a :class:`refusal_lens.infra.token_meter.TokenMeter`, the token positions it
pushed through the model by kind of pass (the profile ``bench/bench_main_job.py`` prints), its resident memory at
the end and the peak so far, and with a :class:`refusal_lens.infra.resident_memory.PeakSampler` (``memory=``, started
by :meth:`StatusFile.begin` and stopped by :meth:`StatusFile.finish`) the part's own peak; ``at_part`` runs as each
part opens (the pipeline gives back the memory the previous part freed). The span before a
stage's first message is the part ``""`` (the whole stage when it sets none).

Writing the status is best effort: an unwritable file is logged once and never stops the job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from refusal_lens.infra import durable
from refusal_lens.infra.resident_memory import PeakSampler, resident_memory_mb
from refusal_lens.infra.token_meter import TokenMeter, difference
from refusal_lens.errors import UserError

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"
RUN_STATES = ("running", "done", "failed", "interrupted")
STAGE_STATES = ("pending", "running", "done", "skipped", "failed", "interrupted")
#: the states a stage can end in
FINAL_STAGE_STATES = ("done", "skipped", "failed", "interrupted")


class StatusReadError(UserError, ValueError):
    """A status.json that cannot be read or parsed."""


@dataclass(frozen=True)
class StageOutcome:
    """What a stage function hands back to the CLI: its final state and a small summary for the status."""

    state: str = "done"
    summary: dict[str, Any] | None = None


def iso_time(t: float) -> str:
    """Local time with its UTC offset, to the second (e.g. ``2025-01-31T14:03:12+01:00``)."""
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch of an :func:`iso_time` string (None stays None)."""
    return datetime.fromisoformat(text).timestamp() if text else None


def _new_stage(name: str) -> dict[str, Any]:
    return {"name": name, "state": "pending", "started_at": None, "finished_at": None, "elapsed_s": None,
            "progress": {"done": 0, "total": None, "unit": ""}, "eta_s": None, "summary": None}


def rates_summary(rates: Sequence[dict]) -> dict[str, float]:
    """Overall refusal rate per label (``safe``: over-refusal, ``toxic``: correct refusal) from
    :func:`refusal_lens.stages.collect.stage.refusal_rates` rows."""
    return {r["label"]: round(float(r["refusal_rate"]), 4) for r in rates
            if r.get("category") == "ALL" and r.get("split", "all") == "all"}


class StatusFile:
    """The live ``status.json`` of one command. ``StatusFile(None)`` or ``enabled=False`` does nothing.

    ``clock`` returns seconds since the epoch (injectable for tests).
    """

    def __init__(self, path: Path | str | None, *, enabled: bool = True, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.time, meter: TokenMeter | None = None,
                 memory: PeakSampler | None = None, at_part: Callable[[], Any] | None = None):
        self.path = Path(path) if path is not None and enabled else None
        #: counts of the model's passes, snapshotted at every part (None: parts get seconds only)
        self.meter = meter
        #: each part's own peak of resident memory (None: parts get the memory at their end and the peak so far)
        self.memory = memory if self.path is not None else None
        #: called at the start of every part, before its peak starts (the pipeline gives back freed memory there:
        #: :func:`refusal_lens.infra.freed_memory.release_freed_memory`)
        self.at_part = at_part if self.path is not None else None
        self._part: dict[str, Any] | None = None  # the running part: its name, start and the meter's counts then
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._data: dict[str, Any] = {}
        self._stage_t0: dict[str, float] = {}
        self._initial: dict[str, int] = {}
        self._last_write: float | None = None
        self._write_failed = False

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def data(self) -> dict[str, Any]:
        """A copy of the current status (what the file holds after the next write)."""
        return json.loads(json.dumps(self._data))

    # ---------------------------------------------------------------------------------------- run

    def begin(self, command: str, stages: Sequence[str]) -> None:
        """Start the status of ``command``: every stage pending, the run running."""
        if self.path is None:
            return
        now = self._clock()
        self._data = {
            "run": str(self.path.parent.resolve()), "command": command, "pid": os.getpid(),
            "host": socket.gethostname(), "started_at": iso_time(now), "updated_at": iso_time(now),
            "state": "running", "stages": [_new_stage(s) for s in stages], "current_stage": None,
            "message": "", "rates": None, "error": None,
        }
        self._stage_t0.clear()
        self._initial.clear()
        self._write(now)
        if self.memory is not None:
            self.memory.start()
        logger.info("status: %s (`refusal-lens status %s`)", self.path, self.path.parent)

    def set(self, **fields: Any) -> None:
        """Set top-level fields (e.g. ``rates=``, ``message=``) and write."""
        if self.path is None:
            return
        if "stages" in fields:
            raise ValueError("stages are set through start_stage / progress / finish_stage")
        now = self._clock()
        message, name = fields.get("message"), self._data.get("current_stage")
        if message and name is not None and self._part is not None and message != self._part["part"]:
            stage = self._stage(name)
            self._close_part(stage, now)
            self._open_part(message, now)
        self._data.update(fields)
        self._write(now)

    def finish(self, state: str = "done", error: str | None = None) -> None:
        """End the run; a stage still running ends as ``failed``/``interrupted`` (or ``done``)."""
        if self.path is None:
            return
        if state not in RUN_STATES or state == "running":
            raise ValueError(f"run state {state!r}; allowed: done, failed, interrupted")
        now = self._clock()
        for stage in self._data["stages"]:
            if stage["state"] == "running":
                self._end_stage(stage, state, now)
        self._data.update(state=state, error=error, current_stage=None)
        self._write(now)
        if self.memory is not None:
            self.memory.stop()

    # ------------------------------------------------------------------------------------- stages

    def start_stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        """Mark stage ``name`` running (appended if ``begin`` did not list it); clears the message."""
        if self.path is None:
            return
        now = self._clock()
        stage = self._stage(name)
        stage.update(_new_stage(name), state="running", started_at=iso_time(now), elapsed_s=0.0,
                     progress={"done": 0, "total": total, "unit": unit})
        self._stage_t0[name] = now
        self._open_part("", now)
        self._initial.pop(name, None)
        self._data.update(current_stage=name, message="")
        self._write(now)

    def progress(self, done: int, total: int | None = None, unit: str | None = None, *,
                 initial: int | None = None) -> None:
        """Progress of the current stage: ``done`` of ``total`` (None keeps the last total / unit).

        ``initial``: units that were already done before this process started (resumed or skipped
        work); they are left out of the rate behind the ETA, ``elapsed / (done - initial) * (total - done)``.
        Writes at most once per ``min_interval_s``, except when ``done`` reaches ``total``.
        """
        name = self._data.get("current_stage") if self.path is not None else None
        if name is None:
            return
        now = self._clock()
        stage = self._stage(name)
        prog = stage["progress"]
        prog["done"] = done
        if total is not None:
            prog["total"] = total
        if unit is not None:
            prog["unit"] = unit
        if initial is not None:
            self._initial[name] = initial
        stage["eta_s"] = self._eta(name, now)
        finished = prog["total"] is not None and done >= prog["total"]
        if finished or self._last_write is None or now - self._last_write >= self.min_interval_s:
            self._write(now)

    def finish_stage(self, name: str, state: str = "done", summary: dict[str, Any] | None = None) -> None:
        """End stage ``name`` as ``done``, ``skipped``, ``failed`` or ``interrupted``, with a small summary;
        clears the message (a note about the running stage)."""
        if self.path is None:
            return
        if state not in FINAL_STAGE_STATES:
            raise ValueError(f"stage state {state!r}; allowed: {', '.join(FINAL_STAGE_STATES)}")
        now = self._clock()
        stage = self._stage(name)
        self._end_stage(stage, state, now)
        if summary is not None:
            stage["summary"] = summary
        if self._data.get("current_stage") == name:
            self._data.update(current_stage=None, message="")
        self._write(now)

    # ------------------------------------------------------------------------------------ helpers

    def _stage(self, name: str) -> dict[str, Any]:
        stages = self._data.setdefault("stages", [])
        for stage in stages:
            if stage["name"] == name:
                return stage
        stages.append(_new_stage(name))
        return stages[-1]

    def _eta(self, name: str, now: float) -> float | None:
        prog = self._stage(name)["progress"]
        done, total = prog["done"], prog["total"]
        if total is None:
            return None
        if done >= total:
            return 0.0
        rate_done = done - self._initial.get(name, 0)
        if rate_done <= 0:
            return None
        return round((now - self._stage_t0.get(name, now)) / rate_done * (total - done), 3)

    def _open_part(self, name: str, now: float) -> None:
        if self.at_part is not None:
            self.at_part()
        self._part = {"part": name, "t0": now, "counts": self.meter.snapshot() if self.meter is not None else {}}
        if self.memory is not None:
            self.memory.take()  # the part's peak starts here

    def _close_part(self, stage: dict[str, Any], now: float) -> None:
        if self._part is None:
            return
        entry: dict[str, Any] = {"part": self._part["part"], "seconds": round(now - self._part["t0"], 3)}
        if self.meter is not None:
            entry["positions"] = difference(self.meter.snapshot(), self._part["counts"])
            entry.update(resident_memory_mb())
        if self.memory is not None:
            entry["part_peak_rss_mb"] = self.memory.take()
        stage.setdefault("parts", []).append(entry)
        self._part = None

    def _end_stage(self, stage: dict[str, Any], state: str, now: float) -> None:
        if stage["name"] == self._data.get("current_stage"):
            self._close_part(stage, now)
        t0 = self._stage_t0.get(stage["name"])
        stage.update(state=state, finished_at=iso_time(now),
                     elapsed_s=round(now - t0, 3) if t0 is not None else stage["elapsed_s"])
        if state in ("done", "skipped"):
            stage["eta_s"] = 0.0

    def _write(self, now: float) -> None:
        """Atomically replace the file (:func:`refusal_lens.infra.durable.write_text`: a synced temporary file
        in the same folder, then ``os.replace``)."""
        if self.path is None:
            return
        self._data["updated_at"] = iso_time(now)
        for stage in self._data.get("stages", []):
            if stage["state"] == "running" and stage["name"] in self._stage_t0:
                stage["elapsed_s"] = round(now - self._stage_t0[stage["name"]], 3)
        self._last_write = now
        try:
            durable.write_text(self.path, json.dumps(self._data, indent=2) + "\n")
        except OSError as err:  # StorageError included
            if not self._write_failed:
                logger.warning("status: cannot write %s (%s); the job goes on without it", self.path, err)
            self._write_failed = True
