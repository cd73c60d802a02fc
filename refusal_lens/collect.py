"""Stage 1, collect: responses, refusal judgements and activations of every prompt.

For each batch of chat-formatted prompts:

1. responses are generated greedily with the untouched HF model (``inference.max_new_tokens``) and
   judged by the keyword rule (:mod:`refusal_lens.refusal`);
2. one plain forward pass through ``inference.collector`` (``run_with_cache``, or hooks on the HF modules
   under the same hook names: :mod:`refusal_lens.activations.collector`) with an explicit
   attention mask (never inside ``generate``) gives the activations and, at the last prompt token,
   the refusal score (logits of the first response position);
3. the kept positions (``last``, ``all`` or ``post_instruction``; padding never) are appended to
   per-hook Arrow buffers, written as shard files once ``inference.shard_mb`` is reached.

Output folder (``activations/``): ``prompts/`` (one row per prompt with its response and judgement),
one dataset per hook (:mod:`refusal_lens.activations.store`), ``manifest.json``, ``config.yaml``,
``refusal_rates.json`` / ``.csv``. Progress is committed shard by shard in ``progress/rank-*.json``:
kill the process at any moment and the same command resumes after the last committed shard (files of
an uncommitted shard are deleted first), giving the same rows as an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from refusal_lens.activations.collector import CollectRequest, make_collector
from refusal_lens.activations.store import (
    STORAGE_TORCH,
    finalize_dataset,
    hook_features,
    hook_record_batch,
    to_storage,
    write_arrow_file,
)
from refusal_lens.chat import EncodedPrompt, encode_prompt, left_pad, render
from refusal_lens.config import Config, InferenceConfig, config_to_dict, dump_config
from refusal_lens.distributed import Dist
from refusal_lens.errors import UserError
from refusal_lens.estimate import estimate_for_config, measure_hook_widths
from refusal_lens.hooks import resolve_hooks
from refusal_lens.models.loading import LoadedModel
from refusal_lens.prompts import Prompt
from refusal_lens.refusal import RefusalTokens, build_refusal_tokens, is_refusal, refusal_score
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)

PROMPTS_DIR = "prompts"
MANIFEST = "manifest.json"


class ResultsMismatchError(UserError, RuntimeError):
    """A results folder written with a different config (never silently mixed)."""


def prompt_features():
    from datasets import Features, Value

    return Features(
        {
            "prompt_id": Value("string"),
            "prompt": Value("string"),
            "category": Value("string"),
            "label": Value("string"),
            "source": Value("string"),
            "response": Value("string"),
            "refused": Value("bool"),
            "refusal_score": Value("float32"),
            "n_prompt_tokens": Value("int32"),
            "n_response_tokens": Value("int32"),
            "truncated": Value("bool"),
        }
    )


@dataclass
class CollectStats:
    prompts: int = 0
    forward_tokens: int = 0
    generated_tokens: int = 0
    bytes_written: int = 0
    generate_s: float = 0.0
    forward_s: float = 0.0
    write_s: float = 0.0
    batch_size_final: int = 0

    def add(self, other: CollectStats) -> None:
        for f in ("prompts", "forward_tokens", "generated_tokens", "bytes_written"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for f in ("generate_s", "forward_s", "write_s"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class CollectResult:
    folder: Path
    hooks: list[str]
    n_prompts: int
    rates: list[dict]
    skipped: bool = False
    stats: CollectStats = field(default_factory=CollectStats)


# --------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------


@dataclass
class BatchOutput:
    """Everything a batch produced, before it is written."""

    prompt_rows: list[dict]
    hook_values: dict[str, np.ndarray]  # hook -> [n_positions, width] in the storage dtype
    token_ids: np.ndarray
    meta: dict[str, list]
    stats: CollectStats


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = loaded.hf_model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


def hf_generate(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation with the untouched HF model (KV cache); the new tokens ``[batch, new]``."""
    with torch.no_grad():
        out = loaded.hf_model.generate(
            input_ids=ids.to(loaded.device),
            attention_mask=mask.to(loaded.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return out[:, ids.shape[1] :]


def generate_responses(loaded: LoadedModel, encoded: Sequence[EncodedPrompt], max_new_tokens: int) -> list[list[int]]:
    """Greedy responses (token ids up to, not including, the first end-of-sequence token)."""
    ids, mask = left_pad([e.ids for e in encoded], loaded.tokenizer.pad_token_id)
    new = hf_generate(loaded, ids, mask, max_new_tokens).tolist()
    eos = _eos_ids(loaded)
    responses = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        responses.append(row[:cut])
    return responses


def positions_to_keep(mode: str, n_prompt: int, n_post: int, n_response: int, with_response: bool) -> list[int]:
    """Indices into one unpadded sequence (prompt then response) to store."""
    if mode == "last":
        keep = [n_prompt - 1]
    elif mode == "post_instruction":
        keep = list(range(n_prompt - n_post, n_prompt))
    else:
        keep = list(range(n_prompt))
    if with_response:
        keep += list(range(n_prompt, n_prompt + n_response))
    return keep


def forward_and_extract(
    loaded: LoadedModel,
    prompts: Sequence[Prompt],
    encoded: Sequence[EncodedPrompt],
    responses: Sequence[Sequence[int]],
    hooks: Sequence[str],
    inf: InferenceConfig,
    tokens: RefusalTokens,
) -> tuple[list[float], dict[str, np.ndarray], np.ndarray, dict[str, list], int]:
    """One plain forward pass through the ``inference.collector`` (:mod:`refusal_lens.activations.collector`);
    the kept positions of every hook, and the refusal score at the first response position. Returns
    (scores, hook values, token ids, row metadata, tokens)."""
    with_response = inf.store_response_activations and inf.save_activations
    seqs = [e.ids + (list(r) if with_response else []) for e, r in zip(encoded, responses)]
    ids, mask = left_pad(seqs, loaded.tokenizer.pad_token_id)
    width = ids.shape[1]
    rows, cols, meta = [], [], defaultdict(list)
    last_prompt_cols = []
    for b, (p, e, r, seq) in enumerate(zip(prompts, encoded, responses, seqs)):
        offset = width - len(seq)
        last_prompt_cols.append(offset + len(e.ids) - 1)
        if not inf.save_activations:
            continue
        keep = positions_to_keep(inf.positions, len(e.ids), e.n_post_instruction, len(r), with_response)
        rows += [b] * len(keep)
        cols += [offset + k for k in keep]
        meta["prompt_id"] += [p.id] * len(keep)
        meta["position"] += keep
        meta["is_response"] += [k >= len(e.ids) for k in keep]
        meta["category"] += [p.category] * len(keep)
        meta["label"] += [p.label] * len(keep)
    row_t, col_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    stored = tuple(hooks) if rows else ()
    request = CollectRequest(ids, mask, stored, row_t, col_t, torch.tensor(last_prompt_cols),
                             STORAGE_TORCH[inf.storage_dtype])
    out = make_collector(loaded, inf.collector, stored).submit(request).wait()
    scores = refusal_score(out.logits, tokens).cpu().tolist()
    values = {h: to_storage(out.values[h], inf.storage_dtype) for h in stored}
    token_ids = ids[row_t, col_t].numpy() if rows else np.zeros(0, dtype=np.int64)
    return scores, values, token_ids, dict(meta), int(mask.sum())


def process_batch(
    loaded: LoadedModel,
    prompts: Sequence[Prompt],
    encoded: Sequence[EncodedPrompt],
    hooks: Sequence[str],
    cfg: Config,
    tokens: RefusalTokens,
) -> BatchOutput:
    """Generate and judge the responses of a batch, then collect its activations."""
    inf = cfg.inference
    stats = CollectStats(prompts=len(prompts))
    t0 = time.perf_counter()
    responses = generate_responses(loaded, encoded, inf.max_new_tokens)
    stats.generate_s = time.perf_counter() - t0
    stats.generated_tokens = sum(len(r) for r in responses)
    texts = loaded.tokenizer.batch_decode(responses, skip_special_tokens=True)
    refused = [is_refusal(t) for t in texts]
    t0 = time.perf_counter()
    scores, values, token_ids, meta, n_tokens = forward_and_extract(
        loaded, prompts, encoded, responses, hooks, inf, tokens
    )
    stats.forward_s = time.perf_counter() - t0
    stats.forward_tokens = n_tokens
    by_prompt = {p.id: b for b, p in enumerate(prompts)}
    meta["refused"] = [refused[by_prompt[pid]] for pid in meta.get("prompt_id", [])]
    meta["refusal_score"] = [scores[by_prompt[pid]] for pid in meta.get("prompt_id", [])]
    prompt_rows = [
        {
            "prompt_id": p.id,
            "prompt": p.prompt,
            "category": p.category,
            "label": p.label,
            "source": p.source,
            "response": text,
            "refused": ref,
            "refusal_score": score,
            "n_prompt_tokens": len(e.ids),
            "n_response_tokens": len(r),
            "truncated": e.truncated,
        }
        for p, e, r, text, ref, score in zip(prompts, encoded, responses, texts, refused, scores)
    ]
    return BatchOutput(prompt_rows, values, token_ids, meta, stats)


# --------------------------------------------------------------------------------------------
# Shards and progress
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Buffers batch outputs and writes them as one shard per hook once ``shard_bytes`` is reached."""

    def __init__(self, folder: Path, hooks: Sequence[str], widths: dict[str, int], storage_dtype: str, rank: int,
                 shard_bytes: int):
        self.folder, self.hooks, self.rank, self.shard_bytes = folder, list(hooks), rank, shard_bytes
        self.features = {h: hook_features(h, widths[h], storage_dtype) for h in hooks}
        self.prompt_features = prompt_features()
        self.progress_path = folder / "progress" / f"rank-{rank:03d}.json"
        self.progress = json.loads(self.progress_path.read_text()) if self.progress_path.is_file() else {"shards": []}
        self._reset()

    def _reset(self) -> None:
        self.buffers: dict[str, list[pa.RecordBatch]] = {h: [] for h in self.hooks}
        self.prompt_rows: list[dict] = []
        self.buffered = 0

    @property
    def next_prompt(self) -> int:
        """Index (in this rank's block) of the first prompt not yet committed."""
        return self.progress["shards"][-1]["end"] if self.progress["shards"] else 0

    def committed_files(self) -> set[str]:
        return {f for s in self.progress["shards"] for f in s["files"]}

    def remove_uncommitted(self) -> int:
        """Delete shard files of this rank that no committed shard lists (an interrupted write)."""
        keep, removed = self.committed_files(), 0
        prefix = f"shard-{self.rank:03d}-"
        for sub in [PROMPTS_DIR, *self.hooks]:
            d = self.folder / sub
            if not d.is_dir():
                continue
            for path in d.iterdir():
                if path.name.startswith(prefix) and f"{sub}/{path.name}" not in keep:
                    path.unlink()
                    removed += 1
        return removed

    def add(self, out: BatchOutput) -> None:
        self.prompt_rows += out.prompt_rows
        for h in self.hooks if out.hook_values else []:
            batch = hook_record_batch(self.features[h], h, out.hook_values[h], out.token_ids, out.meta)
            self.buffers[h].append(batch)
            self.buffered += batch.nbytes

    def full(self) -> bool:
        return self.buffered >= self.shard_bytes

    def flush(self, start: int, end: int) -> int:
        """Write the buffered rows (prompts ``start``..``end`` of this rank) and commit them."""
        if not self.prompt_rows:
            return 0
        index = len(self.progress["shards"])
        name = f"shard-{self.rank:03d}-{index:05d}.arrow"
        files, written = [], 0
        for h in self.hooks:
            if not self.buffers[h]:
                continue
            (self.folder / h).mkdir(parents=True, exist_ok=True)
            written += write_arrow_file(self.folder / h / name, self.buffers[h], self.features[h].arrow_schema)
            files.append(f"{h}/{name}")
        (self.folder / PROMPTS_DIR).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self.prompt_rows, schema=self.prompt_features.arrow_schema)
        written += write_arrow_file(self.folder / PROMPTS_DIR / name, table.to_batches(), table.schema)
        files.append(f"{PROMPTS_DIR}/{name}")
        self.progress["shards"].append({"index": index, "start": start, "end": end, "files": files})
        self.progress_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.progress, indent=1))
        tmp.replace(self.progress_path)  # the commit point of the shard
        self._reset()
        return written


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def fingerprint(cfg: Config, hooks: Sequence[str], world: int) -> str:
    """What makes two collections the same: model, data and inference settings that change rows."""
    inf = config_to_dict(cfg.inference)
    inf.pop("batch_size")  # batching does not change what is stored
    inf.pop("shard_mb")
    inf.pop("collector")  # nor does the collector (values equal up to float rounding, as across batch sizes)
    blob = json.dumps(
        {"model": config_to_dict(cfg.model), "data": config_to_dict(cfg.data), "inference": inf,
         "hooks": list(hooks), "world": world},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _prepare_folder(folder: Path, fp: str, cfg: Config, force: bool, dist: Dist) -> dict | None:
    """Check or create the results folder; returns the manifest of a finished collection, if any."""
    manifest_path = folder / MANIFEST
    if force and dist.is_main and folder.exists():
        shutil.rmtree(folder)
    dist.barrier()
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") != fp:
            old = manifest.get("config", {})
            new = config_to_dict(cfg)
            diffs = [
                f"{s}.{k}" for s in new for k in new[s] if isinstance(new[s], dict) and old.get(s, {}).get(k) != new[s][k]
            ]
            raise ResultsMismatchError(
                f"{folder} holds activations collected with a different config (differs in: "
                f"{', '.join(diffs) or 'hooks or number of processes'}); rerun with --force to replace them, "
                "or set output.run_name to write elsewhere"
            )
        if manifest.get("status") == "complete":
            return manifest
    elif folder.exists() and any(folder.iterdir()):
        raise ResultsMismatchError(
            f"{folder} exists, is not empty and has no {MANIFEST}: not a refusal_lens activations folder; "
            "choose another output.run_name or remove it (--force replaces it)"
        )
    dist.barrier()
    if dist.is_main and not manifest_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(dump_config(cfg))
        manifest_path.write_text(
            json.dumps({"fingerprint": fp, "status": "running", "world": dist.world, "config": config_to_dict(cfg)}, indent=2)
        )
    dist.barrier()
    return None


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with: the chat template's fixed opening (e.g. Qwen's default system
    prompt). Their activations are identical across prompts; the SAE stage can leave them out."""
    if len(sequences) < 2:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def refusal_rates(prompt_rows: Sequence[dict]) -> list[dict]:
    """Refusal rate per category and label (safe: over-refusal; toxic: correct refusal), plus totals."""
    groups: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for row in prompt_rows:
        groups[(row["category"], row["label"])].append(bool(row["refused"]))
        groups[("ALL", row["label"])].append(bool(row["refused"]))
    out = []
    for (category, label), refused in sorted(groups.items(), key=lambda kv: (kv[0][0] == "ALL", kv[0])):
        out.append({"category": category, "label": label, "n": len(refused), "refused": sum(refused),
                    "rate": sum(refused) / len(refused)})
    return out


def format_rates(rates: Sequence[dict]) -> str:
    """A plain-text table: category x (safe over-refusal, toxic refusal)."""
    labels = sorted({r["label"] for r in rates})
    cats = list(dict.fromkeys(r["category"] for r in rates))
    cell = {(r["category"], r["label"]): r for r in rates}
    head = f"{'category':<12}" + "".join(f"{lab + ' refused':>22}" for lab in labels)
    lines = [head, "-" * len(head)]
    for c in cats:
        parts = []
        for lab in labels:
            r = cell.get((c, lab))
            parts.append(f"{'-':>22}" if r is None else f"{r['refused']:>5}/{r['n']:<4} ({r['rate']:6.1%})".rjust(22))
        lines.append(f"{c:<12}" + "".join(parts))
    return "\n".join(lines)


def _finalize(folder: Path, hooks: Sequence[str], writer: ShardWriter, widths: dict[str, int], cfg: Config,
              world: int) -> list[dict]:
    shards = []
    for r in range(world):
        path = folder / "progress" / f"rank-{r:03d}.json"
        shards += [(r, s) for s in json.loads(path.read_text())["shards"]]
    shards.sort(key=lambda rs: (rs[0], rs[1]["index"]))
    files = [f for _, s in shards for f in s["files"]]
    import datasets

    def files_of(sub: str) -> list[str]:
        return [f.split("/", 1)[1] for f in files if f.split("/", 1)[0] == sub]

    finalize_dataset(folder / PROMPTS_DIR, writer.prompt_features, files_of(PROMPTS_DIR))
    if cfg.inference.save_activations:
        for h in hooks:
            finalize_dataset(
                folder / h, writer.features[h], files_of(h),
                {"hook": h, "storage_dtype": cfg.inference.storage_dtype, "width": widths[h],
                 "positions": cfg.inference.positions,
                 "store_response_activations": cfg.inference.store_response_activations},
            )
    rows = datasets.load_from_disk(str(folder / PROMPTS_DIR)).to_list()
    rates = refusal_rates(rows)
    (folder / "refusal_rates.json").write_text(json.dumps(rates, indent=2))
    with (folder / "refusal_rates.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["category", "label", "n", "refused", "rate"])
        w.writeheader()
        w.writerows(rates)
    return rates


def _initial_batch_size(cfg: Config, device: torch.device) -> int:
    if isinstance(cfg.inference.batch_size, int):
        return cfg.inference.batch_size
    return 64 if device.type == "cuda" else 8


def collect(
    loaded: LoadedModel,
    prompts: Sequence[Prompt],
    cfg: Config,
    folder: Path,
    *,
    force: bool = False,
    dist: Dist = Dist(),
    show_progress: bool = True,
    status: StatusFile | None = None,
) -> CollectResult:
    """Run the collect stage into ``folder``; resumes a partial run, skips a finished one.

    ``status`` gets the prompts done of this rank's block per batch, and the refusal rates once known."""
    folder = Path(folder)
    status = status if status is not None else StatusFile(None)
    hooks = resolve_hooks(loaded.model, cfg.model.activation_layers)
    fp = fingerprint(cfg, hooks, dist.world)
    done = _prepare_folder(folder, fp, cfg, force, dist)
    if done is not None:
        rates = json.loads((folder / "refusal_rates.json").read_text())
        logger.info("collect: %s is complete (--force to redo)", folder)
        status.progress(done["n_prompts"], done["n_prompts"], "prompt")
        status.set(rates=rates)
        return CollectResult(folder, hooks, done["n_prompts"], rates, skipped=True)

    inf = cfg.inference
    encoded_all = [encode_prompt(loaded.tokenizer, p.prompt, inf.max_prompt_tokens) for p in prompts]
    n_trunc = sum(e.truncated for e in encoded_all)
    if n_trunc:
        logger.warning("%d prompt(s) longer than inference.max_prompt_tokens=%d were cut", n_trunc, inf.max_prompt_tokens)
    mean_len = sum(len(e.ids) for e in encoded_all) / max(len(encoded_all), 1)
    widths = measure_hook_widths(loaded.model, hooks)
    estimate = estimate_for_config(widths, inf, cfg.model.torch_dtype, mean_len)
    for line in estimate.lines():
        logger.info("estimate: %s", line)
    tokens = build_refusal_tokens(
        loaded.tokenizer, render(loaded.tokenizer, "Hello"), loaded.family.refusal_words, loaded.family.compliance_words
    )
    start, mine = dist.block(list(range(len(prompts))))
    writer = ShardWriter(folder, hooks, widths, inf.storage_dtype, dist.rank, inf.shard_mb << 20)
    removed = writer.remove_uncommitted()
    if removed:
        logger.info("collect: removed %d file(s) of an interrupted shard", removed)
    done_n = writer.next_prompt
    if done_n:
        logger.info("collect: resuming rank %d at prompt %d of %d", dist.rank, done_n, len(mine))

    stats = CollectStats()
    batch_size = _initial_batch_size(cfg, loaded.device)
    shard_start = done_n
    bar = tqdm(total=len(mine), initial=done_n, unit="prompt", desc=f"collect[{dist.rank}]",
               disable=not show_progress or not dist.is_main)
    if dist.world > 1:
        status.set(message=f"collect progress counts rank 0's block: {len(mine)} of {len(prompts)} prompts")
    status.progress(done_n, len(mine), "prompt", initial=done_n)
    t_start = time.perf_counter()
    i = done_n
    while i < len(mine):
        idx = mine[i : i + batch_size]
        try:
            out = process_batch(loaded, [prompts[j] for j in idx], [encoded_all[j] for j in idx], hooks, cfg, tokens)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            logger.warning("out of memory: batch size halved to %d", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        t0 = time.perf_counter()
        writer.add(out)
        i += len(idx)
        if writer.full():
            out.stats.bytes_written += writer.flush(shard_start, i)
            shard_start = i
        out.stats.write_s = time.perf_counter() - t0
        stats.add(out.stats)
        bar.update(len(idx))
        elapsed = time.perf_counter() - t_start
        bar.set_postfix(prompts_s=f"{stats.prompts / elapsed:.2f}", tok_s=f"{stats.forward_tokens / elapsed:.0f}")
        status.progress(i, len(mine))
    t0 = time.perf_counter()
    stats.bytes_written += writer.flush(shard_start, len(mine))
    stats.write_s += time.perf_counter() - t0
    stats.batch_size_final = batch_size
    bar.close()

    dist.barrier()
    rates: list[dict] = []
    if dist.is_main:
        rates = _finalize(folder, hooks, writer, widths, cfg, dist.world)
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest.update(
            status="complete", n_prompts=len(prompts), n_layers=loaded.n_layers, hooks=list(hooks), widths=widths,
            template_prefix_tokens=shared_prefix_length([e.ids for e in encoded_all]),
            refusal_tokens=tokens.to_dict(), estimate=estimate.to_dict(),
            versions=_versions(), stats_rank0=asdict(stats),
        )
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        status.progress(len(prompts), len(prompts), "prompt")
        status.set(rates=rates)
    dist.barrier()
    if not dist.is_main:
        rates = json.loads((folder / "refusal_rates.json").read_text())
    return CollectResult(folder, hooks, len(prompts), rates, stats=stats)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("refusal-lens", "torch", "transformers", "transformer-lens", "sae-lens", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
