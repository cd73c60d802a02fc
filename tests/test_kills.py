"""Real kills: each stage's CLI command is SIGKILLed at points of its own progress, a committed file is
damaged, the command is rerun to completion, and every output file equals an uninterrupted run's.
Also: a second `refusal-lens run` on the folder of a running one is refused and the first is unaffected.

One uninterrupted `run` (the reference) is made once in <tmp>/results/tiny and moved aside; each test
copies the earlier stages' folders from it back to the same path (outputs name their run folder), so
that only the stage under test is killed, resumed and compared.

The reference and the two concurrent `run` commands are fresh interpreters (`python -m refusal_lens`); the
killed and resumed stage commands are children of a fork server that has imported the CLI's libraries once
(tests/forkserver.py: the same program in the same state, 3-7 s sooner each)."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from killing import ENV, ForkServer, appears, cli, committed_shards, compare_trees, kill_and_resume, truncate
from test_pipeline import write_config as pipeline_config

#: the folder each stage writes, in pipeline order
FOLDERS = {"collect": "activations", "direction": "direction", "train-saes": "saes", "discover": "circuits",
           "analyze": "analysis"}
#: JSON keys that hold timings or per-process counters, never results
VOLATILE = {"collect": {"stats_rank0"}, "direction": {"seconds"}, "train-saes": set(),
            "discover": {"seconds", "attribution_seconds"}, "analyze": {"seconds"}}
FIRST_HOOK = "blocks.0.hook_resid_post"


def write_config(folder: Path, model_dir: Path) -> Path:
    """tests/test_pipeline.py's tiny main job, in small steps: a shard per collect batch of 2 prompts,
    attribution batches of 4 prompts, so that there are progress points to kill at."""
    path = folder / "kills.yaml"
    path.write_text(f"""
base: {pipeline_config(folder, model_dir)}
inference: {{batch_size: 2, shard_mb: 0.000001}}
circuits: {{batch_size: 4}}
""")
    return path


def _status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _files_state(run: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of the run folder: (inode, size, mtime in ns). Writing a file changes its mtime, replacing it
    (``os.replace``, as status.json is written) its inode, creating one adds a key."""
    return {p.relative_to(run).as_posix(): (st.st_ino, st.st_size, st.st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file() for st in [p.stat()]}


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """The reference run; while it is in its discover stage, a second `run` on the same folder is tried.

    Driven by the first run's own progress, never by a clock: its status.json is polled until it says the
    discover stage (or a later one) is running, failing only if the process ends first. The first is then
    frozen (SIGSTOP) while the second runs, so that nothing changes in the folder but what the second does;
    it is let go (SIGCONT) and runs to completion."""
    root = tmp_path_factory.mktemp("kills")
    config = write_config(root, tiny_model_dir)
    run = root / "results" / "tiny"
    first_log = root / "first.stderr"
    with first_log.open("w") as err:  # a file, not a pipe: the first's log can never block it
        first = subprocess.Popen(cli(["run", "--config", str(config)]), env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=err, start_new_session=True)
    late = list(FOLDERS)[list(FOLDERS).index("discover"):]
    try:
        while _status(run).get("current_stage") not in late:
            assert first.poll() is None, (f"the first run ended (rc {first.returncode}) before its discover stage:\n"
                                          + first_log.read_text()[-3000:])
            time.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            assert first.poll() is None
            status_then = _status(run)  # the first's own record of where it was when it was frozen
            status_bytes = (run / "status.json").read_bytes()
            files_then = _files_state(run)
            t0 = time.perf_counter()
            # the timeout only guards against a hang (a second that waited for the lock would wait for ever)
            second = subprocess.run(cli(["run", "--config", str(config)]), env=ENV, capture_output=True, text=True,
                                    timeout=600)
            second_s = time.perf_counter() - t0
            files_after = _files_state(run)
            status_bytes_after = (run / "status.json").read_bytes()
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        first.wait()
        assert first.returncode == 0, first_log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    changed = {f: (files_then.get(f), files_after.get(f)) for f in sorted(set(files_then) | set(files_after))
               if files_then.get(f) != files_after.get(f)}
    info = {"first_pid": first.pid, "second": second, "second_s": second_s, "status_then": status_then,
            "status_written": status_bytes != status_bytes_after, "files_changed": changed, "status": _status(run)}
    reference = root / "reference"
    run.rename(reference)
    return {"config": config, "run": run, "reference": reference, **info}


def test_a_second_run_is_refused_at_once_and_the_first_finishes(world):
    """The second `run` came while the first was in its discover stage or later (the first's own status, read
    while it was frozen) and, from what it itself did: exited with 2 and one line naming the first's PID,
    writing nothing in the folder (status.json neither written nor replaced, no file created or changed).
    The first then finished every stage, its status its own."""
    second, run = world["second"], world["run"]
    then = world["status_then"]
    assert (then["pid"], then["command"], then["state"]) == (world["first_pid"], "run", "running")
    assert then["current_stage"] in ("discover", "analyze")
    assert second.returncode == 2, second.stderr[-3000:]
    assert not world["status_written"], "the second run wrote status.json"
    assert world["files_changed"] == {}, world["files_changed"]
    assert second.stderr.strip().splitlines() == [
        f"refusal-lens run: error: {run} is being written by another refusal-lens command (PID {world['first_pid']}, "
        f"`refusal-lens run`); one writer per run folder: wait for it to finish (`refusal-lens status {run}`), "
        "stop it, or set output.run_name to write elsewhere"]
    print(f"second `run` refused in {world['second_s']:.2f} s, at the first's stage {then['current_stage']!r}")
    status = world["status"]  # the first's live status, never touched by the second
    assert (status["pid"], status["command"], status["state"], status["error"]) == (world["first_pid"], "run", "done", None)
    assert [(s["name"], s["state"]) for s in status["stages"]] == [(name, "done") for name in FOLDERS]
    assert (world["reference"] / "analysis" / "report.html").stat().st_size > 10_000


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("commands"))
    yield server
    server.close()


def prepare(world, stage: str) -> Path:
    """The run folder holding the reference's folders of the stages before ``stage``."""
    run = world["run"]
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for earlier in list(FOLDERS)[: list(FOLDERS).index(stage)]:
        shutil.copytree(world["reference"] / FOLDERS[earlier], run / FOLDERS[earlier])
    return run


def describe(run: Path) -> dict:
    status = _status(run)
    stage = next((s for s in status.get("stages", []) if s["name"] == status.get("current_stage")), {})
    return {"files": sum(1 for p in run.rglob("*") if p.is_file()), "stage": status.get("current_stage"),
            "progress": stage.get("progress")}


def check(world, launcher, stage: str, steps, damaged_message: str | None = None) -> None:
    """Kill ``stage`` at ``steps`` (tampering where asked), finish it, compare with the reference; a run
    after the tamper step must log ``damaged_message``."""
    run = prepare(world, stage)
    args = [stage, "--config", str(world["config"])]
    logs = kill_and_resume(launcher, args, run, steps, describe=describe)
    for log in logs:
        print(f"{stage}: {log.step}: rc {log.returncode}, {log.seconds:.1f} s, {log.state}")
    if damaged_message is not None:
        tampered = max(i for i, log in enumerate(logs) if log.returncode is None)
        assert any(damaged_message in log.stderr for log in logs[tampered + 1:]), "the damaged file went unnoticed"
    n = compare_trees(world["reference"] / FOLDERS[stage], run / FOLDERS[stage], VOLATILE[stage])
    print(f"{stage}: {n} files equal to the uninterrupted run's")


def test_collect_killed_twice_and_a_shard_truncated(world, launcher):
    check(world, launcher, "collect", [
        committed_shards(5),
        appears("activations/prompts/state.json"),  # every shard committed, finalizing the datasets
        truncate(f"activations/{FIRST_HOOK}/shard-000-00003.arrow"),
    ], "collect: rank 0 shard 3 is damaged")


def test_train_saes_killed_twice_and_weights_truncated(world, launcher):
    check(world, launcher, "train-saes", [
        appears(f"saes/.{FIRST_HOOK}.partial"),  # training the first hook
        appears(f"saes/{FIRST_HOOK}/files.json"),  # first hook committed, the second training
        truncate(f"saes/{FIRST_HOOK}/sae_weights.safetensors"),
    ], f"saes/{FIRST_HOOK}: not trusted (sae_weights.safetensors:")


def test_direction_killed_twice(world, launcher):
    check(world, launcher, "direction", [
        appears("direction/candidates.safetensors"),  # the candidates written, the selection running
        appears("direction/evaluation.json"),  # evaluated on test; the categories running
    ])


def test_discover_killed_twice_and_an_effects_shard_truncated(world, launcher):
    check(world, launcher, "discover", [
        appears("circuits/effects/ledger.json"),  # during the attribution pass
        truncate("circuits/effects/discovery-batch-0000.safetensors"),
        # after agreement and faithfulness: the resumed run skips them (its random draws must not depend on that)
        appears("circuits/validation/faithfulness.json"),
    ], "discovery-batch-0000.safetensors is not trusted")


def test_analyze_killed_twice(world, launcher):
    check(world, launcher, "analyze", [appears("analysis/similarity.json"), appears("analysis/report.html")])
