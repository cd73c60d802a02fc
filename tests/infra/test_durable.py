"""Durable commits (refusal_lens/infra/durable.py): the write / fsync / rename / fsync-folder protocol, records
and their checks, and the clear errors of a full or unwritable disk."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refusal_lens.infra import durable
from refusal_lens.infra.durable import StorageError
from refusal_lens.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def events(monkeypatch):
    """Every fsync (with the path it synced) and rename that durable makes, in order."""
    log = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    def rename(src, dst):
        log.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    monkeypatch.setattr(durable.os, "rename", rename)
    return log


def test_write_syncs_the_file_renames_then_syncs_the_folder(tmp_path, events):
    path = tmp_path / "sub" / "a.json"
    durable.write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    tmp = str(durable.temporary_name(path))
    assert events == [("fsync", tmp), ("rename", tmp, str(path)), ("fsync", str(path.parent))]
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    durable.write_text(path, "old")
    with pytest.raises(RuntimeError, match="killed"):
        with durable.open_atomic(path) as fh:
            fh.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_files_of_other_writers_commit_through_atomic_path(tmp_path, events):
    import torch
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    durable.save_safetensors({"w": torch.arange(6.0)}, path)
    assert torch.equal(load_file(path)["w"], torch.arange(6.0))
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]


def test_commit_dir_syncs_every_file_before_the_rename(tmp_path, events):
    tmp, final = tmp_path / ".hook.partial", tmp_path / "hook"
    (tmp / "inner").mkdir(parents=True)
    for name in ("a", "b", "inner/c"):
        (tmp / name).write_text(name)
    durable.commit_dir(tmp, final)
    assert (final / "inner" / "c").read_text() == "inner/c" and not tmp.exists()
    rename_at = next(i for i, e in enumerate(events) if e[0] == "rename")
    synced_before = {e[1] for e in events[:rename_at]}
    assert synced_before == {str(tmp / "a"), str(tmp / "b"), str(tmp / "inner" / "c"), str(tmp / "inner"), str(tmp)}
    assert events[rename_at + 1:] == [("fsync", str(tmp_path))]


def test_record_and_check_detect_truncation_alteration_and_absence(tmp_path):
    path = tmp_path / "shard.arrow"
    path.write_bytes(b"0123456789")
    rec = durable.record(path)
    assert rec["size"] == 10 and len(rec["sha256"]) == 64
    assert durable.check(path, rec) is None
    path.write_bytes(b"01234")
    assert durable.check(path, rec) == "5 bytes, 10 recorded"
    path.write_bytes(b"0123456780")  # same size, other content
    assert durable.check(path, rec) == "content differs from its recorded sha256"
    assert durable.check(path, rec, full=False) is None  # the size-only check is a stat
    path.unlink()
    assert durable.check(path, rec) == "missing"
    assert durable.check(path, None) == "no size/sha256 recorded"


def test_ledger_trusts_only_recorded_matching_files(tmp_path, caplog):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"aaaa")
    b.write_bytes(b"bbbb")
    ledger = durable.Ledger(tmp_path / "ledger.json")
    ledger.add(a)
    again = durable.Ledger(tmp_path / "ledger.json")  # read back from disk
    assert again.verified(a) and not again.verified(b)  # b was written but never recorded
    a.write_bytes(b"aa")
    assert not again.verified(a)
    assert "a.bin is not trusted (2 bytes, 4 recorded)" in caplog.text
    (tmp_path / "ledger.json").write_text("{trunc")  # a damaged ledger trusts nothing
    assert durable.Ledger(tmp_path / "ledger.json").records == {}


@pytest.mark.parametrize("code, fragment", [
    (errno.ENOSPC, "No space left on device"),
    (errno.EDQUOT, "Disk quota exceeded"),
    (errno.EROFS, "Read-only file system"),
    (errno.EACCES, "Permission denied"),
])
def test_storage_errors_name_the_folder_and_leave_no_temporary(tmp_path, code, fragment):
    path = tmp_path / "out" / "f.bin"
    with pytest.raises(StorageError) as info:
        with durable.atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(code, os.strerror(code))
    err = info.value
    assert isinstance(err, UserError) and isinstance(err, OSError)
    assert str(err).startswith(f"cannot write to {tmp_path / 'out'}: {fragment}")
    if code in durable.FULL_ERRNOS:
        assert "bytes) free there" in str(err)
    else:
        assert "make the folder writable" in str(err)
    assert list((tmp_path / "out").iterdir()) == []


def test_safetensors_rust_errors_are_recognised(tmp_path):
    err = durable.storage_error(RuntimeError("Error while serializing: I/O error: No space left on device "
                                             "(os error 28)"), tmp_path)
    assert isinstance(err, StorageError) and "No space left on device" in str(err)
    assert durable.storage_error(RuntimeError("shape mismatch"), tmp_path) is None
    assert durable.storage_error(OSError(errno.ENOENT, "No such file"), tmp_path) is None


def test_space_for_checks_free_space_first_and_names_the_need(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda p: usage(10_000, 9_000, 1_000))
    ran = []
    with pytest.raises(StorageError) as info:
        with durable.space_for(tmp_path / "not-yet", 5_000, "collect (40 prompts)"):
            ran.append(True)
    assert not ran  # refused before the block
    assert str(info.value) == (
        f"cannot write to {tmp_path / 'not-yet'}: not enough free space; collect (40 prompts) needs about "
        "4.9 KiB (5000 bytes), 1000 B (1000 bytes) free there (free some space or point output.result_dir "
        "at a larger disk, then rerun to resume)")
    # enough space up front, then the disk fills during a write: the error names the need
    with pytest.raises(StorageError, match=r"collect \(40 prompts\) needs about 500 B \(500 bytes\)"):
        with durable.space_for(tmp_path, 500, "collect (40 prompts)"):
            durable.write_bytes(tmp_path / "x", b"")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(StorageError, match="make the folder writable"):
        with durable.space_for(tmp_path, 500, "collect"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(ValueError):  # other errors pass unchanged
        with durable.space_for(tmp_path, 500, "collect"):
            raise ValueError("a bug")


def test_remove_temporaries(tmp_path):
    keep = [tmp_path / "a.json", tmp_path / "d" / "shard-000-00000.arrow", tmp_path / ".lock"]
    gone = [tmp_path / ".a.json.123.tmp", tmp_path / "d" / ".shard-000-00001.arrow.9.tmp"]
    for p in keep + gone:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    (tmp_path / "d" / ".dataset_info.5.tmp").mkdir()
    (tmp_path / "d" / ".dataset_info.5.tmp" / "dataset_info.json").write_text("{")
    assert durable.remove_temporaries(tmp_path) == 3
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        str(p.relative_to(tmp_path)) for p in keep)


def test_a_real_full_disk(tmp_path, tmpfs):
    """On a 16 KiB tmpfs (the kernel's ENOSPC, not a simulated one): the old file survives intact."""
    disk = tmpfs(tmp_path / "disk", "16k")
    durable.write_bytes(disk / "f.bin", b"old")
    with pytest.raises(StorageError, match=f"cannot write to {disk}: No space left on device"):
        durable.write_bytes(disk / "f.bin", b"x" * 100_000)
    assert (disk / "f.bin").read_bytes() == b"old"
    assert [p.name for p in disk.iterdir()] == ["f.bin"]


def test_cli_on_a_read_only_folder_says_so(tmp_path, tmpfs):
    """A read-only results folder fails with one clear line and exit status 2 before any work: a tmpfs
    remounted read-only when the tests run as root (chmod does not stop root), else a chmod-ed folder."""
    if os.geteuid() == 0:
        results = tmpfs(tmp_path / "results", "64k")
        subprocess.run(["mount", "-o", "remount,ro", str(results)], check=True)
        reason = "Read-only file system"
    else:
        results = tmp_path / "results"
        results.mkdir()
        results.chmod(0o555)
        reason = "Permission denied"
    config = tmp_path / "c.yaml"
    config.write_text(f"base: {ROOT / 'configs/pipelines/default.yaml'}\n"
                      f"output: {{result_dir: {str(results)!r}, run_name: tiny}}\n")
    proc = subprocess.run([sys.executable, "-m", "refusal_lens", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"refusal-lens run: error: cannot write to {results / 'tiny'}: {reason} (make the folder writable, or point "
        "output.result_dir elsewhere)"]
    assert list(results.iterdir()) == []
