"""The bucket watcher: lists `incoming/` and POSTs a GCS "finalized" CloudEvent (binary mode) to a
sink for every object generation it has not announced yet.

Locally the sink is the control service's `/events`; on a cluster (`modelplane watch --sink`) it is
the Broker. A cluster with Eventarc does not run this at all: Eventarc delivers the bucket's own
finalized events (knative/README.md, "Bucket events with Eventarc (GKE)").

Bounded state. GCS cannot list "objects newer than T", so every round lists the prefix, but the
watcher does not remember every object it ever announced. It keeps, in `{state_dir}/watcher.json`:

* `mark`: the newest finalization stamp seen (`timeFinalized`, or `timeCreated` where a server
  does not send it; microseconds, the server's clock only, so the watcher's own clock never
  matters);
* `recent`: the keys `{object}#{generation}` announced whose stamp is within `margin` of the
  mark: the only objects the next listing could show for the first time beside older ones;
* `pending`: the keys found but not yet delivered (the sink failed), with their attempt count.

A listed object stamped before `mark - margin` that is neither recent nor pending was announced
before and is skipped without an entry. The state is therefore the objects stamped within
`margin` of the newest plus what the sink has not taken yet: it depends on the upload rate, not
on how many objects the bucket holds.

The margin is how much later than a newer object an object may first appear in a listing.
GCS lists strongly consistently and stamps `timeFinalized` when the object becomes readable, so
there a few seconds would do. The embedded emulator sends no `timeFinalized` and stamps
`timeCreated` (and the generation) when a resumable upload *starts*, listing the object only
when it ends (the google-cloud-storage client uploads files over 8 MiB that way): there an
object appears as old as its upload took. The default margin, an hour, covers uploads that
long; an upload that takes longer, to a store that stamps its start, while newer objects arrive
and are announced, would be taken as announced (tests/test_watcher.py pins this down). A bigger
margin only costs entries: the state holds the objects stamped within the margin of the newest.

Nothing lost: an object whose delivery fails (network error, 5xx, 429) stays pending, is retried
with its own exponential backoff (others are not held up by it) and is dropped only when
delivered, refused for good (`PERMANENT`), or gone from the bucket. A restart resends nothing
that was delivered (and the sink dedupes anyway: the event id is `{object}#{generation}`).
Each new object is read once (GET of that generation) so the event carries the full object
resource, as GCS's own events do; the listing asks only for `LIST_FIELDS`.

Scan cost. A round lists every object under the prefix: about one GCS list call per 1,000
objects, and CPU in proportion. So that this stays a bounded share of the time however big the
bucket grows, the pause after a round is at least `(1 - max_duty) / max_duty` times the round's
length (default: the watcher lists at most 10% of the time); with a small bucket the pause is
`interval`. That costs detection latency on a large bucket: a new object is announced at worst
`pause + scan` after it lands, ~10x the scan time (loadtest/bridge_scale.py measures it).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import requests

from control.durable import move_aside, write_json_atomic
from control.events import INCOMING, event_id, finalized_event, to_binary_http

log = logging.getLogger(__name__)

#: Sink answers that will never succeed however often the event is resent.
PERMANENT = {400, 404, 405, 413, 415, 422}
#: What a listing asks GCS for: enough to find new generations and order them, nothing more.
LIST_FIELDS = "items(name,generation,timeCreated,timeFinalized,size),nextPageToken"
STATE_VERSION = 2
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def stamp_us(props: dict) -> Optional[int]:
    """The object's finalization time in microseconds since the epoch (the server's clock), or None."""
    text = props.get("timeFinalized") or props.get("timeCreated")
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - EPOCH) // timedelta(microseconds=1)  # exact: a float timestamp loses microseconds


class Watcher:
    """Polls `gs://{bucket}/{prefix}` and delivers one event per new object generation."""

    def __init__(self, *, bucket: str, sink: str, client=None, interval: float = 1.0,
                 state_path: Optional[Path] = None, token: Optional[str] = None,
                 prefix: str = INCOMING, timeout: float = 10.0, max_backoff: float = 30.0,
                 client_factory: Optional[Callable[[], object]] = None,
                 margin: float = 3600.0, max_duty: float = 0.1):
        if not 0 < max_duty <= 1:
            raise ValueError("max_duty is a share of the time: 0 < max_duty <= 1")
        self.bucket = bucket
        self.sink = sink
        self.interval = interval
        self.prefix = prefix
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.margin_us = int(margin * 1_000_000)
        self.max_duty = max_duty
        self.state_path = Path(state_path) if state_path else None
        self._client = client
        self._client_factory = client_factory
        self._session = requests.Session()
        self._session.trust_env = False  # a loopback sink must not go through a proxy
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._mark: Optional[int] = None          # newest stamp seen (µs)
        self._recent: dict[str, int] = {}         # key -> stamp, announced, stamp >= mark - margin
        self._pending: dict[str, int] = {}        # key -> failed attempts, not delivered yet
        self._legacy: set[str] = set()            # a version-1 state's keys, until one full listing
        self._retry_at: dict[str, float] = {}     # key -> monotonic time of its next attempt
        self._load()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failures = 0
        self.delivered = 0
        #: the last complete round: objects listed, seconds it took, pause chosen after it
        self.last_scan: dict[str, float] = {}

    # -- persistence ---------------------------------------------------------------------
    def _load(self) -> None:
        if not self.state_path or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text())
            if data.get("bucket") != self.bucket:
                return
            if "sent" in data:  # version 1: every key ever sent, no stamps; kept for one full listing
                self._legacy = set(data["sent"])
                return
            if data.get("prefix", self.prefix) != self.prefix:
                return
            mark = data.get("mark")
            self._mark = None if mark is None else int(mark)
            self._recent = {str(k): int(v) for k, v in data.get("recent", {}).items()}
            self._pending = {str(k): int(v) for k, v in data.get("pending", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            # resending is harmless (the sink dedupes by object generation); losing the file is not
            self._mark, self._recent, self._pending, self._legacy = None, {}, {}, set()
            aside = move_aside(self.state_path) if self.state_path.exists() else None
            log.error("watcher state %s unreadable (%s); moved aside to %s, every object will be offered again "
                      "(duplicates are recognised by the sink)", self.state_path, e, aside)

    def _save(self) -> None:
        if not self.state_path:
            return
        write_json_atomic(self.state_path, {
            "version": STATE_VERSION, "bucket": self.bucket, "prefix": self.prefix, "mark": self._mark,
            "margin_s": self.margin_us / 1_000_000, "recent": self._recent, "pending": self._pending})

    def state_entries(self) -> int:
        """How many per-object entries the watcher keeps (what the bounded state bounds)."""
        return len(self._recent) + len(self._pending) + len(self._legacy)

    # -- one round -------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory()
            else:
                from control.gcs import storage_client

                self._client = storage_client()
        return self._client

    def poll_once(self) -> int:
        """List the prefix and deliver what is new and due; returns how many events were delivered.

        Raises on a listing failure or a retryable delivery failure (the caller backs off); what
        was not delivered stays pending and is tried again when its backoff has passed.
        """
        started = time.monotonic()
        cutoff = None if self._mark is None else self._mark - self.margin_us
        mark = self._mark
        listed = delivered = 0
        seen_pending: set[str] = set()
        error: Optional[Exception] = None
        changed = False
        try:
            # No client-side retry: a failed listing comes back at once and the loop backs off
            # (and `stop()` is never held up by a retry deadline).
            blobs = self.client.list_blobs(self.bucket, prefix=self.prefix, fields=LIST_FIELDS,
                                           timeout=self.timeout, retry=None)
            for blob in blobs:
                props = blob._properties
                name = props.get("name") or ""
                if name.endswith("/"):
                    continue  # a "folder" placeholder
                listed += 1
                key = event_id(name, props.get("generation"))
                stamp = stamp_us(props)
                if stamp is None:  # no stamp: kept as recent as the newest, so never skipped unseen
                    stamp = mark if mark is not None else 0
                if mark is None or stamp > mark:
                    mark = stamp
                if key not in self._pending:
                    if key in self._recent:
                        continue
                    if key in self._legacy:
                        self._recent[key] = stamp  # announced by the version-1 watcher
                        changed = True
                        continue
                    if cutoff is not None and stamp < cutoff:
                        continue  # older than the window: announced in an earlier round
                    self._pending[key] = 0
                    changed = True
                seen_pending.add(key)
                if error is not None or self._retry_at.get(key, 0.0) > time.monotonic():
                    continue  # the sink just failed, or this event's backoff has not passed
                try:
                    outcome = self._deliver(name, props.get("generation"))
                except Exception as e:  # stays pending; the rest wait for the next round
                    error = e
                    attempts = self._pending[key] = self._pending[key] + 1
                    self._retry_at[key] = time.monotonic() + min(self.max_backoff,
                                                                 self.interval * 2 ** min(attempts, 10))
                    changed = True
                    continue
                del self._pending[key]
                self._retry_at.pop(key, None)
                self._recent[key] = stamp
                changed = True
                delivered += outcome == "delivered"
            # the listing is complete: move the mark and forget what can no longer appear new
            if mark != self._mark:
                self._mark = mark
                changed = True
            for key in [k for k in self._pending if k not in seen_pending]:
                log.info("%s is no longer in the bucket; not announcing it", key)
                del self._pending[key]
                self._retry_at.pop(key, None)
                changed = True
            if self._legacy:
                self._legacy = set()
                changed = True
            if self._mark is not None:
                floor = self._mark - self.margin_us
                old = [k for k, s in self._recent.items() if s < floor]
                for key in old:
                    del self._recent[key]
                changed = changed or bool(old)
            self.last_scan = {"objects": listed, "seconds": time.monotonic() - started}
        finally:
            if changed:
                self._save()
            self.delivered += delivered
        if error is not None:
            raise error
        return delivered

    def _deliver(self, name: str, generation: Any) -> str:
        """POST the finalized event of one generation: "delivered", "refused" (for good) or "gone";
        raises when a later attempt may succeed."""
        blob = self.client.bucket(self.bucket).get_blob(name, generation=generation, timeout=self.timeout, retry=None)
        if blob is None:
            log.info("%s#%s was replaced or deleted before it was announced", name, generation)
            return "gone"
        event = finalized_event(blob._properties, bucket=self.bucket)
        headers, body = to_binary_http(event)
        resp = self._session.post(self.sink, data=body, headers={**headers, **self._headers}, timeout=self.timeout)
        if resp.status_code < 300:
            log.debug("delivered %s -> %s (%s)", event.get_subject(), self.sink, resp.status_code)
            return "delivered"
        if resp.status_code in PERMANENT:
            log.error("the sink %s refused the event for %s (%s: %s); not resending",
                      self.sink, event.get_subject(), resp.status_code, resp.text[:300])
            return "refused"
        raise RuntimeError(f"the sink {self.sink} answered {resp.status_code}: {resp.text[:300]}")

    def pause_after(self, scan_seconds: float) -> float:
        """The pause after a round that took `scan_seconds`: `interval`, or longer so that listing
        takes at most `max_duty` of the time."""
        return max(self.interval, scan_seconds * (1 - self.max_duty) / self.max_duty)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Poll until `stop()`; failures back off exponentially up to `max_backoff` seconds."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
                self._failures = 0
                delay = self.pause_after(time.monotonic() - started)
                if delay > self.interval:
                    log.info("listing %d objects took %.2fs; next round in %.1fs", self.last_scan.get("objects", 0),
                             self.last_scan.get("seconds", 0.0), delay)
            except Exception as e:
                self._failures += 1
                delay = max(self.pause_after(time.monotonic() - started),
                            min(self.max_backoff, self.interval * (2 ** min(self._failures, 10))))
                log.warning("bucket watcher: %s; retrying in %.1fs", e, delay)
            self.last_scan["pause"] = delay
            self._stop.wait(delay)

    def start(self) -> "Watcher":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.run, name="modelplane-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._session.close()


def from_settings(settings, *, sink: str, client=None) -> Watcher:
    """The watcher `up` and `modelplane watch` run: the plane's bucket, its state file, its token."""
    from control.gcs import storage_client

    return Watcher(bucket=settings.bucket_name, sink=sink, client=client, interval=settings.watch_interval,
                   state_path=Path(settings.state_dir) / "watcher.json", token=settings.token,
                   client_factory=lambda: storage_client(state_dir=settings.state_dir))  # the bucket's key too
