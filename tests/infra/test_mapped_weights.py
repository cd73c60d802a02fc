"""File-mapped weights leave the resident set and come back with the same bytes; written or anonymous ones stay."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from refusal_lens.infra.mapped_weights import PAGE, _present, page_flags, read_mappings, unmap_file_weights

pytestmark = pytest.mark.skipif(not read_mappings() or page_flags(0, PAGE) is None,
                                reason="needs /proc/self/maps and /proc/self/pagemap (Linux)")


def resident_pages(t: torch.Tensor) -> int:
    s = t.untyped_storage()
    lo, hi = s.data_ptr() // PAGE * PAGE, -(-(s.data_ptr() + s.nbytes()) // PAGE) * PAGE
    return int(_present(page_flags(lo, hi)).sum())


def mapped_module(tmp_path, n: int = 1 << 20) -> torch.nn.Module:
    """A module whose weight (4 MiB) is a view of a safetensors file, as transformers loads one."""
    save_file({"w": torch.randn(n, generator=torch.Generator().manual_seed(0)), "b": torch.arange(8.0)},
              str(tmp_path / "w.safetensors"))
    tensors = load_file(str(tmp_path / "w.safetensors"))
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(tensors["w"], requires_grad=False)
    module.register_buffer("b", tensors["b"])
    return module


def test_a_file_mapped_weight_leaves_the_resident_set_and_comes_back_the_same(tmp_path):
    module = mapped_module(tmp_path)
    before = module.w.clone()  # reads every page
    pages = module.w.nbytes // PAGE
    assert resident_pages(module.w) >= pages
    dropped = unmap_file_weights([module])
    assert dropped >= (pages - 1) * PAGE  # every whole page inside the tensor
    assert resident_pages(module.w) <= 2  # the partial first and last pages (the file's header shares the first)
    assert torch.equal(module.w, before)  # faulted back in from the file
    assert resident_pages(module.w) >= pages
    assert unmap_file_weights([module, module]) == dropped  # a storage counted once


def test_a_written_weight_stays_resident_with_what_was_written(tmp_path):
    module = mapped_module(tmp_path)
    with torch.no_grad():
        module.w[len(module.w) // 2] = 123.0  # a page in the middle: now an anonymous copy of the file's
    expected = module.w.clone()
    assert unmap_file_weights([module]) == 0
    assert torch.equal(module.w, expected) and float(module.w[len(module.w) // 2]) == 123.0


def test_a_weight_in_memory_is_never_touched(caplog):
    module = torch.nn.Linear(1024, 1024)
    expected = module.weight.detach().clone()
    with caplog.at_level("WARNING"):
        assert unmap_file_weights([module]) == 0
    assert not caplog.records  # not taken for a written file mapping: not a file mapping at all
    assert torch.equal(module.weight, expected)
    assert resident_pages(module.weight) >= module.weight.nbytes // PAGE - 1


def test_the_maps_parser_marks_private_file_mappings_only(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000100000 rw-p 00000000 fe:00 123      /cache/model.safetensors\n"
        "7f0000200000-7f0000300000 rw-s 00000000 fe:00 124      /dev/shm/x\n"
        "7f0000400000-7f0000500000 rw-p 00000000 00:00 0        [heap]\n"
        "7f0000600000-7f0000700000 rw-p 00000000 00:00 0 \n"
        "00400000-00500000 r-xp 00000000 fe:00 125      /usr/bin/python3\n"
    )
    got = read_mappings(str(maps))
    assert [m.start for m in got] == sorted(m.start for m in got)
    assert {m.start: m.private_file for m in got} == {
        0x7F0000000000: True, 0x7F0000200000: False, 0x7F0000400000: False, 0x7F0000600000: False, 0x400000: True}
    assert read_mappings(str(tmp_path / "absent")) == []
