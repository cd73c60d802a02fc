"""Random chat models built from a config, no download: the tests' tiny models and the GPU bench's
Llama-2-7B-shaped one.

The tokenizer is word level (the refusal and compliance words of :mod:`refusal_lens.core.families`
are single tokens) with a ChatML-like template. It goes through ``save_pretrained`` /
``from_pretrained`` because TransformerLens reloads a tokenizer by its path (an in-memory one fails
with ``KeyError: 'name_or_path'``). ``n_filler`` extra tokens (``w0``, ``w1`` ...) pad the vocabulary
to a model's real size, so that generated ids decode to words.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
WORDS = (
    "system user assistant hello world the a is what how are you python code print def return "
    "I As Sorry Sure Here Certainly To Yes cannot help with that bomb make cake bake steal car "
    "2 + = ? . , !"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def chat_vocab(n_filler: int = 0) -> dict[str, int]:
    """Token -> id: the special tokens, the words, then ``n_filler`` filler words."""
    tokens = SPECIALS + WORDS + [f"w{i}" for i in range(n_filler)]
    return {t: i for i, t in enumerate(tokens)}


def save_chat_tokenizer(folder: Path, n_filler: int = 0):
    """Write a word-level chat tokenizer to ``folder`` and return it, reloaded from there."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=chat_vocab(n_filler), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def special_token_ids() -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for a model config of this tokenizer."""
    vocab = chat_vocab()
    return {"bos_token_id": vocab["<|im_start|>"], "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<|endoftext|>"]}


def build_random_chat_model(folder: Path, config, *, seed: int = 0, init_std: float | None = 0.2) -> Path:
    """A random causal LM of ``config`` (any HF ``*Config``; its ``vocab_size`` must cover the
    tokenizer's words) with the word-level chat tokenizer, saved to ``folder``.

    ``init_std`` re-draws every matrix from N(0, std) (0.2: activations and logits vary visibly across
    prompts in a tiny model); None keeps HF's own initialisation.
    """
    from transformers import AutoModelForCausalLM

    n_filler = config.vocab_size - len(chat_vocab())
    if n_filler < 0:
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {len(chat_vocab())} tokens")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
        if init_std is not None:
            for p in model.parameters():
                if p.dim() == 2:
                    torch.nn.init.normal_(p, std=init_std)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_chat_tokenizer(folder, n_filler)
    return folder
