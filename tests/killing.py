"""A harness for real kills: run a CLI stage as a subprocess, SIGKILL it at points taken from the stage's
own progress, rerun it to completion, and compare its output tree with an uninterrupted run's. The killed and
resumed commands are started by a :class:`ForkServer` (each a child of a process that has imported the CLI's
libraries once, seconds sooner than a fresh interpreter).

Stage-agnostic: a kill point is a predicate on the run folder (a file that appears, a number of
committed shards, the status file's progress), a tamper step damages a committed file between runs,
and :func:`compare_trees` compares two output folders file by file, by type:

* Arrow stream files: equal tables (schema metadata included); ``datasets`` folders: equal row by row;
* safetensors: the same tensors bit for bit (and the same header metadata);
* JSON / JSONL: equal after dropping the stage's volatile keys (timings), NaN-aware;
* HTML: equal after replacing the random element ids plotly draws (uuid4);
* anything else: equal bytes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
#: never compared: the live status of the last command (times, PIDs) and the lock file (its holder's PID)
NOT_OUTPUTS = {"status.json", ".lock"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class KillPoint:
    """Kill the stage once ``reached(run_dir)`` holds (polled every few milliseconds)."""

    name: str
    reached: Callable[[Path], bool]


@dataclass(frozen=True)
class Tamper:
    """Damage the run folder between two runs (e.g. truncate a committed file)."""

    name: str
    apply: Callable[[Path], None]


def appears(relpath: str) -> KillPoint:
    return KillPoint(f"{relpath} exists", lambda run: (run / relpath).exists())


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being replaced right now
        return None


def committed_shards(n: int, rank: int = 0) -> KillPoint:
    """The collect stage has committed at least ``n`` shards on ``rank``."""
    def reached(run: Path) -> bool:
        progress = _json(run / "activations" / "progress" / f"rank-{rank:03d}.json")
        return progress is not None and len(progress["shards"]) >= n
    return KillPoint(f"{n} committed shard(s)", reached)


def truncate(relpath: str, keep: int = 100) -> Tamper:
    def apply(run: Path) -> None:
        path = run / relpath
        data = path.read_bytes()
        assert len(data) > keep, f"{path} is too small to truncate"
        path.write_bytes(data[:keep])
    return Tamper(f"truncate {relpath} to {keep} bytes", apply)


@dataclass
class RunLog:
    step: str  # the kill point, tamper step or "to completion"
    returncode: int | None
    stderr: str
    seconds: float
    state: dict = field(default_factory=dict)  # what the run folder held when it was killed


def cli(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "refusal_lens", *args]


class Launched:
    """A command started by a :class:`ForkServer`: ``pid`` (its own process group), :meth:`poll` and :meth:`wait` as
    ``Popen``'s (``returncode`` negative for a signal), and :meth:`stderr` (its whole stderr, from a file: a
    pipe nobody reads while the command runs could fill and stop it)."""

    def __init__(self, pid: int, stderr_path: Path, poll: Callable[[], int | None]):
        self.pid, self._stderr_path, self._poll = pid, stderr_path, poll
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._poll()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        t0 = time.perf_counter()
        while self.poll() is None:
            if timeout is not None and time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"PID {self.pid} still running after {timeout} s")
            time.sleep(0.002)
        return self.returncode

    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace")


class ForkServer:
    """Each command a child of tests/forkserver.py, which has imported the CLI and its libraries once (see its
    doc: the same program in the same state as a fresh interpreter after those imports, seconds sooner)."""

    def __init__(self, scratch: Path):
        self._scratch, self._n = scratch, 0
        self._server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py"))], env=ENV,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._server.stdout.readline()
        assert ready, f"the fork server ended (rc {self._server.wait()}) before it was ready"
        assert json.loads(ready)["ready"] == self._server.pid

    def launch(self, args: Sequence[str]) -> Launched:
        self._n += 1
        stderr_path = self._scratch / f"command-{self._n:03d}.stderr"
        code_path = self._scratch / f"command-{self._n:03d}.returncode"
        self._server.stdin.write(json.dumps({"args": list(args), "stderr": str(stderr_path),
                                             "returncode": str(code_path)}) + "\n")
        self._server.stdin.flush()
        answer = self._server.stdout.readline()
        assert answer, f"the fork server ended (rc {self._server.wait()})"
        return Launched(json.loads(answer)["pid"], stderr_path,
                        lambda: int(code_path.read_text()) if code_path.exists() else None)

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)


def run_killed_at(launcher, args: Sequence[str], run: Path, point: KillPoint, *, timeout: float = 240.0,
                  describe: Callable[[Path], dict] | None = None) -> RunLog:
    """Start the command, SIGKILL its process group once ``point`` is reached; fails if the command ends
    first or the point was already reached before it started (kill points must follow the progress)."""
    assert not point.reached(run), f"kill point {point.name!r} already holds before the run: reorder the points"
    t0 = time.perf_counter()
    proc = launcher.launch(args)
    try:
        while not point.reached(run):
            if proc.poll() is not None:
                raise AssertionError(f"the command ended (rc {proc.returncode}) before {point.name!r}:\n"
                                     + proc.stderr()[-3000:])
            if time.perf_counter() - t0 > timeout:
                raise AssertionError(f"{point.name!r} not reached within {timeout} s")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        state = describe(run) if describe else {}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = proc.stderr()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr[-3000:])
    return RunLog(point.name, proc.returncode, stderr, time.perf_counter() - t0, state)


def run_to_completion(launcher, args: Sequence[str], *, timeout: float = 300.0) -> RunLog:
    t0 = time.perf_counter()
    proc = launcher.launch(args)
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, proc.stderr()[-3000:]
    return RunLog("to completion", 0, proc.stderr(), time.perf_counter() - t0)


def kill_and_resume(launcher, args: Sequence[str], run: Path, steps: Iterable[KillPoint | Tamper], *,
                    describe: Callable[[Path], dict] | None = None) -> list[RunLog]:
    """Run ``args`` (each time started by ``launcher``, a :class:`ForkServer`) killed at each kill point in turn
    (tampering where asked), then once to completion."""
    logs = []
    for step in steps:
        if isinstance(step, Tamper):
            step.apply(run)
            logs.append(RunLog(step.name, None, "", 0.0))
        else:
            logs.append(run_killed_at(launcher, args, run, step, describe=describe))
    logs.append(run_to_completion(launcher, args))
    return logs


# ------------------------------------------------------------------------------------------ comparing


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name not in NOT_OUTPUTS}


def _without(obj, volatile: frozenset[str]):
    if isinstance(obj, dict):
        return {k: _without(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [_without(v, volatile) for v in obj]
    return obj


def _canonical_json(text: str, volatile: frozenset[str]) -> str:
    return json.dumps(_without(json.loads(text), volatile), sort_keys=True)  # NaN == NaN as text


def _same_arrow(a: Path, b: Path) -> bool:
    import pyarrow as pa

    with pa.memory_map(str(a)) as fa, pa.memory_map(str(b)) as fb:
        return pa.ipc.open_stream(fa).read_all().equals(pa.ipc.open_stream(fb).read_all(), check_metadata=True)


def _same_safetensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()) or fa.metadata() != fb.metadata():
            return False
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(bits(x), bits(y)):
                return False
    return True


def same_file(a: Path, b: Path, volatile: frozenset[str] = frozenset()) -> bool:
    suffix = a.suffix
    if suffix == ".arrow":
        return _same_arrow(a, b)
    if suffix == ".safetensors":
        return _same_safetensors(a, b)
    if suffix == ".json":
        return _canonical_json(a.read_text(), volatile) == _canonical_json(b.read_text(), volatile)
    if suffix == ".jsonl":
        lines_a, lines_b = a.read_text().splitlines(), b.read_text().splitlines()
        return len(lines_a) == len(lines_b) and all(
            _canonical_json(x, volatile) == _canonical_json(y, volatile) for x, y in zip(lines_a, lines_b))
    if suffix == ".html":
        return UUID.sub("<uuid>", a.read_text()) == UUID.sub("<uuid>", b.read_text())
    return a.read_bytes() == b.read_bytes()


def _dataset_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("state.json") if (p.parent / "dataset_info.json").is_file())


def compare_trees(reference: Path, got: Path, volatile: Iterable[str] = ()) -> int:
    """Assert that ``got`` holds the same files as ``reference``, each equal by its type (see the module
    doc), and every ``datasets`` folder equal row by row. Returns the number of files compared."""
    volatile = frozenset(volatile)
    ref_files, got_files = _files(reference), _files(got)
    assert ref_files == got_files, (f"only in the reference: {sorted(ref_files - got_files)}; "
                                    f"only after the kills: {sorted(got_files - ref_files)}")
    differ = [f for f in sorted(ref_files) if not same_file(reference / f, got / f, volatile)]
    assert not differ, f"differ from the uninterrupted run: {differ}"
    import datasets

    for folder in _dataset_folders(reference):
        rel = folder.relative_to(reference)
        a = datasets.load_from_disk(str(folder)).to_list()
        b = datasets.load_from_disk(str(got / rel)).to_list()
        assert a == b, f"{rel}: rows differ"
    return len(ref_files)
