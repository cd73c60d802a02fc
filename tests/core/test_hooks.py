"""Layer spec grammar -> hook names, without a model (the model-backed checks are in test_models.py)."""

import pytest
from transformer_lens.utils import get_act_name

from refusal_lens.core.hooks import (
    HOOK_TYPES,
    LayerSpecError,
    check_layer_specs,
    hook_name,
    hook_sort_key,
    layers_of,
    parse_hook_name,
    resolve_layer_specs,
)

N = 24


def R(i):
    return f"blocks.{i}.hook_resid_post"


def test_hook_names_are_transformer_lens_names():
    for i in (0, 7, 23):
        assert hook_name("residuals", i) == get_act_name("resid_post", i)
        assert hook_name("mlp", i) == get_act_name("mlp_out", i)
        assert hook_name("attention", i) == get_act_name("attn_out", i)
        assert hook_name("resid_pre", i) == get_act_name("resid_pre", i)
        assert hook_name("resid_mid", i) == get_act_name("resid_mid", i)
        assert hook_name("resid_post", i) == get_act_name("resid_post", i)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", [R(i) for i in range(N)]),
        ("residuals_all", [R(i) for i in range(N)]),
        ("mlp_all", [f"blocks.{i}.hook_mlp_out" for i in range(N)]),
        ("attention_all", [f"blocks.{i}.hook_attn_out" for i in range(N)]),
        ("resid_pre_all", [f"blocks.{i}.hook_resid_pre" for i in range(N)]),
        ("resid_mid_2-3", ["blocks.2.hook_resid_mid", "blocks.3.hook_resid_mid"]),
        ("residuals_10-21", [R(i) for i in range(10, 22)]),
        ("mlp_5-15", [f"blocks.{i}.hook_mlp_out" for i in range(5, 16)]),
        ("residuals_5", [R(5)]),
        ("residuals_0", [R(0)]),
        ("residuals_23", [R(23)]),
        ("residuals_7-7", [R(7)]),
        ("resid_post_3", [R(3)]),
        (4, [R(4)]),  # old explicit integer lists
        ("4", [R(4)]),
        ("blocks.3.hook_resid_post", [R(3)]),
        ("blocks.3.hook_mlp_out", ["blocks.3.hook_mlp_out"]),
    ],
)
def test_grammar(spec, expected):
    assert resolve_layer_specs([spec], N) == expected


def test_mixed_list_ordered_deduplicated_first_seen():
    got = resolve_layer_specs(["mlp_2", "residuals_1-3", "residuals_2", 1, "attention_0", "mlp_2"], N)
    assert got == ["blocks.2.hook_mlp_out", R(1), R(2), R(3), "blocks.0.hook_attn_out"]


def test_old_explicit_lists_keep_working():
    assert resolve_layer_specs([0, 5, 10], N) == [R(0), R(5), R(10)]
    assert resolve_layer_specs(["residuals_0", "residuals_5"], N) == [R(0), R(5)]
    assert resolve_layer_specs("residuals_all", 2) == [R(0), R(1)]


def test_layer_count_comes_from_the_caller():
    assert len(resolve_layer_specs(["all"], 3)) == 3
    assert len(resolve_layer_specs(["all"], 40)) == 40


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("foo_3", ["'foo_3'", "unknown type 'foo'", "residuals", "mlp", "attention"]),
        ("residuals_24", ["'residuals_24'", "out of range", "24 layers", "0-23"]),
        ("residuals_10-30", ["'residuals_10-30'", "layer 30", "24 layers"]),
        (99, ["'99'", "out of range", "24 layers"]),
        ("residuals_21-10", ["reversed range", "residuals_10-21"]),
        ("residuals_", ["malformed", "Allowed"]),
        ("residuals_1-", ["malformed"]),
        ("residuals-5", ["malformed"]),
        ("residuals_a-b", ["malformed"]),
        ("", ["malformed"]),
        (" residuals_1", ["malformed"]),
        ("RESIDUALS_1", ["malformed"]),
        (-1, ["numbered from 0"]),
        (1.5, ["type float"]),
        (True, ["type bool"]),
        (None, ["type NoneType"]),
        ("blocks.99.hook_resid_post", ["out of range", "24 layers"]),
        ("blocks.1.attn.hook_z", ["raw hook name", "loaded model"]),
    ],
)
def test_bad_specs_fail_with_a_clear_message(spec, fragments):
    with pytest.raises(LayerSpecError) as info:
        resolve_layer_specs(["residuals_0", spec], N)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_empty_list_is_an_error():
    with pytest.raises(LayerSpecError, match="empty"):
        resolve_layer_specs([], N)
    with pytest.raises(LayerSpecError, match="empty"):
        check_layer_specs([])


def test_no_silent_skipping_of_a_bad_spec_in_a_list():
    with pytest.raises(LayerSpecError, match="mlpp"):
        resolve_layer_specs(["residuals_1", "mlpp_2", "mlp_3"], N)


def test_raw_hooks_checked_against_model_hooks():
    valid = {R(0), "blocks.0.attn.hook_z", "hook_embed"}
    assert resolve_layer_specs(["blocks.0.attn.hook_z", "hook_embed"], 2, valid) == [
        "blocks.0.attn.hook_z",
        "hook_embed",
    ]
    with pytest.raises(LayerSpecError, match="not a hook of this model"):
        resolve_layer_specs(["blocks.0.attn.hook_zz"], 2, valid)


def test_syntax_check_without_model():
    parsed = check_layer_specs(["residuals_3-5", "all", 2, "blocks.0.attn.hook_z"])
    assert [p.hook_type for p in parsed] == ["residuals", "residuals", "residuals", None]
    assert parsed[0].start == 3 and parsed[0].end == 5
    with pytest.raises(LayerSpecError):
        check_layer_specs("residuals_1")  # a bare string is not a list


def test_parse_and_sort_hook_names():
    assert parse_hook_name("blocks.12.hook_mlp_out").layer == 12
    assert parse_hook_name("blocks.12.hook_mlp_out").hook_type == "mlp"
    assert parse_hook_name("hook_embed") is None
    names = [R(1), "blocks.1.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "hook_embed"]
    assert sorted(names, key=hook_sort_key) == [
        "hook_embed",
        R(0),
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        R(1),
    ]
    assert layers_of(names) == [0, 1]
    assert set(HOOK_TYPES) == {"residuals", "mlp", "attention", "resid_pre", "resid_mid"}
