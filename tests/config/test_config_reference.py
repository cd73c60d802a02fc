"""docs/configuration.md is generated from refusal_lens/config/ (and each stage's config.py) and must stay current."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from refusal_lens.config.reference import (
    GENERATED_MARKER,
    config_reference_markdown,
    field_comments,
    sections,
    undocumented_fields,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "docs/configuration.md is stale: run `.venv/bin/python -m refusal_lens.config.reference > docs/configuration.md`"


def _split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (``\\|`` is an escaped pipe, not a separator), stripped."""
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip() for c in cells]


def _unquote(cell: str) -> str:
    """A cell without its code-span backticks."""
    if cell.startswith("`` ") and cell.endswith(" ``"):
        return cell[3:-3]
    if cell.startswith("`") and cell.endswith("`"):
        return cell[1:-1]
    return cell


def _tables(markdown: str) -> dict[str, dict[str, dict[str, str]]]:
    """``{section: {key: {"type", "default", "meaning"}}}`` parsed from the rendered page."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    section = None
    for line in markdown.splitlines():
        heading = re.fullmatch(r"## (\w+):", line)
        if heading:
            section = heading.group(1)
            out[section] = {}
            continue
        if section is None or not line.startswith("|") or line.startswith(("|---", "| key |")):
            continue
        key, type_, default, meaning = _split_row(line)
        out[section][_unquote(key)] = {"type": _unquote(type_), "default": _unquote(default), "meaning": meaning}
    return out


def test_doc_is_current():
    assert DOC.is_file(), REGENERATE
    assert DOC.read_text(encoding="utf-8") == config_reference_markdown(), REGENERATE


def test_doc_starts_with_generated_marker():
    assert config_reference_markdown().splitlines()[0] == GENERATED_MARKER


def test_every_field_is_a_row():
    tables = _tables(config_reference_markdown())
    assert list(tables) == [name for name, _ in sections()]
    for name, cls in sections():
        assert list(tables[name]) == [f.name for f in dataclasses.fields(cls)], name


def test_spot_checks():
    tables = _tables(config_reference_markdown())
    method = tables["circuits"]["method"]
    assert method["type"] == "'atp' \\| 'ig'"
    assert method["default"] == "'atp'"
    assert tables["model"]["activation_layers"]["meaning"]
    assert tables["model"]["activation_layers"]["type"] == "list of str \\| int"
    assert tables["data"]["path"]["type"] == "str \\| null"
    assert tables["data"]["path"]["default"] == "null"


def test_meanings_are_the_comments():
    """Rows have the field's ``#:`` comment as meaning, and an empty meaning exactly when there is none.

    Comments are not required; the fields without one are printed (``pytest -rP`` shows them).
    """
    tables = _tables(config_reference_markdown())
    for name, cls in sections():
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            meaning = tables[name][f.name]["meaning"]
            expected = " ".join(comments.get(f.name, "").split()).replace("|", "\\|")
            assert meaning == expected, f"{name}.{f.name}"
    missing = undocumented_fields()
    empty = [f"{s}.{k}" for s, rows in tables.items() for k, row in rows.items() if not row["meaning"]]
    assert empty == missing
    print(f"{len(missing)} config fields have no #: comment: {', '.join(missing)}")
