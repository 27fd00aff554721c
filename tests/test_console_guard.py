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


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("console") / "console.log"
    env = {**os.environ, "MODELPLANE_URL": "http://127.0.0.1:9", "MODELPLANE_ALLOWED_HOSTS": "console.example.org",
           "MODELPLANE_TOKEN": "not-used-here"}
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


def raw(port: int, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def get(port: int, path: str, host: str) -> bytes:
    return raw(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")


def websocket(port: int, host: str, origin: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return raw(port, f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n"
                     f"Sec-WebSocket-Protocol: streamlit\r\n\r\n")


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
