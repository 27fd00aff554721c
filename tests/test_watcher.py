"""The bucket watcher against the real emulator: uploads become binary-mode events at a real sink."""
from __future__ import annotations

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from control.events import FINALIZED, parse
from control.watcher import Watcher
from control_fake_runtime import FakeRuntime
from control_helpers import api, copy_fixture, running, settings_for, wait_until


class Sink:
    """A tiny HTTP sink recording what arrives; `fail` answers 503 while positive (counting down)."""

    def __init__(self):
        self.received: list[tuple[dict, bytes]] = []
        self.fail = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if sink.fail > 0:
                    sink.fail -= 1
                    self.send_response(503)
                else:
                    sink.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def subjects(self) -> list[str]:
        return [parse(h, b).get_subject() for h, b in self.received]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def prefix():
    """A fresh prefix per test: the emulator is shared by the session."""
    return f"incoming-{uuid.uuid4().hex[:8]}/"


def test_upload_is_posted_in_binary_mode_within_two_seconds(gcs, gcs_client, tmp_path, prefix):
    with Sink() as sink:
        watcher = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, interval=1.0,
                          state_path=tmp_path / "watcher.json", prefix=prefix).start()
        try:
            time.sleep(0.3)  # the first listing is done: what follows is a new object
            uploaded = time.monotonic()
            blob = gcs_client.bucket("test-bucket").blob(f"{prefix}m/data.csv")
            blob.upload_from_string("a,b\n1,2\n", content_type="text/csv")
            wait_until(lambda: sink.received, 5, what="the event at the sink")
            assert time.monotonic() - uploaded < 2.0
        finally:
            watcher.stop()
    headers, body = sink.received[0]
    assert headers["ce-type"] == FINALIZED
    assert headers["ce-source"] == "//storage.googleapis.com/projects/_/buckets/test-bucket"
    assert headers["ce-subject"] == f"objects/{prefix}m/data.csv"
    assert headers["content-type"] == "application/json"
    event = parse(headers, body)
    data = event.get_data()
    assert data["generation"] == str(blob.generation) and isinstance(data["size"], str)
    assert data["size"] == "8" and isinstance(data["metageneration"], str)


def test_sent_objects_are_remembered_across_restarts(gcs, gcs_client, tmp_path, prefix):
    bucket = gcs_client.bucket("test-bucket")
    bucket.blob(f"{prefix}m/one.csv").upload_from_string("a\n1\n")
    state = tmp_path / "watcher.json"
    with Sink() as sink:
        first = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=state, prefix=prefix)
        assert first.poll_once() == 1
        assert first.poll_once() == 0
        again = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=state, prefix=prefix)
        assert again.poll_once() == 0  # a restart does not resend the world
        bucket.blob(f"{prefix}m/one.csv").upload_from_string("a\n2\n")  # new generation
        bucket.blob(f"{prefix}m/two.csv").upload_from_string("a\n3\n")
        assert again.poll_once() == 2
    assert sorted(sink.subjects()) == sorted([f"objects/{prefix}m/one.csv"] * 2 + [f"objects/{prefix}m/two.csv"])


def test_failed_deliveries_are_retried_and_nothing_is_lost(gcs, gcs_client, tmp_path, prefix):
    bucket = gcs_client.bucket("test-bucket")
    for i in range(3):
        bucket.blob(f"{prefix}m/{i}.csv").upload_from_string(f"a\n{i}\n")
    with Sink() as sink:
        sink.fail = 2
        watcher = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, interval=0.1,
                          state_path=tmp_path / "w.json", prefix=prefix, max_backoff=0.5).start()
        try:
            wait_until(lambda: len(sink.received) >= 3, 10, what="all three events despite failures")
            time.sleep(0.5)
        finally:
            watcher.stop()
    assert sorted(sink.subjects()) == [f"objects/{prefix}m/{i}.csv" for i in range(3)]


def test_an_unreachable_sink_loses_nothing(gcs, gcs_client, tmp_path, prefix):
    gcs_client.bucket("test-bucket").blob(f"{prefix}m/x.csv").upload_from_string("a\n1\n")
    state = tmp_path / "w.json"
    down = Watcher(bucket="test-bucket", sink="http://127.0.0.1:9/", client=gcs_client, state_path=state,
                   prefix=prefix, timeout=1)
    with pytest.raises(requests.ConnectionError):
        down.poll_once()
    with Sink() as sink:
        up = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=state, prefix=prefix)
        assert up.poll_once() == 1
    assert sink.subjects() == [f"objects/{prefix}m/x.csv"]


def test_watcher_drives_the_control_service_to_start_a_job(gcs, gcs_client, tmp_path):
    """The embedded path: upload -> watcher -> POST /events -> runtime.submit_job, once."""
    settings = settings_for(tmp_path)  # the watcher sends the token too
    copy_fixture("sum-batch", settings.models_dir)
    runtime = FakeRuntime()
    name = f"incoming/sum-batch/{uuid.uuid4().hex[:8]}.csv"
    with running(settings, runtime=runtime, watch=True) as server:
        gcs_client.bucket("test-bucket").blob(name).upload_from_string("a,b\n1,2\n")
        jobs = wait_until(lambda: [j for j in runtime.jobs() if j.dataset == f"gs://test-bucket/{name}"], 5,
                          what="the job the upload starts")
        assert jobs[0].trigger == "event"
        # later rounds do not start it again
        time.sleep(3 * settings.watch_interval)
        assert len([j for j in runtime.jobs() if j.dataset == f"gs://test-bucket/{name}"]) == 1
        events = api.get(f"{server.url}/api/events", params={"action": "started"}).json()
        assert any(e["object"] == name for e in events)


def test_modelplane_watch_is_the_standalone_bridge(gcs, gcs_client, tmp_path):
    """`modelplane watch --sink URL` in its own process: what a cluster runs beside the Broker."""
    import os
    import signal
    import subprocess
    import sys

    name = f"incoming/m/{uuid.uuid4().hex[:8]}.csv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPLANE_")}
    env.update(MODELPLANE_BUCKET="test-bucket", MODELPLANE_STATE_DIR=str(tmp_path / "state"),
               MODELPLANE_WATCH_INTERVAL="0.2", STORAGE_EMULATOR_HOST=gcs.endpoint, MODELPLANE_STORAGE_KEY=gcs.key)
    with Sink() as sink:
        proc = subprocess.Popen([sys.executable, "-m", "control.cli", "watch", "--sink", sink.url], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            gcs_client.bucket("test-bucket").blob(name).upload_from_string("a\n1\n")
            wait_until(lambda: f"objects/{name}" in sink.subjects(), 20, what="the bridged event")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "watching gs://test-bucket/incoming/" in out
    assert (tmp_path / "state" / "watcher.json").is_file()
