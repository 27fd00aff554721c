"""Request bodies as a hostile caller sends them, on every body-taking route of the control
service (the front door's model routes and the Flask API): encoded bodies that do not decode,
end early or inflate past the route's cap, and floods of large bodies at once."""
from __future__ import annotations

import gzip
import io
import json
import socket
import tarfile
import threading
import time
import zlib

import pytest
import requests

from control_fake_runtime import FakeRuntime
from control_helpers import AUTH, FIXTURES, api, copy_fixture, running, settings_for


def tar_gz(folder) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buf.getvalue()


@pytest.fixture
def plane(tmp_path):
    settings = settings_for(tmp_path)
    folder = copy_fixture("echo-rt", settings.models_dir)
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text() + "limits: {max_body: 64Ki}\n")
    copy_fixture("sum-batch", settings.models_dir)
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        yield server, runtime


def routes(server):
    """(path, Content-Type, a good body) of every body-taking route."""
    event = {"specversion": "1.0", "id": "e-1", "source": "//storage.googleapis.com/projects/_/buckets/test-bucket",
             "type": "google.cloud.storage.object.v1.finalized", "subject": "objects/incoming/nobody/a.csv",
             "data": {"bucket": "test-bucket", "name": "incoming/nobody/a.csv", "generation": "1"}}
    return [
        ("/models/echo-rt/predict", "application/json", json.dumps({"rows": [{"x": 1}]}).encode()),
        ("/models/echo-rt/v2/models/echo-rt/infer", "application/json",
         json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}]}).encode()),
        ("/api/models", "application/gzip", tar_gz(FIXTURES / "echo-rt")),
        ("/api/models/echo-rt/rollout", "application/json", json.dumps({"version": "1.0.0", "percent": 10}).encode()),
        ("/events", "application/cloudevents+json", json.dumps(event).encode()),
        ("/api/models/sum-batch/datasets?filename=a.csv", "text/csv", b"x,y\n1,2\n"),
    ]


def raw_post(server, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
    """One POST over a plain socket: the status, headers and body as sent (no client decoding)."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Content-Length: {len(body)}",
            "Connection: close"] + [f"{k}: {v}" for k, v in {**AUTH, **headers}.items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        answer = b""
        while chunk := sock.recv(65536):   # a reset raises here: never acceptable
            answer += chunk
    top, _, rest = answer.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), fields, rest


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_encoded_bodies_decode_strictly_on_every_route(plane, encoding):
    server, runtime = plane
    pack = gzip.compress if encoding == "gzip" else zlib.compress
    for path, ctype, good in routes(server):
        cases = [
            (b"\x1f\x8b\x08\x00garbage that is no deflate stream at all", 400, encoding),
            (pack(good)[:-6], 400, "truncated"),                    # cut short: never taken as complete
            (pack(good) + b"trailing junk", 400, encoding),
        ]
        for body, status, needle in cases:
            code, _, answer = raw_post(server, path, {"Content-Type": ctype, "Content-Encoding": encoding}, body)
            error = json.loads(answer)["error"]
            assert code == status and needle in error, (path, encoding, code, answer[:300])
    assert runtime.forwarded == [] and runtime.jobs() == []
    assert list(runtime.manifests) == ["echo-rt", "sum-batch"] and list(runtime.manifests["echo-rt"]) == ["1.0.0"]


def test_other_encodings_are_415_naming_what_is_accepted(plane):
    server, runtime = plane
    for path, ctype, good in routes(server):
        for encoding in ("br", "compress", "gzip, gzip", "zstd"):
            code, _, answer = raw_post(server, path, {"Content-Type": ctype, "Content-Encoding": encoding}, good)
            error = json.loads(answer)["error"]
            assert code == 415 and "gzip" in error and "deflate" in error, (path, encoding, code, answer[:300])
    assert runtime.forwarded == []


def test_a_gzip_bomb_is_413_against_the_routes_cap(plane):
    server, runtime = plane
    bomb = gzip.compress(b"{" + b" " * (80 * 2**20) + b"}", 9)   # 80 MiB of JSON in ~80 KiB
    for path in ("/models/echo-rt/predict", "/models/echo-rt/v2/models/echo-rt/infer",
                 "/api/models/echo-rt/rollout", "/events", "/api/models"):
        ctype = "application/gzip" if path == "/api/models" else "application/json"
        code, _, answer = raw_post(server, path, {"Content-Type": ctype, "Content-Encoding": "gzip"}, bomb)
        assert code == 413, (path, code, answer[:300])
    assert runtime.forwarded == []


def test_a_good_encoded_body_reaches_the_model_decoded(plane):
    server, runtime = plane
    body = json.dumps({"rows": [{"x": 1}]}).encode()
    for encoding, pack in (("gzip", gzip.compress), ("deflate", zlib.compress), ("identity", bytes)):
        runtime.forwarded.clear()
        code, _, answer = raw_post(server, "/models/echo-rt/predict",
                                   {"Content-Type": "application/json", "Content-Encoding": encoding}, pack(body))
        assert code == 200, answer[:300]
        sent = runtime.forwarded[0]
        assert sent["body"] == body and "content-encoding" not in {k.lower() for k in sent["headers"]}
    code, _, answer = raw_post(server, "/api/models/echo-rt/rollout",
                               {"Content-Type": "application/json", "Content-Encoding": "gzip"},
                               gzip.compress(b'{"version": "1.0.0", "percent": 10}'))
    # decoded and judged by the route itself (the fake runtime cannot split traffic: its own 400)
    assert code == 200 or "cannot split traffic" in json.loads(answer)["error"], answer[:300]


# -- the budget of bodies in flight ----------------------------------------------------------------

def test_the_body_past_the_budget_is_503_with_retry_after_and_bytes_come_back(tmp_path):
    mib = 2**20
    settings = settings_for(tmp_path, max_bodies_in_flight=40 * mib)
    folder = copy_fixture("echo-rt", settings.models_dir)
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text() + "limits: {max_body: 2Mi}\n")
    runtime = FakeRuntime()
    row = b'{"rows": [{"x": 1}]}'
    body = row + b" " * (mib - len(row))
    with running(settings, runtime=runtime) as server:
        budget = server._door.budget

        def head(length: int) -> bytes:
            return (f"POST /models/echo-rt/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                    f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {length}\r\n\r\n").encode()

        held = []
        try:
            for _ in range(40):   # forty 1 MiB bodies in flight: half sent, the rest never comes
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
                sock.sendall(head(len(body)) + body[: mib // 2])
                held.append(sock)
            deadline = time.monotonic() + 10
            while budget.held < 40 * mib and time.monotonic() < deadline:
                time.sleep(0.02)
            assert budget.held == 40 * mib
            r = api.post(f"{server.url}/models/echo-rt/predict", data=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 503 and "MODELPLANE_MAX_BODIES_IN_FLIGHT" in r.json()["error"], r.text[:300]
            assert int(r.headers["Retry-After"]) >= 1

            def chunks():   # no Content-Length: refused as its bytes pass the budget
                for _ in range(8):
                    yield body[: mib // 4]

            r = api.post(f"{server.url}/models/echo-rt/predict", data=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 503 and "Retry-After" in r.headers
            # the small API keeps answering meanwhile
            assert api.get(f"{server.url}/api/models", timeout=10).status_code == 200
            # one finishes: its bytes are given back, and the next body fits
            held[0].sendall(body[mib // 2:])
            assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:   # the others hang up mid-body: theirs are given back too
                sock.close()
        deadline = time.monotonic() + 10
        while budget.held and time.monotonic() < deadline:
            time.sleep(0.02)
        assert budget.held == 0
        r = api.post(f"{server.url}/models/echo-rt/predict", data=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200


def test_a_body_larger_than_the_whole_budget_is_413_not_retry(tmp_path):
    settings = settings_for(tmp_path, max_bodies_in_flight=64 * 1024)
    folder = copy_fixture("echo-rt", settings.models_dir)
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text() + "limits: {max_body: 1Mi}\n")
    with running(settings, runtime=FakeRuntime()) as server:
        body = b'{"rows": [{"x": 1}]}' + b" " * (100 * 1024)
        r = api.post(f"{server.url}/models/echo-rt/predict", data=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "MODELPLANE_MAX_BODIES_IN_FLIGHT" in r.json()["error"]
        r = api.post(f"{server.url}/models/echo-rt/predict", data=iter([body]), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert server._door.budget.held == 0
