"""The local runtime's batch job runner: jobs taken by a warm spare adapter, and what happens when
the spare cannot take one. Real processes; every wait is a poll with a generous deadline."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from adapters.manifest import load_manifest
from control.runtime.local import LocalRuntime
from control.runtime.local_procs import descendants
from control.settings import Settings
from test_local_runtime import alive, make_model, wait_for


@pytest.fixture
def rt(tmp_path, monkeypatch):
    """Made in the test's body, not at set-up: a spare is used only with the environment it was
    started with, and pytest's own PYTEST_CURRENT_TEST differs between set-up and the test."""
    monkeypatch.setenv("MODELPLANE_LOG_LEVEL", "DEBUG")  # the adapter logs its timings: proof its stderr is the job's
    made = []

    def make() -> LocalRuntime:
        runtime = LocalRuntime(Settings(state_dir=tmp_path / "state", job_concurrency=1, bucket="test-bucket"))
        runtime.start()
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


def spare_pid(rt: LocalRuntime) -> int:
    return wait_for(lambda: rt.runner.spare.waiting, what="a spare adapter").pid


def run_job(rt: LocalRuntime, dataset: Path):
    job, _ = rt.submit_job("scorer", dataset=str(dataset))
    return wait_for(lambda: (j := rt.job(job.id)).status in ("succeeded", "failed") and j, what=f"job {job.id}")


def test_jobs_run_in_the_warm_spare_which_is_replaced_after_each(rt, tmp_path):
    rt = rt()
    rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
    dataset = tmp_path / "in.csv"
    dataset.write_text("x,sleep\n1,\n2,\n")
    first_spare = spare_pid(rt)
    done = run_job(rt, dataset)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert rt.runner.spare.used == 1
    log = Path(rt.state_dir, "logs", "jobs", f"{done.id}.err").read_text()
    assert f"job {done.id} succeeded, seconds since start:" in log  # the adapter's log, in the job's file
    second_spare = spare_pid(rt)
    assert second_spare != first_spare and not alive(first_spare)
    again = run_job(rt, dataset)
    assert again.status == "succeeded" and again.rows == 2 and rt.runner.spare.used == 2
    assert (Path(again.results_uri)).read_text().splitlines()[1:] == ["2.0", "4.0"]


def test_a_dead_spare_means_a_cold_start_not_a_failed_job(rt, tmp_path):
    rt = rt()
    rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
    dataset = tmp_path / "in.csv"
    dataset.write_text("x,sleep\n3,\n")
    os.kill(spare_pid(rt), signal.SIGKILL)
    done = run_job(rt, dataset)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert rt.runner.spare.used == 0 and done.rows == 1


def test_a_spare_started_with_another_environment_is_not_used(rt, tmp_path, monkeypatch):
    rt = rt()
    rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
    dataset = tmp_path / "in.csv"
    dataset.write_text("x,sleep\n3,\n")
    stale = spare_pid(rt)
    monkeypatch.setenv("MODELPLANE_TEST_CHANGED", "1")  # e.g. credentials rotated since the spare started
    done = run_job(rt, dataset)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert rt.runner.spare.used == 0 and not alive(stale)


def test_close_stops_the_spare(tmp_path):
    rt = LocalRuntime(Settings(state_dir=tmp_path / "state", job_concurrency=2, bucket="test-bucket"))
    rt.start()
    pid = spare_pid(rt)
    tree = descendants(pid)
    rt.close()
    assert not alive(pid) and not [p for p in tree if alive(p)]
    assert rt.runner.spare.waiting is None


def test_a_spare_reports_the_adapters_exit_status_and_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPLANE_LOG_LEVEL", "NOPE")  # the adapter's logging set-up raises: no result printed
    rt = LocalRuntime(Settings(state_dir=tmp_path / "state", job_concurrency=1, bucket="test-bucket"))
    rt.start()
    try:
        rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
        dataset = tmp_path / "in.csv"
        dataset.write_text("x,sleep\n1,\n")
        spare_pid(rt)
        done = run_job(rt, dataset)
        assert rt.runner.spare.used == 1
        assert done.status == "failed", done
        assert done.error == "the batch adapter exited with status 1 without printing a result", done.error
        assert "Traceback" in done.log_tail and "NOPE" in done.log_tail
    finally:
        rt.close()


# -- cancel -------------------------------------------------------------------------------------

def model_pids(adapter_pid: int) -> list[int]:
    """The processes below a job's adapter that run the model's score.py."""
    pids = []
    for pid in descendants(adapter_pid):
        try:
            if b"score.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_cancel_stops_a_running_job_and_a_queued_one_never_starts(rt, tmp_path, gcs, gcs_client):
    from control.errors import Conflict, NotFound

    rt = rt()
    rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
    bucket = gcs_client.bucket("test-bucket")
    bucket.blob("incoming/scorer/slow.csv").upload_from_string("x,sleep\n1,120\n2,\n", content_type="text/csv")
    bucket.blob("incoming/scorer/fast.csv").upload_from_string("x,sleep\n1,\n", content_type="text/csv")
    slow, _ = rt.submit_job("scorer", dataset="gs://test-bucket/incoming/scorer/slow.csv")
    waiting, _ = rt.submit_job("scorer", dataset="gs://test-bucket/incoming/scorer/fast.csv")  # one worker: queued
    adapter = wait_for(lambda: rt.runner._procs.get(slow.id), what="the slow job's adapter").pid
    models = wait_for(lambda: model_pids(adapter), what="the slow job's model process")
    tree = [adapter, *descendants(adapter)]
    assert rt.job(waiting.id).status == "queued"

    queued = rt.cancel_job(waiting.id, by="tester")
    assert (queued.status, queued.error, queued.started_at) == ("failed", "cancelled by tester", None)
    assert queued.finished_at

    cancelled = rt.cancel_job(slow.id, by="tester")
    assert (cancelled.status, cancelled.error) == ("failed", "cancelled by tester"), cancelled
    assert cancelled.results_uri is None and cancelled.finished_at and cancelled.score_summary == {}
    assert not alive(adapter) and not [p for p in models + tree if alive(p)], "a process of the job outlived it"
    assert not bucket.blob(f"results/scorer/{slow.id}/scores.csv").exists()
    # the adapter, stopped, wrote its result as failed
    assert json.loads(bucket.blob(f"results/scorer/{slow.id}/result.json").download_as_bytes())["status"] == "failed"
    assert rt.job(slow.id) == cancelled
    assert rt.jobs(model="scorer")[0].cancelled

    # again: changes nothing; the queued one never ran
    assert rt.cancel_job(slow.id, by="someone-else") == cancelled
    assert not Path(rt.state_dir, "logs", "jobs", f"{waiting.id}.out").exists()
    assert rt.job(waiting.id).status == "failed"

    # a job that ended is not cancelled (409 naming its status); an unknown one is 404
    done, _ = rt.submit_job("scorer", dataset="gs://test-bucket/incoming/scorer/fast.csv")
    done = wait_for(lambda: (j := rt.job(done.id)).status in ("succeeded", "failed") and j, what="the fast job")
    assert done.status == "succeeded", (done.error, done.log_tail)
    with pytest.raises(Conflict, match=f"job {done.id} has ended: it is succeeded") as err:
        rt.cancel_job(done.id, by="tester")
    assert err.value.details == {"job": done.id, "status": "succeeded"}
    assert rt.job(done.id).status == "succeeded"
    with pytest.raises(NotFound):
        rt.cancel_job("20990101-000000-abcdef", by="tester")


# -- a realtime model run as a job: its dataset streamed through its replicas ------------------
#
# A real control service (front door, API, watcher, local runtime, real adapter replicas), the
# GCS emulator, and the fixture model tests/fixtures/local/echo (score = x * factor; a row's
# `delay` holds its request, `crash: true` kills the model process) with limits.max_rows 7, so a
# dataset of a few dozen rows is many chunks, up to scaling.max (3) of them in flight.

STREAM = "echo"
CRASHER = "crasher"


@pytest.fixture(scope="module")
def stream_plane(gcs, tmp_path_factory):
    import shutil

    import yaml

    from control_helpers import running, settings_for

    tmp = tmp_path_factory.mktemp("streamjob")
    settings = settings_for(tmp, start_timeout=30, job_concurrency=2)
    dest = Path(shutil.copytree(Path(__file__).parent / "fixtures" / "local" / STREAM, settings.models_dir / STREAM))
    data = yaml.safe_load((dest / "model.yaml").read_text())
    data["limits"] = {"max_rows": 7}
    (dest / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (dest / "params.json").write_text(json.dumps({"factor": 3}))
    # the crash test's own model, one replica: a crash never takes the other tests' model down
    crasher = Path(shutil.copytree(dest, settings.models_dir / CRASHER))
    data.update(name=CRASHER, scaling={"min": 0, "max": 1, "target_concurrency": 4, "idle_timeout": "60s"})
    (crasher / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with running(settings, watch=True) as server:
        yield server


def echo_csv(xs, *, delay=None, crash_at=None, bad_at=None) -> str:
    lines = ["x,delay,crash"]
    for i, x in enumerate(xs, start=1):
        cell = "abc" if i == bad_at else f"{x}"
        lines.append(f"{cell},{'' if delay is None else delay},{'true' if i == crash_at else ''}")
    return "\n".join(lines) + "\n"


def stream_job(server, job_id: str) -> dict:
    from control_helpers import api

    r = api.get(f"{server.url}/api/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def submit_stream(server, gcs_client, name: str, body: str, model: str = STREAM) -> str:
    from control_helpers import api

    gcs_client.bucket("test-bucket").blob(f"data/{name}").upload_from_string(body, content_type="text/csv")
    r = api.post(f"{server.url}/api/models/{model}/jobs", json={"dataset": f"gs://test-bucket/data/{name}"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def ended(server, job_id: str) -> dict:
    from control_helpers import wait_until

    return wait_until(lambda: (j := stream_job(server, job_id))["status"] in ("succeeded", "failed") and j, 120,
                      interval=0.1, what=f"job {job_id}")


def test_run_wait_on_a_realtime_model_streams_the_file_and_scores_match_predict(stream_plane, gcs_client, tmp_path,
                                                                                capsys, monkeypatch):
    from control.cli import main
    from control_helpers import AUTH, TOKEN, api, token_file

    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    xs = [round(i * 0.37 - 5, 2) for i in range(60)]   # 60 rows: 9 chunks of at most 7
    data = tmp_path / "people.csv"
    data.write_text(echo_csv(xs))
    code = main(["run", STREAM, str(data), "--wait", "--timeout", "120", "--url", stream_plane.url,
                 "--token-file", token_file(TOKEN)])
    captured = capsys.readouterr()
    assert code == 0, captured
    assert "status       succeeded" in captured.out and "rows         60" in captured.out, captured.out
    job_id = next(line.split()[1] for line in captured.out.splitlines() if line.startswith("job "))
    job = stream_job(stream_plane, job_id)
    assert (job["status"], job["rows"], job["rows_scored"], job["rows_total"]) == ("succeeded", 60, 60, 60)
    assert job["trigger"] == "event" and job["version"] == "1.0.0"
    bucket = gcs_client.bucket("test-bucket")
    scores = bucket.blob(f"results/{STREAM}/{job_id}/scores.csv").download_as_text().splitlines()
    # what the model answers for the same rows on /predict (7 at a time: its max_rows), in the same order
    lines = data.read_text().splitlines()
    predicted = []
    for i in range(1, len(lines), 7):
        answer = api.post(f"{stream_plane.url}/models/{STREAM}/predict", headers={**AUTH, "Content-Type": "text/csv"},
                          data="\n".join([lines[0], *lines[i:i + 7]]) + "\n")
        assert answer.status_code == 200, answer.text
        predicted += answer.json()["scores"]
    assert scores[0] == "y" and [float(s) for s in scores[1:]] == predicted
    assert [float(s) for s in scores[1:]] == [x * 3 for x in xs]
    result = json.loads(bucket.blob(f"results/{STREAM}/{job_id}/result.json").download_as_bytes())
    assert result["status"] == "succeeded" and result["rows"] == 60 and result["job"] == job_id
    assert result["results_uri"] == f"gs://test-bucket/results/{STREAM}/{job_id}/scores.csv"
    assert result["input"]["md5"] and result["input"]["uri"].startswith(f"gs://test-bucket/incoming/{STREAM}/")
    summary = result["score_summary"]
    assert summary["count"] == 60 and summary["quantiles"]["min"] == min(xs) * 3
    assert summary["quantiles"]["max"] == max(xs) * 3
    assert job["score_summary"]["count"] == 60
    listed = api.get(f"{stream_plane.url}/api/jobs", params={"model": STREAM}, headers=AUTH).json()
    assert job_id in [j["id"] for j in listed]


def test_a_dataset_dropped_into_the_bucket_starts_the_realtime_models_job_once(stream_plane, gcs_client):
    from control_helpers import AUTH, api, wait_until

    blob = gcs_client.bucket("test-bucket").blob(f"incoming/{STREAM}/dropped.csv")
    blob.upload_from_string(echo_csv([1, 2, 3, 4, 5, 6, 7, 8]), content_type="text/csv")
    uri = f"gs://test-bucket/incoming/{STREAM}/dropped.csv"

    def started():
        jobs = api.get(f"{stream_plane.url}/api/jobs", params={"model": STREAM}, headers=AUTH).json()
        return [j for j in jobs if j["dataset"] == uri]

    job = wait_until(started, 60, interval=0.1, what="the watcher's job for the dropped file")[0]
    assert job["trigger"] == "event"
    done = ended(stream_plane, job["id"])
    assert done["status"] == "succeeded", done
    scores = gcs_client.bucket("test-bucket").blob(f"results/{STREAM}/{job['id']}/scores.csv").download_as_text()
    assert scores.split() == ["y", *[str(float(x * 3)) for x in range(1, 9)]]
    # the watcher's later looks deliver the same event again: still one job
    wait_until(lambda: api.get(f"{stream_plane.url}/api/events", params={"model": STREAM}, headers=AUTH).json(), 10,
               what="the event log")
    import time as _time

    _time.sleep(1.0)   # several watcher polls (0.2 s apart)
    assert len(started()) == 1


def test_a_bad_row_fails_the_job_naming_its_row_in_the_whole_file_and_publishes_nothing(stream_plane, gcs_client):
    job_id = submit_stream(stream_plane, gcs_client, "bad.csv", echo_csv(range(40), bad_at=23))
    done = ended(stream_plane, job_id)
    assert done["status"] == "failed", done
    assert done["problems"] == [{"row": 23, "field": "x", "error": done["problems"][0]["error"]}], done["problems"]
    assert "number" in done["problems"][0]["error"]
    assert "23" in done["error"] or "x" in done["error"], done["error"]
    bucket = gcs_client.bucket("test-bucket")
    assert not bucket.blob(f"results/{STREAM}/{job_id}/scores.csv").exists()
    result = json.loads(bucket.blob(f"results/{STREAM}/{job_id}/result.json").download_as_bytes())
    assert result["status"] == "failed" and result["results_uri"] is None and result["problems"][0]["row"] == 23


def test_a_model_crash_mid_job_fails_it_naming_the_rows(stream_plane, gcs_client):
    job_id = submit_stream(stream_plane, gcs_client, "crash.csv", echo_csv(range(30), crash_at=17), CRASHER)
    done = ended(stream_plane, job_id)
    assert done["status"] == "failed", done
    assert done["error"].startswith("the model could not score rows 15–21: HTTP 502"), done["error"]
    assert done["results_uri"] is None and done["rows_scored"] == 14
    assert not gcs_client.bucket("test-bucket").blob(f"results/{CRASHER}/{job_id}/scores.csv").exists()
    # the model is restarted: the next job runs
    again = ended(stream_plane, submit_stream(stream_plane, gcs_client, "after-crash.csv", echo_csv(range(10)),
                                              CRASHER))
    assert again["status"] == "succeeded", again


def test_a_streamed_job_reports_progress_and_can_be_cancelled(stream_plane, gcs_client, capsys, monkeypatch):
    from control.cli import main
    from control_helpers import TOKEN, token_file, wait_until

    # 70 rows of 0.3 s each, 7 rows a chunk, 3 chunks in flight: a few seconds at least
    job_id = submit_stream(stream_plane, gcs_client, "slow.csv", echo_csv(range(70), delay=0.3))
    seen = wait_until(lambda: (j := stream_job(stream_plane, job_id))["rows_scored"] and j, 60, interval=0.05,
                      what="the job's progress")
    assert seen["status"] == "running" and seen["rows_total"] == 70 and 0 < seen["rows_scored"] < 70, seen
    later = wait_until(lambda: (j := stream_job(stream_plane, job_id))["eta_seconds"] is not None and j
                       or j["status"] != "running" and j, 60, interval=0.05, what="an ETA")
    assert later["status"] == "running" and later["eta_seconds"] > 0, later
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert main(["cancel", job_id, "--url", stream_plane.url, "--token-file", token_file(TOKEN)]) == 0
    assert "is failed: cancelled by" in capsys.readouterr().out
    done = stream_job(stream_plane, job_id)
    assert done["status"] == "failed" and done["error"].startswith("cancelled by") and done["rows_scored"] < 70
    assert not gcs_client.bucket("test-bucket").blob(f"results/{STREAM}/{job_id}/scores.csv").exists()
