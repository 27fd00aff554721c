"""The control service attacked as a caller would: no token, a rebinding page, a cross-site
form, a path to the server's own files, oversized bodies, paths that try to re-target."""
from __future__ import annotations

import http.client
import json
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import requests

from control.auth import TokenError
from control.server import ControlServer
from control_fake_runtime import FakeRuntime
from control_helpers import AUTH, FIXTURES, TOKEN, api, copy_fixture, running, settings_for


@pytest.fixture
def plane(tmp_path):
    settings = settings_for(tmp_path, max_model_upload=64 * 1024)
    copy_fixture("echo-rt", settings.models_dir)
    copy_fixture("sum-batch", settings.models_dir)
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        yield server, runtime


def tar_gz(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=prefix + str(path.relative_to(folder)), recursive=False)
    return buf.getvalue()


# -- who may start a service, with which token ------------------------------------------------------

def test_a_service_beyond_loopback_will_not_start_without_a_token(tmp_path):
    settings = settings_for(tmp_path, host="0.0.0.0", token=None)
    with pytest.raises(TokenError, match="refusing to listen on 0.0.0.0 without a token"):
        ControlServer(settings, runtime=FakeRuntime()).start()
    # an empty token is no token: it never turns authentication off
    settings = settings_for(tmp_path, host="0.0.0.0", token="   ")
    with pytest.raises(TokenError):
        ControlServer(settings, runtime=FakeRuntime()).start()


def test_on_loopback_a_token_is_made_and_enforced(tmp_path):
    settings = settings_for(tmp_path, token="")
    with running(settings, runtime=FakeRuntime()) as server:
        made = (Path(settings.state_dir) / "token")
        assert made.stat().st_mode & 0o777 == 0o600
        token = made.read_text().strip()
        assert len(token) >= 32
        assert requests.get(f"{server.url}/api/models").status_code == 401
        r = requests.get(f"{server.url}/api/models", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert server.plane.token_created is True
    with running(settings, runtime=FakeRuntime()) as server:  # a restart keeps the token
        assert server.plane.token == token and server.plane.token_created is False


# -- browser attacks ------------------------------------------------------------------------------

def test_dns_rebinding_is_refused_by_the_host_check(plane):
    server, runtime = plane
    port = server.port
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io"):
        r = api.get(f"{server.url}/api/models", headers={"Host": host})
        assert r.status_code == 403 and "Host" in r.json()["error"], host
        r = api.post(f"{server.url}/models/echo-rt/predict", json={"rows": [{"x": 1}]}, headers={"Host": host})
        assert r.status_code == 403, host
    assert runtime.forwarded == []
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"10.1.2.3:{port}"):
        assert api.get(f"{server.url}/api/models", headers={"Host": host}).status_code == 200, host


def _with_host(server, method: str, path: str, host: str) -> tuple[int, str]:
    """A request whose Host header is sent byte for byte (clients would fix or refuse some)."""
    import socket

    body = b'{"rows": [{"x": 1}]}' if method == "POST" else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def test_malformed_host_headers_are_400_naming_the_host(plane):
    server, runtime = plane
    port = server.port
    bad = ["[::1", f"[::1:{port}", "a@b", f"user@127.0.0.1:{port}", f"127.0.0.1 :{port}", "local host",
           "localhost:", f"localhost:{port}x", "localhost:http", "localhost:99999", "::1", f"[nope]:{port}",
           f"localhost:{port}:{port}", "-bad-.example"]
    for host in bad:
        for method, path in (("GET", "/api/models"), ("POST", "/models/echo-rt/predict")):
            status, body = _with_host(server, method, path, host)
            assert status == 400 and "Host" in body and "malformed" in body, (host, path, status, body[:200])
    assert runtime.forwarded == []
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "[::1]", "LocalHost"):
        for method, path in (("GET", "/api/models"), ("POST", "/models/echo-rt/predict")):
            status, body = _with_host(server, method, path, host)
            assert status == 200, (host, path, status, body[:200])


def test_allowed_hosts_names_the_service_behind_a_proxy(tmp_path):
    settings = settings_for(tmp_path, allowed_hosts="models.example.com,.svc.cluster.local")
    with running(settings, runtime=FakeRuntime()) as server:
        ok = ("models.example.com", "modelplane-control.modelplane.svc.cluster.local:8080")
        for host in ok:
            assert api.get(f"{server.url}/api/models", headers={"Host": host}).status_code == 200, host
        assert api.get(f"{server.url}/api/models", headers={"Host": "evil.example.com"}).status_code == 403


def test_a_cross_site_form_post_deploys_nothing(plane):
    """What a page on another site can send: a simple form post (text/plain, no token), or the
    same with a stolen-looking token and its Origin. None of it deploys."""
    server, runtime = plane
    archive = tar_gz(FIXTURES / "echo-rt")
    form = {"Content-Type": "text/plain", "Origin": "http://attacker.example"}
    r = requests.post(f"{server.url}/api/models", data=archive, headers=form)
    assert r.status_code == 401
    r = requests.post(f"{server.url}/api/models", data=archive, headers={**form, **AUTH})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]
    r = requests.post(f"{server.url}/api/models", data=archive, headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/gzip" in r.json()["error"]
    r = requests.post(f"{server.url}/api/models", data=archive,
                      headers={**AUTH, "Content-Type": "application/gzip", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    r = requests.post(f"{server.url}/api/models/echo-rt/rollback", data='{"version": "1.0.0"}',
                      headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert list(runtime.manifests["echo-rt"]) == ["1.0.0"]
    # the console's own origin, and a call with no Origin (the CLI), are fine
    r = requests.post(f"{server.url}/api/models/echo-rt/rollback", json={"version": "1.0.0"},
                      headers={**AUTH, "Origin": "http://127.0.0.1:8501"})
    assert r.status_code == 200


# -- the server's own files ------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["/etc/passwd", "~/.bashrc", "file:///etc/passwd", "../../etc/passwd",
                                     "gs://test-bucket", "http://169.254.169.254/latest/meta-data"])
def test_a_dataset_is_never_a_path_on_the_server(plane, dataset):
    server, runtime = plane
    r = api.post(f"{server.url}/api/models/sum-batch/jobs", json={"dataset": dataset})
    assert r.status_code == 400 and "dataset" in r.json()["error"]
    assert "root:" not in r.text
    assert runtime.jobs() == []


def test_a_dataset_in_another_bucket_needs_the_operator(plane, tmp_path):
    server, runtime = plane
    r = api.post(f"{server.url}/api/models/sum-batch/jobs", json={"dataset": "gs://someone-else/x.csv"})
    assert r.status_code == 403 and "MODELPLANE_DATASET_BUCKETS" in r.json()["error"]
    (tmp_path / "b").mkdir()
    settings = settings_for(tmp_path / "b", dataset_buckets="shared-data")
    copy_fixture("sum-batch", settings.models_dir)
    with running(settings, runtime=FakeRuntime()) as other:
        r = api.post(f"{other.url}/api/models/sum-batch/jobs", json={"dataset": "gs://shared-data/x.csv"})
        assert r.status_code == 202


# -- sizes ---------------------------------------------------------------------------------------

def test_bodies_over_their_cap_are_refused_before_they_are_read(plane):
    server, runtime = plane
    gz = {"Content-Type": "application/gzip"}
    r = api.post(f"{server.url}/api/models", data=b"\0" * (64 * 1024 + 1), headers=gz)
    assert r.status_code == 413 and "65536" in r.json()["error"]

    def chunks():  # no Content-Length: the cap holds while streaming
        for _ in range(100):
            yield b"\0" * 4096

    r = api.post(f"{server.url}/api/models", data=chunks(), headers=gz)
    assert r.status_code == 413
    r = api.post(f"{server.url}/events", data=b"{" + b" " * (2 * 2**20) + b"}",
                 headers={"Content-Type": "application/cloudevents+json"})
    assert r.status_code == 413
    r = api.post(f"{server.url}/api/models/sum-batch/jobs", data=b'{"dataset": "' + b"a" * 100_000 + b'"}',
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_predict_body_over_the_models_limit_never_reaches_it(tmp_path):
    settings = settings_for(tmp_path)
    folder = copy_fixture("echo-rt", settings.models_dir)
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text() + "limits: {max_body: 1Ki}\n")
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        r = api.post(f"{server.url}/models/echo-rt/predict", data=b"x\n" + b"1\n" * 1000,
                     headers={"Content-Type": "text/csv"})
        assert r.status_code == 413
        assert runtime.forwarded == []

        def chunks():  # no Content-Length: the front door stops reading past the cap
            yield b"x\n"
            for _ in range(1000):
                yield b"1\n"

        r = api.post(f"{server.url}/models/echo-rt/predict", data=chunks(), headers={"Content-Type": "text/csv"})
        assert r.status_code == 413 and "1024" in r.json()["error"]
        assert runtime.forwarded == []
        r = api.post(f"{server.url}/models/echo-rt/predict", data=b"x\n1\n", headers={"Content-Type": "text/csv"})
        assert r.status_code == 200


# -- predict: token unless opened ------------------------------------------------------------------

def test_predict_needs_the_token_unless_opened(tmp_path):
    settings = settings_for(tmp_path)
    copy_fixture("echo-rt", settings.models_dir)
    public = Path(shutil.copytree(FIXTURES / "echo-rt", settings.models_dir / "open-rt"))
    (public / "model.yaml").write_text((public / "model.yaml").read_text().replace("name: echo-rt", "name: open-rt")
                                       + "visibility: public\n")
    runtime = FakeRuntime()
    rows = {"rows": [{"x": 1}]}
    with running(settings, runtime=runtime) as server:
        assert requests.post(f"{server.url}/models/echo-rt/predict", json=rows).status_code == 401
        assert requests.get(f"{server.url}/models/echo-rt/v2/models/echo-rt").status_code == 401
        assert requests.post(f"{server.url}/models/open-rt/predict", json=rows).status_code == 200
        assert requests.get(f"{server.url}/v2/models/echo-rt").status_code == 401
        assert requests.get(f"{server.url}/v2/models/open-rt").status_code == 200   # public: the root's too
        assert requests.get(f"{server.url}/v2/models/open-rt", headers={"Authorization": "Bearer x"}).status_code == 200
        assert requests.post(f"{server.url}/models/nope/predict", json=rows).status_code == 401  # no probing
        assert requests.get(f"{server.url}/api/models/open-rt").status_code == 401  # the API stays closed
    with running(settings.model_copy(update={"open_predict": True}), runtime=FakeRuntime()) as server:
        assert requests.post(f"{server.url}/models/echo-rt/predict", json=rows).status_code == 200
        assert requests.get(f"{server.url}/v2/models/echo-rt/ready").status_code == 200
        assert requests.get(f"{server.url}/api/models").status_code == 401


def test_every_401_names_the_bearer_scheme(plane):
    """RFC 6750: a 401 says how to authenticate (`WWW-Authenticate: Bearer`), and with a token that
    was sent but is wrong, `error="invalid_token"`; on the API's routes and the models' alike."""
    server, runtime = plane
    v2 = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1.0]}]}
    calls = [("GET", "/api/models", None), ("GET", "/metrics", None), ("GET", "/api/models/echo-rt", None),
             ("POST", "/api/models/sum-batch/jobs", {"dataset": "gs://test-bucket/a.csv"}),
             ("POST", "/models/echo-rt/predict", {"rows": [{"x": 1}]}),
             ("GET", "/models/echo-rt/v2/models/echo-rt", None),
             ("GET", "/v2/models/echo-rt", None), ("GET", "/v2/models/echo-rt/ready", None),
             ("POST", "/v2/models/echo-rt/infer", v2), ("POST", "/v2/models/echo-rt/versions/1.0.0/infer", v2),
             ("POST", "/v2/models/nope/infer", v2)]   # no probing for which models exist
    for method, path, body in calls:
        r = requests.request(method, server.url + path, json=body, timeout=10)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="modelplane"', path
        assert r.headers["Content-Type"] == "application/json" and "Authorization: Bearer" in r.json()["error"]
        r = requests.request(method, server.url + path, json=body, timeout=10,
                             headers={"Authorization": "Bearer not-a-token"})
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="modelplane", error="invalid_token"', path
    assert runtime.forwarded == []
    # an adapter that refuses the plane's own secret is the plane's fault, never a 401 to the caller
    from control.runtime.base import ProxyResponse

    runtime.forward = lambda *a, **k: ProxyResponse(401, {"Content-Type": "application/json"},
                                                    b'{"error": "X-Modelplane-Secret does not match"}')
    for path in ("/models/echo-rt/predict", "/v2/models/echo-rt/infer"):
        r = api.post(server.url + path, json={"rows": [{"x": 1}]})
        assert r.status_code == 502 and "refused the control service's secret" in r.json()["error"], path
        assert "WWW-Authenticate" not in r.headers


def test_the_open_inference_protocol_at_the_root_passes_the_same_checks(plane, tmp_path):
    """`/v2/models/{name}/…` at the root is guarded as the model's other routes: Host, cross-site
    calls, the body's type and size, an owner-limited token; it reaches the runtime as the
    adapter's own path (the version its URL names, when it names one)."""
    server, runtime = plane
    url = f"{server.url}/v2/models/echo-rt/infer"
    v2 = json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1.0]}]})
    r = api.post(url, data=v2, headers={"Content-Type": "application/json", "Host": "attacker.example"})
    assert r.status_code == 403 and "Host" in r.json()["error"]
    r = api.post(url, data=v2, headers={"Content-Type": "application/json", "Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]
    r = api.post(url, data=v2, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = api.post(url, data=b"{" + b" " * (16 * 2**20) + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limits.max_body" in r.json()["error"]   # the model's default, 16Mi
    assert runtime.forwarded == []
    # a token limited to another owner's models
    made = api.post(f"{server.url}/api/tokens", json={"name": "other", "role": "runner", "owner": "other-team"})
    assert made.status_code == 201, made.text
    r = requests.post(url, data=v2, headers={"Content-Type": "application/json",
                                             "Authorization": f"Bearer {made.json()['token']}"})
    assert r.status_code == 403 and "may act only on models owned by 'other-team'" in r.json()["error"]
    assert runtime.forwarded == []
    # forwarded as the adapter serves it; a request without Content-Type (tritonclient sends none) is
    # JSON, or binary when it says how long its JSON header is
    r = api.post(url, data=v2, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and runtime.forwarded[-1]["path"] == "/v2/models/echo-rt/infer"
    assert runtime.forwarded[-1]["body"] == v2.encode()
    r = api.post(f"{server.url}/v2/models/echo-rt/versions/1.0.0/infer?x=1", data=v2.encode())
    assert r.status_code == 200 and runtime.forwarded[-1]["path"] == "/v2/models/echo-rt/versions/1.0.0/infer"
    assert runtime.forwarded[-1]["headers"]["content-type"] == "application/json"
    assert runtime.forwarded[-1]["query"] == "x=1"
    r = api.post(url, data=v2.encode() + b"\0\0", headers={"Inference-Header-Content-Length": str(len(v2))})
    assert r.status_code == 200 and runtime.forwarded[-1]["headers"]["content-type"] == "application/octet-stream"
    assert runtime.forwarded[-1]["headers"]["inference-header-content-length"] == str(len(v2))
    # predict still needs its Content-Type: only inference requests are typed by the protocol's rules
    r = api.post(f"{server.url}/models/echo-rt/predict", data=b'{"rows": [{"x": 1}]}')
    assert r.status_code == 415


# -- routing --------------------------------------------------------------------------------------

def test_paths_are_forwarded_as_sent_never_decoded_and_retargeted(plane):
    server, runtime = plane
    r = api.get(f"{server.url}/models/echo-rt/v2/models/echo-rt%3Fx/versions/1.0.0/ready")
    assert r.status_code == 200
    assert runtime.forwarded[-1]["path"] == "/v2/models/echo-rt%3Fx/versions/1.0.0/ready"
    assert runtime.forwarded[-1]["query"] == ""
    # sent as is (requests would normalize the escape away)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/models/echo%2Drt/predict", body=b'{"rows": [{"x": 1}]}',
                 headers={**AUTH, "Content-Type": "application/json"})
    assert conn.getresponse().status == 404
    conn.close()
    r = api.get(f"{server.url}/models/echo-rt/v2")
    assert r.status_code == 200 and runtime.forwarded[-1]["path"] == "/v2"
    r = api.delete(f"{server.url}/models/echo-rt/predict")
    assert r.status_code == 405 and r.json()["error"].startswith("Method Not Allowed")
    assert "POST" in r.headers["Allow"]


def test_every_answer_names_its_request_id(plane):
    server, runtime = plane
    r = api.get(f"{server.url}/api/models/nope")
    assert r.status_code == 404 and len(r.headers["X-Request-Id"]) >= 8
    r = api.get(f"{server.url}/api/models", headers={"X-Request-Id": "trace-42"})
    assert r.headers["X-Request-Id"] == "trace-42"
    r = api.get(f"{server.url}/api/models", headers={"X-Request-Id": "bad id\u00e9"})
    assert r.headers["X-Request-Id"] != "bad id\u00e9"
    # a model's request: the adapter is given the same id the caller is answered with
    runtime.forwarded.clear()
    r = api.post(f"{server.url}/models/echo-rt/predict", json={"rows": [{"x": 1}]})
    assert r.status_code == 200 and runtime.forwarded[0]["headers"]["x-request-id"] == r.headers["X-Request-Id"]
    r = api.post(f"{server.url}/models/echo-rt/predict", json={"rows": [{"x": 1}]}, headers={"X-Request-Id": "trace-43"})
    assert r.headers["X-Request-Id"] == "trace-43" and runtime.forwarded[1]["headers"]["x-request-id"] == "trace-43"


def test_the_openapi_document_describes_every_route(plane):
    server, _ = plane
    doc = requests.get(f"{server.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    import re

    from control.api.serving import FORWARDED, ROOT

    def braces(rule):
        return re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule)

    served = set()  # the Flask API's routes, and the front door's for the models' traffic
    for rule in server.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        served |= {(braces(rule.rule), m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    front = {(braces(rule), method) for method, rule, _, _ in FORWARDED + ROOT}
    assert not served & front and len(front) == 17
    # the Open Inference Protocol at the root: the server's own routes open, a model's as its other routes
    for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        assert "security" not in doc["paths"][path]["get"], path
    for path, method in (("/v2/models/{name}", "get"), ("/v2/models/{name}/versions/{version}/infer", "post")):
        op = doc["paths"][path][method]
        assert op["x-modelplane-role"] == "runner" and op["security"] == [{"bearer": []}, {}], path
    assert served | front == documented
    job = doc["paths"]["/api/models/{name}/jobs"]["post"]
    assert job["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/JobRequest"
    assert doc["components"]["schemas"]["JobRequest"]["properties"]["dataset"]["pattern"].startswith("^gs://")


# -- what the fuzzer found --------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b'{"version": ' + b"[" * 100_00 + b"]" * 100_00 + b"}",   # nesting past any recursion limit
    b'{"version": "\\ud800"}',                                  # a lone surrogate
    b"\xff\xfe{}",                                              # not UTF-8
    b"[]", b"null", b'"1.0.0"',
])
def test_hostile_json_bodies_are_400s(plane, body):
    server, _ = plane
    for path in ("/api/models/echo-rt/rollback", "/api/models/sum-batch/jobs"):
        r = api.post(f"{server.url}{path}", data=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
        assert isinstance(r.json()["error"], str) and "Traceback" not in r.text


@pytest.mark.parametrize("path,content_type", [("/models/echo-rt/predict", "text/csv"),
                                               ("/api/models/sum-batch/jobs", "application/json")])
def test_expect_100_continue_only_once_the_checks_pass(plane, path, content_type):
    """curl sends `Expect: 100-continue` for bodies over 1 KiB: the body is asked for only when
    the request may go on; a refused one is answered at once, its body never sent."""
    import socket

    server, _ = plane
    body = b"x\n1\n" if content_type == "text/csv" else b'{"dataset": "gs://test-bucket/incoming/sum-batch/a.csv"}'

    def head(token: bool) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}", "Expect: 100-continue"]
        if token:
            lines.append(f"Authorization: Bearer {TOKEN}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head(token=False))
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head(token=True))
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.split(b" ", 2)[1] in (b"200", b"202"), answer
