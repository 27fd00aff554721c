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
