"""The main job through the CLI on a tiny random model: every existing stage, then a rerun that skips."""

import json
import subprocess
import sys
from pathlib import Path

from refusal_lens.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, model_dir) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""
base: {ROOT / "configs/pipelines/default.yaml"}
model: {{name: "{model_dir}", activation_layers: ["residuals_all", "mlp_1"]}}
inference: {{batch_size: 16, max_new_tokens: 4}}
data: {{max_samples_per_category: 2}}
sae: {{hooks: ["residuals_1", "mlp_1"], training_tokens: 4096, train_batch_size_tokens: 128, eval_prompts: 4,
       num_threads: 1}}
circuits: {{hooks: ["residuals_1", "mlp_1"], select: "all", agreement_prompts: 2, agreement_nodes: 3, ig_steps: 3,
           faithfulness_sizes: [5, 50], faithfulness_prompts: 4, bootstrap: 50, behaviour_prompts: 4, batch_size: 16,
           num_threads: 1, direction_layer: 1}}
analysis: {{permutations: 50, bootstrap: 20, direction_prompts: 2, check_render: false}}
output: {{result_dir: "{tmp_path / 'results'}", run_name: "tiny"}}
"""
    )
    return path


def test_run_end_to_end_then_skip(tiny_model_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    assert main(["run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "refusal rates (40 prompts" in out and "SAE quality on held-out prompts" in out
    assert "agreement with exact patching" in out and "report: " in out
    run = tmp_path / "results" / "tiny"
    assert json.loads((run / "activations" / "manifest.json").read_text())["status"] == "complete"
    assert json.loads((run / "saes" / "manifest.json").read_text())["status"] == "complete"
    assert sorted(q["hook"] for q in json.loads((run / "saes" / "quality.json").read_text())) == [
        "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    status = json.loads((run / "status.json").read_text())  # the live status, as left by the finished job
    assert (status["state"], status["command"], status["error"], status["current_stage"]) == ("done", "run", None, None)
    assert [(s["name"], s["state"]) for s in status["stages"]] == [
        ("collect", "done"), ("train-saes", "done"), ("discover", "done"), ("analyze", "done")]
    collect, saes = status["stages"][:2]
    assert collect["progress"] == {"done": 40, "total": 40, "unit": "prompt"} and collect["summary"]["prompts"] == 40
    assert saes["progress"] == {"done": 2, "total": 2, "unit": "hook"} and saes["summary"]["saes"] == 2
    assert status["rates"] == json.loads((run / "activations" / "refusal_rates.json").read_text())
    assert main(["status", str(tmp_path / "results")]) == 0
    assert "40/40 prompt (100%)" in capsys.readouterr().out
    # discover: one circuit per label and category, and pooled; analyze: the report and its summary
    circuits = run / "circuits"
    cats = sorted({r["category"] for r in json.loads((circuits / "prompts.json").read_text())})
    for label in ("safe", "toxic"):
        assert sorted(p.stem for p in (circuits / label).glob("*.json")) == sorted([*cats, "all"])
        doc = json.loads((circuits / label / "all.json").read_text())
        assert doc["schema_version"] == 1 and len(doc["nodes"]) == 20
        assert all(n["ci_low"] <= n["effect"] <= n["ci_high"] for n in doc["nodes"])
        assert {"faithfulness", "curve", "agreement"} <= set(doc["validation"])
    agree = json.loads((circuits / "validation" / "agreement.json").read_text())
    assert set(agree["methods"]) == {"atp", "ig"} and agree["n_nodes"] == 2 * 4  # 2 hooks x (3 + error node)
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert set(summary["modularity"]["verdicts"]) == {"safe x safe", "toxic x toxic", "safe x toxic"}
    report = (run / "analysis" / "report.html").read_text()
    assert "One mechanism or many?" in report and "Where refusal emerges" in report
    assert main(["run", "--config", str(config)]) == 0
    assert "(trained 0 here, already done 2)" in capsys.readouterr().out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and [s["state"] for s in status["stages"]] == ["skipped"] * 4


def test_scripts_wrappers_and_module_entry_point(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: {architecture: gated}")
    for cmd in ([sys.executable, str(ROOT / "scripts/train_saes.py"), "--config", str(bad)],
                [sys.executable, "-m", "refusal_lens", "train-saes", "--config", str(bad)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert "sae.architecture='gated'; allowed: 'standard', 'topk', 'batchtopk', 'jumprelu'" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_torchrun_splits_sae_hooks_across_ranks(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from conftest import run_cli

    config = write_config(tmp_path, tiny_model_dir)
    run_cli(["run", "--config", str(config)])
    run_cli(["run", "--config", str(config), "--set", "output.run_name=two"], nproc=2, port=29519)
    for hook in ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"):
        a = load_file(tmp_path / "results" / "tiny" / "saes" / hook / "sae_weights.safetensors")
        b = load_file(tmp_path / "results" / "two" / "saes" / hook / "sae_weights.safetensors")
        for k in a:  # each hook trained on one rank equals the single-process SAE
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    quality = json.loads((tmp_path / "results" / "two" / "saes" / "quality.json").read_text())
    assert len(quality) == 2


def test_collect_reads_an_or_bench_folder_given_on_the_command_line(tiny_model_dir, tmp_path, capsys):
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
    config = write_config(tmp_path, tiny_model_dir)
    assert main(["collect", "--config", str(config), "--set", f"data.path={bench}",
                 "--set", "data.max_samples_per_category=null"]) == 0
    assert "refusal rates (5 prompts" in capsys.readouterr().out
    rows = datasets.load_from_disk(str(tmp_path / "results" / "tiny" / "activations" / "prompts")).to_list()
    assert sorted((r["source"], r["prompt"], r["label"]) for r in rows) == [
        ("or-bench-80k", "hello world", "safe"), ("or-bench-80k", "how are you", "safe"),
        ("or-bench-hard-1k", "make cake", "safe"), ("or-bench-toxic", "make bomb", "toxic"),
        ("or-bench-toxic", "steal car", "toxic")]


def test_discover_refuses_bad_settings_with_clear_errors(tiny_model_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    assert main(["run", "--config", str(config)]) == 0
    capsys.readouterr()
    cases = [
        (["--set", "circuits.method=gradient"], "circuits.method='gradient'; allowed: 'atp', 'ig', 'exact'"),
        (["--set", "circuits.hooks=[residuals_0]"],
         "circuits.hooks: no SAE for hook(s) ['blocks.0.hook_resid_post']; SAEs exist for"),
        (["--set", "circuits.categories=[cooking]"], "circuits.categories: category 'cooking' has no prompts; categories in"),
        (["--set", "circuits.labels=[]"], "circuits.labels is empty"),
        (["--set", "circuits.direction_layer=7"], "circuits.direction_layer=7: no resid_post activations there; "
                                                   "collected layers: [0, 1, 2]"),
        (["--set", "circuits.method=exact", "--set", "circuits.positions=per_position", "--set", "circuits.window=8"],
         "circuits.method='exact' needs one forward pass per node (4112 nodes here, limit 4096)"),
    ]
    circuits_manifest = (tmp_path / "results" / "tiny" / "circuits" / "manifest.json").read_text()
    for extra, message in cases:
        assert main(["discover", "--config", str(config), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        # nothing half-written: the finished circuits are untouched
        assert (tmp_path / "results" / "tiny" / "circuits" / "manifest.json").read_text() == circuits_manifest
    assert main(["analyze", "--config", str(config), "--set", "output.run_name=missing"]) == 2
    assert "no circuits at" in capsys.readouterr().err


def test_discover_other_metric_baseline_and_rule(tiny_model_dir, tmp_path, capsys):
    """The projection metric, the direction-ablated baseline, per-position nodes and the faithfulness rule,
    end to end on the tiny model."""
    config = write_config(tmp_path, tiny_model_dir)
    assert main(["run", "--config", str(config)]) == 0
    settings = ["--set", "circuits.metric=direction_projection", "--set", "circuits.baseline=direction_ablated",
                "--set", "circuits.rule=faithfulness", "--set", "circuits.target_faithfulness=0.5",
                "--set", "circuits.positions=per_position", "--set", "circuits.window=2"]
    assert main(["discover", "--config", str(config), "--force", *settings]) == 0
    circuits = tmp_path / "results" / "tiny" / "circuits"
    space = json.loads((circuits / "space.json").read_text())
    assert (space["metric"], space["baseline"], space["window"]) == ("direction_projection", "direction_ablated", 2)
    doc = json.loads((circuits / "toxic" / "all.json").read_text())
    sizes = [p["size"] for p in doc["validation"]["curve"]["points"]]
    reached = [p["size"] for p in doc["validation"]["curve"]["points"] if (p["faithfulness"] or 0) >= 0.5]
    assert len(doc["nodes"]) == (reached[0] if reached else sizes[-1])
    assert {n["position"] for n in doc["nodes"]} <= {-1, -2}
    assert json.loads((circuits / "summary.json").read_text())["behaviour"] is None  # no generation with this baseline
    assert main(["analyze", "--config", str(config), *settings]) == 0
    assert "report: " in capsys.readouterr().out
    # a second run in the same results folder shows up side by side in the report
    import shutil

    shutil.copytree(tmp_path / "results" / "tiny", tmp_path / "results" / "other-model")
    assert main(["analyze", "--config", str(config), "--force", *settings]) == 0
    summary = json.loads((tmp_path / "results" / "tiny" / "analysis" / "summary.json").read_text())
    assert summary["compared_runs"] == ["other-model", "tiny"]
    assert "Runs side by side" in (tmp_path / "results" / "tiny" / "analysis" / "report.html").read_text()
