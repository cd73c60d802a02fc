"""A stage that resumes by parts: each part's JSON is made once, written durably, and read back on a rerun, so
that a killed stage redoes only the parts it had not written; and each part draws from a random generator of its
own, so that a resumed run draws what an uninterrupted one draws."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from refusal_lens.infra import durable


def part(path: Path, make: Callable[[], Any]) -> Any:
    """The JSON at ``path``: read when written before, else made and written (durably)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    durable.write_json(path, value, indent=1)
    return value


def part_rng(seed: int, *name: str) -> np.random.Generator:
    """A generator of its own per resumable part (named by ``name``), derived from the stage's seed."""
    digest = hashlib.sha256("\x1f".join((str(seed), *name)).encode()).hexdigest()
    return np.random.default_rng(int(digest[:16], 16))
