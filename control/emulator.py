"""The embedded GCS: `gcp-storage-emulator` as a child process on loopback, data on disk, answering
only requests that carry the plane's storage key (control/emulator_guard.py)."""
from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, *, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    """Return once `host:port` accepts connections; raise with the reason otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


class Emulator:
    """gcp-storage-emulator with its data under `data_dir`, so objects survive restarts."""

    def __init__(self, data_dir: Path, *, bucket: str, host: str = "127.0.0.1", port: int = 0,
                 key: Optional[str] = None):
        self.data_dir = Path(data_dir).resolve()
        self.bucket = bucket
        self.host = host
        self.port = port or free_port(host)
        # what every request must carry (control/emulator_guard.py); `up` keeps it in the state dir
        self.key = key or secrets.token_urlsafe(32)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "Emulator":
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        from control.durable import PRIVATE_UMASK, private_tree
        from control.uploads import expire_resumable

        expire_resumable(self.data_dir)   # resumable uploads idle for a day, while nothing serves them
        private_tree(self.data_dir)  # datasets and results: the owner's alone (and what it writes: its umask)
        env = dict(os.environ, STORAGE_BASE=str(self.data_dir), MODELPLANE_STORAGE_KEY=self.key)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        self.log_path = self.data_dir / "emulator.log"
        logf = open(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        from control.runtime.local_procs import with_pdeathsig

        # dies with whoever started it, even if that is SIGKILLed; its own session, so that
        # a terminal's Ctrl-C reaches it only through us
        self.proc = subprocess.Popen(
            with_pdeathsig([sys.executable, "-m", "control.emulator_guard", "--host", self.host,
                            "--port", str(self.port), "--default-bucket", self.bucket]),
            env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            umask=PRIVATE_UMASK,
        )
        logf.close()
        try:
            wait_for_port(self.host, self.port, timeout=timeout, proc=self.proc)
        except Exception as e:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the GCS emulator did not start: {e}\n{tail}") from e
        log.info("GCS emulator on %s (bucket %s, data in %s)", self.endpoint, self.bucket, self.data_dir)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
