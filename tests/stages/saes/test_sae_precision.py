"""sae.precision: what each setting means per device, the TF32 flags set only around the training loop,
and fp32 training on the CPU left exactly as it was (auto == fp32 there, bit for bit)."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.config import ConfigError, SAEConfig
from refusal_lens.stages.saes import train as train_mod
from refusal_lens.stages.saes.data import tensor_batches
from refusal_lens.stages.saes.train import (
    Precision,
    SAEConfigError,
    build_training_sae,
    matmul_precision,
    resolve_precision,
    train_sae,
)


@pytest.mark.parametrize("precision, device, expected", [
    ("auto", "cpu", Precision("fp32", autocast=False, tf32=False)),
    ("fp32", "cpu", Precision("fp32", autocast=False, tf32=False)),
    ("auto", "cuda", Precision("tf32", autocast=False, tf32=True)),
    ("auto", "cuda:1", Precision("tf32", autocast=False, tf32=True)),
    ("fp32", "cuda", Precision("fp32", autocast=False, tf32=False)),
    ("tf32", "cuda", Precision("tf32", autocast=False, tf32=True)),
    ("bf16", "cuda:0", Precision("bf16", autocast=True, tf32=True)),
])
def test_resolve_precision(precision, device, expected):
    assert resolve_precision(precision, device) == expected


def test_tf32_and_bf16_need_cuda():
    for precision in ("tf32", "bf16"):
        with pytest.raises(SAEConfigError, match="needs a CUDA sae.device"):
            resolve_precision(precision, "cpu")
        with pytest.raises(ConfigError, match=rf"sae.precision='{precision}'.*allowed here: 'auto' or 'fp32'"):
            SAEConfig(precision=precision, device="cpu")
        assert SAEConfig(precision=precision, device="cuda:0").precision == precision
    with pytest.raises(SAEConfigError, match="allowed: auto, fp32, tf32, bf16"):
        resolve_precision("fp8", "cuda")


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_matmul_precision_sets_and_restores_the_flags():
    before = _flags()  # torch's defaults: TF32 off for matmuls, on for cuDNN convolutions
    with matmul_precision(Precision("fp32", False, False)):
        assert _flags() == before
    with matmul_precision(Precision("tf32", False, True)):
        assert _flags() == (True, True)
    with pytest.raises(RuntimeError, match="boom"), matmul_precision(Precision("bf16", True, True)):
        raise RuntimeError("boom")
    assert _flags() == before


def _train(cfg: SAEConfig, tmp_path, monkeypatch, resolved: Precision | None = None):
    """Train a small SAE; returns its state dict and (autocast, TF32 flags) seen at each trainer step."""
    from sae_lens.training.sae_trainer import SAETrainer

    seen = []
    original = getattr(SAETrainer.step, "original", SAETrainer.step)

    def spy(self, batch):
        seen.append((self.cfg.autocast, *_flags()))
        return original(self, batch)

    spy.original = original
    monkeypatch.setattr(SAETrainer, "step", spy)
    if resolved is not None:  # what tf32 / bf16 do, exercised on the CPU (the flags change nothing here)
        monkeypatch.setattr(train_mod, "resolve_precision", lambda precision, device: resolved)
    data = torch.randn(1024, 16, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sae = build_training_sae(cfg, 16, "blocks.0.hook_resid_post", "tiny")
        train_sae(sae, tensor_batches(data, cfg.train_batch_size_tokens), cfg, train_rows=len(data),
                  log_path=tmp_path / f"{cfg.precision}.jsonl", show_progress=False)
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}, seen


def test_fp32_on_cpu_is_plain_and_auto_equals_it_bit_for_bit(tmp_path, monkeypatch):
    before = _flags()
    base = dict(architecture="topk", expansion_factor=4, k=4, training_tokens=64 * 12, train_batch_size_tokens=64)
    fp32, seen_fp32 = _train(SAEConfig(precision="fp32", **base), tmp_path, monkeypatch)
    auto, seen_auto = _train(SAEConfig(precision="auto", **base), tmp_path, monkeypatch)
    assert len(seen_fp32) == len(seen_auto) == 12 and set(seen_fp32) == set(seen_auto) == {(False, *before)}
    assert fp32.keys() == auto.keys() and all(torch.equal(fp32[k], auto[k]) for k in fp32)
    assert _flags() == before


def test_tf32_and_bf16_turn_on_inside_the_training_loop_only(tmp_path, monkeypatch):
    before = _flags()
    base = dict(architecture="topk", expansion_factor=4, k=4, training_tokens=64 * 3, train_batch_size_tokens=64)
    _, seen = _train(SAEConfig(**base), tmp_path, monkeypatch, Precision("tf32", autocast=False, tf32=True))
    assert seen == [(False, True, True)] * 3
    assert _flags() == before
    _, seen = _train(SAEConfig(**base), tmp_path, monkeypatch, Precision("bf16", autocast=True, tf32=True))
    assert seen == [(True, True, True)] * 3
    assert _flags() == before
