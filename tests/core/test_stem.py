"""Clean stems: a pass whose edits start at layer l runs from the clean residual entering l, computed once per
batch; the same logits bit for bit, fewer layers run, and the token meter counts the layers' share."""

import copy

import pytest
import torch

from planted import load_planted_directions, loaded_planted
from refusal_lens.core.chat import OPENING
from refusal_lens.core.direction_edits import ablation_edits
from refusal_lens.core.edit import Edit
from refusal_lens.core.hooks import hf_decoder_layers
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.stem import Stems, first_edited_layer, windowed
from refusal_lens.infra.token_meter import TokenMeter


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return loaded_planted(tmp_path_factory.mktemp("planted-stem") / "model", every=2)


class LayerCalls:
    """How many times each decoder layer ran, and on how many rows."""

    def __init__(self, model):
        self.rows = [0] * len(hf_decoder_layers(model))
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(hf_decoder_layers(model))]

    def _hook(self, i):
        def hook(_module, args, _output):
            self.rows[i] += args[0].shape[0] if args else 0
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def edit_cases(e_h):
    def sites(x, ctx):
        return x + 0.7 * e_h * (ctx.classes != OPENING)[..., None]

    def per_prompt(rows):  # different edits for different batches (a callable EditsFor)
        return [Edit("blocks.1.hook_resid_post", lambda x, ctx: x - 0.3 * (rows[0] + 1) * e_h, opening=True)]

    return {
        "resid_post of layer 1, opening spared": [Edit("blocks.1.hook_resid_post", sites, opening=False)],
        "resid_pre of layer 2, the opening changed": [Edit("blocks.2.hook_resid_pre", lambda x, ctx: x + 2 * e_h,
                                                           opening=True)],
        "attention and MLP outputs of layers 1-2": [Edit("blocks.1.hook_attn_out", lambda x, ctx: 0.5 * x),
                                                    Edit("blocks.2.hook_mlp_out", lambda x, ctx: x + e_h)],
        "per batch": per_prompt,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("share_opening", [True, False])
def test_a_pass_from_the_clean_stem_gives_the_whole_pass_logits_bit_for_bit(planted, dtype, share_opening):
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"].to(dtype)
    model = loaded.hf_model if dtype == torch.float32 else copy.deepcopy(loaded.hf_model).to(dtype)
    iv = Intervener(loaded, 3, model=model, share_opening=share_opening)
    n_batches = len(iv.batches(prompts))
    assert windowed(model) and n_batches >= 2
    for name, edits in edit_cases(e_h).items():
        stems = Stems()
        whole = iv.last_logits(prompts, edits)
        first = iv.last_logits(prompts, edits, stems=stems)
        again = iv.last_logits(prompts, edits, stems=stems)
        assert torch.equal(first, whole) and torch.equal(again, whole), name
        assert (stems.computed, stems.reused) == (n_batches, n_batches), name
    assert not torch.equal(whole, iv.last_logits(prompts)), "the edits change the logits"


def test_only_the_layers_from_the_first_edit_run_and_the_meter_counts_their_share(planted):
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    iv = Intervener(loaded, 4, model=loaded.hf_model)
    n, L = len(prompts), loaded.n_layers
    edits = [Edit("blocks.2.hook_resid_post", lambda x, ctx: x + e_h, opening=False)]
    assert first_edited_layer(edits) == 2 and first_edited_layer(ablation_edits(e_h, L)) == 0
    assert first_edited_layer([]) == 0 and first_edited_layer([Edit("hook_embed", lambda x, ctx: x)]) == 0
    stems = Stems()
    iv.last_logits(prompts, edits, stems=stems)  # the clean opening is cached here, once
    meter, calls = TokenMeter(), LayerCalls(loaded.hf_model)
    meter.watch(loaded.hf_model, "hf")
    try:
        iv.last_logits(prompts, edits, stems=stems)  # every stem known: layers 2.. only
        assert calls.rows == [0, 0, n]
        positions = sum(b.ids.numel() for b in iv.batches(prompts, prefix=tuple(prompts[0].ids[:2])))
        assert meter.snapshot() == {"hf float32 forward": round(positions * (L - 2) / L)}
        iv.last_logits(prompts, edits, stems=Stems())  # new stems: layers 0-1 for them, then 2..
        assert calls.rows == [n, n, 2 * n]
        iv.last_logits(prompts, ablation_edits(e_h, L), stems=stems)  # edits at layer 0: the whole pass
        assert calls.rows == [2 * n + 1, 2 * n + 1, 3 * n + 1]  # (+ the opening's own pass: the edits change it)
        opening = len(prompts[0].ids[:2])
        expected = positions * (L - 2) / L * 2 + positions * 2 / L + opening + positions
        assert meter.snapshot() == {"hf float32 forward": round(expected)}
    finally:
        calls.close()
    assert len(hf_decoder_layers(loaded.hf_model)) == L  # the layers are put back


def test_a_model_whose_layers_differ_in_attention_runs_whole(planted):
    _, loaded, _ = planted
    model = copy.deepcopy(loaded.hf_model)
    model.config.layer_types = ["full_attention"] * (loaded.n_layers - 1) + ["sliding_attention"]
    assert not windowed(model)
    model.config.layer_types = ["full_attention"] * loaded.n_layers
    assert windowed(model)


def test_a_stem_is_computed_from_the_stem_below_it_and_gives_the_same_bits(planted):
    """Edits starting at layer 1, then at layer 2 (as the emergence curve's start layers): the second pass's stem
    runs layer 1 only, from the first's stem, and every pass gives the whole pass's logits bit for bit."""
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    iv = Intervener(loaded, 4, model=loaded.hf_model)
    n = len(prompts)
    at = {layer: ablation_edits(e_h, loaded.n_layers, from_layer=layer) for layer in (1, 2)}
    assert [first_edited_layer(at[layer]) for layer in (1, 2)] == [1, 2]
    whole = {layer: iv.last_logits(prompts, edits) for layer, edits in at.items()}
    iv.last_logits(prompts)  # the clean opening, cached before the layers are counted
    stems, calls = Stems(), LayerCalls(loaded.hf_model)
    try:
        assert torch.equal(iv.last_logits(prompts, at[1], stems=stems), whole[1])
        assert calls.rows == [n + 1, n + 1, n + 1]  # the stem at 1 (layer 0), the pass (1-2), the edited opening
        assert torch.equal(iv.last_logits(prompts, at[2], stems=stems), whole[2])
        assert calls.rows == [n + 2, 2 * n + 2, 2 * n + 2]  # the stem at 2: layer 1 from the stem at 1; the pass: 2
    finally:
        calls.close()
    assert stems.computed == 2 * len(iv.batches(prompts))
