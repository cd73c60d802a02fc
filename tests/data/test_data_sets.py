"""The embedded prompt sets: counts per category and label, no duplicates, the large set holds the sample set."""

import csv
import re
import tomllib
from collections import Counter
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import pytest

from refusal_lens.data.prompts import CATEGORIES, OR_BENCH_FILES, read_prompts, sample_set_path

DATA = Path(str(resources.files("refusal_lens") / "data"))
LARGE = DATA / "or_bench_large"
#: the harmless sets: varied task instructions (the default, ``embedded:harmless``) and how-to questions
HARMLESS = {"instructions": DATA / "harmless" / "instructions.csv", "questions": DATA / "harmless" / "questions.csv"}
#: rows per category in each file of the large set as first written (its first 600 / 200 / 200 rows)
LARGE_PER_CATEGORY = {"or-bench-toxic": 60, "or-bench-80k": 20, "or-bench-hard-1k": 20}
#: rows appended later (2026-12-02) so that every refused category x label group of the `full` run's test split
#: reaches analysis.min_prompts: seemingly toxic prompts where the model refuses least, and toxic deception
LARGE_ADDED = {("or-bench-hard-1k", "privacy"): 80, ("or-bench-hard-1k", "sexual"): 65,
               ("or-bench-hard-1k", "harmful"): 62, ("or-bench-hard-1k", "self-harm"): 56,
               ("or-bench-hard-1k", "illegal"): 20, ("or-bench-hard-1k", "unethical"): 16,
               ("or-bench-hard-1k", "hate"): 10, ("or-bench-hard-1k", "violence"): 10,
               ("or-bench-hard-1k", "harassment"): 8, ("or-bench-toxic", "deception"): 15}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def read_harmless(name: str) -> tuple[list[str], list[dict]]:
    with HARMLESS[name].open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def large():
    return read_prompts(LARGE)


def test_large_set_counts_per_file_category_and_label(large):
    counts = Counter((p.source, p.category) for p in large)
    expected = Counter({(s, c): n for s, n in LARGE_PER_CATEGORY.items() for c in CATEGORIES}) + Counter(LARGE_ADDED)
    assert counts == expected
    assert {p.source: p.label for p in large} == OR_BENCH_FILES
    assert Counter(p.label for p in large) == {"toxic": 615, "safe": 727}


def test_large_set_keeps_its_first_rows_in_place(large):
    """Rows were only appended: the first rows of every file (and so their prompt ids) are the original ones."""
    for source, per_category in LARGE_PER_CATEGORY.items():
        first = [p for p in large if p.source == source][:per_category * len(CATEGORIES)]
        assert Counter(p.category for p in first) == {c: per_category for c in CATEGORIES}


def test_large_set_has_no_duplicates_within_or_across_files(large):
    seen = Counter(normalise(p.prompt) for p in large)
    assert [t for t, n in seen.items() if n > 1] == []


def test_large_set_contains_every_sample_row(large):
    rows = {(p.source, p.prompt, p.category) for p in large}
    sample = read_prompts(sample_set_path())
    assert len(sample) == 120  # the sample set: 30 + 30 safe, 60 toxic
    assert [p.prompt for p in sample if (p.source, p.prompt, p.category) not in rows] == []


@pytest.mark.parametrize(("name", "n_rows"), [("instructions", 400), ("questions", 299)])
def test_harmless_rows_topics_and_no_overlap_with_large_set(large, name, n_rows):
    columns, rows = read_harmless(name)
    assert columns == ["prompt", "category"]
    assert len(rows) == n_rows
    assert all(r["prompt"].strip() and r["category"].strip() for r in rows)
    topics = Counter(r["category"] for r in rows)
    assert len(topics) >= 10 and not set(topics) & set(CATEGORIES)
    texts = Counter(normalise(r["prompt"]) for r in rows)
    assert [t for t, n in texts.items() if n > 1] == []
    assert set(texts) & {normalise(p.prompt) for p in large} == set()


def test_harmless_sets_do_not_overlap_and_the_instructions_vary_in_form():
    """The default set is written in varied task forms (not mostly how-to questions like the other set)."""
    instructions = [normalise(r["prompt"]) for r in read_harmless("instructions")[1]]
    questions = {normalise(r["prompt"]) for r in read_harmless("questions")[1]}
    assert set(instructions) & questions == set()
    first_words = Counter(t.split()[0] for t in instructions)
    assert (first_words["how"] + first_words["what"]) / len(instructions) < 0.15
    assert len(first_words) >= 40


def test_embedded_harmless_names():
    from refusal_lens.data.prompts import DataError, read_harmless as read

    assert len(read(None)) == len(read("embedded:harmless")) == 400
    assert len(read("embedded:harmless-questions")) == 299
    with pytest.raises(DataError, match="embedded:harmless-questions"):
        read("embedded:large")


def test_every_embedded_csv_is_package_data():
    with (Path(__file__).parents[2] / "pyproject.toml").open("rb") as fh:
        globs = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["refusal_lens"]
    files = sorted(p.relative_to(DATA.parent).as_posix() for p in DATA.rglob("*.csv"))
    assert len(files) == 8
    assert [f for f in files if not any(fnmatch(f, g) for g in globs)] == []
