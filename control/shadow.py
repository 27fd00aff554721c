"""Shadow traffic: a share of the live version's requests also sent to the version under rollout.

The front door calls `mirror` after the live answer is in hand; the copy goes to the candidate
in a task of its own, so the caller's answer never waits for it and never sees it. What the
candidate answered is recorded beside what the live version answered (scores, status, time),
bounded in memory and in a JSON-lines file per model under `{state_dir}/shadow/`, and compared
with the same statistics as `modelplane compare` (control/stats.py).

At most `MAX_INFLIGHT` copies per model are in flight; past that a copy is dropped and counted
rather than queued, so a slow candidate cannot pile work up behind the live traffic.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

import orjson

from control import stats
from control.errors import PlaneError
from control.runtime.base import ProxyResponse

log = logging.getLogger(__name__)

MAX_INFLIGHT = 32          # copies in flight per model; more are dropped and counted
KEEP = 5000                # records kept per model (memory and file)
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

    def __init__(self, runtime, root: Path):
        self.runtime = runtime
        self.root = Path(root)
        self._lock = threading.Lock()
        self._records: dict[str, deque] = {}
        self._inflight: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

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
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        with self._lock:
            records = self._load_locked(name)
            records.append(rec)
            path = self._file(name)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if self._written.get(name, 0) >= 2 * KEEP:   # keep the file bounded: rewrite the last KEEP
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
                    os.replace(tmp, path)
                    self._written[name] = len(records)
                else:
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(line)
                    self._written[name] = self._written.get(name, 0) + 1
            except OSError as e:
                log.warning("shadow records of %s not written: %s", name, e)

    def records(self, name: str) -> list[dict]:
        with self._lock:
            return list(self._load_locked(name))

    def forget(self, name: str) -> None:
        with self._lock:
            self._records.pop(name, None)
            self._written.pop(name, None)
            self.dropped.pop(name, None)
            try:
                self._file(name).unlink()
            except OSError:
                pass

    def _file(self, name: str) -> Path:
        return self.root / f"{name}.jsonl"

    def _load_locked(self, name: str) -> deque:
        records = self._records.get(name)
        if records is None:
            records = deque(maxlen=KEEP)
            path = self._file(name)
            if path.is_file():
                count = 0
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        count += 1
                        try:
                            records.append(json.loads(line))
                        except ValueError:   # a line cut short by a crash: skipped
                            continue
                self._written[name] = count
            self._records[name] = records
        return records

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
