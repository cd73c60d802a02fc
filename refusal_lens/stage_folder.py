"""The folder of a stage that runs once and resumes by parts: its manifest and the JSON parts inside it.

``prepare`` creates (or, with ``force``, recreates) the folder with a ``manifest.json`` holding the stage's
fingerprint and ``status: running``, and refuses a folder written with another fingerprint. ``part`` reads a
part's JSON when a run before wrote it, and otherwise makes and writes it durably: a killed run redoes only the
parts it had not written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusal_lens import durable
from refusal_lens.config import Config, dump_config

MANIFEST = "manifest.json"


def prepare(out_dir: Path, fp: str, cfg: Config, force: bool, error: type[Exception], what: str) -> dict:
    """The stage's manifest (created when new); ``error`` names ``what`` the folder holds when it differs."""
    path = out_dir / MANIFEST
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("fingerprint") != fp:
            raise error(f"{out_dir} holds {what} from other settings or inputs; rerun with --force to redo it, "
                        "or set output.run_name to write elsewhere")
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"fingerprint": fp, "status": "running"}
    durable.write_json(path, manifest)
    durable.write_text(out_dir / "config.yaml", dump_config(cfg))
    return manifest


def part(path: Path, make: Callable[[], Any]) -> Any:
    """The JSON at ``path``: read when written before, else made and written (durably)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    durable.write_json(path, value, indent=1)
    return value
