"""Stage 1, collect: responses, refusal judgements and activations of every prompt.

The prompts are OR-Bench's (``safe``, ``toxic``) and the harmless contrast set (``harmless``). Two passes:

1. **Responses**: greedy responses of every prompt (``inference.max_new_tokens``, on
   ``loaded.gen_model``), judged ``refused`` / ``complied`` / ``incoherent`` (:mod:`refusal_lens.judge`),
   committed batch by batch in ``responses/``.
2. **The split and the refusal tokens**, once every response is judged: each prompt goes to
   ``discovery`` / ``validation`` / ``test`` (:mod:`refusal_lens.splits`, stratified by label x category x
   refused), and the refusal score's token set is learned from the *discovery* responses
   (:func:`refusal_lens.refusal.learn_refusal_tokens`).
3. **Activations**: one plain forward pass per batch through ``inference.collector``
   (``run_with_cache``, or hooks on the HF modules under the same hook names:
   :mod:`refusal_lens.activations.collector`), with an explicit attention mask (never inside ``generate``), on the prompt and (optionally) its
   response; it gives the activations and, at the last prompt token, the refusal score. The kept
   positions (``last``, ``all`` or ``post_instruction``; padding never) are appended to per-hook Arrow
   buffers, written as shard files once ``inference.shard_mb`` is reached.

Output folder (``activations/``): ``prompts/`` (one row per prompt: response, outcome, judge rule, split,
refusal score), one dataset per hook (:mod:`refusal_lens.activations.store`), ``split.json``,
``manifest.json`` (with the refusal tokens), ``config.yaml``, ``refusal_rates.json`` / ``.csv``. Progress is
committed batch by batch (responses) and shard by shard (activations, ``progress/rank-*.json``): kill the
process at any moment and the same command resumes after the last committed batch or shard (files of an
uncommitted shard are deleted first), giving the same rows as an uninterrupted run. Every file is
written durably (:mod:`refusal_lens.durable`) and each committed shard lists the size and SHA-256 of
its files: a resume checks them and redoes a damaged shard and the ones after it; a finished
collection checks the sizes before it is skipped.
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

from refusal_lens import durable
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
from refusal_lens.intervene import Intervener
from refusal_lens.judge import judge
from refusal_lens.config import Config, InferenceConfig, config_to_dict, dump_config
from refusal_lens.distributed import Dist
from refusal_lens.errors import UserError
from refusal_lens.estimate import estimate_for_config, measure_hook_widths
from refusal_lens.hooks import resolve_hooks
from refusal_lens.models.loading import LoadedModel
from refusal_lens.prompts import Prompt
from refusal_lens.refusal import RefusalTokens, auroc, family_refusal_tokens, learn_refusal_tokens, refusal_score
from refusal_lens.splits import SPLITS, assign_splits, split_counts
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)

PROMPTS_DIR = "prompts"
RESPONSES_DIR = "responses"
MANIFEST = "manifest.json"
SPLIT_FILE = "split.json"


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
            "outcome": Value("string"),
            "judge_rule": Value("string"),
            "refused": Value("bool"),
            "split": Value("string"),
            "refusal_score": Value("float32"),
            "n_prompt_tokens": Value("int32"),
            "n_response_tokens": Value("int32"),
            "truncated": Value("bool"),
            "n_opening_tokens": Value("int32"),
            "n_post_instruction_tokens": Value("int32"),
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


@dataclass
class Judged:
    """The response of one prompt and its judgement (pass 1)."""

    index: int  # position in the stage's prompt list
    prompt_id: str
    response_ids: list[int]
    response: str
    outcome: str
    rule: str

    @property
    def refused(self) -> bool:
        return self.outcome == "refused"


class ResponseLog:
    """Pass 1's commits: one JSON file per batch of judged responses of this rank, written atomically."""

    def __init__(self, folder: Path, rank: int):
        self.folder = folder / RESPONSES_DIR
        self.rank = rank

    def files(self, rank: int | None = None) -> list[Path]:
        pattern = f"rank-{self.rank if rank is None else rank:03d}-*.json"
        return sorted(self.folder.glob(pattern)) if self.folder.is_dir() else []

    def read(self, rank: int | None = None) -> list[Judged]:
        out = []
        for path in self.files(rank):
            out += [Judged(**row) for row in json.loads(path.read_text())]
        return out

    def commit(self, judged: Sequence[Judged]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        durable.write_json(self.folder / f"rank-{self.rank:03d}-{len(self.files()):05d}.json",
                           [asdict(j) for j in judged], indent=None)


def judge_batch(intervener: Intervener, indices: Sequence[int], prompts: Sequence[Prompt],
                encoded: Sequence[EncodedPrompt], max_new_tokens: int) -> list[Judged]:
    """Greedy responses of the given prompts, judged."""
    responses = intervener.generate([encoded[i] for i in indices], max_new_tokens)
    texts = intervener.decode(responses)
    out = []
    for i, ids, text in zip(indices, responses, texts):
        j = judge(text)
        out.append(Judged(i, prompts[i].id, list(ids), text, j.outcome, j.rule))
    return out


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
    out = make_collector(loaded, inf.collector, stored, inf.activation_model).submit(request).wait()
    scores = refusal_score(out.logits, tokens).cpu().tolist()
    values = {h: to_storage(out.values[h], inf.storage_dtype) for h in stored}
    token_ids = ids[row_t, col_t].numpy() if rows else np.zeros(0, dtype=np.int64)
    return scores, values, token_ids, dict(meta), int(mask.sum())


def process_batch(
    loaded: LoadedModel,
    prompts: Sequence[Prompt],
    encoded: Sequence[EncodedPrompt],
    judged: Sequence[Judged],
    splits: dict[str, str],
    hooks: Sequence[str],
    cfg: Config,
    tokens: RefusalTokens,
) -> BatchOutput:
    """Collect the activations and refusal scores of a batch of judged prompts (pass 3)."""
    inf = cfg.inference
    stats = CollectStats(prompts=len(prompts), generated_tokens=sum(len(j.response_ids) for j in judged))
    responses = [j.response_ids for j in judged]
    t0 = time.perf_counter()
    scores, values, token_ids, meta, n_tokens = forward_and_extract(
        loaded, prompts, encoded, responses, hooks, inf, tokens
    )
    stats.forward_s = time.perf_counter() - t0
    stats.forward_tokens = n_tokens
    by_prompt = {p.id: b for b, p in enumerate(prompts)}
    meta["refused"] = [judged[by_prompt[pid]].refused for pid in meta.get("prompt_id", [])]
    meta["refusal_score"] = [scores[by_prompt[pid]] for pid in meta.get("prompt_id", [])]
    prompt_rows = [
        {
            "prompt_id": p.id,
            "prompt": p.prompt,
            "category": p.category,
            "label": p.label,
            "source": p.source,
            "response": j.response,
            "outcome": j.outcome,
            "judge_rule": j.rule,
            "refused": j.refused,
            "split": splits[p.id],
            "refusal_score": score,
            "n_prompt_tokens": len(e.ids),
            "n_response_tokens": len(j.response_ids),
            "truncated": e.truncated,
            "n_opening_tokens": e.n_opening,
            "n_post_instruction_tokens": e.n_post_instruction,
        }
        for p, e, j, score in zip(prompts, encoded, judged, scores)
    ]
    return BatchOutput(prompt_rows, values, token_ids, meta, stats)


# --------------------------------------------------------------------------------------------
# Shards and progress
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Buffers batch outputs and writes them as one shard per hook once ``shard_bytes`` is reached.

    ``bytes_per_prompt`` (the storage estimate) and ``n_prompts`` (this rank's block) size the free-space
    check made before each shard: the rest of the block must fit (:func:`refusal_lens.durable.space_for`)."""

    def __init__(self, folder: Path, hooks: Sequence[str], widths: dict[str, int], storage_dtype: str, rank: int,
                 shard_bytes: int, *, bytes_per_prompt: float = 0.0, n_prompts: int = 0):
        self.folder, self.hooks, self.rank, self.shard_bytes = folder, list(hooks), rank, shard_bytes
        self.bytes_per_prompt, self.n_prompts = bytes_per_prompt, n_prompts
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

    def verify(self, *, full: bool = True) -> int:
        """Check the committed shards' files against their recorded size and SHA-256 (``full=False``: the
        size); drop the first damaged shard and every later one from the progress (they are redone).
        Returns how many shards were dropped."""
        shards = self.progress["shards"]
        for k, shard in enumerate(shards):
            records = shard.get("records", {})
            bad = [(f, why) for f in shard["files"]
                   if (why := durable.check(self.folder / f, records.get(f), full=full)) is not None]
            if bad:
                logger.warning("collect: rank %d shard %d is damaged (%s): it and the %d shard(s) after it are redone",
                               self.rank, shard["index"], "; ".join(f"{f}: {why}" for f, why in bad),
                               len(shards) - k - 1)
                self.progress["shards"] = shards[:k]
                durable.write_json(self.progress_path, self.progress, indent=1)
                return len(shards) - k
        return 0

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

    def space_for(self, start: int):
        """The free-space check and full-disk message for prompts ``start``.. of this rank's block."""
        return durable.space_for(self.folder, int(self.bytes_per_prompt * (self.n_prompts - start)),
                                 f"collect (rank {self.rank}: {self.n_prompts - start} prompts to go, "
                                 "activation payload estimate)")

    def flush(self, start: int, end: int) -> int:
        """Write the buffered rows (prompts ``start``..``end`` of this rank) and commit them."""
        if not self.prompt_rows:
            return 0
        with self.space_for(start):
            return self._write_shard(start, end)

    def _write_shard(self, start: int, end: int) -> int:
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
        records = {f: durable.record(self.folder / f) for f in files}
        self.progress["shards"].append({"index": index, "start": start, "end": end, "files": files,
                                        "records": records})
        durable.write_json(self.progress_path, self.progress, indent=1)  # the commit point of the shard
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
         "harmless": [cfg.direction.harmless, cfg.direction.harmless_samples], "hooks": list(hooks), "world": world},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _committed_sizes_ok(folder: Path, world: int) -> bool:
    """Whether every committed shard file of every rank still has its recorded size (a stat per file)."""
    for r in range(world):
        path = folder / "progress" / f"rank-{r:03d}.json"
        shards = json.loads(path.read_text())["shards"] if path.is_file() else []
        for shard in shards:
            for f in shard["files"]:
                why = durable.check(folder / f, shard.get("records", {}).get(f), full=False)
                if why is not None:
                    logger.warning("collect: %s is damaged (%s): the finished collection is resumed to redo it",
                                   folder / f, why)
                    return False
    return True


def _prepare_folder(folder: Path, fp: str, cfg: Config, force: bool, dist: Dist) -> dict | None:
    """Check or create the results folder; returns the manifest of a finished collection, if any (one
    whose committed files have lost their recorded size is resumed instead)."""
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
        if manifest.get("status") == "complete" and _committed_sizes_ok(folder, int(manifest.get("world", 1))):
            return manifest
    elif folder.exists() and any(folder.iterdir()):
        raise ResultsMismatchError(
            f"{folder} exists, is not empty and has no {MANIFEST}: not a refusal_lens activations folder; "
            "choose another output.run_name or remove it (--force replaces it)"
        )
    dist.barrier()
    if dist.is_main and not manifest_path.is_file():
        durable.write_text(folder / "config.yaml", dump_config(cfg))
        durable.write_json(manifest_path, {"fingerprint": fp, "status": "running", "world": dist.world,
                                           "config": config_to_dict(cfg)})
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
    """Outcome counts per split ("all" and each split), category and label (safe: over-refusal; toxic: correct
    refusal; harmless: should be 0), plus per-split totals over categories (category "ALL")."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for row in prompt_rows:
        outcome = row.get("outcome") or ("refused" if row["refused"] else "complied")
        for split in ("all", row.get("split", "all")):
            groups[(split, row["category"], row["label"])].append(outcome)
            groups[(split, "ALL", row["label"])].append(outcome)
    out = []
    order = {s: i for i, s in enumerate(("all", *SPLITS))}
    for (split, category, label), outcomes in sorted(groups.items(),
                                                     key=lambda kv: (order[kv[0][0]], kv[0][1] == "ALL", kv[0][1:])):
        n = len(outcomes)
        out.append({"split": split, "category": category, "label": label, "n": n, "refused": outcomes.count("refused"),
                    "incoherent": outcomes.count("incoherent"), "rate": outcomes.count("refused") / n})
    return out


def format_rates(rates: Sequence[dict], split: str = "all") -> str:
    """A plain-text table of one split: category x (safe over-refusal, toxic refusal, harmless refusal)."""
    rates = [r for r in rates if r.get("split", "all") == split]
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
    durable.write_json(folder / "refusal_rates.json", rates)
    with durable.open_atomic(folder / "refusal_rates.csv", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["split", "category", "label", "n", "refused", "incoherent", "rate"])
        w.writeheader()
        w.writerows(rates)
    return rates


def _initial_batch_size(cfg: Config, device: torch.device) -> int:
    if isinstance(cfg.inference.batch_size, int):
        return cfg.inference.batch_size
    return 64 if device.type == "cuda" else 8


def _with_oom_halving(batch_size: int, what: str):
    """Run ``fn(batch_size)`` and halve the batch size on out-of-memory until it fits (or is 1)."""
    def run(fn):
        nonlocal batch_size
        while True:
            try:
                return fn(batch_size), batch_size
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                logger.warning("out of memory (%s): batch size halved to %d", what, batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return run


def _split_and_tokens(folder: Path, loaded, prompts: Sequence[Prompt], cfg: Config, world: int) -> dict:
    """Pass 2 (rank 0): the split of every prompt and the refusal tokens learned from the discovery responses."""
    judged: list[Judged] = []
    log = ResponseLog(folder, 0)
    for r in range(world):
        judged += log.read(r)
    by_index = {j.index: j for j in judged}
    if len(by_index) != len(prompts):
        raise RuntimeError(f"collect: {len(by_index)} judged responses for {len(prompts)} prompts")  # a bug, not input
    rows = [{"prompt_id": p.id, "label": p.label, "category": p.category, "refused": by_index[i].refused}
            for i, p in enumerate(prompts)]
    d = cfg.data
    splits = assign_splits(rows, d.split_fractions, d.split_seed)
    fallback = family_refusal_tokens(loaded.tokenizer, render(loaded.tokenizer, "Hello"), loaded.family.refusal_words)
    if cfg.inference.refusal_tokens == "learned":
        disc = [by_index[i] for i, p in enumerate(prompts) if splits[p.id] == "discovery" and by_index[i].response_ids]
        tokens = learn_refusal_tokens([j.response_ids[0] for j in disc], [j.refused for j in disc], fallback,
                                      loaded.tokenizer, cfg.inference.refusal_token_min_count,
                                      cfg.inference.refusal_token_share)
    else:
        tokens = fallback
    for r in rows:
        r["split"] = splits[r["prompt_id"]]
    info = {"splits": splits, "counts": split_counts(rows), "fractions": list(d.split_fractions), "seed": d.split_seed,
            "stratified_by": ["label", "category", "refused"], "refusal_tokens": tokens.to_dict()}
    durable.write_json(folder / SPLIT_FILE, info, indent=1)
    logger.info("split: %s; refusal tokens (%s): %s", {s: c.get("all", 0) for s, c in info["counts"].items()},
                tokens.source, list(tokens.tokens))
    return info


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

    ``status`` gets this rank's progress (responses, then activations: two steps per prompt) and the refusal
    rates once known."""
    folder = Path(folder)
    status = status if status is not None else StatusFile(None)
    hooks = resolve_hooks(loaded.model, cfg.model.activation_layers)
    fp = fingerprint(cfg, hooks, dist.world)
    done = _prepare_folder(folder, fp, cfg, force, dist)
    if done is not None:
        rates = json.loads((folder / "refusal_rates.json").read_text())
        logger.info("collect: %s is complete (--force to redo)", folder)
        status.progress(2 * done["n_prompts"], 2 * done["n_prompts"], "step")
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
    start, mine = dist.block(list(range(len(prompts))))
    stats = CollectStats()
    batch_size = _initial_batch_size(cfg, loaded.device)
    steps = 2 * len(mine)
    if dist.world > 1:
        status.set(message=f"collect progress counts rank 0's block: {len(mine)} of {len(prompts)} prompts")

    # ---- pass 1: responses, judged
    log = ResponseLog(folder, dist.rank)
    judged = {j.index: j for j in log.read()}
    todo = [i for i in mine if i not in judged]
    if judged:
        logger.info("collect: resuming the responses of rank %d at %d of %d", dist.rank, len(mine) - len(todo), len(mine))
    intervener = Intervener(loaded)
    bar = tqdm(total=steps, initial=len(mine) - len(todo), unit="step", desc=f"collect[{dist.rank}]",
               disable=not show_progress or not dist.is_main)
    status.progress(len(mine) - len(todo), steps, "step", initial=len(mine) - len(todo))
    t0 = time.perf_counter()
    while todo:
        def respond(bs: int):
            intervener.batch_size = bs
            return judge_batch(intervener, todo[:bs], prompts, encoded_all, inf.max_new_tokens)

        batch, batch_size = _with_oom_halving(batch_size, "generation")(respond)
        log.commit(batch)
        for j in batch:
            judged[j.index] = j
        todo = todo[len(batch):]
        bar.update(len(batch))
        status.progress(len(mine) - len(todo), steps)
    stats.generate_s = time.perf_counter() - t0

    # ---- pass 2: split and refusal tokens (once, on rank 0)
    dist.barrier()
    if dist.is_main and not (folder / SPLIT_FILE).is_file():
        _split_and_tokens(folder, loaded, prompts, cfg, dist.world)
    dist.barrier()
    info = json.loads((folder / SPLIT_FILE).read_text())
    splits, tokens = info["splits"], RefusalTokens.from_dict(info["refusal_tokens"])

    # ---- pass 3: activations and refusal scores, shard by shard
    writer = ShardWriter(folder, hooks, widths, inf.storage_dtype, dist.rank, int(inf.shard_mb * (1 << 20)),
                         bytes_per_prompt=estimate.disk_bytes_per_1000_prompts / 1000 if inf.save_activations else 0,
                         n_prompts=len(mine))
    writer.verify()
    removed = writer.remove_uncommitted()
    if removed:
        logger.info("collect: removed %d file(s) of an interrupted shard", removed)
    done_n = writer.next_prompt
    with writer.space_for(done_n):  # a disk too small fails here, before any model work
        pass
    if done_n:
        logger.info("collect: resuming the activations of rank %d at prompt %d of %d", dist.rank, done_n, len(mine))
    bar.update(done_n)
    status.progress(len(mine) + done_n, steps)
    shard_start = done_n
    t_start = time.perf_counter()
    i = done_n
    while i < len(mine):
        def forward(bs: int):
            idx = mine[i : i + bs]
            return process_batch(loaded, [prompts[j] for j in idx], [encoded_all[j] for j in idx],
                                 [judged[j] for j in idx], splits, hooks, cfg, tokens)

        out, batch_size = _with_oom_halving(batch_size, "activations")(forward)
        t0 = time.perf_counter()
        writer.add(out)
        i += out.stats.prompts
        if writer.full():
            out.stats.bytes_written += writer.flush(shard_start, i)
            shard_start = i
        out.stats.write_s = time.perf_counter() - t0
        stats.add(out.stats)
        bar.update(out.stats.prompts)
        elapsed = time.perf_counter() - t_start
        bar.set_postfix(tok_s=f"{stats.forward_tokens / elapsed:.0f}")
        status.progress(len(mine) + i, steps)
    t0 = time.perf_counter()
    stats.bytes_written += writer.flush(shard_start, len(mine))
    stats.write_s += time.perf_counter() - t0
    stats.batch_size_final = batch_size
    bar.close()

    dist.barrier()
    rates: list[dict] = []
    if dist.is_main:
        rates = _finalize(folder, hooks, writer, widths, cfg, dist.world)
        import datasets

        rows = datasets.load_from_disk(str(folder / PROMPTS_DIR)).to_list()
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest.update(
            status="complete", n_prompts=len(prompts), n_layers=loaded.n_layers, hooks=list(hooks), widths=widths,
            template_prefix_tokens=shared_prefix_length([e.ids for e in encoded_all]),
            opening_tokens=min((e.n_opening for e in encoded_all), default=0),
            post_instruction_tokens=max((e.n_post_instruction for e in encoded_all), default=0),
            refusal_tokens=tokens.to_dict(), score_auroc=score_auroc(rows), split_counts=info["counts"],
            estimate=estimate.to_dict(), versions=_versions(), stats_rank0=asdict(stats),
        )
        durable.write_json(folder / MANIFEST, manifest)  # the commit point of the stage
        status.progress(steps, steps)
        status.set(rates=rates)
    dist.barrier()
    if not dist.is_main:
        rates = json.loads((folder / "refusal_rates.json").read_text())
    return CollectResult(folder, hooks, len(prompts), rates, stats=stats)


def score_auroc(rows: Sequence[dict]) -> dict[str, dict]:
    """How well the refusal score separates refused from complied responses (incoherent ones left out), per
    split: AUROC with the counts (the test split's is the one the report states)."""
    out = {}
    for split in SPLITS:
        pos = [r["refusal_score"] for r in rows if r["split"] == split and r["outcome"] == "refused"]
        neg = [r["refusal_score"] for r in rows if r["split"] == split and r["outcome"] == "complied"]
        out[split] = {"auroc": auroc(pos, neg), "n_refused": len(pos), "n_complied": len(neg)}
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("refusal-lens", "torch", "transformers", "transformer-lens", "sae-lens", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class Collected:
    """A finished collection as later stages read it."""

    folder: Path
    manifest: dict
    rows: list[dict]  # the prompts table, in collection order
    tokens: RefusalTokens

    def split_rows(self, split: str, label: str | None = None, refused: bool | None = None) -> list[int]:
        """Indices of the rows of ``split`` (optionally of one label, refused or not)."""
        return [i for i, r in enumerate(self.rows) if r["split"] == split and (label is None or r["label"] == label)
                and (refused is None or bool(r["refused"]) == refused)]

    def encoded(self, tokenizer, max_tokens: int, rows: Sequence[int], template: str | None = None
                ) -> list[EncodedPrompt]:
        return [encode_prompt(tokenizer, self.rows[i]["prompt"], max_tokens, template) for i in rows]

    def response_ids(self, tokenizer, rows: Sequence[int]) -> list[list[int]]:
        """The judged responses of ``rows`` as token ids (as collected, from ``responses/``)."""
        judged = {}
        log = ResponseLog(self.folder, 0)
        for r in range(int(self.manifest.get("world", 1))):
            judged.update({j.prompt_id: j.response_ids for j in log.read(r)})
        return [judged[self.rows[i]["prompt_id"]] for i in rows]


def load_collected(acts_dir: Path) -> Collected:
    """The prompts table, manifest and refusal tokens of a finished collect stage (an error otherwise)."""
    import datasets

    path = Path(acts_dir) / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if manifest.get("status") != "complete":
        raise UserError(f"no finished activations in {acts_dir}: run `refusal-lens collect` with this config first")
    rows = datasets.load_from_disk(str(Path(acts_dir) / PROMPTS_DIR)).to_list()
    return Collected(Path(acts_dir), manifest, rows, RefusalTokens.from_dict(manifest["refusal_tokens"]))
