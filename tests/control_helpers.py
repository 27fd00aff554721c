"""Helpers for the control-service tests: the real server (aiohttp front door + Flask API) in a thread, polled until healthy."""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import requests

from control.server import ControlServer
from control.settings import Settings

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "control"
#: The token the test services are given; `api` sends it.
TOKEN = "test-token-0123456789"


def token_file(token: str = TOKEN) -> str:
    """A file holding `token`, for the CLI's --token-file (a token is never a command-line argument)."""
    import hashlib
    import tempfile

    path = Path(tempfile.gettempdir()) / f"modelplane-test-token-{hashlib.sha256(token.encode()).hexdigest()[:12]}"
    if not path.exists():
        path.write_text(token + "\n")
        path.chmod(0o600)
    return str(path)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers.update(AUTH)
    return session


#: A requests session carrying the test token: what a client holding the token sends.
api = _session()


def settings_for(tmp_path: Path, **overrides) -> Settings:
    """Settings isolated in `tmp_path`: port 0, empty models folder unless given, no console."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    base = dict(host="127.0.0.1", port=0, state_dir=tmp_path / "state", models_dir=models,
                bucket="test-bucket", threads=16, console=False, watch_interval=0.2, token=TOKEN)
    base.update(overrides)
    return Settings(**base)


def copy_fixture(name: str, models_dir: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, Path(models_dir) / name))


@contextlib.contextmanager
def running(settings: Settings, **kwargs) -> Iterator[ControlServer]:
    """A ControlServer on a free loopback port, healthy before it is yielded, always stopped."""
    server = ControlServer(settings, **kwargs).start()
    try:
        wait_until(lambda: _healthy(server.url), 10, what=f"{server.url}/healthz")
        yield server
    finally:
        server.stop()


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def wait_until(predicate: Callable[[], object], timeout: float, *, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
