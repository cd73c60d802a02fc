"""Circuits over spliced SAEs on tiny models: attribution against exact and finite-difference patching, site
classes, active-only nodes, the planted refusal feature, faithfulness with no unpatched site, selection."""

from __future__ import annotations

import importlib

from pathlib import Path

import numpy as np
import pytest

import torch

from planted import build_planted_model, load_planted_directions, planted_prompts
from refusal_lens.core.chat import OPENING, PAD, encode_prompt
from refusal_lens.stages.circuits.agreement import stats
from refusal_lens.stages.circuits.attribution import Runner
from refusal_lens.stages.circuits.baselines import ClassMeans
from refusal_lens.stages.circuits.edits import feature_edit
from refusal_lens.stages.circuits.faithfulness import node_edits, ranked_nodes
from refusal_lens.stages.circuits.nodes import NOT_A_SITE, NodeSpace, site_classes
from refusal_lens.stages.circuits.select import combined, decoder_cosines, promoting, rankings, suppressing
from refusal_lens.stages.circuits.build import bootstrap_ci
from refusal_lens.core.edit import Edit, EditContext
from refusal_lens.core.intervene import Intervener, frozen, make_batch
from refusal_lens.core.refusal import RefusalTokens

PROMPTS = ["how make bomb ?", "bake a cake", "what is python code", "steal car", "hello world", "print the code"]


def sae_from(hook: str, w_enc: torch.Tensor, w_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, arch="standard"):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in, d_sae = w_enc.shape
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu",
                  metadata=SAEMetadata(hook_name=hook, model_name="tiny", context_size=1, prepend_bos=False))
    sae = TopKSAE(TopKSAEConfig(k=6, **common)) if arch == "topk" else StandardSAE(StandardSAEConfig(**common))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc), sae.W_dec.copy_(w_dec), sae.b_enc.copy_(b_enc), sae.b_dec.copy_(b_dec)
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae.eval()


def random_sae(hook: str, d_in: int, d_sae: int, seed: int, arch="standard", dead: int = 2):
    gen = torch.Generator().manual_seed(seed)
    b_enc = 0.1 * torch.randn(d_sae, generator=gen)
    b_enc[-dead:] = -1e4  # never active: their nodes must get no effect
    return sae_from(hook, torch.randn(d_in, d_sae, generator=gen) / d_in**0.5,
                    torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5, b_enc, 0.1 * torch.randn(d_in, generator=gen),
                    arch)


def means_of(space: NodeSpace, seed: int = 0) -> ClassMeans:
    gen = torch.Generator().manual_seed(seed)
    n_cls = space.n_post + 2
    return ClassMeans({h: torch.rand(n_cls, space.d_sae(h), generator=gen) for h in space.hooks},
                      {h: 0.1 * torch.randn(n_cls, space.saes[h].cfg.d_in, generator=gen) for h in space.hooks},
                      {h: [1] * n_cls for h in space.hooks})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from refusal_lens.config import ModelConfig
    from refusal_lens.models.loading import load_model

    loaded = load_model(ModelConfig(name=str(tiny_model_dir)))
    with frozen(loaded.model):
        yield loaded


def setup(loaded, hooks, arch="standard"):
    enc = [encode_prompt(loaded.tokenizer, p, 64) for p in PROMPTS]
    space = NodeSpace(tuple(hooks), {h: random_sae(h, loaded.d_model, 2 * loaded.d_model, i, arch)
                                     for i, h in enumerate(hooks)}, enc[0].n_post_instruction)
    batch = make_batch(enc, list(range(len(enc))), loaded.tokenizer.pad_token_id)
    tokens = RefusalTokens(tuple(loaded.tokenizer.convert_tokens_to_ids(["I", "As"])), ("I", "As"), "family")
    return space, batch, Runner(loaded.model, space, tokens, means_of(space))


HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.2.hook_attn_out"]


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_splice_is_exact_and_sites_are_every_position_after_the_opening(tiny, arch):
    space, batch, runner = setup(tiny, HOOKS, arch)
    m, values = runner.clean(batch)
    for h in space.hooks:
        sae = space.saes[h]
        torch.testing.assert_close(sae.decode(values.f[h]) + values.err[h], values.x[h], rtol=1e-5, atol=1e-5)
    cls = site_classes(batch.classes, space.n_post)
    assert ((cls == NOT_A_SITE) == ((batch.classes == PAD) | (batch.classes == OPENING))).all()
    assert set(cls[cls >= 0].unique().tolist()) == set(range(space.n_classes))  # content and each post token
    # the runner's clean metric is the model's own
    again = runner.forward(batch)
    torch.testing.assert_close(m, again)


def _finite_difference(runner, batch, values, hook, j, cls_index, eps=1e-2):
    """d m / d eps of moving feature j (active sites of one class) eps of the way to its baseline (central)."""
    space = runner.space
    sae = space.saes[hook]
    from refusal_lens.stages.circuits.baselines import gather_class

    f, _ = values.f[hook], None
    target = gather_class(runner.means.features[hook], values.cls)
    where = ((values.cls == cls_index) & (f[..., j] > 0)).float()
    step = ((target[..., j] - f[..., j]) * where)[..., None] * sae.W_dec[j]

    def moved(sign):
        return runner.forward(batch, [Edit(hook, lambda x, ctx: x + sign * eps * step)])

    return (moved(1.0) - moved(-1.0)) / (2 * eps)


def test_atp_is_the_derivative_per_site_class_and_inactive_features_get_zero(tiny):
    space, batch, runner = setup(tiny, HOOKS)
    _, values = runner.clean(batch)
    eff = runner.atp(batch, values)
    assert eff.features.shape == (len(batch), space.n_classes, space.n_features)
    checked = 0
    for h in space.hooks:
        off = space.offset(h)
        active = torch.argwhere((values.f[h] > 0).flatten(0, 1).any(0)).flatten().tolist()[:3]
        for j in active:
            for c in (0, space.n_classes - 1):
                fd = _finite_difference(runner, batch, values, h, j, c)
                torch.testing.assert_close(eff.features[:, c, off + j], fd, rtol=0.02, atol=1e-4)
                checked += 1
        dead = space.d_sae(h) - 1  # b_enc = -1e4: never active
        assert (eff.features[:, :, off + dead] == 0).all()
        assert (runner.exact_feature(batch, runner.forward(batch), off + dead) == 0).all()
    assert checked >= 12


def test_clean_values_and_gradients_from_one_pass_are_those_of_two(tiny):
    """clean_and_gradients (the clean values read at the gradient pass's zero leaves) gives clean()'s metric and
    values and gradients()'s gradients, bit for bit, in one forward pass instead of two."""
    space, batch, runner = setup(tiny, HOOKS)
    m, values = runner.clean(batch)
    _, grads = runner.gradients(batch)
    passes = []
    handle = runner.model.embed.register_forward_hook(lambda *a: passes.append(1))
    try:
        m1, values1, grads1 = runner.clean_and_gradients(batch)
    finally:
        handle.remove()
    assert len(passes) == 1
    assert torch.equal(m, m1) and torch.equal(values.cls, values1.cls)
    for h in space.hooks:
        assert torch.equal(values.x[h], values1.x[h]) and torch.equal(values.f[h], values1.f[h])
        assert torch.equal(values.err[h], values1.err[h]) and torch.equal(grads[h], grads1[h])
    assert torch.equal(runner.atp(batch, values1, grads1).features, runner.atp(batch, values).features)


def test_ig_sums_to_the_exact_whole_hook_patch(tiny):
    """Completeness of integrated gradients: a hook's node effects sum to patching the whole hook, up to the
    midpoint rule's error, which falls with the steps (block 0's large move needs the most)."""
    space, batch, runner = setup(tiny, HOOKS)
    m, values = runner.clean(batch)
    errors = {}
    for steps in (8, 64):
        eff = runner.ig(batch, values, steps=steps)
        for k, h in enumerate(space.hooks):
            off = space.offset(h)
            total = eff.features[:, :, off : off + space.d_sae(h)].sum((1, 2)) + eff.errors[:, k]
            shift = runner.hook_shift(values, h)
            exact = runner.forward(batch, [Edit(h, lambda x, ctx, s=shift: x + s)]) - m
            errors[(steps, h)] = float((total - exact).abs().max())
            if steps == 64:
                torch.testing.assert_close(total, exact, rtol=0.01, atol=0.03)
    assert errors[(64, HOOKS[0])] < errors[(8, HOOKS[0])] / 10


def test_error_nodes_exact_and_atp_are_what_they_claim(tiny):
    """The exact error node moves the whole error term of the sites to its class mean; its AtP effect is the
    derivative along that move (large moves are where the two differ: why error nodes are patched exactly)."""
    from refusal_lens.stages.circuits.baselines import gather_class

    space, batch, runner = setup(tiny, HOOKS)
    m, values = runner.clean(batch)
    eff = runner.atp(batch, values)
    exact = runner.exact_errors(batch, m)
    site = ((values.cls != NOT_A_SITE) & (values.cls < space.n_classes))[..., None]
    for k, h in enumerate(space.hooks):
        step = (gather_class(runner.means.errors[h], values.cls) - values.err[h]) * site
        direct = runner.forward(batch, [Edit(h, lambda x, ctx, s=step: x + s)]) - m
        torch.testing.assert_close(exact[:, k], direct, rtol=1e-4, atol=1e-5)
        eps = 1e-2
        fd = (runner.forward(batch, [Edit(h, lambda x, ctx, s=step: x + eps * s)])
              - runner.forward(batch, [Edit(h, lambda x, ctx, s=step: x - eps * s)])) / (2 * eps)
        torch.testing.assert_close(eff.errors[:, k], fd, rtol=0.02, atol=1e-4)


def test_stats_of_agreement():
    s = stats(np.array([1.0, 2.0, -1.0, 0.5]), np.array([1.1, 2.2, -0.9, -0.5]))
    assert s["n"] == 4 and s["sign_agreement"] == 0.75
    assert s["median_relative_error"] == pytest.approx(np.median([0.1 / 1.1, 0.2 / 2.2, 0.1 / 0.9, 2.0]))


def test_faithfulness_patch_leaves_no_site_unpatched(tiny):
    """Keeping nothing puts every site of every hook at its class-mean activation; the opening is untouched."""
    space, batch, runner = setup(tiny, HOOKS)
    from refusal_lens.stages.circuits.baselines import gather_class

    captured = {}

    def grab(h):
        def fn(x, ctx):
            captured[h] = x.detach().clone()
            return x

        return fn

    edits = node_edits(space, [], runner.means, keep=True)
    assert [e.hook for e in edits] == list(space.hooks)
    _, clean = runner.clean(batch)
    for h, e in zip(space.hooks, edits):
        x = clean.x[h]
        out = e.fn(x, EditContext(batch.classes, batch.rows))
        cls = site_classes(batch.classes, space.n_post)
        sae = space.saes[h]
        mean_x = sae.decode(gather_class(runner.means.features[h], cls)) + gather_class(runner.means.errors[h], cls)
        site = cls != NOT_A_SITE
        torch.testing.assert_close(out[site], mean_x[site], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[~site], x[~site])
    # keeping everything changes nothing
    every = [("feature", i) for i in range(space.n_features)] + [("error", h) for h in space.hooks]
    torch.testing.assert_close(runner.forward(batch, node_edits(space, every, runner.means, keep=True)),
                               runner.forward(batch), rtol=1e-4, atol=1e-4)


def test_feature_interventions_touch_only_active_features_at_their_positions(tiny):
    space, batch, runner = setup(tiny, ["blocks.1.hook_resid_post"])
    h = space.hooks[0]
    sae = space.saes[h]
    _, values = runner.clean(batch)
    x = values.x[h]
    j = int(torch.argwhere((values.f[h] > 0).flatten(0, 1).any(0)).flatten()[0])
    mask = torch.zeros(space.d_sae(h))
    mask[j] = 1
    ctx = EditContext(batch.classes, batch.rows)
    for mode, pos in (("zero", "all"), ("zero", "after_opening"), ("scale", "all"), ("mean", "all")):
        out = feature_edit(space, h, mask, mode, runner.means, 2.0, pos).fn(x, ctx)
        f_old = values.f[h]
        changed = ~torch.isclose(out, x, atol=1e-6).all(-1)
        active = f_old[..., j] > 0
        if pos == "after_opening" or mode == "mean":
            assert not changed[batch.classes == OPENING].any()
        assert not changed[~active].any()  # inactive positions are never touched
        if mode in ("zero", "scale"):
            where = active & (batch.classes != PAD)
            if pos == "after_opening":
                where &= batch.classes != OPENING
            factor = -1.0 if mode == "zero" else -3.0  # f -> 0, or f -> -2 f: a change of -3 f
            expect = (factor * f_old[..., j] * where)[..., None] * sae.W_dec[j]
            torch.testing.assert_close(out - x, expect, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# The planted refusal feature
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from refusal_lens.config import ModelConfig
    from refusal_lens.models.loading import load_model

    folder = build_planted_model(tmp_path_factory.mktemp("planted-circuits") / "model")
    loaded = load_model(ModelConfig(name=str(folder)))
    with frozen(loaded.model):
        yield folder, loaded


def planted_space(folder, loaded):
    """One SAE at block 1's output whose feature 0 reads and writes e_h (the planted refusal direction); the
    other features are random, and two are never active."""
    e_h = load_planted_directions(folder)["harm"]
    hook = "blocks.1.hook_resid_post"
    d, d_sae = loaded.d_model, 32
    gen = torch.Generator().manual_seed(5)
    w_enc = torch.randn(d, d_sae, generator=gen) / d**0.5
    w_dec = torch.randn(d_sae, d, generator=gen) / d**0.5
    w_enc -= torch.outer(e_h, e_h @ w_enc)  # the random features do not read e_h ...
    w_dec -= torch.outer(w_dec @ e_h, e_h)  # ... nor write it
    w_enc[:, 0], w_dec[0] = e_h, e_h
    b_enc = torch.full((d_sae,), -0.2)
    b_enc[0] = 0.0
    b_enc[-2:] = -1e4
    sae = sae_from(hook, w_enc, w_dec, b_enc, torch.zeros(d))
    prompts = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in planted_prompts() if p.label == "toxic"][:8]
    space = NodeSpace((hook,), {hook: sae}, prompts[0].n_post_instruction)
    return space, prompts, e_h


def test_the_planted_refusal_feature_is_ranked_first_and_moves_the_metric_by_the_planted_amount(planted):
    folder, loaded = planted
    space, prompts, e_h = planted_space(folder, loaded)
    hook = space.hooks[0]
    tokens = RefusalTokens((loaded.tokenizer.convert_tokens_to_ids("I"),), ("I",), "family")
    means = ClassMeans({hook: torch.zeros(space.n_post + 2, 32)}, {hook: torch.zeros(space.n_post + 2, loaded.d_model)},
                       {hook: [1] * (space.n_post + 2)})
    runner = Runner(loaded.model, space, tokens, means, baseline="zero")
    batch = make_batch(prompts, list(range(len(prompts))), loaded.tokenizer.pad_token_id)
    m, values = runner.clean(batch)
    assert (m > 5).all()  # the planted model refuses these
    eff = runner.atp(batch, values).features.sum(1).mean(0)
    ranks = rankings(space, eff, e_h, per_hook=4)
    assert all(r.features[0] == 0 for r in ranks.values()), {k: r.features[:3] for k, r in ranks.items()}
    assert eff[-2:].abs().max() == 0  # never-active features: no effect
    # the planted amount: removing e_h at the hook's sites (after the opening), where it is positive
    def project_out(x, ctx):
        site = (ctx.classes != PAD) & (ctx.classes != OPENING)
        c = (x @ e_h).clamp_min(0) * site
        return x - c[..., None] * e_h

    planted_amount = runner.forward(batch, [Edit(hook, project_out)]) - m
    exact = runner.exact_feature(batch, m, 0)
    torch.testing.assert_close(exact, planted_amount, rtol=1e-4, atol=1e-3)
    assert (exact < -5).all()
    # ablating it removes refusal in generation too
    iv = Intervener(loaded, 8, model=loaded.hf_model)
    mask = torch.zeros(32)
    mask[0] = 1
    texts = iv.decode(iv.generate(prompts, 4, [feature_edit(space, hook, mask, "zero", means)]))
    clean = iv.decode(iv.generate(prompts, 4))
    from refusal_lens.core.judge import is_refusal

    assert all(is_refusal(t) for t in clean) and not any(is_refusal(t) for t in texts)
    # scripts/rerun_circuit.py applies the same interventions with its own hooks on the HF model: same responses
    rerun = importlib.import_module("refusal_lens.checks.rerun_circuit")
    for mode, positions in (("zero", "all"), ("scale", "after_opening")):
        ours = iv.decode(iv.generate(prompts, 4, [feature_edit(space, hook, mask, mode, means, 3.0, positions)]))
        openings = [p.n_opening for p in prompts] if positions == "after_opening" else None
        theirs = rerun.generate(loaded.hf_model, loaded.tokenizer, [p.ids for p in prompts], 4, 3,
                                lambda o, mode=mode: rerun.circuit_hooks(loaded.hf_model, space.saes, {hook: [0]}, mode,
                                                                         3.0, o), openings)
        assert [t.strip() for t in theirs] == [t.strip() for t in ours], (mode, positions)
        assert not any(is_refusal(t) for t in theirs)


def _zero_means_setting(planted):
    """The planted SAE space with zero class means (mean ablation = zero ablation) and an Intervener."""
    folder, loaded = planted
    space, prompts, e_h = planted_space(folder, loaded)
    hook = space.hooks[0]
    means = ClassMeans({hook: torch.zeros(space.n_post + 2, 32)}, {hook: torch.zeros(space.n_post + 2, loaded.d_model)},
                       {hook: [1] * (space.n_post + 2)})
    return loaded, space, prompts, e_h, means, Intervener(loaded, 8, model=loaded.hf_model)


def test_a_feature_edit_with_a_mask_per_row_reads_the_rows_and_gets_an_opening_per_row(planted):
    """A dict selection (random control sets, one mask per prompt row) reads ctx.rows: its edit is per_row, so in
    several conditions' batches each of its rows gets its own opening; one mask for every row is not per_row."""
    from refusal_lens.core.edit import opening_groups, per_condition

    loaded, space, prompts, e_h, means, iv = _zero_means_setting(planted)
    hook = space.hooks[0]
    one = torch.zeros(space.saes[hook].cfg.d_sae)
    one[0] = 1
    per_row = feature_edit(space, hook, {0: one, 1: torch.zeros_like(one)}, "zero", means)
    shared = feature_edit(space, hook, one, "zero", means)
    assert per_row.per_row and per_row.opening and not shared.per_row
    merged = per_condition([[per_row], [shared]], [0, 0, 1, 1])
    assert opening_groups(merged, [0, 1, 2, 3]) == ([0, 1, 2, 3], [0, 1, 2, 3])
    assert opening_groups(per_condition([[shared], [shared]], [0, 0, 1, 1]), [0, 1, 2, 3]) == ([0, 2], [0, 0, 1, 1])


def test_the_planted_feature_edit_lies_along_the_direction_and_does_nothing_without_it(planted):
    """Known answers for the alignment checks: the planted feature writes e_h only, so its zero-ablation edit lies
    wholly along e_h (fraction 1) and a random feature's along it not at all (its decoder has no e_h part); with
    the component along e_h removed from the edit, ablating the planted feature leaves every refusal in place."""
    from refusal_lens.core.judge import is_refusal
    from refusal_lens.stages.circuits.alignment import edit_alignment
    from refusal_lens.stages.circuits.behaviour import ablate

    loaded, space, prompts, e_h, means, iv = _zero_means_setting(planted)
    planted_edit = edit_alignment(iv, space, [0], "zero", means, 1.0, "all", e_h, prompts)
    assert planted_edit["fraction_along_direction"] == pytest.approx(1.0, abs=1e-5) and planted_edit["edit_norm"] > 0
    other = edit_alignment(iv, space, [1, 2, 3], "zero", means, 1.0, "all", e_h, prompts)
    assert other["fraction_along_direction"] == pytest.approx(0.0, abs=1e-5)
    ablated = iv.decode(iv.generate(prompts, 4, ablate(space, [0], "zero", means, 1.0, "all")))
    without = iv.decode(iv.generate(prompts, 4, ablate(space, [0], "zero", means, 1.0, "all", remove_along=e_h)))
    assert not any(is_refusal(t) for t in ablated) and all(is_refusal(t) for t in without)


def test_the_alignment_rides_on_the_generation_and_only_sets_not_generated_get_a_score_pass(planted, tmp_path):
    """The alignment tallied while a condition is generated (in shared batches of conditions) is what
    edit_alignment's own score pass gives: the prompts' own positions, the opening and generated tokens left out
    (a known count); measure_random_sets then runs a pass only for the sets that were not generated, with the
    scores of the plain edits."""
    from refusal_lens.core.behaviour import Condition, ResponseAudit, Runs, scored_controls
    from refusal_lens.stages.circuits.alignment import alignment_of, edit_alignment, tallied_edits
    from refusal_lens.stages.circuits.behaviour import Intervention, ablate, measure_random_sets

    loaded, space, prompts, e_h, means, iv = _zero_means_setting(planted)
    tokens = RefusalTokens((loaded.tokenizer.convert_tokens_to_ids("I"),), ("I",), "family")
    chosen = Intervention("zero", 1.0, "all")
    head, sets = [0], [[1], [2, 3], [4], [5, 6]]
    tallied = [tallied_edits(space, f, "zero", means, 1.0, "all", e_h) for f in [head, *sets[:2]]]
    plan = [Condition("head", prompts, [str(i) for i in range(len(prompts))], tallied[0][0], {})]
    plan += [Condition("random", prompts[1:], [str(i) for i in range(1, len(prompts))], e, {}) for e, _ in tallied[1:]]
    summaries, first = Runs(iv, 4, ResponseAudit(tmp_path / "r.jsonl")).scored(plan, tokens)
    for feats, (_, tally), c in zip([head, *sets[:2]], tallied, plan):
        got, own = alignment_of(tally), edit_alignment(iv, space, feats, "zero", means, 1.0, "all", e_h, c.prompts)
        assert got["positions"] == own["positions"] == sum(len(p.ids) - p.n_opening for p in c.prompts)
        assert got["edit_norm"] == pytest.approx(own["edit_norm"], rel=1e-4)
        assert got["fraction_along_direction"] == pytest.approx(own["fraction_along_direction"], abs=1e-5)
    assert alignment_of(tallied[0][1])["fraction_along_direction"] == pytest.approx(1.0, abs=1e-5)

    head_plan = [Condition("head", prompts, [], tallied[0][0], {})]
    random_plan = [Condition("random", prompts, [], e, {}) for e, _ in tallied[1:]]
    _, first = Runs(iv, 4, ResponseAudit(tmp_path / "s.jsonl")).scored(head_plan + random_plan, tokens)
    passes = []
    original = iv.last_logits
    iv.last_logits = lambda ps, edits=None, **kw: passes.append(1) or original(ps, edits, **kw)
    scored = measure_random_sets(iv, prompts, tokens, sets, chosen, space, means, [0.5, 0.25], (first[1:], first[0]),
                                 False)
    iv.last_logits = original
    assert len(passes) == len(sets) - 2 and scored["from_generation"] == 3  # the two generated sets and the headline
    plain = scored_controls(iv, prompts, tokens, ablate(space, head, "zero", means, 1.0, "all"),
                            [ablate(space, f, "zero", means, 1.0, "all") for f in sets], [0.5, 0.25])
    assert scored["headline_mean_score"] == pytest.approx(plain["headline_mean_score"], abs=1e-4)
    assert scored["scores"] == pytest.approx(plain["scores"], abs=1e-4) and scored["p_value"] == plain["p_value"]
    assert measure_random_sets(iv, prompts, None, sets, chosen, space, means, [0.5, 0.25], None, False) is None


def test_selection_rankings_are_signed_and_combined_preselects_by_cosine():
    class S:
        def __init__(self, w):
            self.W_dec = w
            self.cfg = type("C", (), {"d_sae": w.shape[0]})

    d = torch.eye(4)
    space = NodeSpace(("a", "b"), {"a": S(torch.stack([d[0], d[1], -d[0]])), "b": S(torch.stack([d[0], d[2], d[3]]))}, 1)
    effect = torch.tensor([-1.0, -3.0, 2.0, -0.5, 0.0, 1.0])
    assert promoting(effect).features == [1, 0, 3] and suppressing(effect).features == [2, 5]
    cos = decoder_cosines(space, d[0])
    assert cos.tolist() == [1.0, 0.0, -1.0, 1.0, 0.0, 0.0]
    ranked = combined(space, effect, cos, per_hook=1)
    assert ranked.features == [0, 3]  # top cosine per hook, then by effect
    with pytest.raises(ValueError, match="allowed"):
        rankings(space, effect, d[0], 1, methods=("magic",))


def test_ranked_nodes_and_bootstrap():
    class S:
        cfg = type("C", (), {"d_sae": 3})

    space = NodeSpace(("a",), {"a": S()}, 1)
    effects = torch.tensor([0.1, 0.0, -0.5]), torch.tensor([-0.3])
    assert ranked_nodes(space, *effects, "magnitude") == [("feature", 2), ("error", "a"), ("feature", 0)]
    # the signed circuit: the most refusal-promoting first, the suppressing feature last, the inactive one never
    assert ranked_nodes(space, *effects) == [("feature", 2), ("error", "a"), ("feature", 0)]
    assert ranked_nodes(space, torch.tensor([0.4, 0.0, -0.1]), torch.tensor([-0.3])) == [
        ("error", "a"), ("feature", 2), ("feature", 0)]
    assert ranked_nodes(space, torch.tensor([0.4, 0.0, -0.1]), torch.tensor([-0.3]), "magnitude") == [
        ("feature", 0), ("error", "a"), ("feature", 2)]
    with pytest.raises(ValueError, match="allowed: promoting, magnitude"):
        ranked_nodes(space, *effects, "abs")
    gen = torch.Generator().manual_seed(0)
    small = bootstrap_ci(torch.randn(10, 2, generator=gen), 500, 0)
    large = bootstrap_ci(torch.randn(400, 2, generator=gen), 500, 0)
    assert (small[:, 0] < small[:, 1]).all() and ((large[:, 1] - large[:, 0]) < (small[:, 1] - small[:, 0])).all()


def test_no_refused_discovery_prompt_means_no_induction_targets(tmp_path):
    """A model that refused no toxic discovery prompt (random weights) has no refused-prompt means: None, and
    the stage skips the behaviour part instead of failing (bench_gpu's smoke run on random weights)."""
    from refusal_lens.stages.circuits.baselines import refused_means
    from refusal_lens.run.collected import Collected
    from refusal_lens.run.folder import RunFolder

    rows = [{"prompt_id": f"p{i}", "label": label, "refused": refused, "split": split, "category": "c"}
            for i, (label, refused, split) in enumerate([("toxic", False, "discovery"), ("toxic", True, "test"),
                                                          ("harmless", False, "discovery")])]
    run = RunFolder(tmp_path / "missing")
    data = Collected(run.paths.activations, {}, rows, RefusalTokens((1,), ("I",), "family"))
    assert refused_means(None, run, data) is None  # never reads activations it does not need
