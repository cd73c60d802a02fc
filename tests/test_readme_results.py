"""The README's results section is generated from the recorded analysis summaries (docs/results/*.json)."""

import json

import pytest

from refusal_lens.readme_results import BEGIN, END, RESULTS, ROOT, render, render_run


def test_the_readme_section_is_what_the_recorded_summaries_render():
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, "README.md lost its results markers"
    section = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert section == render(RESULTS), "README.md results are stale: run `.venv/bin/python -m refusal_lens.readme_results`"


def test_every_recorded_run_states_its_timing_and_its_underpowered_entries():
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        pytest.skip("no recorded run yet")
    for path in files:
        summary = json.loads(path.read_text())
        lines = render_run(path.stem, summary)
        assert any("Measured" in line and "min" in line for line in lines), path
        if summary.get("underpowered"):
            assert any(line.startswith("Underpowered here") for line in lines), path


def test_an_independent_rerun_is_attached_to_its_record(tmp_path):
    from refusal_lens.readme_results import attach_rerun

    (tmp_path / "main_job.json").write_text(json.dumps({"model": "m"}))
    rerun = {"prompts": "other", "clean": {"n": 4}, "circuit": {"n": 4}, "direction": {"n": 4}, "responses": ["..."],
             "fraction_of_direction": 1.5, "fraction_ci": [1.0, None], "stage": {"n": 3}}
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    record = json.loads(attach_rerun("main_job", tmp_path / "rerun.json", tmp_path).read_text())
    assert record["model"] == "m" and record["rerun"]["fraction_ci"] == [1.0, None]
    assert "responses" not in record["rerun"]  # the record keeps the numbers, the run folder the responses


def test_the_timing_line_names_the_dtype_the_interventions_ran_in():
    from refusal_lens.readme_results import timing_lines

    t = {"date": "d", "commit": "c", "machine": "m", "total_s": 600.0, "stages": {"collect": 60.0}}
    assert "dtype" not in timing_lines(t)[0] and "interventions in" not in timing_lines(t)[0]  # older records
    line = timing_lines({**t, "intervention_dtype": "float32"})[0]
    assert line.startswith("Measured d at commit c on m; generation and interventions in float32: **10.0 min**")
