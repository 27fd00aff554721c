"""An embedded plane the benchmarks and load tests start and stop themselves.

The GCS emulator and the control service (with its bucket watcher and the local runtime) run as
child processes on free loopback ports, with state in a folder the caller owns, so measuring
never competes with the measured code for this process's GIL, and nothing outlives `stop()`.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import requests

from control.emulator import Emulator, free_port, wait_for_port

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SERVE = ("import logging, os\n"
         "logging.basicConfig(level=os.environ.get('MODELPLANE_LOG_LEVEL', 'WARNING'))\n"
         "from control.server import serve\n"
         "from control.settings import Settings\n"
         "serve(Settings(), watch=True)\n")


class PlaneError(RuntimeError):
    pass


class EmbeddedPlane:
    """Emulator + control service (`control.server.serve`, watch on) over `models_dir`.

    `env` adds MODELPLANE_* settings (e.g. `MODELPLANE_WATCH_INTERVAL`). With
    `emulator=False` no bucket is started (enough for listing benchmarks).
    """

    def __init__(self, workdir: Path, *, models_dir: Optional[Path] = None, state_dir: Optional[Path] = None,
                 bucket: str = "modelplane-bench", env: Optional[dict] = None, emulator: bool = True):
        self.workdir = Path(workdir)
        # Authentication stays on, as users run it: the plane gets a token, every call sends it.
        self.token = secrets.token_urlsafe(24)
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.models_dir = Path(models_dir) if models_dir else self.workdir / "models"
        self.state_dir = Path(state_dir) if state_dir else self.workdir / "state"
        self.bucket = bucket
        self.env = dict(env or {})
        self.use_emulator = emulator
        self.emulator: Optional[Emulator] = None
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.session = requests.Session()
        self.session.headers.update(self.auth)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"control-{self.port}.log"

    def child_env(self) -> dict:
        env = dict(os.environ)
        env.update({
            "MODELPLANE_HOST": "127.0.0.1", "MODELPLANE_PORT": str(self.port),
            "MODELPLANE_STATE_DIR": str(self.state_dir), "MODELPLANE_MODELS_DIR": str(self.models_dir),
            "MODELPLANE_BUCKET": self.bucket, "MODELPLANE_RUNTIME": "local", "PYTHONUNBUFFERED": "1",
        })
        env["MODELPLANE_TOKEN"] = self.token
        env.pop("MODELPLANE_URL", None)
        if self.emulator is not None:
            env["STORAGE_EMULATOR_HOST"] = self.emulator.endpoint
            env["MODELPLANE_STORAGE_KEY"] = self.emulator.key
        env.update(self.env)
        return env

    def start(self, *, timeout: float = 120.0, expect: Iterable[str] = ()) -> "EmbeddedPlane":
        """Start everything; return once `/healthz` answers and every name in `expect` is listed."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.use_emulator:
                self.emulator = Emulator(self.workdir / "gcs", bucket=self.bucket).start()
            self.port = free_port()
            logf = open(self.log_path, "ab")
            self.proc = subprocess.Popen([sys.executable, "-c", SERVE], env=self.child_env(), cwd=str(self.workdir),
                                         stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
            logf.close()
            wait_for_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
            self.wait_listed(expect, timeout=timeout)
        except BaseException as e:
            tail = self.log_tail()
            self.stop()
            if isinstance(e, Exception):
                raise PlaneError(f"the embedded plane did not start: {e}\n{tail}") from e
            raise
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the control service (it stops its replicas and jobs), then the emulator."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("control service %s ignored SIGTERM; killing its process group", proc.pid)
            # Whatever it left behind in its own session (replicas, jobs) goes too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None
        self.session.close()

    def __enter__(self) -> "EmbeddedPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the API -------------------------------------------------------------------------
    def get(self, path: str, **kw) -> Any:
        r = self.session.get(self.url + path, timeout=kw.pop("timeout", 60), **kw)
        if r.status_code >= 400:
            raise PlaneError(f"GET {path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def models(self) -> list[dict]:
        return self.get("/api/models")

    def model(self, name: str) -> dict:
        return self.get(f"/api/models/{name}")

    def wait_listed(self, names: Iterable[str], *, timeout: float = 60.0) -> None:
        names = set(names)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise PlaneError(f"control service exited with {self.proc.returncode}")
            try:
                listed = {m["name"]: m for m in self.models()}
                missing = names - set(listed)
                if not missing:
                    failed = {n: listed[n].get("error") for n in names if listed[n].get("status") == "failed"}
                    if failed:
                        raise PlaneError(f"models failed to register: {json.dumps(failed)[:2000]}")
                    return
            except (requests.ConnectionError, PlaneError) as e:
                if isinstance(e, PlaneError) and "failed to register" in str(e):
                    raise
                missing = names
            if time.monotonic() > deadline:
                raise PlaneError(f"models not listed after {timeout:.0f}s: {sorted(missing)}")
            time.sleep(0.1)

    def wait_status(self, name: str, status: str, *, timeout: float = 60.0, poll: float = 0.05) -> float:
        """Wait until `name` reports `status`; return the seconds waited."""
        started = time.monotonic()
        last = None
        while time.monotonic() - started < timeout:
            last = next((m for m in self.models() if m["name"] == name), None)
            if last and last.get("status") == status:
                return time.monotonic() - started
            time.sleep(poll)
        raise PlaneError(f"{name} is not {status} after {timeout:.0f}s (last: {last})")

    def upload(self, model: str, path: Path, *, filename: Optional[str] = None) -> dict:
        """Upload a dataset through `POST /api/models/{name}/datasets` (streamed from disk)."""
        filename = filename or Path(path).name
        with open(path, "rb") as f:
            r = self.session.post(f"{self.url}/api/models/{model}/datasets", params={"filename": filename},
                                  data=f, headers={"Content-Type": "text/csv"}, timeout=600)
        if r.status_code != 201:
            raise PlaneError(f"upload of {path} to {model}: {r.status_code} {r.text[:500]}")
        return r.json()

    def wait_job(self, *, model: str, dataset: str, timeout: float = 600.0, poll: float = 0.05) -> dict:
        """The job the bucket event started for `dataset`, once it has finished (or raise)."""
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            jobs = self.get("/api/jobs", params={"model": model, "dataset": dataset})
            if jobs:
                job = jobs[0]
                if job["status"] in ("succeeded", "failed"):
                    return job
            time.sleep(poll)
        raise PlaneError(f"no finished job for {dataset} after {timeout:.0f}s (last: {job})")


def copy_models(manifests, dest: Path) -> None:
    """Copy example model folders into a plane's models dir (the plane registers them at start)."""
    dest.mkdir(parents=True, exist_ok=True)
    for m in manifests:
        target = dest / m.folder.name
        if not target.exists():
            shutil.copytree(m.folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".modelplane"))
