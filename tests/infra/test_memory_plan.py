"""The memory plan (refusal_lens/infra/storage_estimate.py) against the real peak allocation of a small Llama-style
model on the CPU, measured with torch's memory profiler: weights exactly; the collect forward (hf_hooks,
every position of every resid_post), generation with its KV cache, the attribution pass's forward and
backward through the bridge, and an SAE-Lens training step each within 20%. The shapes here differ from
those the per-token constants were measured on (d_model 256-512, see estimate.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from refusal_lens.activations.collector import CollectRequest, HFHookCollector
from refusal_lens.config import ModelConfig, SAEConfig, load_config
from refusal_lens.infra.memory_plan import (
    ModelShape,
    backward_bytes,
    forward_bytes,
    kv_cache_bytes,
    plan_for_config,
    sae_step_bytes,
)
from refusal_lens.models.loading import load_model
from refusal_lens.models.synthetic import build_random_chat_model, special_token_ids

TOLERANCE = 0.20
B, T = 3, 80


def peak_bytes(fn) -> int:
    """Peak of the bytes allocated by ``fn`` on the CPU over what was allocated before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, n in events:
        current += n
        peak = max(peak, current)
    return peak


def small_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1500, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256,
                       tie_word_embeddings=False, **special_token_ids())


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def small(request, tmp_path_factory):
    folder = build_random_chat_model(tmp_path_factory.mktemp("plan") / "small", small_config(), init_std=None)
    loaded = load_model(ModelConfig(name=str(folder), torch_dtype=request.param))
    return loaded, ModelShape.from_hf_config(small_config(), request.param)


def within(plan: int, measured: int) -> bool:
    return abs(plan - measured) <= TOLERANCE * measured


def batch_ids(vocab: int):
    ids = torch.randint(5, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def test_weights_are_counted_exactly_on_the_meta_device(small):
    loaded, shape = small
    real = sum(p.numel() * p.element_size() for p in loaded.hf_model.parameters())
    real += sum(b.numel() * b.element_size() for b in loaded.hf_model.buffers())
    assert shape.n_params == sum(p.numel() for p in loaded.hf_model.parameters())
    assert abs(shape.weight_bytes - real) <= 1024  # buffers (rotary frequencies) may differ in dtype


def test_collect_forward_and_generation(small):
    loaded, shape = small
    ids, mask = batch_ids(shape.d_vocab)
    hooks = tuple(f"blocks.{i}.hook_resid_post" for i in range(shape.n_layers))
    rows, cols = mask.nonzero(as_tuple=True)
    req = CollectRequest(ids, mask, hooks, rows, cols, torch.full((B,), T - 1), torch.float16)
    collector = HFHookCollector(loaded.hf_model, torch.device("cpu"), hooks)
    measured = peak_bytes(lambda: collector.submit(req).wait())
    plan = forward_bytes(shape, B, T, eager=False, logit_rows=B) + len(rows) * len(hooks) * shape.d_model * 2
    assert within(plan, measured), (plan, measured)

    def generate():
        with torch.no_grad():
            loaded.hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                     do_sample=False, pad_token_id=0)

    measured = peak_bytes(generate)
    plan = kv_cache_bytes(shape, B, T + 6) + forward_bytes(shape, B, T, eager=False, logit_rows=B)
    assert within(plan, measured), (plan, measured)


def test_attribution_forward_and_backward(small):
    from refusal_lens.core.chat import EncodedPrompt
    from refusal_lens.stages.circuits.attribution import Runner
    from refusal_lens.stages.circuits.baselines import ClassMeans
    from refusal_lens.stages.circuits.nodes import NodeSpace
    from refusal_lens.core.intervene import frozen, make_batch
    from refusal_lens.core.refusal import RefusalTokens
    from refusal_lens.stages.saes.train import build_training_sae

    loaded, shape = small
    hooks = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    saes = {h: build_training_sae(SAEConfig(expansion_factor=4, k=8), shape.d_model, h, "small").eval() for h in hooks}
    for sae in saes.values():
        sae.requires_grad_(False)
    space = NodeSpace(hooks, saes, n_post=1)
    means = ClassMeans({h: torch.zeros(space.n_post + 2, space.d_sae(h)) for h in hooks},
                       {h: torch.zeros(space.n_post + 2, shape.d_model) for h in hooks}, {h: [] for h in hooks})
    runner = Runner(loaded.model, space, RefusalTokens((0,), ("",), "family"), means)
    ids, _ = batch_ids(shape.d_vocab)
    batch = make_batch([EncodedPrompt("", row, 1, False, 1) for row in ids.tolist()], list(range(B)), 0)
    with frozen(loaded.model):
        measured = peak_bytes(lambda: runner.gradients(batch))
    plan = backward_bytes(shape, B, T, layers=shape.n_layers - 2, n_hooks=len(hooks))  # blocks after the first hook
    assert within(plan, measured), (plan, measured)


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_sae_training_step(architecture):
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from refusal_lens.stages.saes.train import build_training_sae

    d_in, n = 48, 384
    cfg = SAEConfig(architecture=architecture, expansion_factor=12, k=6, train_batch_size_tokens=n)
    data = torch.randn(4 * n, d_in, generator=torch.Generator().manual_seed(0))

    def batches():
        while True:
            yield from data.split(n)

    source = batches()
    sae = build_training_sae(cfg, d_in, "blocks.0.hook_resid_post", "small")
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=100 * n, train_batch_size_samples=n, lr=1e-4,
                                          lr_end=1e-5, logger=LoggingConfig(log_to_wandb=False),
                                          n_batches_for_norm_estimate=1), sae, data_provider=source)
    trainer.step(next(source))  # Adam's state exists from the first step on (the plan counts it apart)
    measured = peak_bytes(lambda: trainer.step(next(source)))
    plan = sae_step_bytes(d_in, d_in * 12, architecture, n)
    assert within(plan, measured), (plan, measured)


def test_plan_of_the_7b_gpu_config_from_its_config_alone(tmp_path, capsys, caplog):
    """configs/pipelines/llama2_7b_gpu.yaml on a Llama-2-7B config.json (no weights anywhere)."""
    from transformers import LlamaConfig

    from refusal_lens.cli import main
    from refusal_lens.pipeline import log_memory_plan

    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(tmp_path / "llama2-7b")
    overrides = [f"model.name={tmp_path / 'llama2-7b'}"]
    cfg = load_config("configs/pipelines/llama2_7b_gpu.yaml", overrides)
    plan = plan_for_config(cfg)
    assert 0 <= plan.weights - 6_738_415_616 * 2 < 4096  # Llama-2-7B's parameters in bf16, + rotary buffers
    assert list(plan.stages) == ["collect", "train-saes", "discover"]
    assert plan.peak == max(plan.stage_bytes(s) for s in plan.stages) > plan.weights
    discover = {i.what.split(" (")[0]: i.bytes for i in plan.stages["discover"]}
    assert discover["6 SAEs"] == 6 * 4 * (2 * 4096 * 32768 + 32768 + 4096)  # sae.hooks residuals_15-20, fp32
    assert main(["plan", "--config", "configs/pipelines/llama2_7b_gpu.yaml", "--set", overrides[0], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak"] == plan.peak and out["stages"]["collect"]["total"] == plan.stage_bytes("collect")
    with caplog.at_level("INFO", logger="refusal_lens"):
        log_memory_plan(cfg)
    assert "memory plan for" in caplog.text and "attribution forward + backward (16 layers" in caplog.text
    with caplog.at_level("WARNING", logger="refusal_lens"):
        log_memory_plan(load_config("configs/pipelines/llama2_7b_gpu.yaml", ["model.name=nobody/no-such-model"]))
    assert "no memory plan for nobody/no-such-model" in caplog.text
