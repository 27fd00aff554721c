"""The CloudEvents sink over real HTTP: binary and structured mode, exactly once, and what is ignored."""
from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from control.events import FINALIZED, finalized_event, parse, to_binary_http
from control.errors import BadRequest
from control_fake_runtime import FakeRuntime
from control_helpers import api, copy_fixture, running, settings_for
from kube import events_dir

SAMPLES = events_dir()
SAMPLE = json.loads((SAMPLES / "gcs-finalized-structured.json").read_text()) if SAMPLES.exists() else None


def obj(name: str, *, generation="1700000000000001", bucket="test-bucket") -> dict:
    """A GCS object resource as the JSON API (and the emulator) returns it."""
    return {"kind": "storage#object", "bucket": bucket, "name": name, "generation": generation,
            "metageneration": "1", "size": "8", "contentType": "text/csv",
            "timeCreated": "2024-05-01T10:00:00.000Z", "updated": "2024-05-01T10:00:00.000Z",
            "md5Hash": "5evUwCzvvnlVl3xnraJCtw=="}


@pytest.fixture
def plane(tmp_path):
    settings = settings_for(tmp_path)
    for name in ("echo-rt", "sum-batch"):
        copy_fixture(name, settings.models_dir)
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        yield server, runtime


def post_binary(url: str, resource: dict) -> requests.Response:
    headers, body = to_binary_http(finalized_event(resource))
    return api.post(f"{url}/events", data=body, headers=headers)


def test_builder_matches_googles_event():
    event = finalized_event({**obj("incoming/m/a.csv"), "size": 8, "generation": 42, "metageneration": 1})
    attrs = event.get_attributes()
    assert attrs["type"] == FINALIZED == "google.cloud.storage.object.v1.finalized"
    assert attrs["source"] == "//storage.googleapis.com/projects/_/buckets/test-bucket"
    assert attrs["subject"] == "objects/incoming/m/a.csv"
    assert attrs["specversion"] == "1.0" and attrs["id"] and attrs["time"].tzinfo is not None
    data = event.get_data()
    assert (data["size"], data["generation"], data["metageneration"]) == ("8", "42", "1")
    headers, body = to_binary_http(event)
    assert headers["ce-type"] == FINALIZED and headers["content-type"] == "application/json"
    assert json.loads(body)["name"] == "incoming/m/a.csv"


def test_binary_event_starts_one_job_and_a_resend_is_a_duplicate(plane):
    server, runtime = plane
    r = post_binary(server.url, obj("incoming/sum-batch/day1.csv"))
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["action"] == "started" and started["model"] == "sum-batch"
    assert started["key"] == "test-bucket/incoming/sum-batch/day1.csv#1700000000000001"
    job = runtime.job(started["job"])
    assert job.dataset == "gs://test-bucket/incoming/sum-batch/day1.csv" and job.trigger == "event"

    r = post_binary(server.url, obj("incoming/sum-batch/day1.csv"))
    assert r.status_code == 200
    assert r.json()["action"] == "duplicate" and r.json()["job"] == started["job"]
    assert len(runtime.jobs()) == 1

    # a new generation of the same object is new data: a new job
    r = post_binary(server.url, obj("incoming/sum-batch/day1.csv", generation="1700000000000002"))
    assert r.status_code == 202 and r.json()["job"] != started["job"]
    assert len(runtime.jobs()) == 2


def test_concurrent_deliveries_of_one_event_make_one_job(plane):
    server, runtime = plane
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post_binary(server.url, obj("incoming/sum-batch/burst.csv")), range(16)))
    assert sorted(r.status_code for r in answers) == [200] * 15 + [202]
    assert len({r.json()["job"] for r in answers}) == 1
    assert len(runtime.jobs()) == 1


@pytest.mark.skipif(SAMPLE is None, reason="shared event samples not present")
def test_structured_event_from_googles_sample(plane):
    server, runtime = plane
    event = copy.deepcopy(SAMPLE)
    event["source"] = "//storage.googleapis.com/projects/_/buckets/test-bucket"
    event["subject"] = "objects/incoming/sum-batch/MyFile.csv"
    event["data"].update(bucket="test-bucket", name="incoming/sum-batch/MyFile.csv")  # generation stays an int
    r = api.post(f"{server.url}/events", data=json.dumps(event),
                      headers={"Content-Type": "application/cloudevents+json"})
    assert r.status_code == 202, r.text
    assert r.json()["key"] == "test-bucket/incoming/sum-batch/MyFile.csv#96883251"
    assert len(runtime.jobs()) == 1
    r = api.post(f"{server.url}/events", data=json.dumps(event),
                      headers={"Content-Type": "application/cloudevents+json; charset=utf-8"})
    assert r.json()["action"] == "duplicate"


@pytest.mark.parametrize("headers,body,needle", [
    ({"Content-Type": "text/plain", "ce-specversion": "1.0"}, b"hello", "ce-id"),
    ({"Content-Type": "application/cloudevents+json"}, b"{not json", "not JSON"),
    ({"Content-Type": "application/cloudevents+json"}, b'{"specversion": "1.0", "type": "t"}', "id, source"),
    ({"Content-Type": "application/json", "ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s"}, b"{}", "ce-id"),
    ({"Content-Type": "application/cloudevents-batch+json"}, b"[]", "one event per request"),
    ({"Content-Type": "application/json", "ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s",
      "ce-id": "1", "ce-time": "yesterday"}, b"{}", "not a valid CloudEvent"),
])
def test_what_is_not_a_cloudevent_is_400_saying_what_is_missing(plane, headers, body, needle):
    server, runtime = plane
    r = api.post(f"{server.url}/events", data=body, headers=headers)
    assert r.status_code == 400
    assert needle in r.json()["error"]
    assert runtime.jobs() == []
    rejected = api.get(f"{server.url}/api/events", params={"action": "rejected"}).json()
    assert needle in rejected[0]["reason"]


def test_parse_reads_both_modes():
    event = finalized_event(obj("incoming/m/a.csv"))
    headers, body = to_binary_http(event)
    assert parse(headers, body).get_subject() == "objects/incoming/m/a.csv"
    structured = {**{k: v for k, v in event.get_attributes().items() if k != "time"}, "data": event.get_data()}
    parsed = parse({"content-type": "application/cloudevents+json"}, json.dumps(structured).encode())
    assert parsed.get_data()["name"] == "incoming/m/a.csv"
    with pytest.raises(BadRequest):
        parse({}, b"")


@pytest.mark.parametrize("resource,event_type,reason", [
    (obj("incoming/nosuch/a.csv"), FINALIZED, "no model named 'nosuch'"),
    (obj("incoming/sum-batch/a.parquet"), FINALIZED, "is not a CSV file"),
    (obj("results/sum-batch/a.csv"), FINALIZED, "is not under incoming/"),
    (obj("incoming/a.csv"), FINALIZED, "is not at incoming/{model}/{file}.csv"),
    (obj("incoming/sum-batch/a.csv", bucket="elsewhere"), FINALIZED, "not the plane's bucket"),
    (obj("incoming/sum-batch/a.csv"), "google.cloud.storage.object.v1.deleted", "is not handled"),
])
def test_ignored_events_answer_200_with_the_reason(plane, resource, event_type, reason):
    server, runtime = plane
    event = finalized_event(resource)
    event.get_attributes()["type"] = event_type
    headers, body = to_binary_http(event)
    r = api.post(f"{server.url}/events", data=body, headers=headers)
    assert r.status_code == 200
    assert r.json()["action"] == "ignored" and reason in r.json()["reason"]
    assert runtime.jobs() == []
    logged = api.get(f"{server.url}/api/events").json()
    assert logged[0]["action"] == "ignored" and reason in logged[0]["reason"]
    assert logged[0]["id"] == event.get_id()
    assert 'modelplane_events_total{action="ignored"} 1' in api.get(f"{server.url}/metrics").text


def test_a_realtime_models_upload_starts_its_job_once(plane):
    """A realtime model runs on a dataset too: its job streams the file through its replicas."""
    server, runtime = plane
    r = post_binary(server.url, obj("incoming/echo-rt/a.csv"))
    assert r.status_code == 202 and r.json()["action"] == "started", r.text
    assert [(j.model, j.dataset, j.trigger) for j in runtime.jobs()] == [
        ("echo-rt", "gs://test-bucket/incoming/echo-rt/a.csv", "event")]
    again = post_binary(server.url, obj("incoming/echo-rt/a.csv"))
    assert again.status_code == 200 and again.json()["action"] == "duplicate"
    assert len(runtime.jobs()) == 1


def test_event_log_is_newest_first_and_filterable(plane):
    server, _ = plane
    post_binary(server.url, obj("incoming/sum-batch/one.csv"))
    post_binary(server.url, obj("incoming/nosuch/two.csv"))
    post_binary(server.url, obj("incoming/sum-batch/one.csv"))
    logged = api.get(f"{server.url}/api/events").json()
    assert [e["action"] for e in logged] == ["duplicate", "ignored", "started"]
    key = "test-bucket/incoming/sum-batch/one.csv#1700000000000001"
    assert [e["action"] for e in api.get(f"{server.url}/api/events", params={"key": key}).json()] == \
        ["duplicate", "started"]
    assert len(api.get(f"{server.url}/api/events", params={"limit": 1}).json()) == 1


# -- hostile events ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body,needle", [
    (b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "not JSON"),
    (b'{"specversion": "1.0", "id": "\\ud800", "source": "/s", "type": "t"}', "not JSON"),
])
def test_hostile_structured_events_are_400s(plane, body, needle):
    server, runtime = plane
    r = api.post(f"{server.url}/events", data=body, headers={"Content-Type": "application/cloudevents+json"})
    assert r.status_code == 400 and needle in r.json()["error"], r.text[:300]
    assert runtime.jobs() == []


@pytest.mark.parametrize("data,needle", [
    ({"bucket": "test-bucket", "name": ["incoming/sum-batch/a.csv"], "generation": "1"}, "data.name"),
    ({"bucket": 7, "name": "incoming/sum-batch/a.csv", "generation": "1"}, "data.bucket"),
    ({"bucket": "test-bucket", "name": "incoming/sum-batch/a.csv", "generation": {"x": 1}}, "data.generation"),
])
def test_an_event_whose_fields_are_not_strings_is_400(plane, data, needle):
    server, runtime = plane
    headers = {"Content-Type": "application/json", "ce-specversion": "1.0", "ce-id": "9", "ce-source": "/s",
               "ce-type": "google.cloud.storage.object.v1.finalized"}
    r = api.post(f"{server.url}/events", data=json.dumps(data), headers=headers)
    assert r.status_code == 400 and needle in r.json()["error"], r.text[:300]
    assert runtime.jobs() == []
    assert api.get(f"{server.url}/api/events", params={"action": "rejected"}).json()[0]["reason"].startswith(needle)
