"""Nothing kept in the pod: the control service's records in a state store (control/state.py) that
every replica reads — a state dir's files locally, objects in the bucket on a cluster.

The bucket is the real GCS emulator (the `gcs` fixture) through the real google-cloud-storage
client; two "replicas" are two sets of the plane's parts, each with its own BucketState (its own
replica id) on the same bucket, as two control pods are.
"""
from __future__ import annotations

import uuid

import pytest
from google.api_core import exceptions as gexc

from control.state import ABSENT, BucketState, FileState, StateConflict


def bucket_state(gcs_client, prefix: str, **kw) -> BucketState:
    return BucketState(gcs_client.bucket("test-bucket"), prefix=prefix, **kw)


@pytest.fixture
def prefix():
    """Each test its own corner of the shared bucket."""
    return f"state-{uuid.uuid4().hex[:8]}/"


# -- the emulator honours preconditions, as GCS does ---------------------------------------------

def test_the_emulator_refuses_a_write_or_delete_whose_precondition_fails(gcs_client, prefix):
    bucket = gcs_client.bucket("test-bucket")
    blob = bucket.blob(prefix + "record")
    blob.upload_from_string(b"one", if_generation_match=0)            # create-only: there is none
    first = blob.generation
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "record").upload_from_string(b"two", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "record").upload_from_string(b"two", if_generation_match=first + 1)
    with pytest.raises(gexc.PreconditionFailed):                        # a large (resumable) upload too
        bucket.blob(prefix + "record").upload_from_string(b"x" * (9 * 2**20), if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "record").delete(if_generation_match=first + 1)
    assert bucket.blob(prefix + "record").download_as_bytes() == b"one"   # nothing refused was written
    again = bucket.blob(prefix + "record")
    again.upload_from_string(b"two", if_generation_match=first)        # the generation read: swapped
    assert again.generation != first
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "record").upload_from_string(b"three", if_generation_not_match=again.generation)
    bucket.blob(prefix + "record").delete(if_generation_match=again.generation)
    assert bucket.get_blob(prefix + "record") is None


# -- the store, both implementations ------------------------------------------------------------

@pytest.fixture(params=["file", "bucket"])
def store(request, tmp_path, prefix):
    if request.param == "file":
        return FileState(tmp_path / "state")
    return bucket_state(request.getfixturevalue("gcs_client"), prefix)


def test_put_get_list_delete_and_compare_and_swap(store):
    assert store.get("comparisons/cmp-1.json") is None
    t1 = store.put_json("comparisons/cmp-1.json", {"status": "queued"}, expect=ABSENT)
    with pytest.raises(StateConflict):
        store.put_json("comparisons/cmp-1.json", {"status": "other"}, expect=ABSENT)
    doc, token = store.get_json("comparisons/cmp-1.json")
    assert doc == {"status": "queued"} and token == t1
    t2 = store.put_json("comparisons/cmp-1.json", {"status": "running"}, expect=t1)
    assert t2 != t1
    with pytest.raises(StateConflict):          # a writer holding the old token lost the race
        store.put_json("comparisons/cmp-1.json", {"status": "failed"}, expect=t1)
    assert store.get_json("comparisons/cmp-1.json")[0] == {"status": "running"}
    store.put("shadow/m/r1/0001.jsonl", b'{"a":1}\n')
    store.put("monitor/m/1.0.0.json", b"{}")
    assert store.list("comparisons/") == {"comparisons/cmp-1.json": t2}
    assert set(store.list()) == {"comparisons/cmp-1.json", "shadow/m/r1/0001.jsonl", "monitor/m/1.0.0.json"}
    scoped = store.scoped("shadow/")
    assert scoped.list("m/") == {"m/r1/0001.jsonl": store.list("shadow/")["shadow/m/r1/0001.jsonl"]}
    assert scoped.get("m/r1/0001.jsonl")[0] == b'{"a":1}\n'
    with pytest.raises(StateConflict):
        store.delete("comparisons/cmp-1.json", expect=t1)
    assert store.delete("comparisons/cmp-1.json", expect=t2) is True
    assert store.delete("comparisons/cmp-1.json") is False
    scoped.delete_prefix("m/")
    assert store.list("shadow/") == {}
    with pytest.raises(ValueError):
        store.get("../outside")


def test_a_state_dir_keeps_the_files_where_they_always_were(tmp_path):
    store = FileState(tmp_path / "state").scoped("comparisons/")
    store.put_json("cmp-0000000000000001.json", {"id": "cmp-0000000000000001"})
    path = tmp_path / "state" / "comparisons" / "cmp-0000000000000001.json"
    assert path.is_file() and '"id"' in path.read_text()
    tmp = path.parent / ".cmp-0000000000000002.json.abc.tmp"
    tmp.write_text("{")   # a write under way is no record
    assert list(store.list()) == ["cmp-0000000000000001.json"]
    tmp.unlink()
    store.delete("cmp-0000000000000001.json")
    assert not path.parent.exists()     # no empty folder left behind


# -- two replicas ---------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from adapters.manifest import load_manifest  # noqa: E402
from control.compare import Comparisons  # noqa: E402
from control.events import finalized_event  # noqa: E402
from control.monitor import ScoreMonitor  # noqa: E402
from control.plane import Plane  # noqa: E402
from control.runtime.base import ProxyResponse  # noqa: E402
from control_fake_runtime import FakeRuntime  # noqa: E402
from control_helpers import FIXTURES, TOKEN, settings_for, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = [i / 10 for i in range(10)]
DATASET = ("x\n" + "".join(f"{x}\n" for x in ROWS)).encode()


class ScoringRuntime(FakeRuntime):
    """Scores like a model: each CSV row's x, plus 0.1 on version 2.0.0. While `hold` is clear
    every call waits for it (a replica stuck mid-comparison)."""

    def __init__(self, hold: threading.Event | None = None):
        super().__init__()
        self.hold = hold
        self.calls = 0
        rt = load_manifest(FIXTURES / "echo-rt")
        self.deploy(rt)
        data = rt.model_dump(mode="python")
        data["version"] = "2.0.0"
        self.deploy(type(rt).model_validate(data), make_live=False)

    def forward(self, name, *, method, path, headers, body, query="", version=None):
        self.model(name)
        self.calls += 1
        if self.hold is not None:
            self.hold.wait()
        bump = 0.1 if version == "2.0.0" else 0.0
        scores = [float(line.split(",")[0]) + bump for line in body.decode().splitlines()[1:] if line]
        return ProxyResponse(200, {"Content-Type": "application/json"},
                             json.dumps({"model": name, "version": version, "scores": scores}).encode())


@pytest.fixture
def dataset(gcs_client, prefix) -> str:
    gcs_client.bucket("test-bucket").blob(f"{prefix}rows.csv").upload_from_string(DATASET, content_type="text/csv")
    return f"gs://test-bucket/{prefix}rows.csv"


@pytest.fixture
def replicas(tmp_path, gcs_client, prefix):
    """Two control planes over one runtime (the cluster) and one bucket, each its own replica."""
    runtime = ScoringRuntime()
    planes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        settings = settings_for(tmp_path / name, bucket="test-bucket")
        planes.append(Plane(settings, runtime, owns_runtime=False, token=TOKEN,
                            state=bucket_state(gcs_client, prefix, replica=f"replica-{name}")))
    try:
        yield planes
    finally:
        for p in planes:
            p.close()


def finished(comparisons, cid: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (c := comparisons.get(cid))["status"] in ("succeeded", "failed") and c, timeout,
                      interval=0.1, what=f"comparison {cid}")


def test_a_comparison_started_on_one_replica_is_listed_and_fetched_on_the_other(replicas, dataset):
    a, b = replicas
    started = a.comparisons.submit("echo-rt", a="1.0.0", b="2.0.0", dataset=dataset)
    assert [c["id"] for c in b.comparisons.list(model="echo-rt")] == [started["id"]]
    assert b.comparisons.get(started["id"])["owner"] == "replica-a"
    done = finished(b.comparisons, started["id"])      # B reads what A writes as it runs
    assert done["status"] == "succeeded", done
    assert done["report"]["rows"] == 10 and done["report"]["difference"]["max_abs"] == pytest.approx(0.1)
    assert b.comparisons.get(started["id"])["report"] == a.comparisons.get(started["id"])["report"]
    with pytest.raises(Exception) as e:
        b.comparisons.get("cmp-0000000000000000")
    assert e.value.status == 404


REPLICA_A = """
import json, sys, threading, time
from types import SimpleNamespace
from google.cloud import storage
from adapters.storage import emulator_credentials
import os
from control.compare import Comparisons
from control.state import BucketState
from test_shared_state import ScoringRuntime

client = storage.Client(project="test", credentials=emulator_credentials(os.environ["MODELPLANE_STORAGE_KEY"]))
store = BucketState(client.bucket("test-bucket"), prefix=sys.argv[1], replica="replica-a")
runtime = ScoringRuntime(hold=threading.Event())          # never set: every call hangs
plane = SimpleNamespace(runtime=runtime, storage=client, monitor=None)
comparisons = Comparisons(plane, store.scoped("comparisons/"), heartbeat_every=0.3, stale_after=2.0)
record = comparisons.submit("echo-rt", a="1.0.0", b="2.0.0", dataset=sys.argv[2])
print(json.dumps(record), flush=True)
time.sleep(600)
"""


def test_a_replica_killed_mid_comparison_loses_nothing_the_other_resumes_it(gcs_client, prefix, dataset, tmp_path):
    script = tmp_path / "replica_a.py"
    script.write_text(REPLICA_A)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.Popen([sys.executable, str(script), prefix, dataset], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        cid = json.loads(line)["id"]
        store = bucket_state(gcs_client, prefix, replica="replica-b").scoped("comparisons/")
        running = wait_until(lambda: (r := store.get_json(f"{cid}.json")[0])["status"] == "running" and r, 30,
                             what="replica A running the comparison")
        assert running["owner"] == "replica-a"
        beat = running["heartbeat_at"]
        wait_until(lambda: store.get_json(f"{cid}.json")[0]["heartbeat_at"] > beat, 10, what="a heartbeat")
    finally:
        proc.send_signal(signal.SIGKILL)    # the pod dies: nothing of it runs any more
        proc.wait(10)
    runtime = ScoringRuntime()
    b = Comparisons(SimpleNamespace(runtime=runtime, storage=gcs_client, monitor=None), store,
                    heartbeat_every=0.3, stale_after=2.0)
    try:
        seen = b.get(cid)
        assert seen["status"] == "running" and seen["owner"] == "replica-a"   # fresh yet: not taken over
        done = finished(b, cid)
        assert done["status"] == "succeeded", done
        assert done["owner"] == "replica-b" and done["attempts"] == 2
        assert done["takeovers"][-1]["from"] == "replica-a" and done["takeovers"][-1]["was"] == "running"
        assert "taken over from replica-a" in done["progress"]["resumed"]
        assert done["report"]["rows"] == 10
    finally:
        b.close()


def test_a_comparison_whose_replicas_keep_dying_is_marked_failed_with_the_reason(gcs_client, prefix, dataset):
    store = bucket_state(gcs_client, prefix, replica="replica-b").scoped("comparisons/")
    cid = "cmp-00000000000000dd"
    store.put_json(f"{cid}.json", {
        "id": cid, "kind": "comparison", "model": "echo-rt", "model_kind": "realtime", "a": "1.0.0", "b": "2.0.0",
        "threshold": None, "top": 20, "dataset": dataset, "dataset_size": len(DATASET), "status": "running",
        "created_at": "2024-05-01T10:00:00.000Z", "started_at": "2024-05-01T10:00:01.000Z", "finished_at": None,
        "progress": {"stage": "scoring"}, "error": None, "owner": "replica-z", "heartbeat_at": time.time() - 60,
        "attempts": 3}, expect=ABSENT)
    runtime = ScoringRuntime()
    b = Comparisons(SimpleNamespace(runtime=runtime, storage=gcs_client, monitor=None), store,
                    heartbeat_every=0.3, stale_after=2.0)
    try:
        got = b.get(cid)
        assert got["status"] == "failed" and "stopped 3 times" in got["error"] and "replica-z" in got["error"]
        assert store.get_json(f"{cid}.json")[0]["status"] == "failed"
        assert runtime.calls == 0
    finally:
        b.close()


def test_one_takeover_wins_when_two_replicas_find_the_same_stale_record(gcs_client, prefix, dataset):
    store = bucket_state(gcs_client, prefix, replica="x").scoped("comparisons/")
    cid = "cmp-00000000000000ee"
    store.put_json(f"{cid}.json", {
        "id": cid, "kind": "comparison", "model": "echo-rt", "model_kind": "realtime", "a": "1.0.0", "b": "2.0.0",
        "threshold": None, "top": 20, "dataset": dataset, "dataset_size": len(DATASET), "status": "queued",
        "created_at": "2024-05-01T10:00:00.000Z", "started_at": None, "finished_at": None,
        "progress": {"stage": "queued"}, "error": None, "owner": "replica-z", "heartbeat_at": 0, "attempts": 1},
        expect=ABSENT)
    holds = [threading.Event(), threading.Event()]
    sides = [Comparisons(SimpleNamespace(runtime=ScoringRuntime(hold=h), storage=gcs_client, monitor=None),
                         bucket_state(gcs_client, prefix, replica=f"r{i}").scoped("comparisons/"),
                         heartbeat_every=60, stale_after=2.0) for i, h in enumerate(holds)]
    try:
        for side in sides:
            side._refresh()
        records = [side._records[cid] for side in sides]
        results = [side._take(dict(record)) for side, record in zip(sides, records)]
        assert sorted(results) == [False, True]
        winner = results.index(True)
        assert store.get_json(f"{cid}.json")[0]["owner"] == f"r{winner}"
        holds[winner].set()
        assert finished(sides[1 - winner], cid)["status"] == "succeeded"
        assert sides[1 - winner]._mine == set()
    finally:
        for h in holds:
            h.set()
        for side in sides:
            side.close()


def _answer(version: str, scores: list[float]) -> ProxyResponse:
    return ProxyResponse(200, {"Content-Type": "application/json"},
                         json.dumps({"model": "m", "version": version, "scores": scores}).encode())


def test_monitoring_windows_of_both_replicas_add_up_and_the_reference_is_one(gcs_client, prefix):
    settings = {"monitoring": {"reference_size": 100, "window": 300, "drift_threshold": 0.25}}
    a, b = (ScoreMonitor(bucket_state(gcs_client, prefix, replica=f"replica-{n}").scoped("monitor/"), start=False,
                         manifest_of=lambda name, version: {"version": version, **settings}) for n in "ab")
    try:
        # both collect a reference; A's completes first and B adopts it instead of its own
        a.observe("m", _answer("1.0.0", [i / 100 for i in range(100)]))
        a.drain()
        b.observe("m", _answer("1.0.0", [0.9 + i / 1000 for i in range(100)]))
        b.drain()
        ra, rb = a.report("m")["versions"]["1.0.0"], b.report("m")["versions"]["1.0.0"]
        assert ra["reference"] == rb["reference"] and ra["reference"]["quantiles"]["p50"] == pytest.approx(0.495)
        # recent scores: 120 on A, 150 on B; each report sees 270 — one window
        a.observe("m", _answer("1.0.0", [0.5] * 120))
        b.observe("m", _answer("1.0.0", [0.6] * 150))
        a.flush()
        b.flush()
        ra, rb = a.report("m")["versions"]["1.0.0"], b.report("m")["versions"]["1.0.0"]
        assert ra["recent"]["count"] == rb["recent"]["count"] == 270
        assert ra["observed"] == rb["observed"] == 100 + 100 + 270
        assert ra["recent"]["quantiles"] == rb["recent"]["quantiles"]
        assert ra["drift"]["psi"] == pytest.approx(rb["drift"]["psi"]) and ra["drifted"] == rb["drifted"] is True
        # the window is the newest 300 of them all: B's newest 100 push out 70 of A's oldest
        b.observe("m", _answer("1.0.0", [0.7] * 100))
        b.flush()
        recent = a.report("m")["versions"]["1.0.0"]["recent"]
        assert recent["count"] == 300 and recent["quantiles"]["max"] == pytest.approx(0.7)
        # a reference set on A is the one B uses
        a.set_reference("m", "1.0.0", [0.6 + i / 1000 for i in range(200)], source="dataset gs://x/y.csv")
        rb = b.report("m")["versions"]["1.0.0"]
        assert rb["reference"]["source"] == "dataset gs://x/y.csv" and rb["reference"]["count"] == 200
    finally:
        a.close()
        b.close()


def test_events_and_shadow_records_of_both_replicas_are_one_log(replicas):
    a, b = replicas
    runtime = a.runtime
    sum_batch = load_manifest(FIXTURES / "sum-batch")
    runtime.deploy(sum_batch)
    event = finalized_event({"bucket": "test-bucket", "name": "incoming/sum-batch/day1.csv",
                             "generation": "1700000000000001", "size": "8"})
    status, first = a.sink.handle(event)
    assert status == 202 and first["action"] == "started"
    status, again = b.sink.handle(event)                     # the same event delivered to the other pod
    assert status == 200 and again["action"] == "duplicate" and again["job"] == first["job"]
    assert len(runtime.jobs()) == 1
    a.events.flush()
    b.events.flush()
    for plane in (a, b):
        assert [e["action"] for e in plane.events.entries()] == ["duplicate", "started"]
        assert plane.events.counts()["started"] == 1 and plane.events.counts()["duplicate"] == 1

    for i, plane in enumerate((a, b, a)):
        plane.shadow.record("echo-rt", {"at": time.time(), "live": "1.0.0", "candidate": "2.0.0", "rid": f"r{i}",
                                        "live_ms": 1.0, "candidate_ms": 2.0, "candidate_status": 200, "error": None,
                                        "live_scores": [0.5], "candidate_scores": [0.6]})
    a.shadow.flush()
    b.shadow.flush()
    for plane in (a, b):
        assert [r["rid"] for r in plane.shadow.records("echo-rt")] == ["r0", "r1", "r2"]
        report = plane.shadow.report("echo-rt", live=None, candidate=None)
        assert report["requests"] == 3 and report["comparison"]["rows"] == 3
    b.shadow.forget("echo-rt")
    assert a.shadow.records("echo-rt") == []
