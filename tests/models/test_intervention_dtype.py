"""``model.intervention_dtype: auto``: bfloat16 only where this machine runs it faster, chosen once and kept."""

import json
import logging

import pytest
import torch
import yaml

from refusal_lens.config import ModelConfig, config_from_dict
from refusal_lens.config.typed import ConfigError
from refusal_lens.infra.distributed import Dist
from refusal_lens.models import intervention_dtype as idt
from refusal_lens.models.loading import concrete_intervention_dtype, load_model
from refusal_lens.pipeline import with_concrete_dtypes

CPU = torch.device("cpu")


def timer_of(fp32: float, bf16: float):
    calls = []

    def timer(dtype):
        calls.append(dtype)
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]

    timer.calls = calls
    return timer


def never(dtype):
    raise AssertionError("measured although the choice was recorded or not needed")


@pytest.mark.parametrize(("fp32", "bf16", "choice"), [
    (1.0, 0.5, "bfloat16"),   # 2x faster in bfloat16 (the AMD EPYC's floor)
    (1.0, 0.8, "bfloat16"),   # exactly the margin
    (1.0, 0.81, "float32"),   # faster, but within the margin
    (1.0, 1.4, "float32"),    # slower (the Xeon without AMX)
])
def test_bfloat16_is_taken_only_when_it_is_at_least_the_margin_faster(fp32, bf16, choice):
    assert idt.MARGIN == 1.25
    rec = idt.measure(timer_of(fp32, bf16))
    assert rec["choice"] == choice and rec["speed_up"] == pytest.approx(fp32 / bf16)


def test_the_choice_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    timer = timer_of(1.0, 0.4)
    assert idt.choose("float32", CPU, tmp_path, timer) == "bfloat16"
    assert len(timer.calls) == 2
    record = json.loads((tmp_path / idt.RECORD).read_text())
    assert list(record) == [idt.machine_key()] and record[idt.machine_key()]["choice"] == "bfloat16"
    assert idt.choose("float32", CPU, tmp_path, never) == "bfloat16"  # read back, not measured again
    # another machine (or thread count, or torch) measures its own and keeps both
    monkeypatch.setattr(idt, "machine_key", lambda: "another machine")
    assert idt.choose("float32", CPU, tmp_path, timer_of(1.0, 2.0)) == "float32"
    assert set(json.loads((tmp_path / idt.RECORD).read_text())) == {"another machine", *record}


def test_an_unreadable_record_is_measured_again(tmp_path, caplog):
    (tmp_path / idt.RECORD).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger=idt.__name__):
        assert idt.choose("float32", CPU, tmp_path, timer_of(1.0, 2.0)) == "float32"
    assert "unreadable" in caplog.text
    assert json.loads((tmp_path / idt.RECORD).read_text())[idt.machine_key()]["choice"] == "float32"


def test_off_the_cpu_or_in_16_bits_auto_is_the_model_dtype(tmp_path):
    assert idt.choose("bfloat16", torch.device("cuda"), tmp_path, never) == "bfloat16"
    assert idt.choose("float32", torch.device("cuda"), tmp_path, never) == "float32"
    assert idt.choose("float16", CPU, tmp_path, never) == "float16"
    assert not (tmp_path / idt.RECORD).exists()


def test_the_machine_key_names_the_cpu_threads_and_torch():
    key = idt.machine_key()
    assert f"threads={torch.get_num_threads()}" in key and f"torch={torch.__version__}" in key


def test_the_product_is_timed_in_the_dtype_asked():
    assert 0 < idt.product_seconds(torch.float32, repeats=1) < 60


def test_auto_is_a_configurable_value_and_a_bad_one_names_the_allowed():
    assert config_from_dict({"model": {"intervention_dtype": "auto"}}).model.intervention_dtype == "auto"
    with pytest.raises(ConfigError, match=r"intervention_dtype.*auto"):
        config_from_dict({"model": {"intervention_dtype": "fastest"}})


def record_choice(cache, choice):
    cache.mkdir(parents=True, exist_ok=True)
    (cache / idt.RECORD).write_text(json.dumps({idt.machine_key(): {"choice": choice}}))


@pytest.mark.parametrize("choice", ["bfloat16", "float32"])
def test_a_loaded_model_and_the_run_config_take_the_recorded_choice(tiny_model_dir, tmp_path, monkeypatch, choice):
    monkeypatch.setenv("REFUSAL_LENS_CACHE", str(tmp_path / "cache"))
    record_choice(tmp_path / "cache", choice)
    cfg = ModelConfig(name=str(tiny_model_dir), intervention_dtype="auto")
    loaded = load_model(cfg)
    assert next(loaded.gen_model.parameters()).dtype == getattr(torch, choice)
    assert (loaded.gen_model is loaded.hf_model) == (choice == "float32")  # no second copy when float32 wins
    assert concrete_intervention_dtype(cfg).intervention_dtype == choice
    # a model already loaded decides for itself, whatever the record says
    record_choice(tmp_path / "cache", "float32" if choice == "bfloat16" else "bfloat16")
    assert concrete_intervention_dtype(cfg, loaded).intervention_dtype == choice
    full = config_from_dict({"model": {"name": str(tiny_model_dir), "intervention_dtype": "auto"}})
    assert with_concrete_dtypes(full, Dist(), loaded).model.intervention_dtype == choice
    pinned = config_from_dict({"model": {"name": str(tiny_model_dir), "intervention_dtype": "same"}})
    assert with_concrete_dtypes(pinned, Dist(), loaded) is pinned


def test_a_stage_saves_and_fingerprints_the_dtype_it_ran(tmp_path, monkeypatch):
    from test_pipeline import write_config

    from refusal_lens.cli import main

    monkeypatch.setenv("REFUSAL_LENS_CACHE", str(tmp_path / "cache"))
    record_choice(tmp_path / "cache", "bfloat16")
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('intervention_dtype: "same"', 'intervention_dtype: "auto"'))
    assert main(["collect", "--config", str(config)]) == 0
    folder = tmp_path / "results" / "tiny" / "activations"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["model"]["intervention_dtype"] == "bfloat16"
    assert json.loads((folder / "manifest.json").read_text())["config"]["model"]["intervention_dtype"] == "bfloat16"
    # the fingerprint holds the dtype run: the same stage pinned to it is skipped
    config.write_text(config.read_text().replace('intervention_dtype: "auto"', 'intervention_dtype: "bfloat16"'))
    assert main(["collect", "--config", str(config)]) == 0
    status = json.loads((tmp_path / "results" / "tiny" / "status.json").read_text())
    assert [s["state"] for s in status["stages"]] == ["skipped"]


def test_the_dtype_a_saved_config_ran_in():
    """saved_dtype reads a stage's saved model section as the bench and the re-run check do: ``same`` and a missing
    key (configs saved before it existed) mean torch_dtype; a concrete dtype is itself."""
    from refusal_lens.models.intervention_dtype import saved_dtype

    assert saved_dtype({"torch_dtype": "float32", "intervention_dtype": "same"}) == "float32"
    assert saved_dtype({"torch_dtype": "float32"}) == "float32"
    assert saved_dtype({"torch_dtype": "float32", "intervention_dtype": "bfloat16"}) == "bfloat16"
    assert saved_dtype({"torch_dtype": "bfloat16", "intervention_dtype": None}) == "bfloat16"
