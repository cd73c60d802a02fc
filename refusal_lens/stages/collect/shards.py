"""Pass 3 of collect, on disk: per-hook Arrow buffers written as one shard per hook, committed shard by shard.

A :class:`ShardWriter` buffers batch outputs and writes a shard once ``inference.shard_mb`` is reached: one
Arrow file per hook (``<hook>/shard-RRR-NNNNN.arrow``) and one of the prompts table's rows; each committed
shard lists the size and SHA-256 of its files in ``progress/rank-RRR.json`` (the commit point of the shard).
A resume checks them (:meth:`ShardWriter.verify`) and redoes a damaged shard and the ones after it; files of
an uncommitted shard are deleted first (:meth:`ShardWriter.remove_uncommitted`). :func:`finalize` turns the
committed shards of every rank into one HF ``datasets`` folder per hook and one for the prompts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import pyarrow as pa

from refusal_lens.config import InferenceConfig
from refusal_lens.activations.store import finalize_dataset, hook_features, hook_record_batch, write_arrow_file
from refusal_lens.infra import durable
from refusal_lens.run.collected import prompt_features
from refusal_lens.run.folder import ActivationFiles
from refusal_lens.stages.collect.extraction import BatchOutput

logger = logging.getLogger(__name__)


def progress_file(files: ActivationFiles, rank: int):
    """This rank's committed shards (``progress/rank-RRR.json``)."""
    return files.progress / f"rank-{rank:03d}.json"


class ShardWriter:
    """Buffers batch outputs and writes them as one shard per hook once ``shard_bytes`` is reached.

    ``bytes_per_prompt`` (the storage estimate) and ``n_prompts`` (this rank's block) size the free-space
    check made before each shard: the rest of the block must fit (:func:`refusal_lens.infra.durable.space_for`)."""

    def __init__(self, files: ActivationFiles, hooks: Sequence[str], widths: dict[str, int], storage_dtype: str,
                 rank: int, shard_bytes: int, *, bytes_per_prompt: float = 0.0, n_prompts: int = 0):
        self.folder, self.hooks, self.rank, self.shard_bytes = files.dir, list(hooks), rank, shard_bytes
        self.prompts_dir = files.prompts.name
        self.bytes_per_prompt, self.n_prompts = bytes_per_prompt, n_prompts
        self.features = {h: hook_features(h, widths[h], storage_dtype) for h in hooks}
        self.prompt_features = prompt_features()
        self.progress_path = progress_file(files, rank)
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
        for sub in [self.prompts_dir, *self.hooks]:
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
        (self.folder / self.prompts_dir).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self.prompt_rows, schema=self.prompt_features.arrow_schema)
        written += write_arrow_file(self.folder / self.prompts_dir / name, table.to_batches(), table.schema)
        files.append(f"{self.prompts_dir}/{name}")
        records = {f: durable.record(self.folder / f) for f in files}
        self.progress["shards"].append({"index": index, "start": start, "end": end, "files": files,
                                        "records": records})
        durable.write_json(self.progress_path, self.progress, indent=1)  # the commit point of the shard
        self._reset()
        return written


def committed_sizes_ok(files: ActivationFiles, world: int) -> bool:
    """Whether every committed shard file of every rank still has its recorded size (a stat per file)."""
    folder = files.dir
    for r in range(world):
        path = progress_file(files, r)
        shards = json.loads(path.read_text())["shards"] if path.is_file() else []
        for shard in shards:
            for f in shard["files"]:
                why = durable.check(folder / f, shard.get("records", {}).get(f), full=False)
                if why is not None:
                    logger.warning("collect: %s is damaged (%s): the finished collection is resumed to redo it",
                                   folder / f, why)
                    return False
    return True


def finalize(files: ActivationFiles, hooks: Sequence[str], writer: ShardWriter, widths: dict[str, int],
             inf: InferenceConfig, world: int) -> None:
    """One HF ``datasets`` folder per hook (and one for the prompts table) from every rank's committed shards."""
    shards = []
    for r in range(world):
        path = progress_file(files, r)
        shards += [(r, s) for s in json.loads(path.read_text())["shards"]]
    shards.sort(key=lambda rs: (rs[0], rs[1]["index"]))
    committed = [f for _, s in shards for f in s["files"]]

    def files_of(sub: str) -> list[str]:
        return [f.split("/", 1)[1] for f in committed if f.split("/", 1)[0] == sub]

    finalize_dataset(files.prompts, writer.prompt_features, files_of(files.prompts.name))
    if inf.save_activations:
        for h in hooks:
            finalize_dataset(
                files.hook(h), writer.features[h], files_of(h),
                {"hook": h, "storage_dtype": inf.storage_dtype, "width": widths[h], "positions": inf.positions,
                 "store_response_activations": inf.store_response_activations},
            )

