"""Score monitoring: each version's recent scores against a reference distribution.

Per (model, version):

- **the reference** — it needs `monitoring.reference_size` scores (the stated minimum): a
  realtime version's first that many, a batch version's jobs merged until they hold that many
  (a small first job never becomes the whole reference), or what `set_reference` was given (the
  scores of a dataset the user names); the report says what it holds, needs and came from;
- **the recent scores** — a realtime version's last `monitoring.window` scores (a rolling
  window), a batch version's latest job (each job's own summary is kept too);
- **drift** — PSI and KS of the recent scores against the reference (control/stats.py), once
  both hold at least `MIN_COUNT` scores; the version is `drifted` when the PSI is above its
  manifest's `monitoring.drift_threshold`;
- **input drift** — the same per feature (`inputs`): a realtime version's request rows (the
  front door hands over a predict or v2 infer request's body with its answer, parsed in the monitor's
  thread; rows kept beside the reference's and the window's scores, at most `INPUT_ROWS_MAX`,
  the reference's summarized once complete), a batch version's jobs' `score_summary.inputs`
  (adapters/inputs.py); a number's PSI over the reference's deciles, a category's over its
  value shares.

Observing never slows the models' traffic: the front door only appends a 200 answer
`(name, status, headers, body)` to a bounded queue (when full the answer is dropped and
counted), at most `SAMPLE_RATE` answers a second per model (past that they are left out and
counted: at a model's full throughput the window is a sample of its answers, and parsing
every one would take the CPU the traffic needs; each answer is taken with the chance that took
`SAMPLE_RATE` of the previous second's, so the sample is spread over the whole second), and a
background thread parses the scores out of it — predict's JSON `scores` and
`version`, its CSV with `X-Model-Version`, the Open Inference Protocol's JSON `outputs` and
`model_version` (binary tensor answers are skipped and counted) — and updates the state.

State lives in the plane's state store (control/state.py: the state dir on the local runtime,
the bucket on a cluster), so it survives a restart and every replica of the control service
sees the same:

- `{model}/{version}.json` — what the replicas share: the reference, the kind, a batch
  version's job summaries. Written with compare-and-swap (read, change, write only if nobody
  wrote meanwhile, else again) when a reference is complete or replaced and when a job is
  observed; a realtime reference is the first replica's to complete, and the others adopt it.
  So the drift baseline is the same on every replica.
- `{model}/{version}/windows/{replica}.json` — one replica's share of the rolling window (its
  scores, each with the time it was taken, and how many it observed), written by that replica
  alone every `PERSIST_EVERY` seconds while it changes (`SHARED_PERSIST_EVERY` on a shared
  store) and on close. A reader merges every replica's shard: the window is the newest
  `monitoring.window` scores of them all, as if one replica had seen all the traffic, and a
  stopped replica's scores age out of it as newer ones arrive (its shard is removed once it
  has not been written for `SHARD_TTL` seconds and holds none of the window).

On a shared store each replica reads the others' changes every `SHARED_PERSIST_EVERY` seconds
and before every report.
"""
from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import orjson

from adapters import inputs as feature_inputs
from control import stats
from control.errors import PlaneError
from control.state import ABSENT, FileState, StateConflict, StateStore

log = logging.getLogger(__name__)

#: scores each side needs before drift is reported
MIN_COUNT = 100
#: answers (and their bytes) waiting to be parsed; more are dropped (and counted), never waited for
QUEUE_MAX = 10_000
SAMPLE_RATE = 100   # answers taken per model per second; the rest are counted in `sampled_out`
SAMPLE_SEED = 21
_clock = time.monotonic   # the sample rate's seconds
QUEUE_MAX_BYTES = 64 * 2**20
#: seconds between writes of a version that keeps changing (state dir)
PERSIST_EVERY = 30.0
#: seconds between writes of this replica's windows, and reads of the others', on a shared store
SHARED_PERSIST_EVERY = 5.0
#: a replica's window shard not written for this long, holding none of the window, is removed
SHARD_TTL = 3600.0
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
#: a predict request's body is kept (for its rows' input drift) only up to this size; larger ones
#: are scored and their scores observed, their rows left out (and counted in `inputs_skipped`)
MAX_REQUEST_BYTES = 1 << 20
#: rows kept for input drift: a realtime reference's first rows, and each replica's window of rows
#: (the last min(monitoring.window, this)); a complete reference keeps only their summary
INPUT_ROWS_MAX = 2000
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
            lines = body.decode("utf-8").splitlines()[1:]   # the score is the last column
            values = [float(line.rsplit(",", 1)[-1].strip().strip('"')) for line in lines if line]
            return h.get("x-model-version"), [v for v in values if math.isfinite(v)], False
    except (ValueError, UnicodeDecodeError, orjson.JSONDecodeError):
        return None, None, False
    return None, None, False


def parse_rows(content_type: str, body: bytes, kinds: dict[str, str]) -> Optional[list[dict]]:
    """The feature values of a request's rows (predict's JSON `{"rows": [...]}` or CSV with a
    header, the Open Inference Protocol's JSON `inputs`, one per feature), each through
    adapters/inputs.py `value_of`; None for a body this does not read."""
    if not body or not kinds:
        return None
    try:
        if body[:1] == b"{" or (content_type or "").startswith("application/json"):
            doc = orjson.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
                raw = _v2_rows(doc["inputs"])
            else:
                raw = doc.get("rows") if isinstance(doc, dict) else None
            if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
                return None
        elif (content_type or "").startswith("text/csv"):
            import csv
            import io
            raw = [r for r in csv.DictReader(io.StringIO(body.decode("utf-8-sig"))) if any(r.values())]
        else:
            return None
    except (ValueError, UnicodeDecodeError, orjson.JSONDecodeError):
        return None
    value_of = feature_inputs.value_of
    return [{f: value_of(kind, r.get(f)) for f, kind in kinds.items()} for r in raw]


def _v2_rows(inputs: list) -> Optional[list[dict]]:
    """Rows from v2 JSON inputs (one per feature, shape [n] or [n, 1]); None if they do not line up."""
    columns: dict[str, list] = {}
    for inp in inputs:
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not isinstance(inp.get("data"), list):
            return None
        data = [d[0] if isinstance(d, list) and len(d) == 1 else d for d in inp["data"]]
        if columns and len(data) != len(next(iter(columns.values()))):
            return None
        columns[inp["name"]] = data
    n = len(next(iter(columns.values()))) if columns else 0
    return [{name: data[i] for name, data in columns.items()} for i in range(n)]


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
        self.times: deque = deque(maxlen=self.settings["window"])   # when each window score was taken
        self.observed = 0                  # realtime scores this replica observed
        self.batch_observed = 0            # scores of the batch jobs observed (shared)
        self.retired_observed = 0          # what removed replicas' shards had observed (shared)
        self.others: dict[str, dict] = {}  # other replicas' window shards: replica -> {"window", "times", "observed"}
        self.shared_token: Optional[str] = None   # the shared record's store token, as last read or written
        self.shard_tokens: dict[str, str] = {}    # replica -> its shard's token, as last read
        self.jobs: deque = deque(maxlen=JOBS_KEPT)      # batch: each job's summary, oldest first
        self.seen_jobs: list[str] = []
        self.changed = True                # since the last flag computation
        self.dirty = False                 # since the last write
        self.written_at = 0.0
        self.drift: dict = {}
        self.drifted = False
        # input drift: per feature, beside the scores'
        self.kinds: dict[str, str] = {}             # feature -> "number" | "category" (adapters/inputs.py)
        self.reference_jobs: list[str] = []         # batch: the jobs the reference was filled from
        self.in_reference: list[dict] = []          # realtime: the rows of the reference's answers, collecting
        self.in_reference_summary: dict = {}        # {feature: summary}: a complete realtime reference's
                                                    # rows summarized, or a batch one's jobs' merged
        self.in_window: deque = deque(maxlen=min(self.settings["window"], INPUT_ROWS_MAX))   # recent rows
        self.in_times: deque = deque(maxlen=min(self.settings["window"], INPUT_ROWS_MAX))
        self.inputs: dict = {}                      # what compute() found, per feature

    # -- realtime ---------------------------------------------------------------------------
    def add(self, scores: list[float], rows: Optional[list[dict]] = None) -> bool:
        """Take a realtime answer's scores (and its request's rows, if read); True when this
        completed the reference."""
        self.observed += len(scores)
        if rows is not None and len(rows) != len(scores):
            rows = None
        completed = False
        if not self.reference_complete:
            need = self.settings["reference_size"] - len(self.reference)
            self.reference.extend(scores[:need])
            self.reference_count = len(self.reference)
            scores = scores[need:]
            if rows is not None:
                self.in_reference.extend(rows[:max(0, min(need, INPUT_ROWS_MAX - len(self.in_reference)))])
                rows = rows[need:]
            if len(self.reference) >= self.settings["reference_size"]:
                self.reference_complete = completed = True
                self.seal_inputs()
        now = time.time()
        self.window.extend(scores)
        self.times.extend([now] * len(scores))
        if rows:
            self.in_window.extend(rows)
            self.in_times.extend([now] * len(rows))
        self.changed = self.dirty = True
        return completed

    def seal_inputs(self) -> None:
        """A realtime reference just completed: its rows are kept as their summary only."""
        if self.kind == "realtime" and self.in_reference and self.kinds:
            self.in_reference_summary = feature_inputs.summarize_rows(self.kinds, self.in_reference)
            self.in_reference = []

    def apply_settings(self, settings: dict) -> None:
        self.settings, self.provisional = dict(settings), False
        if self.window.maxlen != settings["window"]:
            self.window = deque(self.window, maxlen=settings["window"])
            self.times = deque(self.times, maxlen=settings["window"])
            self.in_window = deque(self.in_window, maxlen=min(settings["window"], INPUT_ROWS_MAX))
            self.in_times = deque(self.in_times, maxlen=min(settings["window"], INPUT_ROWS_MAX))
        if not self.reference_complete and self.kind == "realtime" \
                and len(self.reference) >= settings["reference_size"]:
            extra = self.reference[settings["reference_size"]:]
            self.window.extendleft(reversed(extra))
            first = self.times[0] if self.times else time.time()
            self.times.extendleft([first] * len(extra))
            del self.reference[settings["reference_size"]:]
            extra_rows = self.in_reference[settings["reference_size"]:]
            self.in_window.extendleft(reversed(extra_rows))
            self.in_times.extendleft([first] * len(extra_rows))
            del self.in_reference[settings["reference_size"]:]
            self.reference_count = len(self.reference)
            self.reference_complete = True
            self.seal_inputs()
        self.changed = self.dirty = True

    # -- the figures ------------------------------------------------------------------------
    def current(self) -> tuple[list[float], int]:
        """(the recent scores or the points standing for them, how many scores they stand for)."""
        if self.kind == "batch":
            if not self.jobs:
                return [], 0
            latest = self.jobs[-1]
            return latest.get("percentiles") or [], int(latest.get("count") or 0)
        if not any(o["window"] for o in self.others.values()):
            return list(self.window), len(self.window)
        merged = self.merged()
        return [score for _, score in merged], len(merged)

    def merged(self) -> list[tuple[float, float]]:
        """(time, score) of the newest `window` scores of every replica's window, oldest first."""
        pairs = list(zip(self.times, self.window))
        for other in self.others.values():
            pairs.extend(zip(other["times"], other["window"]))
        pairs.sort(key=lambda p: p[0])
        return pairs[-self.settings["window"]:]

    def total_observed(self) -> int:
        return (self.observed + self.batch_observed + self.retired_observed
                + sum(int(o.get("observed") or 0) for o in self.others.values()))

    def merged_rows(self) -> list[dict]:
        """The newest `window` rows of every replica's window of rows, oldest first."""
        pairs = list(zip(self.in_times, self.in_window))
        if not any(o.get("in_window") for o in self.others.values()):
            return [row for _, row in pairs]
        for other in self.others.values():
            pairs.extend(zip(other.get("in_times") or [], other.get("in_window") or []))
        pairs.sort(key=lambda p: p[0])
        return [row for _, row in pairs[-self.settings["window"]:]]

    def input_summaries(self) -> tuple[dict, dict]:
        """({feature: summary} of the reference's inputs, of the recent ones)."""
        if self.kind == "batch":
            latest = (self.jobs[-1].get("inputs") or {}) if self.jobs else {}
            return self.in_reference_summary, (latest.get("features") or {})
        return self.in_reference_summary, feature_inputs.summarize_rows(self.kinds, self.merged_rows())

    def compute_inputs(self) -> None:
        """Per feature: PSI of the recent inputs against the reference's, and whether it drifted."""
        if not self.reference_complete:
            self.inputs = {"features": {}, "drifted": [], "reason": "collecting the reference"}
            return
        reference, recent = self.input_summaries()
        features: dict = {}
        for name in list(self.kinds) or list(reference):
            ref, cur = reference.get(name), recent.get(name)
            if not ref or not cur:
                continue
            fd = stats.feature_drift(ref, cur)
            low = min(fd["reference"]["count"], fd["recent"]["count"])
            if low < MIN_COUNT:
                fd["reason"] = f"drift needs at least {MIN_COUNT} values on each side (have {low})"
                fd["psi"], fd["drifted"] = None, False
            else:
                fd["drifted"] = fd["psi"] is not None and fd["psi"] > self.settings["drift_threshold"]
            features[name] = fd
        self.inputs = {"features": features, "drifted": sorted(n for n, f in features.items() if f["drifted"])}
        if not features:
            self.inputs["reason"] = "no inputs observed yet (predict requests' rows, or batch jobs' datasets)"

    def compute(self) -> None:
        current, count = self.current()
        reason = None
        size = self.settings["reference_size"]
        if not self.reference_complete:
            reason = (f"collecting the reference: {self.reference_count} of {size} scores "
                      + ("(this version's first scores)" if self.kind == "realtime"
                         else "(filled from this version's jobs until it holds that many)")
                      + "; or set one from a dataset")
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
        self.compute_inputs()
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
                          "needed": self.settings["reference_size"],
                          "missing": 0 if self.reference_complete else max(
                              0, self.settings["reference_size"] - self.reference_count),
                          "jobs": list(self.reference_jobs),
                          "quantiles": _rounded({**stats.quantiles(ref, presorted=True), "count": self.reference_count}),
                          "histogram": ref_hist},
            "recent": {"count": count, "quantiles": _rounded({**stats.quantiles(cur, presorted=True), "count": count}),
                       "histogram": cur_hist,
                       "deciles": {"edges": [round(e, 6) for e in deciles],
                                   "reference": _shares(stats.bin_counts(ref, deciles)),
                                   "recent": _shares(stats.bin_counts(cur, deciles))}},
            "drift": dict(self.drift),
            "inputs": dict(self.inputs),
            "threshold": self.settings["drift_threshold"],
            "drifted": self.drifted,
            "observed": self.total_observed(),
            "settings": dict(self.settings),
        }
        if self.kind == "batch":
            out["jobs"] = [{k: j.get(k) for k in ("job", "finished_at", "count", "psi", "ks", "histogram")}
                           for j in reversed(self.jobs)]
            if self.jobs:
                out["recent"]["job"] = self.jobs[-1].get("job")
        return out

    # -- in the store -------------------------------------------------------------------------
    def shared_json(self) -> dict:
        """What every replica shares: the reference, the kind, the batch jobs."""
        out = {"name": self.name, "version": self.version, "kind": self.kind, "settings": self.settings,
               "provisional": self.provisional, "reference_complete": self.reference_complete,
               "jobs": list(self.jobs), "seen_jobs": self.seen_jobs[-SEEN_KEPT:],
               "observed": self.batch_observed, "retired_observed": self.retired_observed,
               "kinds": self.kinds}
        if self.reference_complete or self.kind == "batch":   # a batch reference fills from jobs: shared as it fills
            out.update(reference=self.reference, reference_count=self.reference_count,
                       reference_source=self.reference_source, reference_histogram=self.reference_histogram,
                       reference_jobs=self.reference_jobs, in_reference_summary=self.in_reference_summary)
        return out

    def shard_json(self, replica: str) -> dict:
        """This replica's own part: its window (with times), its count, a reference it is collecting."""
        return {"name": self.name, "version": self.version, "replica": replica, "kind": self.kind,
                "settings": self.settings, "provisional": self.provisional, "written_at": time.time(),
                "window": list(self.window), "times": [round(t, 3) for t in self.times], "observed": self.observed,
                "collecting": [] if self.reference_complete else self.reference,
                "in_window": list(self.in_window), "in_times": [round(t, 3) for t in self.in_times],
                "in_collecting": [] if self.reference_complete else self.in_reference, "kinds": self.kinds}

    def adopt_shared(self, data: dict) -> None:
        """Take what the replicas share from the store (a reference this replica is still
        collecting stays unless the shared one is complete)."""
        self.kind = data.get("kind") or self.kind
        if isinstance(data.get("kinds"), dict) and data["kinds"]:
            self.kinds = {str(k): str(v) for k, v in data["kinds"].items()}
        if data.get("reference_complete") or (self.kind == "batch" and data.get("reference")):
            self.reference = [float(x) for x in data.get("reference") or []]
            self.reference_count = int(data.get("reference_count") or len(self.reference))
            self.reference_source = data.get("reference_source") or "first scores"
            self.reference_histogram = data.get("reference_histogram")
            self.reference_complete = bool(data.get("reference_complete"))
            self.reference_jobs = list(data.get("reference_jobs") or [])
            self.in_reference_summary = dict(data.get("in_reference_summary") or {})
            if self.reference_complete:
                self.in_reference = []
        self.jobs = deque(data.get("jobs") or [], maxlen=JOBS_KEPT)
        self.seen_jobs = list(data.get("seen_jobs") or [])
        self.batch_observed = int(data.get("observed") or 0) if self.kind == "batch" else 0
        self.retired_observed = int(data.get("retired_observed") or 0)
        self.changed = True

    def adopt_own(self, data: dict) -> None:
        """This replica's shard as it was written before a restart (a state dir's one replica)."""
        window = [float(x) for x in data.get("window") or []]
        times = [float(t) for t in data.get("times") or []]
        if len(times) != len(window):
            times = [float(data.get("written_at") or time.time())] * len(window)
        self.window.extend(window)
        self.times.extend(times)
        self.observed = int(data.get("observed") or 0)
        if not self.reference_complete and data.get("collecting"):
            self.reference = [float(x) for x in data["collecting"]]
            self.reference_count = len(self.reference)
        rows = [r for r in data.get("in_window") or [] if isinstance(r, dict)]
        row_times = [float(t) for t in data.get("in_times") or []]
        if len(row_times) == len(rows):
            self.in_window.extend(rows)
            self.in_times.extend(row_times)
        if not self.reference_complete and data.get("in_collecting"):
            self.in_reference = [r for r in data["in_collecting"] if isinstance(r, dict)][:INPUT_ROWS_MAX]
        self.changed = True

    def adopt_other(self, replica: str, data: dict) -> None:
        window = [float(x) for x in data.get("window") or []]
        times = [float(t) for t in data.get("times") or []]
        if len(times) != len(window):
            times = [float(data.get("written_at") or 0)] * len(window)
        rows = [r for r in data.get("in_window") or [] if isinstance(r, dict)]
        row_times = [float(t) for t in data.get("in_times") or []]
        if len(row_times) != len(rows):
            rows, row_times = [], []
        self.others[replica] = {"window": window, "times": times, "observed": int(data.get("observed") or 0),
                                "written_at": float(data.get("written_at") or 0),
                                "in_window": rows, "in_times": row_times}
        self.changed = True

    @classmethod
    def from_json(cls, data: dict) -> "_Version":
        """A version from its shared record (or from a shard, when only a shard is known)."""
        settings = {**DEFAULTS, **(data.get("settings") or {})}
        v = cls(str(data["name"]), str(data["version"]), settings, bool(data.get("provisional")))
        v.adopt_shared(data)
        return v


def _merge_feature(a: Optional[dict], b: dict, wa: int, wb: int) -> dict:
    """Two summaries of one feature's inputs (adapters/inputs.py) as one, weighted by the rows
    they stand for (`wa`, `wb`: a summary is of a sample of its job's rows)."""
    if not a or a.get("type") != b.get("type"):
        return dict(b)
    na, nb = int(a.get("count") or 0), int(b.get("count") or 0)
    out = {"type": a["type"], "count": na + nb, "missing": int(a.get("missing") or 0) + int(b.get("missing") or 0)}
    if a["type"] == "number":
        out["percentiles"] = [round(x, 9) for x in stats.merge_points(
            [(a.get("percentiles") or [], wa if na else 0), (b.get("percentiles") or [], wb if nb else 0)])]
    else:
        counts: dict[str, float] = {}
        for summary, n in ((a, wa if na else 0), (b, wb if nb else 0)):
            for k, share in (summary.get("shares") or {}).items():
                counts[k] = counts.get(k, 0.0) + float(share) * n
        total = math.fsum(counts.values())
        out["shares"] = {k: round(c / total, 6) for k, c in counts.items()} if total else {}
    return out


def _fill_reference(v: "_Version", points: list[float], count: int, histogram: Optional[dict],
                    features: dict, job: str) -> None:
    """A batch version's reference takes one more job: its scores and inputs merged in (weighted
    by their counts); complete once it holds `monitoring.reference_size` scores."""
    if v.reference_count == 0:
        v.reference, v.reference_histogram = list(points), histogram
        v.in_reference_summary = {f: dict(s) for f, s in features.items() if isinstance(s, dict)}
    else:
        v.reference = stats.merge_points([(v.reference, v.reference_count), (points, count)])
        v.reference_histogram = None   # the merged points are charted instead
        for f, s in features.items():
            if isinstance(s, dict):
                v.in_reference_summary[f] = _merge_feature(v.in_reference_summary.get(f), s, v.reference_count, count)
    v.reference_count += count
    name = job or "a job"
    v.reference_jobs = (v.reference_jobs + [name])[-JOBS_KEPT:]
    shown = ", ".join(v.reference_jobs[:3]) + (f" and {len(v.reference_jobs) - 3} more"
                                               if len(v.reference_jobs) > 3 else "")
    v.reference_source = f"job {shown}" if len(v.reference_jobs) == 1 else f"jobs {shown}"
    if v.reference_count >= v.settings["reference_size"]:
        v.reference_complete = True
    v.changed = True


def _shares(counts: list[int]) -> list[Optional[float]]:
    total = sum(counts)
    return [round(c / total, 6) if total else None for c in counts]


class ScoreMonitor:
    """Every version's reference, recent scores and drift; see the module's docstring.

    `manifest_of(name, version)` gives a version's manifest as a dict (or None): the monitor reads
    its `monitoring:` settings from it, caching them per version. `runtime`, if given, is
    asked for finished jobs (`jobs(model=…)`, and `job(id)` when a listing has no summary)."""

    def __init__(self, store: Union[StateStore, Path], *,
                 manifest_of: Callable[[str, str], Optional[dict]] = lambda name, version: None,
                 runtime=None, queue_max: int = QUEUE_MAX, queue_max_bytes: int = QUEUE_MAX_BYTES,
                 start: bool = True, persist_every: Optional[float] = None):
        self.store: StateStore = store if isinstance(store, StateStore) else FileState(Path(store))
        self.shared = self.store.shared
        self.replica = self.store.replica
        self.persist_every = (persist_every if persist_every is not None
                              else SHARED_PERSIST_EVERY if self.shared else PERSIST_EVERY)
        self._synced_at = time.monotonic()
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
        self.inputs_skipped = 0   # requests whose rows were not read (over MAX_REQUEST_BYTES, or unreadable)
        self._kinds: dict[tuple[str, str], dict[str, str]] = {}   # a version's features, from its manifest
        self._kinds_looked_up: dict[tuple[str, str], float] = {}
        self._model_kind: dict[tuple[str, str], Optional[str]] = {}   # the manifest's kind: realtime | batch
        # model -> [second it counts, answers taken in it, answers seen in it, the chance each is taken]
        self._rates: dict[str, list] = {}
        self._sample_rng = random.Random(SAMPLE_SEED)
        self._jobs_at = 0.0
        self._flags_at = 0.0
        self._load()
        self._thread: Optional[threading.Thread] = None
        if start:
            self._thread = threading.Thread(target=self._run, name="modelplane-monitor", daemon=True)
            self._thread.start()

    # -- the front door's side: never blocks, never raises ----------------------------------
    def observe(self, name: str, response, request: Optional[tuple[str, bytes]] = None) -> None:
        """Queue a model's answer (a ProxyResponse) for its scores, and a predict request's
        `(content type, body)` for its rows' input drift (parsed in the monitor's thread, not
        here; a body over MAX_REQUEST_BYTES is left out); a full queue drops them."""
        if response.status != 200 or not response.body:
            return
        now = int(_clock())
        rate = self._rates.get(name)
        if rate is None or rate[0] != now:
            # each answer is taken with the chance that takes SAMPLE_RATE of the last second's: a
            # uniform sample of the second, not its first answers (traffic sent in a repeating
            # order would otherwise be seen by its first part only)
            chance = 1.0 if rate is None or rate[0] != now - 1 else min(1.0, SAMPLE_RATE / max(rate[2], 1))
            self._rates[name] = rate = [now, 0, 0, chance]
        rate[2] += 1
        if rate[1] >= SAMPLE_RATE or (rate[3] < 1.0 and self._sample_rng.random() >= rate[3]):
            self.sampled_out += 1
            return
        rate[1] += 1
        if request is not None and (not isinstance(request[1], (bytes, bytearray))
                                    or len(request[1]) > MAX_REQUEST_BYTES):
            self.inputs_skipped += 1
            request = None
        size = len(response.body) + (len(request[1]) if request is not None else 0)
        if len(self._queue) >= self.queue_max or self._bytes_in - self._bytes_out + size > self.queue_max_bytes:
            self.dropped += 1
            return
        self._bytes_in += size
        self._queue.append((name, response.status, response.headers, response.body, request))
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
                if self.shared and now - self._synced_at >= self.persist_every:
                    self.sync()
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
        completed: list[tuple[str, str]] = []
        while True:
            try:
                name, _status, headers, body, request = self._queue.popleft()
            except IndexError:
                for name, version in completed:
                    self._publish_reference(name, version)
                return taken
            taken += 1
            self._bytes_out += len(body) + (len(request[1]) if request is not None else 0)
            version, scores, skipped = parse_scores(headers, body)
            if skipped:
                self.skipped += 1
            if not version or not scores:
                continue
            settings, provisional = self._settings_for(name, str(version))
            kinds = self._kinds_for(name, str(version)) if request is not None else {}
            rows = None
            if request is not None and kinds:
                rows = parse_rows(request[0], request[1], kinds)
                if rows is None or len(rows) != len(scores):
                    self.inputs_skipped += 1
                    rows = None
            with self._lock:
                v = self._version(name, str(version), settings, provisional)
                if v.kind != "realtime":
                    continue
                if kinds and not v.kinds:
                    v.kinds = dict(kinds)
                self.observed += len(scores)
                if v.add(scores, rows):
                    completed.append((name, str(version)))

    def _publish_reference(self, name: str, version: str) -> None:
        """A realtime reference this replica completed becomes the shared one, unless another
        replica's came first (then that one is adopted)."""
        self._mutate(name, version, lambda v, shared_complete: not shared_complete)
        with self._lock:
            v = self._versions.get((name, version))
            if v is not None:
                self._write_shard(v)

    def _mutate(self, name: str, version: str, change: Callable[["_Version", bool], bool]) -> bool:
        """Change a version's shared record: read it, adopt it, `change(v, shared_reference_complete)`
        (False: nothing to write), write it only if nobody wrote meanwhile — else all again.
        True when a change was written."""
        key = f"{name}/{version}.json"
        settings, provisional = self._settings_for(name, version)
        for _ in range(20):
            try:
                got = self.store.get_json(key)
            except (PlaneError, ValueError) as e:
                log.error("score monitor: cannot read %s: %s", key, getattr(e, "message", e))
                return False
            with self._lock:
                v = self._version(name, version, settings, provisional)
                complete = False
                if got is not None and isinstance(got[0], dict):
                    v.adopt_shared(got[0])
                    v.shared_token = got[1]
                    complete = bool(got[0].get("reference_complete"))
                if not change(v, complete):
                    return False
                doc = v.shared_json()
                expect = got[1] if got is not None else ABSENT
            try:
                token = self.store.put_json(key, doc, expect=expect)
            except StateConflict:
                continue   # another replica wrote first: read theirs, change that
            except PlaneError as e:
                log.error("score monitor: cannot write %s: %s", key, e.message)
                return False
            with self._lock:
                v.shared_token = token
                v.changed = True
            return True
        log.error("score monitor: %s kept changing under 20 attempts to write it; this change is dropped", key)
        return False

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
                self._model_kind[(name, version)] = manifest.get("kind")
                self._kinds[(name, version)] = feature_inputs.feature_kinds(manifest.get("features"))
                return known, False
        return dict(DEFAULTS), True

    def _kinds_for(self, name: str, version: str) -> dict[str, str]:
        """A version's features (`{name: kind}`): from its manifest, else as stored, else looked up
        (at most every SETTINGS_TTL seconds); {} while unknown."""
        kinds = self._kinds.get((name, version))
        if kinds:
            return kinds
        with self._lock:
            v = self._versions.get((name, version))
            if v is not None and v.kinds:
                return v.kinds
        now = time.monotonic()
        if now - self._kinds_looked_up.get((name, version), -math.inf) >= SETTINGS_TTL:
            self._kinds_looked_up[(name, version)] = now
            try:
                manifest = self.manifest_of(name, version) or {}
            except Exception:  # noqa: BLE001 — unknown for now: asked again later
                manifest = {}
            if manifest.get("features"):
                kinds = self._kinds[(name, version)] = feature_inputs.feature_kinds(manifest["features"])
                return kinds
        return {}

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
        """Take a finished batch job's `score_summary` (and its `inputs`): the version's reference
        fills from its jobs, merged, until it holds `monitoring.reference_size` scores, so a small
        first job never becomes the whole reference."""
        if not isinstance(summary, dict) or not summary.get("count"):
            return
        points = _finite_numbers(summary.get("percentiles")) or []
        if not points:
            return
        count = int(summary["count"])

        def change(v: _Version, _complete: bool) -> bool:
            if job and job in v.seen_jobs:
                return False   # this replica or another observed it already
            v.kind = "batch"
            if job:
                v.seen_jobs = (v.seen_jobs + [job])[-SEEN_KEPT:]
            job_inputs = summary.get("inputs") if isinstance(summary.get("inputs"), dict) else {}
            features = job_inputs.get("features") if isinstance(job_inputs.get("features"), dict) else {}
            features = {str(f): x for f, x in list(features.items())[:feature_inputs.MAX_FEATURES]   # bounded
                        if isinstance(x, dict) and x.get("type") in ("number", "category")
                        and len(x.get("percentiles") or []) <= 101
                        and len(x.get("shares") or {}) <= feature_inputs.MAX_CATEGORIES + 1}
            if not v.kinds and features:
                v.kinds = {f: str(s.get("type")) for f, s in features.items() if isinstance(s, dict)}
            if not v.reference_complete:
                _fill_reference(v, points, count, summary.get("histogram"), features, job)
            d = stats.drift(v.reference, points)
            v.jobs.append({"job": job, "finished_at": finished_at, "count": count, "psi": d["psi"], "ks": d["ks"],
                           "quantiles": summary.get("quantiles") or {}, "histogram": summary.get("histogram") or {},
                           "percentiles": points, "inputs": {"features": features}})
            v.batch_observed += count
            v.changed = True
            return True

        if self._mutate(name, version, change):
            self.observed += count

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
            self._settings_for(job.model, job.version)
            with self._lock:
                known = self._versions.get((job.model, job.version))
                serving = known is not None and known.kind == "realtime" and known.total_observed() > 0
            if serving or self._model_kind.get((job.model, job.version)) == "realtime":
                continue   # a dataset run through a realtime version: its monitoring is its traffic
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
        points = _quantile_points(values, MAX_REFERENCE)

        def change(v: _Version, _complete: bool) -> bool:
            v.reference = list(points)
            v.reference_count = len(values)
            v.reference_source = source
            v.reference_complete = True
            v.reference_histogram = None
            v.reference_jobs = []
            v.seal_inputs()   # the input reference stays the traffic's (a dataset gives scores only)
            v.changed = True
            return True

        self._mutate(name, version, change)
        self._refresh_flags([name])

    # -- what the API shows -----------------------------------------------------------------
    def report(self, name: str, *, batch: Optional[bool] = None) -> dict:
        """`{"versions": {version: {...}}, "drifted": [...]}` for one model, computed now (queued
        answers included; its finished jobs looked up too unless `batch` is False)."""
        self.drain()
        if self.shared:
            self.sync(name)
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
            for table in (self._versions, self._settings, self._looked_up, self._kinds, self._kinds_looked_up,
                          self._model_kind):
                for key in [k for k in table if k[0] == name]:
                    del table[key]
            self._rates.pop(name, None)
        try:
            self.store.delete_prefix(f"{name}/")
        except PlaneError as e:
            log.error("score monitor: cannot remove the state of %s: %s", name, e.message)
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
                     "drifted": v.drifted, "observed": v.total_observed(),
                     "features": {f: {"psi": d.get("psi"), "drifted": bool(d.get("drifted"))}
                                  for f, d in (v.inputs.get("features") or {}).items()}}
                    for (n, version), v in sorted(self._versions.items())]

    # -- in the store -----------------------------------------------------------------------------
    def _shard_key(self, v: _Version) -> str:
        return f"{v.name}/{v.version}/windows/{self.replica}.json"

    def _write_shard(self, v: _Version) -> None:
        """(under the lock) This replica's window of `v` to the store."""
        try:
            self.store.put_json(self._shard_key(v), v.shard_json(self.replica))
            v.dirty, v.written_at = False, time.monotonic()
        except PlaneError as e:
            log.error("score monitor: cannot write %s: %s", self._shard_key(v), e.message)

    def _persist(self, *, force: bool) -> None:
        now = time.monotonic()
        with self._lock:
            for v in self._versions.values():
                if v.dirty and (force or now - v.written_at >= self.persist_every):
                    self._write_shard(v)

    def flush(self) -> None:
        """Parse what is queued and write every changed window now."""
        self.drain()
        self._persist(force=True)

    def sync(self, name: Optional[str] = None) -> None:
        """Read what changed in the store (every model's, or one's): shared records, and the other
        replicas' windows; versions known only elsewhere appear here too."""
        self._synced_at = time.monotonic()
        try:
            listing = self.store.list(f"{name}/" if name else "")
        except PlaneError as e:
            log.warning("score monitor: cannot list the state store: %s", e.message)
            return
        shared: dict[tuple[str, str], str] = {}
        shards: dict[tuple[str, str], dict[str, str]] = {}
        for key, token in listing.items():
            parts = key.split("/")
            if len(parts) == 2 and parts[1].endswith(".json"):
                shared[(parts[0], parts[1][:-len(".json")])] = token
            elif len(parts) == 4 and parts[2] == "windows" and parts[3].endswith(".json"):
                replica = parts[3][:-len(".json")]
                if replica != self.replica:
                    shards.setdefault((parts[0], parts[1]), {})[replica] = token
        with self._lock:
            known = {k: v for k, v in self._versions.items() if name is None or k[0] == name}
        for key, v in known.items():   # removed elsewhere (a model removed on another replica)
            if key not in shared and key not in shards and v.shared_token is not None:
                with self._lock:
                    self._versions.pop(key, None)
                try:
                    self.store.delete_prefix(f"{key[0]}/{key[1]}/")
                except PlaneError:
                    pass
        for key in sorted(set(shared) | set(shards)):
            with self._lock:
                v = self._versions.get(key)
            if v is not None and key in shared and v.shared_token != shared[key]:
                self._read_shared(key, v)
            for replica, token in shards.get(key, {}).items():
                if v is None or v.shard_tokens.get(replica) != token:
                    v = self._read_shard(key, replica) or v
            if v is not None:
                with self._lock:
                    for gone in [r for r in v.others if r not in shards.get(key, {})]:
                        v.others.pop(gone, None)
                        v.shard_tokens.pop(gone, None)
                        v.changed = True
                self._retire_shards(v)

    def _read_shared(self, key: tuple[str, str], v: Optional["_Version"]) -> Optional["_Version"]:
        try:
            got = self.store.get_json(f"{key[0]}/{key[1]}.json")
        except (PlaneError, ValueError) as e:
            log.error("score monitor: ignoring unreadable %s/%s.json: %s", *key, getattr(e, "message", e))
            return v
        if got is None or not isinstance(got[0], dict):
            return v
        with self._lock:
            v = self._versions.get(key)
            if v is None:
                v = self._versions[key] = _Version.from_json({**got[0], "name": key[0], "version": key[1]})
                if not v.provisional:
                    self._settings.setdefault(key, v.settings)
            else:
                v.adopt_shared(got[0])
            v.shared_token = got[1]
            return v

    def _read_shard(self, key: tuple[str, str], replica: str) -> Optional["_Version"]:
        try:
            got = self.store.get_json(f"{key[0]}/{key[1]}/windows/{replica}.json")
        except (PlaneError, ValueError) as e:
            log.error("score monitor: ignoring the unreadable window of %s in %s/%s: %s", replica, *key,
                      getattr(e, "message", e))
            return None
        if got is None or not isinstance(got[0], dict):
            return None
        with self._lock:
            v = self._versions.get(key)
            if v is None:
                v = self._versions[key] = _Version.from_json({**got[0], "name": key[0], "version": key[1]})
                v.shared_token = None
            if replica == self.replica:
                v.adopt_own(got[0])
            else:
                v.adopt_other(replica, got[0])
            v.shard_tokens[replica] = got[1]
            return v

    def _retire_shards(self, v: "_Version") -> None:
        """Remove other replicas' shards that have not been written for SHARD_TTL seconds and hold
        none of the window; what they observed is kept in the shared record."""
        with self._lock:
            if v.kind != "realtime" or not v.others:
                return
            merged = v.merged()
            oldest = merged[0][0] if len(merged) >= v.settings["window"] else -math.inf
            now = time.time()
            dead = {r: o for r, o in v.others.items()
                    if now - o["written_at"] > SHARD_TTL and (not o["times"] or max(o["times"]) < oldest)}
        for replica, other in dead.items():
            def fold(x: _Version, _complete: bool, n=int(other.get("observed") or 0)) -> bool:
                x.retired_observed += n
                return True

            try:
                self.store.delete(f"{v.name}/{v.version}/windows/{replica}.json", expect=v.shard_tokens.get(replica))
            except (StateConflict, PlaneError):
                continue   # written again meanwhile, or another replica removed it
            with self._lock:
                v.others.pop(replica, None)
                v.shard_tokens.pop(replica, None)
            self._mutate(v.name, v.version, fold)

    def _load(self) -> None:
        """Every version in the store: shared records, this replica's windows (a state dir's one
        replica restarting), the other replicas' windows."""
        try:
            listing = self.store.list("")
        except PlaneError as e:
            log.error("score monitor: cannot list the state store: %s", e.message)
            return
        for key in sorted(listing):
            parts = key.split("/")
            if len(parts) == 2 and parts[1].endswith(".json"):
                v = self._read_shared((parts[0], parts[1][:-len(".json")]), None)
                if v is None:
                    continue
                try:   # a record written before windows had shards of their own: its window is this replica's
                    legacy = self.store.get_json(key)
                except (PlaneError, ValueError):
                    legacy = None
                own = f"{parts[0]}/{parts[1][:-len('.json')]}/windows/{self.replica}.json"
                if legacy and isinstance(legacy[0], dict) and "window" in legacy[0] and own not in listing:
                    old = legacy[0]
                    with self._lock:
                        v.adopt_own({"window": old.get("window"), "collecting": old.get("reference"),
                                     "observed": old.get("observed") if v.kind == "realtime" else 0})
                        v.dirty = True
            elif len(parts) == 4 and parts[2] == "windows" and parts[3].endswith(".json"):
                self._read_shard((parts[0], parts[1]), parts[3][:-len(".json")])
        with self._lock:
            for v in self._versions.values():
                v.written_at = time.monotonic()
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
