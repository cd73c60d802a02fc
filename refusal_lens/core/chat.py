"""Chat formatting and tokenization of prompts.

Prompts go through the tokenizer's own chat template with the generation prompt, and are tokenized
without special tokens (the template brings its own BOS), left-padded with an explicit attention mask.

Every token of a chat-formatted prompt is in one *position class*, derived from the rendered template
(the offsets of the user's text in it), not by counting tokens by hand:

* the **opening**: the template's tokens before the user's text (e.g. Qwen's default system prompt and
  ``<|im_start|>user\\n``); identical in every prompt, so their activations carry nothing of the prompt;
* the **content**: the user's text;
* the **post-instruction** tokens after the user's text (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``),
  where refusal_direction finds the refusal direction; each of them is its own class, by its index;
* **generated** tokens (responses, teacher-forced or generated) form one more class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def render(tokenizer, user_text: str, template: str | None = None) -> str:
    """The chat-formatted prompt: the tokenizer's own chat template, or ``template`` (a string with one
    ``{instruction}``, e.g. refusal_direction's hand-written Qwen template without the default system prompt)."""
    if template is not None:
        return template.replace("{instruction}", user_text)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )


def check_template(template: str) -> str:
    """``template`` if it holds exactly one ``{instruction}`` (a ValueError naming what is allowed otherwise)."""
    if template.count("{instruction}") != 1:
        raise ValueError(f"chat template {template!r}: allowed: a string with exactly one {{instruction}}")
    return template


#: position classes (see the module docstring); post-instruction token ``j`` is ``POST + j``.
PAD, OPENING, CONTENT, GENERATED, POST = -1, 0, 1, 2, 3


@dataclass(frozen=True)
class EncodedPrompt:
    text: str  # the chat-formatted prompt
    ids: list[int]  # its tokens, no padding
    n_post_instruction: int  # tokens after the user's message
    truncated: bool
    n_opening: int = 0  # template tokens before the user's message

    def position_classes(self, n_generated: int = 0) -> list[int]:
        """The class of each token (prompt, then ``n_generated`` generated tokens)."""
        n_content = len(self.ids) - self.n_opening - self.n_post_instruction
        return ([OPENING] * self.n_opening + [CONTENT] * n_content
                + [POST + j for j in range(self.n_post_instruction)] + [GENERATED] * n_generated)


def encode_prompt(tokenizer, user_text: str, max_tokens: int, template: str | None = None) -> EncodedPrompt:
    """Render and tokenize one prompt (see :func:`render`); cut the user's message (not the template) to fit
    ``max_tokens``."""
    if template is not None:
        check_template(template)
    text = render(tokenizer, user_text, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    truncated = False
    if len(ids) > max_tokens:
        user_ids = tokenizer(user_text, add_special_tokens=False)["input_ids"]
        overflow = len(ids) - max_tokens
        if overflow >= len(user_ids):
            raise ValueError(
                f"inference.max_prompt_tokens={max_tokens} is shorter than the chat template itself "
                f"({len(ids) - len(user_ids)} tokens); raise it"
            )
        user_text = tokenizer.decode(user_ids[: len(user_ids) - overflow - 1])
        text = render(tokenizer, user_text, template)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        truncated = True
    begin = text.rfind(user_text)
    end = begin + len(user_text)
    n_post = sum(1 for start, _ in enc["offset_mapping"] if start >= end)
    n_open = sum(1 for _, stop in enc["offset_mapping"] if stop <= begin)
    n_post = max(n_post, 1)
    return EncodedPrompt(text, ids, n_post, truncated, min(n_open, len(ids) - n_post))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask`` ``[batch, max_len]``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with: the chat template's fixed opening (e.g. Qwen's default system
    prompt). Their activations are identical across prompts; the SAE stage can leave them out."""
    if len(sequences) < 2:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n
