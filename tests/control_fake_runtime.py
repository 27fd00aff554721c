"""An in-memory `Runtime` for testing the control service one layer above it.

The control API, the event sink and the CLI are the units under test; the runtime below
them is replaced by this small, honest implementation of the contract (versions, rollback,
dedupe by event key, jobs). `forward` answers like an adapter would: it echoes what it got.
"""
from __future__ import annotations

import itertools
import json
import threading
from datetime import datetime, timezone
from typing import Mapping, Optional

from adapters.manifest import Manifest, semver_key
from control.errors import Conflict, NotFound, Unavailable
from control.runtime.base import CANCELLED_BY, Job, ModelDetail, ModelInfo, ProxyResponse, Runtime, VersionInfo, cancel_too_late


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self):
        self.manifests: dict[str, dict[str, Manifest]] = {}
        self.live: dict[str, str] = {}
        self.deployed_at: dict[tuple[str, str], str] = {}
        self._jobs: dict[str, Job] = {}
        self._keys: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.forwarded: list[dict] = []
        self.closed = False
        self.unavailable = False  # forward raises Unavailable while true

    def deploy(self, manifest: Manifest, *, make_live: bool = True) -> VersionInfo:
        with self._lock:
            versions = self.manifests.setdefault(manifest.name, {})
            old = versions.get(manifest.version)
            if old is not None and old.to_dict() != manifest.to_dict():
                raise Conflict(f"{manifest.ref} exists with different content; bump the version")
            if old is None:
                versions[manifest.version] = manifest
                self.deployed_at[(manifest.name, manifest.version)] = _now()
            if make_live or manifest.name not in self.live:
                self.live[manifest.name] = manifest.version
            return self._version(manifest.name, manifest.version)

    def _version(self, name: str, version: str) -> VersionInfo:
        return VersionInfo(version=version, deployed_at=self.deployed_at[(name, version)],
                           live=self.live.get(name) == version)

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self.manifests:
                raise NotFound(f"no model named {name!r}")
            del self.manifests[name]
            self.live.pop(name, None)

    def rollback(self, name: str, *, version: Optional[str] = None) -> VersionInfo:
        with self._lock:
            if name not in self.manifests:
                raise NotFound(f"no model named {name!r}")
            if version is None:
                raise Conflict(f"{name} has no rollout to withdraw")
            if version not in self.manifests[name]:
                raise NotFound(f"{name} has no version {version}")
            self.live[name] = version
            return self._version(name, version)

    def _info(self, name: str) -> ModelInfo:
        m = self.manifests[name][self.live[name]]
        return ModelInfo(name=name, kind=m.kind, language=m.language, version=m.version, status="idle",
                         replicas=0, endpoint=f"/models/{name}/predict" if m.kind == "realtime" else None,
                         description=m.description)

    def models(self) -> list[ModelInfo]:
        with self._lock:
            return [self._info(n) for n in sorted(self.manifests)]

    def model(self, name: str) -> ModelDetail:
        with self._lock:
            if name not in self.manifests:
                raise NotFound(f"no model named {name!r}")
            info = self._info(name)
            versions = sorted(self.manifests[name], key=semver_key)
            return ModelDetail(**info.to_json(), manifest=self.manifests[name][self.live[name]].to_dict(),
                               versions=[self._version(name, v) for v in versions],
                               metrics={"requests": 0, "errors": 0, "replicas": 0, "history": []})

    def forward(self, name: str, *, method: str, path: str, headers: Mapping[str, str], body: bytes,
                query: str = "", version: Optional[str] = None) -> ProxyResponse:
        self.model(name)
        if self.unavailable:
            raise Unavailable(f"{name} is starting; try again")
        self.forwarded.append({"name": name, "method": method, "path": path, "headers": dict(headers),
                               "body": body, "query": query})
        if path == "/predict" and body.startswith(b"{") and b"bad" in body:
            problem = {"error": "1 row has problems", "problems": [{"row": 0, "field": "x", "error": "bad"}]}
            return ProxyResponse(422, {"Content-Type": "application/json"}, json.dumps(problem).encode())
        echo = {"model": name, "path": path, "method": method, "query": query,
                "content_type": headers.get("content-type") or headers.get("Content-Type"),
                "accept": headers.get("accept") or headers.get("Accept"), "body": body.decode("utf-8", "replace"),
                "scores": [0.5]}
        return ProxyResponse(200, {"Content-Type": "application/json", "X-Adapter": "fake"},
                             json.dumps(echo).encode())

    def submit_job(self, name: str, *, dataset: str, event_key: Optional[str] = None,
                   trigger: str = "api") -> tuple[Job, bool]:
        detail = self.model(name)   # a realtime model's job streams its dataset through its replicas
        with self._lock:
            if event_key and event_key in self._keys:
                return self._jobs[self._keys[event_key]], False
            job = Job(id=f"job-{next(self._ids):04d}", model=name, version=detail.version, status="queued",
                      dataset=dataset, created_at=_now(), trigger=trigger)
            self._jobs[job.id] = job
            if event_key:
                self._keys[event_key] = job.id
            return job, True

    def jobs(self, *, model: Optional[str] = None, limit: int = 200) -> list[Job]:
        with self._lock:
            out = [j for j in reversed(list(self._jobs.values())) if model is None or j.model == model]
            return out[:limit]

    def job(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise NotFound(f"no job {job_id!r}")
            return self._jobs[job_id]

    def cancel_job(self, job_id: str, *, by: str) -> Job:
        job = self.job(job_id)
        with self._lock:
            if job.cancelled:
                return job
            if job.status not in ("queued", "running"):
                raise cancel_too_late(job)
            job.status, job.error, job.finished_at = "failed", CANCELLED_BY + by, _now()
            return job

    def finish(self, job_id: str, *, results_uri: str, rows: int) -> None:
        """Mark a job succeeded, as a runner would."""
        with self._lock:
            job = self._jobs[job_id]
            job.status, job.results_uri, job.rows, job.finished_at = "succeeded", results_uri, rows, _now()

    def close(self) -> None:
        self.closed = True
