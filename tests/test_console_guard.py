"""The console's own port, attacked: the console acts with the plane's token on this machine, so a
page of another site (DNS rebinding, or a WebSocket opened from elsewhere) must reach nothing.
The console runs as `modelplane up` starts it (`python -m console.serve run console/app.py`)."""
from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from control.emulator import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


KEY = "the-console-key-0123456789"


def start_console(tmp_path_factory, **extra_env):
    port = free_port()
    log = tmp_path_factory.mktemp("console") / "console.log"
    env = {**os.environ, "MODELPLANE_URL": "http://127.0.0.1:9", "MODELPLANE_ALLOWED_HOSTS": "console.example.org",
           "MODELPLANE_TOKEN": "not-used-here", **extra_env}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "console.serve", "run", str(ROOT / "console" / "app.py"),
                                 "--server.headless", "true", "--server.port", str(port), "--server.address",
                                 "127.0.0.1", "--browser.gatherUsageStats", "false",
                                 "--server.fileWatcherType", "none"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, timeout=90, proc=proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    yield from start_console(tmp_path_factory)


@pytest.fixture(scope="module")
def keyed_console(tmp_path_factory):
    """As `modelplane up` starts it: with the key its printed link carries."""
    yield from start_console(tmp_path_factory, MODELPLANE_CONSOLE_KEY=KEY)


def raw(port: int, head: str, *, until_closed: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1"))
        data = b""
        while until_closed or b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def get(port: int, path: str, host: str, extra: str = "") -> bytes:
    return raw(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n", until_closed=True)


def websocket(port: int, host: str, origin: str, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return raw(port, f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n"
                     f"Sec-WebSocket-Protocol: streamlit\r\n{extra}\r\n")


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def test_the_console_answers_under_its_own_names(console):
    for host in (f"127.0.0.1:{console}", f"localhost:{console}", "console.example.org"):
        assert status(get(console, "/_stcore/health", host)) == 200, host
    assert status(get(console, "/", f"127.0.0.1:{console}")) == 200


def test_a_rebinding_page_gets_nothing(console):
    for host in (f"attacker.example:{console}", "attacker.example", f"localhost.attacker.example:{console}",
                 "a@127.0.0.1", ""):
        answer = get(console, "/", host)
        assert status(answer) in (400, 403), (host, answer[:200])
        assert status(get(console, "/_stcore/health", host)) in (400, 403), host


def test_a_session_socket_opened_from_another_site_is_refused(console):
    ok = websocket(console, f"127.0.0.1:{console}", f"http://127.0.0.1:{console}")
    assert status(ok) == 101, ok[:300]
    for origin in ("http://attacker.example", f"http://attacker.example:{console}", "null"):
        answer = websocket(console, f"127.0.0.1:{console}", origin)
        assert status(answer) != 101, (origin, answer[:300])
    answer = websocket(console, f"attacker.example:{console}", f"http://attacker.example:{console}")
    assert status(answer) != 101


def test_another_user_of_the_machine_without_the_link_gets_nothing(keyed_console):
    port, host = keyed_console, f"127.0.0.1:{keyed_console}"
    assert status(get(port, "/_stcore/health", host)) == 200          # how `up` knows it started
    for path in ("/", "/activity", "/?key=wrong", "/static/js/index.js"):
        answer = get(port, path, host)
        assert status(answer) == 401 and b"link" in answer, (path, answer[:300])
    assert status(get(port, "/", host, f"Cookie: modelplane-console=wrong\r\n")) == 401
    assert status(websocket(port, host, f"http://{host}")) != 101
    assert status(websocket(port, host, f"http://{host}", "Cookie: modelplane-console=wrong\r\n")) != 101


def test_the_printed_link_lets_its_browser_in(keyed_console):
    port, host = keyed_console, f"127.0.0.1:{keyed_console}"
    answer = get(port, f"/jobs?key={KEY}&batch=x", host)
    assert status(answer) == 303, answer[:300]
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    assert "location: /jobs?batch=x" in head                     # the key leaves the address bar
    assert f"set-cookie: modelplane-console={KEY.lower()}; path=/; httponly; samesite=strict" in head
    cookie = f"Cookie: modelplane-console={KEY}\r\n"
    assert status(get(port, "/", host, cookie)) == 200
    assert status(websocket(port, host, f"http://{host}", cookie)) == 101
    assert status(websocket(port, host, "http://attacker.example", cookie)) != 101   # the origin still counts
