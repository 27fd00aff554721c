"""The local runtime through its Runtime interface: real adapter processes, real HTTP, real files.

Fixture models are under tests/fixtures/local/ (standard-library Python). Every wait is a
poll with a generous deadline; nothing asserts how long something took.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from adapters.manifest import load_manifest
from control.errors import BadRequest, Conflict, PlaneError, Unavailable, UpstreamError
from control.runtime.local import LocalRuntime
from control.runtime.local_jobs import INTERRUPTED
from control.runtime.local_procs import descendants
from control.settings import Settings

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "local"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (ROOT / "adapters" / "__main__.py").exists(), reason="the adapter is not built yet")


# -- helpers ------------------------------------------------------------------------------
def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def make_model(tmp_path: Path, fixture: str, *, folder: str | None = None, params: dict | None = None,
               **manifest) -> Path:
    """A copy of a fixture model with manifest fields and params.json replaced."""
    dest = tmp_path / "src" / (folder or f"{fixture}-{manifest.get('name', fixture)}-{manifest.get('version', '1.0.0')}")
    shutil.copytree(FIXTURES / fixture, dest)
    data = yaml.safe_load((dest / "model.yaml").read_text())
    data.update(manifest)
    (dest / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if params is not None:
        (dest / "params.json").write_text(json.dumps(params))
    return dest


def predict(rt: LocalRuntime, name: str, rows: list[dict]):
    return rt.forward(name, method="POST", path="/predict", headers={"Content-Type": "application/json"},
                      body=json.dumps({"rows": rows}).encode())


def scores(rt: LocalRuntime, name: str, rows: list[dict]) -> list:
    resp = predict(rt, name, rows)
    assert resp.status == 200, resp.body
    return json.loads(resp.body)["scores"]


def replica_procs(rt: LocalRuntime, name: str) -> dict[str, list]:
    """Adapter processes of `name` by version (the runtime's own bookkeeping)."""
    out: dict[str, list] = {}
    with rt.replicas._lock:
        for (model, version), rev in rt.replicas._revisions.items():
            if model == name:
                out.setdefault(version, []).extend(r.proc for r in rev.replicas if r.proc is not None)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def settings(tmp_path):
    return Settings(state_dir=tmp_path / "state", start_timeout=30, max_restarts=3, job_concurrency=2,
                    bucket="test-bucket")


@pytest.fixture
def rt(settings):
    runtime = LocalRuntime(settings)
    runtime.start()
    yield runtime
    runtime.close()


# -- realtime: activator and autoscaler ---------------------------------------------------
def test_a_cold_start_takes_the_warm_spare_adapter_and_a_new_one_is_made(rt, tmp_path, monkeypatch):
    spare = rt.replicas._spare
    wait_for(lambda: spare.started == 1 and spare.waiting, what="a spare adapter")
    # the deploy check's replica is a cold start too: it takes the first spare, and is stopped after
    rt.deploy(load_manifest(make_model(tmp_path, "echo", params={"factor": 3})))
    assert spare.used == 1
    waiting = wait_for(lambda: spare.started == 2 and spare.waiting, what="the next spare")
    wait_for(lambda: not replica_procs(rt, "echo").get("1.0.0"), what="the checked replica stopped")
    assert scores(rt, "echo", [{"x": 2}]) == [6]
    assert spare.used == 2
    assert [p.pid for p in replica_procs(rt, "echo")["1.0.0"]] == [waiting.pid]   # the spare became the replica
    wait_for(lambda: spare.started == 3, what="the next spare")
    # a spare made with an environment that no longer holds is dropped, never used
    monkeypatch.setenv("MODELPLANE_TEST_CHANGED", "1")
    stale = wait_for(lambda: spare.waiting, what="the next spare")
    assert spare.take(rt.replicas._argv(tmp_path, 1), tmp_path / "o.log", tmp_path / "o.log") is None
    assert stale.poll() is not None and spare.used == 2


def test_replicas_answer_this_runtime_only(rt, tmp_path):
    """Each runtime makes a secret its adapters require (MODELPLANE_ADAPTER_SECRET); it sends it on
    every forward and readiness poll. A process calling a replica's loopback port directly gets a
    401; the model and the batch jobs never see the secret; a caller's own header is not passed on."""
    import requests

    rt.deploy(load_manifest(make_model(tmp_path, "echo", params={"factor": 3})))
    assert scores(rt, "echo", [{"x": 2}]) == [6]
    [replica] = [r for rev in rt.replicas._revisions.values() for r in rev.replicas]
    url = f"http://127.0.0.1:{replica.port}"
    for method, path in (("POST", "/predict"), ("GET", "/metrics"), ("GET", "/v2/health/ready")):
        r = requests.request(method, url + path, json={"rows": [{"x": 2}]} if method == "POST" else None, timeout=10)
        assert r.status_code == 401 and "X-Modelplane-Secret" in r.json()["error"], (path, r.text)
    forged = rt.forward("echo", method="POST", path="/predict", body=json.dumps({"rows": [{"x": 1}]}).encode(),
                        headers={"Content-Type": "application/json", "x-modelplane-secret": "guess",
                                 "Origin": "http://localhost:3000"})
    assert forged.status == 200, forged.body
    secret = rt._adapter_secret
    assert len(secret) >= 40 and "MODELPLANE_ADAPTER_SECRET" not in os.environ
    model = descendants(replica.proc.pid)
    assert model, "the adapter has no model process"
    for pid in [replica.proc.pid, *model]:   # the adapter's own start-up environment: readable by its model
        assert secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert "MODELPLANE_ADAPTER_SECRET" not in rt._env()   # batch jobs' environment
    # a spare adapter waiting for its run wipes it at once too (its model-to-be's neighbours could read it)
    spare = wait_for(lambda: rt.replicas._spare.waiting, what="a spare adapter")
    wait_for(lambda: secret.encode() not in Path(f"/proc/{spare.pid}/environ").read_bytes(), timeout=20,
             what="the spare adapter to wipe the secret from its environment")
    other = LocalRuntime(Settings(state_dir=tmp_path / "other-state"))
    try:
        assert other._adapter_secret != secret
    finally:
        other.close()


def test_first_request_at_zero_is_held_and_answered(rt, tmp_path):
    rt.deploy(load_manifest(make_model(tmp_path, "echo", params={"factor": 3, "startup_delay": 0.5})))
    assert rt.model("echo").status == "idle"
    assert scores(rt, "echo", [{"x": 2}, {"x": 5}]) == [6, 15]
    info = rt.models()[0]
    assert (info.status, info.replicas) == ("ready", 1)
    metrics = rt.model("echo").metrics
    assert metrics["cold_starts"] == 1 and metrics["requests"] == 1 and metrics["errors"] == 0
    assert metrics["p50_ms"] is not None and metrics["history"][-1]["requests"] == 1


def test_burst_of_50_at_zero_all_succeed(rt, tmp_path):
    rt.deploy(load_manifest(make_model(tmp_path, "echo", params={"factor": 1, "startup_delay": 0.5})))
    barrier = threading.Barrier(50)

    def one(i):
        barrier.wait()
        return predict(rt, "echo", [{"x": i}])

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert [r.status for r in results] == [200] * 50
    assert [json.loads(r.body)["scores"] for r in results] == [[i] for i in range(50)]
    assert rt.model("echo").metrics["errors"] == 0


def test_sustained_load_scales_out_then_back_to_zero(rt, tmp_path):
    rt.deploy(load_manifest(make_model(
        tmp_path, "echo", scaling={"min": 0, "max": 3, "target_concurrency": 1, "idle_timeout": "2s"})))
    stop = threading.Event()
    failures = []

    def load():
        while not stop.is_set():
            resp = predict(rt, "echo", [{"x": 1, "delay": 0.2}])
            if resp.status != 200:
                failures.append(resp)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: rt.model("echo").replicas >= 2, timeout=60, what="a second replica under load")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    detail = wait_for(lambda: (d := rt.model("echo")).status == "idle" and d.replicas == 0 and d,
                      timeout=30, what="scale to zero after idle_timeout")
    assert max(p["replicas"] for p in detail.metrics["history"]) >= 2
    wait_for(lambda: not any(replica_procs(rt, "echo").values()), what="replica processes gone")


def test_min_replicas_are_kept_warm(rt, tmp_path):
    rt.deploy(load_manifest(make_model(
        tmp_path, "echo", scaling={"min": 1, "max": 2, "target_concurrency": 4, "idle_timeout": "1s"})))
    wait_for(lambda: rt.model("echo").status == "ready", what="a warm replica without any request")
    time.sleep(2)   # longer than idle_timeout: min still holds it
    assert rt.model("echo").replicas == 1
    assert rt.model("echo").metrics["cold_starts"] == 0


# -- realtime: crashes ----------------------------------------------------------------------
def test_killed_model_is_replaced_and_the_error_says_so(rt, tmp_path):
    rt.deploy(load_manifest(make_model(tmp_path, "echo")))
    assert scores(rt, "echo", [{"x": 1}]) == [1]
    [adapter] = replica_procs(rt, "echo")["1.0.0"]
    model_pid = descendants(adapter.pid)[-1]   # the model itself (sandboxed: below bwrap's two processes)
    os.kill(model_pid, signal.SIGKILL)
    info = wait_for(lambda: (m := rt.model("echo")).error and m, what="the crash to be reported")
    assert "exited with status" in info.error and "replaced" in info.error
    # held while the replacement starts, then answered by it
    assert scores(rt, "echo", [{"x": 4}]) == [4]
    [replacement] = wait_for(lambda: replica_procs(rt, "echo").get("1.0.0"), what="a replacement")
    assert replacement.pid != adapter.pid
    assert rt.model("echo").status == "ready"
    assert rt.model("echo").metrics["crashes"] == 1


def test_crash_mid_request_is_a_502_and_the_next_request_works(rt, tmp_path):
    rt.deploy(load_manifest(make_model(tmp_path, "echo")))
    assert scores(rt, "echo", [{"x": 1}]) == [1]
    try:
        resp = predict(rt, "echo", [{"x": 1, "crash": True}])
    except UpstreamError as e:
        assert e.status == 502 and "echo" in e.message
    else:   # the adapter may answer for the model it lost
        assert resp.status >= 500
    assert scores(rt, "echo", [{"x": 7}]) == [7]
    assert rt.model("echo").metrics["errors"] == 1


def test_model_that_keeps_crashing_ends_failed_with_its_stderr(rt, tmp_path, seen_by_models):
    # A version that cannot start is refused at deploy (tests/test_deploy_check.py); this one
    # passed its check and breaks afterwards (a file it needs changes under it, say).
    flag = seen_by_models / "break-it"
    rt.deploy(load_manifest(make_model(tmp_path, "echo", name="broken", params={"factor": 1,
                                                                               "crash_at_start_if": str(flag)})))
    flag.touch()
    with pytest.raises(Unavailable) as err:
        predict(rt, "broken", [{"x": 1}])
    assert "cannot start" in err.value.message
    info = rt.model("broken")
    assert info.status == "failed"
    assert "3 crashes in a row" in info.error and "cannot start" in info.error
    assert [m.status for m in rt.models()] == ["failed"]
    # not restarted forever: nothing runs, and a request fails at once with the same reason
    time.sleep(1)
    assert not any(replica_procs(rt, "broken").values())
    with pytest.raises(Unavailable):
        predict(rt, "broken", [{"x": 1}])
    # three crashes, plus the replica its deploy check ran
    assert len(list((Path(rt.state_dir) / "logs" / "replicas" / "broken").glob("*.log"))) == 4
    # a new deploy clears the failure
    rt.deploy(load_manifest(make_model(tmp_path, "echo", name="broken", version="1.0.1", features=[
        {"name": "x", "type": "number"}])))
    assert rt.model("broken").status == "idle" and rt.model("broken").error is None
    assert scores(rt, "broken", [{"x": 2}]) == [2]
    # and so does a rollback, even to the version that failed: it gets another chance (and,
    # carrying the traffic of 1.0.1, starts at once), then fails again the same way
    rt.rollback("broken", version="1.0.0")
    assert rt.model("broken").status != "failed"
    info = wait_for(lambda: (m := rt.model("broken")).status == "failed" and m, what="failed again")
    assert "cannot start" in info.error


# -- versions --------------------------------------------------------------------------------
def test_rollback_under_continuous_load_drops_nothing(rt, tmp_path):
    scaling = {"min": 0, "max": 2, "target_concurrency": 4, "idle_timeout": "30s"}
    v1 = make_model(tmp_path, "echo", version="1.0.0", scaling=scaling, params={"factor": 1})
    v2 = make_model(tmp_path, "echo", version="2.0.0", scaling=scaling, params={"factor": 2})
    rt.deploy(load_manifest(v1))
    stop = threading.Event()
    seen: list[tuple[float, int]] = []
    failures: list = []

    def load():
        while not stop.is_set():
            try:
                resp = predict(rt, "echo", [{"x": 1, "delay": 0.01}])
            except PlaneError as e:
                failures.append(e)
                continue
            if resp.status != 200:
                failures.append(resp)
            else:
                seen.append((time.monotonic(), json.loads(resp.body)["scores"][0]))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) > 20, what="traffic on 1.0.0")
        rt.deploy(load_manifest(v2))
        wait_for(lambda: sum(1 for _, s in seen if s == 2) > 20, what="traffic on 2.0.0")
        assert rt.rollback("echo", version="1.0.0").live
        switched = time.monotonic()
        wait_for(lambda: sum(1 for t, s in seen if t > switched and s == 1) > 20, what="traffic back on 1.0.0")
        # the drained version's replicas stop while the load goes on
        wait_for(lambda: not replica_procs(rt, "echo").get("2.0.0"), what="2.0.0 replicas drained and stopped")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    detail = rt.model("echo")
    assert [(v.version, v.live) for v in detail.versions] == [("2.0.0", False), ("1.0.0", True)]
    assert detail.version == "1.0.0" and detail.metrics["errors"] == 0


def test_deploy_is_immutable(rt, tmp_path):
    src = make_model(tmp_path, "echo", params={"factor": 1})
    first = rt.deploy(load_manifest(src))
    assert scores(rt, "echo", [{"x": 5}]) == [5]
    (src / "params.json").write_text(json.dumps({"factor": 100}))
    assert scores(rt, "echo", [{"x": 5}]) == [5]        # the live copy is unchanged
    with pytest.raises(Conflict) as err:
        rt.deploy(load_manifest(src))
    assert "1.0.0" in err.value.message and err.value.status == 409
    (src / "params.json").write_text(json.dumps({"factor": 1}))
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"noise")
    again = rt.deploy(load_manifest(src))                # same content: a no-op
    assert again == first
    assert [v.version for v in rt.model("echo").versions] == ["1.0.0"]


def test_rollback_to_unknown_version_and_remove(rt, tmp_path):
    rt.deploy(load_manifest(make_model(tmp_path, "echo")))
    with pytest.raises(PlaneError) as err:
        rt.rollback("echo", version="9.9.9")
    assert err.value.status == 404 and "1.0.0" in err.value.message
    assert scores(rt, "echo", [{"x": 1}]) == [1]
    [adapter] = replica_procs(rt, "echo")["1.0.0"]
    rt.remove("echo")
    assert rt.models() == []
    with pytest.raises(PlaneError) as err:
        rt.model("echo")
    assert err.value.status == 404
    wait_for(lambda: not alive(adapter.pid), what="the removed model's replica to stop")
    assert not (Path(rt.state_dir) / "models" / "echo").exists()


def test_restart_keeps_versions_live_pointer_and_jobs(settings, tmp_path):
    dataset = tmp_path / "data.csv"
    dataset.write_text("x,sleep\n1,\n2.5,\n")
    with LocalRuntime(settings) as rt:
        rt.deploy(load_manifest(make_model(tmp_path, "echo", version="1.0.0", params={"factor": 1})))
        rt.deploy(load_manifest(make_model(tmp_path, "echo", version="1.1.0", params={"factor": 2})))
        rt.rollback("echo", version="1.0.0")
        rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
        job, _ = rt.submit_job("scorer", dataset=str(dataset))
        done = wait_for(lambda: (j := rt.job(job.id)).status in ("succeeded", "failed") and j, what="the job")
        assert done.status == "succeeded", (done.error, done.log_tail)
        before = rt.model("echo")
    with LocalRuntime(settings) as rt:
        after = rt.model("echo")
        assert after.versions == before.versions and after.version == "1.0.0"
        assert scores(rt, "echo", [{"x": 3}]) == [3]
        assert rt.job(job.id) == done
        assert [j.id for j in rt.jobs(model="scorer")] == [job.id]
        assert sorted(m.name for m in rt.models()) == ["echo", "scorer"]


# -- batch -------------------------------------------------------------------------------------
def test_batch_job_on_a_local_dataset(rt, tmp_path):
    rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
    dataset = tmp_path / "in.csv"
    dataset.write_text("x,sleep\n1,\n2,\n3,\n")
    job, created = rt.submit_job("scorer", dataset=str(dataset))
    assert created and job.status == "queued" and job.version == "1.0.0"
    done = wait_for(lambda: (j := rt.job(job.id)).status in ("succeeded", "failed") and j, what="the job")
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert done.rows == 3 and done.started_at and done.finished_at
    expected = Path(rt.state_dir) / "results" / "scorer" / job.id
    assert done.results_uri.startswith(str(expected))
    assert (expected / "scores.csv").read_text().splitlines()[1:] == ["2.0", "4.0", "6.0"]
    assert done.input["uri"].endswith("in.csv")


def test_batch_job_on_a_bucket_dataset_publishes_to_the_bucket(rt, tmp_path, gcs, gcs_client):
    rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
    bucket = gcs_client.bucket("test-bucket")
    blob = bucket.blob("incoming/scorer/day1.csv")
    blob.upload_from_string("x,sleep\n1,\n2,\n", content_type="text/csv")
    job, _ = rt.submit_job("scorer", dataset="gs://test-bucket/incoming/scorer/day1.csv", trigger="event")
    done = wait_for(lambda: (j := rt.job(job.id)).status in ("succeeded", "failed") and j, what="the job")
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert done.results_uri.startswith(f"gs://test-bucket/results/scorer/{job.id}/")
    assert bucket.blob(f"results/scorer/{job.id}/scores.csv").exists()
    assert done.input["generation"] and done.trigger == "event"


def test_failed_and_timed_out_jobs_say_why(rt, tmp_path):
    rt.deploy(load_manifest(make_model(tmp_path, "scorer", batch={"timeout": "1s"})))
    slow = tmp_path / "slow.csv"
    slow.write_text("x,sleep\n1,20\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("y\n1\n")
    slow_job, _ = rt.submit_job("scorer", dataset=str(slow))
    bad_job, _ = rt.submit_job("scorer", dataset=str(bad))
    for job_id in (slow_job.id, bad_job.id):
        wait_for(lambda: rt.job(job_id).status == "failed", timeout=60, what=f"job {job_id} to fail")
    assert "timeout" in rt.job(slow_job.id).error
    assert rt.job(bad_job.id).error and rt.job(bad_job.id).results_uri is None


def test_event_key_dedupes_even_across_restarts(settings, tmp_path):
    dataset = tmp_path / "in.csv"
    dataset.write_text("x,sleep\n1,\n")
    key = "test-bucket/incoming/scorer/in.csv#1"
    with LocalRuntime(settings) as rt:
        rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
        first, created = rt.submit_job("scorer", dataset=str(dataset), event_key=key, trigger="event")
        again, created_again = rt.submit_job("scorer", dataset=str(dataset), event_key=key, trigger="event")
        assert created and not created_again and again.id == first.id
    with LocalRuntime(settings) as rt:
        third, created = rt.submit_job("scorer", dataset=str(dataset), event_key=key, trigger="event")
        assert not created and third.id == first.id
        other, created = rt.submit_job("scorer", dataset=str(dataset), event_key=key + "-2")
        assert created and other.id != first.id
        assert len(rt.jobs()) == 2


_CRASHING_SERVICE = """
import json, sys, time
from adapters.manifest import load_manifest
from control.runtime.local import LocalRuntime
from control.settings import Settings
state, model, slow, fast = sys.argv[1:]
rt = LocalRuntime(Settings(state_dir=state, job_concurrency=1))
rt.deploy(load_manifest(model))
a, _ = rt.submit_job("scorer", dataset=slow)
b, _ = rt.submit_job("scorer", dataset=fast)
while rt.job(a.id).status != "running":
    time.sleep(0.02)
print(json.dumps([a.id, b.id]), flush=True)
time.sleep(600)
"""


def test_jobs_of_a_service_that_died(settings, tmp_path):
    """Killed outright while a job ran: that job ends failed ('interrupted'), the queued one runs."""
    slow, fast = tmp_path / "slow.csv", tmp_path / "fast.csv"
    slow.write_text("x,sleep\n1,5\n")
    fast.write_text("x,sleep\n1,\n")
    model = make_model(tmp_path, "scorer")
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_SERVICE, str(settings.state_dir), str(model),
                             str(slow), str(fast)], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        running, queued = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with LocalRuntime(settings) as rt:
        interrupted = rt.job(running)
        assert interrupted.status == "failed" and interrupted.error == INTERRUPTED and interrupted.finished_at
        done = wait_for(lambda: (j := rt.job(queued)).status in ("succeeded", "failed") and j, what="the requeued job")
        assert done.status == "succeeded", (done.error, done.log_tail)


def test_batch_and_realtime_operations_are_kept_apart(rt, tmp_path):
    rt.deploy(load_manifest(make_model(tmp_path, "echo")))
    rt.deploy(load_manifest(make_model(tmp_path, "scorer")))
    dataset = tmp_path / "in.csv"
    dataset.write_text("x,sleep\n1,\n")
    job, created = rt.submit_job("echo", dataset=str(dataset))  # streamed through its replicas
    assert created and job.model == "echo"
    with pytest.raises(BadRequest, match="batch model"):
        predict(rt, "scorer", [{"x": 1}])
    with pytest.raises(BadRequest, match="no file"):
        rt.submit_job("scorer", dataset=str(tmp_path / "missing.csv"))
    assert {m.name: m.status for m in rt.models()} == {"echo": "idle", "scorer": "ready"}


def test_close_leaves_no_processes(settings, tmp_path):
    rt = LocalRuntime(settings)
    rt.deploy(load_manifest(make_model(tmp_path, "echo", scaling={"min": 2, "max": 2, "target_concurrency": 4,
                                                                  "idle_timeout": "60s"})))
    wait_for(lambda: rt.model("echo").replicas == 2, what="two warm replicas")
    pids = []
    for procs in replica_procs(rt, "echo").values():
        for p in procs:
            pids += [p.pid, *descendants(p.pid)]
    # two adapters, two models (sandboxed: each model below bwrap's two processes)
    assert len(pids) == (8 if rt.sandbox.active else 4)
    rt.close()
    assert not [pid for pid in pids if alive(pid)]


def test_scale_in_stops_starting_replicas_first_and_never_the_last_ready_one_under_load():
    from types import SimpleNamespace

    from control.runtime.local_replicas import _scale_in_victims

    def replica(id_, state, inflight=0, started=0.0, ready_at=None):
        return SimpleNamespace(id=id_, state=state, inflight=inflight, started=started, ready_at=ready_at)

    ready_old = replica(1, "ready", ready_at=1.0)
    ready_new = replica(2, "ready", ready_at=5.0)
    busy = replica(3, "ready", inflight=2, ready_at=2.0)
    starting = replica(4, "starting", started=6.0)
    starting_newer = replica(5, "starting", started=7.0)
    # one too many: the one still starting goes, not a warm one
    assert _scale_in_victims([ready_old, starting], 1, demand=1) == [starting]
    # starting ones newest first, then the most recently ready idle one; never one in flight
    assert _scale_in_victims([ready_old, ready_new, busy, starting, starting_newer], 4, demand=2) == \
        [starting_newer, starting, ready_new, ready_old]
    # with requests in flight or held, the last ready replica stays even when zero are wanted
    assert _scale_in_victims([ready_old, starting], 2, demand=1) == [starting]
    # and with none, everything idle may go
    assert _scale_in_victims([ready_old, starting], 2, demand=0) == [starting, ready_old]
