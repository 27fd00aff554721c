"""A watch cache of the cluster objects the cluster runtime manages: each `Informer` lists one kind
(one label selector, one namespace) once, in pages, then watches it, and answers reads from
memory, so listing every model does not list every object from the API server on each request.

One `Informer` per kind:

- **List**, paged: `limit` objects a page, the `continue` token for the next; every page is
  from the same snapshot, whose `resourceVersion` the watch starts from. A continue token the
  server has forgotten (410) starts the list again.
- **Watch** from there with `allowWatchBookmarks=true` and `timeoutSeconds`, streamed: one JSON
  event a line (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR). When the server ends the watch
  (its timeout), it is opened again from the last resourceVersion seen (bookmarks move it on
  without an object). When the server no longer has that version (410 Gone: an ERROR event with
  code 410, or the HTTP status), the informer lists again and replaces the whole cache, which
  also drops objects deleted meanwhile. Connection errors and other failures back off
  (exponentially, to `max_backoff`) and resume from the same resourceVersion.
- Each object passes through `transform(obj)` as it arrives: the cache keeps only what reads
  need (`keep()` below; 10,000 Services must fit in a control pod).
- Reads (`get`, `values`, `items`, `by_index`, `snapshot`) take a lock held only for a dict copy;
  `generation` changes with every change a read could see, so a caller can keep an answer it
  built (and encoded) until it changes.

Read-your-writes. The runtime's own create/patch answers the object as written: `note(obj)`
shows it at once, before the watch delivers the same change; `forget(obj)` hides a deleted one.
resourceVersions are compared for equality only (Kubernetes documents them as opaque), by
these rules:

- a watch event always replaces the cached entry (the watch is the server's own order);
- `note(obj)` is ignored when the watch has already delivered that resourceVersion of the object
  (it is the cached one, or among the last `seen_window` events): whatever the cache holds came
  later from the watch, or is the same;
- otherwise the noted object is shown in place of the cached one until the watch delivers that
  very resourceVersion (the watch has caught up: its events from then on are newer), until a
  list that started after the note completes (a list sees every write finished before it), or
  after `note_ttl` seconds at most. Events for that name in between are older than the note
  (the watch has not reached it yet) and are applied underneath it;
- `forget(obj_or_name)` hides the object until the watch delivers its DELETED event (matched by
  uid when an object is given; by name alone otherwise), a later list, or `note_ttl`. If the
  watch has already delivered its deletion, nothing is hidden.

The one case these rules cannot order is a note arriving late (its write long finished, outside
`seen_window`, or older than a re-list): it shows the older object for `note_ttl` at most.

The `kubernetes` client is imported lazily (`api_request`), as in `control.runtime.knative`.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional
from urllib.parse import quote

log = logging.getLogger(__name__)

PAGE_SIZE = 500          # objects a list page
WATCH_SECONDS = 300      # the server ends each watch after this long (it is then resumed)
NOTE_TTL = 30.0          # seconds at most a noted write shows over the watch's view
SEEN_WINDOW = 4096       # (name, resourceVersion) of the latest events, to ignore a note the watch passed
CHANGE_LOG = 16384       # changes remembered for `touched_since` (older: the caller rebuilds all)


class Gone(Exception):
    """The server no longer has the resourceVersion asked for (410): list again."""


class WatchFailed(Exception):
    """A list or watch answered an error other than 410; retried after a back-off."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


# -- transforms and indexes -------------------------------------------------------------------

META_KEPT = ("name", "namespace", "uid", "labels", "annotations", "resourceVersion", "creationTimestamp",
             "generation", "deletionTimestamp", "ownerReferences")


def keep(*, spec: bool = False, status: bool = True, annotations: bool = True,
         meta: Iterable[str] = META_KEPT) -> Callable[[dict], dict]:
    """A transform keeping `metadata`'s `meta` keys (annotations unless `annotations=False`),
    `status` unless `status=False`, `spec` only with `spec=True`; `managedFields` and the rest
    are dropped."""
    wanted = tuple(k for k in meta if annotations or k != "annotations")

    def transform(obj: dict) -> dict:
        m = obj.get("metadata") or {}
        out: dict[str, Any] = {"metadata": {k: m[k] for k in wanted if k in m}}
        if status and "status" in obj:
            out["status"] = obj["status"]
        if spec and "spec" in obj:
            out["spec"] = obj["spec"]
        return out

    return transform


default_transform = keep()


def by_label(label: str) -> Callable[[dict], Iterable[str]]:
    """An index function: the object's value of `label` (none when it has no such label)."""
    def keys(obj: dict) -> Iterable[str]:
        value = ((obj.get("metadata") or {}).get("labels") or {}).get(label)
        return (value,) if value is not None else ()

    return keys


# -- the API ----------------------------------------------------------------------------------

def resource_path(group: str, version: str, plural: str, namespace: str) -> str:
    """The collection path of a namespaced resource (as `KnativeRuntime._path` builds it)."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    return f"{base}/namespaces/{quote(namespace)}/{plural}"


def api_request(api: Any, path: str) -> Callable[..., Any]:
    """A request function over a `kubernetes` ApiClient, as `KnativeRuntime._request` calls it
    (`param_serialize` + `call_api`): `request(query, timeout=(connect, read))` GETs `path` and
    returns the urllib3 response unread (`status`, `reason`, `read()`, `stream()`, `close()`),
    so a watch can be read as it arrives and closed from another thread. `api` is an ApiClient,
    or a callable giving one (`lambda: runtime.api`, which is created on first use)."""
    def request(query: Mapping[str, str], *, timeout: tuple[float, float]):
        from kubernetes.client.exceptions import ApiException

        client = api if hasattr(api, "call_api") else api()
        method, url, headers, _, _ = client.param_serialize(
            method="GET", resource_path=path, query_params=[(k, v) for k, v in query.items() if v is not None],
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        try:
            return client.call_api(method, url, header_params=headers, _request_timeout=timeout).response
        except ApiException as e:  # the client raises these itself for TLS and retry failures
            raise OSError(f"{e.status or 0} {e.reason}") from e

    return request


def _lines(resp) -> Iterator[bytes]:
    """The non-empty lines of a streamed response, each as soon as its chunk arrives."""
    pending = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        if b"\n" not in chunk:
            pending += chunk
            continue
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def _message(data: bytes) -> str:
    try:
        return json.loads(data).get("message") or data[:300].decode("utf-8", "replace")
    except (ValueError, AttributeError):
        return data[:300].decode("utf-8", "replace")


# -- the informer ------------------------------------------------------------------------------

class _Overlay:
    """A write the runtime made that the watch has not delivered yet (`value` None: deleted)."""

    __slots__ = ("value", "rv", "uid", "keys", "deadline", "seq")

    def __init__(self, value, rv, uid, keys, deadline, seq):
        self.value, self.rv, self.uid, self.keys, self.deadline, self.seq = value, rv, uid, keys, deadline, seq


class Informer:
    """A cache of one kind's objects (those `selector` picks in one namespace), kept by a list
    and a watch in a daemon thread; `{name: transform(object)}`."""

    def __init__(self, request: Callable[..., Any], *, kind: str = "objects", selector: Optional[str] = None,
                 transform: Callable[[dict], Any] = default_transform,
                 index: Optional[Callable[[dict], Iterable[str]]] = None, page_size: int = PAGE_SIZE,
                 watch_seconds: int = WATCH_SECONDS, connect_timeout: float = 5.0, list_timeout: float = 60.0,
                 min_backoff: float = 0.5, max_backoff: float = 30.0, note_ttl: float = NOTE_TTL,
                 seen_window: int = SEEN_WINDOW):
        self.kind = kind
        self.selector = selector
        self._request = request
        self._transform = transform
        self._index_of = index
        self.page_size = page_size
        self.watch_seconds = watch_seconds
        self._connect_timeout = connect_timeout
        self._list_timeout = list_timeout
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self.note_ttl = note_ttl
        self._seen_window = seen_window

        self._lock = threading.Lock()
        # name -> (value, resourceVersion, uid, index keys)
        self._entries: dict[str, tuple[Any, str, Optional[str], tuple]] = {}
        self._index: dict[str, set[str]] = {}
        self._overlay: dict[str, _Overlay] = {}
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._generation = 0
        # (generation, the names and index keys it touched), one per generation since the last list
        self._changes: deque = deque(maxlen=CHANGE_LOG)
        self._listed_at = 0   # the generation of the last complete list
        self._seq = 0  # counts notes and list starts, to tell which came first
        self._rv: Optional[str] = None
        self._resp = None
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # what it did, for logs, tests and measurements
        self.lists = 0       # complete lists (the first, then one per 410)
        self.pages = 0       # list pages read
        self.watches = 0     # watch requests opened
        self.events = 0      # watch events applied (not bookmarks)
        self.last_error: Optional[str] = None

    # -- life -----------------------------------------------------------------------------
    def start(self) -> "Informer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"informer-{self.kind}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the thread: wakes a back-off and closes the open list or watch response."""
        self._stop.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            _close(resp)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def synced(self) -> bool:
        """The first list is complete (reads answer the whole kind from then on)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: Optional[float] = None) -> bool:
        return self._synced.wait(timeout)

    @property
    def resource_version(self) -> Optional[str]:
        return self._rv

    # -- reads -----------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Changes (grows) whenever a read could answer differently."""
        with self._lock:
            self._expire()
            return self._generation

    def get(self, name: str) -> Any:
        """The cached value of `name`, or None."""
        with self._lock:
            self._expire()
            over = self._overlay.get(name)
            if over is not None:
                return over.value
            entry = self._entries.get(name)
            return entry[0] if entry is not None else None

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        """(generation, {name: value}) as one consistent view."""
        with self._lock:
            self._expire()
            out = {name: e[0] for name, e in self._entries.items()}
            for name, over in self._overlay.items():
                if over.value is None:
                    out.pop(name, None)
                else:
                    out[name] = over.value
            return self._generation, out

    def items(self) -> list[tuple[str, Any]]:
        return list(self.snapshot()[1].items())

    def values(self) -> list[Any]:
        return list(self.snapshot()[1].values())

    def __len__(self) -> int:
        return len(self.snapshot()[1])

    def by_index(self, key: str) -> list[Any]:
        """The values whose index function (`index=`) gave `key`."""
        with self._lock:
            self._expire()
            names = set(self._index.get(key, ()))
            for name, over in self._overlay.items():
                if over.value is not None and key in over.keys:
                    names.add(name)
                else:
                    names.discard(name)
            out = []
            for name in sorted(names):
                over = self._overlay.get(name)
                out.append(over.value if over is not None else self._entries[name][0])
            return out

    # -- read-your-writes ------------------------------------------------------------------
    def note(self, obj: dict) -> None:
        """The object as the runtime's own create or patch returned it: shown at once (the rules
        are in the module's docstring)."""
        meta = obj.get("metadata") or {}
        name, rv = meta.get("name"), meta.get("resourceVersion")
        if not name or not rv:
            return
        with self._lock:
            entry = self._entries.get(name)
            if (entry is not None and entry[1] == rv) or (name, rv) in self._seen:
                return  # the watch has delivered this version already (and maybe newer ones)
            self._seq += 1
            keys = self._keys(obj)
            self._overlay[name] = _Overlay(self._transform(obj), rv, meta.get("uid"), keys,
                                           time.monotonic() + self.note_ttl, self._seq)
            self._changed(name, keys, entry[3] if entry is not None else ())

    def forget(self, obj: Any) -> None:
        """An object the runtime deleted: hidden at once. `obj` is what the DELETE answered (the
        object while finalizers hold it, else a Status naming it in `details`), or a name."""
        if isinstance(obj, str):
            name, uid = obj, None
        elif obj.get("kind") == "Status":
            details = obj.get("details") or {}
            name, uid = details.get("name"), details.get("uid")
        else:
            meta = obj.get("metadata") or {}
            name, uid = meta.get("name"), meta.get("uid")
        if not name:
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or (uid is not None and entry[2] != uid):
                over = self._overlay.pop(name, None)
                if over is not None:  # already gone from the watch's view
                    self._changed(name, over.keys)
                return
            self._seq += 1
            over = self._overlay.get(name)
            self._overlay[name] = _Overlay(None, None, entry[2], (), time.monotonic() + self.note_ttl, self._seq)
            self._changed(name, entry[3], over.keys if over is not None else ())

    # -- inside (lock held) -----------------------------------------------------------------
    def _expire(self) -> None:
        if not self._overlay:
            return
        now = time.monotonic()
        late = [name for name, over in self._overlay.items() if over.deadline <= now]
        for name in late:
            over = self._overlay.pop(name)
            entry = self._entries.get(name)
            self._changed(name, over.keys, entry[3] if entry is not None else ())

    def _changed(self, name: str, *keysets) -> None:
        """One more generation, and what it touched (lock held)."""
        self._generation += 1
        touched = {name}
        for keys in keysets:
            touched.update(keys)
        self._changes.append((self._generation, touched))

    def touched_since(self, generation: int) -> tuple[int, Optional[set]]:
        """(the generation now, the names and index keys changed since `generation`), or with
        None for the set when that is not known (a list replaced everything since, or more
        changes than the log keeps): then everything may have changed."""
        with self._lock:
            self._expire()
            now = self._generation
            if generation == now:
                return now, set()
            if generation < self._listed_at or generation > now or not self._changes \
                    or self._changes[0][0] > generation + 1:
                return now, None
            out: set = set()
            for gen, touched in reversed(self._changes):
                if gen <= generation:
                    break
                out |= touched
            return now, out

    def _keys(self, obj: dict) -> tuple:
        return tuple(self._index_of(obj)) if self._index_of is not None else ()

    def _put(self, name: str, entry: tuple) -> None:
        old = self._entries.get(name)
        if old is not None:
            self._unindex(name, old[3])
        self._entries[name] = entry
        for key in entry[3]:
            self._index.setdefault(key, set()).add(name)

    def _unindex(self, name: str, keys: tuple) -> None:
        for key in keys:
            names = self._index.get(key)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._index[key]

    def _apply(self, kind: str, obj: dict) -> None:
        meta = obj.get("metadata") or {}
        name, rv, uid = meta.get("name"), meta.get("resourceVersion"), meta.get("uid")
        value = self._transform(obj) if kind != "DELETED" else None
        keys = self._keys(obj)
        with self._lock:
            old = self._entries.get(name)
            if kind == "DELETED":
                self._entries.pop(name, None)
                if old is not None:
                    self._unindex(name, old[3])
            else:
                self._put(name, (value, rv, uid, keys))
            self._seen[(name, rv)] = None
            while len(self._seen) > self._seen_window:
                self._seen.popitem(last=False)
            over = self._overlay.get(name)
            if over is not None and (
                    (over.value is not None and over.rv == rv)
                    or (over.value is None and kind == "DELETED" and (over.uid is None or over.uid == uid))):
                del self._overlay[name]  # the watch has caught up with the runtime's write
            self._changed(name, keys, old[3] if old is not None else (), over.keys if over is not None else ())
            self.events += 1

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self._rv is None:
                    self._list()
                self._watch()
                failures = 0
                self.last_error = None
            except Gone as e:
                log.info("%s: %s; listing again", self.kind, e)
                self._rv = None
            except Exception as e:  # noqa: BLE001 — the cache must outlive any one failure
                if self._stop.is_set():
                    break
                failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                delay = min(self._max_backoff, self._min_backoff * 2 ** (failures - 1))
                delay *= random.uniform(0.5, 1.0)
                log.warning("%s: %s; %s again in %.1fs", self.kind, self.last_error,
                            "watching" if self._rv else "listing", delay)
                self._stop.wait(delay)

    def _open(self, query: dict, read_timeout: float):
        resp = self._request(query, timeout=(self._connect_timeout, read_timeout))
        with self._lock:
            self._resp = resp
        if self._stop.is_set():
            _close(resp)
        return resp

    def _done(self, resp, *, reuse: bool = False) -> None:
        """Forgets the open response; one read to its end goes back to the pool (`reuse`)."""
        with self._lock:
            self._resp = None
        if reuse and not self._stop.is_set():
            try:
                resp.release_conn()
                return
            except Exception:  # noqa: BLE001 — then close it
                pass
        _close(resp)

    def _list(self) -> None:
        with self._lock:
            self._seq += 1
            started = self._seq
        entries: dict[str, tuple] = {}
        token: Optional[str] = None
        while True:
            query = {"labelSelector": self.selector, "limit": str(self.page_size), "continue": token}
            resp = self._open(query, self._list_timeout)
            try:
                data = resp.read()
                status = resp.status
            finally:
                self._done(resp, reuse=True)
            if status == 410:
                raise Gone(f"list continue token expired ({_message(data)})")
            if not 200 <= status < 300:
                raise WatchFailed(status, _message(data))
            page = json.loads(data)
            del data
            for obj in page.get("items") or []:
                meta = obj.get("metadata") or {}
                entries[meta["name"]] = (self._transform(obj), meta.get("resourceVersion"), meta.get("uid"),
                                         self._keys(obj))
            self.pages += 1
            token = (page.get("metadata") or {}).get("continue") or None
            rv = (page.get("metadata") or {}).get("resourceVersion")
            del page
            if not token:
                break
        index: dict[str, set[str]] = {}
        for name, entry in entries.items():
            for key in entry[3]:
                index.setdefault(key, set()).add(name)
        with self._lock:
            self._entries, self._index = entries, index
            for name, over in list(self._overlay.items()):
                listed = entries.get(name)
                if over.seq < started or (over.value is not None and listed is not None and listed[1] == over.rv):
                    del self._overlay[name]
            self._seen.clear()
            self._rv = rv
            self._generation += 1
            self._listed_at = self._generation
            self._changes.clear()
            self.lists += 1
        self._synced.set()
        log.info("%s: listed %d in %d page(s) at resourceVersion %s", self.kind, len(entries), self.pages, rv)

    def _watch(self) -> None:
        query = {"labelSelector": self.selector, "watch": "true", "resourceVersion": self._rv,
                 "allowWatchBookmarks": "true", "timeoutSeconds": str(self.watch_seconds)}
        resp = self._open(query, self.watch_seconds + 30.0)
        self.watches += 1
        try:
            if resp.status == 410:
                raise Gone(f"resourceVersion {self._rv} is gone ({_message(resp.read())})")
            if not 200 <= resp.status < 300:
                raise WatchFailed(resp.status, _message(resp.read()))
            for line in _lines(resp):
                if self._stop.is_set():
                    return
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message") or "410 Gone")
                    raise WatchFailed(obj.get("code") or 0, obj.get("message") or json.dumps(obj)[:300])
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(kind, obj)
                elif kind != "BOOKMARK":
                    log.warning("%s: unknown watch event %r", self.kind, kind)
                    continue
                if rv:
                    self._rv = rv
        finally:
            self._done(resp)


def _close(resp) -> None:
    """Closes a response another thread may be reading (a watch): the blocked read ends at once.
    `shutdown()` (urllib3 2.3+) is urllib3's way to do that; `close()` then frees it."""
    try:
        shutdown = getattr(resp, "shutdown", None)
        if shutdown is not None:
            shutdown()
        resp.close()
    except Exception:  # noqa: BLE001 — closing is best effort
        pass
