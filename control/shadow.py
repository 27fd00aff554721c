"""Shadow traffic: a share of the live version's requests also sent to the version under rollout.

The front door calls `mirror` after the live answer is in hand; the copy goes to the candidate
in a task of its own, so the caller's answer never waits for it and never sees it. What the
candidate answered is recorded beside what the live version answered (scores, status, time)
and compared with the same statistics as `modelplane compare` (control/stats.py).

The records are kept in the plane's state store (control/state.py: the state dir locally, the
bucket on a cluster), so every replica of the control service reports the same: each replica
writes what it recorded as JSON-lines chunks `{model}/{replica}/{time}.jsonl`, a new chunk at
most every `FLUSH_EVERY` seconds (and on close), never rewriting one; a reader merges every
replica's chunks (cached: a chunk never changes) with what this replica has not written yet,
newest `KEEP` by time. A replica with more than `COMPACT_AT` chunks of a model rewrites them as
one (each record carries an id, `seq`, so a reader that catches both sees each once); chunks
wholly older than the newest `KEEP` records are removed by the next replica that writes one
once there are twice as many records. A state dir's older single file per model
(`{model}.jsonl`) is read as one more chunk.

At most `MAX_INFLIGHT` copies per model are in flight; past that a copy is dropped and counted
rather than queued, so a slow candidate cannot pile work up behind the live traffic.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Optional, Union

import orjson

from control import stats
from control.errors import PlaneError
from control.runtime.base import ProxyResponse
from control.state import Every, FileState, StateStore

log = logging.getLogger(__name__)

MAX_INFLIGHT = 32          # copies in flight per model; more are dropped and counted
KEEP = 5000                # records kept per model (all replicas together)
FLUSH_EVERY = 2.0          # seconds between this replica's chunks of a model
COMPACT_AT = 64            # this replica's chunks of a model before they are rewritten as one
TIMEOUT = 60.0             # a copy still unanswered after this long is recorded as timed out


def scores_of(response: ProxyResponse) -> tuple[Optional[str], Optional[list[float]]]:
    """(version, scores) of a predict answer — JSON `{"version", "scores"}` or CSV with the
    `X-Model-Version` header — or (None, None) for anything else (errors, other routes)."""
    if response.status != 200 or not response.body:
        return None, None
    headers = {k.lower(): v for k, v in (response.headers or {}).items()}
    try:
        if response.body[:1] == b"{":
            doc = orjson.loads(response.body)
            scores = doc.get("scores") if isinstance(doc, dict) else None
            if isinstance(scores, list) and all(isinstance(x, (int, float)) for x in scores):
                return doc.get("version"), [float(x) for x in scores]
            return None, None
        lines = response.body.decode("utf-8").splitlines()
        return headers.get("x-model-version"), [float(x) for x in lines[1:] if x]
    except (ValueError, UnicodeDecodeError):
        return None, None


class ShadowLog:
    """Mirrors and records shadow requests, per model."""

    def __init__(self, runtime, store: Union[StateStore, Path], *, flush_every: float = FLUSH_EVERY):
        self.runtime = runtime
        self.store: StateStore = store if isinstance(store, StateStore) else FileState(Path(store))
        self.replica = self.store.replica
        self.flush_every = flush_every
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()           # one chunk write or read-through at a time
        self._pending: dict[str, list[dict]] = {}  # recorded here, not written yet
        self._chunks: dict[str, dict[str, list[dict]]] = {}   # model -> chunk key -> its records (as read)
        self._flushed_at: dict[str, float] = {}
        self._seq = 0
        self._inflight: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._flusher = Every(flush_every, self.flush, "shadow-records").start()

    # -- the front door's side -------------------------------------------------------------
    def mirror(self, name: str, candidate: str, percent: int, *, method: str, path: str, headers: dict,
               body: bytes, query: str, live: ProxyResponse, live_ms: float) -> bool:
        """Maybe (`percent` %) send a copy of a request the live version answered to `candidate`;
        True if a copy was started. Never raises, never waits."""
        if live.status != 200 or random.random() * 100 >= percent:
            return False
        if b'"version":"' + candidate.encode() + b'"' in live.body[:300]:
            return False   # the candidate answered it itself (a split and a shadow at once)
        with self._lock:
            if self._inflight.get(name, 0) >= MAX_INFLIGHT:
                self.dropped[name] = self.dropped.get(name, 0) + 1
                return False
            self._inflight[name] = self._inflight.get(name, 0) + 1
        task = asyncio.get_running_loop().create_task(
            self._copy(name, candidate, method=method, path=path, headers=headers, body=body, query=query,
                       live=live, live_ms=live_ms))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _copy(self, name: str, candidate: str, *, method: str, path: str, headers: dict, body: bytes,
                    query: str, live: ProxyResponse, live_ms: float) -> None:
        t0 = time.monotonic()
        status, error, answer = None, None, None
        try:
            answer = await asyncio.wait_for(
                self.runtime.aforward(name, method=method, path=path, headers=headers, body=body, query=query,
                                      version=candidate), TIMEOUT)
            status = answer.status
            if status != 200:
                error = answer.body[:300].decode("utf-8", "replace")
        except asyncio.TimeoutError:
            error = f"no answer within {TIMEOUT:.0f}s"
        except PlaneError as e:
            status, error = e.status, e.message[:300]
        except Exception as e:  # noqa: BLE001 — a shadow copy must never take anything down
            error = f"{type(e).__name__}: {str(e)[:300]}"
            log.warning("shadow copy of a %s request to %s failed", name, candidate, exc_info=e)
        finally:
            with self._lock:
                self._inflight[name] -= 1
        live_version, live_scores = scores_of(live)
        _, cand_scores = scores_of(answer) if answer is not None else (None, None)
        rec = {"at": time.time(), "live": live_version, "candidate": candidate, "rid": headers.get("x-request-id"),
               "live_ms": round(live_ms, 3), "candidate_ms": round((time.monotonic() - t0) * 1000, 3),
               "candidate_status": status, "error": error, "live_scores": live_scores, "candidate_scores": cand_scores}
        # the file is written off the event loop, which is serving the live traffic
        await asyncio.get_running_loop().run_in_executor(None, self.record, name, rec)

    async def drain(self) -> None:
        """Wait for the copies in flight (a stopping service, tests)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- records ---------------------------------------------------------------------------
    def record(self, name: str, rec: dict) -> None:
        """Keep one record (written with the next chunk: at once if none was written lately)."""
        with self._lock:
            self._seq += 1
            rec = {**rec, "seq": f"{self.replica}:{time.time_ns()}:{self._seq}"}
            self._pending.setdefault(name, []).append(rec)
            due = time.monotonic() - self._flushed_at.get(name, -1e9) >= self.flush_every
        if due:
            self.flush(name)

    def flush(self, name: Optional[str] = None) -> None:
        """Write what this replica recorded and has not written (of one model, or all) as a chunk each."""
        with self._io_lock:
            with self._lock:
                names = [name] if name is not None else list(self._pending)
                batches = {n: self._pending.pop(n) for n in names if self._pending.get(n)}
                for n in names:
                    self._flushed_at[n] = time.monotonic()
            for n, batch in batches.items():
                if n not in self._chunks:
                    self._read_chunks(n)   # what earlier runs of this replica wrote, for compaction
                if not self._write_chunk(n, batch):
                    with self._lock:   # kept for the next try
                        self._pending[n] = (batch + self._pending.get(n, []))[-KEEP:]
                    continue
                self._compact(n)
                self._trim(n)

    def _write_chunk(self, name: str, batch: list[dict]) -> bool:
        key = f"{name}/{self.replica}/{time.time_ns():020d}.jsonl"
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in batch).encode()
        try:
            self.store.put(key, data)
        except PlaneError as e:
            log.warning("shadow records of %s not written: %s", name, e.message)
            return False
        with self._lock:
            self._chunks.setdefault(name, {})[key] = batch
        return True

    def _compact(self, name: str) -> None:
        """This replica's chunks of `name`, past COMPACT_AT, rewritten as one (its newest KEEP records)."""
        mine = f"{name}/{self.replica}/"
        with self._lock:
            own = {k: v for k, v in (self._chunks.get(name) or {}).items() if k.startswith(mine)}
        if len(own) <= COMPACT_AT:
            return
        records = sorted((r for recs in own.values() for r in recs), key=lambda r: r.get("at") or 0)[-KEEP:]
        if not self._write_chunk(name, records):
            return
        for key in own:
            self._drop(name, key)

    def _trim(self, name: str) -> None:
        """Remove chunks wholly older than the newest KEEP records, once there are 2 × KEEP."""
        with self._lock:
            chunks = dict(self._chunks.get(name) or {})
        if sum(len(c) for c in chunks.values()) < 2 * KEEP:
            return
        newest = sorted(((max((r.get("at") or 0) for r in recs), key, len(recs)) for key, recs in chunks.items()
                         if recs), reverse=True)
        kept = 0
        for _at, key, n in newest:
            if kept >= KEEP:
                self._drop(name, key)
            kept += n

    def _drop(self, name: str, key: str) -> None:
        """Delete one chunk of `name`'s records (kept, to try again later, if the store fails)."""
        try:
            self.store.delete(key)
        except PlaneError:
            return
        with self._lock:
            (self._chunks.get(name) or {}).pop(key, None)

    def records(self, name: str) -> list[dict]:
        """Every replica's records of `name`, oldest first, the newest KEEP."""
        with self._io_lock:
            self._read_chunks(name)
        with self._lock:
            chunks = [r for recs in (self._chunks.get(name) or {}).values() for r in recs]
            chunks.extend(self._pending.get(name) or [])
        seen: set = set()
        merged = []
        for r in chunks:   # a compaction caught half-way shows a record twice: once is enough
            seq = r.get("seq")
            if seq is not None:
                if seq in seen:
                    continue
                seen.add(seq)
            merged.append(r)
        merged.sort(key=lambda r: r.get("at") or 0)
        return merged[-KEEP:]

    def _read_chunks(self, name: str) -> None:
        try:
            listing = self.store.list(f"{name}/")
        except PlaneError as e:
            log.warning("shadow records of %s not read: %s", name, e.message)
            return
        wanted = [k for k in listing if k.endswith(".jsonl")]
        legacy = f"{name}.jsonl"
        with self._lock:
            known = self._chunks.setdefault(name, {})
            for key in [k for k in known if k not in listing and k != legacy]:
                known.pop(key, None)   # removed by a replica that trimmed them
            missing = [k for k in wanted if k not in known]
            check_legacy = legacy not in known
        if check_legacy:
            missing.append(legacy)
        for key in missing:
            try:
                got = self.store.get(key)
            except PlaneError as e:
                log.warning("shadow records %s not read: %s", key, e.message)
                continue
            records = []
            for line in (got[0] if got else b"").decode("utf-8", "replace").splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:   # a line cut short by a crash: skipped
                    continue
            with self._lock:
                self._chunks.setdefault(name, {})[key] = records

    def forget(self, name: str) -> None:
        with self._io_lock:
            with self._lock:
                self._pending.pop(name, None)
                self._chunks.pop(name, None)
                self.dropped.pop(name, None)
            try:
                self.store.delete_prefix(f"{name}/")
                self.store.delete(f"{name}.jsonl")
            except PlaneError as e:
                log.warning("shadow records of %s not removed: %s", name, e.message)

    def close(self) -> None:
        """Write what is not written yet."""
        self._flusher.stop()
        self.flush()

    # -- the comparison ----------------------------------------------------------------------
    def report(self, name: str, *, live: Optional[str], candidate: Optional[str],
               threshold: Optional[float] = None, top: int = 20) -> dict:
        """The shadow records of `candidate` against `live` (the latest pair recorded when not
        given), compared row by row like `modelplane compare`."""
        records = self.records(name)
        if candidate is None and records:
            candidate = records[-1]["candidate"]
        if live is None and records:
            live = next((r["live"] for r in reversed(records) if r["candidate"] == candidate and r["live"]), None)
        mine = [r for r in records if r["candidate"] == candidate and (r["live"] == live or r["live"] is None)]
        a: list[float] = []
        b: list[float] = []
        unpaired = 0
        for r in mine:
            ls, cs = r.get("live_scores"), r.get("candidate_scores")
            if ls is not None and cs is not None and len(ls) == len(cs):
                a.extend(ls)
                b.extend(cs)
            else:
                unpaired += 1
        failed = [r for r in mine if r.get("error")]
        cand_ms = sorted(r["candidate_ms"] for r in mine if r.get("candidate_status") == 200)
        live_ms = sorted(r["live_ms"] for r in mine)
        out = {
            "model": name, "live": live, "candidate": candidate,
            "requests": len(mine), "candidate_errors": len(failed), "unpaired": unpaired,
            "dropped": self.dropped.get(name, 0),
            "errors": [{"rid": r.get("rid"), "status": r.get("candidate_status"), "error": r["error"]}
                       for r in failed[-10:]],
            "latency_ms": {"live_p50": stats.quantile(live_ms, 0.5), "candidate_p50": stats.quantile(cand_ms, 0.5)},
            "comparison": None,
        }
        if a:
            out["comparison"] = stats.compare(a, b, threshold=threshold, top=top, labels=(live or "live", candidate))
        return out
