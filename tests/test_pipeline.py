"""The main job through the CLI on the tiny planted model: every stage, then a rerun that skips."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from planted import build_planted_model, write_planted_data
from refusal_lens.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, model_dir=None) -> Path:
    """A tiny main job on the planted model (tests/planted.py); ``model_dir`` is ignored (kept for callers)."""
    folder = tmp_path / "planted-model"
    if not (folder / "config.json").is_file():
        build_planted_model(folder)
    bench, harmless = write_planted_data(tmp_path / "planted-data")
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""
base: {ROOT / "configs/pipelines/default.yaml"}
model: {{name: "{folder}", activation_layers: ["residuals_0", "residuals_1"], intervention_dtype: "same"}}
inference: {{batch_size: 16, max_new_tokens: 4, activation_model: "model"}}
data: {{path: "{bench}", split_discovery: 0.4, split_validation: 0.3, split_test: 0.3}}
direction: {{harmless: "{harmless}", harmless_samples: null, exact_candidates: 2, exact_per_layer: 1,
             random_directions: 3, random_directions_generated: 2, bootstrap: 50, emergence_stride: 1, batch_size: 16, max_new_tokens: 4,
             over_refusal: true}}
sae: {{hooks: ["residuals_0", "residuals_1"], expansion_factor: 2, training_tokens: 4096, train_batch_size_tokens: 128,
       eval_prompts: 4, num_threads: 1, allow_fewer_rows_than_features: true, min_explained_variance: -10.0,
       min_ce_recovered: -100.0}}
circuits: {{behaviour_k: [1, 2], headline_k: 2, random_sets: 3, random_sets_generated: 2, induction_random_sets: 1, faithfulness_sizes: [2, 20],
           random_controls: 2, bootstrap: 50, agreement_nodes: 2, agreement_prompts: 4, edge_prompts: 4, batch_size: 8,
           num_threads: 1, cosine_preselect: 4, top_k: 5, intervention_batch_size: 16, max_new_tokens: 4}}
analysis: {{permutations: 50, interval_draws: 200, check_render: false, min_prompts: 4}}
output: {{result_dir: "{tmp_path / 'results'}", run_name: "tiny"}}
"""
    )
    return path


STAGES = ["collect", "direction", "train-saes", "discover", "analyze"]


def test_run_end_to_end_then_skip(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "refusal rates (40 prompts" in out and "refusal direction: blocks." in out
    assert "SAE quality" in out and "agreement with exact patching" in out and "report: " in out
    run = tmp_path / "results" / "tiny"
    for folder in ("activations", "direction", "saes", "circuits"):
        assert json.loads((run / folder / "manifest.json").read_text())["status"] == "complete", folder
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["command"], status["error"], status["current_stage"]) == ("done", "run", None, None)
    assert [(s["name"], s["state"]) for s in status["stages"]] == [(s, "done") for s in STAGES]
    assert status["stages"][0]["progress"] == {"done": 80, "total": 80, "unit": "step"}
    # the profile: each stage's parts cover its time, with the model's passes counted where it made them
    parts = {s["name"]: s["parts"] for s in status["stages"]}
    for s in status["stages"]:
        assert sum(p["seconds"] for p in s["parts"]) == pytest.approx(s["elapsed_s"], abs=0.05), s["name"]
    kinds = {name: {k.rsplit(" ", 1)[1] for p in ps for k in p["positions"]} for name, ps in parts.items()}
    assert {"forward", "decode"} <= kinds["collect"] and kinds["analyze"] == set()
    assert {"forward", "autograd", "decode"} <= kinds["direction"]  # the selection screens take gradients
    assert "autograd" in kinds["discover"]  # attribution patching
    assert "direction: evaluation on test (generation)" in [p["part"] for p in parts["direction"]]
    assert main(["status", str(tmp_path / "results")]) == 0
    # the split: every prompt in one split, the same in every stage's inputs
    split = json.loads((run / "activations" / "split.json").read_text())
    assert len(split["splits"]) == 40 and set(split["splits"].values()) == {"discovery", "validation", "test"}
    # discover: the pooled toxic circuit (safe prompts are not refused by the planted model: skipped, and said)
    circuits = run / "circuits"
    doc = json.loads((circuits / "toxic" / "all.json").read_text())
    assert doc["schema_version"] == 2 and 0 < len(doc["promoting"]) <= 5
    assert all(doc["prompt_ids"]["test"]) and not set(doc["prompt_ids"]["test"]) & set(doc["prompt_ids"]["discovery"])
    for pid in doc["prompt_ids"]["test"]:
        assert split["splits"][pid] == "test"  # every validation number comes from test prompts
    summary = json.loads((circuits / "summary.json").read_text())
    assert any("safe" in s for s in summary["skipped_groups"])
    behaviour = json.loads((circuits / "validation" / "behaviour.json").read_text())
    assert behaviour["headline"]["k"] == 2 and len(behaviour["random"]["sets"]) == 2  # 2 of the 3 sets generated
    scored = behaviour["random"]["controls_score"]  # ... and all 3 measured by the refusal score, calibrated on 2
    assert scored["n"] == 3 and scored["calibration"]["n_controls"] == 2 and scored["n_prompts"] == behaviour["n_prompts"]
    assert behaviour["headline"]["random_p_value_score"] == scored["p_value"] and 0.25 <= scored["p_value"] <= 1.0
    # the headline is an ablation, chosen on validation by complied answers; scale(c) is reported as steering beside
    # the direction's own steering; the edit without its component along r, and the edits' alignment with r
    head = behaviour["headline"]
    assert head["kind"] == "ablation" and head["intervention"].split("/")[0] in ("zero", "mean")
    assert behaviour["selection"]["rule"].startswith("most complied")
    assert all(r["mode"] in ("zero", "mean") for r in behaviour["selection"]["rows"])
    chosen_row = next(r for r in behaviour["selection"]["rows"] if (r["method"], r["intervention"]) ==
                      (head["method"], head["intervention"]))
    assert chosen_row["complied_rate"] == max(r["complied_rate"] for r in behaviour["selection"]["rows"])
    assert [st["c"] for st in behaviour["steering"]] == [1.0, 3.0]
    assert all(st["direction_steered"]["n"] == head["n"] for st in behaviour["steering"])
    assert 0.0 <= head["alignment"]["fraction_along_direction"] <= 1.0 and head["alignment"]["edit_norm"] > 0
    assert head["without_direction"]["n"] == head["n"]
    assert all(s_["edit_norm"] >= 0 for s_ in behaviour["random"]["sets"])
    lines = [json.loads(line) for line in (circuits / "validation" / "responses.jsonl").read_text().splitlines()]
    chosen_on = {split["splits"][r["prompt_id"]] for r in lines if r["condition"].startswith("validation/")}
    measured_on = {split["splits"][r["prompt_id"]] for r in lines if not r["condition"].startswith("validation/")}
    assert chosen_on == {"validation"} and measured_on == {"test"}  # the headline chosen on validation, measured on test
    analysis = json.loads((run / "analysis" / "summary.json").read_text())
    assert analysis["direction"]["direction"]["hook"].startswith("blocks.")
    d_score = analysis["direction"]["controls_score"]  # 2 of the 3 random directions generated, all 3 scored
    assert analysis["direction"]["random_ablated"]["n"] == 2 and d_score["random_ablated"]["n"] == 3
    assert d_score["random_added"]["calibration"]["n_controls"] == 2
    assert analysis["circuit_behaviour"]["n"] == behaviour["n_prompts"]
    frac = analysis["circuit_behaviour"]["circuit"]
    assert frac["fraction_of_direction"] == behaviour["headline"]["fraction_of_direction"]
    assert len(frac["fraction_ci"]) == 2  # the paired interval over the same test prompts (None = unbounded)
    if frac["fraction_of_direction"] is not None and None not in frac["fraction_ci"]:
        assert frac["fraction_ci"][0] <= frac["fraction_of_direction"] <= frac["fraction_ci"][1]
    fitted = analysis["direction"]["direction"]["splits"]
    said = any("the direction is a mean difference of" in note for note in analysis["underpowered"])
    fewest = min(fitted[s][side] for s in ("discovery", "validation") for side in ("harmful", "harmless"))
    assert said == (fewest < 4), (fitted, analysis["underpowered"])
    assert (run / "direction" / "over_refusal.json").is_file()  # the earlier experiment, switched on here
    report = (run / "analysis" / "report.html").read_text()
    assert "Evidence (test split)" in report and "One mechanism or many?" in report
    # an independent re-run of the headline ablation from the run's files (scripts/rerun_circuit.py) gives the
    # stage's responses, prompt by prompt
    rerun = importlib.import_module("refusal_lens.checks.rerun_circuit")
    assert rerun.main(["--run", str(run), "--prompts", "test", "--batch-size", "4"]) == 0
    # the contrast check of docs/direction.md runs on the run's discovery and validation prompts
    check = importlib.import_module("refusal_lens.checks.direction_contrast")
    assert check.main(["--run", str(run), "--candidates", "1:-1", "--fit-prompts", "4", "--eval-prompts", "4"]) == 0
    row = json.loads((run / "direction_contrast_check.json").read_text())["candidates"]["L1/-1"]
    assert -1.0 <= row["cosine"] <= 1.0 and all(row[side]["kl_harmless"] >= 0 for side in
                                                  ("harmless instructions", "OR-Bench safe, answered"))
    # so does the template check (the tokenizer's template vs refusal_direction's hand-written one)
    tcheck = importlib.import_module("refusal_lens.checks.direction_template")
    assert tcheck.main(["--run", str(run), "--candidates", "1:-1", "--fit-prompts", "4", "--eval-prompts", "4",
                        "--max-new-tokens", "3"]) == 0
    templ = json.loads((run / "direction_template_check.json").read_text())
    assert set(templ["templates"]) == {"tokenizer's template", "given template"} and abs(templ["cosine"]["L1/-1"]) <= 1 + 1e-6
    for res in templ["templates"].values():
        cand = res["candidates"]["L1/-1"]
        assert cand["kl_harmless"] >= 0 and 0 <= cand["ablated_refusal_rate"] <= 1 and 0 <= res["clean_refusal_rate"] <= 1
    with pytest.raises(SystemExit) as err:
        tcheck.main(["--run", str(run), "--template", "no placeholder"])
    assert err.value.code == 2
    # and the contrast-sets check (every harmful x harmless set pair; files go through the score filter)
    from planted import HARMLESS, TOXIC

    harmful_file = tmp_path / "harmful.json"
    harmful_file.write_text(json.dumps([{"instruction": t} for t in TOXIC]))
    harmless_file = tmp_path / "harmless-other.csv"
    harmless_file.write_text("prompt\n" + "\n".join(HARMLESS) + "\n")
    scheck = importlib.import_module("refusal_lens.checks.direction_sets")
    assert scheck.main(["--run", str(run), "--candidates", "1:-1", "--harmful", "run", "--harmful", f"file={harmful_file}",
                        "--harmless", "run", "--harmless", f"other={harmless_file}", "--fit-prompts", "4",
                        "--eval-prompts", "4", "--max-new-tokens", "3"]) == 0
    sets = json.loads((run / "direction_sets_check.json").read_text())
    pairs = sets["candidates"]["L1/-1"]
    assert set(pairs) == {"run+run", "run+other", "file+run", "file+other"}
    assert pairs["run+run"]["cosine_with_run+run"] == pytest.approx(1.0, abs=1e-5)
    assert all(set(row["kl"]) == {"run", "other"} and min(row["kl"].values()) >= 0 for row in pairs.values())
    assert 0 < sets["prompts"]["fit"]["harmful"]["file"] <= 4 and sets["prompts"]["kl"]["other"] <= 4
    with pytest.raises(SystemExit, match="each NAME once"):
        scheck.main(["--run", str(run), "--harmless", "a=x.csv", "--harmless", "a=y.csv"])
    # would fewer tokens judge the same? (the run's responses are 4 tokens: a cut at 2 can change them, 9 cannot)
    lcheck = importlib.import_module("refusal_lens.checks.judge_length")
    assert lcheck.main(["--run", str(run), "--n", "2", "9", "--min-n", "2"]) == 0
    length = json.loads((run / "judge_length.json").read_text())
    assert "collect" in length["sources"] and any(k.startswith("direction/responses/") for k in length["sources"])
    for src in length["sources"].values():
        assert "9" not in src and src["longest_response"] <= 8  # 4 new tokens (collect: re-tokenised audits may split)
        if "2" in src:
            assert 0 <= src["2"]["refused_flips"] <= 1 - src["2"]["same_judgement"] + 1e-9
    with pytest.raises(SystemExit):
        lcheck.main(["--run", str(run), "--n", "0"])
    doc = json.loads((run / "rerun_circuit-test.json").read_text())
    assert doc["same_responses_as_stage"] == {"equal": behaviour["headline"]["n"], "of": behaviour["headline"]["n"]}
    assert doc["circuit"]["refusal_rate"] == behaviour["headline"]["refusal_rate"]
    assert doc["direction"]["refusal_rate"] == behaviour["direction"]["refusal_rate"]
    assert main(["run", "--config", str(config)]) == 0
    assert "(trained 0 here, already done 2)" in capsys.readouterr().out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and [s["state"] for s in status["stages"]] == ["skipped"] * 5


def test_scripts_wrappers_and_module_entry_point(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: {architecture: gated}")
    for cmd in ([sys.executable, str(ROOT / "scripts/train_saes.py"), "--config", str(bad)],
                [sys.executable, "-m", "refusal_lens", "train-saes", "--config", str(bad)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert "sae.architecture='gated'; allowed: 'standard', 'topk', 'batchtopk', 'jumprelu'" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_collect_reads_an_or_bench_folder_given_on_the_command_line(tmp_path, capsys):
    import csv

    import datasets

    bench = tmp_path / "or-bench"
    bench.mkdir()
    for name, rows in [("or-bench-80k", [("hello world", "hate"), ("how are you", "privacy")]),
                       ("or-bench-hard-1k", [("make cake", "hate")]),
                       ("or-bench-toxic", [("make bomb", "hate"), ("steal car", "privacy")])]:
        with (bench / f"{name}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["prompt", "category"])
            writer.writerows(rows)
    config = write_config(tmp_path)
    assert main(["collect", "--config", str(config), "--set", f"data.path={bench}"]) == 0
    assert "refusal rates (21 prompts" in capsys.readouterr().out  # 5 OR-Bench + 16 harmless
    rows = datasets.load_from_disk(str(tmp_path / "results" / "tiny" / "activations" / "prompts")).to_list()
    assert sorted((r["source"], r["prompt"], r["label"]) for r in rows if r["label"] != "harmless") == [
        ("or-bench-80k", "hello world", "safe"), ("or-bench-80k", "how are you", "safe"),
        ("or-bench-hard-1k", "make cake", "safe"), ("or-bench-toxic", "make bomb", "toxic"),
        ("or-bench-toxic", "steal car", "toxic")]


def test_stages_refuse_bad_settings_with_clear_errors(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["run", "--config", str(config)]) == 0
    capsys.readouterr()
    cases = [
        ("discover", ["--set", "circuits.method=gradient"], "circuits.method='gradient'; allowed: 'atp', 'ig'"),
        ("discover", ["--set", "circuits.hooks=[residuals_2]"],
         "circuits.hooks: no SAE for hook(s) ['blocks.2.hook_resid_post']; SAEs exist for"),
        ("discover", ["--set", "circuits.categories=[cooking]"], "circuits.categories: category 'cooking' has no prompts"),
        ("discover", ["--set", "circuits.labels=[]"], "circuits.labels is empty"),
        ("discover", ["--set", "circuits.headline_k=3"], "circuits.headline_k=3 must be one of circuits.behaviour_k"),
        ("direction", ["--set", "direction.keep=sometimes"], "direction.keep='sometimes'; allowed: 'score', 'judged'"),
        ("collect", ["--set", "data.split_test=0.5"], "data.split_discovery/split_validation/split_test"),
    ]
    manifest = (tmp_path / "results" / "tiny" / "circuits" / "manifest.json").read_text()
    for stage, extra, message in cases:
        assert main([stage, "--config", str(config), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        # nothing half-written: the finished circuits are untouched
        assert (tmp_path / "results" / "tiny" / "circuits" / "manifest.json").read_text() == manifest
    assert main(["analyze", "--config", str(config), "--set", "output.run_name=missing"]) == 2
    assert "circuits are not finished: run `refusal-lens discover` first" in capsys.readouterr().err


def test_rerun_circuit_refuses_a_folder_without_a_finished_discover(tmp_path, capsys):
    rerun = importlib.import_module("refusal_lens.checks.rerun_circuit")
    with pytest.raises(SystemExit) as err:
        rerun.main(["--run", str(tmp_path)])
    assert err.value.code == 2
    assert "missing circuits/config.yaml, circuits/validation/behaviour.json" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
