"""The GPU path on one card, in one prepared script (issue 13): <= 8 minutes on an H100/H200.

1. **collect**: a random Llama-2-7B-shaped bf16 model built on the GPU (no download), batches of
   16 x 256 tokens, all 32 ``resid_post`` hooks at every position. Variants, interleaved, median of 7
   (each timed run is ``batches_per_run`` batches; times are per batch), as ratios to the bare sdpa
   forward: HF forward (bare; and with logits at the last position only), the collect stage's own path
   (``forward_and_extract`` with ``inference.collector: hf_hooks`` + ``ShardWriter``, fp16 Arrow shards
   written to disk), the ``hf_hooks`` collector with batches overlapped (:func:`overlapped`) and the
   shards written by worker threads, TL bridge ``run_with_cache`` (alone, and + fp16 copy to pinned
   host memory), HF ``output_hidden_states`` + fp16 copy to pinned memory. Also: the collector's
   values against HF's hidden states (bit-identical expected) and against the bridge's (sdpa vs
   eager-like attention), and peak GPU memory against the memory plan.
2. **sae**: SAE-Lens trainer steps, TopK 4096 -> 32768 (k 64), 4096-token batches from host memory,
   through the SAE stage's ``build_training_sae`` / ``train_sae`` with ``sae.precision`` fp32, tf32,
   bf16; ms per step from the difference of a long and a short run (setup cancels out).
3. **discover**: one attribution batch (8 x 256 tokens) on the bridge: AtP over every node of 4 TopK
   SAEs plus exact patching of their error nodes (:class:`refusal_lens.stages.circuits.attribution.Runner`).
4. **pipeline**: ``refusal-lens run --config configs/pipelines/llama2_7b_gpu.yaml`` on that random
   model (saved to a scratch folder) with 64 sample prompts and sizes cut down by ``--set``, as a
   subprocess; stage times from its status.json.

It prints one table and writes ``bench_gpu.json`` (after every part, so a part that fails or runs out
of time keeps the others) into the folder given on the command line. ``--tiny`` runs every part with
tiny shapes on the CPU (or the GPU when there is one), for checking the script itself.

    python3 bench/bench_gpu.py OUT_FOLDER [--tiny] [--parts collect,sae,discover,pipeline]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine runs from a checkout, not an installed package

from refusal_lens.core.hooks import hook_name  # noqa: E402

PARTS = ("collect", "sae", "discover", "pipeline")


@dataclass(frozen=True)
class Shape:
    d_model: int
    d_mlp: int
    n_layers: int
    n_heads: int
    vocab: int
    batch: int
    seq: int
    batches_per_run: int
    repeats: int
    expansion: int  # SAE d_sae = d_model x expansion
    k: int
    sae_batch: int
    sae_steps: tuple[int, int]  # a short and a long run: ms/step from their difference
    discover_batch: int
    discover_layers: tuple[int, ...]
    pipeline_sae_tokens: int


FULL = Shape(4096, 11008, 32, 32, 32000, 16, 256, 3, 7, 8, 64, 4096, (10, 50), 8, (12, 16, 20, 24), 4096 * 40)
TINY = Shape(64, 128, 32, 4, 1000, 4, 32, 2, 3, 8, 8, 256, (2, 16), 4, (12, 16, 20, 24), 256 * 16)


class Report:
    """Rows of the final table and the JSON document, written after every part."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.doc, self.rows = folder, {"meta": meta, "parts": {}}, []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, part: str, variant: str, ms: float | None = None, ratio: float | None = None, note: str = "",
            **extra) -> None:
        self.rows.append((part, variant, ms, ratio, note))
        self.doc["parts"].setdefault(part, []).append({"variant": variant, "ms": ms, "ratio": ratio, "note": note,
                                                       **extra})

    def write(self) -> None:
        (self.folder / "bench_gpu.json").write_text(json.dumps(self.doc, indent=2))

    def table(self) -> str:
        lines = ["| part | variant | ms | ratio | note |", "|---|---|---|---|---|"]
        for part, variant, ms, ratio, note in self.rows:
            lines.append(f"| {part} | {variant} | {'' if ms is None else f'{ms:.1f}'} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} | {note} |")
        return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_memory(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def llama_config(shape: Shape):
    from transformers import LlamaConfig

    from refusal_lens.models.synthetic import special_token_ids

    return LlamaConfig(hidden_size=shape.d_model, intermediate_size=shape.d_mlp, num_hidden_layers=shape.n_layers,
                       num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_heads, vocab_size=shape.vocab,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"], **special_token_ids())


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, folder: Path):
    """The random model built on ``device`` (HF's own init), its tokenizer and config in ``folder``, the
    bridge booted on a structural copy: a LoadedModel as ``load_model`` gives."""
    from transformers import LlamaForCausalLM

    from refusal_lens.core.families import family_for_template
    from refusal_lens.models.loading import LoadedModel, _boot_bridge, load_tokenizer
    from refusal_lens.models.synthetic import chat_vocab, save_chat_tokenizer

    config = llama_config(shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    save_chat_tokenizer(folder, shape.vocab - len(chat_vocab()))
    hf.config.save_pretrained(folder)
    tokenizer = load_tokenizer(str(folder))
    bridge = _boot_bridge(str(folder), hf, tokenizer, dtype, device)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                             add_generation_prompt=True)
    family = family_for_template(hf.config.model_type, rendered)
    return LoadedModel("random-llama2-7b-shape", "bridge", bridge, tokenizer, hf, family, device, str(folder))


def refusal_tokens(loaded):
    from refusal_lens.core.chat import render
    from refusal_lens.core.refusal import family_refusal_tokens

    return family_refusal_tokens(loaded.tokenizer, render(loaded.tokenizer, "Hello"), loaded.family.refusal_words)


# --------------------------------------------------------------------------------------------
# 1. collect
# --------------------------------------------------------------------------------------------


def _meta_arrays(n: int, prompt_ids: list[str], positions: list[int]) -> dict:
    """The metadata columns of one batch as Arrow arrays, converted once and shared by every hook."""
    import pyarrow as pa

    return {"prompt_id": pa.array(prompt_ids, pa.string()), "position": pa.array(positions, pa.int32()),
            "is_response": pa.array([False] * n), "category": pa.array(["bench"] * n, pa.string()),
            "label": pa.array(["safe"] * n, pa.string()), "refused": pa.array([False] * n),
            "refusal_score": pa.array([0.0] * n, pa.float32())}


def part_collect(loaded, shape: Shape, report: Report, scratch: Path) -> None:
    from refusal_lens.activations.collector import CollectRequest, HFHookCollector, overlapped
    from refusal_lens.activations.store import hook_features, hook_record_batch, write_arrow_file
    from refusal_lens.core.chat import EncodedPrompt
    from refusal_lens.stages.collect.extraction import BatchOutput, CollectStats, forward_and_extract
    from refusal_lens.stages.collect.shards import ShardWriter
    from refusal_lens.run.folder import RunFolder
    from refusal_lens.config import InferenceConfig
    from refusal_lens.infra.memory_plan import ModelShape, forward_bytes
    from refusal_lens.data.prompts import Prompt

    device, hf, bridge = loaded.device, loaded.hf_model, loaded.model
    B, T, K, L, d = shape.batch, shape.seq, shape.batches_per_run, shape.n_layers, shape.d_model
    hooks = [hook_name("residuals", i) for i in range(L)]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(100, shape.vocab, (B, T), generator=gen) for _ in range(K)]
    mask = torch.ones(B, T, dtype=torch.long)
    on_dev = [(ids.to(device), mask.to(device)) for ids in batches]
    rows, cols = mask.nonzero(as_tuple=True)
    last = torch.full((B,), T - 1)
    pinned = [torch.empty((B, T, d), dtype=torch.float16, pin_memory=device.type == "cuda") for _ in range(L + 1)]
    prompts = [Prompt(f"bench:{i}", "", "bench", "safe", "bench") for i in range(B)]
    encoded_of = [[EncodedPrompt("", ids[b].tolist(), 1, False) for b in range(B)] for ids in batches]
    empty = [[] for _ in range(B)]
    inf = InferenceConfig(positions="all", storage_dtype="float16", collector="hf_hooks")
    tokens = refusal_tokens(loaded)
    features = {h: hook_features(h, d, "float16") for h in hooks}
    run_dirs = []

    def new_dir() -> Path:
        path = Path(tempfile.mkdtemp(dir=scratch, prefix="collect-"))
        run_dirs.append(path)
        return path

    def bare(**extra):
        with torch.no_grad():
            for ids, m in on_dev:
                hf(input_ids=ids, attention_mask=m, use_cache=False, **extra)

    def hidden_pinned():
        with torch.no_grad():
            for ids, m in on_dev:
                out = hf(input_ids=ids, attention_mask=m, use_cache=False, output_hidden_states=True)
                for buf, h in zip(pinned, out.hidden_states[1:]):
                    buf.copy_(h.to(torch.float16), non_blocking=True)
                sync(device)

    def bridge_cache(copy: bool):
        with torch.no_grad():
            for ids, m in on_dev:
                _, cache = bridge.run_with_cache(ids, attention_mask=m, names_filter=hooks)
                if copy:
                    for buf, h in zip(pinned, hooks):
                        buf.copy_(cache[h].to(torch.float16), non_blocking=True)
                    sync(device)

    prompt_rows = [{"prompt_id": p.id, "prompt": "", "category": "bench", "label": "safe", "source": "bench",
                    "response": "", "refused": False, "refusal_score": 0.0, "n_prompt_tokens": T,
                    "n_response_tokens": 0, "truncated": False} for p in prompts]

    def stage_path():
        """What `refusal-lens collect` does per batch, generation aside: a shard per batch (1 GB > shard_mb)."""
        files = RunFolder(new_dir()).paths.activations  # a scratch run folder's activations/
        writer = ShardWriter(files, hooks, {h: d for h in hooks}, "float16", 0, inf.shard_mb << 20)
        for i, encoded in enumerate(encoded_of):
            scores, values, tids, meta, _ = forward_and_extract(loaded, prompts, encoded, empty, hooks, inf, tokens)
            meta["refused"] = [False] * len(tids)
            meta["refusal_score"] = [0.0] * len(tids)
            writer.add(BatchOutput(prompt_rows, values, tids, meta, CollectStats()))
            if writer.full() or i == len(encoded_of) - 1:
                writer.flush(0, (i + 1) * B)

    collector = HFHookCollector(hf, device, hooks)
    requests = [CollectRequest(ids, mask, tuple(hooks), rows, cols, last, torch.float16) for ids in batches]
    prompt_ids = [prompts[int(r)].id for r in rows]
    positions = cols.tolist()

    def overlapped_path():
        folder = new_dir()
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = []
            for i, (req, got) in enumerate(overlapped(collector, requests)):
                meta = _meta_arrays(len(rows), prompt_ids, positions)
                tids = req.ids[rows, cols].numpy()
                for h in hooks:
                    def write(h=h, values=got.values[h].numpy(), i=i):
                        (folder / h).mkdir(exist_ok=True)
                        batch = hook_record_batch(features[h], h, values, tids, meta)
                        write_arrow_file(folder / h / f"shard-{i:05d}.arrow", [batch], features[h].arrow_schema)
                    futures.append(pool.submit(write))
            for f in futures:
                f.result()

    variants = {
        "HF forward, sdpa (bare)": bare,
        "HF forward, sdpa, logits at the last position": lambda: bare(logits_to_keep=1),
        "collect stage path: forward_and_extract (hf_hooks) + ShardWriter, fp16 to disk": stage_path,
        "hf_hooks collector, overlapped batches + background fp16 writes": overlapped_path,
        "TL bridge run_with_cache": lambda: bridge_cache(False),
        "TL bridge run_with_cache + fp16 pinned copy": lambda: bridge_cache(True),
        "HF output_hidden_states + fp16 pinned copy": hidden_pinned,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(shape.repeats + 1):  # the first round warms up (kernels, pinned pool, allocator)
        for name, fn in variants.items():
            t = timed(fn, device)
            for path in run_dirs:
                shutil.rmtree(path, ignore_errors=True)
            run_dirs.clear()
            if rep:
                times[name].append(t)
    base = statistics.median(times["HF forward, sdpa (bare)"]) / K
    bytes_per_batch = B * T * L * d * 2
    for name, ts in times.items():
        ms = statistics.median(ts) / K * 1e3
        note = f"{B * T / (ms / 1e3):,.0f} tok/s"
        if "fp16" in name:
            note += f"; {bytes_per_batch / (ms / 1e3) / 1e9:.1f} GB/s of activations"
        report.add("collect", name, ms, ms / 1e3 / base, note, times_s=ts, batches_per_run=K)

    # correctness on this card: the collector against HF's hidden states (same attention) and the bridge
    got = collector.submit(requests[0]).wait().values
    with torch.no_grad():
        out = hf(input_ids=on_dev[0][0], attention_mask=on_dev[0][1], use_cache=False, output_hidden_states=True)
        _, cache = bridge.run_with_cache(on_dev[0][0], attention_mask=on_dev[0][1], names_filter=hooks)
    same = all(torch.equal(got[hooks[i]], out.hidden_states[i + 1][rows, cols].to(torch.float16).cpu())
               for i in range(L - 1))  # HF's last hidden state follows the final norm
    rel = max(float((got[h].float() - cache[h][rows, cols].to(torch.float16).float().cpu()).norm()
                    / cache[h][rows, cols].float().norm().clamp_min(1e-12)) for h in hooks)
    report.add("collect", "check: hf_hooks == HF hidden states (fp16, layers 0-30)", note=str(same), equal=same)
    report.add("collect", "check: hf_hooks (sdpa) vs bridge (eager-like), max relative L2 over hooks",
               note=f"{rel:.2e}", relative_error=rel)
    ms_shape = ModelShape.from_hf_config(hf.config, "bfloat16" if loaded.dtype == torch.bfloat16 else "float32")
    plan = forward_bytes(ms_shape, B, T, eager=False, logit_rows=B) + B * T * L * d * 2
    peak = peak_memory(lambda: collector.submit(requests[0]).wait(), device)
    if peak is not None:
        report.add("collect", "peak GPU memory of one hf_hooks batch (GiB) vs memory plan", peak / 2**30,
                   plan / peak, f"plan {plan / 2**30:.2f} GiB", peak_bytes=peak, plan_bytes=plan)
    report.write()


# --------------------------------------------------------------------------------------------
# 2. SAE training
# --------------------------------------------------------------------------------------------


def part_sae(shape: Shape, device: torch.device, report: Report, scratch: Path) -> None:
    from refusal_lens.config import SAEConfig
    from refusal_lens.stages.saes.data import tensor_batches
    from refusal_lens.stages.saes.train import build_training_sae, train_sae

    d_in, n = shape.d_model, shape.sae_batch
    data = torch.randn(16 * n, d_in, generator=torch.Generator().manual_seed(0))
    short, long = shape.sae_steps
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32",)
    per_step = {}
    for precision in precisions:
        runs = {}
        for steps in (short, long):
            cfg = SAEConfig(architecture="topk", expansion_factor=shape.expansion, k=shape.k, train_batch_size_tokens=n,
                            training_tokens=steps * n, device=str(device), precision=precision, log_every=20)
            times = []
            for _ in range(3):  # best of three: one slow draw on a loaded machine does not hide a step's cost
                with torch.random.fork_rng():
                    torch.manual_seed(0)
                    sae = build_training_sae(cfg, d_in, "blocks.16.hook_resid_post", "bench")
                times.append(timed(lambda sae=sae: train_sae(sae, tensor_batches(data, n), cfg, train_rows=len(data),
                                                             log_path=scratch / f"sae-{precision}.jsonl",
                                                             show_progress=False), device))
                del sae
            runs[steps] = min(times)
        step = (runs[long] - runs[short]) / (long - short)
        # the longer run not slower (a step below the timing noise of a loaded machine): the long run's mean step,
        # set-up included, an upper bound, said in the row
        per_step[precision] = (step, "") if step > 0 else (runs[long] / long, "upper bound (set-up included: "
                                                           f"{long} steps took no longer than {short}); ")
    for precision, (s, bound) in per_step.items():
        name = f"TopK {d_in} -> {d_in * shape.expansion} (k {shape.k}), {n}-token batches, {precision}"
        report.add("sae", name, s * 1e3, per_step["fp32"][0] / s,
                   f"{bound}{n / s:,.0f} tok/s; ratio = throughput vs fp32", seconds_per_step=s)
    for precision in ("tf32", "bf16"):
        if precision not in per_step:
            report.add("sae", f"{precision}", note="skipped: needs CUDA")
    report.write()


# --------------------------------------------------------------------------------------------
# 3. One discover batch
# --------------------------------------------------------------------------------------------


def part_discover(loaded, shape: Shape, report: Report) -> None:
    """AtP over every node of 4 SAEs and exact patching of their error nodes, for one batch."""
    from refusal_lens.core.chat import EncodedPrompt
    from refusal_lens.stages.circuits.attribution import Runner
    from refusal_lens.stages.circuits.baselines import ClassMeans
    from refusal_lens.stages.circuits.nodes import NodeSpace
    from refusal_lens.config import SAEConfig
    from refusal_lens.infra.memory_plan import ModelShape, backward_bytes, node_values_bytes, sae_param_count
    from refusal_lens.core.intervene import frozen, make_batch
    from refusal_lens.stages.saes.train import build_training_sae

    device, d, d_sae = loaded.device, shape.d_model, shape.d_model * shape.expansion
    hooks = tuple(hook_name("residuals", layer) for layer in shape.discover_layers)
    cfg = SAEConfig(architecture="topk", expansion_factor=shape.expansion, k=shape.k, device=str(device))
    saes = {h: build_training_sae(cfg, d, h, "bench").eval().requires_grad_(False) for h in hooks}
    space = NodeSpace(hooks, saes, n_post=1)
    n_cls = space.n_post + 2
    means = ClassMeans({h: torch.zeros(n_cls, d_sae, device=device) for h in hooks},
                       {h: torch.zeros(n_cls, d, device=device) for h in hooks}, {h: [] for h in hooks})
    runner = Runner(loaded.model, space, refusal_tokens(loaded), means)
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(100, shape.vocab, (shape.discover_batch, shape.seq), generator=gen).tolist()
    batch = make_batch([EncodedPrompt("", s, 1, False, 1) for s in seqs], list(range(len(seqs))),
                       loaded.tokenizer.pad_token_id, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with frozen(loaded.model):
        t0 = time.perf_counter()
        m, values = runner.clean(batch)
        sync(device)
        t_clean = time.perf_counter() - t0
        effects = {}
        t_atp = timed(lambda: effects.update(atp=runner.atp(batch, values)), device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        t_err = timed(lambda: effects.update(exact=runner.exact_errors(batch, m)), device)
    eff = effects["exact"]
    report.add("discover", "clean pass (node values)", t_clean * 1e3)
    report.add("discover", f"AtP, all {space.n_features + len(hooks):,} nodes (1 forward + 1 backward)", t_atp * 1e3)
    report.add("discover", f"exact error nodes ({len(hooks)} forward passes)", t_err * 1e3)
    report.add("discover", f"one batch ({len(seqs)} x {shape.seq} tokens)", (t_clean + t_atp + t_err) * 1e3,
               note=f"effects {tuple(eff.shape)}, finite: {bool(torch.isfinite(eff).all())}")
    if peak is not None:
        ms_shape = ModelShape.from_hf_config(loaded.hf_model.config, "bfloat16")
        n = len(seqs) * shape.seq
        plan = (ms_shape.weight_bytes + len(hooks) * 4 * sae_param_count(d, d_sae, "topk")
                + node_values_bytes(ms_shape, n, d_sae, len(hooks))
                + backward_bytes(ms_shape, len(seqs), shape.seq, shape.n_layers - min(shape.discover_layers) - 1,
                                 len(hooks)))
        report.add("discover", "peak GPU memory through AtP (GiB) vs memory plan", peak / 2**30, plan / peak,
                   f"plan {plan / 2**30:.2f} GiB (weights, SAEs, node values, backward)", peak_bytes=peak,
                   plan_bytes=plan)
    report.write()


# --------------------------------------------------------------------------------------------
# 4. The pipeline, as a smoke run
# --------------------------------------------------------------------------------------------


def pipeline_overrides(shape: Shape, model_dir: Path, results: Path, device: torch.device, tiny: bool) -> list[str]:
    from refusal_lens.data.prompts import read_prompts

    categories = sorted({p.category for p in read_prompts(None)})[:8]  # 8 categories x 2 labels x 4 = 64 prompts
    sets = {
        "model.name": str(model_dir), "data.path": None, "data.categories": categories,
        "data.max_samples_per_category": 4, "output.result_dir": str(results), "output.run_name": "smoke",
        "inference.batch_size": 16, "sae.hooks": ["residuals_15-16"], "sae.training_tokens": shape.pipeline_sae_tokens,
        "sae.train_batch_size_tokens": shape.sae_batch, "sae.eval_prompts": 8, "sae.lr_decay_steps": 0,
        "circuits.select": "all", "direction.keep": "all",  # random weights refuse nothing
        "circuits.ig_steps": 2, "circuits.top_k": 10, "circuits.agreement_prompts": 4, "circuits.agreement_nodes": 4,
        "circuits.faithfulness_sizes": [10, 50], "circuits.faithfulness_prompts": 8, "circuits.random_controls": 1,
        "circuits.behaviour_prompts": 4, "circuits.bootstrap": 100, "circuits.edge_prompts": 4,
        "circuits.hooks": ["residuals_15-16"],  # whether or not the SAEs pass the quality bar
        "direction.exact_candidates": 4, "direction.selection_prompts": 8, "direction.random_directions": 2,
        "direction.random_prompts": 4, "direction.bootstrap": 100, "direction.emergence_stride": 4,
        "analysis.permutations": 100, "analysis.interval_draws": 50, "analysis.check_render": False,
    }
    if device.type != "cuda":
        sets.update({"model.device": "cpu", "model.torch_dtype": "float32", "sae.device": "cpu"})
    if tiny:  # shorter prompts too: the CPU runs every pass of the discover stage
        sets.update({"sae.expansion_factor": shape.expansion, "sae.k": shape.k, "inference.max_new_tokens": 4,
                     "inference.max_prompt_tokens": 48})
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def save_model(loaded, folder: Path, report: Report) -> None:
    t0 = time.perf_counter()
    loaded.hf_model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    report.add("pipeline", "save the random model to disk", (time.perf_counter() - t0) * 1e3)


def part_pipeline(model_dir: Path, shape: Shape, device: torch.device, report: Report, scratch: Path,
                  timeout_s: float, tiny: bool) -> None:
    results = scratch / "results"
    cmd = [sys.executable, "-m", "refusal_lens", "run", "--config", str(ROOT / "configs/pipelines/llama2_7b_gpu.yaml"),
           *pipeline_overrides(shape, model_dir, results, device, tiny)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout_s, 30), cwd=ROOT)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        log = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (err.stdout, err.stderr))
    wall = time.perf_counter() - t0
    out = report.folder / "pipeline"
    out.mkdir(exist_ok=True)
    (out / "log.txt").write_text(log[-200_000:])
    from refusal_lens.run.folder import RunFolder

    run = RunFolder(results / "smoke")  # output.run_name=smoke (pipeline_overrides)
    paths = run.paths
    for path in (run.status_file, paths.activations.rates_json, paths.saes.quality_json, paths.circuits.summary,
                 paths.analysis.summary):
        if path.is_file():
            shutil.copy(path, out / "__".join(path.relative_to(run.root).parts))
    stages = json.loads(run.status_file.read_text())["stages"] if run.status_file.is_file() else []
    for stage in stages:
        report.add("pipeline", f"stage {stage['name']}", (stage.get("elapsed_s") or 0) * 1e3, note=stage["state"])
    report.add("pipeline", "refusal-lens run (subprocess, 64 prompts)", wall * 1e3,
               note=f"exit {rc}" + ("" if rc == 0 else f"; see pipeline/log.txt: {log.strip().splitlines()[-1:]}"),
               returncode=rc, command=cmd)
    report.write()


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for bench_gpu.json and the pipeline's summaries")
    ap.add_argument("--tiny", "--smoke", dest="tiny", action="store_true",
                    help="tiny shapes (CPU check of the script); --smoke is the same flag as every bench's")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--scratch", type=Path, help="scratch folder (model, shards, pipeline results); default: a "
                                                  "temporary folder, removed at the end")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the pipeline part gets what is left of this")
    args = ap.parse_args(argv)
    asked = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(asked) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; allowed: {','.join(PARTS)}")
    parts = [p for p in PARTS if p in asked]  # in this order: the pipeline last, after the model is freed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        ap.error("no CUDA device: the full shapes need a GPU; use --tiny to check the script on the CPU")
    shape = TINY if args.tiny else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start = time.perf_counter()
    import transformers

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "shape": asdict(shape), "dtype": str(dtype), "parts": parts,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report = Report(args.out, meta)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        loaded = None
        if {"collect", "discover", "pipeline"} & set(parts):
            t0 = time.perf_counter()
            loaded = build_model(shape, device, dtype, scratch / "tokenizer")
            report.add("setup", "random model built on the device + bridge booted", (time.perf_counter() - t0) * 1e3)
        for part in parts:
            t0 = time.perf_counter()
            try:
                if part == "collect":
                    part_collect(loaded, shape, report, scratch)
                elif part == "sae":
                    part_sae(shape, device, report, scratch)
                elif part == "discover":
                    part_discover(loaded, shape, report)
                else:
                    save_model(loaded, scratch / "model", report)
                    loaded = None  # the subprocess loads its own copy: free this one's device memory
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    left = args.budget_s - (time.perf_counter() - t_start)
                    part_pipeline(scratch / "model", shape, device, report, scratch, left, args.tiny)
            except Exception as err:  # noqa: BLE001 (a failed part must not lose the others' numbers)
                report.add(part, "FAILED", note=f"{type(err).__name__}: {err}"[:500])
                report.write()
                import traceback

                traceback.print_exc()
            report.add(part, "part wall time", (time.perf_counter() - t0) * 1e3)
            report.write()
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report.doc["meta"]["total_s"] = time.perf_counter() - t_start
    report.write()
    print(f"\n## bench_gpu ({meta['device']}, {'tiny' if args.tiny else 'full'} shapes, total "
          f"{report.doc['meta']['total_s']:.0f} s)\n")
    print(report.table())
    return 0 if not any(v == "FAILED" for _, v, *_ in report.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
