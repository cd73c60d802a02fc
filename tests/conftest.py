"""Shared fixtures: tiny random chat models built from a config (no download), and the embedded models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from refusal_lens.config import ModelConfig  # noqa: E402

torch.set_num_threads(1)


def build_tiny_chat_model(folder: Path, *, n_layers: int = 3, d_model: int = 64, seed: int = 0) -> Path:
    """A random Llama-architecture chat model with a word-level tokenizer and a chat template
    (:mod:`refusal_lens.models.synthetic`). Returns the folder (config.json, safetensors, tokenizer files)."""
    from transformers import LlamaConfig

    from refusal_lens.models.synthetic import build_random_chat_model, chat_vocab, special_token_ids

    config = LlamaConfig(
        vocab_size=len(chat_vocab()),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **special_token_ids(),
    )
    # a larger init than HF's 0.02 so that activations and logits vary visibly across prompts
    return build_random_chat_model(folder, config, seed=seed, init_std=0.2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-chat")


@pytest.fixture(scope="session")
def tiny_model_cfg(tiny_model_dir) -> ModelConfig:
    return ModelConfig(name=str(tiny_model_dir), activation_layers=("residuals_all",))


@pytest.fixture(scope="session", params=["bridge", "hooked"])
def tiny_loaded(request, tiny_model_dir):
    from refusal_lens.models.loading import load_model

    return load_model(ModelConfig(name=str(tiny_model_dir), backend=request.param))



@pytest.fixture
def tmpfs():
    """``tmpfs(folder, size)`` mounts a tmpfs of ``size`` (e.g. ``"64k"``) at ``folder``: a real small or
    read-only filesystem (the kernel's ENOSPC / EROFS, not simulated ones). Needs root (or CAP_SYS_ADMIN):
    the test is skipped, saying so, where mounting is not allowed. Unmounted at the end of the test."""
    import subprocess

    mounted = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=True)


def run_cli(args: list[str], nproc: int = 1, port: int = 29517):
    """``python -m refusal_lens ARGS`` in a subprocess, or under ``torchrun --nproc_per_node nproc``;
    asserts it succeeded and returns the completed process."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc),
                    "--master_port", str(port)]
    proc = subprocess.run([*launcher, "-m", "refusal_lens", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
