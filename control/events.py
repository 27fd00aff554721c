"""CloudEvents in and out: the `/events` sink that turns GCS "finalized" events into batch jobs,
the builder the bucket watcher uses, and the log of what each event did.

Uses the cloudevents 2.x SDK (`cloudevents.core`): `from_http` reads binary and structured
mode, `to_binary` writes binary mode. The event is Google's own
(`google.cloud.storage.object.v1.finalized`, data = the GCS object resource with `size`,
`generation` and `metageneration` as strings), so the same sink serves the local watcher
and anything a cluster forwards.

Exactly once: the job key is `{bucket}/{object}#{generation}`; the runtime stores it durably
and a second event with the same key returns the first job (action `duplicate`). Nothing here
remembers keys: the local runtime keeps them in its job store, and the cluster runtime names
the Job after the event, so a second replica's create of it is refused by the cluster (409)
— exactly once holds across the control service's replicas without the event log.

The event log (`GET /api/events`, the events counters in `/metrics`) lives in the plane's state
store when it is given one (control/state.py): each replica writes its last `size` entries and
its counters as `{replica}.json` every `FLUSH_EVERY` seconds while they change (and on close),
and a reader merges every replica's: the newest `size` entries by time, the counters summed.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

import orjson
from cloudevents.core.bindings.http import HTTPMessage, from_http, to_binary
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from control.errors import BadRequest, NotFound, PlaneError
from control.state import Every, StateStore

log = logging.getLogger(__name__)

FINALIZED = "google.cloud.storage.object.v1.finalized"
SOURCE_PREFIX = "//storage.googleapis.com/projects/_/buckets/"
INCOMING = "incoming/"
REQUIRED = ("specversion", "id", "source", "type")
STRUCTURED_TYPES = ("application/cloudevents+json",)
ACTIONS = ("started", "duplicate", "ignored", "rejected")
FLUSH_EVERY = 2.0   # seconds between writes of this replica's log while it changes


# -- reading -----------------------------------------------------------------------------

def parse(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """The CloudEvent in an HTTP request (binary or structured mode); BadRequest saying what is missing."""
    headers = {k.lower(): v for k, v in headers.items()}
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if any(k.startswith("ce-") for k in headers):
        missing = [a for a in REQUIRED if not headers.get(f"ce-{a}")]
        if missing:
            raise BadRequest("not a CloudEvent: binary mode needs the header(s) "
                             + ", ".join(f"ce-{a}" for a in missing))
    elif content_type == "application/cloudevents-batch+json":
        raise BadRequest("batched CloudEvents are not accepted: send one event per request")
    elif content_type in STRUCTURED_TYPES or content_type == "application/json":
        try:
            # orjson: bounded nesting and no lone surrogates, where json.loads recurses and accepts them
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"not a CloudEvent: the structured-mode body is not JSON ({str(e)[:200]})") from None
        if not isinstance(doc, dict):
            raise BadRequest("not a CloudEvent: the structured-mode body must be a JSON object")
        missing = [a for a in REQUIRED if not doc.get(a)]
        if missing:
            raise BadRequest("not a CloudEvent: the structured-mode body needs the attribute(s) " + ", ".join(missing))
    else:
        raise BadRequest(
            "not a CloudEvent: expected binary mode (ce-specversion, ce-id, ce-source and ce-type headers) "
            "or structured mode (Content-Type: application/cloudevents+json)")
    try:
        return from_http(HTTPMessage(headers=headers, body=body), JSONFormat())
    except (BaseCloudEventException, ValueError, TypeError, RecursionError) as e:
        raise BadRequest(f"not a valid CloudEvent: {str(e)[:300]}") from None


# -- writing (the watcher) ----------------------------------------------------------------

def _stringify(value: Any) -> Any:
    return None if value is None else str(value)


def event_id(name: str, generation: Any) -> str:
    """The id of the finalized event modelplane's watcher emits for one generation of an object."""
    return f"{name}#{'' if generation is None else generation}"


def finalized_event(obj: Mapping[str, Any], *, bucket: Optional[str] = None) -> CloudEvent:
    """The `google.cloud.storage.object.v1.finalized` event GCS emits for object resource `obj`.

    The id is deterministic (`{name}#{generation}`): a re-sent event is the same event.
    """
    data = {k: v for k, v in dict(obj).items() if v is not None}
    bucket = bucket or data.get("bucket")
    name = data.get("name")
    if not bucket or not name:
        raise ValueError("an object resource needs 'bucket' and 'name'")
    data["bucket"] = bucket
    data.setdefault("kind", "storage#object")
    for key in ("size", "generation", "metageneration"):
        if key in data:
            data[key] = _stringify(data[key])
    stamp = data.get("updated") or data.get("timeCreated")
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else datetime.now(timezone.utc)
    except ValueError:
        when = datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return CloudEvent(
        attributes={
            "specversion": "1.0",
            "type": FINALIZED,
            "source": f"{SOURCE_PREFIX}{bucket}",
            "subject": f"objects/{name}",
            "id": event_id(name, data.get("generation")),
            "time": when,
            "datacontenttype": "application/json",
        },
        data=data,
    )


def to_binary_http(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and body of `event` in binary content mode."""
    message = to_binary(event, JSONFormat())
    return dict(message.headers), message.body


def event_key(bucket: str, name: str, generation: str) -> str:
    """The exactly-once key of one object generation."""
    return f"{bucket}/{name}#{generation}"


# -- what happened to each event -----------------------------------------------------------

class EventLog:
    """The last `size` events with what they did, and counters by action (thread-safe); with a
    `store`, every replica's together (see the module's docstring)."""

    def __init__(self, size: int = 1000, *, store: Optional[StateStore] = None, flush_every: float = FLUSH_EVERY):
        self.size = size
        self._entries: collections.deque[dict] = collections.deque(maxlen=size)
        self._counts: collections.Counter[str] = collections.Counter({a: 0 for a in ACTIONS})
        self._lock = threading.Lock()
        self.store = store
        self._dirty = False
        self._others: dict[str, dict] = {}   # replica -> {"entries", "counts"} as last read
        self._tokens: dict[str, str] = {}
        self._flusher: Optional[Every] = None
        if store is not None:
            self.replica = store.replica
            self._load_own()
            self._flusher = Every(flush_every, self.flush, "event-log").start()

    def record(self, action: str, reason: str = "", **fields: Any) -> dict:
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                 "action": action, "reason": reason, **fields}
        with self._lock:
            self._entries.append(entry)
            self._counts[action] += 1
            self._dirty = True
        log.info("event %s: %s%s", fields.get("id", "?"), action, f" ({reason})" if reason else "")
        return entry

    def entries(self, *, limit: int = 200, action: Optional[str] = None, key: Optional[str] = None,
                model: Optional[str] = None) -> list[dict]:
        """Newest first."""
        self._read_others()
        with self._lock:
            items = list(self._entries)
            for other in self._others.values():
                items.extend(other["entries"])
        items.sort(key=lambda e: e.get("at") or "")
        items = items[-self.size:]
        out = []
        for entry in reversed(items):
            if action and entry["action"] != action:
                continue
            if key and entry.get("key") != key:
                continue
            if model and entry.get("model") != model:
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out

    def counts(self) -> dict[str, int]:
        self._read_others()
        with self._lock:
            total = collections.Counter(self._counts)
            for other in self._others.values():
                total.update(other["counts"])
            return dict(total)

    # -- in the store -----------------------------------------------------------------------------
    def _load_own(self) -> None:
        """What this replica wrote before a restart (a state dir's one replica)."""
        try:
            got = self.store.get_json(f"{self.replica}.json")
        except (PlaneError, ValueError) as e:
            log.warning("event log: cannot read this replica's earlier log: %s", getattr(e, "message", e))
            return
        if got and isinstance(got[0], dict):
            self._entries.extend(e for e in got[0].get("entries") or [] if isinstance(e, dict))
            self._counts.update({k: int(v) for k, v in (got[0].get("counts") or {}).items()})

    def flush(self) -> None:
        """Write this replica's log if it changed."""
        if self.store is None:
            return
        with self._lock:
            if not self._dirty:
                return
            doc = {"replica": self.replica, "written_at": time.time(), "entries": list(self._entries),
                   "counts": dict(self._counts)}
            self._dirty = False
        try:
            self.store.put_json(f"{self.replica}.json", doc)
        except PlaneError as e:
            log.warning("event log not written: %s", e.message)
            with self._lock:
                self._dirty = True

    def _read_others(self) -> None:
        if self.store is None or not self.store.shared:
            return
        try:
            listing = {k[:-len(".json")]: t for k, t in self.store.list().items()
                       if k.endswith(".json") and "/" not in k and k[:-len(".json")] != self.replica}
        except PlaneError as e:
            log.warning("event log: other replicas' logs not read: %s", e.message)
            return
        with self._lock:
            for gone in [r for r in self._others if r not in listing]:
                self._others.pop(gone, None)
                self._tokens.pop(gone, None)
            changed = [r for r, t in listing.items() if self._tokens.get(r) != t]
        for replica in changed:
            try:
                got = self.store.get_json(f"{replica}.json")
            except (PlaneError, ValueError) as e:
                log.warning("event log of %s not read: %s", replica, getattr(e, "message", e))
                continue
            if not got or not isinstance(got[0], dict):
                continue
            doc, token = got
            with self._lock:
                self._others[replica] = {
                    "entries": [e for e in doc.get("entries") or [] if isinstance(e, dict)],
                    "counts": {k: int(v) for k, v in (doc.get("counts") or {}).items()}}
                self._tokens[replica] = token

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.stop()
        self.flush()


# -- the sink -----------------------------------------------------------------------------

class EventSink:
    """Decides what a CloudEvent does: start a batch job (once per object generation) or nothing."""

    def __init__(self, runtime, *, bucket: Optional[str] = None, log_: Optional[EventLog] = None):
        self.runtime = runtime
        self.bucket = bucket
        self.log = log_ or EventLog()
        self._lock = threading.Lock()

    def reject(self, message: str, headers: Mapping[str, str]) -> None:
        """Record a request that was not a CloudEvent."""
        ce_id = {k.lower(): v for k, v in headers.items()}.get("ce-id")
        self.log.record("rejected", message, **({"id": ce_id} if ce_id else {}))

    def handle(self, event: CloudEvent) -> tuple[int, dict]:
        """(HTTP status, body) for `event`. Ignored events answer 200 so senders do not retry them."""
        attrs = event.get_attributes()
        info: dict[str, Any] = {"id": attrs.get("id"), "type": attrs.get("type"),
                                "source": attrs.get("source"), "subject": attrs.get("subject")}

        def ignore(reason: str) -> tuple[int, dict]:
            entry = self.log.record("ignored", reason, **info)
            return 200, entry

        if attrs.get("type") != FINALIZED:
            return ignore(f"event type {attrs.get('type')!r} is not handled (only {FINALIZED})")
        data = event.get_data()
        if isinstance(data, (bytes, str)):
            try:
                data = orjson.loads(data)
            except orjson.JSONDecodeError:
                data = None
        if not isinstance(data, dict):
            return ignore("the event data is not a GCS object resource (JSON object)")
        for field in ("bucket", "name"):
            if data.get(field) is not None and not isinstance(data.get(field), str):
                raise BadRequest(f"data.{field}: expected a string, got {type(data[field]).__name__}")
        generation = data.get("generation")
        if generation is not None and (isinstance(generation, bool) or not isinstance(generation, (str, int))):
            raise BadRequest(f"data.generation: expected a string or an integer, got {type(generation).__name__}")
        source = str(attrs.get("source") or "")
        bucket = data.get("bucket") or (source[len(SOURCE_PREFIX):] if source.startswith(SOURCE_PREFIX) else None)
        subject = str(attrs.get("subject") or "")
        name = data.get("name") or (subject[len("objects/"):] if subject.startswith("objects/") else None)
        info.update(bucket=bucket, object=name, generation=None if generation is None else str(generation))
        if not bucket or not name:
            return ignore("the event names no bucket and object (data.bucket, data.name)")
        if self.bucket and bucket != self.bucket:
            return ignore(f"bucket {bucket!r} is not the plane's bucket {self.bucket!r}")
        if not name.startswith(INCOMING):
            return ignore(f"object {name!r} is not under {INCOMING}")
        model, _, file = name[len(INCOMING):].partition("/")
        info["model"] = model or None
        if not model or not file:
            return ignore(f"object {name!r} is not at {INCOMING}{{model}}/{{file}}.csv")
        if not file.lower().endswith(".csv"):
            return ignore(f"{file!r} is not a CSV file (.csv)")
        if generation in (None, ""):
            return ignore("the object resource has no generation")
        try:
            detail = self.runtime.model(model)
        except NotFound:
            return ignore(f"no model named {model!r}")
        if detail.kind not in ("batch", "realtime"):
            return ignore(f"{model!r} is a {detail.kind} model; only batch and realtime models run on uploads")
        key = event_key(bucket, name, str(generation))
        info["key"] = key
        # The runtime dedupes durably; the lock keeps two deliveries of one event in this
        # process from racing each other into it.
        with self._lock:
            job, created = self.runtime.submit_job(model, dataset=f"gs://{bucket}/{name}",
                                                   event_key=key, trigger="event")
        info["job"] = job.id
        if created:
            entry = self.log.record("started", f"job {job.id} on {model}", **info)
            return 202, {**entry, "status": job.status}
        entry = self.log.record("duplicate", f"generation {generation} already ran as job {job.id}", **info)
        return 200, {**entry, "status": job.status}
