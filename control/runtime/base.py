"""The `Runtime` contract: everything the control service asks of whatever runs the models.

Two implementations — `local` (processes on this machine) and `knative` (a cluster) — and
nothing above this module knows which one runs.
"""
from __future__ import annotations

import abc
import dataclasses
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Hashable, Any, ClassVar, Mapping, Optional

from adapters.manifest import Manifest
from control.errors import Conflict, Invalid

MODEL_STATUSES = ("ready", "idle", "starting", "failed")
JOB_STATUSES = ("queued", "running", "succeeded", "failed")
#: A cancelled job ends `failed` with the error `cancelled by <who>` (no status of its own: every
#: client that waits for a job to end waits for succeeded or failed).
CANCELLED_BY = "cancelled by "
ETA_MIN_SECONDS = 0.5  # a job's scoring must have run this long before its ETA is estimated


@dataclass
class VersionInfo:
    version: str
    deployed_at: str
    live: bool = False
    #: the version failed its deploy check (started, ready, scored its sample): it never takes
    #: traffic, and `error` says why, with the tail of the model's log
    failed: bool = False
    error: Optional[str] = None
    #: a version that is not live and crashed lately (a candidate, or one called by its own URL, as a
    #: comparison does): `crash_error` says how, with its output; `crashed` when it crashed
    #: `max_restarts` times in a row and is not restarted. The model's own status and error are its
    #: live version's alone.
    crashed: bool = False
    crash_error: Optional[str] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModelInfo:
    """One row of `GET /api/models`."""

    name: str
    kind: str
    language: str
    version: Optional[str]
    status: str
    replicas: int = 0
    endpoint: Optional[str] = None
    error: Optional[str] = None
    description: str = ""
    owner: str = ""
    labels: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        # Every field but `labels` (a flat dict of strings) is a scalar: a shallow copy, with
        # the labels copied too, is the same as asdict() at a fraction of the cost, which
        # matters when the API lists thousands of models.
        out = dict(self.__dict__)
        out["labels"] = dict(self.labels)
        return out


@dataclass
class Traffic:
    """How a realtime model's requests are split between its live version and a candidate.

    `percent` of requests are answered by the candidate, the rest by the live version;
    `shadow` percent of the live version's requests are also sent to the candidate, whose
    answers are recorded and never returned. `past` is the history of live versions before
    this one, oldest first (`LIVE_HISTORY` at most); `previous` is the version a rollback with
    no version returns to: the newest of them that can still serve (see `walk_back`).
    """

    live: Optional[str]
    candidate: Optional[str] = None
    percent: int = 0
    shadow: int = 0
    previous: Optional[str] = None
    past: list = field(default_factory=list)
    #: versions an operator (or a running comparison) keeps routed at 0 %, for their own URL
    pinned: list = field(default_factory=list)

    def targets(self) -> list[dict]:
        """The traffic list: each routed version, its share, and its tag (its own URL). Only these
        versions have a route on a cluster; any other deployed version has none until it is
        rolled out or pinned (`MAX_PINS` at most)."""
        if self.live is None:
            return []
        out = [{"version": self.live, "percent": 100 - self.percent if self.candidate else 100,
                "tag": version_tag(self.live), "role": "live"}]
        if self.candidate:
            out.append({"version": self.candidate, "percent": self.percent, "tag": version_tag(self.candidate),
                        "role": "candidate", "shadow": self.shadow})
        for version in self.pinned:
            if version not in (self.live, self.candidate):
                out.append({"version": version, "percent": 0, "tag": version_tag(version), "role": "pinned"})
        return out

    def routed(self) -> list[str]:
        """The versions with a route: live, candidate, pinned."""
        return [t["version"] for t in self.targets()]

    def to_json(self) -> dict:
        return {"live": self.live, "candidate": self.candidate, "percent": self.percent, "shadow": self.shadow,
                "previous": self.previous, "pinned": list(self.pinned), "targets": self.targets()}


class DeployCheckFailed(Invalid):
    """A new version did not start, become ready or score its sample: it was not made live (422).
    `details`: model, version, reason, log_tail, and `new_model` when the model has no live
    version (then nothing of it is kept)."""


#: how many earlier live versions a model remembers for `rollback` to walk back through
LIVE_HISTORY = 20
#: how many versions besides the live one and a candidate may hold a route on a cluster: each
#: routed version keeps its `scaling.min` pods and a Kubernetes Service of its own
MAX_PINS = 5


def made_live(past: list, live: Optional[str], version: str) -> list:
    """The history of live versions once `version` replaces `live` by a deploy, a promote or a
    rollback to a version that is not in the history (a move forward): `live` is remembered."""
    out = [v for v in past if v != version]
    if live and live != version:
        out = [v for v in out if v != live] + [live]
    return out[-LIVE_HISTORY:]


def walk_back(past: list, live: Optional[str], usable) -> tuple[Optional[str], list]:
    """Where a rollback with no version goes: the newest version in `past` that `usable(v)`
    accepts (deployed and not failed) and is not `live`, and the history left behind it. The
    version rolled back from is not remembered, so a second rollback goes further back
    (3 -> 2 -> 1) instead of returning to it. (None, past) when there is nothing earlier."""
    for i in range(len(past) - 1, -1, -1):
        if past[i] != live and usable(past[i]):
            return past[i], list(past[:i])
    return None, list(past)


def rolled_back_to(past: list, live: Optional[str], version: str) -> list:
    """The history once a rollback names `version`: a version in the history is a step back (what
    came after it is forgotten, the version left included); any other is a move forward."""
    if version in past:
        return list(past[:len(past) - 1 - past[::-1].index(version)])
    return made_live(past, live, version)


def version_tag(version: str) -> str:
    """A version as a DNS label, for a Knative traffic tag: `v` + the version with every run of
    other than [a-z0-9] as `-` (1.2.0-rc.1 -> v1-2-0-rc-1)."""
    return "v" + re.sub(r"[^a-z0-9]+", "-", version.lower()).strip("-")


@dataclass
class ModelDetail(ModelInfo):
    """`GET /api/models/{name}`: the summary plus manifest, versions and recent metrics."""

    manifest: dict = field(default_factory=dict)
    versions: list[VersionInfo] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    #: a realtime model's split (Traffic.to_json); empty for a batch model
    traffic: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["versions"] = [v.to_json() for v in self.versions]
        return out


@dataclass
class Job:
    """A batch job: one dataset through one model version."""

    id: str
    model: str
    version: str
    status: str
    dataset: str
    created_at: str
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    rows: Optional[int] = None
    results_uri: Optional[str] = None
    error: Optional[str] = None
    log_tail: str = ""
    trigger: str = "api"
    input: dict = field(default_factory=dict)
    #: rows that do not match the features: the first 100 `{"row", "field", "error"}`, and how many in all
    problems: list = field(default_factory=list)
    invalid_values: Optional[int] = None
    #: a succeeded job's scores: count, quantiles, percentiles, histogram (the adapter's result.json)
    score_summary: dict = field(default_factory=dict)
    #: Progress, published by the batch adapter while the model writes its scores. `rows_scored`:
    #: scores written and checked so far (kept when the job ends: a failed job shows what it
    #: reached; a succeeded one equals `rows`). `rows_total`: the dataset's data rows, known once
    #: the adapter has checked them, while the job runs — `rows` is the same count as the finished
    #: job's result reports it. `progress_at`: when the adapter last published. `eta_seconds`: the
    #: time left at the rate of scoring so far (from the first score seen, so the model's start-up
    #: is left out), for a running job only; None until it can be estimated. Any may be None (a
    #: runtime with no progress channel, a job that never started, a results file the adapter
    #: cannot follow as it is written).
    rows_scored: Optional[int] = None
    rows_total: Optional[int] = None
    progress_at: Optional[str] = None
    eta_seconds: Optional[float] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def cancelled(self) -> bool:
        """Whether the job was stopped by `cancel_job` (it is `failed`, its error says by whom)."""
        return self.status == "failed" and (self.error or "").startswith(CANCELLED_BY)

    def apply_progress(self, doc: Mapping[str, Any], now: Optional[float] = None) -> None:
        """Take the adapter's progress document (adapters/batch.py `Progress`): the counts, and for
        a running job the ETA. A malformed document changes nothing."""
        try:
            scored, total = doc.get("rows_scored"), doc.get("rows_total")
            updated = float(doc["updated_at"])
            first_at, first_rows = doc.get("first_at"), int(doc.get("first_rows") or 0)
            scored = None if scored is None else int(scored)
            total = None if total is None else int(total)
        except (AttributeError, KeyError, TypeError, ValueError):
            return
        self.rows_scored, self.rows_total = scored, total
        self.progress_at = datetime.fromtimestamp(updated, timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        self.eta_seconds = None
        if self.status != "running" or scored is None or total is None:
            return
        if scored >= total:
            self.eta_seconds = 0.0
            return
        now = time.time() if now is None else now
        try:
            elapsed = updated - float(first_at)
        except (TypeError, ValueError):
            return
        if elapsed < ETA_MIN_SECONDS or scored <= first_rows:
            return
        rate = (scored - first_rows) / elapsed
        self.eta_seconds = round(max(0.0, (total - scored) / rate - max(0.0, now - updated)), 1)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Job":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def cancel_too_late(job: Job) -> Conflict:
    """The answer to cancelling a job that has ended: 409 naming its status."""
    how = f" ({job.error[:200]})" if job.status == "failed" and job.error else ""
    return Conflict(f"job {job.id} has ended: it is {job.status}{how}; only a queued or running job can be cancelled",
                    details={"job": job.id, "status": job.status})


@dataclass
class ProxyResponse:
    status: int
    headers: dict
    body: bytes


class Runtime(abc.ABC):
    """What runs models. Methods take keyword-only arguments after the model name."""

    name: ClassVar[str]

    def start(self) -> None:
        """Begin background work (autoscaler, job workers). Idempotent."""

    def close(self) -> None:
        """Stop everything this runtime started: replicas, workers, threads."""

    @abc.abstractmethod
    def deploy(self, manifest: Manifest, *, make_live: bool = True) -> VersionInfo:
        """Add `manifest.version` of `manifest.name` as an immutable version.

        Deploying a version that exists with the same content changes nothing; the same
        version with different content is a Conflict.
        """

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Delete a model, every version and its replicas."""

    @abc.abstractmethod
    def rollback(self, name: str, *, version: Optional[str] = None) -> VersionInfo:
        """Make an earlier version live without dropping in-flight requests, ending any rollout.

        Without a version: undo the last change at once — a rollout in progress is withdrawn
        (the live version keeps every request), or else the version live before the last
        promote or rollback is made live again."""

    def rollout(self, name: str, *, version: str, percent: int = 0, shadow: int = 0) -> Traffic:
        """Send `percent` % of a realtime model's requests to `version` (deployed, not live) and
        the rest to the live version; mirror `shadow` % of the live version's requests to it."""
        from control.errors import BadRequest

        raise BadRequest(f"the {self.name} runtime cannot split traffic")

    def promote(self, name: str) -> VersionInfo:
        """Make the version under rollout live: it takes every request."""
        from control.errors import BadRequest

        raise BadRequest(f"the {self.name} runtime cannot split traffic")

    def pin(self, name: str, version: str) -> Traffic:
        """Keep a deployed version of a realtime model routed at 0 % (a URL of its own) until
        unpinned. A runtime that routes every version needs none: it says so."""
        from control.errors import BadRequest

        raise BadRequest(f"the {self.name} runtime routes every deployed version: nothing to pin")

    def unpin(self, name: str, version: str) -> Traffic:
        from control.errors import BadRequest

        raise BadRequest(f"the {self.name} runtime routes every deployed version: nothing to unpin")

    def traffic(self, name: str) -> Traffic:
        """A realtime model's split; NotFound if unknown."""
        return Traffic(live=self.model(name).version)

    def version_manifest(self, name: str, version: str) -> dict:
        """The manifest of one deployed version, live or not, as a dict; NotFound if unknown.
        By default only the live version's is known."""
        from control.errors import NotFound

        detail = self.model(name)
        if detail.version != version:
            raise NotFound(f"{name} has no version {version} that this runtime can describe")
        return dict(detail.manifest)

    @abc.abstractmethod
    def models(self) -> list[ModelInfo]:
        """Every model with its live version and status."""

    def models_generation(self) -> Optional[Hashable]:
        """A value that changes whenever `models()` would answer differently, so the API can keep
        its encoded list until then; None (the default): it cannot tell, build it every time."""
        return None

    @abc.abstractmethod
    def model(self, name: str) -> ModelDetail:
        """One model in full; NotFound if unknown."""

    @abc.abstractmethod
    def forward(self, name: str, *, method: str, path: str, headers: Mapping[str, str],
                body: bytes, query: str = "", version: Optional[str] = None) -> ProxyResponse:
        """Send a request to the model's adapter (`path` as the adapter sees it), holding it
        while a replica starts: to the version the traffic split picks, or to `version`."""

    async def aforward(self, name: str, *, method: str, path: str, headers: Mapping[str, str],
                       body: bytes, query: str = "", version: Optional[str] = None) -> ProxyResponse:
        """`forward` for the control service's asyncio front door. By default `forward` in the
        event loop's executor; a runtime that can hold and send requests without a thread each
        overrides it."""
        import asyncio
        import functools

        call = functools.partial(self.forward, name, method=method, path=path, headers=headers, body=body,
                                 query=query, version=version)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    @abc.abstractmethod
    def submit_job(self, name: str, *, dataset: str, event_key: Optional[str] = None,
                   trigger: str = "api", version: Optional[str] = None) -> tuple[Job, bool]:
        """Queue a batch job on `dataset` (`gs://…` or a path). `event_key` makes it
        idempotent: a second submission with the same key returns the first job and False.
        `version` runs that deployed version instead of the live one (NotFound naming the
        deployed versions if the model has no such version)."""

    @abc.abstractmethod
    def jobs(self, *, model: Optional[str] = None, limit: int = 200) -> list[Job]:
        """Jobs, newest first."""

    @abc.abstractmethod
    def job(self, job_id: str) -> Job:
        """One job; NotFound if unknown."""

    @abc.abstractmethod
    def cancel_job(self, job_id: str, *, by: str) -> Job:
        """Stop a queued or running job: it never starts, or its processes are stopped (SIGTERM,
        then SIGKILL after a grace), nothing of it is published as succeeded, and it ends
        `failed` with the error `cancelled by <by>` (`CANCELLED_BY`). Returns the job.

        NotFound if unknown; Conflict naming its status if it had already ended (or ended on its
        own before it could be stopped). A job already cancelled is returned as it is, so a
        second cancel (a retry) changes nothing."""

    def job_for_upload(self, name: str, *, bucket: str, obj: str, generation: str) -> Optional[str]:
        """The id of the job the bucket event of this upload will start, where the runtime can
        tell it before the event arrives (None: look the event up in `/api/events`)."""
        return None

    def render(self, manifest: Manifest) -> str:
        """The objects this runtime would create for `manifest`, as YAML (cluster runtime)."""
        from control.errors import BadRequest

        raise BadRequest(f"the {self.name} runtime has nothing to render")

