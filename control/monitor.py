"""Score monitoring: each version's recent scores against a reference distribution.

Per (model, version):

- **the reference** — a realtime version's first `monitoring.reference_size` scores, a batch
  version's first job, or what `set_reference` was given (the scores of a dataset the user names);
- **the recent scores** — a realtime version's last `monitoring.window` scores (a rolling
  window), a batch version's latest job (each job's own summary is kept too);
- **drift** — PSI and KS of the recent scores against the reference (control/stats.py), once
  both hold at least `MIN_COUNT` scores; the version is `drifted` when the PSI is above its
  manifest's `monitoring.drift_threshold`.

Observing never slows the models' traffic: the front door only appends a 200 answer
`(name, status, headers, body)` to a bounded queue (when full the answer is dropped and
counted), at most `SAMPLE_RATE` answers a second per model (past that they are left out and
counted: at a model's full throughput the window is a sample of its answers, and parsing
every one would take the CPU the traffic needs), and a background thread parses the scores
out of it — predict's JSON `scores` and
`version`, its CSV with `X-Model-Version`, the Open Inference Protocol's JSON `outputs` and
`model_version` (binary tensor answers are skipped and counted) — and updates the state.

State survives a restart: each version's reference, window and job summaries are written
atomically to `{state_dir}/monitor/{model}/{version}.json` when its reference is complete or
replaced, when a job is observed, every `PERSIST_EVERY` seconds while it changes, and on close.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import orjson

from control import stats
from control.durable import write_json_atomic

log = logging.getLogger(__name__)

#: scores each side needs before drift is reported
MIN_COUNT = 100
#: answers (and their bytes) waiting to be parsed; more are dropped (and counted), never waited for
QUEUE_MAX = 10_000
SAMPLE_RATE = 100   # answers taken per model per second; the rest are counted in `sampled_out`
_clock = time.monotonic   # the sample rate's seconds
QUEUE_MAX_BYTES = 64 * 2**20
#: seconds between writes of a version that keeps changing
PERSIST_EVERY = 30.0
#: seconds between looks at the runtime's finished jobs (and at a model's manifest)
JOBS_EVERY = 10.0
SETTINGS_TTL = 5.0
#: flags are recomputed at most this often while scores arrive (a report always computes afresh)
FLAGS_EVERY = 1.0
#: a reference given to `set_reference` is kept as at most this many of its quantiles
MAX_REFERENCE = 100_000
#: job summaries kept per batch version; job ids remembered per model (not observed twice)
JOBS_KEPT = 20
SEEN_KEPT = 1000
#: `monitoring:` defaults (adapters.manifest.Monitoring), for a version whose manifest is not known yet
DEFAULTS = {"reference_size": 1000, "window": 1000, "drift_threshold": 0.25}


def _finite_numbers(values: Any) -> Optional[list[float]]:
    if not isinstance(values, list):
        return None
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        v = float(v)
        if not math.isfinite(v):
            return None
        out.append(v)
    return out


def parse_scores(headers: dict, body: bytes) -> tuple[Optional[str], Optional[list[float]], bool]:
    """(version, scores, skipped) of a model's 200 answer: predict's JSON or CSV, or the Open
    Inference Protocol's JSON. `skipped` is True for an answer that holds scores this does not
    read (binary tensor data); (None, None, False) for one with no scores (metadata, health)."""
    h = {k.lower(): v for k, v in (headers or {}).items()}
    if "inference-header-content-length" in h:
        return None, None, True
    if not body:
        return None, None, False
    try:
        if body[:1] == b"{":
            doc = orjson.loads(body)
            if not isinstance(doc, dict):
                return None, None, False
            if "scores" in doc:
                return doc.get("version") or h.get("x-model-version"), _finite_numbers(doc["scores"]), False
            outputs = doc.get("outputs")
            if isinstance(outputs, list) and outputs and isinstance(outputs[0], dict):
                data = outputs[0].get("data")
                if data is None:
                    return None, None, True
                return doc.get("model_version") or h.get("x-model-version"), _finite_numbers(data), False
            return None, None, False
        if h.get("content-type", "").startswith("text/csv"):
            lines = body.decode("utf-8").splitlines()[1:]
            return h.get("x-model-version"), [v for v in map(float, filter(None, lines)) if math.isfinite(v)], False
    except (ValueError, UnicodeDecodeError, orjson.JSONDecodeError):
        return None, None, False
    return None, None, False


def _quantile_points(values: list[float], n: int) -> list[float]:
    """`n` evenly spaced order statistics of `values` (a stand-in for a sample too large to keep)."""
    s = sorted(values)
    if len(s) <= n:
        return s
    return [stats.quantile(s, i / (n - 1)) for i in range(n)]  # type: ignore[misc]


def _rounded(d: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


class _Version:
    """One version's monitoring state (guarded by the monitor's lock)."""

    def __init__(self, name: str, version: str, settings: dict, provisional: bool):
        self.name, self.version = name, version
        self.settings = dict(settings)
        self.provisional = provisional     # defaults: its manifest was not known yet
        self.kind = "realtime"
        self.reference: list[float] = []   # the scores (or, batch/large, quantile points standing for them)
        self.reference_count = 0           # how many scores the reference stands for
        self.reference_source = "first scores"
        self.reference_complete = False
        self.reference_histogram: Optional[dict] = None  # batch: the first job's exact histogram
        self.window: deque = deque(maxlen=self.settings["window"])
        self.observed = 0
        self.jobs: deque = deque(maxlen=JOBS_KEPT)      # batch: each job's summary, oldest first
        self.seen_jobs: list[str] = []
        self.changed = True                # since the last flag computation
        self.dirty = False                 # since the last write
        self.written_at = 0.0
        self.drift: dict = {}
        self.drifted = False

    # -- realtime ---------------------------------------------------------------------------
    def add(self, scores: list[float]) -> bool:
        """Take a realtime answer's scores; True when this completed the reference."""
        self.observed += len(scores)
        completed = False
        if not self.reference_complete:
            need = self.settings["reference_size"] - len(self.reference)
            self.reference.extend(scores[:need])
            self.reference_count = len(self.reference)
            scores = scores[need:]
            if len(self.reference) >= self.settings["reference_size"]:
                self.reference_complete = completed = True
        self.window.extend(scores)
        self.changed = self.dirty = True
        return completed

    def apply_settings(self, settings: dict) -> None:
        self.settings, self.provisional = dict(settings), False
        if self.window.maxlen != settings["window"]:
            self.window = deque(self.window, maxlen=settings["window"])
        if not self.reference_complete and self.kind == "realtime" \
                and len(self.reference) >= settings["reference_size"]:
            self.window.extendleft(reversed(self.reference[settings["reference_size"]:]))
            del self.reference[settings["reference_size"]:]
            self.reference_count = len(self.reference)
            self.reference_complete = True
        self.changed = self.dirty = True

    # -- the figures ------------------------------------------------------------------------
    def current(self) -> tuple[list[float], int]:
        """(the recent scores or the points standing for them, how many scores they stand for)."""
        if self.kind == "batch":
            if not self.jobs:
                return [], 0
            latest = self.jobs[-1]
            return latest.get("percentiles") or [], int(latest.get("count") or 0)
        return list(self.window), len(self.window)

    def compute(self) -> None:
        current, count = self.current()
        reason = None
        if not self.reference_complete:
            reason = (f"collecting the reference: {self.reference_count} of "
                      f"{self.settings['reference_size']} scores" if self.kind == "realtime"
                      else "no reference yet: it is the first job's scores unless one is set")
        elif self.reference_count < MIN_COUNT:
            reason = f"the reference holds {self.reference_count} scores; drift needs at least {MIN_COUNT}"
        elif count < MIN_COUNT:
            reason = f"waiting for at least {MIN_COUNT} recent scores (have {count})"
        if reason is None:
            d = stats.drift(self.reference, current)
            self.drift = {"psi": d["psi"], "ks": d["ks"], "reference_count": self.reference_count,
                          "current_count": count}
            self.drifted = d["psi"] is not None and d["psi"] > self.settings["drift_threshold"]
        else:
            self.drift = {"psi": None, "ks": None, "reference_count": self.reference_count,
                          "current_count": count, "reason": reason}
            self.drifted = False
        self.changed = False

    def report(self) -> dict:
        if self.changed:
            self.compute()
        current, count = self.current()
        ref = sorted(self.reference)
        cur = sorted(current)
        edges = stats.display_edges(ref, cur)
        display = {"edges": [round(e, 6) for e in edges],
                   "counts": None}
        ref_hist = dict(display, counts=stats.histogram(ref, lo=edges[0], hi=edges[-1]))
        cur_hist = dict(display, counts=stats.histogram(cur, lo=edges[0], hi=edges[-1]))
        if self.kind == "batch":   # the jobs' exact histograms, not the points standing for them
            if self.reference_histogram:
                ref_hist = self.reference_histogram
            if self.jobs and self.jobs[-1].get("histogram"):
                cur_hist = self.jobs[-1]["histogram"]
        deciles = stats.decile_edges(ref)
        out: dict = {
            "version": self.version,
            "kind": self.kind,
            "reference": {"count": self.reference_count, "source": self.reference_source,
                          "complete": self.reference_complete,
                          "quantiles": _rounded({**stats.quantiles(ref, presorted=True), "count": self.reference_count}),
                          "histogram": ref_hist},
            "recent": {"count": count, "quantiles": _rounded({**stats.quantiles(cur, presorted=True), "count": count}),
                       "histogram": cur_hist,
                       "deciles": {"edges": [round(e, 6) for e in deciles],
                                   "reference": _shares(stats.bin_counts(ref, deciles)),
                                   "recent": _shares(stats.bin_counts(cur, deciles))}},
            "drift": dict(self.drift),
            "threshold": self.settings["drift_threshold"],
            "drifted": self.drifted,
            "observed": self.observed,
            "settings": dict(self.settings),
        }
        if self.kind == "batch":
            out["jobs"] = [{k: j.get(k) for k in ("job", "finished_at", "count", "psi", "ks", "histogram")}
                           for j in reversed(self.jobs)]
            if self.jobs:
                out["recent"]["job"] = self.jobs[-1].get("job")
        return out

    # -- on disk ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "kind": self.kind, "settings": self.settings,
                "provisional": self.provisional, "reference": self.reference,
                "reference_count": self.reference_count, "reference_source": self.reference_source,
                "reference_complete": self.reference_complete, "reference_histogram": self.reference_histogram,
                "window": list(self.window), "observed": self.observed, "jobs": list(self.jobs),
                "seen_jobs": self.seen_jobs[-SEEN_KEPT:]}

    @classmethod
    def from_json(cls, data: dict) -> "_Version":
        settings = {**DEFAULTS, **(data.get("settings") or {})}
        v = cls(str(data["name"]), str(data["version"]), settings, bool(data.get("provisional")))
        v.kind = data.get("kind") or "realtime"
        v.reference = [float(x) for x in data.get("reference") or []]
        v.reference_count = int(data.get("reference_count") or len(v.reference))
        v.reference_source = data.get("reference_source") or "first scores"
        v.reference_complete = bool(data.get("reference_complete"))
        v.reference_histogram = data.get("reference_histogram")
        v.window.extend(float(x) for x in data.get("window") or [])
        v.observed = int(data.get("observed") or 0)
        v.jobs.extend(data.get("jobs") or [])
        v.seen_jobs = list(data.get("seen_jobs") or [])
        return v


def _shares(counts: list[int]) -> list[Optional[float]]:
    total = sum(counts)
    return [round(c / total, 6) if total else None for c in counts]


class ScoreMonitor:
    """Every version's reference, recent scores and drift; see the module's docstring.

    `manifest_of(name, version)` gives a version's manifest as a dict (or None): the monitor reads
    its `monitoring:` settings from it, caching them per version. `runtime`, if given, is
    asked for finished jobs (`jobs(model=…)`, and `job(id)` when a listing has no summary)."""

    def __init__(self, root: Path, *, manifest_of: Callable[[str, str], Optional[dict]] = lambda name, version: None,
                 runtime=None, queue_max: int = QUEUE_MAX, queue_max_bytes: int = QUEUE_MAX_BYTES,
                 start: bool = True):
        self.root = Path(root)
        self.manifest_of = manifest_of
        self.runtime = runtime
        self.queue_max, self.queue_max_bytes = queue_max, queue_max_bytes
        self._bytes_in = 0    # written by the observer only
        self._bytes_out = 0   # written by the drainer only (under its lock): queued = in - out
        self._queue: deque = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._drain_lock = threading.Lock()   # one drainer at a time: scores are taken in arrival order
        self._versions: dict[tuple[str, str], _Version] = {}
        self._settings: dict[tuple[str, str], dict] = {}
        self._looked_up: dict[tuple[str, str], float] = {}
        self._flags: dict[str, list[str]] = {}
        self.generation = 0
        self.dropped = 0       # answers dropped: the queue was full
        self.skipped = 0       # answers with scores this does not read (binary tensors)
        self.observed = 0      # scores taken in
        self.sampled_out = 0   # answers left out: the model answered more than SAMPLE_RATE a second
        self._rates: dict[str, list] = {}   # model -> [second it counts, answers taken in it]
        self._jobs_at = 0.0
        self._flags_at = 0.0
        self._load()
        self._thread: Optional[threading.Thread] = None
        if start:
            self._thread = threading.Thread(target=self._run, name="modelplane-monitor", daemon=True)
            self._thread.start()

    # -- the front door's side: never blocks, never raises ----------------------------------
    def observe(self, name: str, response) -> None:
        """Queue a model's answer (a ProxyResponse) for its scores; a full queue drops it."""
        if response.status != 200 or not response.body:
            return
        now = int(_clock())
        rate = self._rates.get(name)
        if rate is None or rate[0] != now:
            self._rates[name] = rate = [now, 0]
        if rate[1] >= SAMPLE_RATE:
            self.sampled_out += 1
            return
        rate[1] += 1
        size = len(response.body)
        if len(self._queue) >= self.queue_max or self._bytes_in - self._bytes_out + size > self.queue_max_bytes:
            self.dropped += 1
            return
        self._bytes_in += size
        self._queue.append((name, response.status, response.headers, response.body))
        if len(self._queue) >= 256:
            self._wake.set()   # otherwise the thread takes them within its second (and any read drains first)

    # -- the background thread ------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self.drain()
                now = time.monotonic()
                if now - self._flags_at >= FLAGS_EVERY:
                    self._flags_at = now
                    self._refresh_flags()
                if now - self._jobs_at >= JOBS_EVERY:
                    self._jobs_at = now
                    self.sync_jobs()
                self._persist(force=False)
            except Exception:  # noqa: BLE001 — monitoring must never stop for one bad answer
                log.exception("score monitor")
            if self._queue:
                time.sleep(0.05)  # let answers batch up under load rather than wake per answer

    def drain(self) -> int:
        """Parse every queued answer into the state; how many answers were taken."""
        with self._drain_lock:
            return self._drain()

    def _drain(self) -> int:
        taken = 0
        while True:
            try:
                name, _status, headers, body = self._queue.popleft()
            except IndexError:
                return taken
            taken += 1
            self._bytes_out += len(body)
            version, scores, skipped = parse_scores(headers, body)
            if skipped:
                self.skipped += 1
            if not version or not scores:
                continue
            settings, provisional = self._settings_for(name, str(version))
            with self._lock:
                v = self._version(name, str(version), settings, provisional)
                if v.kind != "realtime":
                    continue
                self.observed += len(scores)
                if v.add(scores):
                    self._write(v)

    def _version(self, name: str, version: str, settings: dict, provisional: bool) -> _Version:
        v = self._versions.get((name, version))
        if v is None:
            v = self._versions[(name, version)] = _Version(name, version, settings, provisional)
        elif v.provisional and not provisional:
            v.apply_settings(settings)
        return v

    def _settings_for(self, name: str, version: str) -> tuple[dict, bool]:
        """(the version's monitoring settings, True if they are the defaults standing in)."""
        known = self._settings.get((name, version))
        if known is not None:
            return known, False
        with self._lock:
            v = self._versions.get((name, version))
            if v is not None and not v.provisional:
                return v.settings, False
        now = time.monotonic()
        if now - self._looked_up.get((name, version), -math.inf) >= SETTINGS_TTL:
            self._looked_up[(name, version)] = now
            try:
                manifest = self.manifest_of(name, version) or {}
            except Exception:  # noqa: BLE001 — an unknown or unreadable version: defaults, asked again later
                manifest = {}
            if manifest:
                known = self._settings[(name, version)] = {**DEFAULTS, **(manifest.get("monitoring") or {})}
                return known, False
        return dict(DEFAULTS), True

    def _refresh_flags(self, names: Optional[Iterable[str]] = None) -> None:
        with self._lock:
            versions = [v for (n, _), v in self._versions.items() if names is None or n in names]
        for v in versions:
            if v.provisional:
                settings, provisional = self._settings_for(v.name, v.version)
                if not provisional:
                    with self._lock:
                        v.apply_settings(settings)
        with self._lock:
            for v in versions:
                if v.changed:
                    v.compute()
            flags: dict[str, list[str]] = {}
            for (n, version), v in sorted(self._versions.items()):
                if v.drifted:
                    flags.setdefault(n, []).append(version)
            if flags != self._flags:
                self._flags = flags
                self.generation += 1

    # -- batch --------------------------------------------------------------------------------
    def observe_job(self, name: str, version: str, summary: dict, *, job: str = "",
                    finished_at: Optional[str] = None) -> None:
        """Take a finished batch job's `score_summary`: the version's reference if it has none."""
        if not isinstance(summary, dict) or not summary.get("count"):
            return
        points = _finite_numbers(summary.get("percentiles")) or []
        if not points:
            return
        count = int(summary["count"])
        settings, provisional = self._settings_for(name, version)
        with self._lock:
            v = self._version(name, version, settings, provisional)
            if job and job in v.seen_jobs:
                return
            v.kind = "batch"
            if job:
                v.seen_jobs = (v.seen_jobs + [job])[-SEEN_KEPT:]
            if not v.reference_complete:
                v.reference, v.reference_count = points, count
                v.reference_source = f"job {job}" if job else "first job"
                v.reference_histogram = summary.get("histogram")
                v.reference_complete = True
            d = stats.drift(v.reference, points)
            v.jobs.append({"job": job, "finished_at": finished_at, "count": count, "psi": d["psi"], "ks": d["ks"],
                           "quantiles": summary.get("quantiles") or {}, "histogram": summary.get("histogram") or {},
                           "percentiles": points})
            v.observed += count
            self.observed += count
            v.changed = True
            self._write(v)

    def sync_jobs(self, name: Optional[str] = None) -> None:
        """Observe the runtime's succeeded jobs not seen yet (of one model, or all)."""
        if self.runtime is None:
            return
        try:
            jobs = self.runtime.jobs(model=name, limit=200) if name else self.runtime.jobs(limit=200)
        except Exception:  # noqa: BLE001 — the runtime is unwell: try again later
            log.debug("score monitor: listing jobs failed", exc_info=True)
            return
        with self._lock:
            seen = {j for v in self._versions.values() for j in v.seen_jobs}
        for job in reversed(jobs):   # oldest first: the first job is the reference
            if job.status != "succeeded" or job.id in seen or job.trigger == "compare":
                continue   # a comparison's or a reference's job scores the user's chosen rows, not traffic
            summary = job.score_summary
            if not summary:
                try:
                    summary = self.runtime.job(job.id).score_summary
                except Exception:  # noqa: BLE001
                    summary = {}
            if summary:
                self.observe_job(job.model, job.version, summary, job=job.id, finished_at=job.finished_at)

    # -- a reference the user names -----------------------------------------------------------
    def set_reference(self, name: str, version: str, scores: list[float], source: str = "dataset") -> None:
        """Make `scores` (a dataset's, scored by this version) the version's reference."""
        values = _finite_numbers(list(scores))
        if not values:
            raise ValueError("a reference needs at least one finite score")
        settings, provisional = self._settings_for(name, version)
        with self._lock:
            v = self._version(name, version, settings, provisional)
            v.reference = _quantile_points(values, MAX_REFERENCE)
            v.reference_count = len(values)
            v.reference_source = source
            v.reference_complete = True
            v.reference_histogram = None
            v.changed = True
            self._write(v)
        self._refresh_flags([name])

    # -- what the API shows -----------------------------------------------------------------
    def report(self, name: str, *, batch: Optional[bool] = None) -> dict:
        """`{"versions": {version: {...}}, "drifted": [...]}` for one model, computed now (queued
        answers included; its finished jobs looked up too unless `batch` is False)."""
        self.drain()
        if batch is not False:
            self.sync_jobs(name)
        self._refresh_flags([name])
        with self._lock:
            versions = {version: v.report() for (n, version), v in self._versions.items() if n == name}
        return {"versions": dict(sorted(versions.items())), "drifted": sorted(k for k, v in versions.items()
                                                                               if v["drifted"]),
                "min_count": MIN_COUNT}

    def forget(self, name: str) -> None:
        """A removed model: its versions' state goes, in memory and on disk (a model deployed
        again under the name starts afresh)."""
        self.drain()
        with self._lock:
            for table in (self._versions, self._settings, self._looked_up):
                for key in [k for k in table if k[0] == name]:
                    del table[key]
            self._rates.pop(name, None)
        shutil.rmtree(self.root / name, ignore_errors=True)
        self._refresh_flags()

    def flags(self) -> dict[str, list[str]]:
        """`{model: [drifted versions]}`; `generation` changes whenever this does."""
        with self._lock:
            return {k: list(v) for k, v in self._flags.items()}

    def gauges(self) -> list[dict]:
        """Per version: model, version, psi, ks, drifted, observed (for `/metrics`)."""
        self.drain()
        self._refresh_flags()
        with self._lock:
            return [{"model": n, "version": version, "psi": v.drift.get("psi"), "ks": v.drift.get("ks"),
                     "drifted": v.drifted, "observed": v.observed}
                    for (n, version), v in sorted(self._versions.items())]

    # -- on disk --------------------------------------------------------------------------------
    def _path(self, v: _Version) -> Path:
        return self.root / v.name / f"{v.version}.json"

    def _write(self, v: _Version) -> None:
        try:
            write_json_atomic(self._path(v), v.to_json())
            v.dirty, v.written_at = False, time.monotonic()
        except OSError as e:
            log.error("score monitor: cannot write %s: %s", self._path(v), e)

    def _persist(self, *, force: bool) -> None:
        now = time.monotonic()
        with self._lock:
            for v in self._versions.values():
                if v.dirty and (force or now - v.written_at >= PERSIST_EVERY):
                    self._write(v)

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*/*.json")):
            try:
                v = _Version.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("score monitor: ignoring unreadable %s: %s", path, e)
                continue
            v.written_at = time.monotonic()
            self._versions[(v.name, v.version)] = v
            if not v.provisional:
                self._settings[(v.name, v.version)] = v.settings
        self._refresh_flags()

    def close(self) -> None:
        """Stop the thread; parse what is queued and write every changed version."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            self.drain()
        finally:
            self._persist(force=True)
