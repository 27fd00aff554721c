"""Job progress: rows scored so far of the dataset's rows, an ETA, in the API, the CLI and the console.

The adapter's `Progress` file and the pieces that read it are checked one by one, then end to end:
a real control service (front door + Flask API, local runtime, real adapter processes), the GCS
emulator, and the fixture model tests/fixtures/progress/slow-batch, which writes one score every
`delay` seconds (0.1 by default) so that a job is seen while it runs. No assertion is on speed:
every wait is a poll with a generous deadline.
"""
from __future__ import annotations

import io
import json
import shutil
import types
from pathlib import Path

import pytest

from adapters.batch import PROGRESS_FILE, Progress, ProgressLog
from control.cli import _JobProgress, main
from control.runtime.base import Job
from control_helpers import TOKEN, api, running, settings_for, wait_until, token_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "progress"
MODEL = "slow-batch"


# -- the pieces ---------------------------------------------------------------------------------

def test_the_progress_file_is_throttled_but_the_total_and_the_end_are_written_at_once(tmp_path):
    path = tmp_path / PROGRESS_FILE
    p = Progress(path, interval=3600)
    p.update(scored=0)
    assert json.loads(path.read_text())["rows_scored"] == 0  # the first is written
    p.update(scored=5)
    assert json.loads(path.read_text())["rows_scored"] == 0  # throttled
    p.update(total=50)
    doc = json.loads(path.read_text())
    assert (doc["rows_scored"], doc["rows_total"], doc["done"]) == (5, 50, False)
    assert doc["first_rows"] == 5 and doc["first_at"] <= doc["updated_at"]
    p.update(scored=7)
    p.update(final=True)
    doc = json.loads(path.read_text())
    assert (doc["rows_scored"], doc["done"]) == (7, True)
    assert sorted(f.name for f in tmp_path.iterdir()) == [PROGRESS_FILE]  # renamed into place, no leftovers


def test_progress_without_a_path_writes_nothing(tmp_path):
    p = Progress(None)
    p.update(scored=3, total=4, final=True)
    assert p.document()["rows_scored"] == 3 and not list(tmp_path.iterdir())


def test_the_knative_adapter_logs_progress_lines_only_when_they_moved():
    stream = io.StringIO()
    log = ProgressLog(100, interval=0, stream=stream)
    log.update(10)
    log.update(10)  # unchanged: no line
    log.update(None)  # unknown: the last count stands, no line
    log.update(20, final=True)
    lines = [json.loads(line)["progress"] for line in stream.getvalue().splitlines()]
    assert [(d["rows_scored"], d["rows_total"], d["done"]) for d in lines] == [(10, 100, False), (20, 100, True)]


def job(status: str = "running") -> Job:
    return Job(id="j", model="m", version="1", status=status, dataset="gs://b/d.csv", created_at="2026-01-01T00:00:00Z")


def test_eta_comes_from_the_rate_since_the_first_score():
    doc = {"rows_scored": 110, "rows_total": 1110, "updated_at": 110.0, "first_at": 100.0, "first_rows": 10}
    j = job()
    j.apply_progress(doc, now=115.0)  # 100 rows in 10 s: 1000 left is 100 s, 5 of them gone since
    assert (j.rows_scored, j.rows_total, j.eta_seconds) == (110, 1110, 95.0)
    assert j.progress_at.startswith("1970-01-01T00:01:50")
    j.apply_progress({**doc, "updated_at": 100.2}, now=100.2)  # too soon to tell
    assert j.eta_seconds is None
    j.apply_progress({**doc, "first_at": None}, now=115.0)  # no score seen yet
    assert j.eta_seconds is None
    j.apply_progress({**doc, "rows_scored": 1110}, now=115.0)
    assert j.eta_seconds == 0.0
    done = job("failed")
    done.apply_progress(doc, now=115.0)
    assert (done.rows_scored, done.eta_seconds) == (110, None)
    done.apply_progress({"rows_scored": "many"})  # malformed: nothing changes
    assert done.rows_scored == 110


def test_the_knative_runtime_reads_progress_from_the_adapter_log_and_keeps_it_out_of_the_tail():
    from control.runtime.knative import KnativeRuntime

    log = "\n".join([
        "loading",
        json.dumps({"progress": {"rows_scored": 3, "rows_total": 10, "updated_at": 1.0, "first_at": 0.0,
                                 "first_rows": 1, "done": False}}),
        "still going",
        json.dumps({"progress": {"rows_scored": 6, "rows_total": 10, "updated_at": 2.0, "first_at": 0.0,
                                 "first_rows": 1, "done": False}}),
    ])
    fake = types.SimpleNamespace(_list=lambda kind, selector: [{"metadata": {"name": "pod-1"}}],
                                 _request=lambda *a, **k: log)
    j = job()
    KnativeRuntime._add_result(fake, j)
    assert (j.rows_scored, j.rows_total) == (6, 10)
    assert j.log_tail == "loading\nstill going"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def running_job(scored, total, eta=12.0) -> dict:
    return {"id": "j1", "status": "running", "rows_scored": scored, "rows_total": total, "eta_seconds": eta}


def test_cli_progress_on_a_terminal_is_one_bar_redrawn_in_place():
    term = Terminal()
    bar = _JobProgress(term)
    for scored in (0, 250, 500):
        bar.show(running_job(scored, 1000))
    bar.show({**running_job(1000, 1000), "status": "succeeded"})
    bar.close()
    text = term.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "500/1,000 rows  50% · ETA 0:12" in text
    assert "1,000/1,000 rows 100%" in text.rsplit("\r", 1)[1]


def test_cli_progress_elsewhere_is_a_line_each_ten_percent_or_every_few_seconds():
    now = [0.0]
    out = io.StringIO()
    bar = _JobProgress(out, clock=lambda: now[0])
    for scored in range(0, 1001, 5):  # 201 polls, no time passing
        bar.show(running_job(scored, 1000, eta=None))
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].endswith("0/1,000 rows   0% · ETA …") and "100%" in lines[-1]
    assert "\r" not in out.getvalue()
    out2 = io.StringIO()
    bar = _JobProgress(out2, clock=lambda: now[0])
    bar.show(running_job(1, 1000))
    bar.show(running_job(2, 1000))  # same tenth, no time passed: nothing
    now[0] += 6
    bar.show(running_job(3, 1000))  # a few seconds later: a line
    assert len(out2.getvalue().splitlines()) == 2
    bar.close()
    assert _JobProgress.text({"id": "x", "status": "queued"}) is None


# -- end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plane(gcs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    settings = settings_for(tmp, start_timeout=30)
    shutil.copytree(FIXTURES / MODEL, settings.models_dir / MODEL)
    with running(settings) as server:
        yield server


def upload(gcs_client, name: str, xs: list[float], delay: float | None = None) -> str:
    body = "x,delay\n" + "".join(f"{x},{'' if delay is None else delay}\n" for x in xs)
    gcs_client.bucket("test-bucket").blob(f"data/{name}").upload_from_string(body, content_type="text/csv")
    return f"gs://test-bucket/data/{name}"


def submit(server, dataset: str) -> str:
    r = api.post(f"{server.url}/api/models/{MODEL}/jobs", json={"dataset": dataset})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def get_job(server, job_id: str) -> dict:
    r = api.get(f"{server.url}/api/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def test_a_running_job_shows_rows_scored_rising_to_the_total(plane, gcs_client):
    job_id = submit(plane, upload(gcs_client, "rising.csv", list(range(40))))  # 40 rows, ~4 s
    seen = []

    def finished():
        j = get_job(plane, job_id)
        seen.append(j)
        return j["status"] in ("succeeded", "failed") and j

    done = wait_until(finished, 120, interval=0.1, what=f"job {job_id}")
    assert done["status"] == "succeeded", (done["error"], done["log_tail"])
    assert (done["rows"], done["rows_scored"], done["rows_total"]) == (40, 40, 40)
    assert done["eta_seconds"] is None and done["progress_at"]
    mid = [j for j in seen if j["status"] == "running" and j["rows_scored"] is not None]
    assert mid, "no poll saw the job running with progress"
    counts = [j["rows_scored"] for j in mid]
    assert counts == sorted(counts), counts  # never goes back
    assert any(0 < c < 40 for c in counts), counts
    assert all(j["rows_total"] in (None, 40) for j in mid)
    assert any(j["eta_seconds"] is not None and j["eta_seconds"] > 0 for j in mid if j["rows_scored"] < 35), mid
    listed = api.get(f"{plane.url}/api/jobs", params={"model": MODEL}).json()
    assert next(j for j in listed if j["id"] == job_id)["rows_scored"] == 40


def test_a_failed_job_keeps_the_rows_it_reached(plane, gcs_client):
    job_id = submit(plane, upload(gcs_client, "breaks.csv", [1] * 12 + [-1, 2, 3], delay=0))  # scores read after the exit count too
    done = wait_until(lambda: (j := get_job(plane, job_id))["status"] in ("succeeded", "failed") and j, 120,
                      what=f"job {job_id}")
    assert done["status"] == "failed" and "exited with status 3" in done["error"], done["error"]
    assert (done["rows_scored"], done["rows_total"], done["eta_seconds"]) == (12, 15, None)


def test_run_wait_prints_progress_on_stderr_and_its_usual_result(plane, gcs_client, capsys, monkeypatch):
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    dataset = upload(gcs_client, "cli.csv", list(range(30)))
    code = main(["run", MODEL, dataset, "--wait", "--timeout", "120", "--url", plane.url, "--token-file", token_file(TOKEN)])
    captured = capsys.readouterr()
    assert code == 0, captured
    assert "status       succeeded" in captured.out and "rows         30" in captured.out
    assert "rows scored" not in captured.out and "ETA" not in captured.out  # stdout is as it was
    progress = [line for line in captured.err.splitlines() if line.startswith("job ")]
    assert progress and progress[-1].endswith("30/30 rows 100%"), captured.err
    assert "\r" not in captured.err  # not a terminal: lines, not a redrawn bar
    assert len(progress) <= 12, progress  # each 10 % (or every few seconds), not every poll


def test_console_jobs_page_shows_a_progress_bar_for_a_running_job(plane, gcs_client, monkeypatch, tmp_path):
    pytest.importorskip("streamlit")
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    job_id = submit(plane, upload(gcs_client, "console.csv", list(range(200))))  # ~20 s
    wait_until(lambda: (j := get_job(plane, job_id))["rows_total"] and j["rows_scored"], 60, interval=0.1,
               what="the job's progress")
    monkeypatch.setenv("MODELPLANE_URL", plane.url)
    monkeypatch.setenv("MODELPLANE_TOKEN", TOKEN)
    monkeypatch.setenv("MODELPLANE_STATE_DIR", str(tmp_path / "no-state"))
    config.set_option("server.address", "127.0.0.1")  # loopback: the console uses MODELPLANE_TOKEN
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "console" / "app.py"), default_timeout=90)
    at.run()
    at.switch_page("views/jobs.py")
    at.query_params.update(batch=MODEL)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    bars = [el.proto for el in at.get("progress")]
    mine = [b for b in bars if job_id in b.text]
    assert mine, ([b.text for b in bars], [m.value for m in at.markdown])
    assert " / 200 rows scored (" in mine[0].text and mine[0].value < 100, mine[0]
    # the job runs on; the plane's teardown stops it
