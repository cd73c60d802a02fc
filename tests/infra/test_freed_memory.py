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
