"""The ``hf_hooks`` collector against the bridge's ``run_with_cache`` on tiny random Llama, Qwen2 and
Gemma-2 models: every block hook type, left-padded batches, and the generation edits that use the
same module map (issue 11, 7a: Gemma-2's attn_out / mlp_out follow its post-norms).

Tolerance: the bridge reimplements attention (eager-like) and its linear maps, so values agree with
HF's to float32 rounding, not bit for bit: measured max |diff| <= 2.1e-5 (values up to 26), asserted as
``|a - b| <= 1e-5 + 1e-5 |b|`` (``assert_close(rtol=1e-5, atol=1e-5)``). Against HF's own
``output_hidden_states`` of the same model the collector is bit-identical (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch

from refusal_lens.activations.collector import (
    BridgeCollector,
    CollectorError,
    CollectRequest,
    HFHookCollector,
    choose_collector,
    make_collector,
    overlapped,
)
from refusal_lens.config import ModelConfig
from refusal_lens.core.hooks import LayerSpecError, hf_hook_target, hook_name
from refusal_lens.core.families import PRE_NORM, SANDWICH_NORM, block_layout
from refusal_lens.models.loading import load_hf_model, load_model
from refusal_lens.models.synthetic import build_random_chat_model, chat_vocab, special_token_ids

TYPES = ("resid_pre", "attention", "resid_mid", "mlp", "residuals")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def close(got, ref, msg=None):
    """Equal up to float32 op-order noise of two attention implementations (sdpa vs the bridge's): the absolute
    tolerance scales with the tensor's largest value (measured on this 2-core CPU: up to 2.1e-5 on residual values
    of 22, i.e. 1e-6 of the scale; a wrong hook point differs by O(1) of it)."""
    torch.testing.assert_close(got, ref, rtol=TOL["rtol"], atol=max(TOL["atol"], 4e-6 * float(ref.abs().max())),
                               msg=msg)
CPU = torch.device("cpu")


def _config(family: str):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(chat_vocab()), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **special_token_ids())
    if family == "gemma2":
        return Gemma2Config(head_dim=16, **common)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return cls(tie_word_embeddings=False, **common)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2"])
def family_loaded(request, tmp_path_factory):
    folder = build_random_chat_model(tmp_path_factory.mktemp(request.param) / "model", _config(request.param))
    return load_model(ModelConfig(name=str(folder)))


@pytest.fixture(scope="module")
def llama_loaded(tiny_model_dir):
    return load_model(ModelConfig(name=str(tiny_model_dir)))


def padded_batch():
    """Three prompts of different lengths, left-padded (id 0 = pad), every real position kept."""
    seqs = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15], [1, 20, 21]]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
    rows, cols = mask.nonzero(as_tuple=True)
    return ids, mask, rows, cols, torch.full((len(seqs),), width - 1)


def request(hooks, dtype=torch.float32) -> CollectRequest:
    ids, mask, rows, cols, last = padded_batch()
    return CollectRequest(ids, mask, tuple(hooks), rows, cols, last, dtype)


def all_hooks(n_layers: int) -> list[str]:
    return [hook_name(t, layer) for layer in range(n_layers) for t in TYPES]


def test_hf_hooks_equal_run_with_cache_for_every_hook_type(family_loaded):
    loaded = family_loaded
    hooks = all_hooks(loaded.n_layers)
    req = request(hooks)
    ref = BridgeCollector(loaded.model, CPU).submit(req).wait()
    got = HFHookCollector(loaded.hf_model, CPU, hooks).submit(req).wait()
    assert set(got.values) == set(hooks)
    for h in hooks:
        assert got.values[h].shape == ref.values[h].shape == (len(req.rows), loaded.d_model)
        close(got.values[h], ref.values[h], msg=h)
    close(got.logits, ref.logits)
    for module in loaded.hf_model.modules():  # every hook was removed
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_gemma2_attn_and_mlp_out_follow_the_post_norms(family_loaded):
    layer = family_loaded.hf_model.model.layers[1]
    attn, kind = hf_hook_target(family_loaded.hf_model, "blocks.1.hook_attn_out")
    mlp, _ = hf_hook_target(family_loaded.hf_model, "blocks.1.hook_mlp_out")
    mid, mid_kind = hf_hook_target(family_loaded.hf_model, "blocks.1.hook_resid_mid")
    if family_loaded.hf_model.config.model_type == "gemma2":
        assert (attn, mlp, mid) == (layer.post_attention_layernorm, layer.post_feedforward_layernorm,
                                    layer.pre_feedforward_layernorm)
    else:
        assert (attn, mlp, mid) == (layer.self_attn, layer.mlp, layer.post_attention_layernorm)
    assert (kind, mid_kind) == ("post", "pre")


def test_generation_edits_hit_the_bridges_hook_values(family_loaded):
    """An edit at attn_out / mlp_out during HF generation (the Intervener, through hf_hook_target) gives
    the first token the bridge gives with the same edit at its hook point."""
    from refusal_lens.core.chat import EncodedPrompt
    from refusal_lens.core.edit import Edit
    from refusal_lens.core.intervene import Intervener

    loaded = family_loaded
    seqs = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15], [1, 20, 21], [1, 30, 31, 32]]
    prompts = [EncodedPrompt("", s, 1, False, 1) for s in seqs]
    iv = Intervener(loaded, batch_size=4)
    batch = iv.batches(prompts, order_by_length=False)[0]
    torch.manual_seed(0)
    push = torch.randn(loaded.d_model) * 30

    def add(x, *_, **__):
        return x + push.to(x.dtype)

    for name in ("blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid"):
        with torch.no_grad():
            clean = loaded.model(batch.ids, attention_mask=batch.mask)[:, -1].argmax(-1)
            edited = loaded.model.run_with_hooks(batch.ids, attention_mask=batch.mask, fwd_hooks=[(name, add)])
        first = edited[:, -1].argmax(-1)
        assert (first != clean).any(), f"{name}: the edit should change some first token"
        got = iv.generate(prompts, 1, [Edit(name, add)])
        assert [g[:1] for g in got] == [[int(t)] if int(t) not in iv.eos else [] for t in first], name


def test_bit_identical_to_hf_hidden_states_and_logits_of_the_same_model(llama_loaded):
    loaded = llama_loaded
    hooks = [hook_name(t, layer) for layer in range(loaded.n_layers) for t in ("resid_pre", "residuals")]
    req = request(hooks)
    got = HFHookCollector(loaded.hf_model, CPU, hooks).submit(req).wait()
    with torch.no_grad():
        out = loaded.hf_model(input_ids=req.ids, attention_mask=req.mask, output_hidden_states=True, use_cache=False)
    for layer in range(loaded.n_layers):
        assert torch.equal(got.values[hook_name("resid_pre", layer)], out.hidden_states[layer][req.rows, req.cols])
        if layer < loaded.n_layers - 1:  # HF's last hidden state is after the final norm
            assert torch.equal(got.values[hook_name("residuals", layer)],
                               out.hidden_states[layer + 1][req.rows, req.cols])
    torch.testing.assert_close(got.logits, out.logits[torch.arange(3), req.logit_cols], rtol=1e-6, atol=1e-6)


def test_sdpa_and_eager_hf_models_agree_with_the_bridge(llama_loaded):
    loaded = llama_loaded
    assert loaded.hf_model.config._attn_implementation == "sdpa"
    eager = load_hf_model(loaded.source, torch.float32, CPU, "eager")
    hooks = all_hooks(loaded.n_layers)
    req = request(hooks)
    ref = BridgeCollector(loaded.model, CPU).submit(req).wait().values
    for hf_model in (loaded.hf_model, eager):
        got = HFHookCollector(hf_model, CPU, hooks).submit(req).wait().values
        for h in hooks:
            close(got[h], ref[h], msg=h)


def test_storage_dtype_and_overlapped_order(llama_loaded):
    loaded = llama_loaded
    hooks = all_hooks(loaded.n_layers)
    collector = HFHookCollector(loaded.hf_model, CPU, hooks)
    reqs = [request(hooks, torch.float16), request(hooks[:2], torch.bfloat16), request(hooks[-1:], torch.float16)]
    results = list(overlapped(collector, reqs))
    assert [r for r, _ in results] == reqs
    for req, got in results:
        direct = HFHookCollector(loaded.hf_model, CPU).submit(req).wait()
        assert list(got.values) == list(req.hooks)
        for h in req.hooks:
            assert got.values[h].dtype == req.dtype and got.values[h].device.type == "cpu"
            assert torch.equal(got.values[h], direct.values[h])
    assert list(overlapped(collector, [])) == []


def test_choosing_the_collector(llama_loaded):
    loaded, cuda = llama_loaded, torch.device("cuda")
    block = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    raw = [*block, "blocks.0.attn.hook_z"]
    assert choose_collector("auto", CPU, loaded.hf_model, block) == "bridge"
    assert choose_collector("auto", cuda, loaded.hf_model, block) == "hf_hooks"  # a device object; nothing runs
    assert choose_collector("auto", cuda, loaded.hf_model, raw) == "bridge"
    assert choose_collector("hf_hooks", CPU, loaded.hf_model, block) == "hf_hooks"
    assert choose_collector("bridge", cuda, loaded.hf_model, raw) == "bridge"
    with pytest.raises(CollectorError, match=r"hf_hooks.*blocks\.0\.attn\.hook_z.*'bridge'"):
        choose_collector("hf_hooks", CPU, loaded.hf_model, raw)
    with pytest.raises(CollectorError, match="allowed: auto, bridge, hf_hooks"):
        choose_collector("fast", CPU, loaded.hf_model, block)
    assert isinstance(make_collector(loaded, "auto", block), BridgeCollector)
    assert isinstance(make_collector(loaded, "hf_hooks", block), HFHookCollector)


def test_block_layouts_by_model_type_and_by_structure(llama_loaded, family_loaded):
    llama_layer = llama_loaded.hf_model.model.layers[0]
    assert block_layout("llama", llama_layer) == (PRE_NORM, "")
    assert block_layout("some_new_llama_like", llama_layer) == (PRE_NORM, "")  # unknown type: by structure
    layout, why = block_layout("gemma2", llama_layer)
    assert layout is None and "no post_feedforward_layernorm" in why
    if family_loaded.hf_model.config.model_type == "gemma2":
        layer = family_loaded.hf_model.model.layers[0]
        assert block_layout("some_new_gemma_like", layer) == (SANDWICH_NORM, "")
        layout, why = block_layout("llama", layer)  # a norm after the MLP: not the pre-norm layout
        assert layout is None and "has post_feedforward_layernorm" in why
    odd = torch.nn.Module()
    odd.model = torch.nn.Module()
    odd.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(LayerSpecError, match="fits no known block layout.*families.py"):
        hf_hook_target(odd, "blocks.0.hook_mlp_out")
    assert hf_hook_target(odd, "blocks.0.hook_resid_post")[1] == "post"
    with pytest.raises(LayerSpecError, match="have a Hugging Face module"):
        hf_hook_target(llama_loaded.hf_model, "blocks.0.attn.hook_z")
    with pytest.raises(LayerSpecError, match="3 layers"):
        hf_hook_target(llama_loaded.hf_model, "blocks.7.hook_resid_post")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side stream + pinned copies)")
def test_cuda_overlapped_copies_equal_synchronous_ones(tiny_model_dir):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cuda"))
    hooks = all_hooks(loaded.n_layers)
    reqs = [request(hooks, torch.float16) for _ in range(3)]
    cpu_model = load_hf_model(loaded.source, torch.float32, CPU)
    for req, got in overlapped(HFHookCollector(loaded.hf_model, loaded.device, hooks), reqs):
        ref = HFHookCollector(cpu_model, CPU, hooks).submit(req).wait()
        for h in hooks:
            assert got.values[h].is_pinned()
            torch.testing.assert_close(got.values[h], ref.values[h], rtol=2e-3, atol=2e-3)


def test_collect_stage_stores_the_same_rows_with_either_collector(llama_loaded):
    """forward_and_extract with responses, every position, padding: the stored fp16 values agree to one
    fp16 rounding step, scores to float32 rounding; metadata and token ids are identical."""
    from refusal_lens.core.chat import encode_prompt, render
    from refusal_lens.stages.collect.extraction import forward_and_extract
    from refusal_lens.config import InferenceConfig
    from refusal_lens.data.prompts import Prompt
    from refusal_lens.core.refusal import family_refusal_tokens

    loaded = llama_loaded
    texts = ["hello world", "how are you python code print the a", "make cake"]
    prompts = [Prompt(f"t:{i}", t, "c", "safe", "t") for i, t in enumerate(texts)]
    encoded = [encode_prompt(loaded.tokenizer, p.prompt, 64) for p in prompts]
    responses = [[20, 21, 22], [23], []]
    tokens = family_refusal_tokens(loaded.tokenizer, render(loaded.tokenizer, "Hello"), loaded.family.refusal_words)
    hooks = all_hooks(loaded.n_layers)
    out = {}
    for name in ("bridge", "hf_hooks"):
        inf = InferenceConfig(positions="all", store_response_activations=True, collector=name)
        out[name] = forward_and_extract(loaded, prompts, encoded, responses, hooks, inf, tokens)
    (s_ref, v_ref, t_ref, m_ref, n_ref), (s, v, t, m, n) = out["bridge"], out["hf_hooks"]
    assert sum(len(e.ids) for e in encoded) + 4 == len(t) == n == n_ref
    assert m == m_ref and (t == t_ref).all()
    torch.testing.assert_close(torch.tensor(s), torch.tensor(s_ref), rtol=1e-5, atol=1e-5)
    for h in hooks:
        assert v[h].dtype == v_ref[h].dtype and v[h].shape == v_ref[h].shape
        torch.testing.assert_close(torch.from_numpy(v[h]).float(), torch.from_numpy(v_ref[h]).float(),
                                   rtol=1e-3, atol=1e-3, msg=h)
