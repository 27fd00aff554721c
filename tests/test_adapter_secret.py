"""The realtime adapter with its plane's secret (MODELPLANE_ADAPTER_SECRET): a real adapter
process on loopback refuses every caller that is not its plane — no secret, a name that is not
loopback's (DNS rebinding), a browser, a body type its route does not take — and its model
never sees the secret."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from test_adapter_realtime import FIXTURE, MODEL, ROOT, child_env, free_port, stop

SECRET = "s3cr3t-Zq9_-for-this-plane"
HEADER = {"X-Modelplane-Secret": SECRET}
ROWS = {"rows": [{"x": 1, "region": "west"}]}
INFER = f"/v2/models/{MODEL}/infer"


class Adapter:
    def __init__(self, tmp: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err = tmp / f"adapter-{self.port}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adapters", "serve", str(FIXTURE), "--port", str(self.port)],
                cwd=ROOT, env=child_env(**env), stdout=subprocess.DEVNULL, stderr=err)
        for _ in range(400):
            if self.proc.poll() is not None:
                raise RuntimeError(self.err.read_text())
            try:
                if requests.get(self.url + "/v2/health/ready", headers=HEADER, timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        else:
            stop(self.proc)
            raise RuntimeError("the adapter never became ready")

    def get(self, path: str, **headers) -> requests.Response:
        return requests.get(self.url + path, headers=headers, timeout=10)

    def post(self, path: str, body, content_type: str | None = "application/json", **headers) -> requests.Response:
        if content_type is not None:
            headers["Content-Type"] = content_type
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(self.url + path, data=data, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    a = Adapter(tmp_path_factory.mktemp("secret"), MODELPLANE_ADAPTER_SECRET=SECRET)
    yield a
    stop(a.proc)


def error(r: requests.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json")
    return r.json()["error"]


def raw(adapter: Adapter, head: bytes) -> bytes:
    """One request as raw bytes (a Host requests would not send), the answer until the close."""
    with socket.create_connection(("127.0.0.1", adapter.port), timeout=10) as s:
        s.sendall(head)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# -- the secret ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("POST", "/predict"), ("GET", "/metrics"), ("GET", "/v2/health/ready"), ("GET", "/v2/health/live"),
    ("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("POST", INFER), ("GET", "/no-such-route"),
])
def test_every_route_needs_the_secret(adapter, method, path):
    r = requests.request(method, adapter.url + path, json=ROWS if method == "POST" else None, timeout=10)
    message = error(r, 401)
    assert "X-Modelplane-Secret" in message, message
    wrong = requests.request(method, adapter.url + path, json=ROWS if method == "POST" else None, timeout=10,
                             headers={"X-Modelplane-Secret": SECRET[:-1] + "x"})
    assert "does not match" in error(wrong, 401)
    assert SECRET not in r.text + wrong.text


def test_with_the_secret_it_serves(adapter):
    r = adapter.post("/predict", ROWS, **HEADER)
    assert r.status_code == 200 and r.json()["scores"] == [2.0]
    assert adapter.get("/metrics", **HEADER).status_code == 200
    assert adapter.get(f"/v2/models/{MODEL}/ready", **HEADER).json()["ready"] is True
    csv = adapter.post("/predict", "x,region\n1,west\n", "text/csv", **HEADER)
    assert csv.status_code == 200 and csv.json()["scores"] == [2.0]
    typed = adapter.post("/predict", ROWS, "Application/JSON; charset=utf-8", **HEADER)
    assert typed.status_code == 200


def test_a_secret_sent_twice_or_empty_is_refused(adapter):
    out = raw(adapter, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Modelplane-Secret: " + SECRET.encode()
              + b"\r\nX-Modelplane-Secret: " + SECRET.encode() + b"\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 401 ")
    out = raw(adapter, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Modelplane-Secret: \r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 401 ")


def test_a_body_too_large_is_a_401_too_without_the_secret(adapter):
    big = {"rows": [{"x": 1, "region": "west"}] * 1000}      # over the fixture's max_body (4Ki)
    r = adapter.post("/predict", big)
    assert "X-Modelplane-Secret" in error(r, 401) and MODEL not in r.text
    assert "max_body" in error(adapter.post("/predict", big, **HEADER), 413)


# -- what no plane sends: another name for loopback, a browser, a body type the route does not take -----

@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "attacker:80",
                                  "0x7f000001", "127.1"])
def test_a_host_that_is_not_an_ip_or_localhost_is_refused(adapter, host):
    out = raw(adapter, f"GET /metrics HTTP/1.1\r\nHost: {host}\r\nX-Modelplane-Secret: {SECRET}\r\n"
                       f"Connection: close\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 "), out[:300]
    assert "Host" in json.loads(body)["error"]


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:9", "[::1]", "[::1]:80",
                                  "10.1.2.3:8080"])
def test_ip_literals_and_localhost_are_served(adapter, host):
    out = raw(adapter, f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\nX-Modelplane-Secret: {SECRET}\r\n"
                       f"Connection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200 "), out[:300]


def test_an_absolute_form_target_naming_another_host_is_refused(adapter):
    out = raw(adapter, f"GET http://evil.example/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"X-Modelplane-Secret: {SECRET}\r\nConnection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 403 "), out[:300]


@pytest.mark.parametrize("headers", [
    {"Origin": "http://localhost:3000"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1"},
    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "Cross-Site"},
])
def test_a_browser_is_refused(adapter, headers):
    r = adapter.post("/predict", ROWS, **HEADER, **headers)
    message = error(r, 403)
    assert "browser" in message or "cross-site" in message, message
    assert error(adapter.get("/metrics", **HEADER, **headers), 403)


@pytest.mark.parametrize("path, content_type", [
    ("/predict", "text/plain"), ("/predict", "application/x-www-form-urlencoded"), ("/predict", "multipart/form-data"),
    ("/predict", None), ("/predict", "application/octet-stream"), (INFER, "text/plain"), (INFER, "text/csv"),
])
def test_a_body_type_the_route_does_not_take_is_a_415(adapter, path, content_type):
    r = adapter.post(path, ROWS, content_type, **HEADER)
    message = error(r, 415)
    assert "application/json" in message and (content_type or "none") in message, message


def test_the_model_never_sees_the_secret(adapter):
    model = [int(p) for p in Path(f"/proc/{adapter.proc.pid}/task/{adapter.proc.pid}/children").read_text().split()]
    assert model, "the adapter has no model process"
    for pid in model:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [e for e in environ if e.startswith(b"MODELPLANE_ADAPTER_SECRET=")]
        assert SECRET.encode() not in b"\0".join(environ)
    # nor in the adapter's own /proc/PID/environ (the environment it started with, which a process
    # of the same user, the model included, can read)
    assert SECRET.encode() not in Path(f"/proc/{adapter.proc.pid}/environ").read_bytes()


def test_an_empty_secret_stops_the_adapter_saying_why(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adapters", "serve", str(FIXTURE), "--port", str(free_port())],
                          cwd=ROOT, env=child_env(MODELPLANE_ADAPTER_SECRET=""), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "MODELPLANE_ADAPTER_SECRET" in proc.stderr, proc.stderr


# -- without a secret (a cluster): as before ------------------------------------------------------------

def test_without_a_secret_nothing_more_is_asked(tmp_path):
    a = Adapter(tmp_path)
    try:
        r = requests.post(a.url + "/predict", data=json.dumps(ROWS), timeout=10,
                          headers={"Content-Type": "text/plain", "Host": "model.default.example.com",
                                   "Origin": "http://localhost:3000"})
        assert r.status_code == 200, r.text
    finally:
        stop(a.proc)
