"""One writer per run folder: an advisory ``fcntl.flock`` on ``<run>/.lock``, held for a whole command.

Every command that writes into a run folder (``collect``, ``train-saes``, ``discover``, ``analyze``,
``run``: the CLI takes it once for all the stages of the command) holds an exclusive ``flock`` on
``<run>/.lock``; a second writer fails at once with :class:`RunLockedError` naming the folder and
the PID written into the file by the holder. The kernel releases the lock when the holder's process
ends, however it ends (``kill -9`` included), so a lock file left behind never blocks: only a live
holder does. Readers (``refusal-lens status``, the report) never take it. Once it holds the lock, a
command deletes the temporary files (:func:`refusal_lens.infra.durable.temporary_name`) that killed
writers left in the folder.

Under torchrun only rank 0 takes the lock, before the process group starts (so that a refused
command fails before importing torch); the other ranks write under it. If rank 0 is refused it
exits and torchrun stops the other ranks, which wait for it in the process group and never write.
``flock`` is local to a host: ranks on other hosts, or two hosts sharing a network folder, are not
covered (NFS may emulate it with ``fcntl`` locks, depending on the mount).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from refusal_lens.infra.durable import remove_temporaries, storage_errors
from refusal_lens.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockedError(UserError, RuntimeError):
    """Another live process holds the run folder's lock."""


def holder(path: Path) -> dict:
    """What the lock file says about its holder (``pid``, ``host``, ``command``); {} if unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(info: dict) -> str:
    if "pid" not in info:
        return "a process that is starting (no PID written yet)"
    where = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    what = f", `refusal-lens {info['command']}`" if info.get("command") else ""
    return f"PID {info['pid']}{where}{what}"


@contextmanager
def run_lock(folder: Path, command: str, *, is_main: bool = True) -> Iterator[Path | None]:
    """Hold the write lock of run folder ``folder`` (created if needed) for the block.

    ``is_main`` false (a torchrun rank other than 0) takes nothing: that rank shares rank 0's lock.
    Yields the lock file's path (None when shared). Raises :class:`RunLockedError` at once if another
    process holds it."""
    if not is_main:
        yield None
        return
    folder = Path(folder)
    path = folder / LOCK_FILE
    with storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{folder} is being written by another refusal-lens command ({_describe(holder(path))}); "
                f"one writer per run folder: wait for it to finish (`refusal-lens status {folder}`), stop it, "
                "or set output.run_name to write elsewhere") from None
        # the holder's identity, for the message above; the lock itself is the flock, not this text
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
        with storage_errors(folder):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            removed = remove_temporaries(folder)  # no live writer has any: they are a killed one's
        if removed:
            logger.info("removed %d temporary file(s) of an interrupted command in %s", removed, folder)
        yield path
    finally:
        os.close(fd)  # releases the lock (as does the end of the process)
