"""Load a chat model into TransformerLens, offline first.

``model.name`` is an embedded model (:mod:`refusal_lens.models.embedded`), a local Hugging Face
folder, or a hub name (needs the hub). Two back ends expose the same hook names:

* ``bridge`` (default): :class:`TransformerBridge` around the HF model; raw HF weights, logits equal
  HF's eager attention exactly.
* ``hooked``: :class:`HookedTransformer` with no weight processing (no LayerNorm folding or
  centering), so activations are the model's own.

Measured pitfalls handled here (transformer-lens 3.9, transformers 5.24):

* Booting the bridge rewires the HF model's modules in place, and with transformers >= 5.2x its cached
  generation is wrong (the decoder passes the KV cache as ``cache=``, which the bridge's attention
  ignores). We boot the bridge on a *structural copy* that shares the weight tensors (no extra
  memory) and generate with the untouched HF model and its own KV cache (greedy decoding of
  :mod:`refusal_lens.core.greedy`, checked against ``transformers.generate``).
* TransformerLens re-loads the tokenizer and prepends BOS; chat templates already start with their
  own BOS. We tokenize with our own tokenizer (``add_special_tokens=False``, left padding) and pass
  token ids plus an explicit ``attention_mask``.
* ``HookedTransformer.from_pretrained`` needs the hub even with ``hf_model=``; local folders load
  through TransformerLens's own config and state-dict converters instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from refusal_lens.config import ModelConfig
from refusal_lens.errors import UserError
from refusal_lens.infra.mapped_weights import unmap_file_weights
from refusal_lens.core.hooks import LayerSpecError, check_layer_specs
from refusal_lens.models.dtype_copy import converted_copy, file_backed_copy, shared_weight_copy
from refusal_lens.models.embedded import EMBEDDED_MODELS, cache_root, embedded_model_dir
from refusal_lens.models.intervention_dtype import choose
from refusal_lens.core.families import ModelFamily, family_for_template

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be found or loaded; the message says what was tried."""


@dataclass
class LoadedModel:
    """A TransformerLens model with the tokenizer and HF model that go with it."""

    name: str
    backend: str
    model: Any  # TransformerBridge | HookedTransformer
    tokenizer: Any  # our own: left padding, never adds BOS to chat text
    hf_model: Any  # untouched HF model (torch_dtype)
    family: ModelFamily
    device: torch.device
    source: str  # local folder or hub name the weights came from
    gen_model: Any = None  # the HF model in model.intervention_dtype: generation and interventions

    def __post_init__(self) -> None:
        if self.gen_model is None:
            self.gen_model = self.hf_model

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device!r} but CUDA is not available here; use cpu or auto")
    return torch.device(device)


def resolve_source(name: str) -> str:
    """A local folder for embedded models and local paths; the hub name otherwise."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.name={name!r} is a folder without config.json; not a Hugging Face model folder")
        return str(path.resolve())
    if path.suffix or name.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model.name={name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), and no folder exists there"
        )
    return name  # a hub name


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelLoadError(f"the tokenizer of {source!r} has no chat template; refusal_lens needs a chat model")
    return tokenizer


def _boot_bridge(source: str, hf_model, tokenizer, dtype: torch.dtype, device: torch.device):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        source, hf_model=shared_weight_copy(hf_model), tokenizer=tokenizer, dtype=dtype, device=device
    )
    return bridge.eval()


def _boot_hooked(source: str, hf_model, tokenizer, dtype: torch.dtype, device: torch.device):
    from transformer_lens import HookedTransformer

    if not Path(source).is_dir():
        return HookedTransformer.from_pretrained_no_processing(
            source, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=str(device)
        ).eval()
    import transformer_lens.loading_from_pretrained as tl_loading

    # TransformerLens picks some architectures by substring of the name ("llama", "gemma") and then
    # ignores config.json; a neutral link name makes it read the folder's config.
    with tempfile.TemporaryDirectory(prefix="refusal_lens_") as tmp:
        alias = Path(tmp) / "model"
        alias.symlink_to(source, target_is_directory=True)
        cfg = tl_loading.get_pretrained_model_config(
            str(alias), hf_cfg=hf_model.config.to_dict(), fold_ln=False, device=str(device), dtype=dtype
        )
        state_dict = tl_loading.get_pretrained_state_dict(str(alias), cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="left")
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    model.move_model_modules_to_device()
    return model.eval()


def load_hf_model(source: str, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None):
    """The HF model; its default attention (sdpa) serves generation, the bridge's copy switches to eager."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()


def check_specs_against_config(source: str, specs) -> int:
    """Check layer specs against the layer count in the model's config, before loading any weights."""
    from transformers import AutoConfig

    try:
        n_layers = int(AutoConfig.from_pretrained(source).num_hidden_layers)
    except (OSError, AttributeError) as err:
        logger.debug("no layer count in the config of %s (%s); specs are checked after loading", source, err)
        return -1
    try:
        check_layer_specs(specs, n_layers)
    except LayerSpecError as err:
        raise LayerSpecError(f"model.activation_layers: {err}") from None
    return n_layers


def intervention_copy(hf_model, dtype: torch.dtype, source: str, device: torch.device):
    """The model in ``dtype``: on the CPU, for a folder refusal_lens owns (an embedded model's), mapped from a copy
    saved there once (:func:`refusal_lens.models.dtype_copy.file_backed_copy`), so that parts which do not run it
    need not hold it; in memory otherwise. Then the float32 weights the conversion read, where a file maps them,
    leave the resident set until a part reads them (:mod:`refusal_lens.infra.mapped_weights`)."""
    folder = Path(source)
    owned = device.type == "cpu" and folder.is_dir() and folder.resolve().is_relative_to(cache_root().resolve())
    out = file_backed_copy(hf_model, dtype, folder) if owned else converted_copy(hf_model, dtype)
    unmap_file_weights([hf_model, out])
    return out


def concrete_intervention_dtype(cfg: ModelConfig, loaded: LoadedModel | None = None) -> ModelConfig:
    """``cfg`` with ``intervention_dtype: auto`` replaced by the dtype it stands for: that of ``loaded``'s
    intervention copy when a loaded model is given, else this machine's choice
    (:mod:`refusal_lens.models.intervention_dtype`). Stages fingerprint and save this config, so a run records
    the dtype it ran, and a run resumed on a machine that chooses otherwise redoes the stages it changes."""
    if cfg.intervention_dtype != "auto":
        return cfg
    if loaded is not None:
        name = str(next(loaded.gen_model.parameters()).dtype).removeprefix("torch.")
    else:
        name = choose(cfg.torch_dtype, resolve_device(cfg.device), cache_root())
    return replace(cfg, intervention_dtype=name)


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load ``cfg.name`` with the configured back end, dtype and device."""
    cfg = concrete_intervention_dtype(cfg)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.torch_dtype]
    source = resolve_source(cfg.name)
    check_specs_against_config(source, cfg.activation_layers)
    logger.info("loading %s (%s, %s, %s) from %s", cfg.name, cfg.backend, cfg.torch_dtype, device, source)
    try:
        tokenizer = load_tokenizer(source)
        hf_model = load_hf_model(source, dtype, device)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"model.name={cfg.name!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local folder, "
            f"and loading it from the Hugging Face hub failed{' (HF_HUB_OFFLINE=1)' if offline else ''}: {err}"
        ) from None
    boot = _boot_bridge if cfg.backend == "bridge" else _boot_hooked
    model = boot(source, hf_model, tokenizer, dtype, device)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    family = family_for_template(hf_model.config.model_type, rendered)
    gen_model = hf_model
    if cfg.intervention_dtype not in ("same", cfg.torch_dtype):
        gen_model = intervention_copy(hf_model, DTYPES[cfg.intervention_dtype], source, device).eval()
        logger.info("generation and interventions run on a %s copy of the model", cfg.intervention_dtype)
    return LoadedModel(cfg.name, cfg.backend, model, tokenizer, hf_model, family, device, source, gen_model)
