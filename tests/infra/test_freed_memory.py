"""Giving freed heap memory back between parts (infra.freed_memory) and the status calling it as each part opens."""

import platform

import pytest

from refusal_lens.infra.freed_memory import can_trim, release_freed_memory
from refusal_lens.infra.resident_memory import resident_memory_mb
from refusal_lens.infra.status import StatusFile

GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC_LINUX, reason="malloc_trim is glibc's")
def test_freed_heap_blocks_pinned_by_live_ones_are_given_back():
    """256 MiB of 64 KiB blocks (below glibc's mmap threshold: they live in the heap), every 16th kept alive so the
    heap cannot shrink from its top: freeing the rest leaves the pages resident; the release gives them back."""
    assert can_trim()
    release_freed_memory()
    base = resident_memory_mb()["rss_mb"]
    blocks = [bytearray(64 * 1024) for _ in range(4096)]  # zero-filled: every page touched
    kept = blocks[::16]
    del blocks
    held = resident_memory_mb()["rss_mb"]
    if held < base + 150:
        pytest.skip(f"the allocator gave the freed blocks back by itself ({base:.0f} -> {held:.0f} MiB)")
    released = release_freed_memory()
    after = resident_memory_mb()["rss_mb"]
    assert after < held - 150, (base, held, after)
    assert released == pytest.approx(held - after, abs=20)
    assert len(kept) == 256 and all(len(b) == 64 * 1024 for b in kept)  # the live blocks are untouched


def test_without_malloc_trim_the_release_only_measures(monkeypatch):
    """Where the C library has no malloc_trim (musl, macOS) the release calls nothing and reports what it read."""
    from refusal_lens.infra import freed_memory

    monkeypatch.setattr(freed_memory, "_malloc_trim", lambda: None)
    assert not freed_memory.can_trim()
    released = freed_memory.release_freed_memory()
    if resident_memory_mb().get("rss_mb") is None:
        assert released is None
    else:
        assert isinstance(released, float) and abs(released) < 50  # nothing was given back


def test_the_status_runs_at_part_as_each_part_opens(tmp_path):
    opened = []
    status = StatusFile(tmp_path / "status.json", at_part=lambda: opened.append(status.data.get("message")))
    status.begin("run", ["direction", "discover"])
    status.start_stage("direction")  # part "" opens
    status.set(message="direction: selection")
    status.set(message="direction: selection")  # the same part: nothing opens
    status.set(message="direction: evaluation")
    status.finish_stage("direction")
    status.start_stage("discover")
    status.finish("done")
    assert len(opened) == 4, opened
    assert opened[1:3] == ["", "direction: selection"]  # called before the new message is set
    disabled = StatusFile(None, at_part=lambda: opened.append("disabled"))
    disabled.begin("run", ["direction"])
    disabled.start_stage("direction")
    disabled.set(message="direction: selection")
    assert "disabled" not in opened


#: a child process (mallopt is process-wide): six 8 MiB blocks filled then freed, ten rounds; prints the minor page
#: faults of the rounds after two warm-ups, and what keep_freed_memory returned
ROUNDS = """
import json, resource, sys
from refusal_lens.infra.freed_memory import keep_freed_memory
taken = keep_freed_memory() if sys.argv[1] == "keep" else None
def one_round():
    blocks = [b"\\x01" * (8 << 20) for _ in range(6)]  # malloc'd and written: every page touched
    del blocks
one_round(); one_round()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_round()
print(json.dumps({"taken": taken, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _rounds(policy: str) -> dict:
    import json
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", ROUNDS, policy], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="mallopt is glibc's")
def test_kept_freed_memory_is_reused_not_faulted_in_again():
    """By default glibc trims the freed 48 MiB from its heap's top after each round (or maps and unmaps each block),
    so every round faults its 12,288 pages in again; with the memory kept, the rounds reuse the same pages."""
    default, kept = _rounds("default"), _rounds("keep")
    assert kept["taken"] is True
    assert default["faults"] > 10 * 12_288 * 0.8, default  # the pattern does fault by default (else the test is void)
    assert kept["faults"] < default["faults"] * 0.1, (default, kept)


def test_without_mallopt_nothing_is_kept(monkeypatch):
    from refusal_lens.infra import freed_memory

    monkeypatch.setattr(freed_memory, "_mallopt", lambda: None)
    assert freed_memory.keep_freed_memory() is False


def test_a_refused_value_is_reported(monkeypatch):
    """mallopt returns 0 for a value it refuses (an mmap threshold above 32 MiB): the policy then says so."""
    from refusal_lens.infra import freed_memory

    calls = []
    monkeypatch.setattr(freed_memory, "_mallopt", lambda: lambda p, v: calls.append((p, v)) or int(p != -3))
    assert freed_memory.keep_freed_memory() is False
    assert dict(calls) == freed_memory.KEPT
