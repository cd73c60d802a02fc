"""Attribution over spliced SAEs on a tiny random model, checked against exact patching."""

import numpy as np
import pytest
import torch

from refusal_lens.chat import encode_prompt
from refusal_lens.circuits.attribution import (
    NodeValues,
    ProjectionMetric,
    RefusalScoreMetric,
    Runner,
    fixed_baseline,
    frozen_parameters,
    split_nodes,
)
from refusal_lens.circuits.build import bootstrap_ci, ranked_nodes
from refusal_lens.circuits.nodes import NodeSpace, make_batch
from refusal_lens.circuits.validate import faithfulness_curve, pearson, spearman
from refusal_lens.refusal import build_refusal_tokens

PROMPTS = ["how make bomb ?", "bake a cake", "what is python code", "steal car", "hello world", "print the code"]
RESID = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def random_sae(hook: str, d_in: int, d_sae: int, arch: str, seed: int):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu",
                  metadata=SAEMetadata(hook_name=hook, model_name="tiny", context_size=1, prepend_bos=False))
    sae = TopKSAE(TopKSAEConfig(k=12, **common)) if arch == "topk" else StandardSAE(StandardSAEConfig(**common))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae.eval()


@pytest.fixture(scope="module")
def bridge(tiny_model_dir):
    from refusal_lens.config import ModelConfig
    from refusal_lens.models.loading import load_model

    loaded = load_model(ModelConfig(name=str(tiny_model_dir), backend="bridge"))
    with frozen_parameters(loaded.model):
        yield loaded


def make_space(loaded, hooks, arch="topk", window=1):
    d = loaded.d_model
    saes = {h: random_sae(h, d, 2 * d, arch, seed=i) for i, h in enumerate(hooks)}
    return NodeSpace(tuple(hooks), saes, window)


def prompt_batch(loaded, window=1, site_from=2, skip_special=True):
    seqs = [encode_prompt(loaded.tokenizer, p, 64).ids for p in PROMPTS]
    return make_batch(seqs, list(range(len(seqs))), loaded.tokenizer.pad_token_id, site_from=site_from,
                      skip_token_ids=loaded.tokenizer.all_special_ids if skip_special else (), window=window)


def refusal_metric(loaded):
    prefix = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                                  add_generation_prompt=True)
    return RefusalScoreMetric(build_refusal_tokens(loaded.tokenizer, prefix, ["I", "Sorry"], ["Sure", "Here"]))


def linear_metric(loaded):
    direction = torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(7))
    return ProjectionMetric("blocks.2.hook_resid_post", direction)


def nearby_baseline(values: NodeValues, eps: float, seed: int = 0):
    """A per-prompt baseline a small step away from the clean node values."""
    gen = torch.Generator().manual_seed(seed)
    shifted = {h: (values.f[h] + eps * torch.randn(values.f[h].shape, generator=gen),
                   values.err[h] + eps * torch.randn(values.err[h].shape, generator=gen)) for h in values.f}
    return lambda batch, hook: shifted[hook]


def nodes_to_check(space, values, per_hook=6):
    """Per hook: the error node, active features and a few inactive ones."""
    nodes = []
    for h in space.hooks:
        active = torch.argwhere((values.f[h] != 0).flatten(0, 1).any(0)).flatten()[:per_hook].tolist()
        inactive = [j for j in range(space.d_sae(h)) if j not in active][:2]
        nodes += [(0, space.offset(h) + j) for j in [*active, *inactive, space.d_sae(h)]]
    return nodes


def test_splice_with_error_term_is_exact(bridge):
    space = make_space(bridge, RESID)
    batch = prompt_batch(bridge)
    runner = Runner(bridge.model, space, refusal_metric(bridge))
    m, values = runner.clean(batch)
    for h in RESID:
        x_hat = space.saes[h].decode(values.f[h]) + values.err[h]
        sites = batch.sites[..., None]
        assert torch.allclose(torch.where(sites, x_hat, values.x[h]), values.x[h], atol=1e-5)
    # every node kept = the full model: faithfulness of the full node set is 1
    base = fixed_baseline({h: (torch.zeros(space.d_sae(h)), torch.zeros(bridge.d_model)) for h in RESID})
    nothing = {h: torch.zeros(1, space.size(h)) for h in RESID}
    assert torch.allclose(runner.patch(batch, base, nothing), m, atol=1e-5)
    rng = np.random.default_rng(0)
    ranked = ranked_nodes(runner.atp(batch, values, base).mean(0))
    # every node, ranked ones first (features inactive on the clean run can fire once upstream nodes move)
    rest = sorted(set(range(space.n_nodes)) - {i for _, i in ranked})
    full = [*ranked, *[(0, i) for i in rest]]
    curve = faithfulness_curve(runner, [batch], base, full, [5, len(full)], 0, rng, float(m.mean()))
    assert curve["points"][-1]["size"] == space.n_nodes
    assert curve["points"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert curve["points"][-1]["completeness"] == pytest.approx(1.0, abs=1e-4)
    assert abs(curve["metric_empty"] - curve["metric_clean"]) > 1e-3  # the ablation does change the metric


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_atp_equals_exact_patching_for_small_deltas_at_every_layer(bridge, arch):
    """Linear metric, small deltas: AtP must match exact patching at every hook of a 3-SAE splice,
    error nodes included (this fails if gradients to upstream hooks flow through downstream
    reconstructions, see test_naive_error_term_breaks_upstream_attribution)."""
    space = make_space(bridge, RESID, arch)
    batch = prompt_batch(bridge)
    runner = Runner(bridge.model, space, linear_metric(bridge))
    m, values = runner.clean(batch)
    base = nearby_baseline(values, eps=1e-2)
    est = runner.atp(batch, values, base)
    nodes = nodes_to_check(space, values)
    exact = runner.exact(batch, base, nodes, m)
    approx = torch.stack([est[:, s, i] for s, i in nodes], -1)
    for h in RESID:
        cols = [k for k, (_, i) in enumerate(nodes) if space.locate(i)[0] == h]
        e, a = exact[:, cols].flatten(), approx[:, cols].flatten()
        assert e.abs().max() > 1e-4, h  # the nodes really move the metric
        assert (a - e).abs().max() <= 0.02 * e.abs().max(), h
        assert pearson(a.numpy(), e.numpy()) > 0.999, h


def test_naive_error_term_breaks_upstream_attribution(bridge):
    """SAE-Lens's use_error_term computes the error without gradient: with several SAEs spliced, the
    gradient reaching an upstream hook flows only through downstream reconstructions."""
    space = make_space(bridge, RESID)
    batch = prompt_batch(bridge)
    metric = linear_metric(bridge)
    runner = Runner(bridge.model, space, metric)
    m, values = runner.clean(batch)
    base = nearby_baseline(values, eps=1e-2)
    leaves = {}

    def naive(name):
        def fn(x, hook):  # noqa: ARG001
            sae = space.saes[name]
            f = sae.encode(x)
            if name == RESID[0]:
                f = f.detach().requires_grad_(True)
                leaves["f"] = f
            return sae.decode(f) + (x - sae.decode(f)).detach()  # the error term carries no gradient

        return fn

    with torch.enable_grad():
        mm, _ = runner.forward(batch, [(h, naive(h)) for h in RESID])
        (g,) = torch.autograd.grad(mm.sum(), [leaves["f"]])
    b_f, _ = base(batch, RESID[0])
    naive_est = fold = ((b_f - values.f[RESID[0]]) * g * batch.sites[..., None]).sum(1)
    nodes = [(0, j) for j in torch.argwhere((values.f[RESID[0]] != 0).flatten(0, 1).any(0)).flatten().tolist()]
    exact = runner.exact(batch, base, nodes, m)
    ours = runner.atp(batch, values, base)
    ours_cols = torch.stack([ours[:, 0, i] for _, i in nodes], -1)
    naive_cols = torch.stack([fold[:, j] for _, j in nodes], -1)
    err_ours = (ours_cols - exact).abs().max() / exact.abs().max()
    err_naive = (naive_cols - exact).abs().max() / exact.abs().max()
    assert err_ours < 0.02
    assert err_naive > 10 * err_ours
    del naive_est


def test_per_position_nodes_match_exact_patching(bridge):
    space = make_space(bridge, RESID[1:], window=3)
    batch = prompt_batch(bridge, window=3, skip_special=False)  # the tiny template ends in 2 special tokens
    runner = Runner(bridge.model, space, linear_metric(bridge))
    m, values = runner.clean(batch)
    base = nearby_baseline(values, eps=1e-2)
    est = runner.atp(batch, values, base)
    assert est.shape == (len(PROMPTS), 3, space.n_nodes)
    ranked = ranked_nodes(est.abs().mean(0))
    nodes = [n for slot in range(3) for n in [r for r in ranked if r[0] == slot][:4]]
    assert {s for s, _ in nodes} == {0, 1, 2}
    exact = runner.exact(batch, base, nodes, m)
    approx = torch.stack([est[:, s, i] for s, i in nodes], -1)
    assert (approx - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("hook_types", [["blocks.1.hook_mlp_out", "blocks.2.hook_attn_out"]])
def test_ig_sums_to_the_exact_layer_patch_and_beats_atp(bridge, hook_types):
    """Large deltas (mean baseline), refusal score: IG's node effects of one hook sum to the exact effect
    of patching the whole hook (completeness), on mlp_out and attn_out splices. (With a zero baseline
    this random model's path crosses near-zero norms and 128 steps do not converge.)"""
    hooks = ["blocks.0.hook_resid_post", *hook_types]
    space = make_space(bridge, hooks)
    batch = prompt_batch(bridge)
    runner = Runner(bridge.model, space, refusal_metric(bridge))
    m, values = runner.clean(batch)
    s = batch.sites
    base = fixed_baseline({h: (values.f[h][s].mean(0), values.err[h][s].mean(0)) for h in hooks})
    ig = runner.ig(batch, values, base, steps=32)
    atp = runner.atp(batch, values, base)
    for h in hooks:
        whole = runner.patch(batch, base, {h: torch.ones(1, space.size(h))}) - m
        ig_sum = space.split(ig)[h].sum((-1, -2))
        atp_sum = space.split(atp)[h].sum((-1, -2))
        assert (ig_sum - whole).abs().max() <= 0.02 * whole.abs().max() + 1e-4, h
        assert (ig_sum - whole).abs().max() <= (atp_sum - whole).abs().max() + 1e-5, h


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_prompts():
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(8, 1, 3, generator=gen) + torch.tensor([0.0, 1.0, -2.0])
    large = torch.randn(200, 1, 3, generator=gen) + torch.tensor([0.0, 1.0, -2.0])
    nodes = [(0, 0), (0, 1), (0, 2)]
    ci_s, ci_l = bootstrap_ci(small, nodes, 500, 0), bootstrap_ci(large, nodes, 500, 0)
    means = small.mean(0)[0]
    assert np.all(ci_s[:, 0] <= means.numpy()) and np.all(means.numpy() <= ci_s[:, 1])
    assert np.all((ci_l[:, 1] - ci_l[:, 0]) < (ci_s[:, 1] - ci_s[:, 0]))
    assert ci_l[1, 0] < 1.0 < ci_l[1, 1] and ci_l[2, 0] < -2.0 < ci_l[2, 1]


def test_correlations():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(pearson(a, np.ones(4)))


def test_split_nodes_zero_outside_sites(bridge):
    space = make_space(bridge, RESID[:1])
    x = torch.randn(2, 5, bridge.d_model)
    sites = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    f, err = split_nodes(space.saes[RESID[0]], x, sites)
    assert (f[~sites] == 0).all() and (err[~sites] == 0).all()
    assert torch.allclose(space.saes[RESID[0]].decode(f)[sites] + err[sites], x[sites], atol=1e-5)


def test_similarity_permutation_matches_the_direct_computation():
    from refusal_lens.analysis.metrics import permutation_pvalue, similarity, top_nodes

    rng = np.random.default_rng(0)
    a = rng.normal(size=300) * (rng.random(300) < 0.3)
    b = a + 0.1 * rng.normal(size=300) * (a != 0)
    assert similarity(a, a, 20) == pytest.approx(1.0)
    assert similarity(a, -a, 20) == 0.0
    assert similarity(a, b, 20) > 0.7
    pool = np.flatnonzero(a != 0)
    p, null = permutation_pvalue(a, b, 20, pool, 200, np.random.default_rng(1))
    assert p < 0.01 and null < 0.3
    # the vectorised null equals the direct similarity of B's top effects moved to the same random nodes
    top_b = top_nodes(b, 20)
    gen = np.random.default_rng(5)
    picks = pool[np.argpartition(gen.random((1, len(pool))), len(top_b) - 1, axis=1)[:, : len(top_b)]][0]
    fake = np.zeros_like(b)
    fake[picks] = b[top_b]
    _, null_one = permutation_pvalue(a, b, 20, pool, 1, np.random.default_rng(5), chunk=1)
    assert null_one == pytest.approx(similarity(a, fake, 20))
    # unrelated circuits: a large p-value
    c = np.zeros_like(a)
    c[rng.choice(300, 30, replace=False)] = rng.normal(size=30)
    assert permutation_pvalue(a, c, 20, np.arange(300), 200, np.random.default_rng(2))[0] > 0.05


def test_edges_match_the_change_of_downstream_attribution_under_small_patches(bridge):
    """e(u -> d) = (dm/dd)(dd/du) delta_u must equal sum_pos g_d (d(patched u) - d(clean)) for small deltas."""
    hooks = RESID[:2]
    space = make_space(bridge, hooks)
    batch = prompt_batch(bridge)
    runner = Runner(bridge.model, space, linear_metric(bridge))
    m, values = runner.clean(batch)
    base = nearby_baseline(values, eps=1e-2)
    _, grads = runner.gradients(batch)
    up = nodes_to_check(space, values, per_hook=3)
    up = [i for _, i in up if space.locate(i)[0] == hooks[0]]
    down = [space.offset(hooks[1]) + j for j in
            torch.argwhere((values.f[hooks[1]] != 0).flatten(0, 1).any(0)).flatten()[:3].tolist()]
    down.append(space.offset(hooks[1]) + space.d_sae(hooks[1]))  # the error node
    edges = {(u, d): w for u, d, w in runner.edges(batch, values, base, up + down, grads)}
    sae = space.saes[hooks[1]]
    g = grads[hooks[1]]
    g_feat = g @ sae.W_dec.T
    sites = batch.sites[..., None]

    def downstream_values(edits):
        xs = {}

        def grab(x, hook):  # noqa: ARG001
            xs["x"] = x
            return x

        with torch.no_grad():
            runner.forward(batch, [*edits, (hooks[1], grab)])
        f = sae.encode(xs["x"]) * sites
        return f, (xs["x"] - sae.decode(f)) * sites

    f0, e0 = downstream_values([])
    checked = 0
    for u in up:
        sel = runner.select_nodes([(0, u)])
        f1, e1 = downstream_values([(hooks[0], runner.node_edit(batch, base, hooks[0], sel[hooks[0]]))])
        for d in down:
            j = space.locate(d)[1]
            if j == space.d_sae(hooks[1]):
                exact = float((g * (e1 - e0)).sum()) / len(batch)
            else:
                exact = float((g_feat[..., j] * (f1[..., j] - f0[..., j])).sum()) / len(batch)
            est = edges[(u, d)]
            assert est == pytest.approx(exact, rel=0.05, abs=1e-6), (u, d)
            checked += abs(exact) > 1e-6
    assert checked >= 4


def test_generation_with_hooks_runs_the_edits_at_every_step(bridge):
    from refusal_lens.circuits.validate import feature_selection, generate
    from refusal_lens.collect import generate_responses

    batch = prompt_batch(bridge)
    encoded = [encode_prompt(bridge.tokenizer, p, 64) for p in PROMPTS]
    clean = generate(bridge, batch, 5)
    assert clean == bridge.tokenizer.batch_decode(generate_responses(bridge, encoded, 5), skip_special_tokens=True)
    widths = []

    def zero(x, hook):  # noqa: ARG001
        widths.append(x.shape[1])
        return torch.zeros_like(x)

    edited = generate(bridge, batch, 5, [("blocks.2.hook_resid_post", zero)])
    assert widths[0] == batch.ids.shape[1] and set(widths[1:]) == {1} and len(widths) >= 2
    assert edited != clean
    # circuit features at their baseline during generation: prefill at sites, then every new token
    space = make_space(bridge, RESID)
    runner = Runner(bridge.model, space, refusal_metric(bridge))
    _, values = runner.clean(batch)
    s = batch.sites
    base = fixed_baseline({h: (values.f[h][s].mean(0), values.err[h][s].mean(0)) for h in RESID})
    features = [(0, space.offset(h) + j) for h in RESID for j in range(space.d_sae(h))]
    sel = feature_selection(runner, features)
    ablated = generate(bridge, batch, 5, [(h, runner.node_edit(batch, base, h, sel[h])) for h in RESID])
    assert ablated != clean
    nothing = {h: torch.zeros(1, space.size(h)) for h in RESID}
    assert generate(bridge, batch, 5, [(h, runner.node_edit(batch, base, h, nothing[h])) for h in RESID]) == clean
