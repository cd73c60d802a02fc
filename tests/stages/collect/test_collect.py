"""The collect stage on a tiny random model: activations equal a direct run_with_cache, resume, dtypes,
torchrun, SAE-Lens compatibility."""

import dataclasses
import json

import datasets
import numpy as np
import pytest
import torch

from helpers import collect

import refusal_lens.stages.collect.shards as shards_mod
import refusal_lens.stages.collect.stage as collect_mod
from refusal_lens.activations.store import load_hook_tensor
from refusal_lens.core.chat import encode_prompt
from refusal_lens.core.refusal import RefusalTokens, refusal_score
from refusal_lens.run.stage import StageFolderError
from refusal_lens.stages.collect.rates import format_rates, refusal_rates
from refusal_lens.config import Config, DataConfig, InferenceConfig, ModelConfig, dump_config
from refusal_lens.core.judge import judge
from refusal_lens.data.prompts import Prompt

from conftest import run_cli

TEXTS = [
    "hello world",
    "what is python code ?",
    "how are you",
    "make cake",
    "steal car",
    "print 2 + 2 = ?",
    "make bomb",
    "bake cake , hello",
]


def prompts(n=len(TEXTS)):
    return [
        Prompt(f"t:{i}", TEXTS[i % len(TEXTS)] + " ." * (i // len(TEXTS)), "harmful" if i % 2 else "privacy",
               "toxic" if i % 3 == 0 else "safe", "t")
        for i in range(n)
    ]


def make_cfg(model_dir, **inference):
    inf = {"batch_size": 3, "max_new_tokens": 4, "positions": "last", **inference}
    return Config(
        model=ModelConfig(name=str(model_dir), activation_layers=("residuals_all", "mlp_1")),
        inference=InferenceConfig(**inf),
    )


@pytest.fixture(scope="module")
def bridge(tiny_model_dir):
    from refusal_lens.models.loading import load_model

    return load_model(ModelConfig(name=str(tiny_model_dir)))


def direct_cache(loaded, text, hooks):
    """The reference: one unpadded prompt, straight through run_with_cache."""
    enc = encode_prompt(loaded.tokenizer, text, 256)
    with torch.no_grad():
        logits, cache = loaded.model.run_with_cache(torch.tensor([enc.ids]), names_filter=hooks)
    return enc, logits[0], {h: cache[h][0] for h in hooks}


@pytest.mark.parametrize("positions", ["last", "all", "post_instruction"])
def test_activations_equal_direct_run_with_cache(tiny_loaded, tiny_model_dir, tmp_path, positions):
    cfg = make_cfg(tiny_model_dir, positions=positions, storage_dtype="float32")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend=tiny_loaded.backend))
    ps = prompts()
    result = collect(tiny_loaded, ps, cfg, tmp_path / "run" / "activations", show_progress=False)
    assert result.hooks == [*(f"blocks.{i}.hook_resid_post" for i in range(3)), "blocks.1.hook_mlp_out"]
    table = datasets.load_from_disk(str(tmp_path / "run" / "activations" / "prompts")).to_list()
    assert [r["prompt_id"] for r in table] == [p.id for p in ps]
    for hook in result.hooks:
        values, cols = load_hook_tensor(tmp_path / "run" / "activations" / hook)
        assert values.dtype == torch.float32
        for p in ps:
            enc, logits, ref = direct_cache(tiny_loaded, p.prompt, result.hooks)
            rows = [i for i, pid in enumerate(cols["prompt_id"]) if pid == p.id]
            n = len(enc.ids)
            expected_pos = {"last": [n - 1], "all": list(range(n)),
                            "post_instruction": list(range(n - enc.n_post_instruction, n))}[positions]
            assert [cols["position"][i] for i in rows] == expected_pos
            assert cols["token_ids"][rows].tolist() == [enc.ids[k] for k in expected_pos]
            # padded batch of 3 vs a single unpadded prompt: equal up to fp32 op-order noise
            torch.testing.assert_close(values[rows], ref[hook][expected_pos], rtol=1e-4, atol=1e-4)
    # refusal score: from the first response position of the same forward pass, with the tokens of the manifest
    manifest = json.loads((tmp_path / "run" / "activations" / "manifest.json").read_text())
    tokens = RefusalTokens.from_dict(manifest["refusal_tokens"])
    assert manifest["refusal_tokens"]["source"] in ("learned", "family")
    for row, p in zip(table, ps):
        _, logits, _ = direct_cache(tiny_loaded, p.prompt, [])
        expected = refusal_score(logits[-1], tokens).item()
        assert row["refusal_score"] == pytest.approx(expected, abs=1e-4)


def test_responses_match_single_prompt_generation(bridge, tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, max_new_tokens=5)
    ps = prompts()
    collect(bridge, ps, cfg, tmp_path / "run" / "activations", show_progress=False)
    table = datasets.load_from_disk(str(tmp_path / "run" / "activations" / "prompts")).to_list()
    for row, p in zip(table, ps):
        enc = encode_prompt(bridge.tokenizer, p.prompt, 256)
        with torch.no_grad():
            out = bridge.hf_model.generate(torch.tensor([enc.ids]), max_new_tokens=5, do_sample=False,
                                           pad_token_id=bridge.tokenizer.pad_token_id)
        new = out[0, len(enc.ids):].tolist()
        eos = bridge.tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert row["response"] == bridge.tokenizer.decode(new, skip_special_tokens=True)
        assert row["n_response_tokens"] == len(new)
        assert (row["outcome"], row["judge_rule"]) == (judge(row["response"]).outcome, judge(row["response"]).rule)
        assert row["refused"] == (row["outcome"] == "refused")


def test_response_activations_are_stored_when_asked(bridge, tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, positions="all", store_response_activations=True, max_new_tokens=4,
                   storage_dtype="float32")
    ps = prompts(3)
    collect(bridge, ps, cfg, tmp_path / "run" / "activations", show_progress=False)
    table = datasets.load_from_disk(str(tmp_path / "run" / "activations" / "prompts")).to_list()
    values, cols = load_hook_tensor(tmp_path / "run" / "activations" / "blocks.2.hook_resid_post")
    for row, p in zip(table, ps):
        rows = [i for i, pid in enumerate(cols["prompt_id"]) if pid == p.id]
        assert len(rows) == row["n_prompt_tokens"] + row["n_response_tokens"]
        assert sum(cols["is_response"][i] for i in rows) == row["n_response_tokens"]
        # the response tokens' activations equal a plain forward pass over prompt + response
        ids = cols["token_ids"][rows].tolist()
        with torch.no_grad():
            _, cache = bridge.model.run_with_cache(torch.tensor([ids]), names_filter=["blocks.2.hook_resid_post"])
        torch.testing.assert_close(values[rows], cache["blocks.2.hook_resid_post"][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_storage_dtype_round_trip(bridge, tiny_model_dir, tmp_path, dtype):
    cfg = make_cfg(tiny_model_dir, storage_dtype=dtype)
    ps = prompts(4)
    collect(bridge, ps, cfg, tmp_path / "run" / "activations", show_progress=False)
    hook = "blocks.2.hook_resid_post"
    values, cols = load_hook_tensor(tmp_path / "run" / "activations" / hook)
    assert values.dtype == getattr(torch, dtype)
    for i, p in enumerate(ps):
        _, _, ref = direct_cache(bridge, p.prompt, [hook])
        expected = ref[hook][-1].to(getattr(torch, dtype))
        # the stored value is the reference cast to the storage dtype (exact bits, up to fp32 batch noise)
        torch.testing.assert_close(values[i].float(), expected.float(), rtol=1e-2 if dtype != "float32" else 1e-5,
                                   atol=1e-3)
    meta = json.loads((tmp_path / "run" / "activations" / hook / "refusal_lens.json").read_text())
    assert meta["storage_dtype"] == dtype
    # the storage estimate (payload per 1000 prompts) against the bytes of the written hook column
    from refusal_lens.infra.storage_estimate import estimate_storage

    column = datasets.load_from_disk(str(tmp_path / "run" / "activations" / hook)).data.table.column(hook)
    est = estimate_storage({hook: 64}, batch_size=1, seq_len=1, positions_per_prompt=1, storage_dtype=dtype)
    payload = est.disk_bytes_per_1000_prompts * len(ps) / 1000
    assert payload <= column.nbytes <= 1.1 * payload  # Arrow adds list offsets: 8 bytes a row


class Interrupt(Exception):
    pass


def test_interrupt_and_resume_equals_uninterrupted(bridge, tiny_model_dir, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_model_dir, batch_size=2, positions="all", shard_mb=1e-6)  # a shard after every batch
    ps = prompts(11)
    ref_dir, dir_ = tmp_path / "ref" / "activations", tmp_path / "resumed" / "activations"
    collect(bridge, ps, cfg, ref_dir, show_progress=False)
    interrupted(bridge, ps, cfg, dir_, monkeypatch, at_batch=3)
    progress = json.loads((dir_ / "progress" / "rank-000.json").read_text())
    assert progress["shards"][-1]["end"] == 4  # two batches of 2 committed
    # a crash in the middle of a shard write leaves an uncommitted file behind
    (dir_ / "blocks.0.hook_resid_post" / "shard-000-00002.arrow").write_bytes(b"partial")
    result = collect(bridge, ps, cfg, dir_, show_progress=False)
    assert not result.skipped
    assert_same_datasets(ref_dir, dir_, result.hooks)
    # a finished collection is skipped on rerun
    assert collect(bridge, ps, cfg, dir_, show_progress=False).skipped


def assert_same_datasets(ref_dir, dir_, hooks):
    for sub in ["prompts", *hooks]:
        assert datasets.load_from_disk(str(ref_dir / sub)).to_list() == \
            datasets.load_from_disk(str(dir_ / sub)).to_list(), sub


def interrupted(bridge, ps, cfg, folder, monkeypatch, at_batch: int):
    """collect into ``folder``, stopped by an exception at batch ``at_batch`` (earlier batches committed)."""
    real_process, calls = collect_mod.process_batch, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_batch:
            raise Interrupt("killed")
        return real_process(*args, **kwargs)

    monkeypatch.setattr(collect_mod, "process_batch", dying)
    with pytest.raises(Interrupt):
        collect(bridge, ps, cfg, folder, show_progress=False)
    monkeypatch.setattr(collect_mod, "process_batch", real_process)


def test_damaged_committed_shards_are_redone_not_trusted(bridge, tiny_model_dir, tmp_path, monkeypatch, caplog):
    cfg = make_cfg(tiny_model_dir, batch_size=2, positions="all", shard_mb=1e-6)
    ps = prompts(11)
    ref_dir, dir_ = tmp_path / "ref" / "activations", tmp_path / "damaged" / "activations"
    hooks = collect(bridge, ps, cfg, ref_dir, show_progress=False).hooks
    interrupted(bridge, ps, cfg, dir_, monkeypatch, at_batch=4)  # shards 0-2 committed
    # a committed shard altered in place (same size: only its sha256 tells)
    shard = dir_ / "blocks.1.hook_resid_post" / "shard-000-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="refusal_lens.stages.collect"):
        assert not collect(bridge, ps, cfg, dir_, show_progress=False).skipped
    assert ("collect: rank 0 shard 1 is damaged (blocks.1.hook_resid_post/shard-000-00001.arrow: content differs "
            "from its recorded sha256): it and the 1 shard(s) after it are redone") in caplog.text
    assert_same_datasets(ref_dir, dir_, hooks)
    # a finished collection whose shard lost bytes is resumed, not skipped
    caplog.clear()
    truncated = dir_ / "prompts" / "shard-000-00004.arrow"
    truncated.write_bytes(truncated.read_bytes()[:50])
    with caplog.at_level("WARNING", logger="refusal_lens.stages.collect"):
        assert not collect(bridge, ps, cfg, dir_, show_progress=False).skipped
    assert f"collect: {truncated} is damaged (50 bytes," in caplog.text
    assert "collect: rank 0 shard 4 is damaged (prompts/shard-000-00004.arrow: 50 bytes," in caplog.text
    assert_same_datasets(ref_dir, dir_, hooks)
    assert collect(bridge, ps, cfg, dir_, show_progress=False).skipped


def test_a_full_disk_during_a_shard_is_a_clear_error_and_resumes(bridge, tiny_model_dir, tmp_path, monkeypatch):
    """The disk fills while the second shard is written (ENOSPC raised by the Arrow write of its second
    file, after half of it is on disk): a StorageError naming the folder and the bytes needed, the
    shard uncommitted, no temporary left; the rerun gives the uninterrupted rows."""
    import errno
    import os

    from refusal_lens.infra import durable
    from refusal_lens.infra.durable import StorageError

    cfg = make_cfg(tiny_model_dir, batch_size=2, positions="all", shard_mb=1e-6)
    ps = prompts(11)
    ref_dir, dir_ = tmp_path / "ref" / "activations", tmp_path / "full" / "activations"
    hooks = collect(bridge, ps, cfg, ref_dir, show_progress=False).hooks
    real_write, calls = shards_mod.write_arrow_file, []
    per_shard = len(hooks) + 1  # a file per hook and the prompts

    def filling(path, batches, schema):
        calls.append(path)
        if len(calls) == per_shard + 2:
            with durable.atomic_path(path) as tmp:
                tmp.write_bytes(b"half a shard")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, batches, schema)

    monkeypatch.setattr(shards_mod, "write_arrow_file", filling)
    with pytest.raises(StorageError) as info:
        collect(bridge, ps, cfg, dir_, show_progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot write to {calls[-1].parent}: No space left on device; collect (rank 0: "
                              "9 prompts to go, activation payload estimate) needs about ")
    assert "bytes) free there" in message and "then rerun to resume" in message
    progress = json.loads((dir_ / "progress" / "rank-000.json").read_text())
    assert [s["index"] for s in progress["shards"]] == [0]  # the failed shard is not committed
    assert not [p for p in dir_.rglob("*") if p.name.endswith(".tmp")]
    assert json.loads((dir_ / "manifest.json").read_text())["status"] == "running"
    monkeypatch.setattr(shards_mod, "write_arrow_file", real_write)
    collect(bridge, ps, cfg, dir_, show_progress=False)
    assert_same_datasets(ref_dir, dir_, hooks)


def test_a_disk_too_small_is_refused_before_the_first_shard(bridge, tiny_model_dir, tmp_path, monkeypatch):
    import re
    from collections import namedtuple

    from refusal_lens.infra import durable
    from refusal_lens.infra.durable import StorageError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    cfg = make_cfg(tiny_model_dir, positions="all")
    with pytest.raises(StorageError) as info:
        collect(bridge, prompts(11), cfg, tmp_path / "run" / "activations", show_progress=False)
    found = re.fullmatch(rf"cannot write to {tmp_path / 'run' / 'activations'}: not enough free space; collect \(rank 0: 11 "
                         r"prompts to go, activation payload estimate\) needs about .* \((\d+) bytes\), 1000 B "
                         r"\(1000 bytes\) free there \(.*\)", str(info.value))
    assert found and int(found.group(1)) > 1000, str(info.value)
    assert not (tmp_path / "run" / "activations" / "progress").exists()  # nothing collected


def test_a_real_small_disk(bridge, tiny_model_dir, tmp_path, tmpfs):
    """On a 64 KiB tmpfs: the stage stops with a StorageError (the free-space check before a shard, or the
    kernel's ENOSPC during one: whichever comes first), every committed shard verifies, and the same
    folder copied to a large disk resumes to the full collection."""
    import shutil

    from refusal_lens.infra import durable
    from refusal_lens.infra.durable import StorageError

    disk = tmpfs(tmp_path / "disk", "64k")
    cfg = make_cfg(tiny_model_dir, batch_size=2, shard_mb=1e-6)
    ps = prompts(11)
    with pytest.raises(StorageError, match=f"cannot write to {disk / 'run' / 'activations'}.*: (No space left on device|not "
                                           "enough free space); collect \\(rank 0: ") as info:
        collect(bridge, ps, cfg, disk / "run" / "activations", show_progress=False)
    print(info.value)
    progress = json.loads((disk / "run" / "activations" / "progress" / "rank-000.json").read_text())
    assert 0 < len(progress["shards"]) < 6
    for s in progress["shards"]:
        assert all(durable.check(disk / "run" / "activations" / f, s["records"][f]) is None for f in s["files"])
    assert not [p for p in (disk / "run" / "activations").rglob("*") if p.name.endswith(".tmp")]
    shutil.copytree(disk / "run" / "activations", tmp_path / "run" / "activations")
    result = collect(bridge, ps, cfg, tmp_path / "run" / "activations", show_progress=False)
    assert not result.skipped and result.n_prompts == 11
    assert [r["prompt_id"] for r in datasets.load_from_disk(str(tmp_path / "run" / "activations" / "prompts")).to_list()] == [
        p.id for p in ps]


def test_different_config_is_never_mixed_in(bridge, tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir)
    collect(bridge, prompts(3), cfg, tmp_path / "run" / "activations", show_progress=False)
    other = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, max_new_tokens=2))
    with pytest.raises(StageFolderError, match="inference.max_new_tokens"):
        collect(bridge, prompts(3), other, tmp_path / "run" / "activations", show_progress=False)
    # batching does not change the rows: a different batch size resumes the same collection
    same = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, batch_size=1))
    assert collect(bridge, prompts(3), same, tmp_path / "run" / "activations", show_progress=False).skipped
    result = collect(bridge, prompts(3), other, tmp_path / "run" / "activations", force=True, show_progress=False)
    assert not result.skipped
    (tmp_path / "foreign" / "activations").mkdir(parents=True)
    (tmp_path / "foreign" / "activations" / "x.txt").write_text("x")
    with pytest.raises(StageFolderError, match="not a refusal_lens activations folder"):
        collect(bridge, prompts(3), cfg, tmp_path / "foreign" / "activations", show_progress=False)


def test_oom_halves_the_batch(bridge, tiny_model_dir, tmp_path, monkeypatch):
    real = collect_mod.process_batch
    sizes = []

    def oom_above_two(loaded, ps, *args, **kwargs):
        sizes.append(len(ps))
        if len(ps) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(loaded, ps, *args, **kwargs)

    monkeypatch.setattr(collect_mod, "process_batch", oom_above_two)
    cfg = make_cfg(tiny_model_dir, batch_size=8)
    result = collect(bridge, prompts(5), cfg, tmp_path / "run" / "activations", show_progress=False)
    assert sizes == [5, 4, 2, 2, 1] and result.stats["batch_size_final"] == 2  # 8 -> 4 -> 2, then 2+2+1
    assert len(datasets.load_from_disk(str(tmp_path / "run" / "activations" / "prompts"))) == 5


def test_sae_lens_reads_a_hook_folder(bridge, tiny_model_dir, tmp_path):
    from sae_lens.training.activations_store import ActivationsStore

    cfg = make_cfg(tiny_model_dir, positions="all", storage_dtype="float32")
    collect(bridge, prompts(4), cfg, tmp_path / "run" / "activations", show_progress=False)
    hook = "blocks.1.hook_resid_post"
    values, cols = load_hook_tensor(tmp_path / "run" / "activations" / hook)
    store = ActivationsStore(
        model=bridge.model, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,
        context_size=1, d_in=64, n_batches_in_buffer=2, total_training_tokens=len(values),
        store_batch_size_prompts=4, train_batch_size_tokens=4, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32", cached_activations_path=str(tmp_path / "run" / "activations" / hook),
    )
    acts, token_ids = store._load_raw_llm_batch_from_cached(raise_on_epoch_end=False)
    torch.testing.assert_close(acts.reshape(4, 64), values[:4])
    assert token_ids.tolist() == cols["token_ids"][:4].tolist()


def test_torchrun_two_processes_equal_one(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, positions="all")
    cfg = dataclasses.replace(
        cfg,
        data=DataConfig(max_samples_per_category=2),
        output=dataclasses.replace(cfg.output, result_dir=str(tmp_path), run_name="one"),
    )
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    run_cli(["collect", "--config", str(path)])
    run_cli(["collect", "--config", str(path), "--set", "output.run_name=two"], nproc=2, port=29517)
    files = sorted(p.name for p in (tmp_path / "two" / "activations" / "prompts").glob("*.arrow"))
    assert any(f.startswith("shard-001-") for f in files)  # rank 1 wrote its own shards
    for sub in ["prompts", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]:
        a = datasets.load_from_disk(str(tmp_path / "one" / "activations" / sub)).to_list()
        b = datasets.load_from_disk(str(tmp_path / "two" / "activations" / sub)).to_list()
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            for k in ra:
                if k in (sub, "refusal_score"):
                    np.testing.assert_allclose(np.asarray(ra[k], dtype=np.float32), np.asarray(rb[k], dtype=np.float32),
                                               rtol=1e-3, atol=1e-3)
                else:
                    assert ra[k] == rb[k], k


def test_refusal_rates_table():
    rows = [
        {"category": "hate", "label": "toxic", "refused": True, "outcome": "refused", "split": "test"},
        {"category": "hate", "label": "toxic", "refused": False, "outcome": "incoherent", "split": "test"},
        {"category": "hate", "label": "safe", "refused": False, "outcome": "complied", "split": "discovery"},
    ]
    rates = refusal_rates(rows)
    assert {(r["split"], r["category"], r["label"]): (r["refusal_rate"], r["incoherent"]) for r in rates} == {
        ("all", "hate", "safe"): (0.0, 0), ("all", "hate", "toxic"): (0.5, 1), ("all", "ALL", "safe"): (0.0, 0),
        ("all", "ALL", "toxic"): (0.5, 1), ("discovery", "hate", "safe"): (0.0, 0),
        ("discovery", "ALL", "safe"): (0.0, 0), ("test", "hate", "toxic"): (0.5, 1), ("test", "ALL", "toxic"): (0.5, 1)}
    text = format_rates(rates)
    assert "1/2" in text and "50.0%" in text and text.splitlines()[-1].startswith("ALL")
    assert "0/1" in format_rates(rates, "discovery")


def test_split_is_stratified_disjoint_and_stable(bridge, tiny_model_dir, tmp_path):
    """Every prompt in exactly one split, each split holds its share of every stratum, and the split is a function
    of the ids alone (another order, the same split)."""
    from refusal_lens.core.splits import SPLITS, assign_splits

    cfg = make_cfg(tiny_model_dir)
    ps = prompts(30)
    collect(bridge, ps, cfg, tmp_path / "run" / "activations", show_progress=False)
    info = json.loads((tmp_path / "run" / "activations" / "split.json").read_text())
    table = datasets.load_from_disk(str(tmp_path / "run" / "activations" / "prompts")).to_list()
    assert sorted(info["splits"]) == sorted(p.id for p in ps) and set(info["splits"].values()) <= set(SPLITS)
    assert all(r["split"] == info["splits"][r["prompt_id"]] for r in table)
    rows = [{"prompt_id": r["prompt_id"], "label": r["label"], "category": r["category"], "refused": r["refused"]}
            for r in table]
    assert assign_splits(rows[::-1], (0.4, 0.2, 0.4), 0) == info["splits"]
    # stratified: in every stratum of n prompts, each split holds its share up to one prompt
    big = [{"prompt_id": f"p{i}", "label": "toxic" if i % 2 else "safe", "category": f"c{i % 3}", "refused": i % 5 == 0}
           for i in range(3000)]
    assignment = assign_splits(big, (0.5, 0.2, 0.3), 7)
    strata: dict = {}
    for r in big:
        strata.setdefault((r["label"], r["category"], r["refused"]), []).append(assignment[r["prompt_id"]])
    for members in strata.values():
        for split, share in zip(SPLITS, (0.5, 0.2, 0.3)):
            assert abs(members.count(split) - share * len(members)) <= 1
    assert assign_splits(big, (0.5, 0.2, 0.3), 8) != assignment  # the seed matters
