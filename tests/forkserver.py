"""A fork server for the kill tests: imports the CLI and the libraries its stages import once, then forks one child
per command, each of which runs the command as ``python -m refusal_lens`` would.

Why: a ``refusal-lens`` command spends 3-7 s of its life importing torch, TransformerLens, SAE-Lens and
``datasets`` before it does anything, and the kill tests launch about twenty of them. A child forked from a
process that has only imported (nothing run, no thread started but a fork-safe one: checked at start) is the same program in the
same state as a fresh interpreter after those imports, so the kills, resumes and comparisons are unchanged; the
run the resumed stages are compared with, and the two concurrent ``run`` commands, are still fresh interpreters
(tests/test_kills.py).

Protocol (one JSON object per line): the server prints ``{"ready": pid}`` once imported; each request
``{"args": [...], "stderr": path, "returncode": path}`` is answered ``{"pid": pid}``. The child starts a session
of its own (so that its process group can be killed), reads nothing, writes stdout to /dev/null and stderr to
``stderr``, and ends as the interpreter ends (``raise SystemExit(main(args))``: atexit handlers run, an uncaught
exception prints its traceback and exits 1). The server reaps each child and writes its return code (negative
for a signal, as ``Popen.returncode``) to ``returncode``, atomically. It exits when its stdin closes.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading

PRELOAD = ("refusal_lens.cli", "refusal_lens.pipeline", "refusal_lens.stages.collect.stage",
           "refusal_lens.stages.direction.stage", "refusal_lens.stages.saes.stage",
           "refusal_lens.stages.circuits.stage", "refusal_lens.stages.analysis.stage", "transformer_lens",
           "sae_lens", "datasets")

#: pid -> the file its return code goes to
_children: dict[int, str] = {}


def _reap(signum=None, frame=None) -> None:
    while _children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = _children.pop(pid, None)
        if path is not None:
            with open(path + ".tmp", "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".tmp", path)


#: native threads allowed in the server: pyarrow's jemalloc starts a background purging thread when ``datasets``
#: is imported (so does every fresh interpreter of the CLI); jemalloc takes its own locks around a fork
#: (``pthread_atfork``), so a child never inherits one held, and starts the thread again when it needs it
FORK_SAFE_THREADS = {"jemalloc_bg_thd"}


def _native_threads() -> list[str]:
    """The names of this process's native threads other than the main one."""
    tasks = sorted(int(t) for t in os.listdir("/proc/self/task"))
    return [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks if t != os.getpid()]


def _child(request: dict) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    os.close(devnull)
    os.close(err)
    from refusal_lens.cli import main

    sys.argv = [sys.argv[0], *request["args"]]
    raise SystemExit(main(request["args"]))


def serve() -> None:
    for module in PRELOAD:
        importlib.import_module(module)
    # a fork copies only the forking thread: the server must have no other (but fork-safe ones), or a child could
    # inherit a lock held by a thread it does not have
    others = [name for name in _native_threads() if name not in FORK_SAFE_THREADS]
    assert threading.active_count() == 1 and not others, (
        f"the fork server has {threading.active_count()} Python threads and native threads {others} after its imports")
    signal.signal(signal.SIGCHLD, _reap)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        # SIGCHLD is held while the child is registered: a child that ends at once is reaped with its file known
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            _child(request)  # never returns: the child's interpreter ends with the command
        _children[pid] = request["returncode"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    serve()
