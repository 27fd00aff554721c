"""Comparing two versions of a model on the same rows, and scoring a dataset as a version's reference.

A comparison scores one dataset (a CSV in a bucket) with version A and version B — a batch job of
each (trigger "compare", both at once) for a batch model, the realtime endpoint of each version
(`Runtime.forward(version=…)`, in chunks of at most `limits.max_rows` rows) for a realtime one —
and reports what `control.stats.compare` reports: per-row differences, each side's quantiles,
PSI and KS, the rows whose decision flips at a threshold, both distributions on common bins.

A reference job scores a dataset with one version the same way and hands the scores to the score
monitor (`plane.monitor.set_reference`).

The work runs in background threads of the control service (at most `WORKERS` at once, the rest
queued, at most `MAX_QUEUED` waiting). Each record is kept in the plane's state store
(control/state.py) as `comparisons/{id}.json`: a file in the state dir on the local runtime, an
object in the bucket on a cluster, where every replica of the control service reads the same
records — a comparison started on one is listed and fetched on any other.

Who runs a record: the replica that accepted it (its `owner`, control/state.py `replica`). While
a record is queued or running there, its owner rewrites it every `HEARTBEAT_EVERY` seconds
(`heartbeat_at`, wall-clock seconds, and its progress), each time only if nobody else changed it
(compare-and-swap on the store's token). When the store is shared:

- **takeover** — a queued or running record whose heartbeat is older than `STALE_AFTER` seconds
  belongs to a replica that died: another replica takes it over with a compare-and-swap write
  (owner: itself, status queued, `attempts` + 1, the takeover listed in `takeovers`) and runs it
  again from the start. Only one of several replicas trying wins the swap. A record whose owners
  died `MAX_ATTEMPTS` times is marked failed with the reason instead (it may be what kills them).
  Replicas look for stale records when they answer a read (`get` of that record; `list`) and
  every `HEARTBEAT_EVERY` seconds in the heartbeat thread (which lists the records), so a dead
  replica's comparison is resumed within `STALE_AFTER` + `HEARTBEAT_EVERY` seconds even if
  nobody asks.
- **lost ownership** — a replica whose heartbeat write finds the record owned by another (it was
  presumed dead: a long pause) stops working on it and writes nothing more to it.
- **handover** — a replica that stops (`close`) puts its queued and running records back as
  queued with no owner and no heartbeat, so another replica takes them over at once, without
  counting an attempt.

With a state dir (one control service, nothing shared) a record that was queued or running when
the service stopped is marked failed on the next start, saying so.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import queue
import re
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Union

from control import stats
from control.errors import BadRequest, Invalid, NotFound, PlaneError, Unavailable
from control.state import ABSENT, Every, FileState, StateConflict, StateStore

log = logging.getLogger(__name__)

WORKERS = 2
MAX_QUEUED = 20
#: records kept (memory and disk); the oldest finished ones go first
MAX_KEPT = 500
#: rows one comparison may score (each side's scores are held in memory)
MAX_ROWS = 2_000_000
ROUTE_WAIT = 120.0  # seconds a comparison waits for Knative to route a version it pinned
MAX_TOP = 1000
#: a realtime chunk's body stays under this (and under the version's own max_body)
CHUNK_BYTES = 4 * 2**20
DEFAULT_MAX_ROWS = 10_000
#: a batch job that is neither done nor failed after this long is given up on
JOB_WAIT = 24 * 3600.0
#: how often a realtime call answering 503 (a replica starting) is tried
RETRIES = 5
#: seconds between an owner's heartbeats (shared store)
HEARTBEAT_EVERY = 5.0
#: a queued or running record whose heartbeat is older than this is taken over (shared store)
STALE_AFTER = 30.0
#: runs whose replica died before a record is marked failed instead of run again
MAX_ATTEMPTS = 3
ID_PATTERN = r"^cmp-[0-9a-f]{16}$"
_ID = re.compile(ID_PATTERN)
STATUSES = ("queued", "running", "succeeded", "failed")
ACTIVE = ("queued", "running")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ComparisonFailed(Exception):
    """Why a comparison could not finish: a message, plus details merged into its record."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details


class _Lost(Exception):
    """This replica no longer owns the record (another took it over): stop, write nothing."""


class _Handover(Exception):
    """This replica is stopping: the record goes back to the queue for another replica."""


class Comparisons:
    """The comparisons (and reference jobs) of the control service; see the module's docstring.

    `store` is the plane's state store scoped to the comparisons (or a folder: a state dir's
    `comparisons/`)."""

    def __init__(self, plane, store: Union[StateStore, Path], *, workers: int = WORKERS,
                 max_queued: int = MAX_QUEUED, heartbeat_every: Optional[float] = None,
                 stale_after: Optional[float] = None):
        self.plane = plane
        self.store: StateStore = store if isinstance(store, StateStore) else FileState(Path(store))
        self.shared = self.store.shared
        self.replica = self.store.replica
        self.heartbeat_every = HEARTBEAT_EVERY if heartbeat_every is None else heartbeat_every
        self.stale_after = STALE_AFTER if stale_after is None else stale_after
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()   # one write of this replica's records at a time
        self._records: dict[str, dict] = {}   # every record known: this replica's own are the freshest
        self._tokens: dict[str, str] = {}     # record id -> its store token as last read or written
        self._mine: set[str] = set()          # queued or running here
        self._lost: set[str] = set()          # taken over by another replica while running here
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._n_workers = workers
        self._max_queued = max_queued
        self._closed = threading.Event()
        self._keeper: Optional[Every] = None
        self._load()
        if self.shared:
            self._keeper = Every(self.heartbeat_every, self._keep, f"comparisons-{self.replica}").start()

    # -- persistence ----------------------------------------------------------------------------
    def _load(self) -> None:
        self._refresh()
        if self.shared:
            return
        with self._lock:
            stopped = [r for r in self._records.values() if r.get("status") in ACTIVE]
        for record in stopped:   # one service per state dir: whoever ran these has stopped
            was = record.get("status")
            record = dict(record, status="failed", finished_at=utcnow(),
                          error=(f"the control service stopped while this {record.get('kind', 'comparison')} was "
                                 f"{was}; start it again"))
            self._put(record)

    def _refresh(self) -> None:
        """Read what changed in the store since the last look (new, changed and removed records)."""
        try:
            listing = {k[:-len(".json")]: t for k, t in self.store.list("cmp-").items()
                       if k.endswith(".json") and _ID.match(k[:-len(".json")])}
        except PlaneError as e:
            log.warning("comparisons: cannot list the state store: %s", e.message)
            return
        with self._lock:
            for cid in [c for c in self._records if c not in listing and c not in self._mine]:
                self._records.pop(cid, None)
                self._tokens.pop(cid, None)
            changed = [c for c, t in listing.items() if self._tokens.get(c) != t]
        for cid in changed:
            self._fetch(cid)

    def _fetch(self, cid: str) -> Optional[dict]:
        """The record as the store has it (cached), None if there is none or it is unreadable."""
        try:
            got = self.store.get_json(f"{cid}.json")
        except ValueError as e:
            log.warning("comparison record %s is unreadable (%s); ignored", cid, e)
            return None
        except PlaneError as e:
            log.warning("comparisons: cannot read %s: %s", cid, e.message)
            with self._lock:
                return self._records.get(cid)
        if got is None:
            with self._lock:
                if cid not in self._mine:
                    self._records.pop(cid, None)
                    self._tokens.pop(cid, None)
            return None
        record, token = got
        if not isinstance(record, dict) or record.get("id") != cid:
            log.warning("comparison record %s is not a comparison record; ignored", cid)
            return None
        with self._lock:
            if cid in self._mine:
                if record.get("owner") != self.replica:
                    self._lose(cid)   # another replica took it over: it is theirs now
                else:
                    self._tokens[cid] = token
                    return self._records[cid]   # this replica's own copy is the freshest
            self._records[cid] = record
            self._tokens[cid] = token
            return record

    def _put(self, record: dict, *, create: bool = False) -> None:
        """Write a record: create-only, or only if unchanged since this replica last read or wrote
        it (a record that vanished meanwhile, e.g. pruned, is written afresh). StateConflict when
        another replica changed it."""
        cid = record["id"]
        with self._lock:
            expect = ABSENT if create or cid not in self._tokens else self._tokens[cid]
        token = self.store.put_json(f"{cid}.json", record, expect=expect)
        with self._lock:
            self._tokens[cid] = token
            self._records[cid] = record

    def _lose(self, cid: str) -> None:
        """(under the lock) Another replica owns `cid` now."""
        self._mine.discard(cid)
        self._lost.add(cid)
        log.warning("comparison %s was taken over by another replica; this one stops working on it", cid)

    def _prune(self) -> None:
        """Keep the newest MAX_KEPT records (never one that is queued or running)."""
        with self._lock:
            if len(self._records) <= MAX_KEPT:
                return
            done = sorted((r for r in self._records.values() if r["status"] in ("succeeded", "failed")),
                          key=lambda r: (r["created_at"], r["id"]))
            extra = done[:len(self._records) - MAX_KEPT]
            for r in extra:
                self._records.pop(r["id"], None)
                self._tokens.pop(r["id"], None)
        for r in extra:
            try:
                self.store.delete(f"{r['id']}.json")
            except PlaneError:
                pass

    # -- the API's side -------------------------------------------------------------------------
    def get(self, comparison_id: str) -> dict:
        if not _ID.match(comparison_id or ""):
            raise NotFound(f"no comparison {comparison_id!r}")
        if self.shared:
            with self._lock:
                mine = comparison_id in self._mine
            if not mine:
                record = self._fetch(comparison_id)
                if record is not None and self._stale(record):
                    self._take(record)
        with self._lock:
            record = self._records.get(comparison_id)
            if record is None:
                raise NotFound(f"no comparison {comparison_id}")
            return json.loads(json.dumps(record))

    def list(self, *, model: Optional[str] = None, limit: int = 100) -> list[dict]:
        if self.shared:
            self._refresh()
            self._take_stale()
        with self._lock:
            records = [r for r in self._records.values() if model is None or r["model"] == model]
            records.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
            return [_summary(r) for r in records[:limit]]

    def submit(self, name: str, *, a: str, b: str, dataset: str, threshold: Optional[float] = None,
               top: int = 20) -> dict:
        """Check what can be checked now (model, versions, dataset), queue the comparison."""
        if a == b:
            raise BadRequest(f"a and b are both {a}: compare two different versions")
        if threshold is not None and not math.isfinite(threshold):
            raise BadRequest("threshold: expected a finite number")
        if not 0 <= top <= MAX_TOP:
            raise BadRequest(f"top: expected 0 to {MAX_TOP}")
        detail = self._check_versions(name, (a, b))
        size = self._check_dataset(dataset)
        record = self._new("comparison", name, detail.kind, dataset, size,
                           a=a, b=b, threshold=threshold, top=top)
        return self._enqueue(record)

    def submit_reference(self, name: str, version: str, *, dataset: str) -> dict:
        detail = self._check_versions(name, (version,))
        size = self._check_dataset(dataset)
        record = self._new("reference", name, detail.kind, dataset, size, version=version)
        return self._enqueue(record)

    def _new(self, kind: str, name: str, model_kind: str, dataset: str, size: Optional[int], **fields) -> dict:
        return {"id": "cmp-" + uuid.uuid4().hex[:16], "kind": kind, "model": name, "model_kind": model_kind,
                **fields, "dataset": dataset, "dataset_size": size, "status": "queued", "created_at": utcnow(),
                "started_at": None, "finished_at": None, "progress": {"stage": "queued"}, "error": None,
                "owner": self.replica, "heartbeat_at": time.time(), "attempts": 1}

    def _enqueue(self, record: dict) -> dict:
        if self.shared:
            self._refresh()
        with self._lock:
            if self._closed.is_set():
                raise Unavailable("the control service is stopping")
            waiting = sum(1 for r in self._records.values() if r["status"] == "queued")
            if waiting >= self._max_queued:
                raise Unavailable(f"{waiting} comparisons are already waiting to run; try again when they are done")
            self._mine.add(record["id"])
        try:
            with self._write_lock:
                self._put(record, create=True)
        except PlaneError as e:
            with self._lock:
                self._mine.discard(record["id"])
            log.error("could not persist comparison %s: %s", record["id"], e.message)
            raise
        snapshot = json.loads(json.dumps(record))
        self._start_workers()
        self._queue.put(record["id"])
        self._prune()
        return snapshot

    def _check_versions(self, name: str, versions: tuple[str, ...]):
        detail = self.plane.runtime.model(name)   # NotFound for an unknown model
        known = [v.version for v in detail.versions]
        for v in versions:
            if v not in known:
                raise NotFound(f"{name} has no version {v} (deployed: {', '.join(known) or 'none'})")
        if detail.kind not in ("realtime", "batch"):
            raise Invalid(f"{name} is a {detail.kind} model; only realtime and batch models can score a dataset")
        return detail

    def _check_dataset(self, dataset: str) -> Optional[int]:
        """The dataset's size; Invalid when there is no such object, Unavailable when the bucket cannot be read."""
        from control.gcs import split_gs_uri

        try:
            bucket, obj = split_gs_uri(dataset)
        except ValueError as e:
            raise BadRequest(f"dataset: {e}") from None
        if not obj or obj.endswith("/"):
            raise BadRequest(f"dataset: {dataset} names no object")
        try:
            blob = self.plane.storage.bucket(bucket).get_blob(obj)
        except PlaneError:
            raise
        except Exception as e:  # noqa: BLE001 — the client's errors are many; say what failed
            from google.api_core import exceptions as gexc

            if isinstance(e, gexc.NotFound):
                blob = None
            elif isinstance(e, (gexc.BadRequest, ValueError)):
                raise Invalid(f"dataset: {dataset} is not a readable object name ({str(e)[:200]})") from None
            else:
                raise Unavailable(f"cannot read the bucket {bucket}: {type(e).__name__}: {str(e)[:200]}") from None
        if blob is None:
            raise Invalid(f"dataset {dataset} does not exist (upload it first, e.g. with `modelplane compare … FILE`)")
        return blob.size

    # -- takeover (shared store) ---------------------------------------------------------------
    def _stale(self, record: dict) -> bool:
        return (record.get("status") in ACTIVE and record.get("owner") != self.replica
                and time.time() - float(record.get("heartbeat_at") or 0) > self.stale_after)

    def _take_stale(self) -> None:
        if self._closed.is_set():
            return
        with self._lock:
            stale = [dict(r) for r in self._records.values() if r["id"] not in self._mine and self._stale(r)]
        for record in sorted(stale, key=lambda r: (r["created_at"], r["id"])):
            self._take(record)

    def _take(self, record: dict) -> bool:
        """Take over a record whose owner stopped beating: run it again here (or, past
        MAX_ATTEMPTS, mark it failed). False when another replica got there first."""
        if self._closed.is_set():
            return False
        cid, was, owner = record["id"], record.get("status"), record.get("owner")
        attempts = int(record.get("attempts") or 1) + (1 if owner else 0)   # a handover is no failed attempt
        takeovers = list(record.get("takeovers") or [])[-20:]
        takeovers.append({"at": utcnow(), "by": self.replica, "from": owner, "was": was,
                          "stage": (record.get("progress") or {}).get("stage")})
        kind = record.get("kind", "comparison")
        if attempts > MAX_ATTEMPTS:
            new = dict(record, status="failed", finished_at=utcnow(), takeovers=takeovers, owner=None,
                       error=(f"the control service replica running this {kind} stopped {attempts - 1} times "
                              f"(last {owner}, while {was}); it is not run again: start it again if the "
                              f"model and dataset are sound"))
        else:
            new = dict(record, status="queued", owner=self.replica, heartbeat_at=time.time(), attempts=attempts,
                       takeovers=takeovers, started_at=None, finished_at=None, error=None,
                       progress={"stage": "queued",
                                 "resumed": f"taken over from {owner or 'a stopped replica'}, which stopped while "
                                            f"it was {was}; run again from the start"})
        with self._write_lock:
            try:
                self._put(new)
            except StateConflict:
                self._fetch(cid)   # another replica took it (or its owner beat after all)
                return False
            except PlaneError as e:
                log.warning("comparisons: cannot take over %s: %s", cid, e.message)
                return False
        log.warning("comparison %s: %s (owner %s stopped beating while it was %s)",
                    cid, "marked failed" if new["status"] == "failed" else "taken over", owner, was)
        if new["status"] == "queued":
            with self._lock:
                self._mine.add(cid)
                self._lost.discard(cid)
            self._start_workers()
            self._queue.put(cid)
        return True

    def _keep(self) -> None:
        """The heartbeat thread: this replica's records beat; dead replicas' records are taken over."""
        if self._closed.is_set():
            return
        with self._lock:
            mine = sorted(self._mine)
        for cid in mine:
            self._beat(cid)
        self._refresh()
        self._take_stale()

    def _beat(self, cid: str) -> None:
        with self._write_lock:
            with self._lock:
                if cid not in self._mine:
                    return
                record = dict(self._records[cid], heartbeat_at=time.time())
            try:
                self._put(record)
            except StateConflict:
                self._fetch(cid)   # taken over, or its token moved: _fetch tells which
            except PlaneError as e:
                log.warning("comparison %s: heartbeat not written: %s", cid, e.message)

    # -- workers -------------------------------------------------------------------------------
    def _start_workers(self) -> None:
        with self._lock:
            if self._closed.is_set():
                raise Unavailable("the control service is stopping")
            self._workers = [t for t in self._workers if t.is_alive()]
            while len(self._workers) < self._n_workers:
                t = threading.Thread(target=self._work, name=f"comparison-{len(self._workers)}", daemon=True)
                t.start()
                self._workers.append(t)

    def close(self) -> None:
        """Stop taking work. On a shared store this replica's queued records are handed over at
        once (its running ones when their worker notices, within one chunk or job poll)."""
        self._closed.set()
        if self._keeper is not None:
            self._keeper.stop()
        for _ in self._workers:
            self._queue.put(None)
        if self.shared:
            with self._lock:
                waiting = [cid for cid in self._mine if self._records[cid]["status"] == "queued"]
            for cid in waiting:
                self._handover(cid)

    def _handover(self, cid: str) -> None:
        with self._write_lock:
            with self._lock:
                if cid not in self._mine:
                    return
                record = dict(self._records[cid], status="queued", owner=None, heartbeat_at=0, started_at=None,
                              progress={"stage": "queued", "resumed": f"handed over: {self.replica} stopped"})
            try:
                self._put(record)
            except PlaneError as e:   # StateConflict included: it is someone else's already
                log.info("comparison %s not handed over: %s", cid, getattr(e, "message", e))
            finally:
                with self._lock:
                    self._mine.discard(cid)

    def _going_on(self, cid: str, stopped: str) -> None:
        """Raise if this replica must stop working on `cid`: taken over elsewhere, or stopping
        (handed over on a shared store; failed, saying `stopped`, in a state dir)."""
        with self._lock:
            if cid in self._lost:
                raise _Lost()
        if self._closed.is_set():
            if self.shared:
                raise _Handover()
            raise ComparisonFailed(stopped)

    def _work(self) -> None:
        while not self._closed.is_set():
            comparison_id = self._queue.get()
            if comparison_id is None or self._closed.is_set():
                return
            try:
                self._run(comparison_id)
            except Exception:  # noqa: BLE001 — _run records its failures; this is a bug
                log.exception("comparison %s failed unexpectedly", comparison_id)

    def _update(self, comparison_id: str, *, persist: bool = False, **fields) -> None:
        """Change a record this replica runs; `persist` writes it (compare-and-swap): _Lost if
        another replica took it over meanwhile."""
        with self._write_lock:
            with self._lock:
                if comparison_id in self._lost:
                    raise _Lost()
                record = self._records.get(comparison_id)
                if record is None:
                    return
                record = dict(record, **fields)
                if persist and record.get("status") not in ACTIVE:
                    self._mine.discard(comparison_id)
                self._records[comparison_id] = record
            if not persist:
                return
            if self.shared:
                record["heartbeat_at"] = time.time()
            try:
                self._put(record)
            except StateConflict:
                self._fetch(comparison_id)
                with self._lock:
                    lost = comparison_id in self._lost or self._records[comparison_id].get("owner") != self.replica
                    if lost:
                        self._mine.discard(comparison_id)
                if lost:
                    raise _Lost() from None
                self._put(record)   # the same owner: only its token moved (this replica's own beat)
            except PlaneError as e:
                log.error("could not persist comparison %s: %s", comparison_id, e.message)

    def _progress(self, comparison_id: str, **fields) -> None:
        with self._lock:
            record = self._records.get(comparison_id)
            if record is not None and comparison_id in self._mine:
                self._records[comparison_id] = dict(record, progress={**record.get("progress", {}), **fields})

    def _run(self, comparison_id: str) -> None:
        with self._lock:
            if comparison_id not in self._mine:
                return   # handed over or taken over while it waited
            record = dict(self._records[comparison_id])
        try:
            self._update(comparison_id, persist=True, status="running", started_at=utcnow(),
                         progress={**{k: v for k, v in record.get("progress", {}).items() if k == "resumed"},
                                   "stage": "starting"})
            try:
                if record["kind"] == "reference":
                    result = self._run_reference(record)
                else:
                    result = self._run_comparison(record)
            except ComparisonFailed as e:
                log.info("%s %s failed: %s", record["kind"], comparison_id, e.message)
                self._update(comparison_id, persist=True, status="failed", finished_at=utcnow(), error=e.message,
                             **e.details)
                return
            except PlaneError as e:
                self._update(comparison_id, persist=True, status="failed", finished_at=utcnow(), error=e.message,
                             **{k: v for k, v in e.details.items() if k != "error"})
                return
            except (_Lost, _Handover):
                raise
            except Exception as e:  # noqa: BLE001 — a bug or an unexpected client error: say what, keep the trace
                log.exception("%s %s failed", record["kind"], comparison_id)
                self._update(comparison_id, persist=True, status="failed", finished_at=utcnow(),
                             error=f"internal error: {type(e).__name__}: {str(e)[:300]}")
                return
            self._update(comparison_id, persist=True, status="succeeded", finished_at=utcnow(), **result)
        except _Lost:
            log.info("%s %s: another replica runs it now; this run's result is dropped", record["kind"],
                     comparison_id)
        except _Handover:
            self._handover(comparison_id)

    # -- the work ------------------------------------------------------------------------------
    def _run_comparison(self, record: dict) -> dict:
        name, a, b, cid = record["model"], record["a"], record["b"], record["id"]
        self._progress(cid, stage="checking features")
        features = self._feature_difference(name, record["model_kind"], a, b)
        if features:
            raise ComparisonFailed(f"{name} {a} and {b} take different features: {features['summary']}; "
                                   "the same rows cannot be scored by both", features=features)
        if record["model_kind"] == "batch":
            scores = self._score_batch(record, [a, b])
        else:
            with self._routed(record["model"], [a, b]):
                scores = self._score_realtime(record, [a, b])
        sa, sb = scores[a], scores[b]
        if len(sa) != len(sb):
            raise ComparisonFailed(f"{a} scored {len(sa)} rows and {b} scored {len(sb)} rows of the same dataset; "
                                   "their scores cannot be paired row by row")
        self._progress(cid, stage="comparing")
        report = stats.compare(sa, sb, threshold=record.get("threshold"), top=record.get("top", 20), labels=(a, b))
        self._progress(cid, stage="done", rows=len(sa), total=len(sa))
        return {"report": report}

    def _run_reference(self, record: dict) -> dict:
        name, version = record["model"], record["version"]
        monitor = getattr(self.plane, "monitor", None)
        if monitor is None or not hasattr(monitor, "set_reference"):
            raise ComparisonFailed("score monitoring is not available in this control service: "
                                   "no reference can be set")
        if record["model_kind"] == "batch":
            scores = self._score_batch(record, [version])[version]
        else:
            with self._routed(record["model"], [version]):
                scores = self._score_realtime(record, [version])[version]
        if not scores:
            raise ComparisonFailed(f"the dataset {record['dataset']} has no rows: a reference needs scores")
        try:
            monitor.set_reference(name, version, scores, source=record["dataset"])
        except ValueError as e:
            raise ComparisonFailed(f"the score monitor refused the reference: {e}") from None
        self._progress(record["id"], stage="done", rows=len(scores), total=len(scores))
        return {"reference": {"count": len(scores), "quantiles": stats.quantiles(scores)}}

    # features -----------------------------------------------------------------------------------
    def _features(self, name: str, model_kind: str, version: str) -> Optional[list[dict]]:
        """A version's features as its manifest declares them (name, type, required, allowed), or
        None when the runtime cannot describe that version."""
        try:
            manifest = self.plane.runtime.version_manifest(name, version)
        except PlaneError:
            return None
        return [{"name": f.get("name"), "type": f.get("type"), "required": f.get("required", True),
                 "allowed": f.get("allowed")} for f in manifest.get("features") or []] or None

    def _feature_difference(self, name: str, model_kind: str, a: str, b: str) -> Optional[dict]:
        fa, fb = self._features(name, model_kind, a), self._features(name, model_kind, b)
        if fa is None or fb is None:
            return None
        da, db = {f["name"]: f for f in fa}, {f["name"]: f for f in fb}
        only_a = [n for n in da if n not in db]
        only_b = [n for n in db if n not in da]
        changed = [{"feature": n, a: {k: v for k, v in da[n].items() if k != "name"},
                    b: {k: v for k, v in db[n].items() if k != "name"}}
                   for n in da if n in db and da[n] != db[n]]
        if not (only_a or only_b or changed):
            return None
        parts = []
        if only_a:
            parts.append(f"only {a} has {', '.join(only_a)}")
        if only_b:
            parts.append(f"only {b} has {', '.join(only_b)}")
        for c in changed:
            what = [k for k in ("type", "required", "allowed") if c[a].get(k) != c[b].get(k)]
            parts.append(f"{c['feature']} differs in {', '.join(what)} "
                         f"({'; '.join(f'{k} {c[a].get(k)!r} vs {c[b].get(k)!r}' for k in what)})")
        return {"only_in_a": only_a, "only_in_b": only_b, "changed": changed, "summary": "; ".join(parts)}

    # batch -------------------------------------------------------------------------------------
    def _score_batch(self, record: dict, versions: list[str]) -> dict[str, list[float]]:
        runtime, name, cid = self.plane.runtime, record["model"], record["id"]
        jobs = {}
        for v in versions:
            job, _ = runtime.submit_job(name, dataset=record["dataset"], trigger="compare", version=v)
            jobs[v] = job.id
        self._progress(cid, stage="scoring", jobs={v: {"job": j, "status": "queued"} for v, j in jobs.items()})
        deadline = time.monotonic() + JOB_WAIT
        done: dict[str, Any] = {}
        while len(done) < len(jobs):
            self._going_on(cid, "the control service stopped while the jobs ran")
            for v, job_id in jobs.items():
                if v in done:
                    continue
                job = runtime.job(job_id)
                if job.status in ("succeeded", "failed"):
                    done[v] = job
                self._progress(cid, jobs={**self._jobs_progress(cid), v: {"job": job_id, "status": job.status,
                                                                          "rows": job.rows}})
            if len(done) < len(jobs):
                if time.monotonic() > deadline:
                    raise ComparisonFailed(f"the jobs {', '.join(jobs.values())} did not finish within {JOB_WAIT:.0f}s")
                time.sleep(0.25)
        for v in versions:
            job = done[v]
            if job.status == "failed":
                details: dict[str, Any] = {"failed_version": v, "failed_job": job.id}
                if job.problems:
                    details["problems"] = job.problems[:100]
                    first = job.problems[0]
                    raise ComparisonFailed(
                        f"{name} {v} (job {job.id}) refused the dataset: row {first.get('row')}: "
                        f"{first.get('field') or '-'}: {first.get('error')}"
                        + (f" (and {job.invalid_values - 1} more value(s))" if (job.invalid_values or 0) > 1 else ""),
                        **details)
                details["log_tail"] = (job.log_tail or "")[-2000:]
                raise ComparisonFailed(f"{name} {v} failed on the dataset (job {job.id}): {job.error or 'no reason given'}",
                                       **details)
        self._progress(cid, stage="reading scores")
        out = {}
        for v in versions:
            job = done[v]
            scores = self._read_scores(job)
            if job.rows is not None and job.rows != len(scores):
                raise ComparisonFailed(f"job {job.id} of {name} {v} says {job.rows} rows but its scores.csv has "
                                       f"{len(scores)}")
            out[v] = scores
        return out

    def _jobs_progress(self, comparison_id: str) -> dict:
        with self._lock:
            return dict((self._records.get(comparison_id) or {}).get("progress", {}).get("jobs") or {})

    def _read_scores(self, job) -> list[float]:
        from control.gcs import split_gs_uri

        uri = job.results_uri or ""
        location = uri if uri.lower().endswith(".csv") else uri.rstrip("/") + "/scores.csv"
        if not location.startswith("gs://"):
            path = Path(location)
            opener: Callable[[], Any] = lambda: open(path, "r", encoding="utf-8", newline="")  # noqa: E731
        else:
            bucket, obj = split_gs_uri(location)
            spool = tempfile.TemporaryFile()
            try:
                self.plane.storage.bucket(bucket).blob(obj).download_to_file(spool)
            except Exception as e:  # noqa: BLE001
                spool.close()
                raise ComparisonFailed(f"cannot read the scores of job {job.id} at {location}: "
                                       f"{type(e).__name__}: {str(e)[:200]}") from None
            spool.seek(0)
            opener = lambda: io.TextIOWrapper(spool, encoding="utf-8", newline="")  # noqa: E731
        scores: list[float] = []
        with opener() as f:
            reader = csv.reader(f)
            next(reader, None)   # the header
            for i, row in enumerate(reader, start=1):
                if not row:
                    continue
                try:
                    value = float(row[0])
                except ValueError:
                    raise ComparisonFailed(f"job {job.id}: scores.csv row {i} is not a number: {row[0][:50]!r}") from None
                if not math.isfinite(value):
                    raise ComparisonFailed(f"job {job.id}: scores.csv row {i} is not a finite number: {row[0][:50]!r}")
                scores.append(value)
                if len(scores) > MAX_ROWS:
                    raise ComparisonFailed(f"job {job.id} scored more than {MAX_ROWS} rows; a comparison takes at "
                                           f"most {MAX_ROWS}")
        return scores

    # realtime ----------------------------------------------------------------------------------
    def _max_rows(self, name: str, version: str) -> int:
        try:
            limits = self.plane.runtime.version_manifest(name, version).get("limits") or {}
            return int(limits.get("max_rows") or DEFAULT_MAX_ROWS)
        except (PlaneError, TypeError, ValueError):
            return DEFAULT_MAX_ROWS

    @contextlib.contextmanager
    def _routed(self, name: str, versions: list[str]):
        """Each version with a route while the comparison scores through it: on a cluster only the
        live version, a candidate and pinned versions have one (base.Traffic.targets), so the others
        are pinned for the comparison and unpinned after it, and scoring waits until Knative
        reports their route."""
        runtime = self.plane.runtime
        if getattr(runtime, "routes_every_version", True):
            yield
            return
        routed = runtime.traffic(name).routed()
        pinned = []
        try:
            for version in versions:
                if version not in routed:
                    runtime.pin(name, version)
                    pinned.append(version)
            deadline = time.monotonic() + ROUTE_WAIT
            while pinned:
                targets = {t["version"]: t for t in runtime.model(name).traffic.get("targets") or []}
                if all((targets.get(v) or {}).get("url") for v in pinned):
                    break
                if time.monotonic() > deadline:
                    raise ComparisonFailed(f"Knative did not route {', '.join(pinned)} of {name} within "
                                           f"{ROUTE_WAIT:.0f} s of pinning them for this comparison")
                time.sleep(0.5)
            yield
        finally:
            for version in pinned:
                try:
                    runtime.unpin(name, version)
                except Exception as e:  # noqa: BLE001 - the comparison's result stands; the pin is said
                    log.warning("could not unpin %s %s after a comparison: %s", name, version, e)

    def _score_realtime(self, record: dict, versions: list[str]) -> dict[str, list[float]]:
        from control.gcs import split_gs_uri

        name, cid = record["model"], record["id"]
        bucket, obj = split_gs_uri(record["dataset"])
        with tempfile.TemporaryFile() as spool:
            self._progress(cid, stage="downloading the dataset")
            try:
                self.plane.storage.bucket(bucket).blob(obj).download_to_file(spool)
            except Exception as e:  # noqa: BLE001
                raise ComparisonFailed(f"cannot read the dataset {record['dataset']}: {type(e).__name__}: "
                                       f"{str(e)[:200]}") from None
            spool.seek(0)
            text = io.TextIOWrapper(spool, encoding="utf-8-sig", newline="")
            total = _count_rows(text)
            if total > MAX_ROWS:
                raise ComparisonFailed(f"the dataset has {total} rows; a comparison takes at most {MAX_ROWS}")
            text.seek(0)
            reader = csv.reader(text)
            header = next(reader, None)
            if not header:
                raise ComparisonFailed(f"the dataset {record['dataset']} is empty: expected a header row")
            limit = max(1, min(self._max_rows(name, v) for v in versions))
            scores: dict[str, list[float]] = {v: [] for v in versions}
            self._progress(cid, stage="scoring", rows=0, total=total)
            done = 0
            chunk: list[list[str]] = []
            size = 0
            for row in reader:
                if not row:
                    continue   # a blank line is no row
                chunk.append(row)
                size += sum(len(c) for c in row) + len(row)
                if len(chunk) >= limit or size >= CHUNK_BYTES:
                    self._score_chunk(name, versions, header, chunk, done, scores)
                    done += len(chunk)
                    self._progress(cid, rows=done)
                    chunk, size = [], 0
                    self._going_on(cid, "the control service stopped while the rows were being scored")
            if chunk:
                self._score_chunk(name, versions, header, chunk, done, scores)
                done += len(chunk)
                self._progress(cid, rows=done)
            text.detach()
        return scores

    def _score_chunk(self, name: str, versions: list[str], header: list[str], rows: list[list[str]],
                     offset: int, out: dict[str, list[float]]) -> None:
        for v in versions:
            got = self._score_rows(name, v, header, rows, offset)
            if len(got) != len(rows):
                raise ComparisonFailed(f"{name} {v} answered {len(got)} scores for rows {offset + 1}–"
                                       f"{offset + len(rows)} ({len(rows)} rows)")
            out[v].extend(got)

    def _score_rows(self, name: str, version: str, header: list[str], rows: list[list[str]],
                    offset: int) -> list[float]:
        """Scores of `rows` (data rows `offset + 1`… of the dataset) from `version`; a ComparisonFailed
        naming the row and the model's error when the version fails on one."""
        resp = self._call(name, version, "POST", "/predict", _csv_body(header, rows),
                          {"content-type": "text/csv", "accept": "application/json"})
        if resp.status == 200:
            try:
                doc = json.loads(resp.body)
                got = [float(x) for x in doc["scores"]]
            except (ValueError, KeyError, TypeError):
                raise ComparisonFailed(f"{name} {version} answered something that is not "
                                       f'{{"scores": [...]}}: {resp.body[:200]!r}', failed_version=version) from None
            if not all(math.isfinite(x) for x in got):
                raise ComparisonFailed(f"{name} {version} answered a score that is not a finite number for rows "
                                       f"{offset + 1}–{offset + len(rows)}", failed_version=version)
            return got
        error, problems = _error_of(resp)
        if resp.status == 413 and len(rows) > 1:   # too many rows or too large a body: halve the chunk
            half = len(rows) // 2
            return (self._score_rows(name, version, header, rows[:half], offset)
                    + self._score_rows(name, version, header, rows[half:], offset + half))
        if resp.status == 422 and problems:
            # rows are numbered from 1 everywhere: the adapter numbers a request's rows from 1, the
            # report the dataset's, so row r of a chunk that starts after `offset` rows is offset + r
            # (a problem of a whole column, row null, stays so)
            shifted = [{**p, "row": p["row"] + offset} if isinstance(p.get("row"), int) else p
                       for p in problems[:100]]
            first = shifted[0]
            raise ComparisonFailed(f"{name} {version} refused row {first.get('row')}: {first.get('field') or '-'}: "
                                   f"{first.get('error')}", failed_version=version, problems=shifted)
        if resp.status in (502, 500) and len(rows) > 1:
            # the model failed on the chunk: find the first row it fails on (halving, ~2·log2(n) calls)
            half = len(rows) // 2
            first = self._probe(name, version, header, rows[:half], offset)
            if first is None:
                first = self._probe(name, version, header, rows[half:], offset + half)
            if first is not None:
                raise first
        if resp.status in (502, 500) or len(rows) == 1:
            where = f"row {offset + 1}" if len(rows) == 1 else f"rows {offset + 1}–{offset + len(rows)}"
            raise ComparisonFailed(f"{name} {version} failed on {where}: {error}", failed_version=version,
                                   failed_row=offset + 1 if len(rows) == 1 else None, model_error=error)
        raise ComparisonFailed(f"{name} {version} answered {resp.status} for rows {offset + 1}–{offset + len(rows)}: "
                               f"{error}", failed_version=version, model_error=error)

    def _probe(self, name: str, version: str, header: list[str], rows: list[list[str]],
               offset: int) -> Optional[ComparisonFailed]:
        try:
            self._score_rows(name, version, header, rows, offset)
        except ComparisonFailed as e:
            return e
        return None

    def _call(self, name: str, version: str, method: str, path: str, body: bytes, headers: dict):
        """One request to a version's adapter, tried again while it answers 503 (a replica starting)."""
        last = None
        for attempt in range(RETRIES):
            try:
                resp = self.plane.runtime.forward(name, method=method, path=path, headers=headers, body=body,
                                                  version=version)
            except Unavailable as e:
                last = e
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
                continue
            except PlaneError as e:
                raise ComparisonFailed(f"{name} {version}: {e.message}", failed_version=version) from None
            if resp.status != 503:
                return resp
            last = resp
            time.sleep(min(2.0, 0.2 * 2 ** attempt))
        reason = last.message if isinstance(last, PlaneError) else _error_of(last)[0]
        raise ComparisonFailed(f"{name} {version} is unavailable: {reason}", failed_version=version)


def _csv_body(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _count_rows(text) -> int:
    reader = csv.reader(text)
    next(reader, None)
    return sum(1 for _ in reader)


def _error_of(resp) -> tuple[str, list]:
    try:
        doc = json.loads(resp.body)
    except (ValueError, TypeError):
        return (resp.body or b"").decode("utf-8", "replace")[:500] or f"HTTP {resp.status}", []
    if not isinstance(doc, dict):
        return str(doc)[:500], []
    problems = doc.get("problems") if isinstance(doc.get("problems"), list) else []
    return str(doc.get("error") or f"HTTP {resp.status}")[:1000], problems


def _summary(record: dict) -> dict:
    """A record without its report's bulk (what the list shows)."""
    out = {k: v for k, v in record.items() if k not in ("report", "problems", "log_tail")}
    report = record.get("report")
    if report:
        out["summary"] = {"rows": report.get("rows"), "psi": (report.get("drift") or {}).get("psi"),
                          "ks": (report.get("drift") or {}).get("ks"),
                          "flips": (report.get("flips") or {}).get("count")}
    return out
