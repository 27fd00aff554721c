"""Processes that die: the control service SIGKILLed mid-job, `up` SIGKILLed with its parts
running, two planes on one state dir, unreadable records, a model killed under load.

Real `modelplane up` subprocesses with the embedded emulator, real jobs, real SIGKILLs. No
wall-clock assertions: every wait polls a condition with a deadline.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from control.emulator import free_port
from control.runtime.local_procs import start_time
from control_helpers import AUTH, api, copy_fixture, running, settings_for, wait_until
from test_e2e_embedded import _alive

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BATCH = "churn-risk"


class Up:
    """`modelplane up --no-console` (or with its console) on a state dir, its output collected."""

    def __init__(self, work: Path, *, port: int | None = None, console_port: int | None = None):
        self.port = port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPLANE_") and k != "STORAGE_EMULATOR_HOST"}
        env.update(MODELPLANE_PORT=str(self.port), PYTHONUNBUFFERED="1", MODELPLANE_JOB_CONCURRENCY="1",
                   MODELPLANE_WATCH_INTERVAL="0.2")
        args = [sys.executable, "-m", "control.cli", "up"]
        if console_port is None:
            args.append("--no-console")
        else:
            env["MODELPLANE_CONSOLE_PORT"] = str(console_port)
        self.work = work
        self.proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: [self.lines.append(x) for x in self.proc.stdout], daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_started(self, timeout: float = 60) -> "Up":
        wait_until(lambda: "press Ctrl-C" in self.output or self.proc.poll() is not None, timeout,
                   what="modelplane up to start")
        assert self.proc.poll() is None, self.output
        return self

    def token(self) -> str:
        return (self.work / ".modelplane" / "token").read_text().strip()

    def emulator(self) -> str:
        return re.search(r"embedded emulator at (http://[0-9.:]+)", self.output).group(1)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)  # the process alone, as the OOM killer would
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)


@pytest.fixture
def work(tmp_path):
    (tmp_path / "models").mkdir()
    shutil.copytree(ROOT / "models" / BATCH, tmp_path / "models" / BATCH)
    return tmp_path


def _dataset(rows: int) -> bytes:
    lines = (ROOT / "models" / BATCH / "sample.csv").read_text().strip().splitlines()
    header, body = lines[0], lines[1:]
    return (header + "\n" + "\n".join(body[i % len(body)] for i in range(rows)) + "\n").encode()


def _model_alone(tmp_path: Path, data: bytes) -> bytes:
    """The scores the model writes on its own, to compare the plane's results with."""
    dataset, results = tmp_path / "alone.csv", tmp_path / "alone-scores.csv"
    dataset.write_bytes(data)
    subprocess.run([sys.executable, "score.py"], cwd=ROOT / "models" / BATCH, check=True, timeout=300,
                   env=dict(os.environ, DATASET=str(dataset), RESULTS=str(results)))
    return results.read_bytes()


# -- the control service SIGKILLed while jobs run -----------------------------------------------------

def test_sigkill_mid_job_loses_nothing_and_leaves_no_partial_results(work, tmp_path, monkeypatch):
    data = _dataset(300_000)  # about a second of the model's time: the kill lands mid-run
    expected = _model_alone(tmp_path, data)
    first = Up(work).wait_started()
    try:
        s = requests.Session()
        s.headers.update({"Authorization": f"Bearer {first.token()}"})
        up = s.post(f"{first.url}/api/models/{BATCH}/datasets", params={"filename": "big.csv"}, data=data,
                    headers={"Content-Type": "text/csv"}, timeout=120).json()
        uri = up["uri"]
        ids = [s.post(f"{first.url}/api/models/{BATCH}/jobs", json={"dataset": uri}, timeout=30).json()["id"]
               for _ in range(3)]
        # the upload's own event starts one more job; one job runs at a time (JOB_CONCURRENCY=1)
        running_now = wait_until(lambda: [j for j in s.get(f"{first.url}/api/jobs", timeout=10).json()
                                          if j["status"] == "running"], 60, interval=0.02, what="a running job")
        all_ids = {j["id"] for j in s.get(f"{first.url}/api/jobs", timeout=10).json()}
        time.sleep(0.3)  # well inside the model's run
        emulator = first.emulator()
        first.kill()
    finally:
        first.stop()
    assert set(ids) <= all_ids and len(all_ids) in (3, 4)

    second = Up(work).wait_started()
    try:
        s = requests.Session()
        s.headers.update({"Authorization": f"Bearer {second.token()}"})

        def settled():
            jobs = s.get(f"{second.url}/api/jobs", timeout=10).json()
            return jobs if len(jobs) >= len(all_ids) and all(j["status"] in ("succeeded", "failed") for j in jobs) \
                else None

        jobs = wait_until(settled, 300, interval=0.2, what="every job to finish after the restart")
        by_id = {j["id"]: j for j in jobs}
        assert set(by_id) == all_ids, "a job was lost or one was added"
        events = [j for j in jobs if j["trigger"] == "event"]
        assert len(events) <= 1, "the upload ran twice"
        interrupted = by_id[running_now[0]["id"]]
        assert interrupted["status"] == "failed" and interrupted["error"].startswith("interrupted"), interrupted
        for job in jobs:
            if job["status"] == "succeeded":
                got = s.get(f"{second.url}/api/jobs/{job['id']}/results", timeout=60)
                assert got.status_code == 200 and got.content == expected, job["id"]
            else:
                assert job["error"], job
        assert sum(j["status"] == "succeeded" for j in jobs) >= 2

        from google.cloud import storage

        from adapters.storage import emulator_credentials
        from control.gcs import storage_key

        monkeypatch.setenv("STORAGE_EMULATOR_HOST", second.emulator())  # restored after the test
        client = storage.Client(project="test", credentials=emulator_credentials(storage_key(work / ".modelplane")))
        names = [b.name for b in client.list_blobs("modelplane", prefix="results/")]
        scored = {n.split("/")[2] for n in names if n.endswith("/scores.csv")}
        assert scored == {j["id"] for j in jobs if j["status"] == "succeeded"}, names
        assert not list((work / ".modelplane" / "work").glob("*")), "a job's work folder was left behind"
        assert emulator  # the first plane's emulator died with it (pdeathsig) or was stopped on restart
    finally:
        second.stop()


# -- two planes, one state dir --------------------------------------------------------------------------

def test_a_second_plane_on_the_same_state_dir_stops_naming_the_first(work):
    first = Up(work).wait_started()
    try:
        for port in (free_port(), first.port):  # another port, and the same one
            second = Up(work, port=port)
            assert second.proc.wait(timeout=60) == 1
            second.stop()
            errors = [x for x in second.lines if x.startswith("error:")]
            assert len(errors) == 1, second.output
            assert f"in use by pid {first.proc.pid}" in errors[0] and "cli.py up --no-console" in errors[0]
            assert "control  " not in second.output  # it started nothing
        r = requests.get(f"{first.url}/api/models", headers={"Authorization": f"Bearer {first.token()}"}, timeout=10)
        assert r.status_code == 200 and [m["name"] for m in r.json()] == [BATCH]
    finally:
        first.stop()
    # and once the first has stopped, the state dir is free again
    third = Up(work).wait_started()
    third.stop()
    assert third.proc.returncode == 0


# -- up SIGKILLed with its parts running -------------------------------------------------------------

def test_a_sigkilled_up_leaves_no_part_running_and_the_next_up_starts_clean(work):
    console_port = free_port()
    first = Up(work, console_port=console_port).wait_started(timeout=120)
    parts = json.loads((work / ".modelplane" / "processes.json").read_text())["parts"]
    assert {p["name"] for p in parts} == {"GCS emulator", "console"}, first.output
    assert f"console  http://127.0.0.1:{console_port}" in first.output
    first.kill()
    first.stop()
    wait_until(lambda: not any(_alive(p["pid"]) for p in parts), 15, what="the first plane's parts to exit")

    second = Up(work, console_port=console_port).wait_started(timeout=120)
    try:
        assert f"console  http://127.0.0.1:{console_port}" in second.output
        now = json.loads((work / ".modelplane" / "processes.json").read_text())["parts"]
        assert {p["pid"] for p in now}.isdisjoint({p["pid"] for p in parts})
        assert requests.get(f"http://127.0.0.1:{console_port}/_stcore/health", timeout=10).status_code == 200
    finally:
        second.stop()


def test_up_stops_what_a_killed_predecessor_recorded_and_nothing_else(work):
    """If a part survived its `up` (say setpriv is missing), the next `up` stops it, but only
    a process that still is the one recorded (same start time): never a reused pid."""
    state = work / ".modelplane"
    state.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        wait_until(lambda: start_time(orphan.pid) and start_time(bystander.pid), 10, what="the processes")
        (state / "processes.json").write_text(json.dumps({"parts": [
            {"name": "console", "pid": orphan.pid, "start": start_time(orphan.pid)},
            {"name": "GCS emulator", "pid": bystander.pid, "start": start_time(bystander.pid) + 1}]}))
        up = Up(work).wait_started()
        try:
            assert f"stopped  console (pid {orphan.pid})" in up.output
            assert orphan.wait(timeout=30) is not None
            assert bystander.poll() is None  # recorded with another start time: not ours to stop
        finally:
            up.stop()
    finally:
        for p in (orphan, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_up_prints_no_console_url_when_its_console_cannot_start(work):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        up = Up(work, console_port=port).wait_started(timeout=120)
        try:
            assert f"console  http://127.0.0.1:{port}" not in up.output
            assert f"console  not started: port {port} is taken" in up.output
        finally:
            up.stop()
    finally:
        taken.close()


# -- unreadable records ----------------------------------------------------------------------------------

def test_an_unreadable_job_record_is_moved_aside_reported_and_its_event_still_a_duplicate(tmp_path, gcs):
    settings = settings_for(tmp_path)
    copy_fixture("sum-batch", settings.models_dir)
    with running(settings) as server:
        runtime = server.runtime
        job, created = runtime.submit_job("sum-batch", dataset="gs://test-bucket/a.csv", event_key="k#1")
        wait_until(lambda: runtime.job(job.id).status in ("succeeded", "failed"), 60, what="the job")
    record = Path(settings.state_dir) / "jobs" / f"{job.id}.json"
    record.write_bytes(b"\x00\x17garbage{")  # a torn write, a bad disk block

    with running(settings) as server:
        health = requests.get(f"{server.url}/healthz", timeout=5).json()
        assert health["status"] == "degraded" and job.id in health["problems"][0]
        aside = list(record.parent.glob(f"{job.id}.json.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == b"\x00\x17garbage{"
        listed = api.get(f"{server.url}/api/jobs/{job.id}").json()
        assert listed["status"] == "failed" and "moved aside" in listed["error"]
        again, created = server.runtime.submit_job("sum-batch", dataset="gs://test-bucket/a.csv", event_key="k#1")
        assert not created and again.id == job.id


def test_an_unreadable_model_record_is_rebuilt_from_its_versions(tmp_path):
    settings = settings_for(tmp_path)
    copy_fixture("echo-rt", settings.models_dir)
    with running(settings):
        pass
    record = Path(settings.state_dir) / "models" / "echo-rt" / "model.json"
    record.write_text("{not json")
    settings.models_dir.joinpath("echo-rt", "model.yaml").unlink()  # nothing to re-register from
    with running(settings) as server:
        model = api.get(f"{server.url}/api/models/echo-rt").json()
        assert model["version"] == "1.0.0" and [v["version"] for v in model["versions"]] == ["1.0.0"]
        health = requests.get(f"{server.url}/healthz", timeout=5).json()
        assert health["status"] == "degraded" and "rebuilt from 1 stored version" in health["problems"][0]


# -- a model killed under load --------------------------------------------------------------------------

def test_a_killed_model_leaves_the_pool_at_once_and_requests_keep_being_served(tmp_path):
    from control.runtime.local_procs import descendants

    settings = settings_for(tmp_path)
    folder = copy_fixture("echo-rt", settings.models_dir)
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text()
                                       .replace("scaling: {min: 0,", "scaling: {min: 1,"))
    with running(settings) as server:
        url = f"{server.url}/models/echo-rt/predict"
        assert api.post(url, json={"rows": [{"x": 1}]}, timeout=60).status_code == 200
        replicas = server.runtime.replicas
        stop = threading.Event()
        results: list[int] = []

        def client():
            session = requests.Session()
            session.headers.update(AUTH)
            while not stop.is_set():
                try:
                    results.append(session.post(url, json={"rows": [{"x": 2}]}, timeout=60).status_code)
                except requests.RequestException:
                    results.append(0)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(results) > 200, 60, what="load to build")
            rev = next(iter(replicas._revisions.values()))
            victim = next(r for r in rev.replicas if r.state == "ready")
            model = [p for p in descendants(victim.proc.pid) if "model.py" in Path(f"/proc/{p}/cmdline").read_text()]
            assert model, "the replica has no model process"
            before = len(results)
            killed_at = time.monotonic()
            os.kill(model[0], signal.SIGKILL)
            wait_until(lambda: victim.state == "exited", 10, interval=0.005, what="the replica to leave the pool")
            left_after = time.monotonic() - killed_at
            wait_until(lambda: len(results) > before + 300, 60, what="requests to be served again")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        failed = [s for s in results[before:] if s != 200]
        print(f"replica left the pool {left_after * 1000:.0f} ms after its model was killed; "
              f"{len(failed)} of {len(results) - before} requests failed after the kill")
        assert len(failed) <= 4, failed  # at most the requests the model had in hand when it died


# -- a model's health is its live version's ------------------------------------------------------

LOCAL = ROOT / "tests" / "fixtures" / "local"


def _echo(tmp_path: Path, version: str, **params) -> Path:
    """The local runtime's echo fixture as `version`, its params.json replaced."""
    folder = tmp_path / "src" / f"echo-{version}"
    shutil.copytree(LOCAL / "echo", folder)
    manifest = folder / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", f"version: {version}"))
    (folder / "params.json").write_text(json.dumps({"factor": 1, **params}))
    return folder


def _call_until(server, url: str, done, what: str) -> None:
    """POST a row to `url` until `done()`: each call may start a replica that crashes."""
    def tick():
        try:
            requests.post(url, json={"rows": [{"x": 1}]}, headers=AUTH, timeout=60)
        except requests.RequestException:
            pass
        return done()
    wait_until(tick, 120, interval=0.2, what=what)


def test_a_crashing_version_that_is_not_live_is_shown_on_it_never_as_the_model_down(tmp_path, seen_by_models):
    """A comparison (or anyone) calling a version by its own URL makes it crash: the version says
    so, with its output once and no loopback address; the model, served by its live version, is
    neither failed nor in error."""
    from adapters.manifest import load_manifest

    flag = seen_by_models / "break-1.0.1"
    settings = settings_for(tmp_path, max_restarts=2, start_timeout=30)
    with running(settings) as server:
        server.runtime.deploy(load_manifest(_echo(tmp_path, "1.0.0")))
        server.runtime.deploy(load_manifest(_echo(tmp_path, "1.0.1", crash_at_start_if=str(flag))), make_live=False)
        flag.touch()   # it passed its deploy check; now it cannot start
        model_url = f"{server.url}/api/models/echo"

        def crashed():
            v = next(v for v in api.get(model_url).json()["versions"] if v["version"] == "1.0.1")
            return v if v.get("crashed") else None
        _call_until(server, f"{server.url}/models/echo/versions/1.0.1/predict", crashed, "1.0.1 to stop restarting")
        model = api.get(model_url).json()
        assert model["version"] == "1.0.0" and model["status"] != "failed" and model["error"] is None, model
        [listed] = [m for m in api.get(f"{server.url}/api/models").json() if m["name"] == "echo"]
        assert listed["status"] != "failed" and listed["error"] is None
        v = crashed()
        assert "cannot start" in v["crash_error"] and "2 crashes in a row" in v["crash_error"]
        assert v["crash_error"].count("cannot start: ") == 1 or "Adapter output" in v["crash_error"]
        assert "127.0.0.1" not in v["crash_error"] and "localhost:" not in v["crash_error"]
        assert not v["failed"] and not v["live"]
        # the live version serves meanwhile
        r = requests.post(f"{server.url}/models/echo/predict", json={"rows": [{"x": 3}]}, headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["scores"] == [3]


def test_a_live_version_that_kept_crashing_is_still_failed_after_a_restart(tmp_path, seen_by_models):
    """Before: a restart of the control service forgot the crashes, and the model showed idle."""
    from adapters.manifest import load_manifest

    flag = seen_by_models / "break-live"
    settings = settings_for(tmp_path, max_restarts=2, start_timeout=30)
    with running(settings) as server:
        server.runtime.deploy(load_manifest(_echo(tmp_path, "1.0.0", crash_at_start_if=str(flag))))
        flag.touch()
        _call_until(server, f"{server.url}/models/echo/predict",
                    lambda: api.get(f"{server.url}/api/models/echo").json()["status"] == "failed", "echo to fail")
        before = api.get(f"{server.url}/api/models/echo").json()["error"]
        assert "127.0.0.1" not in before
    with running(settings) as server:
        model = api.get(f"{server.url}/api/models/echo").json()
        assert model["status"] == "failed" and model["error"] == before
        [listed] = [m for m in api.get(f"{server.url}/api/models").json() if m["name"] == "echo"]
        assert listed["status"] == "failed"
        # not restarted by a request either: it fails at once with the same reason
        r = requests.post(f"{server.url}/models/echo/predict", json={"rows": [{"x": 1}]}, headers=AUTH, timeout=60)
        assert r.status_code == 503 and "cannot start" in r.text
        # a deploy clears it, for good
        flag.unlink()
        server.runtime.deploy(load_manifest(_echo(tmp_path, "1.0.1")))
        assert api.get(f"{server.url}/api/models/echo").json()["status"] != "failed"
    with running(settings) as server:
        assert api.get(f"{server.url}/api/models/echo").json()["status"] != "failed"


def test_crash_output_names_no_loopback_address():
    from control.runtime.local_procs import scrub_addresses

    text = ("adapter for echo@1.0.0 on http://127.0.0.1:41235, model at http://127.0.0.1:39001/health\n"
            "cannot reach localhost:8080 or [::1]:9000 (0.0.0.0:5000)")
    out = scrub_addresses(text)
    assert not re.search(r"127\.0\.0\.1|localhost|::1|0\.0\.0\.0|:\d{4}", out), out
    assert out.count("(internal address)") == 5 and out.startswith("adapter for echo@1.0.0 on (internal address),")


def test_crash_output_has_the_models_stderr_once():
    """The adapter ends its log repeating its model's last stderr lines, already in the log."""
    from control.runtime.local_procs import crash_output

    log = ("adapter for echo@1.0.0 on http://127.0.0.1:41235, model at http://127.0.0.1:39001\n"
           "echo: cannot start: /var/tmp/flag is there\n"
           "modelplane-adapter: model echo@1.0.0 exited with status 4; its last stderr lines:\n"
           "echo: cannot start: /var/tmp/flag is there\n")
    out = crash_output(log)
    assert out.count("echo: cannot start") == 1 and "exited with status 4." in out and "127.0.0.1" not in out
    # lines the log does not already hold are kept
    other = "starting\nmodelplane-adapter: model m exited with status 1; its last stderr lines:\nboom\n"
    assert crash_output(other).count("boom") == 1
