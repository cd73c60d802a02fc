from pathlib import Path

import pytest

from refusal_lens.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_round_trip():
    cfg = load_config(None)
    assert cfg == Config()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_original_shape_loads(tmp_path):
    path = write(
        tmp_path,
        "c.yaml",
        """
model:
  name: "meta-llama/Llama-2-7b-chat-hf"
  device: "cuda"
  torch_dtype: "float16"
  activation_layers: ["residuals_0-5", "residuals_15-20", "residuals_28-31"]
inference: {batch_size: 3, max_new_tokens: 20, save_activations: true}
data: {path: "data/raw/or-bench", categories: [], category_balance_strategy: "use_all"}
output: {result_dir: "results"}
""",
    )
    cfg = load_config(path)
    assert cfg.model.torch_dtype == "float16"
    assert cfg.model.activation_layers == ("residuals_0-5", "residuals_15-20", "residuals_28-31")
    assert cfg.inference.batch_size == 3
    assert cfg.data.path == "data/raw/or-bench"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model: {nmae: x}", "unknown key 'model.nmae'"),
        ("modle: {name: x}", "unknown key 'modle'"),
        ("inference: {batch_size: 0}", "inference.batch_size=0"),
        ("inference: {batch_size: fast}", "inference.batch_size='fast'; expected int or 'auto'"),
        ("inference: {max_new_tokens: 2.5}", "inference.max_new_tokens=2.5; expected an integer"),
        ("inference: {save_activations: 'yes'}", "inference.save_activations='yes'; expected true or false"),
        ("inference: {positions: first}", "inference.positions='first'; allowed: 'last', 'all', 'post_instruction'"),
        ("model: {backend: tl}", "model.backend='tl'; allowed: 'bridge', 'hooked'"),
        ("model: {activation_layers: residuals_1}", "model.activation_layers='residuals_1'; expected a list"),
        ("model: {activation_layers: [foo_1]}", "model.activation_layers: layer spec 'foo_1'"),
        ("model: {activation_layers: [residuals_9-1]}", "reversed range"),
        ("model: {device: gpu}", "model.device='gpu'"),
        ("model: 3", "model must be a mapping"),
        ("data: {categories: [1]}", "data.categories[0]=1; expected a string"),
        ("- a\n- b", "must hold a mapping"),
        ("model: [", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_dotted_path(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "bad.yaml", text))
    assert fragment in str(info.value)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        None,
        [
            "model.activation_layers=[residuals_1, mlp_2]",
            "inference.batch_size=auto",
            "inference.max_new_tokens=5",
            "data.path=/tmp/x",
            "data.max_samples_per_category=null",
        ],
    )
    assert cfg.model.activation_layers == ("residuals_1", "mlp_2")
    assert cfg.inference.batch_size == "auto" and cfg.inference.max_new_tokens == 5
    assert cfg.data.path == "/tmp/x"
    for bad, fragment in [
        ("model.nme=x", "unknown key 'model.nme'"),
        ("inference.max_new_tokens=many", "inference.max_new_tokens='many'"),
        ("novalue", "section.key=value"),
        ("a..b=1", "section.key=value"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            load_config(None, [bad])


def test_base_chain_and_cycle(tmp_path):
    write(tmp_path, "base.yaml", "model: {name: m1, device: cuda}\ninference: {batch_size: 4}")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel: {name: m2}")
    cfg = load_config(child)
    assert cfg.model.name == "m2" and cfg.model.device == "cuda" and cfg.inference.batch_size == 4
    write(tmp_path, "a.yaml", "base: b.yaml")
    write(tmp_path, "b.yaml", "base: a.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.model.name = "x"  # type: ignore[misc]


def test_dump_is_safe_yaml_and_reloads(tmp_path):
    cfg = load_config(None, ["model.activation_layers=[1, residuals_2]"])
    path = write(tmp_path, "resolved.yaml", dump_config(cfg))
    assert load_config(path) == cfg


def test_shipped_configs_load():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "configs/ ships YAML files"
    for path in files:
        load_config(path)
