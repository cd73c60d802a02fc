"""The live status file (<run>/status.json) and `refusal-lens status`, without a model: a fake clock drives
StatusFile; the CLI wiring runs with stand-in stages. The end-to-end check on a tiny model is in
test_pipeline.py (test_run_end_to_end_then_skip)."""

import json
import logging
import subprocess
import sys

import pytest

from refusal_lens import cli
from refusal_lens.cli import main
from refusal_lens.errors import UserError
from refusal_lens.infra.status import StatusFile, StatusReadError, parse_time, rates_summary
from refusal_lens.infra.status_report import format_duration, format_status, read_status

from test_pipeline import write_config

RATES = [
    {"category": "hate", "label": "safe", "n": 4, "refused": 1, "refusal_rate": 0.25},
    {"category": "hate", "label": "toxic", "n": 2, "refused": 2, "refusal_rate": 1.0},
    {"category": "ALL", "label": "safe", "n": 4, "refused": 1, "refusal_rate": 0.25},
    {"category": "ALL", "label": "toxic", "n": 2, "refused": 2, "refusal_rate": 1.0},
]


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def on_disk(sf: StatusFile) -> dict:
    """The file as a reader sees it: always complete JSON, and no temporary file left next to it."""
    assert [p.name for p in sf.path.parent.iterdir() if p.name != "status.json"] == []
    return json.loads(sf.path.read_text())


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def status(tmp_path, clock):
    return StatusFile(tmp_path / "results" / "tiny" / "status.json", clock=clock, min_interval_s=1.0)


def test_begin_writes_every_field_and_pending_stages(status, tmp_path):
    status.begin("run", ["collect", "train-saes"])
    data = on_disk(status)
    assert data["run"] == str((tmp_path / "results" / "tiny").resolve())
    assert (data["command"], data["state"], data["current_stage"], data["error"]) == ("run", "running", None, None)
    assert isinstance(data["pid"], int) and data["started_at"] == data["updated_at"]
    assert [(s["name"], s["state"]) for s in data["stages"]] == [("collect", "pending"), ("train-saes", "pending")]
    assert set(data["stages"][0]) == {"name", "state", "started_at", "finished_at", "elapsed_s", "progress",
                                      "eta_s", "summary"}


def test_progress_eta_and_throttling(status, clock):
    status.begin("run", ["collect"])
    clock.t += 5
    status.start_stage("collect")
    assert on_disk(status)["current_stage"] == "collect"
    clock.t += 10
    status.progress(10, 40, "prompt")  # 10 prompts in 10 s: 30 to go take 30 s
    stage = on_disk(status)["stages"][0]
    assert stage["state"] == "running" and stage["progress"] == {"done": 10, "total": 40, "unit": "prompt"}
    assert stage["eta_s"] == pytest.approx(30.0) and stage["elapsed_s"] == pytest.approx(10.0)

    clock.t += 0.5
    status.progress(20)  # within min_interval_s of the last write: kept in memory only
    assert on_disk(status)["stages"][0]["progress"]["done"] == 10
    assert status.data["stages"][0]["progress"]["done"] == 20
    assert status.data["stages"][0]["eta_s"] == pytest.approx(10.5 / 20 * 20)
    clock.t += 0.6
    status.progress(25)  # 1.1 s after the last write
    assert on_disk(status)["stages"][0]["progress"] == {"done": 25, "total": 40, "unit": "prompt"}
    clock.t += 0.1
    status.progress(40)  # done == total always writes
    stage = on_disk(status)["stages"][0]
    assert stage["progress"]["done"] == 40 and stage["eta_s"] == 0.0


def test_eta_leaves_resumed_work_out_of_the_rate(status, clock):
    status.begin("collect", ["collect"])
    status.start_stage("collect")
    status.progress(30, 40, "prompt", initial=30)  # 30 prompts committed by an earlier, interrupted run
    assert on_disk(status)["stages"][0]["eta_s"] is None  # no rate yet
    clock.t += 10
    status.progress(35)  # 5 prompts in 10 s: 5 to go take 10 s
    assert on_disk(status)["stages"][0]["eta_s"] == pytest.approx(10.0)


def test_stage_and_run_finish_states(status, clock):
    status.begin("run", ["collect", "train-saes", "discover"])
    status.start_stage("collect")
    clock.t += 3
    status.finish_stage("collect", "skipped", {"prompts": 40})
    status.set(rates=RATES)
    status.start_stage("train-saes", total=2, unit="hook")
    clock.t += 7
    status.finish("failed", error="out of memory")
    data = on_disk(status)
    assert (data["state"], data["error"], data["current_stage"]) == ("failed", "out of memory", None)
    assert [s["state"] for s in data["stages"]] == ["skipped", "failed", "pending"]
    collect, saes, _ = data["stages"]
    assert collect["summary"] == {"prompts": 40} and collect["elapsed_s"] == pytest.approx(3.0)
    assert parse_time(collect["finished_at"]) - parse_time(collect["started_at"]) == pytest.approx(3.0, abs=1)
    assert saes["progress"] == {"done": 0, "total": 2, "unit": "hook"} and saes["elapsed_s"] == pytest.approx(7.0)
    assert data["rates"] == RATES

    status.begin("run", ["collect", "train-saes"])  # a new command starts from scratch
    status.start_stage("collect")
    status.finish("interrupted")
    data = on_disk(status)
    assert data["state"] == "interrupted" and data["error"] is None and data["rates"] is None
    assert [s["state"] for s in data["stages"]] == ["interrupted", "pending"]

    status.begin("train-saes", ["train-saes"])
    status.start_stage("train-saes")
    status.finish_stage("train-saes", summary={"saes": 2})
    status.finish()
    data = on_disk(status)
    assert data["state"] == "done" and data["stages"][0]["state"] == "done" and data["stages"][0]["eta_s"] == 0.0


def test_bad_states_and_fields_are_refused(status):
    status.begin("run", ["collect"])
    with pytest.raises(ValueError):
        status.finish_stage("collect", "pending")
    with pytest.raises(ValueError):
        status.finish("running")
    with pytest.raises(ValueError):
        status.set(stages=[])


def test_disabled_status_is_a_no_op(tmp_path, clock):
    for sf in (StatusFile(None, clock=clock), StatusFile(tmp_path / "r" / "status.json", enabled=False, clock=clock)):
        assert not sf.enabled
        sf.begin("run", ["collect"])
        sf.start_stage("collect")
        sf.progress(1, 2, "prompt")
        sf.set(rates=RATES)
        sf.finish_stage("collect")
        sf.finish("failed", error="x")
        assert sf.data == {}
    assert not (tmp_path / "r").exists()


def test_an_unwritable_status_never_stops_the_job(tmp_path, clock, caplog):
    (tmp_path / "a-file").write_text("")
    sf = StatusFile(tmp_path / "a-file" / "status.json", clock=clock)
    with caplog.at_level(logging.WARNING, logger="refusal_lens.infra.status"):
        sf.begin("run", ["collect"])
        sf.start_stage("collect")
        sf.finish("done")
    assert sum("cannot write" in r.message for r in caplog.records) == 1  # said once


def test_format_status_shows_stages_progress_eta_and_rates(status, clock):
    status.begin("run", ["collect", "train-saes"])
    status.start_stage("collect")
    clock.t += 60
    status.finish_stage("collect", summary={"prompts": 40, "refusal_rate": rates_summary(RATES)})
    status.set(rates=RATES)
    status.start_stage("train-saes")
    status.progress(0, 4, "hook")
    clock.t += 120
    status.progress(1)  # 1 hook in 2 min: 3 to go take 6 min
    text = format_status(status.data, now=clock.t + 5)
    assert "command: run" in text and "state: running" in text and "last update 5s ago" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert "done" in lines["collect"] and "1m00s" in lines["collect"]
    assert "running" in lines["train-saes"] and "1/4 hook (25%)" in lines["train-saes"]
    assert "2m05s" in lines["train-saes"] and "5m55s" in lines["train-saes"]  # elapsed and ETA as of now
    assert "refusal rates" in text and "1/4 (25.0%)" in text and "2/2 (100.0%)" in text
    assert 'refusal_rate={"safe": 0.25, "toxic": 1.0}' in text
    assert "warning" not in text  # this process is alive and the update is recent


def test_format_status_warns_when_the_job_looks_dead(status, clock):
    status.begin("run", ["collect"])
    status.start_stage("collect")
    data = status.data
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    data["pid"] = proc.pid  # a process that has ended
    text = format_status(data, now=clock.t + 10)
    assert f"(pid {proc.pid}) is not running" in text
    text = format_status(status.data, now=clock.t + 7200, stale_after_s=1800)
    assert "no update for 2h00m" in text and "is not running" not in text
    status.finish("failed", error="CUDA out of memory")
    text = format_status(status.data, now=clock.t + 7200)
    assert "error: CUDA out of memory" in text and "warning" not in text  # a finished run is not stale


def test_format_duration():
    assert [format_duration(s) for s in (None, 0.4, 59, 61, 3599, 3600 * 5 + 120, 86400 * 2 + 3600)] == [
        "-", "0s", "59s", "1m01s", "59m59s", "5h02m", "2d01h"]


def test_read_status_of_a_run_and_of_a_results_folder(tmp_path, clock):
    results = tmp_path / "results"
    for name, command in [("b-run", "collect"), ("a-run", "run")]:
        sf = StatusFile(results / name / "status.json", clock=clock)
        sf.begin(command, ["collect"])
    (results / "no-status").mkdir()
    assert [s["command"] for s in read_status(results)] == ["run", "collect"]  # sorted by run folder
    assert [s["command"] for s in read_status(results / "b-run")] == ["collect"]
    assert [s["command"] for s in read_status(results / "b-run" / "status.json")] == ["collect"]
    assert read_status(tmp_path / "missing") == [] and read_status(results / "no-status") == []
    (results / "no-status" / "status.json").write_text("{not json")
    with pytest.raises(StatusReadError) as err:
        read_status(results / "no-status")
    assert isinstance(err.value, UserError)


def test_cli_status(tmp_path, clock, capsys):
    assert main(["status", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusal-lens status: error: no status.json in" in err

    for name in ("one", "two"):
        sf = StatusFile(tmp_path / "results" / name / "status.json", clock=clock)
        sf.begin("run", ["collect", "train-saes"])
    assert main(["status", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert out.count("command: run") == 2 and "train-saes" in out
    assert main(["status", str(tmp_path / "results" / "two"), "--json"]) == 0
    [data] = json.loads(capsys.readouterr().out)
    assert data["run"].endswith("two") and data["stages"][1]["name"] == "train-saes"


class StandIn:
    """A stage of the pipeline's table that touches no model: ``run`` reports progress and returns, or raises."""

    all_ranks, what = False, "a stand-in"

    def __init__(self, name: str, raised: BaseException | None = None):
        self.name, self.raised = name, raised

    def check(self, ctx):
        pass

    def fingerprint(self, ctx):
        return {"stand-in": self.name}

    def run(self, ctx):
        ctx.status.progress(1, 2, "hook")
        if self.raised is not None:
            raise self.raised
        return {"prompts": 3}, {}

    def load(self, ctx):
        return {"prompts": 3}

    def outcome(self, ctx, result):
        from refusal_lens.infra.status import StageOutcome

        return [f"{self.name}: {result.summary}"], StageOutcome("done", result.summary)


@pytest.mark.parametrize("raised, code, state", [(KeyboardInterrupt(), 130, "interrupted"),
                                                  (UserError("bad data"), 2, "failed")])
def test_cli_stages_record_failure_and_interruption(tmp_path, monkeypatch, raised, code, state, capsys):
    """The wiring of a pipeline command with stand-in stages in the one table (no model): the CLI prints each
    stage's lines, the status gets each stage's outcome, progress and the final state."""
    from refusal_lens import pipeline

    stand_ins = {"collect": StandIn("collect"), "train-saes": StandIn("train-saes", raised)}
    monkeypatch.setattr(pipeline.StageSpec, "load", lambda spec: stand_ins[spec.name])
    monkeypatch.setitem(pipeline.COMMANDS, "run", ("collect", "train-saes"))
    config = write_config(tmp_path, tmp_path / "no-model-needed")
    assert main(["run", "--config", str(config)]) == code
    assert "collect: {'prompts': 3}" in capsys.readouterr().out
    data = json.loads((tmp_path / "results" / "tiny" / "status.json").read_text())
    assert data["state"] == state and data["command"] == "run"
    assert [(s["name"], s["state"]) for s in data["stages"]] == [("collect", "done"), ("train-saes", state)]
    assert data["stages"][0]["summary"] == {"prompts": 3}
    assert data["stages"][1]["progress"] == {"done": 1, "total": 2, "unit": "hook"}
    assert data["error"] == ("bad data" if state == "failed" else None)
    # the folders were prepared by the one stage-folder implementation: manifests, the finished one complete
    run = tmp_path / "results" / "tiny"
    assert json.loads((run / "activations" / "manifest.json").read_text())["status"] == "complete"
    assert json.loads((run / "saes" / "manifest.json").read_text())["status"] == "running"


def test_the_message_belongs_to_the_running_stage(status):
    status.begin("run", ["collect", "train-saes"])
    status.start_stage("collect")
    status.set(message="collect progress counts rank 0's block")
    assert on_disk(status)["message"] == "collect progress counts rank 0's block"
    status.finish_stage("collect")
    assert on_disk(status)["message"] == ""
