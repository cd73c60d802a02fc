"""refusal_lens.checks.judge_length.compare on token sequences with a known judgement at every cut."""

from __future__ import annotations

import pytest

from refusal_lens.checks.judge_length import compare

WORDS = {1: "Sure,", 2: " here", 3: " is", 4: " how", 5: " to", 6: " bake", 7: " a", 8: " cake.",
         10: "I'm", 11: " sorry,", 12: " but", 13: " I", 14: " can't", 15: " help."}


def decode(ids):
    return "".join(WORDS[i] for i in ids)


def test_cuts_count_same_judgements_flips_and_the_largest_rate_change_exactly():
    refusal = [10, 11, 12, 13, 14, 15]  # refused from its second token on ("I'm sorry")
    late = [1, 2, 3, 4, 5, 13, 14, 15]  # "Sure, here is how to I can't help.": refused only with its 6th+ tokens
    comply = [1, 2, 3, 4, 5, 6, 7, 8]
    rows = [("a", refusal), ("a", late), ("a", comply), ("b", comply[:3])]
    full = compare(rows, 8, decode, min_n=1)
    assert full["same_judgement"] == 1.0 and full["refused_flips"] == 0.0 and full["n_longer_than_cut"] == 0
    cut = compare(rows, 5, decode, min_n=1)
    # the late refusal becomes compliance (a flip); the others keep their judgement
    assert cut["n_longer_than_cut"] == 3 and cut["refused_flips"] == pytest.approx(1 / 4)
    assert cut["same_judgement"] == pytest.approx(3 / 4)
    assert cut["max_rate_change"] == pytest.approx(1 / 3) and cut["max_rate_change_condition"] == "a"
    assert compare(rows, 5, decode, min_n=4)["max_rate_change"] is None  # no condition has 4 responses


def test_a_shorter_reference_is_judged_on_its_own_first_tokens():
    late = [1, 2, 3, 4, 5, 13, 14, 15]  # refused only from its 6th token on
    rows = [("a", late), ("a", [1, 2, 3])]
    assert compare(rows, 5, decode, 1)["refused_flips"] == pytest.approx(1 / 2)
    assert compare(rows, 5, decode, 1, reference=7)["refused_flips"] == pytest.approx(1 / 2)  # "... I can't"
    assert compare(rows, 5, decode, 1, reference=6)["refused_flips"] == 0.0  # "... how to I": no refusal yet
    assert compare(rows, 5, decode, 1, reference=5)["refused_flips"] == 0.0  # the same text on both sides
