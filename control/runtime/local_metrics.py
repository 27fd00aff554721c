"""Per-model request metrics of the local runtime, in memory: counters, latency percentiles, history.

Time is cut into 10-second buckets; the last hour of them is the `history`, and the last
six of them (one minute) are the "recent window" for p50/p95. Each bucket keeps at most
`SAMPLES` latencies (reservoir sampling), so memory stays flat whatever the request rate.
"""
from __future__ import annotations

import random
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Optional

BUCKET_SECONDS = 10
HISTORY_BUCKETS = 360          # one hour
RECENT_BUCKETS = 6             # p50/p95 over the last minute
SAMPLES = 2000                 # latencies kept per bucket


def _percentile(sorted_values: list[float], q: float) -> Optional[float]:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return round(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo), 3)


class _Bucket:
    __slots__ = ("start", "requests", "errors", "cold_starts", "replicas", "latencies", "seen")

    def __init__(self, start: int, replicas: int):
        self.start = start
        self.requests = 0
        self.errors = 0
        self.cold_starts = 0
        self.replicas = replicas
        self.latencies: list[float] = []
        self.seen = 0

    def add_latency(self, ms: float) -> None:
        self.seen += 1
        if len(self.latencies) < SAMPLES:
            self.latencies.append(ms)
        else:
            j = random.randrange(self.seen)
            if j < SAMPLES:
                self.latencies[j] = ms


class ModelMetrics:
    """Thread-safe counters for one model. `errors` counts answers with status >= 500 and
    requests the runtime could not deliver; a 4xx is the caller's mistake, not the model's."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.cold_starts = 0
        self.crashes = 0
        self._replicas = 0
        self._buckets: deque[_Bucket] = deque(maxlen=HISTORY_BUCKETS)

    def _bucket(self) -> _Bucket:
        start = int(self._clock() // BUCKET_SECONDS * BUCKET_SECONDS)
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(_Bucket(start, self._replicas))
        return self._buckets[-1]

    def record(self, ms: float, *, error: bool) -> None:
        with self._lock:
            b = self._bucket()
            self.requests += 1
            b.requests += 1
            if error:
                self.errors += 1
                b.errors += 1
            b.add_latency(ms)

    def cold_start(self) -> None:
        with self._lock:
            self.cold_starts += 1
            self._bucket().cold_starts += 1

    def crash(self) -> None:
        with self._lock:
            self.crashes += 1

    def observe_replicas(self, n: int) -> None:
        """Called by the autoscaler on every tick: a bucket shows the most replicas it saw."""
        with self._lock:
            self._replicas = n
            if n or self._buckets:
                b = self._bucket()
                b.replicas = max(b.replicas, n)

    def snapshot(self, *, replicas: int) -> dict:
        with self._lock:
            now_start = int(self._clock() // BUCKET_SECONDS * BUCKET_SECONDS)
            buckets = {b.start: b for b in self._buckets}
            recent: list[float] = []
            for i in range(RECENT_BUCKETS):
                b = buckets.get(now_start - i * BUCKET_SECONDS)
                if b:
                    recent.extend(b.latencies)
            recent.sort()
            history = []
            if self._buckets:
                first = max(self._buckets[0].start, now_start - (HISTORY_BUCKETS - 1) * BUCKET_SECONDS)
                carry = self._buckets[0].replicas
                for start in range(first, now_start + 1, BUCKET_SECONDS):
                    b = buckets.get(start)
                    lat = sorted(b.latencies) if b else []
                    if b:
                        carry = b.replicas
                    history.append({
                        "t": datetime.fromtimestamp(start, timezone.utc).isoformat().replace("+00:00", "Z"),
                        "requests": b.requests if b else 0,
                        "errors": b.errors if b else 0,
                        "p50_ms": _percentile(lat, 0.5),
                        "p95_ms": _percentile(lat, 0.95),
                        # A gap (no bucket) means nothing happened: the replica count carried on.
                        "replicas": carry,
                        "cold_starts": b.cold_starts if b else 0,
                    })
            return {
                "requests": self.requests,
                "errors": self.errors,
                "p50_ms": _percentile(recent, 0.5),
                "p95_ms": _percentile(recent, 0.95),
                "cold_starts": self.cold_starts,
                "crashes": self.crashes,
                "replicas": replicas,
                "history": history,
            }
