"""The refusal direction stage on a tiny model with a planted refusal direction (tests/planted.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from planted import build_planted_model, load_planted_directions, planted_prompts
from helpers import collect, run as run_stage
from refusal_lens.run.collected import Collected, load_collected
from refusal_lens.config import Config, DataConfig, DirectionConfig, InferenceConfig, ModelConfig
from refusal_lens.stages.direction.categories import transfer_interval, transfer_verdict
from refusal_lens.core.direction_edits import ablation_edits, addition_edits
from refusal_lens.run.direction_file import load_direction
from refusal_lens.stages.direction.select import Scored, bypass_estimates, choose, linear_screen, scores_of
from refusal_lens.stages.direction.candidates import Candidates
from refusal_lens.stages.direction.contrast import DirectionError, contrast_sets
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.refusal import RefusalTokens


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from refusal_lens.models.loading import load_model

    folder = build_planted_model(tmp_path_factory.mktemp("planted") / "model")
    return folder, load_model(ModelConfig(name=str(folder)))


def planted_config(folder: Path, **direction) -> Config:
    return Config(model=ModelConfig(name=str(folder), activation_layers=("residuals_all",)),
                  inference=InferenceConfig(batch_size=8, max_new_tokens=4, positions="all"),
                  data=DataConfig(split_discovery=0.4, split_validation=0.3, split_test=0.3),
                  direction=DirectionConfig(exact_candidates=4, exact_per_layer=1, random_directions=4, bootstrap=50,
                                            **direction))


class StageCalls:
    """Records what the direction stage hands to ``difference_in_means`` (the candidates) and to
    ``select_direction`` (the selection): the prompt id of every prompt each received. Prompts are traced
    by identity to the ``Collected.encoded`` call that made them from rows of the prompts table; a prompt
    made any other way is recorded as None (and fails the tests below)."""

    def __init__(self):
        self.origin: dict[int, str] = {}  # id(EncodedPrompt) -> prompt_id
        self.alive: list = []  # the traced prompts, kept alive so that their ids stay unique
        self.candidates: list[tuple[list, list]] = []  # (harmful ids, harmless ids) per call
        self.selection: list[tuple[list, list]] = []

    def ids(self, prompts) -> list[str | None]:
        return [self.origin.get(id(p)) for p in prompts]

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import refusal_lens.stages.direction.stage as stage_mod

        real_encoded, real_dim, real_select = Collected.encoded, stage_mod.difference_in_means, stage_mod.select_direction

        def encoded(data, tokenizer, max_tokens, rows, template=None):
            out = real_encoded(data, tokenizer, max_tokens, rows, template)
            for i, e in zip(rows, out, strict=True):
                self.origin[id(e)] = data.rows[i]["prompt_id"]
                self.alive.append(e)
            return out

        def difference_in_means(intervener, harmful, harmless, *args, **kwargs):
            self.candidates.append((self.ids(harmful), self.ids(harmless)))
            return real_dim(intervener, harmful, harmless, *args, **kwargs)

        def select_direction(intervener, cands, harmful, harmless, *args, **kwargs):
            self.selection.append((self.ids(harmful), self.ids(harmless)))
            return real_select(intervener, cands, harmful, harmless, *args, **kwargs)

        mp.setattr(Collected, "encoded", encoded)
        mp.setattr(stage_mod, "difference_in_means", difference_in_means)
        mp.setattr(stage_mod, "select_direction", select_direction)


@pytest.fixture(scope="module")
def stage(planted, tmp_path_factory):
    """The direction stage on the planted model, its calls of the candidates and the selection recorded."""
    folder, loaded = planted
    run = tmp_path_factory.mktemp("run")
    cfg = planted_config(folder)
    collect(loaded, planted_prompts(), cfg, run / "activations", show_progress=False)
    calls = StageCalls()
    with pytest.MonkeyPatch.context() as mp:
        calls.install(mp)
        result = run_stage("direction", cfg, run, loaded)
    return cfg, loaded, run, result, calls


def test_selection_finds_the_planted_direction_and_it_works_on_test(planted, stage):
    folder, _ = planted
    cfg, loaded, run, result, _ = stage
    e_h = load_planted_directions(folder)["harm"]
    saved = load_direction(run / "direction")
    cos = float(torch.nn.functional.cosine_similarity(saved.vector, e_h, dim=0))
    assert cos > 0.99, cos
    assert saved.layer >= 1 and saved.info["hook"] == f"blocks.{saved.layer}.hook_resid_pre"  # e_h appears after block 0
    assert -saved.info["post_instruction_tokens"] <= saved.info["position"] <= -1
    s = result.summary
    assert s["harmful_refused"]["clean"]["refusal_rate"] == 1.0 and s["harmful_refused"]["clean"]["n"] >= 3
    assert s["harmful_refused"]["ablated"]["refusal_rate"] == 0.0
    assert s["harmless"]["actadd_plus"]["refusal_rate"] > s["harmless"]["clean"]["refusal_rate"]
    assert s["kl_harmless"]["mean"] <= 0.1 and s["direction"]["scores"]["kl"] <= 0.1
    assert s["random_ablated"]["n"] == 4 and s["random_ablated"]["mean"] == 1.0  # random directions do nothing
    # by the refusal score too: r's ablation lowers the refused prompts' mean score below all 4 random directions,
    # and adding r raises the harmless prompts' score above all 4 random vectors of |r|; calibrated on the 4
    score = s["controls_score"]
    assert score["random_ablated"]["n"] == 4 and score["random_ablated"]["p_value"] == pytest.approx(1 / 5), score
    assert score["random_added"]["p_value"] == pytest.approx(1 / 5), score
    assert score["random_ablated"]["headline_mean_score"] < min(score["random_ablated"]["q05"], 0.0)
    assert score["random_ablated"]["calibration"]["n_controls"] == 4
    # every candidate screened, the shortlist measured, the files other tools read
    cands = json.loads((run / "direction" / "candidates.json").read_text())
    n_layers, n_post = cands["n_layers"], cands["n_post_instruction"]
    assert len(cands["candidates"]) == n_layers * n_post
    assert sum(c["bypass"] is not None for c in cands["candidates"]) >= n_layers
    info = json.loads((run / "direction" / "direction.json").read_text())
    assert set(info) >= {"hook", "layer", "position", "scores", "splits", "norm", "filters"}
    assert info["splits"]["discovery"]["harmful"] > 0 and info["splits"]["validation"]["harmless"] > 0
    for name in ("direction_candidates", "direction_evaluation", "emergence", "cross_ablation"):
        assert (run / "direction" / "figures" / f"{name}.html").is_file()
    audit = [json.loads(line) for line in (run / "direction" / "responses" / "evaluation.jsonl").read_text().splitlines()]
    assert {"harmful/clean", "harmful/ablated", "harmless/actadd_plus"} <= {a["condition"] for a in audit}
    # emergence: ablating from any block whose input carries e_h removes refusal
    em = json.loads((run / "direction" / "emergence.json").read_text())["groups"]["toxic_refused"]
    assert em["points"][0]["mean"] < em["clean"] - 1.0


def test_rerun_skips_and_selection_used_only_validation(stage, monkeypatch):
    """What the stage itself handed over, by prompt id against the collected splits: the candidates
    (``difference_in_means``) were fitted on discovery prompts only, toxic against harmless; the selection
    (``select_direction``) received validation prompts only (toxic as harmful, harmless as harmless), none
    that fitted the candidates, every validation prompt of the contrast sets; each was called once. A rerun
    skips: it calls neither."""
    cfg, loaded, run, result, calls = stage
    data = load_collected(run / "activations")
    row = {r["prompt_id"]: r for r in data.rows}
    assert len(calls.candidates) == 1 and len(calls.selection) == 1, (calls.candidates, calls.selection)
    (fit_harmful, fit_harmless), (sel_harmful, sel_harmless) = calls.candidates[0], calls.selection[0]
    for got, split, label in ((fit_harmful, "discovery", "toxic"), (fit_harmless, "discovery", "harmless"),
                              (sel_harmful, "validation", "toxic"), (sel_harmless, "validation", "harmless")):
        assert got and None not in got, f"{split}/{label}: prompts not traced to the prompts table: {got}"
        assert len(set(got)) == len(got), got
        wrong = [(p, row[p]["split"], row[p]["label"]) for p in got if (row[p]["split"], row[p]["label"]) != (split, label)]
        assert not wrong, f"expected {split} {label} prompts only, got {wrong}"
    assert not (set(sel_harmful) | set(sel_harmless)) & (set(fit_harmful) | set(fit_harmless))
    # the selection saw every validation prompt of the contrast sets, and direction.json counts what it saw
    contrast = contrast_sets(data, cfg.direction.selection_prompts, cfg.direction.keep)
    assert sorted(sel_harmful) == sorted(data.rows[i]["prompt_id"] for i in contrast.harmful["validation"])
    assert sorted(sel_harmless) == sorted(data.rows[i]["prompt_id"] for i in contrast.harmless["validation"])
    info = json.loads((run / "direction" / "direction.json").read_text())
    assert info["splits"]["validation"] == {"harmful": len(sel_harmful), "harmless": len(sel_harmless)}
    assert info["splits"]["discovery"] == {"harmful": len(fit_harmful), "harmless": len(fit_harmless)}
    # a rerun skips: no candidates fitted, no selection
    again_calls = StageCalls()
    again_calls.install(monkeypatch)
    again = run_stage("direction", cfg, run, loaded)
    assert again.skipped and again.summary == result.summary
    assert again_calls.candidates == [] and again_calls.selection == []


def test_ablating_a_direction_no_write_touches_changes_nothing(planted):
    folder, loaded = planted
    unused = load_planted_directions(folder)["unused"]
    from refusal_lens.core.chat import encode_prompt

    prompts = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in planted_prompts()[:8]]
    iv = Intervener(loaded, 4, model=loaded.hf_model)
    clean = iv.last_logits(prompts)
    ablated = iv.last_logits(prompts, ablation_edits(unused, loaded.n_layers))
    torch.testing.assert_close(ablated, clean, rtol=1e-6, atol=1e-4)  # logits up to ~100: float32 rounding
    assert iv.generate(prompts, 5, ablation_edits(unused, loaded.n_layers)) == iv.generate(prompts, 5)


def test_representational_independence_has_known_answers_on_the_planted_model(planted):
    """Known answers: no write touches ``unused``, so ablating it moves nothing and ablating e_h leaves the (zero)
    cosine with ``unused`` unchanged: score 0 both ways; e_h's own ablation drives its cosine from its clean value
    to 0 at every layer from block 1 on: its own score is that clean cosine squared, averaged."""
    from refusal_lens.core.chat import encode_prompt
    from refusal_lens.stages.direction.independence import representational_independence

    folder, loaded = planted
    dirs = load_planted_directions(folder)
    prompts = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in planted_prompts() if p.label == "toxic"][:8]
    iv = Intervener(loaded, 4, model=loaded.hf_model)
    out = representational_independence(iv, {"harm": dirs["harm"], "unused": dirs["unused"]}, loaded.n_layers, prompts)
    assert out["score"]["harm"]["unused"] == pytest.approx(0.0, abs=1e-10)
    assert out["score"]["unused"]["unused"] == pytest.approx(0.0, abs=1e-10)
    clean = np.asarray(out["clean_cosine"]["harm"])
    assert (clean[1:] > 0.05).all()  # the harm direction is present from block 1's input on
    np.testing.assert_allclose(out["change"]["harm"]["harm"], -clean, atol=1e-5)
    assert out["score"]["harm"]["harm"] == pytest.approx(float(np.mean(clean[: out["layers"]] ** 2)), rel=1e-4)


def test_generation_with_ablation_equals_a_forward_pass_with_ablation_token_by_token(planted):
    folder, loaded = planted
    e_h = load_planted_directions(folder)["harm"]
    from refusal_lens.core.chat import encode_prompt

    prompts = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in planted_prompts()[:6]]
    iv = Intervener(loaded, 3, model=loaded.hf_model)
    for edits in (ablation_edits(e_h, loaded.n_layers), addition_edits(e_h * 5, 1)):
        responses = iv.generate(prompts, 6, edits)
        assert any(responses)
        # teacher-force each response under the same edits: the greedy choice at every step is the next token
        for p, r in zip(prompts, responses):
            if not r:
                continue
            first, _, _ = iv.continuation_logprobs([p], [r], edits)
            assert int(first[0].argmax()) == r[0]
            batch = iv.batches([p], [r])[0]
            with torch.no_grad(), iv.edits(edits, batch):
                logits = iv.model(input_ids=batch.ids, attention_mask=batch.mask).logits[0]
            steps = logits[len(p.ids) - 1 : len(p.ids) - 1 + len(r)].argmax(-1).tolist()
            assert steps == r


def test_screen_is_linear_for_small_vectors_and_zero_for_untouched_directions(planted):
    folder, loaded = planted
    dirs = load_planted_directions(folder)
    from refusal_lens.core.chat import encode_prompt

    harmful = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in planted_prompts() if p.label == "toxic"][:6]
    harmless = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in planted_prompts() if p.label == "harmless"][:6]
    iv = Intervener(loaded, 6, model=loaded.hf_model)
    tokens = RefusalTokens(tuple(loaded.tokenizer.convert_tokens_to_ids(["I"])), ("I",), "family")
    n_post = harmful[0].n_post_instruction
    diff = torch.zeros(loaded.n_layers, n_post, loaded.d_model, dtype=torch.float64)
    diff[1, -1] = 1e-3 * dirs["harm"].double()  # a small vector: addition is in the linear regime
    diff[2, -1] = dirs["unused"].double()  # a direction no write touches: ablation changes nothing
    diff[0] = 1e-3 * torch.randn(n_post, loaded.d_model, dtype=torch.float64)
    cands = Candidates(diff, diff, diff, 1, 1)
    bypass, induce = linear_screen(iv, cands, harmful, harmless, tokens, loaded.n_layers)
    clean_h = scores_of(iv, harmful, tokens).mean()
    clean_s = scores_of(iv, harmless, tokens).mean()
    exact_induce = scores_of(iv, harmless, tokens, addition_edits(diff[1, -1].float(), 1)).mean()
    assert induce[1, -1] - clean_s == pytest.approx(exact_induce - clean_s, rel=0.02)
    assert bypass[2, -1] == pytest.approx(clean_h, abs=1e-4)
    # one backward pass for several candidate sets gives each set's own screen (the false-refusal lambdas)
    other = Candidates(torch.randn_like(diff), diff, diff, 1, 1)
    both = bypass_estimates(iv, [cands, other], harmful, tokens, loaded.n_layers)
    alone = bypass_estimates(iv, [other], harmful, tokens, loaded.n_layers)[0]
    np.testing.assert_allclose(both[0], bypass, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(both[1], alone, rtol=1e-6, atol=1e-9)
    assert not np.allclose(both[0], both[1])


def test_choose_applies_filters_and_says_which_it_dropped():
    def s(layer, bypass, induce, kl):
        return Scored(layer, 0, -1, 0.0, 0.0, bypass, induce, kl)

    best, f = choose([s(1, -1.0, 1.0, 0.05), s(2, -3.0, 1.0, 0.5), s(3, -2.0, -1.0, 0.01), s(9, -9.0, 1.0, 0.0)],
                     10, kl_max=0.1, induce_min=0.0, max_layer_fraction=0.8)
    assert (best.layer, f["notes"]) == (1, [])  # 2 fails KL, 3 fails induce, 9 fails the layer filter
    best, f = choose([s(2, -3.0, -1.0, 0.05), s(3, -2.0, -1.0, 0.01)], 10, kl_max=0.1, induce_min=0.0,
                     max_layer_fraction=0.8)
    assert best.layer == 2 and "induce filter was dropped" in f["notes"][0] and f["induce_min"] is None
    best, f = choose([s(2, -3.0, 1.0, 0.5), s(3, -2.0, -1.0, 0.9)], 10, kl_max=0.1, induce_min=0.0,
                     max_layer_fraction=0.8)
    assert best.layer == 2 and "KL filter was dropped" in f["notes"][0]


def test_contrast_keeps_only_prompts_the_model_agrees_with():
    rows = []
    for i, (label, score, refused, split) in enumerate([
            ("toxic", 1.0, True, "discovery"), ("toxic", -0.5, True, "discovery"), ("toxic", 0.5, False, "discovery"),
            ("harmless", -2.0, False, "discovery"), ("harmless", 0.3, False, "discovery"),
            ("toxic", 1.0, True, "validation"), ("harmless", -1.0, False, "validation"), ("safe", 3.0, True, "test")]):
        rows.append({"prompt_id": f"p{i}", "label": label, "refusal_score": score, "refused": refused, "split": split,
                     "category": "c"})
    data = Collected(Path("."), {}, rows, RefusalTokens((1,), ("I",), "family"))
    assert contrast_sets(data, None, "score").harmful["discovery"] == [0, 2]
    assert contrast_sets(data, None, "judged").harmful["discovery"] == [0, 1]
    both = contrast_sets(data, None, "both")
    assert both.harmful["discovery"] == [0] and both.harmless["discovery"] == [3]
    assert both.counts()["discovery"] == {"harmful": 1, "harmless": 1, "harmful_dropped": 2, "harmless_dropped": 1}
    every = contrast_sets(data, None, "all")  # no filter: every toxic and harmless prompt (safe ones never)
    assert every.harmful["discovery"] == [0, 1, 2] and every.harmless["discovery"] == [3, 4]
    assert every.counts()["discovery"]["harmful_dropped"] == 0
    rows[5]["label"] = "safe"
    with pytest.raises(DirectionError, match="validation split has 0 harmful"):
        contrast_sets(data, None, "score")


def test_transfer_interval_and_verdicts():
    rng = np.random.default_rng(0)
    clean = np.ones(40)
    own = np.zeros(40)
    point, ci = transfer_interval(clean, np.zeros(40), own, 200, rng)
    assert point == 1.0 and ci == [1.0, 1.0] and transfer_verdict(ci, 40, 10, 0.8) == "shared"
    point, ci = transfer_interval(clean, np.ones(40), own, 200, rng)
    assert point == 0.0 and transfer_verdict(ci, 40, 10, 0.8) == "distinct"
    half = np.asarray([0, 1] * 20, dtype=float)
    point, ci = transfer_interval(clean, half, own, 200, rng)
    assert point == 0.5 and ci[0] < 0.5 < ci[1] and transfer_verdict(ci, 40, 10, 0.8) == "distinct"
    assert transfer_verdict(ci, 5, 10, 0.8) == "insufficient"
    assert transfer_interval(clean, half, np.ones(40), 50, rng) == (None, None)  # nothing to transfer


def test_no_harmless_prompts_fails_before_writing(planted, tmp_path):
    folder, loaded = planted
    cfg = planted_config(folder)
    prompts = [p for p in planted_prompts() if p.label != "harmless"]
    collect(loaded, prompts, cfg, tmp_path / "activations", show_progress=False)
    with pytest.raises(DirectionError, match="harmless"):
        run_stage("direction", cfg, tmp_path, loaded)
    assert not (tmp_path / "direction").exists()


def test_the_false_refusal_vector_is_recovered_and_spares_correct_refusal(tmp_path):
    """A planted refusal direction e_h and a planted false-refusal direction w = 0.6 e_h + 0.8 e_o (tests/planted.py):
    the direction stage's false-refusal part, fitted on refused safe discovery prompts against harmless ones and
    orthogonalised to the selected refusal direction (lambda = 1), recovers w' = e_o (cosine >= 0.9); ablating it
    leaves the refused toxic test prompts refused and their refusal score within a fifth of what ablating w itself
    removes (w takes 85% of it)."""
    from planted import build_false_refusal_model

    from refusal_lens.models.loading import load_model

    folder = build_false_refusal_model(tmp_path / "model")
    loaded = load_model(ModelConfig(name=str(folder)))
    cfg = planted_config(folder, per_category=False, emergence_stride=2, random_prompts=4,
                         false_refusal_controls=3, false_refusal_controls_generated=2, permuted_directions=2)
    from refusal_lens.data.prompts import Prompt

    extra = ["car car", "a car", "print car", "how car ?", "car world", "the car", "hello a car", "what car ?",
             "make a car", "car code", "python car", "car is"]  # more safe prompts with the pseudo-harmful word
    prompts = planted_prompts() + [Prompt(f"safe:car{i}", t, ("harmful", "illegal")[i % 2], "safe", "planted")
                                   for i, t in enumerate(extra)]
    collected = collect(loaded, prompts, cfg, tmp_path / "run" / "activations")
    assert collected.rates  # collected
    result = run_stage("direction", cfg, tmp_path / "run", loaded)
    false = json.loads((result.folder / "false_refusal.json").read_text())
    assert false["refused_safe_discovery"] >= 2, false
    from safetensors.torch import load_file

    w_prime = load_file(str(result.folder / "false_refusal.safetensors"))["direction"]
    dirs = load_planted_directions(folder)
    cos = float(torch.nn.functional.cosine_similarity(w_prime, dirs["pseudo"], dim=0))
    assert abs(cos) >= 0.9, cos
    rows = false["conditions"]
    assert rows["w'(lambda=1)"]["toxic_refused"]["refusal_rate"] == 1.0  # refused when collected: still refused
    # the refusal score (log-odds of "I") of the refused toxic test prompts: unchanged under w', lowered under w
    from refusal_lens.core.direction_edits import ablation_edits
    from refusal_lens.run.folder import RunFolder
    from refusal_lens.stages.direction.select import scores_of

    data = RunFolder(tmp_path / "run").collected()
    toxic = data.encoded(loaded.tokenizer, 64, data.split_rows("test", "toxic", refused=True))
    iv = Intervener(loaded, 4, model=loaded.hf_model)
    clean = scores_of(iv, toxic, data.tokens)
    under_w_prime = scores_of(iv, toxic, data.tokens, ablation_edits(w_prime, loaded.n_layers))
    under_w = scores_of(iv, toxic, data.tokens, ablation_edits(dirs["w"], loaded.n_layers))
    # measured: clean 91-125, under w' 106-107, under w 15: w' (estimated from 12 prompts, cosine >= 0.9 with e_o)
    # moves the score by at most a fifth of what w removes, and no refused toxic prompt is answered under it
    assert (clean - under_w > 50).all(), (clean, under_w)
    assert np.abs(under_w_prime - clean).max() < 0.3 * (clean - under_w).min(), (clean, under_w_prime, under_w)
    assert set(false["controls"]) == {"random_orthogonal", "permuted"}
    kept = false["chosen_keeping_toxic"]  # w' = e_o keeps every refused toxic prompt: it passes the toxic-kept rule
    assert kept["kl"] <= 0.2 and 1 <= kept["n_kl_measured"] <= kept["n_keeping"] and kept["toxic_kept"] >= 0.9, kept
    assert rows["w'(lambda=1, toxic kept)"]["toxic_refused"]["refusal_rate"] == 1.0
    score = false["controls_score"]  # every control by the refusal score too: w' = e_o below the 3 random ones
    assert {k: v["n"] for k, v in score["controls"].items()} == {"random_orthogonal": 3, "permuted": 3}, score
    assert score["controls"]["random_orthogonal"]["p_value"] == 0.25, score  # (a permutation of 12 prompts can
    # keep most labels, so the permuted controls are not all above it)
    assert score["calibration"]["n_controls"] == 4  # the first 2 of each kind generated as well
    assert {k: v["n"] for k, v in false["controls"].items()} == {"random_orthogonal": 2, "permuted": 2}
    summary = json.loads((result.folder / "summary.json").read_text())
    assert summary["false_refusal"]["headline"] == "w'(lambda=1)"
    # why no single direction separates them (refusal_lens.checks.false_refusal_why), on this run: w = 0.6 e_h + 0.8 e_o
    # has cosine 0.6 with r = e_h; the refused safe prompts carry e_o (the label), the toxic ones do not
    from refusal_lens.checks import false_refusal_why

    assert false_refusal_why.main(["--run", str(tmp_path / "run"), "--bootstrap", "50", "--min-n", "2",
                                   "--batch-size", "4"]) == 0
    why = json.loads(RunFolder(tmp_path / "run").paths.direction.false_refusal_why.read_text())
    geo = why["geometry"]
    assert geo["headline_recomputed_cosine_with_saved"] > 0.999  # the stage's w', recomputed from the candidates
    cos = np.array(geo["cosine_w_r"])[1:]  # e_h and e_o reach the block inputs from layer 1 on
    # the planted 0.6, plus what the two measured differences share beyond e_h and e_o: the same harmless mean is
    # subtracted from both, and the prompts' other words (measured: 0.73 at every site)
    assert (cos > 0.6).all() and (cos < 0.85).all(), cos
    site = geo["sites"]["w'(lambda=1)"]
    assert site["along_vector"]["auroc_toxic_above_safe"] == 0.0 and abs(site["cosine_with_label_readout"]) > 0.9, site
    assert np.min(np.array(geo["label_readout_auroc_safe_above_toxic"])[1:]) == 1.0
    assert why["dose"]["w'(lambda=1)"]["still_refused"]["toxic_refused"]["refusal_rate"] == 1.0
    assert set(why["dose"]) == set(rows) and set(why["categories"]["r ablated"]) <= {"harmful", "illegal"}
    assert why["n"] == false["n_test"]


def test_the_site_cache_reads_what_a_fresh_pass_gives_bit_for_bit(planted):
    """The stage's SiteCache: the means and site activations it reads are equal (torch.equal) to those a fresh pass
    of the same prompts gives; one model pass per distinct prompt list, none for a list read again; another
    intervener, or a list in another order, is not read from it."""
    from refusal_lens.core.chat import encode_prompt
    from refusal_lens.stages.direction.candidates import (SiteCache, difference_in_means, post_instruction_means,
                                                          site_activations)

    folder, loaded = planted
    harmful = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in planted_prompts() if p.label == "toxic"][:7]
    harmless = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in planted_prompts() if p.label == "harmless"][:5]
    iv = Intervener(loaded, 3, model=loaded.hf_model)  # batches of 3: the lists span several batches
    n_layers, d, n_post = loaded.n_layers, loaded.d_model, harmful[0].n_post_instruction
    sites = SiteCache(iv, n_layers, d)
    calls = []
    original = iv.last_logits
    iv.last_logits = lambda ps, edits=None: calls.append(len(ps)) or original(ps, edits)
    cached = difference_in_means(iv, harmful, harmless, n_layers, d, sites)
    assert calls == [7, 5] and sites.passes == 2
    reads = [site_activations(iv, harmful, layer, j, sites) for layer in (0, n_layers - 1) for j in range(n_post)]
    again = post_instruction_means(iv, harmless, n_layers, n_post, d, sites)
    assert calls == [7, 5] and sites.passes == 2  # read, not run
    iv.last_logits = original
    fresh = difference_in_means(iv, harmful, harmless, n_layers, d)
    assert torch.equal(cached.diff, fresh.diff) and torch.equal(again, fresh.harmless_mean)
    direct = [site_activations(iv, harmful, layer, j) for layer in (0, n_layers - 1) for j in range(n_post)]
    assert all(torch.equal(a, b) for a, b in zip(reads, direct))
    other = Intervener(loaded, 3, model=loaded.hf_model)
    assert not sites.usable(other, harmful) and sites.usable(iv, harmful)
    site_activations(iv, harmful[::-1], 0, 0, sites)
    assert sites.passes == 3  # another order is another list (other batches)
