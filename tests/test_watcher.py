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


# -- bounded state ---------------------------------------------------------------------------

def _state(path) -> dict:
    import json

    return json.loads(path.read_text())


def _entries(path) -> int:
    data = _state(path)
    return len(data["recent"]) + len(data["pending"])


def test_state_stays_bounded_however_many_objects_the_bucket_holds(gcs, gcs_client, tmp_path, prefix):
    """Only objects stamped within the margin of the newest are remembered; the rest are skipped
    without an entry, and nothing is announced twice."""
    bucket = gcs_client.bucket("test-bucket")
    state = tmp_path / "w.json"
    with Sink() as sink:
        watcher = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=state, prefix=prefix,
                          margin=0.5)
        for round_ in range(4):
            for i in range(10):
                bucket.blob(f"{prefix}m/{round_}-{i}.csv").upload_from_string(f"a\n{i}\n")
            assert watcher.poll_once() == 10
            assert _entries(state) <= 10  # this round's uploads at most, never the 10 x round_ before
            time.sleep(0.6)  # the next uploads are stamped past the margin
        assert watcher.poll_once() == 0
        # the window follows the newest stamp, not the clock: the last round's uploads stay
        assert sorted(k.split("#")[0] for k in _state(state)["recent"]) == [f"{prefix}m/3-{i}.csv" for i in range(10)]
        assert watcher.last_scan["objects"] == 40  # yet every object was listed
    assert len(sink.received) == 40 and len(set(sink.subjects())) == 40
    assert "sent" not in _state(state) and _state(state)["mark"] > 0


def test_a_restart_resends_nothing_delivered_not_even_objects_past_the_margin(gcs, gcs_client, tmp_path, prefix):
    bucket = gcs_client.bucket("test-bucket")
    state = tmp_path / "w.json"
    bucket.blob(f"{prefix}m/old.csv").upload_from_string("a\n1\n")
    with Sink() as sink:
        first = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=state, prefix=prefix,
                        margin=0.3)
        assert first.poll_once() == 1
        time.sleep(0.4)
        bucket.blob(f"{prefix}m/new.csv").upload_from_string("a\n2\n")
        assert first.poll_once() == 1
        assert list(_state(state)["recent"]) == [f"{prefix}m/new.csv#{bucket.get_blob(f'{prefix}m/new.csv').generation}"]
        again = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=state, prefix=prefix,
                        margin=0.3)
        assert again.poll_once() == 0  # old.csv has no entry and is still not resent
        bucket.blob(f"{prefix}m/old.csv").upload_from_string("a\n3\n")  # a new generation is news
        assert again.poll_once() == 1
    assert sorted(sink.subjects()) == sorted([f"objects/{prefix}m/old.csv"] * 2 + [f"objects/{prefix}m/new.csv"])


def test_the_previous_state_format_is_honoured_on_upgrade(gcs, gcs_client, tmp_path, prefix):
    """A version-1 watcher.json (every key ever sent) still means "announced": an upgrade resends
    nothing, and the file is rewritten in the bounded form after one listing."""
    import json

    bucket = gcs_client.bucket("test-bucket")
    keys = []
    for i in range(3):
        blob = bucket.blob(f"{prefix}m/{i}.csv")
        blob.upload_from_string(f"a\n{i}\n")
        keys.append(f"{blob.name}#{blob.generation}")
    state = tmp_path / "w.json"
    state.write_text(json.dumps({"bucket": "test-bucket", "sent": keys[:2]}))
    with Sink() as sink:
        watcher = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=state, prefix=prefix)
        assert watcher.poll_once() == 1
    assert sink.subjects() == [f"objects/{prefix}m/2.csv"]
    data = _state(state)
    assert data["version"] == 2 and "sent" not in data and sorted(data["recent"]) == sorted(keys)


def test_a_failed_delivery_stays_pending_and_is_delivered_later(gcs, gcs_client, tmp_path, prefix):
    bucket = gcs_client.bucket("test-bucket")
    bucket.blob(f"{prefix}m/x.csv").upload_from_string("a\n1\n")
    state = tmp_path / "w.json"
    with Sink() as sink:
        sink.fail = 1
        watcher = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=state, prefix=prefix,
                          interval=0.2, max_backoff=0.2)
        with pytest.raises(RuntimeError, match="503"):
            watcher.poll_once()
        key = f"{prefix}m/x.csv#{bucket.get_blob(f'{prefix}m/x.csv').generation}"
        assert _state(state)["pending"] == {key: 1} and _state(state)["recent"] == {}
        assert watcher.poll_once() == 0  # its backoff has not passed: not hammered every round
        time.sleep(0.25)
        assert watcher.poll_once() == 1
        assert _state(state)["pending"] == {} and list(_state(state)["recent"]) == [key]
        assert watcher.poll_once() == 0
    assert sink.subjects() == [f"objects/{prefix}m/x.csv"]


def test_an_event_that_keeps_failing_does_not_hold_up_the_others(gcs, gcs_client, tmp_path, prefix):
    bucket = gcs_client.bucket("test-bucket")
    bucket.blob(f"{prefix}m/a.csv").upload_from_string("a\n1\n")
    bucket.blob(f"{prefix}m/b.csv").upload_from_string("a\n2\n")
    with Sink() as sink:
        sink.fail = 1  # the first attempt (a.csv, listed first) fails
        watcher = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=tmp_path / "w.json",
                          prefix=prefix, interval=5, max_backoff=60)
        with pytest.raises(RuntimeError):
            watcher.poll_once()
        assert watcher.poll_once() == 1  # b.csv goes through while a.csv waits out its backoff
        assert sink.subjects() == [f"objects/{prefix}m/b.csv"]


def test_an_object_gone_before_delivery_is_dropped_not_retried_forever(gcs, gcs_client, tmp_path, prefix):
    bucket = gcs_client.bucket("test-bucket")
    bucket.blob(f"{prefix}m/x.csv").upload_from_string("a\n1\n")
    state = tmp_path / "w.json"
    down = Watcher(bucket="test-bucket", sink="http://127.0.0.1:9/", client=gcs_client, state_path=state,
                   prefix=prefix, timeout=1)
    with pytest.raises(requests.ConnectionError):
        down.poll_once()
    assert len(_state(state)["pending"]) == 1
    bucket.blob(f"{prefix}m/x.csv").delete()
    assert down.poll_once() == 0
    assert _state(state)["pending"] == {}


def _upload_started_now_finished_later(gcs, gcs_client, name: str):
    """A resumable upload: the emulator stamps the object (timeCreated, generation) when the upload
    starts and lists it only once the data is sent. Returns the function that sends it."""
    blob = gcs_client.bucket("test-bucket").blob(name)
    url = blob.create_resumable_upload_session(content_type="text/csv", size=4)

    def finish():
        resp = requests.put(url, data=b"a\n1\n", headers={"Authorization": f"Bearer {gcs.key}",
                                                          "Content-Range": "bytes 0-3/4"}, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()

    return finish


def test_an_object_appearing_late_within_the_margin_is_delivered(gcs, gcs_client, tmp_path, prefix):
    finish = _upload_started_now_finished_later(gcs, gcs_client, f"{prefix}m/late.csv")
    time.sleep(0.3)
    gcs_client.bucket("test-bucket").blob(f"{prefix}m/early.csv").upload_from_string("a\n2\n")
    with Sink() as sink:
        watcher = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=tmp_path / "w.json",
                          prefix=prefix, margin=5)
        assert watcher.poll_once() == 1
        late = finish()
        assert watcher._mark > late_stamp(late)  # it appears older than what was already seen
        assert watcher.poll_once() == 1
    assert sink.subjects() == [f"objects/{prefix}m/early.csv", f"objects/{prefix}m/late.csv"]


def test_an_object_appearing_later_than_the_margin_is_taken_as_announced(gcs, gcs_client, tmp_path, prefix):
    """The margin's limit, pinned down: what appears stamped before `mark - margin` is skipped."""
    finish = _upload_started_now_finished_later(gcs, gcs_client, f"{prefix}m/late.csv")
    time.sleep(0.5)
    gcs_client.bucket("test-bucket").blob(f"{prefix}m/early.csv").upload_from_string("a\n2\n")
    with Sink() as sink:
        watcher = Watcher(bucket="test-bucket", sink=sink.url, client=gcs_client, state_path=tmp_path / "w.json",
                          prefix=prefix, margin=0.2)
        assert watcher.poll_once() == 1
        finish()
        assert watcher.poll_once() == 0
    assert sink.subjects() == [f"objects/{prefix}m/early.csv"]


def late_stamp(resource: dict) -> int:
    from control.watcher import stamp_us

    return stamp_us(resource)


def test_the_pause_keeps_listing_to_a_bounded_share_of_the_time():
    watcher = Watcher(bucket="b", sink="http://127.0.0.1:9/", interval=1.0, max_duty=0.1)
    assert watcher.pause_after(0.01) == 1.0  # a small bucket: the configured interval
    assert watcher.pause_after(2.0) == pytest.approx(18.0)  # 2 s listing, 18 s pause: 10% of the time
    with pytest.raises(ValueError):
        Watcher(bucket="b", sink="http://127.0.0.1:9/", max_duty=0)


def test_stamps_are_exact_microseconds():
    from control.watcher import stamp_us

    assert stamp_us({"timeCreated": "1970-01-01T00:00:01.000001Z"}) == 1_000_001
    assert stamp_us({"timeCreated": "2024-05-01T12:00:00.123Z"}) == 1714564800123000
    assert stamp_us({"timeCreated": "2024-05-01T12:00:00Z", "timeFinalized": "2024-05-01T12:00:01Z"}) == 1714564801000000
    assert stamp_us({}) is None and stamp_us({"timeCreated": "yesterday"}) is None
