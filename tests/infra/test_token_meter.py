"""The profile's counts: a TokenMeter on a tiny HF model counts what each kind of pass computes, and the status
file's parts carry each part's seconds and counts."""

import pytest
import torch

from planted import build_planted_model
from refusal_lens.infra.status import StatusFile
from refusal_lens.infra.token_meter import TokenMeter, difference

from test_status import FakeClock


class FreshPages:
    """``mib`` MiB of anonymous memory of its own (``mmap``), every page written: the resident set grows by that
    much, whatever the C allocator holds free already (the pipeline's ``keep_freed_memory`` keeps up to 1 GiB of
    freed heap resident in this process once an earlier test has run it, and a ``torch.ones`` block served from
    there adds nothing to the resident set); :meth:`free` unmaps it, so the resident set falls by as much."""

    def __init__(self, mib: int):
        import mmap

        self._map = mmap.mmap(-1, mib << 20)
        block = torch.frombuffer(self._map, dtype=torch.uint8)
        block.fill_(1)
        del block  # the map's only export: closing it needs none left

    def free(self) -> None:
        self._map.close()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = build_planted_model(tmp_path_factory.mktemp("meter") / "model")
    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def test_forward_autograd_and_decode_positions_are_counted_exactly(hf):
    meter = TokenMeter()
    meter.watch(hf, "hf")
    meter.watch(hf, "hf")  # once per module: a second watch adds no second count
    ids = torch.randint(5, 40, (3, 7))
    with torch.no_grad():
        hf(input_ids=ids)
    assert meter.snapshot() == {"hf float32 forward": 21}
    embeds = hf.get_input_embeddings()(ids[:2]).detach().requires_grad_(True)
    hf(inputs_embeds=embeds).logits.sum().backward()
    assert meter.snapshot()["hf float32 autograd"] == 14
    before = meter.snapshot()
    with torch.no_grad():
        hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                    do_sample=False, pad_token_id=0)
    # the prefill computes the first new token; each of the other 4 is one decode step per row
    assert difference(meter.snapshot(), before) == {"hf float32 forward": 21, "hf float32 decode": 12}


def test_status_parts_carry_seconds_and_the_counts_between_messages(tmp_path):
    clock, meter = FakeClock(), TokenMeter()
    status = StatusFile(tmp_path / "status.json", clock=clock, meter=meter)
    status.begin("run", ["direction"])
    status.start_stage("direction")
    clock.t += 2
    meter.counts["hf float32 forward"] += 10
    status.set(message="direction: selection")
    clock.t += 5
    meter.counts["hf float32 autograd"] += 4
    meter.counts["hf float32 forward"] += 1
    status.set(message="direction: selection")  # the same message: the same part
    clock.t += 1
    status.set(message="direction: evaluation")
    clock.t += 3
    meter.counts["hf bfloat16 decode"] += 64
    status.finish_stage("direction")
    parts = status.data["stages"][0]["parts"]
    for part in parts:  # the process's memory at the end of each part: present, positive, the peak never below now
        rss, peak = part.pop("rss_mb"), part.pop("peak_rss_mb")
        assert 0 < rss <= peak
    assert parts == [
        {"part": "", "seconds": 2.0, "positions": {"hf float32 forward": 10}},
        {"part": "direction: selection", "seconds": 6.0,
         "positions": {"hf float32 autograd": 4, "hf float32 forward": 1}},
        {"part": "direction: evaluation", "seconds": 3.0, "positions": {"hf bfloat16 decode": 64}},
    ]


def test_transformer_lens_passes_are_counted_through_embed_and_unembed(tmp_path):
    """run_with_hooks calls forward itself (the model's own hooks never fire): the embed counts, the unembed says
    whether a graph was built."""
    from refusal_lens.config import ModelConfig
    from refusal_lens.models.loading import load_model

    loaded = load_model(ModelConfig(name=str(build_planted_model(tmp_path / "model"))))
    meter = TokenMeter()
    meter.watch_model(loaded)
    tl = loaded.model
    ids = torch.randint(5, 40, (2, 6))
    with torch.no_grad():
        tl.run_with_hooks(ids, attention_mask=torch.ones_like(ids), fwd_hooks=[])
    assert meter.snapshot() == {"tl float32 forward": 12}

    def leaf(x, hook=None):  # noqa: ARG001
        return x + torch.zeros_like(x, requires_grad=True)

    tl.run_with_hooks(ids[:1], attention_mask=torch.ones_like(ids[:1]), fwd_hooks=[("blocks.0.hook_resid_post", leaf)])
    assert meter.snapshot() == {"tl float32 forward": 12, "tl float32 autograd": 6}


def test_resident_memory_is_read_from_proc_status_and_its_peak_rises_with_an_allocation(tmp_path):
    from refusal_lens.infra.resident_memory import resident_memory_mb

    fake = tmp_path / "status"
    fake.write_text("Name:\tpython\nVmHWM:\t  2048000 kB\nVmRSS:\t  1024000 kB\n")
    assert resident_memory_mb(fake) == {"rss_mb": 1000.0, "peak_rss_mb": 2000.0}
    assert set(resident_memory_mb(tmp_path / "absent")) == {"peak_rss_mb"}  # getrusage: the peak only
    before = resident_memory_mb()
    block = FreshPages(300)
    after = resident_memory_mb()
    # the peak may already be higher (earlier tests): now rises by the block, and the peak is never below now
    assert after["rss_mb"] >= before["rss_mb"] + 250 and after["peak_rss_mb"] >= after["rss_mb"], (before, after)
    block.free()


def test_the_peak_sampler_gives_each_span_its_own_largest_reading(tmp_path):
    """take() returns the largest VmRSS read since the previous take, this moment included, and starts anew: a span
    after a high one reports its own (lower) peak, which VmHWM (never reset) cannot show."""
    from refusal_lens.infra.resident_memory import PeakSampler

    fake = tmp_path / "status"

    def rss(kb: int) -> None:
        fake.write_text(f"VmHWM:\t 9999999 kB\nVmRSS:\t {kb} kB\n")

    sampler = PeakSampler(interval_s=10.0, status=fake)  # no thread: samples by hand
    rss(1024 * 1000)
    sampler.take()
    rss(1024 * 3000)
    sampler.sample()
    rss(1024 * 2000)
    assert sampler.take() == 3000.0  # the high reading inside the span, not the value at its end
    rss(1024 * 1500)
    sampler.sample()
    rss(1024 * 1200)
    assert sampler.take() == 1500.0  # the next span: its own peak, below the previous one
    assert PeakSampler(status=tmp_path / "absent").take() is None
    with pytest.raises(ValueError, match="interval_s"):
        PeakSampler(interval_s=0)


def test_the_peak_sampler_thread_sees_an_allocation_freed_before_the_span_ends():
    import time

    from refusal_lens.infra.resident_memory import PeakSampler, resident_memory_mb

    with PeakSampler(interval_s=0.02) as sampler:
        sampler.take()
        base = resident_memory_mb()["rss_mb"]
        block = FreshPages(400)  # touched, then freed inside the span
        time.sleep(0.3)
        block.free()
        time.sleep(0.05)
        assert resident_memory_mb()["rss_mb"] < base + 200  # gone by the end of the span
        assert sampler.take() >= base + 350  # but the span's peak has it
    assert sampler._thread is None  # stopped


def test_the_status_gives_each_part_its_own_peak_with_a_sampler(tmp_path):
    import time

    from refusal_lens.infra.resident_memory import PeakSampler
    from refusal_lens.infra.status import StatusFile

    status = StatusFile(tmp_path / "status.json", meter=TokenMeter(), memory=PeakSampler(interval_s=0.02))
    status.begin("run", ["direction"])
    status.start_stage("direction")
    block = FreshPages(400)
    time.sleep(0.2)  # ten sampling intervals
    block.free()
    status.set(message="direction: after the block")
    status.finish_stage("direction")
    status.finish("done")
    first, second = status.data["stages"][0]["parts"]
    assert first["part_peak_rss_mb"] >= second["part_peak_rss_mb"] + 300, (first, second)
    assert second["part_peak_rss_mb"] <= second["peak_rss_mb"]
    assert status.memory._thread is None  # finish stops the thread
