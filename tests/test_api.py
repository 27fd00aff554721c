"""The control API over real HTTP: the real server (aiohttp front door + Flask API) in a thread in front of an in-memory runtime."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import requests

from control_fake_runtime import FakeRuntime
from control_helpers import AUTH, TOKEN, api, FIXTURES, copy_fixture, running, settings_for





@pytest.fixture
def plane(tmp_path):
    """(server, runtime) with the fixture models registered from a models folder, token set."""
    settings = settings_for(tmp_path, token=TOKEN)
    for name in ("echo-rt", "sum-batch", "broken"):
        copy_fixture(name, settings.models_dir)
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        yield server, runtime


def tar_of(folder: Path, *, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=prefix + str(path.relative_to(folder)))
    return buf.getvalue()


def test_health_and_unknown_route_are_json(plane):
    server, _ = plane
    assert api.get(f"{server.url}/healthz").json()["status"] == "ok"
    r = api.get(f"{server.url}/no/such/route")
    assert r.status_code == 404
    assert "error" in r.json()
    r = api.get(f"{server.url}/models/echo-rt/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_models_registered_at_start_and_a_broken_one_reported_failed(plane):
    server, _ = plane
    models = {m["name"]: m for m in api.get(f"{server.url}/api/models").json()}
    assert set(models) == {"broken", "echo-rt", "sum-batch"}
    assert models["echo-rt"]["status"] == "idle" and models["echo-rt"]["version"] == "1.0.0"
    assert models["sum-batch"]["kind"] == "batch"
    broken = models["broken"]
    assert broken["status"] == "failed"
    assert "model.yaml:6: featurez: unknown key" in broken["error"]
    detail = api.get(f"{server.url}/api/models/broken").json()
    assert detail["status"] == "failed"


def test_model_detail_and_404(plane):
    server, _ = plane
    detail = api.get(f"{server.url}/api/models/echo-rt").json()
    assert detail["manifest"]["features"][0]["name"] == "x"
    assert [v["version"] for v in detail["versions"]] == ["1.0.0"]
    r = api.get(f"{server.url}/api/models/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "no model named 'nope'"}


def test_every_api_route_needs_the_token_reads_included(plane):
    server, runtime = plane
    r = requests.post(f"{server.url}/api/models/echo-rt/rollback", json={"version": "1.0.0"})
    assert r.status_code == 401
    assert "Authorization: Bearer" in r.json()["error"]
    r = requests.post(f"{server.url}/api/models/echo-rt/rollback", json={"version": "1.0.0"},
                      headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert "not one this service knows" in r.json()["error"]
    r = requests.delete(f"{server.url}/api/models/echo-rt")
    assert r.status_code == 401
    assert "echo-rt" in runtime.manifests
    for path in ("/api/models", "/api/models/echo-rt", "/api/jobs", "/api/events", "/metrics"):
        assert requests.get(f"{server.url}{path}").status_code == 401, path
        assert api.get(f"{server.url}{path}").status_code == 200, path
    # predict too (it also starts replicas); the health check and the API's description stay open
    r = requests.post(f"{server.url}/models/echo-rt/predict", json={"rows": [{"x": 1}]})
    assert r.status_code == 401 and runtime.forwarded == []
    assert requests.get(f"{server.url}/healthz").status_code == 200
    assert requests.get(f"{server.url}/openapi.json").status_code == 200


def test_deploy_tarball_then_rollback_then_delete(plane, tmp_path):
    server, runtime = plane
    folder = Path(tmp_path / "echo-v2")
    import shutil

    shutil.copytree(FIXTURES / "echo-rt", folder)
    manifest = folder / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", "version: 1.1.0"))
    r = api.post(f"{server.url}/api/models", data=tar_of(folder, prefix="echo-rt/"),
                      headers={**AUTH, "Content-Type": "application/gzip"})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == "1.1.0" and r.json()["live"] is True
    assert api.get(f"{server.url}/api/models/echo-rt").json()["version"] == "1.1.0"

    r = api.post(f"{server.url}/api/models/echo-rt/rollback", json={"version": "1.0.0"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["live"] is True
    assert runtime.live["echo-rt"] == "1.0.0"
    r = api.post(f"{server.url}/api/models/echo-rt/rollback", json={"version": "9.9.9"}, headers=AUTH)
    assert r.status_code == 404
    r = api.post(f"{server.url}/api/models/echo-rt/rollback", json={"version": "../1.0.0"}, headers=AUTH)
    assert r.status_code == 400 and "version" in r.json()["error"]

    r = api.delete(f"{server.url}/api/models/echo-rt", headers=AUTH)
    assert r.status_code == 200
    assert "echo-rt" not in {m["name"] for m in api.get(f"{server.url}/api/models").json()}
    assert api.delete(f"{server.url}/api/models/echo-rt", headers=AUTH).status_code == 404


def test_deploy_bad_manifest_is_422_with_file_line_field(plane):
    server, runtime = plane
    r = api.post(f"{server.url}/api/models", data=tar_of(FIXTURES / "broken"),
                      headers={**AUTH, "Content-Type": "application/gzip"})
    assert r.status_code == 422
    body = r.json()
    problems = {p["field"]: p for p in body["problems"]}
    assert problems["featurez"]["line"] == 6
    assert problems["featurez"]["file"] == "model.yaml"
    assert "features" in problems
    assert "model.yaml:6: featurez" in body["error"]
    assert "broken" not in runtime.manifests


def test_deploy_rejects_what_is_not_a_model_archive(plane):
    server, _ = plane
    gz = {"Content-Type": "application/gzip"}
    r = api.post(f"{server.url}/api/models", data=b"hello", headers=gz)
    assert r.status_code == 400 and "gzip tar" in r.json()["error"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    r = api.post(f"{server.url}/api/models", data=buf.getvalue(), headers=gz)
    assert r.status_code == 400 and "inside the folder" in r.json()["error"]
    r = api.post(f"{server.url}/api/models", data=tar_of(FIXTURES / "echo-rt", prefix="a/b/"), headers=gz)
    assert r.status_code == 422 and "no model.yaml" in r.json()["error"]


def test_deploy_same_version_different_content_conflicts(plane, tmp_path):
    server, _ = plane
    import shutil

    folder = Path(shutil.copytree(FIXTURES / "echo-rt", tmp_path / "echo"))
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text().replace("max: 3", "max: 4"))
    r = api.post(f"{server.url}/api/models", data=tar_of(folder), headers={"Content-Type": "application/gzip"})
    assert r.status_code == 409 and "different content" in r.json()["error"]


def test_predict_and_v2_are_forwarded_unchanged(plane):
    server, runtime = plane
    r = api.post(f"{server.url}/models/echo-rt/predict?trace=1", data=b"x\n1\n",
                      headers={"Content-Type": "text/csv", "Accept": "application/json"})
    assert r.status_code == 200
    assert r.headers["X-Adapter"] == "fake"
    sent = runtime.forwarded[-1]
    assert sent["path"] == "/predict" and sent["body"] == b"x\n1\n" and sent["query"] == "trace=1"
    assert sent["headers"]["content-type"] == "text/csv" and sent["headers"]["accept"] == "application/json"

    r = api.post(f"{server.url}/models/echo-rt/predict", json={"rows": [{"x": "bad"}]})
    assert r.status_code == 422
    assert r.json()["problems"] == [{"row": 0, "field": "x", "error": "bad"}]

    r = api.get(f"{server.url}/models/echo-rt/v2/models/echo-rt")
    assert r.status_code == 200 and r.json()["path"] == "/v2/models/echo-rt" and r.json()["method"] == "GET"
    r = api.post(f"{server.url}/models/echo-rt/v2/models/echo-rt/infer", json={"inputs": []})
    assert r.json()["path"] == "/v2/models/echo-rt/infer"

    assert api.post(f"{server.url}/models/nope/predict", json={"rows": []}).status_code == 404
    runtime.unavailable = True
    r = api.post(f"{server.url}/models/echo-rt/predict", json={"rows": []})
    assert r.status_code == 503 and "starting" in r.json()["error"]


def test_jobs_submit_filter_and_get(plane):
    server, _ = plane
    r = api.post(f"{server.url}/api/models/sum-batch/jobs", json={"dataset": "gs://test-bucket/a.csv"}, headers=AUTH)
    assert r.status_code == 202
    first = r.json()
    assert first["status"] == "queued" and first["trigger"] == "api"
    api.post(f"{server.url}/api/models/sum-batch/jobs", json={"dataset": "gs://test-bucket/b.csv"}, headers=AUTH)
    r = api.post(f"{server.url}/api/models/sum-batch/jobs", json={}, headers=AUTH)
    assert r.status_code == 400 and "dataset" in r.json()["error"]
    r = api.post(f"{server.url}/api/models/sum-batch/jobs", data="nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = api.post(f"{server.url}/api/models/sum-batch/jobs", data="nope", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415

    assert len(api.get(f"{server.url}/api/jobs").json()) == 2
    only_a = api.get(f"{server.url}/api/jobs", params={"dataset": "gs://test-bucket/a.csv"}).json()
    assert [j["id"] for j in only_a] == [first["id"]]
    assert api.get(f"{server.url}/api/jobs", params={"model": "echo-rt"}).json() == []
    assert api.get(f"{server.url}/api/jobs", params={"status": "bogus"}).status_code == 400
    assert api.get(f"{server.url}/api/jobs/{first['id']}").json()["dataset"] == "gs://test-bucket/a.csv"
    assert api.get(f"{server.url}/api/jobs/job-9999").status_code == 404


def test_dataset_upload_lands_in_incoming(plane, gcs, gcs_client):
    server, _ = plane
    r = api.post(f"{server.url}/api/models/sum-batch/datasets", params={"filename": "d1.csv"},
                      data=b"a,b\n1,2\n", headers={**AUTH, "Content-Type": "text/csv"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["uri"] == "gs://test-bucket/incoming/sum-batch/d1.csv"
    blob = gcs_client.bucket("test-bucket").get_blob("incoming/sum-batch/d1.csv")
    generation = str(blob.generation)
    assert body["key"] == f"test-bucket/incoming/sum-batch/d1.csv#{generation}"
    assert blob.download_as_bytes() == b"a,b\n1,2\n"
    # no watcher runs here: the upload handled its own bucket event, so the job exists already
    job = api.get(f"{server.url}/api/jobs/{body['job']}").json()
    assert job["dataset"] == body["uri"] and job["trigger"] == "event"
    started = api.get(f"{server.url}/api/events", params={"key": body["key"]}).json()
    assert [e["action"] for e in started] == ["started"]
    # the same event from the watcher (or the bucket's notification) later is a duplicate, not a second job
    from control.events import finalized_event, to_binary_http

    headers, data = to_binary_http(finalized_event({"bucket": "test-bucket", "name": "incoming/sum-batch/d1.csv",
                                                    "generation": generation}))
    again = api.post(f"{server.url}/events", data=data, headers=headers)
    assert again.status_code == 200 and again.json()["action"] == "duplicate", again.text
    assert again.json()["job"] == body["job"]
    assert len([j for j in api.get(f"{server.url}/api/jobs").json() if j["dataset"] == body["uri"]]) == 1

    bad = [({"filename": "../x.csv"}, 400), ({"filename": "x.txt"}, 400), ({}, 400)]
    for params, status in bad:
        r = api.post(f"{server.url}/api/models/sum-batch/datasets", params=params, data=b"a,b\n",
                     headers={"Content-Type": "text/csv"})
        assert r.status_code == status, (params, r.text)
    # a realtime model takes a dataset too: its job streams the file through its replicas
    r = api.post(f"{server.url}/api/models/echo-rt/datasets", params={"filename": "x.csv"}, data=b"x\n1\n",
                 headers={"Content-Type": "text/csv"})
    assert r.status_code == 201 and r.json()["job"], r.text
    r = requests.post(f"{server.url}/api/models/sum-batch/datasets", params={"filename": "x.csv"}, data=b"a,b\n1,2\n",
                      headers={"Content-Type": "text/csv"})
    assert r.status_code == 401


def test_job_results_download(plane, gcs, gcs_client):
    server, runtime = plane
    job = api.post(f"{server.url}/api/models/sum-batch/jobs", json={"dataset": "gs://test-bucket/x.csv"},
                        headers=AUTH).json()
    r = api.get(f"{server.url}/api/jobs/{job['id']}/results")
    assert r.status_code == 409 and "queued" in r.json()["error"]
    prefix = f"results/sum-batch/{job['id']}"
    gcs_client.bucket("test-bucket").blob(f"{prefix}/scores.csv").upload_from_string("total\n3.0\n")
    runtime.finish(job["id"], results_uri=f"gs://test-bucket/{prefix}/", rows=1)
    r = api.get(f"{server.url}/api/jobs/{job['id']}/results")
    assert r.status_code == 200
    assert r.text == "total\n3.0\n"
    assert r.headers["Content-Type"].startswith("text/csv")
    assert job["id"] in r.headers["Content-Disposition"]


def test_unexpected_exception_is_500_json(plane, monkeypatch, caplog):
    server, runtime = plane

    def boom(**kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(runtime, "jobs", boom)
    r = api.get(f"{server.url}/api/jobs")
    assert r.status_code == 500
    body = r.json()
    # the answer names a request id, never the exception or a server path; the log has both
    assert "ZeroDivisionError" not in body["error"] and "division" not in body["error"]
    assert body["request_id"] == r.headers["X-Request-Id"] and body["request_id"] in body["error"]
    failed = [rec for rec in caplog.records if "GET /api/jobs failed" in rec.getMessage()]
    assert failed and body["request_id"] in failed[0].getMessage() and failed[0].exc_info[0] is ZeroDivisionError


def test_metrics_count_requests_jobs_events_models(plane):
    server, _ = plane
    api.post(f"{server.url}/models/echo-rt/predict", json={"rows": [{"x": 1}]})
    api.post(f"{server.url}/api/models/sum-batch/jobs", json={"dataset": "gs://test-bucket/a.csv"}, headers=AUTH)
    api.post(f"{server.url}/events", data=b"nope", headers={"Content-Type": "application/cloudevents+json"})
    text = api.get(f"{server.url}/metrics").text
    assert 'modelplane_api_requests_total{route="/models/<name>/predict",method="POST",status="200"} 1' in text
    assert 'modelplane_jobs{status="queued"} 1' in text
    assert 'modelplane_events_total{action="rejected"} 1' in text
    assert 'modelplane_model_replicas{model="echo-rt",status="idle"} 0' in text
    assert 'modelplane_model_requests_total{model="echo-rt",status="200"} 1' in text
    assert "modelplane_models_failed 1" in text


def test_events_need_the_token_even_from_loopback(tmp_path):
    """Any local user (or a page in a local browser) could post events: the watcher sends the token."""
    settings = settings_for(tmp_path, token=TOKEN)
    with running(settings, runtime=FakeRuntime()) as server:
        headers = {"Content-Type": "application/cloudevents+json"}
        r = requests.post(f"{server.url}/events", data=b"{}", headers=headers)
        assert r.status_code == 401
        r = api.post(f"{server.url}/events", data=b"{}", headers=headers)
        assert r.status_code == 400  # judged as an event once the token is there


def test_server_stops_and_releases_its_port(tmp_path):
    settings = settings_for(tmp_path)
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        url = server.url
    with pytest.raises(requests.ConnectionError):
        api.get(f"{url}/healthz", timeout=2)
    assert runtime.closed is False  # a runtime passed in belongs to the caller


def test_model_list_pages_and_answers_not_modified(plane, tmp_path):
    server, _ = plane
    whole = api.get(f"{server.url}/api/models")
    names = [m["name"] for m in whole.json()]
    assert names == ["broken", "echo-rt", "sum-batch"]
    assert whole.headers["X-Total-Count"] == "3" and "Link" not in whole.headers
    etag = whole.headers["ETag"]
    # unchanged: 304 with no body, for a tag among several too
    r = api.get(f"{server.url}/api/models", headers={"If-None-Match": f'"other", {etag}'})
    assert r.status_code == 304 and r.content == b""
    # pages: limit + after, the next page linked
    first = api.get(f"{server.url}/api/models", params={"limit": 2})
    assert [m["name"] for m in first.json()] == ["broken", "echo-rt"]
    assert first.headers["Link"] == '</api/models?limit=2&after=echo-rt>; rel="next"'
    second = api.get(f"{server.url}{first.headers['Link'][1:].split('>')[0]}")
    assert [m["name"] for m in second.json()] == ["sum-batch"] and "Link" not in second.headers
    assert second.json()[0] == whole.json()[2]   # a page is the same bytes as in the whole list
    assert api.get(f"{server.url}/api/models", params={"after": "zzz"}).json() == []
    assert api.get(f"{server.url}/api/models", params={"limit": 0}).status_code == 400
    # a change makes a new list and a new tag
    folder = copy_fixture("echo-rt", tmp_path / "src")
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text().replace("name: echo-rt", "name: echo-two"))
    r = api.post(f"{server.url}/api/models", data=tar_of(folder), headers={"Content-Type": "application/gzip"})
    assert r.status_code == 201, r.text
    changed = api.get(f"{server.url}/api/models", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert "echo-two" in [m["name"] for m in changed.json()]
