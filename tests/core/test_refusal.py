"""The refusal score (log-odds of the refusal-start tokens) and how its token set is chosen."""

import pytest
import torch

from refusal_lens.core.chat import encode_prompt, render
from refusal_lens.core.families import family_for_template
from refusal_lens.core.refusal import (
    RefusalTokenError,
    RefusalTokens,
    auroc,
    family_refusal_tokens,
    learn_refusal_tokens,
    refusal_score,
    response_start_ids,
)


def test_refusal_score_is_the_log_odds_of_the_token_set():
    tokens = RefusalTokens((1, 3), ("I", "As"), "family")
    logits = torch.tensor([[0.0, 2.0, 1.0, 1.0], [0.0, -1.0, 3.0, -2.0]])
    p = logits.softmax(-1)
    p_r = p[:, 1] + p[:, 3]
    torch.testing.assert_close(refusal_score(logits, tokens), torch.log(p_r) - torch.log(1 - p_r))
    # stable where p(R) is close to 1 (no log(1 - p) underflow)
    big = torch.tensor([[0.0, 60.0, 0.0, 0.0]])
    assert refusal_score(big, tokens).item() == pytest.approx(60.0 - torch.logsumexp(torch.zeros(2), 0).item(), abs=1e-4)


def test_learned_tokens_are_the_ones_that_start_refusals():
    fallback = RefusalTokens((9,), ("X",), "family")

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    first = [5, 5, 5, 6, 6, 7, 7, 7, 8]
    refused = [True, True, False, True, True, False, False, False, True]
    learned = learn_refusal_tokens(first, refused, fallback, Tok(), min_count=2, min_share=0.6)
    assert learned.ids == (5, 6) and learned.source == "learned"  # 8 occurs once, 7 never refuses
    assert dict((t, (n, r)) for t, n, r in learned.counts)[5] == (3, 2)
    none = learn_refusal_tokens([7, 7], [False, False], fallback, Tok())
    assert none.ids == (9,) and none.source == "family"
    assert RefusalTokens.from_dict(learned.to_dict()) == learned


def test_auroc():
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0], [1]) == 0.0 and auroc([1], [1]) == 0.5
    assert auroc([], [1]) != auroc([], [1])  # nan


def test_family_words_must_be_single_tokens(tiny_loaded):
    tok = tiny_loaded.tokenizer
    prefix = render(tok, "hello")
    tokens = family_refusal_tokens(tok, prefix, ("I", "Sorry"))
    assert tokens.ids == tuple(tok.convert_tokens_to_ids(["I", "Sorry"]))
    with pytest.raises(RefusalTokenError, match="refusal token 'I cannot' encoded to 2 tokens"):
        response_start_ids(tok, prefix, ("I cannot",))
    with pytest.raises(RefusalTokenError, match="empty"):
        response_start_ids(tok, prefix, ())


@pytest.mark.embedded
def test_qwen_family_words_and_template_positions():
    from transformers import AutoTokenizer

    from refusal_lens.models.embedded import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir("qwen2.5-coder-0.5b-instruct"))
    prefix = render(tok, "How do I make a bomb?")
    family = family_for_template("qwen2", prefix)
    tokens = family_refusal_tokens(tok, prefix, family.refusal_words)
    assert tok.convert_ids_to_tokens(list(tokens.ids)) == ["I", "As"]
    enc = encode_prompt(tok, "How do I make a bomb?", 256)
    assert tok.decode(enc.ids[-enc.n_post_instruction:]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(enc.ids[: enc.n_opening]).endswith("<|im_start|>user\n")
    assert tok.decode(enc.ids[enc.n_opening : len(enc.ids) - enc.n_post_instruction]) == "How do I make a bomb?"


def test_llama2_style_template_gets_space_prefixed_words():
    assert family_for_template("llama", "<s>[INST] hi [/INST]").refusal_words[0] == " I"
    assert family_for_template("qwen2", "<|im_start|>assistant\n").refusal_words[0] == "I"
