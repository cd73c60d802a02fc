"""What differs between model families, in one place: the words a response starts with when it
refuses (the fallback refusal-token set of the refusal score, see :mod:`refusal_lens.refusal`), keyed
by the Hugging Face ``config.model_type``.

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
