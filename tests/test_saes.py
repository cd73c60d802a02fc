"""SAE training from stored activations on a tiny random model: learning, save/load, skip/resume, errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from refusal_lens.activations.store import HookActivations
from refusal_lens.collect import collect
from refusal_lens.config import Config, ConfigError, InferenceConfig, ModelConfig, SAEConfig, load_config
from refusal_lens.prompts import Prompt
from refusal_lens.saes import stage as stage_mod
from refusal_lens.collect import load_collected
from refusal_lens.saes.data import activation_batches, epoch_order
from refusal_lens.saes.stage import SAEStageError, run_sae_stage, selected_hooks
from refusal_lens.saes.train import SAEConfigError, build_training_sae

WORDS = "hello world what is python code how are you make cake bake steal car print the a".split()


def many_prompts(n=48):
    rng = np.random.default_rng(0)
    return [
        Prompt(f"p:{i}", " ".join(rng.choice(WORDS, size=4 + i % 5)), ["hate", "privacy"][i % 2],
               "toxic" if i % 3 == 0 else "safe", "t")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from refusal_lens.models.loading import load_model

    root = tmp_path_factory.mktemp("run")
    cfg = Config(
        model=ModelConfig(name=str(tiny_model_dir), activation_layers=("residuals_1-2",)),
        inference=InferenceConfig(batch_size=8, max_new_tokens=6, positions="all", store_response_activations=True),
        sae=SAEConfig(expansion_factor=4, k=8, training_tokens=64 * 300, train_batch_size_tokens=64, log_every=25,
                      eval_prompts=6, min_explained_variance=0.3, min_ce_recovered=-10.0,
                      allow_fewer_rows_than_features=True),
    )
    loaded = load_model(cfg.model)
    collect(loaded, many_prompts(), cfg, root / "activations", show_progress=False)
    return cfg, loaded, root


def with_sae(cfg, **changes):
    return dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, **changes))


def test_training_learns_saves_and_reloads(tiny_run):
    from sae_lens import SAE

    cfg, loaded, root = tiny_run
    result = run_sae_stage(cfg, loaded, root / "activations", root / "saes", show_progress=False)
    assert result.trained == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    for hook in result.trained:
        log = [json.loads(line) for line in (root / "saes" / hook / "training_log.jsonl").read_text().splitlines()]
        assert len(log) == 12 and log[-1]["step"] == 300
        # a few hundred steps: explained variance rises and ends well above the start
        assert log[-1]["explained_variance"] > log[0]["explained_variance"] + 0.05
        metrics = json.loads((root / "saes" / hook / "metrics.json").read_text())
        assert metrics["explained_variance"] > 0.3  # test prompts, never trained on
        assert metrics["l0"] == pytest.approx(8.0)  # TopK k=8
        assert metrics["tokens_seen"] == 64 * 300 and metrics["epochs"] > 1
        assert metrics["kl_sae"] >= 0 and metrics["kl_mean"] >= 0 and metrics["scored_tokens"] > 0
        sae = SAE.load_from_disk(str(root / "saes" / hook))
        assert sae.cfg.metadata.hook_name == hook and sae.cfg.d_sae == 256
        assert sorted(p.name for p in (root / "saes" / hook).iterdir()) == [
            "cfg.json", "files.json", "metrics.json", "sae_weights.safetensors", "training_log.jsonl"]
    quality = json.loads((root / "saes" / "quality.json").read_text())
    assert [q["hook"] for q in quality] == result.trained
    assert selected_hooks(root / "saes") == [q["hook"] for q in quality if q["passes"]]
    assert (root / "saes" / "figures" / "layer_metrics.html").stat().st_size > 100_000  # plotly.js embedded


def test_save_load_round_trip_is_identical(tiny_run, tmp_path):
    from sae_lens import SAE

    cfg, _, root = tiny_run
    acts = HookActivations(root / "activations" / "blocks.1.hook_resid_post")
    sae = build_training_sae(cfg.sae, acts.width, acts.hook, "tiny")
    sae.save_inference_model(str(tmp_path / "sae"))
    loaded = SAE.load_from_disk(str(tmp_path / "sae"))
    x = acts.take(np.arange(20))
    with torch.no_grad():
        # the saved inference SAE (decoder norms folded in) reconstructs what the training SAE does
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)
    loaded.save_model(str(tmp_path / "again"))
    twice = SAE.load_from_disk(str(tmp_path / "again"))
    for k, v in twice.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k  # file round trip is bit-identical
    assert twice.cfg.to_dict() == loaded.cfg.to_dict()


def test_skip_resume_and_force(tiny_run, monkeypatch):
    cfg, loaded, root = tiny_run
    out = root / "saes_resume"
    calls = []
    real = stage_mod._train_one

    def counting(hook, *args, **kwargs):
        calls.append(hook)
        if hook == "blocks.2.hook_resid_post" and calls.count(hook) == 1:
            raise KeyboardInterrupt  # killed while training the second hook
        return real(hook, *args, **kwargs)

    monkeypatch.setattr(stage_mod, "_train_one", counting)
    small = with_sae(cfg, training_tokens=64 * 20)
    with pytest.raises(KeyboardInterrupt):
        run_sae_stage(small, loaded, root / "activations", out, show_progress=False)
    assert (out / "blocks.1.hook_resid_post" / "metrics.json").is_file()
    assert not (out / "blocks.2.hook_resid_post").exists() and (out / ".blocks.2.hook_resid_post.partial").exists()
    result = run_sae_stage(small, loaded, root / "activations", out, show_progress=False)
    assert result.skipped == ["blocks.1.hook_resid_post"] and result.trained == ["blocks.2.hook_resid_post"]
    assert not (out / ".blocks.2.hook_resid_post.partial").exists()
    again = run_sae_stage(small, loaded, root / "activations", out, show_progress=False)
    assert again.trained == [] and len(again.skipped) == 2
    # a hook folder whose files.json is gone (or does not match) is not trusted: trained again
    (out / "blocks.1.hook_resid_post" / "files.json").unlink()
    again = run_sae_stage(small, loaded, root / "activations", out, show_progress=False)
    assert again.trained == ["blocks.1.hook_resid_post"] and again.skipped == ["blocks.2.hook_resid_post"]
    with pytest.raises(SAEStageError, match="different sae settings"):
        run_sae_stage(with_sae(small, k=4), loaded, root / "activations", out, show_progress=False)
    forced = run_sae_stage(with_sae(small, k=4), loaded, root / "activations", out, force=True, show_progress=False)
    assert len(forced.trained) == 2


def test_sae_source_path_loads_trained_saes(tiny_run):
    cfg, loaded, root = tiny_run
    small = with_sae(cfg, training_tokens=64 * 10)
    run_sae_stage(small, loaded, root / "activations", root / "src", show_progress=False)
    from_path = with_sae(small, source="path", path=str(root / "src"))
    result = run_sae_stage(from_path, loaded, root / "activations", root / "copied", show_progress=False)
    assert len(result.trained) == 2
    for hook in result.trained:
        a = (root / "src" / hook / "sae_weights.safetensors").read_bytes()
        assert (root / "copied" / hook / "sae_weights.safetensors").read_bytes() == a
    with pytest.raises(SAEStageError, match="no SAE-Lens SAE for"):
        run_sae_stage(with_sae(from_path, path=str(root / "activations")), loaded, root / "activations",
                      root / "bad", show_progress=False)


def test_bad_configs(tiny_run, tmp_path):
    cfg, loaded, root = tiny_run
    with pytest.raises(ConfigError, match="sae.architecture='gated'; allowed: 'standard', 'topk', 'batchtopk', 'jumprelu'"):
        load_config(None, ["sae.architecture=gated"])
    with pytest.raises(ConfigError, match="sae.path must name a folder"):
        load_config(None, ["sae.source=path"])
    with pytest.raises(SAEConfigError, match="sae.k=300 is larger than d_sae=256"):
        run_sae_stage(with_sae(cfg, k=300), loaded, root / "activations", tmp_path / "k", show_progress=False)
    assert not (tmp_path / "k").exists()  # nothing half-written
    with pytest.raises(SAEConfigError, match="less than one batch"):
        run_sae_stage(with_sae(cfg, training_tokens=10), loaded, root / "activations", tmp_path / "t",
                      show_progress=False)
    with pytest.raises(SAEStageError, match=r"no activations for hook\(s\) \['blocks.0.hook_resid_post'\]"):
        run_sae_stage(with_sae(cfg, hooks=("residuals_0-1",)), loaded, root / "activations", tmp_path / "h",
                      show_progress=False)
    with pytest.raises(SAEStageError, match="run `refusal-lens collect`"):
        run_sae_stage(cfg, loaded, tmp_path / "nothing", tmp_path / "s", show_progress=False)


def test_sites_follow_the_split_and_balanced_batches(tiny_run):
    cfg, loaded, root = tiny_run
    data = load_collected(root / "activations")
    sites = stage_mod.sites_for(cfg, data, loaded)
    acts = HookActivations(root / "activations" / "blocks.1.hook_resid_post")
    rows = sites.rows(acts)
    # by prompt: every row of a split belongs to a prompt of that split, and no prompt is in two splits
    for split, r in rows.items():
        assert {sites.split_of[acts.prompt_ids[i]] for i in r} <= {split}
    pids = {s: {acts.prompt_ids[i] for i in r} for s, r in rows.items()}
    assert not pids["discovery"] & pids["validation"] and not pids["discovery"] & pids["test"]
    # sites: after the template's opening ("<|im_start|> user": 2 tokens), special tokens kept
    kept = np.concatenate(list(rows.values()))
    assert (acts.positions[kept] >= 2).all()
    assert np.isin(acts.token_ids[kept], loaded.tokenizer.all_special_ids).any()  # post-instruction tokens
    dropped = np.setdiff1d(np.arange(len(acts)), kept)
    assert (acts.positions[dropped] < 2).all()
    groups = acts.groups(rows["discovery"], "labels")
    order = epoch_order(groups, np.random.default_rng(0))
    labels = acts.labels[order]
    assert (labels == "toxic").sum() == (labels == "safe").sum() == max(len(g) for g in groups.values())
    batches = activation_batches(acts, rows["discovery"], 32, balance="labels", seed=1)
    first = [next(batches) for _ in range(3)]
    assert all(b.shape == (32, acts.width) and b.dtype == torch.float32 for b in first)
    again = activation_batches(acts, rows["discovery"], 32, balance="labels", seed=1)
    assert torch.equal(next(again), first[0])  # seeded


def test_too_few_training_rows_for_the_features_is_an_error(tiny_run, tmp_path):
    cfg, loaded, root = tiny_run
    wide = with_sae(cfg, expansion_factor=64, allow_fewer_rows_than_features=False)
    with pytest.raises(SAEStageError, match=r"distinct training rows for an SAE of 4096 features.*expansion_factor"):
        run_sae_stage(wide, loaded, root / "activations", tmp_path / "wide", show_progress=False)


def test_quality_is_judged_against_mean_ablation_on_validation_and_reported_on_test(tiny_run):
    cfg, loaded, root = tiny_run
    run_sae_stage(cfg, loaded, root / "activations", root / "saes", show_progress=False)
    metrics = json.loads((root / "saes" / "blocks.1.hook_resid_post" / "metrics.json").read_text())
    for m in (metrics, metrics["validation"]):
        assert m["ce_loss_recovered"] == pytest.approx((m["ce_mean"] - m["ce_sae"]) / (m["ce_mean"] - m["ce_clean"]))
        assert m["ce_increase"] == pytest.approx(m["ce_sae"] - m["ce_clean"])
    assert metrics["distinct_train_rows"] <= metrics["train_rows"]
    quality = {q["hook"]: q for q in json.loads((root / "saes" / "quality.json").read_text())}
    q = quality["blocks.1.hook_resid_post"]
    assert q["val_explained_variance"] == metrics["validation"]["explained_variance"]
    assert q["explained_variance"] == metrics["explained_variance"]  # the reported number is the test split's


def test_splice_touches_only_the_trained_positions(tiny_run):
    from sae_lens import SAE

    from refusal_lens.saes.evaluate import splice_metrics

    cfg, loaded, root = tiny_run
    small = with_sae(cfg, training_tokens=64 * 10)
    run_sae_stage(small, loaded, root / "activations", root / "splice", show_progress=False)
    sae = SAE.load_from_disk(str(root / "splice" / "blocks.1.hook_resid_post"))
    seqs = [loaded.tokenizer("<|im_start|> user hello world <|im_end|>", add_special_tokens=False)["input_ids"]] * 2
    pad = loaded.tokenizer.pad_token_id
    everywhere = splice_metrics(loaded.model, sae, "blocks.1.hook_resid_post", seqs, pad, check_error_term=True)
    # SAE-Lens's error term makes the splice an identity: CE must equal the clean CE
    assert everywhere["ce_with_error_term"] == pytest.approx(everywhere["ce_clean"], abs=1e-4)
    nowhere = splice_metrics(loaded.model, sae, "blocks.1.hook_resid_post", seqs, pad, splice_from=100)
    assert everywhere["ce_sae"] != pytest.approx(everywhere["ce_clean"])
    assert nowhere["ce_sae"] == pytest.approx(nowhere["ce_clean"]) and nowhere["kl_sae"] == pytest.approx(0, abs=1e-6)
    assert nowhere["ce_mean"] == pytest.approx(nowhere["ce_clean"])
    specials = splice_metrics(loaded.model, sae, "blocks.1.hook_resid_post", seqs, pad,
                              skip_token_ids=list(set(seqs[0])))
    assert specials["kl_sae"] == pytest.approx(0, abs=1e-6)
