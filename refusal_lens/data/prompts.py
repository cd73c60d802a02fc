"""Prompts: OR-Bench as released, single files, ``datasets`` folders, or the embedded sample set.

Every row becomes a :class:`Prompt` with ``source`` (file it came from) and ``label``
(``safe``: seemingly toxic but answerable; ``toxic``: should be refused). OR-Bench's
``or-bench-80k.csv`` and ``or-bench-hard-1k.csv`` are *safe*, ``or-bench-toxic.csv`` is *toxic*.

The *harmless* prompts of the refusal-direction contrast (plain instructions, label ``harmless``) come
from ``direction.harmless``: an embedded set (``embedded:harmless``, the default: varied task instructions,
``refusal_lens/data/harmless/instructions.csv``; ``embedded:harmless-questions``: how-to questions,
``harmless/questions.csv``) or any file or datasets folder with a ``prompt`` column (:func:`load_harmless`).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from refusal_lens.config import DataConfig
from refusal_lens.errors import UserError

logger = logging.getLogger(__name__)

#: OR-Bench's ten categories.
CATEGORIES = (
    "deception",
    "harassment",
    "harmful",
    "hate",
    "illegal",
    "privacy",
    "self-harm",
    "sexual",
    "unethical",
    "violence",
)
#: OR-Bench file stem -> label of its rows.
OR_BENCH_FILES: dict[str, str] = {
    "or-bench-80k": "safe",
    "or-bench-hard-1k": "safe",
    "or-bench-toxic": "toxic",
}
LABELS = ("safe", "toxic")
HARMLESS = "harmless"
UNLABELED = "unlabeled"
SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


class DataError(UserError, ValueError):
    """Prompt data that cannot be used; the message says what was found."""


@dataclass(frozen=True)
class Prompt:
    id: str  # "<source>:<row index in its file>", stable across runs
    prompt: str
    category: str
    label: str  # safe | toxic | unlabeled
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def sample_set_path() -> Path:
    """The embedded OR-Bench-shaped sample folder shipped in the package."""
    return Path(str(resources.files("refusal_lens") / "data" / "sample_or_bench"))


#: ``data.path`` / ``direction.harmless`` values naming an embedded set instead of a path.
EMBEDDED_SETS = {"embedded:sample": "sample_or_bench", "embedded:large": "or_bench_large",
                 "embedded:harmless": "harmless/instructions.csv", "embedded:harmless-questions": "harmless/questions.csv"}


#: the embedded sets ``direction.harmless`` accepts (the others are OR-Bench-shaped ``data.path`` sets).
HARMLESS_SETS = tuple(k for k, v in EMBEDDED_SETS.items() if v.startswith("harmless/"))


def embedded_set_path(name: str) -> Path:
    """The package folder (or file) of an embedded prompt set, ``embedded:<name>``."""
    if name not in EMBEDDED_SETS:
        raise DataError(f"unknown embedded prompt set {name!r}; allowed: {', '.join(EMBEDDED_SETS)}")
    return Path(str(resources.files("refusal_lens") / "data" / EMBEDDED_SETS[name]))


# --------------------------------------------------------------------------------------------
# Readers: each returns (columns, rows as dicts)
# --------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_jsonl(path: Path) -> tuple[list[str], list[dict]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        text = fh.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
    if any(not isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every record must be a JSON object with prompt and category")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return columns, rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.column_names, table.to_pylist()


def _read_datasets_folder(path: Path) -> tuple[list[str], list[dict]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} is a DatasetDict with splits {list(ds)}; point data.path at one split's folder")
    return list(ds.column_names), ds.to_list()


def _read_file(path: Path) -> tuple[list[str], list[dict]]:
    if path.suffix == ".csv":
        return _read_csv(path)
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"data.path={str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(SUFFIXES)}")


def _rows_to_prompts(path: Path, source: str, columns: list[str], rows: list[dict], label: str | None) -> list[Prompt]:
    missing = [c for c in ("prompt", "category") if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found columns {columns}; need prompt, category")
    has_label = "label" in columns
    out, bad = [], []
    for i, row in enumerate(rows):
        text, category = row.get("prompt"), row.get("category")
        row_label = row.get("label") if has_label else label
        problems = []
        if not isinstance(text, str) or not text.strip():
            problems.append(f"prompt={text!r}")
        if not isinstance(category, str) or not category.strip():
            problems.append(f"category={category!r}")
        if has_label and row_label not in LABELS:
            problems.append(f"label={row_label!r} (allowed: {', '.join(LABELS)})")
        if problems:
            bad.append(f"row {i + 2 if path.suffix == '.csv' else i}: {', '.join(problems)}")
            continue
        out.append(Prompt(f"{source}:{i}", text.strip(), category.strip(), row_label or UNLABELED, source))
    if bad:
        shown = "; ".join(bad[:5]) + (f"; … {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{path}: {len(bad)} row(s) without text in a required cell: {shown}")
    return out


def _read_or_bench_folder(path: Path, splits: Sequence[str]) -> list[Prompt]:
    present = {stem for stem in OR_BENCH_FILES if (path / f"{stem}.csv").is_file()}
    wanted = list(splits) or [s for s in OR_BENCH_FILES if s in present]
    missing = [s for s in wanted if s not in present]
    if missing or not wanted:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise DataError(
            f"data.path={str(path)!r}: missing OR-Bench file(s) "
            f"{[f'{s}.csv' for s in (missing or OR_BENCH_FILES)]}; found {found}"
        )
    prompts: list[Prompt] = []
    for stem in wanted:
        file = path / f"{stem}.csv"
        columns, rows = _read_csv(file)
        prompts += _rows_to_prompts(file, stem, columns, rows, OR_BENCH_FILES[stem])
    return prompts


def read_prompts(path: str | Path | None, splits: Sequence[str] = ()) -> list[Prompt]:
    """Read every prompt at ``path`` (None = the embedded sample set), before any filtering."""
    if path is not None and str(path).startswith("embedded:"):
        path = embedded_set_path(str(path))
    root = sample_set_path() if path is None else Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path={str(root)!r} does not exist")
    if root.is_dir():
        if (root / "dataset_info.json").is_file() or (root / "state.json").is_file():
            columns, rows = _read_datasets_folder(root)
            return _rows_to_prompts(root, root.name, columns, rows, None)
        return _read_or_bench_folder(root, splits)
    if splits:
        raise DataError(f"data.splits={list(splits)} chooses OR-Bench files, but data.path={str(root)!r} is one file")
    columns, rows = _read_file(root)
    label = OR_BENCH_FILES.get(root.stem)
    prompts = _rows_to_prompts(root, root.stem, columns, rows, label)
    if label is None and "label" not in columns:
        logger.info("%s has no label column: its %d prompts are %r", root, len(prompts), UNLABELED)
    return prompts


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def deduplicate(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Keep the first row of each prompt text; report how many were dropped (and label conflicts)."""
    first: dict[str, Prompt] = {}
    dropped: Counter[tuple[str, str]] = Counter()
    conflicts = []
    for p in prompts:
        seen = first.get(p.prompt)
        if seen is None:
            first[p.prompt] = p
            continue
        dropped[(p.source, seen.source)] += 1
        if seen.label != p.label:
            conflicts.append(p.prompt)
    if dropped:
        detail = ", ".join(f"{n} of {src} already in {orig}" for (src, orig), n in dropped.items())
        logger.warning("dropped %d duplicated prompt(s): %s", sum(dropped.values()), detail)
    if conflicts:
        logger.warning(
            "%d duplicated prompt(s) carry different labels; the first file's label was kept, e.g. %r",
            len(conflicts),
            conflicts[0][:80],
        )
    return list(first.values())


def select_prompts(prompts: Sequence[Prompt], cfg: DataConfig) -> list[Prompt]:
    """Filter categories, balance, cap per category and label, and shuffle with ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    found = sorted({p.category for p in prompts})
    if cfg.categories:
        unknown = [c for c in cfg.categories if c not in found]
        if unknown:
            raise DataError(f"data.categories: unknown category {unknown}; categories in the data: {found}")
        prompts = [p for p in prompts if p.category in set(cfg.categories)]
    groups: dict[tuple[str, str], list[Prompt]] = defaultdict(list)
    for p in prompts:
        groups[(p.category, p.label)].append(p)
    if cfg.category_balance_strategy == "balance_labels":
        by_category: dict[str, dict[str, list[Prompt]]] = defaultdict(dict)
        for (category, label), rows in groups.items():
            by_category[category][label] = rows
        groups = {}
        for category, labels in by_category.items():
            n = min(len(labels.get(label, [])) for label in LABELS)
            if n == 0:
                logger.warning("category %r has no %s prompts; balance_labels drops it", category,
                               " or ".join(label for label in LABELS if not labels.get(label)))
                continue
            for label in LABELS:
                groups[(category, label)] = rng.sample(labels[label], n)
    selected: list[Prompt] = []
    for key in sorted(groups):
        rows = groups[key]
        cap = cfg.max_samples_per_category
        if cap is not None and len(rows) > cap:
            rows = rng.sample(rows, cap)
        selected += rows
    if not selected:
        raise DataError(
            f"no prompts left after filtering (data.categories={list(cfg.categories)}, "
            f"data.category_balance_strategy={cfg.category_balance_strategy!r}); categories in the data: {found}"
        )
    rng.shuffle(selected)
    return selected


def load_prompts(cfg: DataConfig) -> list[Prompt]:
    """Read, de-duplicate and select the prompts of a data config."""
    prompts = deduplicate(read_prompts(cfg.path, cfg.splits))
    selected = select_prompts(prompts, cfg)
    counts = Counter((p.category, p.label) for p in selected)
    logger.info(
        "%d prompts: %s",
        len(selected),
        ", ".join(f"{label} {sum(n for (c, lab), n in counts.items() if lab == label)}" for label in sorted({p.label for p in selected})),
    )
    return selected


def read_harmless(path: str | Path | None) -> list[Prompt]:
    """Plain harmless instructions: ``path`` (a file or datasets folder with a ``prompt`` column; ``category``
    optional; or an embedded set's name, ``embedded:harmless*``) or, when None, the embedded default
    (``embedded:harmless``). Labelled ``harmless``; category ``harmless`` when absent."""
    name = "embedded:harmless" if path is None else str(path)
    if name.startswith("embedded:") and name not in HARMLESS_SETS:
        raise DataError(f"direction.harmless={name!r}: allowed embedded sets: {', '.join(HARMLESS_SETS)}, "
                        "or a file or datasets folder with a 'prompt' column")
    root = embedded_set_path(name) if name in HARMLESS_SETS else Path(path).expanduser()
    if not root.exists():
        raise DataError(f"direction.harmless={str(root)!r} does not exist")
    if root.is_dir():
        columns, rows = _read_datasets_folder(root)
    else:
        columns, rows = _read_file(root)
    if "prompt" not in columns:
        raise DataError(f"direction.harmless={str(root)!r}: no 'prompt' column; found columns {columns}")
    out = []
    for i, row in enumerate(rows):
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"direction.harmless={str(root)!r}: row {i} has no prompt text ({text!r})")
        category = row.get("category") if isinstance(row.get("category"), str) and row.get("category") else HARMLESS
        out.append(Prompt(f"{HARMLESS}:{i}", text.strip(), category.strip(), HARMLESS, root.stem))
    return out


def load_harmless(path: str | Path | None, samples: int | None, seed: int) -> list[Prompt]:
    """The harmless contrast prompts, de-duplicated, at most ``samples`` of them drawn with ``seed``."""
    prompts = deduplicate(read_harmless(path))
    if samples is not None and len(prompts) > samples:
        prompts = random.Random(seed).sample(prompts, samples)
    logger.info("%d harmless prompts", len(prompts))
    return prompts
