"""On-disk activation datasets: Hugging Face ``datasets`` in the ``save_to_disk`` layout, written
shard by shard with Arrow directly (whole batches, no per-row Python encoding).

One dataset per hook, at ``<activations>/<hook name>/``, one row per stored token position:

==================  ======================================  =========================================
column              type                                    meaning
==================  ======================================  =========================================
``<hook name>``     ``Array2D((1, d), float16|float32)``    the activation (bfloat16: its bits, int16)
``token_ids``       ``Sequence(int32, length=1)``           the token at that position
``prompt_id``       ``string``                              id of the prompt (see prompts/)
``position``        ``int32``                               index in the prompt's own tokens (no padding)
``is_response``     ``bool``                                a generated-response token (else prompt)
``category``        ``string``                              OR-Bench category
``label``           ``string``                              safe | toxic | unlabeled
``refused``         ``bool``                                the keyword judge on the response
``refusal_score``   ``float32``                             logit-difference score, first response position
==================  ======================================  =========================================

The hook column and ``token_ids`` follow SAE-Lens's cached-activation format with a context size of
1 (its reader selects those two columns and accepts the rest), so SAE-Lens reads every hook folder.
Arrow has no bfloat16: with ``storage_dtype: bfloat16`` the column holds the raw bits as int16 and
:func:`load_hook_tensor` views them back; the dtype is recorded in the folder's ``refusal_lens.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from refusal_lens.infra import durable

STORAGE_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "int16"}
#: storage dtype name -> the torch dtype activations are converted to before they leave the device.
STORAGE_TORCH = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
META_FILE = "refusal_lens.json"


def hook_features(hook: str, width: int, storage_dtype: str):
    """The ``datasets.Features`` of one hook's dataset."""
    from datasets import Array2D, Features, Sequence as DsSequence, Value

    return Features(
        {
            hook: Array2D(shape=(1, width), dtype=STORAGE_DTYPES[storage_dtype]),
            "token_ids": DsSequence(Value("int32"), length=1),
            "prompt_id": Value("string"),
            "position": Value("int32"),
            "is_response": Value("bool"),
            "category": Value("string"),
            "label": Value("string"),
            "refused": Value("bool"),
            "refusal_score": Value("float32"),
        }
    )


def to_storage(x: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """``[n, d]`` activations -> a numpy array in the storage dtype (bfloat16 as int16 bits)."""
    if storage_dtype == "bfloat16":
        return x.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy()
    return x.detach().to(getattr(torch, storage_dtype)).cpu().numpy()


def from_storage(array: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`."""
    array = np.ascontiguousarray(array)
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    if storage_dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


def _array2d(values: np.ndarray, ext_type) -> pa.Array:
    """``[n, d]`` numpy -> an ``Array2D((1, d))`` extension array without per-row Python work."""
    n, d = values.shape
    flat = pa.array(values.reshape(-1))
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), flat)
    outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n + 1, dtype=np.int32)), inner)
    return pa.ExtensionArray.from_storage(ext_type, outer)


def hook_record_batch(
    features, hook: str, values: np.ndarray, token_ids: np.ndarray, meta: Mapping[str, Sequence | np.ndarray]
) -> pa.RecordBatch:
    """One Arrow record batch of a hook dataset from whole-batch arrays."""
    schema = features.arrow_schema
    n = values.shape[0]
    columns = {
        hook: _array2d(values, schema.field(hook).type),
        "token_ids": pa.FixedSizeListArray.from_arrays(pa.array(token_ids.astype(np.int32)), 1),
    }
    for name in ("prompt_id", "position", "is_response", "category", "label", "refused", "refusal_score"):
        columns[name] = pa.array(meta[name], type=schema.field(name).type)
        if len(columns[name]) != n:
            raise ValueError(f"column {name} has {len(columns[name])} rows, expected {n}")
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


def write_arrow_file(path: Path, batches: Sequence[pa.RecordBatch], schema: pa.Schema) -> int:
    """Write record batches as an Arrow stream file (what ``datasets`` reads), durably
    (:func:`refusal_lens.infra.durable.atomic_path`); returns its size."""
    with durable.atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return path.stat().st_size


def _write_dataset_info(folder: Path, features) -> None:
    """``dataset_info.json`` as ``datasets`` writes it, committed durably (written in a staging folder)."""
    from datasets import DatasetInfo

    staging = folder / f".dataset_info.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with durable.storage_errors(folder):
        staging.mkdir(parents=True)
        DatasetInfo(features=features).write_to_directory(str(staging), pretty_print=True)
    with durable.atomic_path(folder / "dataset_info.json") as tmp:
        os.replace(staging / "dataset_info.json", tmp)
    shutil.rmtree(staging, ignore_errors=True)


def finalize_dataset(folder: Path, features, files: Sequence[str], meta: Mapping | None = None) -> None:
    """Make ``folder`` a ``datasets.load_from_disk`` dataset made of ``files`` (in order), zero-copy."""
    _write_dataset_info(folder, features)
    state = {
        "_data_files": [{"filename": name} for name in files],
        "_fingerprint": hashlib.sha256("\n".join(files).encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    durable.write_json(folder / "state.json", state)
    if meta is not None:
        durable.write_json(folder / META_FILE, dict(meta))


def empty_arrow_file(path: Path, features) -> None:
    """A valid zero-row shard (a dataset needs at least one data file)."""
    write_arrow_file(path, [], features.arrow_schema)


class HookActivations:
    """One hook folder: metadata columns in memory, activations memory-mapped."""

    def __init__(self, folder: str | Path):
        import datasets

        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a hook folder written by the collect stage (no {META_FILE})")
        self.meta = json.loads(meta_path.read_text())
        self.hook: str = self.meta["hook"]
        self.width: int = int(self.meta["width"])
        self.storage_dtype: str = self.meta["storage_dtype"]
        ds = datasets.load_from_disk(str(self.folder))
        self.table: pa.Table = ds.data.table if hasattr(ds.data, "table") else ds.data
        self.prompt_ids = np.asarray(self.table.column("prompt_id").to_pylist(), dtype=object)
        self.labels = np.asarray(self.table.column("label").to_pylist(), dtype=object)
        self.categories = np.asarray(self.table.column("category").to_pylist(), dtype=object)
        self.positions = self.table.column("position").to_numpy()
        self.token_ids = self.table.column("token_ids").combine_chunks().flatten().to_numpy()

    def __len__(self) -> int:
        return self.table.num_rows

    def raw(self, rows: np.ndarray) -> torch.Tensor:
        """``[len(rows), width]`` activations of the given rows in their stored dtype."""
        column = self.table.column(self.hook).take(pa.array(rows, type=pa.int64())).combine_chunks()
        storage = column.storage if isinstance(column, pa.ExtensionArray) else column
        values = storage.flatten().flatten().to_numpy(zero_copy_only=False).reshape(len(rows), self.width)
        return from_storage(values, self.storage_dtype)

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """``[len(rows), width]`` float32 activations of the given rows."""
        return self.raw(rows).float()

    def groups(self, rows: np.ndarray, balance: str) -> dict[tuple, np.ndarray]:
        """Rows grouped by label (``labels``) or category and label (``categories``)."""
        if balance == "none":
            return {(): rows}
        out: dict[tuple, list[int]] = defaultdict(list)
        for r in rows:
            key = (self.labels[r],) if balance == "labels" else (self.categories[r], self.labels[r])
            out[key].append(int(r))
        return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def load_hook_tensor(folder: str | Path) -> tuple[torch.Tensor, dict]:
    """``[n, d]`` activations of one hook folder, in their stored dtype, plus the other columns.

    Handles bfloat16 (stored as int16 bits). Reads the whole column: for large folders use
    :class:`HookActivations` and take rows in chunks.
    """
    acts = HookActivations(folder)
    others = {c: acts.table.column(c).to_pylist() for c in acts.table.column_names if c not in (acts.hook, "token_ids")}
    others["token_ids"] = acts.table.column("token_ids").combine_chunks().flatten().to_numpy()
    return acts.raw(np.arange(len(acts), dtype=np.int64)), others
