"""Realtime replicas of the local runtime: adapter processes, the activator and the autoscaler.

A replica is one `python -m adapters serve {version dir} --port {port}` process (the adapter
supervises the model and exits if the model dies), in its own process group, with a monitor
thread that polls its readiness, notices its exit and stops it when asked.

Routing: each model has a live revision (a deployed version) and, during a rollout, a
candidate that answers a share of its requests (`Split`); each request draws which one, once,
unless it names its version (`/models/{name}/versions/{version}/…`: any deployed version, kept
warm like a routed one while it is called). Within a revision a request goes to the
ready replica with the fewest requests in flight, over a pooled keep-alive
connection. With no ready replica the request is held (the activator) while one starts.
A request is sent again (once, to another replica) only when no model can have taken it: the
connection was refused, the adapter answered a 503 saying its model never had it ("not ready",
"not reachable"), or the adapter exited under
a pooled connection. Anything else — notably a request during which the model died — goes back
to the caller (502), because resending a request that crashes its model would crash the next.

Scaling, per revision, on every request and every `TICK`:

    desired = ceil(concurrency / target_concurrency), clamped to [scaling.min, scaling.max]

where concurrency is requests in flight plus held, taken as it is now for scaling out and as
its peak over the last `min(idle_timeout, 30s)` for scaling in, so a replica is not stopped in
a momentary lull. Each revision scales on its own: one replica is kept while it had a request
in the last `idle_timeout`; after that, zero. While no replica is ready, only one is started (plus
`scaling.min`): a cold start gets the machine to itself, and the burst it holds scales the
model out as soon as there is a replica to measure. Scale-in stops replicas still starting
first, then idle ready ones, never the last ready one while requests wait; and a
revision that is no longer routed or called keeps its replicas only while they have requests
in flight (rollback drains). A crash is replaced after an exponential backoff; `max_restarts` crashes
in a row mark the revision failed (with the adapter's output tail) until a deploy or
rollback; a replica that stays ready `STABLE_AFTER` seconds resets the count.

A model's health is its live version's: a crash of the live version is the model's `error` (and
`max_restarts` of them its `failed` status, kept in the state dir's `crashes.json` so that a
restart of the control service still shows it failed, not idle, until a deploy or rollback); a
crash of any other version (a candidate, one called by its own URL, as a comparison does) is
that version's (`version_errors`), never the model's.

A new version is checked before it is routed (`check`): one replica of it is started beside
the versions that take traffic, must become ready within the check's timeout and answer the
probe (its sample); a crash fails the check at once. A revision that failed its check is
stopped and forgotten; one that passed keeps its replica only if it is then routed.
"""
from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import logging
import os
import math
import random
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from adapters import SECRET_HEADER, http11
from adapters.manifest import Manifest
from control.emulator import free_port
from control.errors import NotFound, PlaneError, Unavailable, UpstreamError
from control.runtime.base import ProxyResponse
from control.runtime.local_procs import Spare, crash_output, descendants, kill_pids, killpg, tail, with_pdeathsig
from control.runtime.local_metrics import ModelMetrics

log = logging.getLogger(__name__)

TICK = 0.1                 # autoscaler period, seconds
READY_POLL = 0.01          # readiness poll period while a replica starts
BACKOFF_BASE = 0.25        # first crash: wait this long before the replacement; doubles per crash
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0        # a replica ready this long resets the consecutive-crash count
STOP_GRACE = 5.0           # SIGTERM, then SIGKILL after this long
SCALE_IN_WINDOW_MAX = 30.0
NOTE_SECONDS = 600.0       # how long a replaced crash stays visible as the model's `error`
LOGS_KEPT = 20             # replica log files kept per model
# What the adapter's 503s say when the request never reached the model: refused because the
# model is not ready, or the connection to the model could not be made (adapters/realtime.py;
# a model that drops a connection under a request is a 502 instead).
UNSENT = (b"is not ready", b"is not reachable")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
# Never passed on to an adapter: the secret is the runtime's to send, and a browser's headers
# were judged by the control service (the adapter refuses any)
NOT_FORWARDED = HOP_BY_HOP | {SECRET_HEADER.lower(), "origin", "sec-fetch-site"}
ATTEMPTS = 2               # a request that never reached a model is sent once more, elsewhere


def _outgoing(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes):
    """(url, headers, body) of a forwarded request."""
    url = path if path.startswith("/") else "/" + path
    if query:
        url += "?" + query
    out_headers = {k: v for k, v in headers.items() if k.lower() not in NOT_FORWARDED}
    if not body and method.upper() in ("GET", "HEAD", "DELETE", "OPTIONS"):
        body = None
    return url, out_headers, body


def _answer_headers(items) -> dict:
    return {k: v for k, v in items if k.lower() not in HOP_BY_HOP}


def _timed_out(replica: "Replica") -> UpstreamError:
    return UpstreamError(f"{replica.rev.key} did not answer within "
                         f"{replica.rev.manifest.limits.timeout_seconds + 5:.0f}s", status=504)


def _broke(replica: "Replica", e: Exception) -> UpstreamError:
    """The connection broke after the request was sent: never resent (it may be what crashed the
    model, and would crash the next replica too)."""
    return UpstreamError(f"{replica.rev.key}: the connection to replica {replica.id} broke "
                         f"mid-request ({e}); the model may have crashed")


def _wake(fut: "asyncio.Future") -> None:
    if not fut.done():
        fut.set_result(None)


class _Stale(Exception):
    """The revision was retired while we looked at it: resolve the live one again."""


class CheckFailed(Exception):
    """A version failed its check: why, and the tail of its replica's log."""

    def __init__(self, reason: str, log_tail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail


class Replica:
    _ids = itertools.count(1)

    def __init__(self, rev: "Revision", port: int, logs: Path):
        self.id = next(Replica._ids)
        self.rev = rev
        self.port = port
        self.log_path = logs / f"{rev.version}-{self.id}.log"
        self.state = "starting"          # starting -> ready -> stopping -> exited
        self.proc: Optional[subprocess.Popen] = None
        self.inflight = 0
        self.started = time.monotonic()
        self.ready_at: Optional[float] = None
        self.stop_requested = False
        self.crash_reason: Optional[str] = None   # set when we kill it for misbehaving
        self.thread: Optional[threading.Thread] = None
        self.client = http11.Client("127.0.0.1", port, keep=max(64, 4 * rev.scaling.target_concurrency))
        self.timeout = rev.manifest.limits.timeout_seconds + 5.0

    @property
    def active(self) -> bool:
        return self.state in ("starting", "ready")

    def __repr__(self) -> str:
        return f"<replica {self.id} of {self.rev.key} on :{self.port} {self.state}>"


@dataclass(frozen=True)
class Split:
    """Where a realtime model's requests go: the live version, and `percent` % of them to a
    candidate under rollout."""

    live: str
    candidate: Optional[str] = None
    percent: int = 0

    def versions(self) -> tuple[str, ...]:
        return (self.live, self.candidate) if self.candidate else (self.live,)

    def pick(self, draw: float) -> str:
        """The version for a request whose draw (uniform on [0, 1)) is `draw`."""
        return self.candidate if self.candidate and draw * 100 < self.percent else self.live


class Revision:
    """One deployed version of a realtime model and its replicas."""

    def __init__(self, name: str, version: str, directory: Path, manifest: Manifest):
        self.name, self.version, self.directory, self.manifest = name, version, directory, manifest
        self.scaling = manifest.scaling
        self.idle = manifest.scaling.idle_seconds
        self.window = min(self.idle, SCALE_IN_WINDOW_MAX)
        self.waiters: list[asyncio.Future] = []   # requests held for a replica
        self.replicas: list[Replica] = []
        self.pending = 0
        self.crashes = 0
        self.next_start = 0.0
        self.failed: Optional[str] = None
        self.last_request = -math.inf
        self.samples: deque[tuple[float, int]] = deque()
        self.live = False       # routed: the live version or the candidate under rollout
        self.called = False     # not routed, but called by its version's own URL
        self.retired = False
        self.checking = False   # under its deploy check: one replica, a crash fails it at once
        self.start_timeout: Optional[float] = None   # while checking: the check's timeout
        self.failed_output = ""  # the adapter's output tail when a check crash failed it

    @property
    def kept(self) -> bool:
        """Kept while in use (one replica through `idle_timeout`); otherwise it only drains."""
        return self.live or self.called or self.checking

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def notify(self) -> None:
        """Wake every request held for this revision (lock held), whatever event loop it waits on."""
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            fut.get_loop().call_soon_threadsafe(_wake, fut)

    def demand(self) -> int:
        return self.pending + sum(r.inflight for r in self.replicas)

    def active(self) -> list[Replica]:
        return [r for r in self.replicas if r.active]

    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "ready"]

    def desired(self, now: float, concurrency: int) -> int:
        if self.failed:
            return 0
        want = math.ceil(concurrency / self.scaling.target_concurrency)
        if self.kept and want == 0 and now - self.last_request < self.idle:
            want = 1
        if not self.ready():
            want = min(want, 1)
        if self.checking:
            want = max(want, 1)   # its one replica, whatever its idle timeout
        floor = self.scaling.min if self.live else 0
        return max(floor, min(want, self.scaling.max))


def _scale_in_victims(active: list[Replica], excess: int, demand: int) -> list[Replica]:
    """Which `excess` replicas to stop: ones still starting first (they serve nobody yet, newest
    first), then idle ready ones (the most recently ready first, so the warm ones stay); never
    one with requests in flight, and never the last ready one while requests are in flight or
    held, so scaling in cannot leave those waiting for a cold start."""
    starting = sorted((r for r in active if r.state == "starting"), key=lambda r: r.started, reverse=True)
    idle = sorted((r for r in active if r.state == "ready" and r.inflight == 0),
                  key=lambda r: r.ready_at or 0, reverse=True)
    victims = (starting + idle)[:excess]
    ready = sum(1 for r in active if r.state == "ready")
    while demand > 0 and victims and ready - sum(1 for r in victims if r.state == "ready") < 1:
        victims.pop()
    return victims


class ReplicaManager:
    """Replicas of every realtime model: routing, holding, scaling, crash handling, metrics."""

    def __init__(self, *, logs: Path, cwd: Path, start_timeout: float, max_restarts: int,
                 argv: Callable[[Path, int], list[str]], env: Callable[[], dict],
                 manifest: Callable[[str, str], Manifest], directory: Callable[[str, str], Path],
                 secret: Optional[str] = None, failures: Optional[Path] = None):
        self.logs = Path(logs)
        self.cwd = Path(cwd)
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self._argv = argv
        self._env = env
        self._manifest = manifest
        self._directory = directory
        # the adapters' secret (in their environment): sent on every forward and readiness poll
        self._secret_headers = {SECRET_HEADER: secret} if secret else {}
        self._lock = threading.Lock()
        self._revisions: dict[tuple[str, str], Revision] = {}
        self._routes: dict[str, Split] = {}           # realtime model -> where its requests go
        self._counts: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [requests, errors]
        self._notes: dict[str, tuple[float, str]] = {}  # model -> (time, last replaced crash of its live version)
        # (model, version) -> (time, last crash, failed) of a version that is not live: shown on the version
        self._version_notes: dict[tuple[str, str], tuple[float, str, bool]] = {}
        # model -> {"version", "error"}: its live version failed (max_restarts crashes in a row);
        # kept in `failures` (a JSON file) so that a restart still says so
        self._failures_path = Path(failures) if failures is not None else None
        self._failures: dict[str, dict] = self._load_failures()
        self._metrics: dict[str, ModelMetrics] = {}
        self._closing = False
        self.generation = 0    # bumped whenever what `status` answers may change (the API's model list)
        self._ticker: Optional[threading.Thread] = None
        self._wake = threading.Event()
        # a cold start takes a spare adapter, its interpreter up and imports done (local_procs.Spare)
        self._spare = Spare(argv(Path("."), 0), imports="adapters.realtime", env=env, cwd=self.cwd)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._ticker is not None or self._closing:
                return
            self._ticker = threading.Thread(target=self._tick_loop, name="modelplane-autoscaler", daemon=True)
            self._ticker.start()

    def close(self) -> None:
        """Stop every replica (SIGTERM, SIGKILL after STOP_GRACE) and wait for them to go."""
        with self._lock:
            self._closing = True
            replicas = []
            for rev in self._revisions.values():
                rev.retired = True
                replicas.extend(rev.replicas)
                rev.notify()
            self._revisions.clear()
            for r in replicas:
                self._stop_locked(r)
        self._wake.set()
        deadline = time.monotonic() + STOP_GRACE + 5.0
        for r in replicas:
            if r.thread is not None:
                r.thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if r.proc is not None and r.proc.poll() is None:   # the monitor is stuck: make sure anyway
                killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
        if self._ticker is not None:
            self._ticker.join(timeout=2.0)
        self._spare.close()

    # -- what the runtime tells us ------------------------------------------------------
    def set_live(self, name: str, version: str, *, clear_failure: bool, warm: bool = False) -> None:
        """Route every request of `name` to `version` from now on; the previous revision drains."""
        self.set_route(name, Split(version), clear_failure=clear_failure, warm={version: warm})

    def set_route(self, name: str, split: Split, *, clear_failure: bool, warm: Mapping[str, bool]) -> None:
        """Route `name`'s requests by `split` from now on; a revision that leaves it drains.

        `warm`: versions that keep replicas at all times (scaling.min > 0), started now.
        """
        with self._lock:
            old = self._routes.get(name)
            self._routes[name] = split
            self.generation += 1
            self._metrics.setdefault(name, ModelMetrics())
            routed = split.versions()
            for (n, version), rev in self._revisions.items():
                if n == name and rev.live and version not in routed:
                    rev.live = rev.called = False
                    rev.notify()
            if clear_failure:
                self._notes.pop(name, None)
                for version in routed:
                    self._version_notes.pop((name, version), None)
                if self._failures.pop(name, None) is not None:
                    self._save_failures_locked()
            old_live = self._revisions.get((name, old.live)) if old is not None else None
            for version in routed:
                rev = self._revisions.get((name, version))
                if rev is not None:
                    rev.live = True
                    if clear_failure:
                        rev.failed, rev.crashes, rev.next_start = None, 0, 0.0
                takes_over = version == split.live and old_live is not None and old_live.version != version
                if rev is None and (warm.get(version) or (takes_over and old_live.replicas)):
                    rev = self._revision_locked(name, version)
                if rev is not None and takes_over and old_live.replicas:
                    # Carry the load over so the new live revision starts as many replicas as the
                    # old one needed: requests switch over without a cold start of their own making.
                    rev.last_request = max(rev.last_request, old_live.last_request)
                    rev.samples.extend(old_live.samples)
        self._wake.set()

    def forget(self, name: str) -> None:
        """The model is gone: stop its replicas now and fail anything held for it."""
        with self._lock:
            self._routes.pop(name, None)
            self._notes.pop(name, None)
            for key in [k for k in self._version_notes if k[0] == name]:
                del self._version_notes[key]
            if self._failures.pop(name, None) is not None:
                self._save_failures_locked()
            for key in [k for k in self._counts if k[0] == name]:
                del self._counts[key]
            self.generation += 1
            self._metrics.pop(name, None)
            for key in [k for k in self._revisions if k[0] == name]:
                rev = self._revisions.pop(key)
                rev.retired = True
                rev.notify()
                for r in rev.replicas:
                    self._stop_locked(r)

    def check(self, name: str, version: str, probe: Callable[[Callable[..., ProxyResponse]], None], *,
              timeout: float, on_pass: Optional[Callable[[], None]] = None) -> None:
        """Check a version before it is routed: start one replica of it (the routed versions keep
        every request), wait until it is ready, then `probe(send)`, where `send(method, path,
        headers, body)` goes to that replica; `probe` raises CheckFailed for a wrong answer.
        (The local runtime's promise that Knative keeps on a cluster: no traffic before Ready.)

        Raises CheckFailed (with the tail of the replica's log) when the replica exits before it
        is ready, is not ready within `timeout` seconds, or the probe fails: its replicas are then
        stopped and the revision forgotten, so nothing of the version keeps running. On success
        `on_pass()` runs while the replica is still held (it routes the version, or not); the
        replica is then kept only if the version is routed, and otherwise drains and stops."""
        key = (name, version)
        with self._lock:
            if self._closing:
                raise Unavailable("the runtime is shutting down")
            rev = self._revisions.get(key)
            if rev is None:
                rev = self._revision_locked(name, version)
            was_called = rev.called
            rev.checking, rev.start_timeout = True, timeout
            rev.failed, rev.crashes, rev.next_start, rev.failed_output = None, 0, 0.0, ""
            self._version_notes.pop(key, None)
            rev.last_request = time.monotonic()
            if not rev.active():
                self._start_locked(rev)
        self._wake.set()
        passed = False
        try:
            self._await_ready(rev, timeout)

            def send(method: str, path: str, headers: Mapping[str, str], body: bytes) -> ProxyResponse:
                with self._lock:
                    rev.last_request = time.monotonic()
                    if rev.failed:
                        raise CheckFailed(f"it {rev.failed}", rev.failed_output)
                return self.forward(name, method=method, path=path, headers=headers, body=body, version=version)

            try:
                probe(send)
            except CheckFailed as e:
                raise CheckFailed(e.reason, e.log_tail or self._log_tail(rev)) from None
            except PlaneError as e:
                raise CheckFailed(e.message, self._log_tail(rev)) from None
            passed = True
            with self._lock:
                # the check's requests were not the model's: it scales from its own traffic (or the
                # load of the version it takes over from, which routing it carries over)
                rev.last_request = -math.inf
                rev.samples.clear()
            if on_pass is not None:
                on_pass()
        finally:
            with self._lock:
                rev.checking, rev.start_timeout = False, None
                if passed:
                    rev.called = was_called
                    if rev.desired(time.monotonic(), rev.demand()) == 0:
                        for r in rev.replicas:   # at zero from now on, as it would have been unchecked
                            if r.inflight == 0:
                                self._stop_locked(r)
                else:
                    rev.retired = True
                    rev.live = rev.called = False
                    if self._revisions.get(key) is rev:
                        del self._revisions[key]
                    for r in rev.replicas:
                        self._stop_locked(r)
                    rev.notify()
                stopping = [r for r in rev.replicas if r.stop_requested]
                self.generation += 1
            self._wake.set()
            if not passed:   # the refusal is answered once nothing of the version runs
                deadline = time.monotonic() + STOP_GRACE + 2.0
                for r in stopping:
                    if r.thread is not None:
                        r.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _await_ready(self, rev: Revision, timeout: float) -> None:
        """Until one of the revision's replicas is ready; CheckFailed when the revision fails (a
        crash, or not ready in time: the replica's monitor stops it and says which)."""
        hard = time.monotonic() + timeout + STOP_GRACE + 5.0
        while True:
            with self._lock:
                if rev.failed:
                    raise CheckFailed(f"it {rev.failed}", rev.failed_output)
                if rev.ready():
                    return
                if not rev.active() and not self._closing and time.monotonic() >= rev.next_start:
                    self._start_locked(rev)   # only if its replica went without a crash (never, normally)
            if self._closing:
                raise Unavailable("the runtime is shutting down")
            if time.monotonic() > hard:
                raise CheckFailed(f"it was not ready within {timeout:g}s", self._log_tail(rev))
            time.sleep(READY_POLL * 5)

    @staticmethod
    def _log_tail(rev: Revision) -> str:
        paths = [r.log_path for r in rev.replicas]
        return crash_output(tail(paths[-1], 2000).strip()) if paths else ""

    # -- what the API asks ----------------------------------------------------------------
    def status(self, name: str) -> tuple[str, int, Optional[str]]:
        """(status, replicas, error) of a realtime model."""
        with self._lock:
            split = self._routes.get(name)
            rev = self._revisions.get((name, split.live)) if split else None
            replicas = sum(len(r.ready()) for (n, _), r in self._revisions.items() if n == name)
            note = self._notes.get(name)
            error = note[1] if note and time.time() - note[0] < NOTE_SECONDS else None
            if rev is None:
                kept = self._failures.get(name)
                if kept and split is not None and kept.get("version") == split.live:
                    return "failed", replicas, kept.get("error")
                return "idle", replicas, error
            if rev.failed:
                return "failed", replicas, rev.failed
            if rev.ready():
                return "ready", replicas, error
            if rev.active() or rev.pending:
                return "starting", replicas, error
            return "idle", replicas, error

    def version_errors(self, name: str) -> dict[str, tuple[bool, str]]:
        """Per version of `name` that is not live: (failed, why) for one that crashed lately (`failed`:
        `max_restarts` crashes in a row, so it is not restarted until a deploy or rollback)."""
        with self._lock:
            split = self._routes.get(name)
            live = split.live if split is not None else None
            now = time.time()
            out: dict[str, tuple[bool, str]] = {}
            for (n, version), (at, text, failed) in self._version_notes.items():
                if n == name and version != live and now - at < NOTE_SECONDS:
                    out[version] = (failed, text)
            for (n, version), rev in self._revisions.items():
                if n == name and version != live and rev.failed and not rev.checking:
                    out[version] = (True, rev.failed)
            return out

    def metrics(self, name: str) -> dict:
        with self._lock:
            m = self._metrics.setdefault(name, ModelMetrics())
            replicas = sum(len(r.ready()) for (n, _), r in self._revisions.items() if n == name)
        return m.snapshot(replicas=replicas)

    def version_metrics(self, name: str) -> dict[str, dict]:
        """Per version of `name`: requests answered, how many failed, replicas ready now."""
        with self._lock:
            out = {v: {"requests": c[0], "errors": c[1], "replicas": 0} for (n, v), c in self._counts.items()
                   if n == name}
            for (n, v), rev in self._revisions.items():
                if n == name:
                    out.setdefault(v, {"requests": 0, "errors": 0, "replicas": 0})["replicas"] = len(rev.ready())
        return out

    # -- the activator ------------------------------------------------------------------
    # One way in: `aforward`, on the caller's event loop (the control service's front door).
    # `forward`, the runtime contract's blocking call, runs it on an event loop of its own.

    def forward(self, name: str, *, method: str, path: str, headers: Mapping[str, str], body: bytes,
                query: str = "", version: Optional[str] = None) -> ProxyResponse:
        return asyncio.run(self.aforward(name, method=method, path=path, headers=headers, body=body, query=query,
                                         version=version))

    async def aforward(self, name: str, *, method: str, path: str, headers: Mapping[str, str],
                       body: bytes, query: str = "", version: Optional[str] = None) -> ProxyResponse:
        """`forward` for an asyncio caller (the front door), on the replicas' kept-alive
        connections (adapters/http11.py's client: the adapter's own way to its model).
        `version`: that deployed version answers, whatever the split."""
        t0 = time.monotonic()
        failed = True
        url, out_headers, body = _outgoing(method, path, query, headers, body)
        out_headers.update(self._secret_headers)
        tried: set[int] = set()
        last_error: Optional[Exception] = None
        draw = random.random()   # which side of the split: drawn once, kept if the request is sent again
        rev: Optional[Revision] = None
        try:
            for attempt in range(ATTEMPTS):
                replica = await self._aacquire(name, tried, version, draw)
                rev = replica.rev
                try:
                    status, resp_headers, data = await replica.client.exchange(method.upper(), url, body,
                                                                               replica.timeout, out_headers)
                except http11.Unreachable as e:
                    error: Exception = e
                    unsent = True
                except asyncio.TimeoutError as e:
                    raise _timed_out(replica) from e
                except (http11.Disconnected, OSError) as e:
                    error, unsent = e, False
                else:
                    if self._retry_after_answer(replica, status, data, attempt, tried):
                        continue
                    failed = status >= 500
                    return ProxyResponse(status=status, headers=_answer_headers(resp_headers), body=data)
                finally:
                    self._release(replica)
                if unsent or (attempt < ATTEMPTS - 1 and await self._agoing_away(replica)):
                    tried.add(replica.id)
                    last_error = error
                    log.debug("%s: replica %s unreachable or went away (%s); retrying elsewhere", name, replica.id, error)
                    continue
                raise _broke(replica, error) from error
            raise UpstreamError(f"{name}: no replica could be reached ({last_error})")
        finally:
            self._record(name, rev, t0, failed)

    def _record(self, name: str, rev: Optional[Revision], t0: float, failed: bool) -> None:
        if rev is not None and rev.checking:
            return   # a deploy check's request is not one of the model's
        metrics = self._metrics.get(name)
        if metrics is not None:
            metrics.record((time.monotonic() - t0) * 1000.0, error=failed)
        if rev is not None:
            with self._lock:
                if name in self._routes:
                    counts = self._counts.setdefault((name, rev.version), [0, 0])
                    counts[0] += 1
                    counts[1] += failed

    def _retry_after_answer(self, replica: Replica, status: int, data: bytes, attempt: int, tried: set[int]) -> bool:
        """Whether an answer says the request never reached a model, so it may go elsewhere.

        The adapter's "not ready" and "not reachable" 503s mean its model never had the request
        (the model just died and the adapter is about to exit, say): safe to send elsewhere, and
        the replica goes back to readiness polling until it recovers or exits. Anything else —
        the 502 for a model that dropped the connection under a request — may come from a request
        that crashed the model; retrying it could crash the next replica too, so it goes back to
        the caller as is."""
        if status == 503 and attempt < ATTEMPTS - 1 and any(marker in data for marker in UNSENT):
            tried.add(replica.id)
            self._unready(replica)
            log.debug("%s: replica %s answered 503 (%s); retrying elsewhere", replica.rev.name, replica.id, data[:200])
            return True
        return False

    def _routed_revision_locked(self, name: str, pinned: Optional[str], draw: float) -> Revision:
        """The revision a request goes to: `pinned`'s, or the one the split draws."""
        if self._closing:
            raise Unavailable("the runtime is shutting down")
        split = self._routes.get(name)
        if split is None:
            checked = self._revisions.get((name, pinned)) if pinned else None
            if checked is not None and checked.checking:
                return checked    # a new model's first version, under its deploy check
            raise NotFound(f"no realtime model named {name!r}")
        version = pinned or split.pick(draw)
        rev = self._revisions.get((name, version))
        if rev is not None and rev.failed and not pinned and version != split.live:
            # a candidate that keeps crashing gives its share back to the live version
            version, rev = split.live, self._revisions.get((name, split.live))
        if rev is None:
            manifest = self._manifest(name, version)   # NotFound, naming the deployed versions
            if manifest.kind != "realtime":
                raise NotFound(f"{name} {version} is a batch version: it takes datasets, not requests")
            rev = self._revision_locked(name, version)
        if pinned and not rev.live:
            rev.called = True
        return rev

    async def _aacquire(self, name: str, tried: set[int], pinned: Optional[str] = None,
                        draw: float = 0.0) -> Replica:
        """A ready replica, holding the request while one starts without blocking the event loop:
        it waits on a future that the revision's `notify` completes, so thousands can wait at
        zero without a thread each."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.start_timeout + 5.0
        for _ in range(100):
            with self._lock:
                rev = self._routed_revision_locked(name, pinned, draw)
                rev.pending += 1
                rev.last_request = time.monotonic()
            taken = None
            try:
                while True:
                    with self._lock:
                        taken = self._take_locked(rev, tried)
                        if taken is not None:
                            return taken
                        fut = loop.create_future()
                        rev.waiters.append(fut)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._not_started(rev)
                    # a timer, not asyncio.wait_for: on 3.11 that can swallow a cancellation that
                    # lands as the future completes, and a stopping server must cancel held requests
                    timer = loop.call_later(remaining, _wake, fut)
                    try:
                        await fut
                    finally:
                        timer.cancel()
            except _Stale:
                continue
            finally:
                if taken is None:
                    with self._lock:
                        rev.pending -= 1
        raise Unavailable(f"{name}: its routing kept changing; try again")

    def _take_locked(self, rev: Revision, tried: set[int]) -> Optional[Replica]:
        """The ready replica with the fewest requests in flight, the caller's request (counted in
        `rev.pending`) moved onto it; None when none is ready (the autoscaler has been asked for
        one). Raises `_Stale` for a retired revision."""
        if rev.retired:
            raise _Stale()
        if rev.failed:
            raise Unavailable(f"{rev.key} failed: {rev.failed}")
        best = None
        for r in rev.replicas:
            if r.state == "ready" and r.id not in tried and (best is None or r.inflight < best.inflight):
                best = r
        if best is not None:
            # Now in flight on `best`, no longer pending: counting it twice made a load of
            # exactly target_concurrency look like one more and start a spurious replica.
            rev.pending -= 1
            best.inflight += 1
            if rev.demand() <= rev.scaling.target_concurrency * sum(1 for r in rev.replicas if r.active):
                return best   # the replicas there are can take it: nothing to scale (the tick does the rest)
        self._scale_out_locked(rev)
        return best

    def _not_started(self, rev: Revision) -> Unavailable:
        return Unavailable(f"{rev.key}: no replica became ready within {self.start_timeout:.0f}s")

    @staticmethod
    async def _agoing_away(replica: Replica, wait: float = 0.5) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if replica.state == "exited" or (replica.proc is not None and replica.proc.poll() is not None):
                return True
            await asyncio.sleep(0.01)
        return False

    def _unready(self, replica: Replica) -> None:
        with self._lock:
            if replica.state == "ready":
                replica.state = "starting"
                self.generation += 1
                replica.started = time.monotonic()   # start_timeout counts from the relapse
                replica.ready_at = None
                self._wake.set()

    def _release(self, replica: Replica) -> None:
        with self._lock:
            replica.inflight -= 1
            replica.rev.last_request = time.monotonic()
            if replica.inflight == 0 and (not replica.rev.kept or replica.rev.retired):
                self._wake.set()   # a draining replica may stop now

    # -- scaling ------------------------------------------------------------------------
    def _revision_locked(self, name: str, version: str) -> Revision:
        rev = Revision(name, version, self._directory(name, version), self._manifest(name, version))
        split = self._routes.get(name)
        rev.live = split is not None and version in split.versions()
        kept = self._failures.get(name)
        if kept and split is not None and split.live == version and kept.get("version") == version:
            rev.failed = kept.get("error")   # it failed before a restart: not restarted until a deploy or rollback
        self._revisions[(name, version)] = rev
        return rev

    def _scale_out_locked(self, rev: Revision) -> None:
        now = time.monotonic()
        if self._closing or rev.failed or now < rev.next_start:
            return
        want = rev.desired(now, rev.demand())
        active = len(rev.active())
        for _ in range(want - active):
            self._start_locked(rev)

    def _tick_loop(self) -> None:
        try:
            while not self._closing:
                self._wake.wait(TICK)
                self._wake.clear()
                if self._closing:
                    return
                try:
                    self._tick()
                    self._spare.ensure()   # from this thread: the spare lives as long as it does
                except Exception:   # the autoscaler must outlive any one bad tick
                    log.exception("autoscaler tick failed")
        finally:
            self._spare.close()

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            per_model: dict[str, int] = {}
            for key, rev in list(self._revisions.items()):
                demand = rev.demand()
                rev.samples.append((now, demand))
                while rev.samples and rev.samples[0][0] < now - rev.window:
                    rev.samples.popleft()
                if rev.crashes and not rev.failed and any(
                        r.state == "ready" and now - r.ready_at >= STABLE_AFTER for r in rev.replicas):
                    rev.crashes = 0
                # Scale-in looks at the peak of the window; a revision that is no longer
                # live only drains, so it looks at what is in flight now.
                peak = max(d for _, d in rev.samples) if rev.kept else demand
                want = rev.desired(now, peak)
                active = rev.active()
                if len(active) > want:
                    for r in _scale_in_victims(active, len(active) - want, demand):
                        self._stop_locked(r)
                elif len(active) < want and not rev.failed and now >= rev.next_start and not self._closing:
                    for _ in range(want - len(active)):
                        self._start_locked(rev)
                per_model[rev.name] = per_model.get(rev.name, 0) + len(rev.ready())
                # Forget a revision with nothing running: one that only drained, one called by its
                # own URL and not since its idle timeout, or a routed one idle past its timeout (a
                # failed routed one stays, so it keeps saying why).
                idle = now - rev.last_request >= rev.idle
                if not rev.replicas and not rev.pending and (
                        not rev.kept or not rev.live and idle or not rev.failed and rev.scaling.min == 0 and idle):
                    rev.retired = True
                    del self._revisions[key]
                    self.generation += 1
            for name in [n for n, (at, _) in self._notes.items() if time.time() - at >= NOTE_SECONDS]:
                del self._notes[name]   # the crash note stops showing as the model's error
                self.generation += 1
            for key in [k for k, (at, _, _) in self._version_notes.items() if time.time() - at >= NOTE_SECONDS]:
                del self._version_notes[key]
            for name, n in per_model.items():
                metrics = self._metrics.get(name)
                if metrics is not None:
                    metrics.observe_replicas(n)

    # -- one replica ----------------------------------------------------------------------
    def _start_locked(self, rev: Revision) -> Replica:
        if not rev.active() and rev.demand():
            metrics = self._metrics.get(rev.name)
            if metrics is not None:
                metrics.cold_start()
        folder = self.logs / rev.name
        folder.mkdir(parents=True, exist_ok=True)
        replica = Replica(rev, free_port(), folder)
        rev.replicas.append(replica)
        self.generation += 1
        replica.thread = threading.Thread(target=self._monitor, args=(replica,),
                                          name=f"modelplane-replica-{replica.id}", daemon=True)
        replica.thread.start()
        log.info("%s: starting replica %s on port %s", rev.key, replica.id, replica.port)
        return replica

    def _stop_locked(self, replica: Replica) -> None:
        if replica.state in ("stopping", "exited"):
            return
        replica.state = "stopping"
        replica.stop_requested = True
        self.generation += 1
        log.info("%s: stopping replica %s", replica.rev.key, replica.id)

    def _monitor(self, replica: Replica) -> None:
        """The life of one replica: spawn, poll readiness, watch, stop on request, report its exit."""
        rev = replica.rev
        argv = self._argv(rev.directory, replica.port)
        try:
            replica.proc = self._spare.take(argv, replica.log_path, replica.log_path)
            if replica.proc is None:
                with open(replica.log_path, "ab") as logf:
                    replica.proc = subprocess.Popen(with_pdeathsig(argv), stdout=logf, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, cwd=self.cwd, env=self._env(),
                                                    start_new_session=True)
        except OSError as e:
            self._exited(replica, None, f"could not be started: {e}")
            return
        self._prune_logs(rev.name)
        proc = replica.proc
        term_at: Optional[float] = None
        tree: list[int] = []
        while True:
            if replica.stop_requested and term_at is None:
                tree = descendants(proc.pid)
                killpg(proc.pid, signal.SIGTERM)
                term_at = time.monotonic()
            if term_at is not None and time.monotonic() - term_at > STOP_GRACE:
                killpg(proc.pid, signal.SIGKILL)
                kill_pids(tree, signal.SIGKILL)
            if replica.state == "starting" and term_at is None:
                if self._ready(replica.port):
                    with self._lock:
                        if replica.state == "starting":
                            replica.state = "ready"
                            self.generation += 1
                            replica.ready_at = time.monotonic()
                            log.info("%s: replica %s ready after %.0f ms", rev.key, replica.id,
                                     (replica.ready_at - replica.started) * 1000)
                        rev.notify()
                    continue
                limit = rev.start_timeout or self.start_timeout
                if time.monotonic() - replica.started > limit:
                    replica.crash_reason = (f"was not ready within {limit:g}s (its /health never answered 200; "
                                            f"{'deploy_check_timeout' if rev.checking else 'start_timeout'})")
                    replica.stop_requested = True
                    continue
                wait = READY_POLL
            else:
                wait = 0.05
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                pass
        # The adapter is gone: anything it left in its group, or that escaped it while we
        # stopped it, goes too.
        killpg(proc.pid, signal.SIGKILL)
        kill_pids(tree, signal.SIGKILL)
        self._exited(replica, proc.returncode, replica.crash_reason)

    def _ready(self, port: int) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/v2/health/ready", headers=self._secret_headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _exited(self, replica: Replica, returncode: Optional[int], reason: Optional[str]) -> None:
        rev = replica.rev
        with self._lock:
            was = replica.state
            replica.state = "exited"
            self.generation += 1
            if replica in rev.replicas:
                rev.replicas.remove(replica)
            crashed = reason is not None or not replica.stop_requested
            if crashed and not rev.retired and not self._closing:
                self._crashed_locked(rev, replica, was, returncode, reason)
            rev.notify()
        self._wake.set()

    def _crashed_locked(self, rev: Revision, replica: Replica, was: str, returncode: Optional[int],
                        reason: Optional[str]) -> None:
        what = reason or (f"exited with status {returncode}"
                          + (" before it was ready" if was == "starting" else ""))
        output = crash_output(tail(replica.log_path, 2000).strip())   # its stderr once, no internal ports
        if rev.checking:
            # under its deploy check: no second chance, and no replica of it is started again
            rev.failed, rev.failed_output = what, output
            log.warning("%s failed its deploy check: %s", rev.key, what)
            for r in rev.replicas:
                self._stop_locked(r)
            return
        rev.crashes += 1
        metrics = self._metrics.get(rev.name)
        if metrics is not None:
            metrics.crash()
        limit = max(1, self.max_restarts)
        head = f"{rev.key}: replica {replica.id} {what}"
        split = self._routes.get(rev.name)
        live = split is not None and split.live == rev.version
        if rev.crashes >= limit:
            rev.failed = (f"{head}; {rev.crashes} crashes in a row, so it is not restarted again "
                          f"(deploy a fix or roll back). Adapter output (tail):\n{output}")
            log.error("%s", rev.failed)
            for r in rev.replicas:
                if r.inflight == 0:
                    self._stop_locked(r)
            if live:
                self._failures[rev.name] = {"version": rev.version, "error": rev.failed}
                self._save_failures_locked()
            else:
                self._version_notes[(rev.name, rev.version)] = (time.time(), rev.failed, True)
        else:
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (rev.crashes - 1))
            rev.next_start = time.monotonic() + delay
            note = (f"{head}; replaced after {delay:.2f}s backoff (crash {rev.crashes} in a row; "
                    f"{limit} mark it failed). Adapter output (tail):\n{output}")
            if live:
                self._notes[rev.name] = (time.time(), note)
            else:   # not the live version: the model still serves; the version says it crashed
                self._version_notes[(rev.name, rev.version)] = (time.time(), note, False)
            log.warning("%s", note)

    # -- crash state kept across restarts ------------------------------------------------
    def _load_failures(self) -> dict[str, dict]:
        if self._failures_path is None:
            return {}
        try:
            data = json.loads(self._failures_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s): no failed model is remembered from before", self._failures_path, e)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): v for k, v in data.items()
                if isinstance(v, dict) and isinstance(v.get("version"), str) and isinstance(v.get("error"), str)}

    def _save_failures_locked(self) -> None:
        if self._failures_path is None:
            return
        tmp = self._failures_path.with_name(self._failures_path.name + ".tmp")
        try:
            self._failures_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._failures, indent=1), encoding="utf-8")
            os.replace(tmp, self._failures_path)
        except OSError as e:
            log.warning("could not record the failed models in %s: %s", self._failures_path, e)

    def _prune_logs(self, name: str) -> None:
        try:
            files = sorted((self.logs / name).glob("*.log"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for old in files[:-LOGS_KEPT]:
            try:
                old.unlink()
            except OSError:
                pass
