"""Reading ``status.json`` back and showing it: ``refusal-lens status <run or results folder>``.

:func:`read_status` loads one run's status (or every run's in a results folder); :func:`format_status`
renders it for a person, with warnings when a status that says running looks dead.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refusal_lens.infra.status import STATUS_FILE, StatusReadError, parse_time


def read_status(folder: Path | str) -> list[dict[str, Any]]:
    """The status of the run in ``folder`` (a run folder holding status.json, or the file itself), or
    of every run in a results folder (``<folder>/*/status.json``, sorted by name); [] if none."""
    folder = Path(folder)
    if folder.is_file() and folder.name == STATUS_FILE:
        paths = [folder]
    elif (folder / STATUS_FILE).is_file():
        paths = [folder / STATUS_FILE]
    elif folder.is_dir():
        paths = sorted(folder.glob(f"*/{STATUS_FILE}"))
    else:
        paths = []
    return [_load(p) for p in paths]


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StatusReadError(f"{path}: cannot read the status ({err})") from err
    if not isinstance(data, dict) or "stages" not in data:
        raise StatusReadError(f"{path}: not a refusal-lens status file")
    return data


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``2h03m``, ``1d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _progress_cell(stage: dict[str, Any]) -> str:
    prog = stage.get("progress") or {}
    done, total, unit = prog.get("done"), prog.get("total"), prog.get("unit") or ""
    if total is None:
        return "-" if not done else f"{done} {unit}".strip()
    pct = 100.0 * done / total if total else 100.0
    return f"{done}/{total} {unit} ({pct:.0f}%)".replace("  ", " ")


def _stage_times(stage: dict[str, Any], now: float, since_update: float) -> tuple[float | None, float | None]:
    """(elapsed, ETA) as of ``now``: a running stage's clock keeps going, its ETA counts down."""
    elapsed, eta = stage.get("elapsed_s"), stage.get("eta_s")
    if stage.get("state") != "running":
        return elapsed, None
    started = parse_time(stage.get("started_at"))
    if started is not None:
        elapsed = now - started
    if eta is not None:
        eta = max(eta - since_update, 0.0)
    return elapsed, eta


def _rates_lines(rates: Sequence[dict]) -> list[str]:
    labels = sorted({r["label"] for r in rates})
    cell = {(r["category"], r["label"]): r for r in rates}
    lines = [f"  {'category':<14}" + "".join(f"{lab + ' refused':>20}" for lab in labels)]
    for cat in dict.fromkeys(r["category"] for r in rates):
        parts = []
        for lab in labels:
            r = cell.get((cat, lab))
            parts.append(f"{'-':>20}" if r is None else f"{r['refused']}/{r['n']} ({r['refusal_rate']:.1%})".rjust(20))
        lines.append(f"  {cat:<14}" + "".join(parts))
    return lines


def status_warnings(status: dict[str, Any], now: float, stale_after_s: float) -> list[str]:
    """Why a status that says running may be wrong: its process is gone, or it has not changed for long."""
    if status.get("state") != "running":
        return []
    out = []
    pid, host = status.get("pid"), status.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
        out.append(f"the process (pid {pid}) is not running, but the status says running: the job ended without "
                   "recording it (killed, e.g. out of memory?); rerun the same command to resume")
    updated = parse_time(status.get("updated_at"))
    if updated is not None and now - updated > stale_after_s:
        out.append(f"no update for {format_duration(now - updated)}: the job may be hung (or one step is very slow; "
                   "progress is reported per collect batch and per SAE hook)")
    return out


def format_status(status: dict[str, Any], now: float | None = None, *, stale_after_s: float = 1800.0) -> str:
    """A human-readable status: run, overall state, one line per stage (progress, elapsed, ETA),
    refusal rates when known, the error, and warnings for a run that looks dead."""
    now = time.time() if now is None else now
    updated = parse_time(status.get("updated_at"))
    since_update = max(now - updated, 0.0) if updated is not None else 0.0
    lines = [
        f"run:     {status.get('run', '?')}",
        f"command: {status.get('command', '?')}   state: {status.get('state', '?')}   "
        f"pid {status.get('pid', '?')} on {status.get('host', '?')}",
        f"started: {status.get('started_at', '?')}   last update {format_duration(since_update)} ago",
        "",
        f"  {'stage':<14}{'state':<13}{'progress':<26}{'elapsed':>9}{'ETA':>9}",
    ]
    for stage in status.get("stages", []):
        elapsed, eta = _stage_times(stage, now, since_update)
        lines.append(f"  {stage.get('name', '?'):<14}{stage.get('state', '?'):<13}{_progress_cell(stage):<26}"
                     f"{format_duration(elapsed):>9}{format_duration(eta):>9}")
    for stage in status.get("stages", []):
        if stage.get("summary"):
            summary = ", ".join(f"{k}={json.dumps(v)}" for k, v in stage["summary"].items())
            lines.append(f"  {stage['name']}: {summary}")
    if status.get("message"):
        lines.append(f"message: {status['message']}")
    if status.get("rates"):
        lines += ["refusal rates (safe = over-refusal, toxic = correct refusal):", *_rates_lines(status["rates"])]
    if status.get("error"):
        lines.append(f"error: {status['error']}")
    lines += [f"warning: {w}" for w in status_warnings(status, now, stale_after_s)]
    return "\n".join(lines)
