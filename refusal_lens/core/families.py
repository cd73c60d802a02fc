"""What differs between model families, in one place: the words a response starts with when it
refuses (the fallback refusal-token set of the refusal score, see :mod:`refusal_lens.core.refusal`), and where
TransformerLens's block hook points sit among a decoder layer's Hugging Face modules (:class:`BlockLayout`),
both keyed by the Hugging Face ``config.model_type``.

The chat template itself comes from the tokenizer (it ships with every chat model), so it is not
repeated here. Words are written as they follow the template's generation prompt: Llama-2's
answers start after ``[/INST]`` with a space, so its words carry one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    refusal_words: tuple[str, ...]


# Refusal words follow refusal_direction (Arditi et al. 2024: "I", "As" for Qwen; "I" for Llama-2 and
# Gemma). The project learns the set per model from its discovery responses and falls back to these.
_CHATML = ModelFamily(name="chatml", refusal_words=("I", "As"))
_LLAMA2 = ModelFamily(name="llama2", refusal_words=(" I",))

#: HF model_type -> family. Unknown types get :data:`DEFAULT_FAMILY` (override the words in the config).
FAMILIES: dict[str, ModelFamily] = {
    "qwen2": _CHATML,
    "qwen3": _CHATML,
    "llama": _CHATML,  # SmolLM2, Llama-3; Llama-2 chat is told apart by its [INST] template
    "mistral": _LLAMA2,
    "gemma": _CHATML,
    "gemma2": _CHATML,
}
DEFAULT_FAMILY = _CHATML


def family_for_template(model_type: str, rendered_prompt: str) -> ModelFamily:
    """Pick the family from the model type and the rendered generation prompt.

    Templates whose generation prompt ends in ``[/INST]`` (Llama-2, Mistral) answer after a space.
    """
    if rendered_prompt.rstrip("\n").endswith("[/INST]"):
        return _LLAMA2
    return FAMILIES.get(model_type, DEFAULT_FAMILY)


# --------------------------------------------------------------------------------------------
# Where the block hook points sit in a Hugging Face decoder layer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """Per TransformerLens hook point inside a block (``resid_pre`` / ``resid_post`` are the decoder
    layer's own input and output in every family): the submodule of the layer that carries it (a
    dotted path inside the layer) and whether the value is that module's input
    (``"pre"``, a forward pre-hook) or its output (``"post"``). ``absent``: submodules whose presence
    means another arrangement (a norm after the MLP moves ``mlp_out``)."""

    name: str
    points: dict[str, tuple[str, str]]
    absent: tuple[str, ...] = ()

    def mismatches(self, layer) -> list[str]:
        """Why ``layer`` does not fit: the submodules it lacks and those it should not have."""
        names = {n for n, _ in layer.named_modules()}
        lacks = sorted({path for path, _ in self.points.values() if path not in names})
        return [f"no {n}" for n in lacks] + [f"has {n}" for n in self.absent if n in names]


#: Llama, Mistral, Qwen2/3, Gemma-1: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; the MLP's norm is
#: called ``post_attention_layernorm`` in HF, and its input is TransformerLens's ``resid_mid``.
PRE_NORM = BlockLayout("pre_norm", {
    "hook_attn_out": ("self_attn", "post"),
    "hook_resid_mid": ("post_attention_layernorm", "pre"),
    "hook_mlp_out": ("mlp", "post"),
}, absent=("post_feedforward_layernorm",))
#: Gemma-2/3: a second norm after attention and after the MLP, applied by the layer outside
#: ``self_attn`` / ``mlp``. TransformerLens's ``attn_out`` / ``mlp_out`` follow those post-norms
#: (``ln1_post`` = HF ``post_attention_layernorm``, ``ln2_post`` = ``post_feedforward_layernorm``).
SANDWICH_NORM = BlockLayout("sandwich_norm", {
    "hook_attn_out": ("post_attention_layernorm", "post"),
    "hook_resid_mid": ("pre_feedforward_layernorm", "pre"),
    "hook_mlp_out": ("post_feedforward_layernorm", "post"),
})

#: HF model_type -> block layout. Other types get the layout their decoder layer's modules match
#: (:func:`block_layout`).
BLOCK_LAYOUTS: dict[str, BlockLayout] = {
    "llama": PRE_NORM,
    "mistral": PRE_NORM,
    "qwen2": PRE_NORM,
    "qwen3": PRE_NORM,
    "gemma": PRE_NORM,
    "gemma2": SANDWICH_NORM,
    "gemma3": SANDWICH_NORM,
    "gemma3_text": SANDWICH_NORM,
}


def block_layout(model_type: str, layer) -> tuple[BlockLayout | None, str]:
    """The layout of ``model_type`` checked against ``layer``'s modules, or for an unknown type the
    layout that ``layer``'s modules fit. Returns ``(layout, "")``, or ``(None, why not)``."""
    candidates = [BLOCK_LAYOUTS[model_type]] if model_type in BLOCK_LAYOUTS else [SANDWICH_NORM, PRE_NORM]
    reasons = []
    for layout in candidates:
        wrong = layout.mismatches(layer)
        if not wrong:
            return layout, ""
        reasons.append(f"{layout.name}: {', '.join(wrong)}")
    return None, "; ".join(reasons)
