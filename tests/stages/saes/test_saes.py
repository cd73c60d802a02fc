"""SAE training from stored activations on a tiny random model: learning, save/load, skip/resume, errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from refusal_lens.activations.store import HookActivations
from helpers import collect, sibling_run, train_saes
from refusal_lens.config import Config, ConfigError, InferenceConfig, ModelConfig, SAEConfig, load_config
from refusal_lens.data.prompts import Prompt
from refusal_lens.stages.saes import stage as stage_mod
from refusal_lens.run.collected import load_collected
from refusal_lens.stages.saes.data import activation_batches, epoch_order
from refusal_lens.run.folder import RunFolder
from refusal_lens.run.stage import StageFolderError
from refusal_lens.stages.saes.stage import SAEStageError
from refusal_lens.stages.saes.train import SAEConfigError, build_training_sae

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
    result = train_saes(cfg, loaded, root)
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
    assert RunFolder(root).sae_hooks(passing=True) == [q["hook"] for q in quality if q["passes"]]
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
    out_run = sibling_run(root, "resume")
    out = out_run / "saes"
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
        train_saes(small, loaded, out_run)
    assert (out / "blocks.1.hook_resid_post" / "metrics.json").is_file()
    assert not (out / "blocks.2.hook_resid_post").exists() and (out / ".blocks.2.hook_resid_post.partial").exists()
    result = train_saes(small, loaded, out_run)
    assert result.skipped == ["blocks.1.hook_resid_post"] and result.trained == ["blocks.2.hook_resid_post"]
    assert not (out / ".blocks.2.hook_resid_post.partial").exists()
    again = train_saes(small, loaded, out_run)
    assert again.trained == [] and len(again.skipped) == 2
    # a hook folder whose files.json is gone (or does not match) is not trusted: trained again
    (out / "blocks.1.hook_resid_post" / "files.json").unlink()
    again = train_saes(small, loaded, out_run)
    assert again.trained == ["blocks.1.hook_resid_post"] and again.skipped == ["blocks.2.hook_resid_post"]
    with pytest.raises(StageFolderError, match=r"differs in: sae.k\b"):
        train_saes(with_sae(small, k=4), loaded, out_run)
    forced = train_saes(with_sae(small, k=4), loaded, out_run, force=True)
    assert len(forced.trained) == 2


def test_sae_source_path_loads_trained_saes(tiny_run):
    cfg, loaded, root = tiny_run
    small = with_sae(cfg, training_tokens=64 * 10)
    src = train_saes(small, loaded, sibling_run(root, "src")).folder
    from_path = with_sae(small, source="path", path=str(src))
    result = train_saes(from_path, loaded, sibling_run(root, "copied"))
    assert len(result.trained) == 2
    for hook in result.trained:
        a = (src / hook / "sae_weights.safetensors").read_bytes()
        assert (result.folder / hook / "sae_weights.safetensors").read_bytes() == a
    with pytest.raises(SAEStageError, match="no SAE-Lens SAE for"):
        train_saes(with_sae(from_path, path=str(root / "activations")), loaded, sibling_run(root, "bad"))


def test_bad_configs(tiny_run, tmp_path):
    cfg, loaded, root = tiny_run
    with pytest.raises(ConfigError, match="sae.architecture='gated'; allowed: 'standard', 'topk', 'batchtopk', 'jumprelu'"):
        load_config(None, ["sae.architecture=gated"])
    with pytest.raises(ConfigError, match="sae.path must name a folder"):
        load_config(None, ["sae.source=path"])
    with pytest.raises(SAEConfigError, match="sae.k=300 is larger than d_sae=256"):
        train_saes(with_sae(cfg, k=300), loaded, sibling_run(root, "k"))
    assert not (sibling_run(root, "k") / "saes").exists()  # nothing half-written
    with pytest.raises(SAEConfigError, match="less than one batch"):
        train_saes(with_sae(cfg, training_tokens=10), loaded, sibling_run(root, "t"))
    with pytest.raises(SAEStageError, match=r"no activations for hook\(s\) \['blocks.0.hook_resid_post'\]"):
        train_saes(with_sae(cfg, hooks=("residuals_0-1",)), loaded, sibling_run(root, "h"))
    with pytest.raises(SAEStageError, match="run `refusal-lens collect`"):
        train_saes(cfg, loaded, tmp_path / "nothing")


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
        train_saes(wide, loaded, sibling_run(root, "wide"))


def _splice_by_hand(loaded, sae, layer: int, sequences, starts, mean: torch.Tensor) -> dict:
    """The splice metrics of the module docstring of refusal_lens.stages.saes.evaluate, computed apart from it: each
    sequence alone (no padding) through the HF model, block ``layer``'s output (``blocks.<layer>.hook_resid_post``)
    replaced from position ``start`` on by the SAE's reconstruction ``decode(encode(x))``, or by ``mean``; CE
    of each next token (nats, pooled over the tokens of all sequences), KL(clean || spliced) per token."""
    model = loaded.hf_model
    block = model.model.layers[layer]

    def run(ids, start, replace):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            y = x.clone()
            y[:, start:] = replace(x[:, start:])
            return (y, *output[1:]) if isinstance(output, tuple) else y

        handle = block.register_forward_hook(hook) if replace is not None else None
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        finally:
            if handle is not None:
                handle.remove()
        return logits[:-1].log_softmax(-1)  # predicts tokens 1 .. n-1

    reconstruct = lambda x: sae.decode(sae.encode(x.float())).to(x.dtype)  # noqa: E731
    ablate = lambda x: mean.to(x.dtype).expand_as(x)  # noqa: E731
    nll = {"clean": 0.0, "sae": 0.0, "mean": 0.0}
    kl = {"sae": 0.0, "mean": 0.0}
    n = 0
    for ids, start in zip(sequences, starts):
        target = torch.tensor(ids[1:])
        clean = run(ids, start, None)
        nll["clean"] -= float(clean.gather(-1, target[:, None]).sum())
        for name, fn in (("sae", reconstruct), ("mean", ablate)):
            lp = run(ids, start, fn)
            nll[name] -= float(lp.gather(-1, target[:, None]).sum())
            kl[name] += float((clean.exp() * (clean - lp)).sum())
        n += len(target)
    ce = {k: v / n for k, v in nll.items()}
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_mean": ce["mean"], "kl_sae": kl["sae"] / n,
            "kl_mean": kl["mean"] / n, "ce_increase": ce["sae"] - ce["clean"],
            "ce_loss_recovered": (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"]), "scored_tokens": n}


def test_quality_is_judged_against_mean_ablation_on_validation_and_reported_on_test(tiny_run):
    """The splice metrics a stored SAE's metrics.json holds equal a splice by hand (:func:`_splice_by_hand`) on
    the same prompts: the first ``sae.eval_prompts`` prompts of the split (chat prompt + collected response),
    validation under ``validation``, test at the top level; the SAE spliced from the end of each prompt's
    template opening on; the mean-ablation reference = the mean of the stored discovery activations at the
    sites (positions from the opening on), computed here from the hook folder. The quality table reports test
    and judges on validation."""
    from sae_lens import SAE

    from refusal_lens.core.chat import encode_prompt

    cfg, loaded, root = tiny_run
    train_saes(cfg, loaded, root)
    assert not cfg.sae.exclude_special_tokens and cfg.sae.exclude_template_prefix  # the sites used below
    data = load_collected(root / "activations")
    tok = loaded.tokenizer
    split_of = {r["prompt_id"]: r["split"] for r in data.rows}
    opening = {r["prompt_id"]: int(r["n_opening_tokens"]) for r in data.rows}
    quality = {q["hook"]: q for q in json.loads((root / "saes" / "quality.json").read_text())}
    for hook in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"):
        metrics = json.loads((root / "saes" / hook / "metrics.json").read_text())
        sae = SAE.load_from_disk(str(root / "saes" / hook))
        acts = HookActivations(root / "activations" / hook)
        sites = [i for i in range(len(acts)) if split_of[acts.prompt_ids[i]] == "discovery"
                 and acts.positions[i] >= opening[acts.prompt_ids[i]]]
        mean = torch.from_numpy(acts.take(np.asarray(sites)).double().mean(0).numpy()).float()
        for split, stored in (("validation", metrics["validation"]), ("test", metrics)):
            rows = [r for r in data.rows if r["split"] == split][: cfg.sae.eval_prompts]
            assert len(rows) == cfg.sae.eval_prompts
            seqs = [encode_prompt(tok, r["prompt"], cfg.inference.max_prompt_tokens).ids
                    + tok(r["response"], add_special_tokens=False)["input_ids"] for r in rows]
            mine = _splice_by_hand(loaded, sae, int(hook.split(".")[1]), seqs, [int(r["n_opening_tokens"]) for r in rows],
                                   mean)
            print(f"{hook} {split}: stored " + ", ".join(f"{k} {stored[k]:.5f}" for k in mine)
                  + " | by hand " + ", ".join(f"{k} {v:.5f}" for k, v in mine.items()))
            assert stored["scored_tokens"] == mine["scored_tokens"]
            for key in ("ce_clean", "ce_sae", "ce_mean", "ce_increase"):
                assert stored[key] == pytest.approx(mine[key], rel=1e-4, abs=1e-4), (hook, split, key)
            for key in ("kl_sae", "kl_mean"):
                assert stored[key] == pytest.approx(mine[key], rel=1e-3, abs=1e-5), (hook, split, key)
            assert stored["ce_loss_recovered"] == pytest.approx(mine["ce_loss_recovered"], abs=1e-3), (hook, split)
            # the reference is a real one: mean ablation costs more than the SAE, which costs something
            assert mine["ce_mean"] > mine["ce_sae"] > mine["ce_clean"] and mine["kl_mean"] > mine["kl_sae"] > 0
        q = quality[hook]
        assert metrics["distinct_train_rows"] <= metrics["train_rows"]
        assert q["val_explained_variance"] == metrics["validation"]["explained_variance"]
        assert q["explained_variance"] == metrics["explained_variance"]  # the reported number is the test split's


def test_splice_touches_only_the_trained_positions(tiny_run):
    from sae_lens import SAE

    from refusal_lens.stages.saes.evaluate import splice_metrics

    cfg, loaded, root = tiny_run
    small = with_sae(cfg, training_tokens=64 * 10)
    folder = train_saes(small, loaded, sibling_run(root, "splice")).folder
    sae = SAE.load_from_disk(str(folder / "blocks.1.hook_resid_post"))
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
    # one chat per pass (the stage's SPLICE_BATCH, for memory) measures what batched passes do: sequences of
    # different lengths, left-padded together, against each run alone
    mixed = [seqs[0], seqs[0][:-3], seqs[0][:5] + seqs[0]]
    one = splice_metrics(loaded.model, sae, "blocks.1.hook_resid_post", mixed, pad, batch_size=1, splice_from=2)
    batched = splice_metrics(loaded.model, sae, "blocks.1.hook_resid_post", mixed, pad, batch_size=3, splice_from=2)
    assert one["scored_tokens"] == batched["scored_tokens"]
    for key in ("ce_clean", "ce_sae", "ce_mean", "kl_sae", "kl_mean", "ce_loss_recovered"):
        assert one[key] == pytest.approx(batched[key], rel=1e-4, abs=1e-6), key


def test_the_splice_clean_pass_is_shared_between_hooks_and_gives_the_same_numbers(tiny_run, monkeypatch):
    """splice_metrics with a memo shared between two hooks' SAEs (as the stage does per split): the second call
    reads the clean passes the first one ran (one forward fewer per batch) and every number equals a call without
    the memo, exactly."""
    from sae_lens import SAE

    from refusal_lens.stages.saes import evaluate
    from refusal_lens.stages.saes.evaluate import splice_metrics

    cfg, loaded, root = tiny_run
    folder = train_saes(with_sae(cfg, training_tokens=64 * 10), loaded, sibling_run(root, "memo")).folder
    saes = {h: SAE.load_from_disk(str(folder / h)) for h in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")}
    seqs = [loaded.tokenizer("<|im_start|> user hello world <|im_end|>", add_special_tokens=False)["input_ids"]] * 3
    seqs[1] = seqs[1][:-2]
    pad = loaded.tokenizer.pad_token_id
    calls = []
    real = evaluate._ce_and_logprobs  # every pass's logits go through it once

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(evaluate, "_ce_and_logprobs", counted)
    memo: dict = {}
    shared, alone = {}, {}
    for hook, sae in saes.items():
        before = len(calls)
        shared[hook] = splice_metrics(loaded.model, sae, hook, seqs, pad, batch_size=2, splice_from=2, clean=memo)
        shared[hook]["passes"] = len(calls) - before
        alone[hook] = splice_metrics(loaded.model, sae, hook, seqs, pad, batch_size=2, splice_from=2)
    first, second = saes
    assert shared[first]["passes"] == 2 * 3 and shared[second]["passes"] == 2 * 2  # 2 batches: clean, SAE, mean
    for hook in saes:
        assert {k: v for k, v in shared[hook].items() if k != "passes"} == alone[hook], hook
    assert shared[first]["ce_sae"] != shared[second]["ce_sae"]  # two SAEs, two splices: the memo holds only clean
