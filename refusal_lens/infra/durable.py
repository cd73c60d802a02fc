"""Durable commits: what a stage trusts on resume survives a kill, a full disk and a power loss.

Every file a stage commits goes through this module:

1. it is written to a temporary file in the same folder (``.<name>.<pid>.tmp``);
2. the file is flushed and ``fsync``-ed;
3. ``os.replace`` moves it to its final name (atomic on POSIX: readers see the old file or the new one);
4. the folder is ``fsync``-ed, so that the rename itself is on disk.

Files made by other writers (safetensors ``save_file``, Arrow stream writers, plotly, SAE-Lens's
``save_inference_model``) are written to the temporary path that :func:`atomic_path` yields, or into
a temporary folder that :func:`commit_dir` syncs file by file and renames. A kill at any moment leaves
either the previous file or the complete new one under the final name, plus at most a temporary file
that the next run ignores or deletes.

Committed files that a resume relies on also get a record (size and SHA-256, :func:`record`) in
the stage's own progress file (:class:`Ledger` for a folder of them); :func:`check` compares a file
with its record, so a truncated or altered file is redone instead of trusted.

Writes that fail because the disk is full or the folder is not writable (``ENOSPC``, ``EDQUOT``,
``EFBIG``, ``EACCES``, ``EPERM``, ``EROFS``) raise :class:`StorageError`, a :class:`UserError` naming
the folder (and, inside :func:`space_for`, the bytes the stage needs); the temporary file is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from refusal_lens.errors import UserError

logger = logging.getLogger(__name__)

#: errors of the disk or the folder rather than of the program: reported as :class:`StorageError`.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class StorageError(UserError, OSError):
    """A results folder that is full or not writable. The message names the folder, what failed, the
    free bytes and (when a stage said so with :func:`space_for`) the bytes it needs."""

    def __init__(self, folder: Path, reason: str, *, needed: int | None = None, what: str = "",
                 full: bool = True):
        self.folder, self.reason, self.needed, self.what, self.full = Path(folder), reason, needed, what, full
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"cannot write to {self.folder}: {self.reason}"
        if not self.full:
            return text + " (make the folder writable, or point output.result_dir elsewhere)"
        free = free_bytes(self.folder)
        if self.needed:
            text += f"; {self.what or 'this stage'} needs about {human_bytes(self.needed)} ({self.needed} bytes)"
        if free is not None:
            text += f", {human_bytes(free)} ({free} bytes) free there"
        return text + " (free some space or point output.result_dir at a larger disk, then rerun to resume)"

    def with_need(self, needed: int, what: str) -> StorageError:
        return StorageError(self.folder, self.reason, needed=needed, what=what, full=self.full)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _existing(folder: Path) -> Path:
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int | None:
    """Free bytes (for this user) on the filesystem that holds ``folder`` (or its nearest existing parent)."""
    try:
        return int(shutil.disk_usage(_existing(folder)).free)
    except OSError:
        return None


def _errno(err: BaseException) -> int | None:
    """The OS error number behind ``err``: an ``OSError``'s, or the ``(os error N)`` that safetensors'
    Rust errors (not ``OSError``) carry in their message."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None


def storage_error(err: BaseException, folder: Path) -> StorageError | None:
    """``err`` as a :class:`StorageError` about ``folder``, or None if it is another kind of error."""
    if isinstance(err, StorageError):
        return err
    code = _errno(err)
    if code in FULL_ERRNOS or code in DENIED_ERRNOS:
        filename = getattr(err, "filename", None)
        where = f" ({filename})" if filename and Path(filename) != Path(folder) else ""
        return StorageError(folder, os.strerror(code) + where, full=code in FULL_ERRNOS)
    return None


@contextmanager
def storage_errors(folder: Path) -> Iterator[None]:
    """Turn a full-disk or permission error raised inside the block into a :class:`StorageError`."""
    try:
        yield
    except Exception as err:
        translated = storage_error(err, Path(folder))
        if translated is None or translated is err:
            raise
        raise translated from err


@contextmanager
def space_for(folder: Path, needed: int, what: str) -> Iterator[None]:
    """A stage that will write about ``needed`` bytes into ``folder``: fail before writing if the disk
    has less free, and name ``needed`` in any full-disk error raised inside the block."""
    folder = Path(folder)
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise StorageError(folder, "not enough free space", needed=needed, what=what)
    try:
        yield
    except Exception as err:
        translated = storage_error(err, folder)
        if translated is None or not translated.full or translated.needed is not None:
            if translated is None or translated is err:
                raise
            raise translated from err
        raise translated.with_need(needed, what) from err


# ------------------------------------------------------------------------------------------ syncing


def fsync_file(path: Path) -> None:
    """Flush the data of an already-written file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (creations, renames, deletions) to disk. Filesystems that cannot sync
    a folder (``EINVAL``) are skipped."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """``fsync`` every file and folder under ``folder`` (itself included), deepest first."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def temporary_name(path: Path) -> Path:
    """The temporary file next to ``path`` that :func:`atomic_path` writes."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_temporaries(folder: Path) -> int:
    """Delete every temporary file or folder of :func:`temporary_name`'s form under ``folder``: left by
    killed writers. Only for the holder of the folder's lock (no live writer has any). Returns how many."""
    removed = 0
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            if name.startswith(".") and name.endswith(".tmp"):
                path = Path(root) / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed += 1
        dirs[:] = [d for d in dirs if not (d.startswith(".") and d.endswith(".tmp"))]
    return removed


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is synced and renamed into
    place (then the folder is synced), on error it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with storage_errors(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


@contextmanager
def open_atomic(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` through :func:`atomic_path` (text by default; ``newline=`` etc. pass on)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; allowed: 'w', 'wb'")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_bytes(path: Path, data: bytes) -> None:
    with open_atomic(path, "wb") as fh:
        fh.write(data)


def write_text(path: Path, text: str) -> None:
    with open_atomic(path) as fh:
        fh.write(text)


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_path`."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_plotly_html(fig, path: Path, include_plotlyjs: bool | str = True) -> None:
    """``fig.write_html`` through :func:`atomic_path`. With ``include_plotlyjs="directory"`` the shared
    ``plotly.min.js`` next to it is written here first (durably; plotly itself would keep a truncated one)."""
    path = Path(path)
    if include_plotlyjs == "directory":
        from plotly.offline import get_plotlyjs

        bundle = get_plotlyjs().encode("utf-8")
        target = path.parent / "plotly.min.js"
        if not target.is_file() or target.stat().st_size != len(bundle) or target.read_bytes() != bundle:
            write_bytes(target, bundle)
    with atomic_path(path) as tmp:
        fig.write_html(tmp, include_plotlyjs=include_plotlyjs)


def commit_dir(tmp: Path, final: Path) -> None:
    """Commit a folder written under the temporary name ``tmp``: every file in it is synced, then it is
    renamed to ``final`` (which must not exist) and the parent folder is synced."""
    tmp, final = Path(tmp), Path(final)
    with storage_errors(final.parent):
        sync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)


# ------------------------------------------------------------------------------------------ records


def record(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a committed file: what :func:`check` compares against on resume."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": digest}


def check(path: Path, rec: dict | None, *, full: bool = True) -> str | None:
    """None if ``path`` matches its record; otherwise why not (missing, no record, size, hash).
    ``full=False`` compares the size only (a stat; no read)."""
    path = Path(path)
    if not rec or "size" not in rec or "sha256" not in rec:
        return "no size/sha256 recorded"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != rec["size"]:
        return f"{size} bytes, {rec['size']} recorded"
    if full and record(path)["sha256"] != rec["sha256"]:
        return "content differs from its recorded sha256"
    return None


class Ledger:
    """Records of the committed files of one folder, in a JSON file of that folder (``{name: record}``).

    :meth:`add` records files once they are written (and rewrites the ledger durably); :meth:`verified`
    is the resume check: a file is trusted only if its record matches."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.folder = self.path.parent
        try:
            self.records: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.records = {}

    def _name(self, file: Path) -> str:
        return Path(file).resolve().relative_to(self.folder.resolve()).as_posix()

    def add(self, *files: Path) -> None:
        for file in files:
            self.records[self._name(file)] = record(file)
        write_json(self.path, self.records, indent=1)

    def damaged(self, file: Path) -> str | None:
        """Why ``file`` cannot be trusted, or None (see :func:`check`)."""
        return check(file, self.records.get(self._name(file)))

    def verified(self, file: Path) -> bool:
        """Whether ``file`` matches its record; a mismatch is logged (the caller redoes the file)."""
        reason = self.damaged(file)
        if reason is not None and Path(file).exists():
            logger.warning("%s is not trusted (%s): it is redone", file, reason)
        return reason is None
