"""One writer per run folder (refusal_lens/infra/lock.py): a second writer is refused at once, naming the folder
and the holder's PID; a lock left by a killed process never blocks; torchrun ranks share rank 0's lock."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refusal_lens.infra.lock import LOCK_FILE, RunLockedError, holder, run_lock

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(tmp_path):
    run = tmp_path / "results" / "tiny"
    with run_lock(run, "run") as path:
        assert path == run / LOCK_FILE
        assert holder(path)["pid"] == os.getpid() and holder(path)["command"] == "run"
        with pytest.raises(RunLockedError) as info:  # another open file description: flock conflicts
            with run_lock(run, "discover"):
                pass
        message = str(info.value)
        assert message.startswith(f"{run} is being written by another refusal-lens command (PID {os.getpid()}, "
                                  "`refusal-lens run`)") and "\n" not in message
        with run_lock(run, "collect", is_main=False) as shared:  # a torchrun rank > 0 takes nothing
            assert shared is None
    with run_lock(run, "collect"):  # released at the end of the block
        assert holder(run / LOCK_FILE)["command"] == "collect"


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from refusal_lens.infra.lock import run_lock\n"
            f"with run_lock({str(run)!r}, 'run'):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"PID {proc.pid}"):
        with run_lock(run, "run"):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert holder(run / LOCK_FILE)["pid"] == proc.pid  # the file stays, naming a dead process ...
    with run_lock(run, "run"):  # ... and does not block
        assert holder(run / LOCK_FILE)["pid"] == os.getpid()


def test_the_lock_holder_removes_temporaries_of_killed_writers(tmp_path):
    run = tmp_path / "run"
    (run / "saes").mkdir(parents=True)
    (run / "saes" / ".manifest.json.4242.tmp").write_text("{half")
    (run / "saes" / "manifest.json").write_text("{}")
    with run_lock(run, "train-saes"):
        assert sorted(p.name for p in (run / "saes").iterdir()) == ["manifest.json"]


def write_config(tmp_path) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(f"base: {ROOT / 'configs/pipelines/default.yaml'}\n"
                      f"output: {{result_dir: {str(tmp_path / 'results')!r}, run_name: tiny}}\n")
    return config


def test_cli_refuses_a_second_writer_before_any_work(tmp_path):
    """Every writing subcommand is refused (exit 2, one line) while the folder is held, and the refused
    command never imported torch (it fails before any model or data work) nor touched the folder."""
    config = write_config(tmp_path)
    run = tmp_path / "results" / "tiny"
    code = ("import sys\nfrom refusal_lens.cli import main\nrc = main(sys.argv[1:])\n"
            "sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))\nsys.exit(rc)")
    with run_lock(run, "run"):
        for command in ("collect", "train-saes", "discover", "analyze", "run"):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code, command, "--config", str(config)], env=ENV,
                                  capture_output=True, text=True, timeout=60)
            seconds = time.perf_counter() - t0
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert lines == [f"refusal-lens {command}: error: {run} is being written by another refusal-lens command "
                             f"(PID {os.getpid()}, `refusal-lens run`); one writer per run folder: wait for it to "
                             f"finish (`refusal-lens status {run}`), stop it, or set output.run_name to write "
                             "elsewhere", "torch imported: False"], proc.stderr
            print(f"{command} refused in {seconds:.2f} s")
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # no status.json, nothing else
    # the readers never take the lock
    (run / "status.json").write_text(json.dumps({"run": str(run), "command": "run", "stages": []}))
    with run_lock(run, "run"):
        proc = subprocess.run([sys.executable, "-m", "refusal_lens", "status", str(run)], env=ENV,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


def test_torchrun_rank0_refused_stops_every_rank(tmp_path):
    """Under torchrun only rank 0 takes the lock; when it is refused the command fails (no rank waits
    forever for it in the process group) and nothing is written."""
    config = write_config(tmp_path)
    run = tmp_path / "results" / "tiny"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    with run_lock(run, "run"):
        proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "refusal_lens",
                               "collect", "--config", str(config)], env=ENV, capture_output=True, text=True,
                              timeout=180)
    assert proc.returncode != 0
    assert f"refusal-lens collect: error: {run} is being written by another refusal-lens command" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
