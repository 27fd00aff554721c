"""The control service's connections under hostile clients: a slowloris head that never ends,
and more connections than the service should hold."""
from __future__ import annotations

import socket
import time

import requests

from control_fake_runtime import FakeRuntime
from control_helpers import running, settings_for


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    got = b""
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the connection was still open after the deadline ({got[:200]!r})")


def test_a_slowloris_head_is_closed_after_the_head_timeout(tmp_path):
    settings = settings_for(tmp_path, head_timeout=1.0)
    with running(settings, runtime=FakeRuntime()) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        started = time.monotonic()
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode())
        closed_at = None
        try:
            for i in range(40):   # one header line every 0.25 s, never the blank line: 10 s at most
                time.sleep(0.25)
                try:
                    sock.sendall(f"X-Trickle-{i}: x\r\n".encode())
                except (BrokenPipeError, ConnectionResetError):
                    closed_at = time.monotonic()
                    break
                sock.settimeout(0.01)
                try:
                    if sock.recv(65536, socket.MSG_PEEK) is not None:
                        closed_at = time.monotonic()
                        break
                except socket.timeout:
                    pass
            assert closed_at is not None, "the trickling connection was never closed"
            answer = _read_until_closed(sock, time.monotonic() + 5)
        finally:
            sock.close()
        assert closed_at - started < 4.0, closed_at - started
        assert answer.startswith(b"HTTP/1.1 408 ") and b"MODELPLANE_HEAD_TIMEOUT" in answer, answer[:300]
        # a client that sends its head in time, even slowly, is served
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as ok:
            for line in (b"GET /healthz HTTP/1.1\r\n", f"Host: 127.0.0.1:{server.port}\r\n".encode(),
                         b"Connection: close\r\n", b"\r\n"):
                ok.sendall(line)
                time.sleep(0.2)
            assert _read_until_closed(ok, time.monotonic() + 5).startswith(b"HTTP/1.1 200 ")


def test_connections_past_the_cap_are_refused_and_a_fresh_one_gets_in_once_others_close(tmp_path):
    settings = settings_for(tmp_path, max_connections=20)
    with running(settings, runtime=FakeRuntime()) as server:
        deadline = time.monotonic() + 10
        while getattr(server._door, "connections", 0) and time.monotonic() < deadline:   # the start-up probe's went away
            time.sleep(0.02)
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
        try:
            while getattr(server._door, "connections", 20) < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            r = requests.get(f"{server.url}/healthz", timeout=10)
            assert r.status_code == 503 and "MODELPLANE_MAX_CONNECTIONS" in r.json()["error"]
            assert r.headers["Retry-After"] == "1"
            for sock in held[:5]:
                sock.close()
            deadline = time.monotonic() + 10
            while getattr(server._door, "connections", 0) > 15 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
        finally:
            for sock in held:
                sock.close()
