"""Prompt loading: OR-Bench folders, single files, datasets folders, the sample set, and every error."""

import csv
import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refusal_lens.config import DataConfig
from refusal_lens.data.prompts import CATEGORIES, DataError, load_prompts, read_prompts, sample_set_path


def write_csv(path, rows, header=("prompt", "category")):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def or_bench(tmp_path):
    folder = tmp_path / "or-bench"
    folder.mkdir()
    write_csv(folder / "or-bench-80k.csv", [(f"safe {c} {i}", c) for c in ("hate", "privacy") for i in range(6)])
    write_csv(folder / "or-bench-hard-1k.csv", [("safe hate 0", "hate"), ("hard privacy", "privacy")])
    write_csv(folder / "or-bench-toxic.csv", [(f"toxic {c} {i}", c) for c in ("hate", "privacy") for i in range(2)])
    return folder


def test_sample_set_covers_all_categories_and_labels():
    prompts = read_prompts(None)
    assert {p.category for p in prompts} == set(CATEGORIES)
    for label in ("safe", "toxic"):
        for c in CATEGORIES:
            assert sum(p.label == label and p.category == c for p in prompts) >= 3
    assert sorted(p.name for p in sample_set_path().iterdir()) == [
        "or-bench-80k.csv", "or-bench-hard-1k.csv", "or-bench-toxic.csv"]
    assert len({p.prompt for p in prompts}) == len(prompts)


def test_or_bench_folder_sources_labels_and_duplicates(or_bench, caplog):
    with caplog.at_level(logging.WARNING):
        prompts = load_prompts(DataConfig(path=str(or_bench)))
    assert "dropped 1 duplicated prompt(s): 1 of or-bench-hard-1k already in or-bench-80k" in caplog.text
    assert len(prompts) == 12 + 1 + 4
    by_text = {p.prompt: p for p in prompts}
    assert by_text["hard privacy"].source == "or-bench-hard-1k" and by_text["hard privacy"].label == "safe"
    assert by_text["toxic hate 0"].label == "toxic" and by_text["toxic hate 0"].source == "or-bench-toxic"
    assert by_text["toxic hate 0"].id == "or-bench-toxic:0"


def test_splits_categories_cap_balance_and_seed(or_bench):
    only_toxic = load_prompts(DataConfig(path=str(or_bench), splits=("or-bench-toxic",)))
    assert {p.label for p in only_toxic} == {"toxic"} and len(only_toxic) == 4
    hate = load_prompts(DataConfig(path=str(or_bench), categories=("hate",)))
    assert {p.category for p in hate} == {"hate"}
    capped = load_prompts(DataConfig(path=str(or_bench), max_samples_per_category=1))
    assert len(capped) == 4  # 2 categories x 2 labels
    balanced = load_prompts(DataConfig(path=str(or_bench), category_balance_strategy="balance_labels"))
    for c in ("hate", "privacy"):
        assert sum(p.category == c and p.label == "safe" for p in balanced) == 2
        assert sum(p.category == c and p.label == "toxic" for p in balanced) == 2
    a = load_prompts(DataConfig(path=str(or_bench), seed=1))
    b = load_prompts(DataConfig(path=str(or_bench), seed=1))
    c = load_prompts(DataConfig(path=str(or_bench), seed=2))
    assert a == b and a != c and sorted(a, key=lambda p: p.id) == sorted(c, key=lambda p: p.id)


def test_single_files_and_datasets_folder(tmp_path):
    rows = [{"prompt": "a b", "category": "hate", "label": "toxic"}, {"prompt": "c d", "category": "hate", "label": "safe"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    write_csv(tmp_path / "p.csv", [(r["prompt"], r["category"], r["label"]) for r in rows], ("prompt", "category", "label"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for path in ("p.jsonl", "p.parquet", "p.csv", "ds"):
        got = read_prompts(tmp_path / path)
        assert [(p.prompt, p.category, p.label) for p in got] == [("a b", "hate", "toxic"), ("c d", "hate", "safe")], path
    write_csv(tmp_path / "or-bench-toxic.csv", [("x y", "hate")])
    assert read_prompts(tmp_path / "or-bench-toxic.csv")[0].label == "toxic"  # label from the OR-Bench file name
    write_csv(tmp_path / "mine.csv", [("x y", "hate")])
    assert read_prompts(tmp_path / "mine.csv")[0].label == "unlabeled"


@pytest.mark.parametrize(
    "setup, splits, fragment",
    [
        (lambda d: None, (), "does not exist"),
        (lambda d: d.mkdir(), (), "missing OR-Bench file(s)"),
        (lambda d: (d.mkdir(), write_csv(d / "or-bench-toxic.csv", [("a", "hate")])), ("or-bench-80k",),
         "missing OR-Bench file(s) ['or-bench-80k.csv']; found ['or-bench-toxic.csv']"),
        (lambda d: (d.mkdir(), write_csv(d / "or-bench-toxic.csv", [("a", "hate")], ("text", "category"))), (),
         "missing column(s) ['prompt']; found columns ['text', 'category']"),
        (lambda d: (d.mkdir(), write_csv(d / "or-bench-toxic.csv", [("", "hate"), ("b", "")])), (),
         "2 row(s) without text in a required cell: row 2: prompt=''; row 3: category=''"),
    ],
)
def test_bad_data_errors(tmp_path, setup, splits, fragment):
    folder = tmp_path / "bench"
    setup(folder)
    with pytest.raises(DataError) as info:
        load_prompts(DataConfig(path=str(folder), splits=splits))
    assert fragment in str(info.value)


def test_bad_cells_types_and_labels(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": 3, "category": "hate"}) + "\n")
    with pytest.raises(DataError, match="prompt=3"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "a", "category": "hate", "label": "bad"}) + "\n")
    with pytest.raises(DataError, match="label='bad' \\(allowed: safe, toxic\\)"):
        read_prompts(tmp_path / "q.jsonl")
    (tmp_path / "r.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        read_prompts(tmp_path / "r.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DataError, match="allowed: .csv, .jsonl, .json, .parquet"):
        read_prompts(tmp_path / "p.txt")


def test_unknown_category_and_empty_result(or_bench):
    with pytest.raises(DataError, match=r"unknown category \['weapons'\]; categories in the data: \['hate', 'privacy'\]"):
        load_prompts(DataConfig(path=str(or_bench), categories=("weapons",)))
    with pytest.raises(DataError, match="no prompts left after filtering"):
        load_prompts(DataConfig(path=str(or_bench), splits=("or-bench-toxic",), category_balance_strategy="balance_labels"))
    with pytest.raises(DataError, match="chooses OR-Bench files"):
        load_prompts(DataConfig(path=str(or_bench / "or-bench-toxic.csv"), splits=("or-bench-toxic",)))
