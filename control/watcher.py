"""The bucket watcher: lists `incoming/` every few seconds and POSTs a GCS "finalized"
CloudEvent (binary mode) to a sink for every object generation it has not sent yet.

Locally the sink is the control service's `/events`; on a cluster (`modelplane watch --sink`)
it is the Broker. What was delivered is remembered in a JSON file under the state
directory, so a restart does not resend the world; a failed delivery is retried with
backoff on the next rounds, so nothing is lost (the sink's dedupe makes a resend harmless).
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Callable, Optional

import requests

from control.durable import move_aside, write_json_atomic
from control.events import INCOMING, finalized_event, to_binary_http

log = logging.getLogger(__name__)

#: Sink answers that will never succeed however often the event is resent.
PERMANENT = {400, 404, 405, 413, 415, 422}


class Watcher:
    """Polls `gs://{bucket}/incoming/` and delivers one event per new object generation."""

    def __init__(self, *, bucket: str, sink: str, client=None, interval: float = 1.0,
                 state_path: Optional[Path] = None, token: Optional[str] = None,
                 prefix: str = INCOMING, timeout: float = 10.0, max_backoff: float = 30.0,
                 client_factory: Optional[Callable[[], object]] = None):
        self.bucket = bucket
        self.sink = sink
        self.interval = interval
        self.prefix = prefix
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.state_path = Path(state_path) if state_path else None
        self._client = client
        self._client_factory = client_factory
        self._session = requests.Session()
        self._session.trust_env = False  # a loopback sink must not go through a proxy
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._sent: set[str] = self._load()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failures = 0
        self.delivered = 0

    # -- persistence ---------------------------------------------------------------------
    def _load(self) -> set[str]:
        if not self.state_path or not self.state_path.exists():
            return set()
        try:
            data = json.loads(self.state_path.read_text())
            if data.get("bucket") == self.bucket:
                return set(data.get("sent", []))
        except (OSError, ValueError, AttributeError) as e:
            # resending is harmless (the sink dedupes by object generation); losing the file is not
            aside = move_aside(self.state_path) if self.state_path.exists() else None
            log.error("watcher state %s unreadable (%s); moved aside to %s, every object will be offered again "
                      "(duplicates are recognised by the sink)", self.state_path, e, aside)
        return set()

    def _save(self) -> None:
        if not self.state_path:
            return
        write_json_atomic(self.state_path, {"bucket": self.bucket, "sent": sorted(self._sent)})

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
        """List the prefix and deliver what is new; returns how many events were delivered.

        Raises on a listing failure or a retryable delivery failure (the caller backs off);
        what was not delivered stays unsent and is tried again next round.
        """
        # No client-side retry: a failed listing comes back at once and the loop backs off
        # (and `stop()` is never held up by a retry deadline).
        blobs = list(self.client.list_blobs(self.bucket, prefix=self.prefix, timeout=self.timeout, retry=None))
        present = set()
        delivered = 0
        error: Optional[Exception] = None
        for blob in blobs:
            props = dict(blob._properties)
            if props.get("name", "").endswith("/"):
                continue  # a "folder" placeholder
            key = f"{props.get('name')}#{props.get('generation')}"
            present.add(key)
            if key in self._sent or error is not None:
                continue
            try:
                self._deliver(props)
            except Exception as e:  # keep the rest for the next round, in order
                error = e
                continue
            self._sent.add(key)
            delivered += 1
        # Forget objects that are gone: a new upload has a new generation anyway.
        forgotten = self._sent - present
        if delivered or forgotten:
            self._sent -= forgotten
            self._save()
        self.delivered += delivered
        if error is not None:
            raise error
        return delivered

    def _deliver(self, props: dict) -> None:
        event = finalized_event(props, bucket=self.bucket)
        headers, body = to_binary_http(event)
        resp = self._session.post(self.sink, data=body, headers={**headers, **self._headers}, timeout=self.timeout)
        if resp.status_code < 300:
            log.debug("delivered %s -> %s (%s)", event.get_subject(), self.sink, resp.status_code)
            return
        if resp.status_code in PERMANENT:
            log.error("the sink %s refused the event for %s (%s: %s); not resending",
                      self.sink, event.get_subject(), resp.status_code, resp.text[:300])
            return
        raise RuntimeError(f"the sink {self.sink} answered {resp.status_code}: {resp.text[:300]}")

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Poll until `stop()`; failures back off exponentially up to `max_backoff` seconds."""
        while not self._stop.is_set():
            delay = self.interval
            try:
                self.poll_once()
                self._failures = 0
            except Exception as e:
                self._failures += 1
                delay = min(self.max_backoff, self.interval * (2 ** min(self._failures, 10)))
                log.warning("bucket watcher: %s; retrying in %.1fs", e, delay)
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

