"""The cluster runtime: models as Knative Services (realtime) and JobSinks + Triggers (batch).

The only module that imports the `kubernetes` client (lazily: `modelplane render` and the
local runtime never load it). It keeps no state of its own: versions, the live version and
status are all read back from the cluster — labels, the `modelplane.dev/*` annotations
that `knative_objects` writes, and the `status` the Knative controllers report.

Every Kubernetes API error becomes a `control.errors` class in one place (`_raise_api_error`):
403 names the missing permission, 422 the rejected field, connection problems are
`Unavailable` (try again later).
"""
from __future__ import annotations

import base64
import gc
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Mapping, Optional
from urllib.parse import quote

import urllib3

from adapters.manifest import Manifest, semver_key
from control.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    PlaneError,
    Unavailable,
    UpstreamError,
)
from control.events import event_id as ce_event_id
from control.runtime import knative_objects as ko
from control.runtime.base import (MAX_PINS, Job, ModelDetail, ModelInfo, ProxyResponse, Runtime, Traffic, VersionInfo,
                                  made_live, rolled_back_to, version_tag, walk_back)
from control.runtime.base import CANCELLED_BY, cancel_too_late

log = logging.getLogger(__name__)

# resource key -> (API group, version, plural, kind)
RESOURCES = {
    "services": ("serving.knative.dev", "v1", "services", "Service"),
    "revisions": ("serving.knative.dev", "v1", "revisions", "Revision"),
    "jobsinks": ("sinks.knative.dev", "v1alpha1", "jobsinks", "JobSink"),
    "triggers": ("eventing.knative.dev", "v1", "triggers", "Trigger"),
    "jobs": ("batch", "v1", "jobs", "Job"),
    "pods": ("", "v1", "pods", "Pod"),
    "pods/log": ("", "v1", "pods", "Pod log"),
    "secrets": ("", "v1", "secrets", "Secret"),
    "events": ("", "v1", "events", "Event"),
}
MANAGED = f"{ko.LABEL_MANAGED}={ko.MANAGED_BY}"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
ENDPOINT_TTL = 10.0  # seconds a model's URL is cached by `forward`
REVISION_WAIT = 30.0  # seconds a deploy waits for Knative to create the new version's Revision
READ_TIMEOUT_MARGIN = 30.0  # seconds past a revision's own timeout before `forward` gives up
#: Revision Ready=False reasons no wait mends (the image cannot be resolved): the deploy check fails at once
PERMANENT_REVISION_FAILURES = {"ContainerMissing"}
BUCKET_LIST_TTL = 30.0  # seconds a batch model's results/ listing answers GET /api/jobs before it is listed again
WRITE_ATTEMPTS = 5  # read-modify-write rounds before a concurrently changed object is given up on
# On every create and patch: an unknown or duplicate field is refused (400), as `kubectl apply`
# does, instead of the API server's default (Warn), which drops it with only a warning header.
STRICT = {"fieldValidation": "Strict"}


class _Stale(Exception):
    """A write's resourceVersion precondition failed: another writer (a second control replica)
    changed the object since it was read. Read it again and redo the change."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _condition(obj: Mapping, kind: str = "Ready") -> Optional[dict]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def _condition_text(c: Mapping) -> str:
    return c.get("message") or c.get("reason") or "not ready"


def _parse_manifest(text: Optional[str]) -> Optional[Manifest]:
    if not text:
        return None
    try:
        return Manifest.model_validate(json.loads(text) if isinstance(text, str) else text)
    except Exception:  # an annotation edited by hand: show the model, without its manifest
        log.warning("unreadable %s annotation", ko.ANN_MANIFEST)
        return None


def _raise_api_error(status: int, reason: str, body: str, *, verb: str, resource: str,
                     name: Optional[str], namespace: str) -> None:
    """The one place Kubernetes API failures become PlaneErrors."""
    group, _, plural, kind = RESOURCES.get(resource, ("", "", resource, resource))
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        payload = {}
    message = payload.get("message") or reason or f"HTTP {status}"
    what = f"{kind} {name}" if name else f"{kind} objects"
    if status == 403:
        full = f"{resource}.{group}" if group else resource
        raise Forbidden(
            f"the cluster refused to {verb} {full} in namespace {namespace}: the control service's "
            f"service account lacks that permission (verb '{verb}', resource '{resource}', API group "
            f"'{group or 'core'}', namespace '{namespace}'); grant it in knative/rbac.yaml. "
            f"API server said: {message}",
            details={"permission": {"verb": verb, "resource": resource, "apiGroup": group,
                                    "namespace": namespace}})
    if status == 404:
        if verb == "create":
            raise Unavailable(f"cannot create {what} in namespace {namespace}: {message} (are Knative and "
                              "the namespace installed?)")
        if name is None:
            raise Unavailable(f"the cluster has no {plural}.{group or 'core'} API: is Knative "
                              f"installed? ({message})")
        raise NotFound(f"{what} not found in namespace {namespace}")
    if status == 409:
        raise Conflict(f"{what}: {message}")
    if status in (400, 422):
        causes = (payload.get("details") or {}).get("causes") or []
        problems = [{"field": c.get("field", ""), "message": c.get("message", c.get("reason", ""))}
                    for c in causes]
        fields = "; ".join(f"field {p['field']}: {p['message']}" for p in problems) or message
        raise Invalid(f"the API server rejected {what}: {fields}", details={"problems": problems})
    if status == 401:
        raise UpstreamError(f"the cluster rejected the control service's credentials ({message})")
    if status == 0 or status == 429 or status >= 500:
        raise Unavailable(f"the Kubernetes API is unavailable ({message}); try again")
    raise UpstreamError(f"the Kubernetes API answered {status} to {verb} {what}: {message}")


class KnativeRuntime(Runtime):
    """Models on a Knative cluster, in `settings.namespace`, reached through the Kubernetes API."""

    name = "knative"
    #: only the live version, a candidate and pinned versions have a route (knative_objects.traffic_list)
    routes_every_version = False

    def __init__(self, settings, *, api_client=None, request_timeout: float = 30.0):
        self.settings = settings
        self.namespace = settings.namespace
        self._api = api_client
        self._timeout = (5.0, request_timeout)
        self._lock = threading.Lock()
        self._http = urllib3.PoolManager(num_pools=32, maxsize=64, block=False)
        self._endpoints: dict[str, tuple[str, float]] = {}
        self._timeouts: dict[str, float] = {}
        self._informers: Optional[dict] = None
        self._bucket_listings: dict[str, tuple[float, dict]] = {}
        self._ready = False
        self._rows: Optional[dict] = None   # the last list from the cache (`_models_from`)
        self._rows_lock = threading.Lock()

    # -- the Kubernetes API ------------------------------------------------------------------
    @property
    def api(self):
        with self._lock:
            if self._api is None:
                self._api = _default_api_client()
            return self._api

    def core_api(self):
        """The core API (Secrets, ConfigMaps) as this runtime's account: the token store and the
        audit trail's head live there (control/identity.py, control/audit.py)."""
        from kubernetes import client

        return client.CoreV1Api(self.api)

    # -- the watch cache -----------------------------------------------------------------------
    #: what the cache watches: resource -> (label selector, transform, index label)
    WATCHED = {
        "services": (MANAGED, "_lean_service", ko.LABEL_MODEL),
        "triggers": (MANAGED, "_lean_trigger", None),
        "jobsinks": (MANAGED, "_lean_sink", ko.LABEL_MODEL),
        "jobs": (f"{ko.JOBSINK_NAME_LABEL},{ko.LABEL_MODEL}", "_lean_job", ko.LABEL_MODEL),
        "pods": (f"{ko.LABEL_MODEL},serving.knative.dev/revision", "_lean_pod", ko.LABEL_MODEL),
    }

    def start(self) -> None:
        """List, then watch, what `models()` and `jobs()` read (control/runtime/knative_cache.py):
        from then on they answer from memory, not from a list of the world per request."""
        from control.runtime.knative_cache import Informer, by_label

        with self._lock:
            if self._informers is not None:
                return
            informers = {}
            for resource, (selector, transform, index) in self.WATCHED.items():
                informers[resource] = Informer(self._watch_request(resource), kind=resource, selector=selector,
                                               transform=globals()[transform],
                                               index=by_label(index) if index else None)
            self._informers = informers
        for informer in informers.values():
            informer.start()

    def _watch_request(self, resource: str):
        from control.runtime.knative_cache import api_request

        return api_request(lambda: self.api, self._path(resource))

    def ready(self) -> bool:
        """Whether reads are answered from a complete cache (every kind listed once)."""
        if self._ready:
            return True
        ready = self._informers is not None and all(i.synced for i in self._informers.values())
        if ready:
            self._ready = True
            # The cache is long-lived: millions of small objects for 10,000 models. Left to the
            # cyclic collector, every full collection walks them all (tens of ms, on whatever
            # request allocated last); frozen, the collector walks only what came after.
            gc.freeze()
        return ready

    def problems(self) -> list[str]:
        if self._informers is None or self.ready():
            return []
        waiting = [k for k, i in self._informers.items() if not i.synced]
        errors = [f"{k}: {i.last_error}" for k, i in self._informers.items() if not i.synced and i.last_error]
        return [f"the watch cache is still listing {', '.join(waiting)}" + (f" ({'; '.join(errors)})" if errors else "")]

    def _cache(self) -> Optional[dict]:
        return self._informers if self.ready() else None

    def models_generation(self):
        cache = self._cache()
        return None if cache is None else tuple(i.generation for i in cache.values())

    def _note(self, resource: str, obj: Any) -> None:
        informer = (self._informers or {}).get(resource)
        if informer is not None and isinstance(obj, dict) and obj.get("metadata"):
            informer.note(obj)

    def _forget(self, resource: str, name: str) -> None:
        informer = (self._informers or {}).get(resource)
        if informer is not None:
            informer.forget(name)

    def close(self) -> None:
        for informer in (self._informers or {}).values():
            informer.stop()
        self._http.clear()
        if self._api is not None and hasattr(self._api, "close"):
            try:
                self._api.close()
            except Exception:  # closing is best effort
                pass

    def _path(self, resource: str, name: Optional[str] = None) -> str:
        group, version, plural, _ = RESOURCES[resource]
        base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
        path = f"{base}/namespaces/{quote(self.namespace)}/{plural}"
        if name:
            path += f"/{quote(name)}"
        if resource == "pods/log":
            path += "/log"
        return path

    def _request(self, method: str, resource: str, name: Optional[str] = None, *, verb: str,
                 body: Any = None, query: Optional[dict] = None, content_type: str = "application/json",
                 raw: bool = False, subject: Optional[str] = None) -> Any:
        from kubernetes.client.exceptions import ApiException

        api = self.api
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            method, url, headers, body, _ = api.param_serialize(
                method=method, resource_path=self._path(resource, name),
                query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
                header_params=headers, body=body, auth_settings=["BearerToken"])
            resp = api.call_api(method, url, header_params=headers, body=body, _request_timeout=self._timeout)
            data = resp.read()
            status, reason = resp.status, resp.reason
        except ApiException as e:  # the client raises these itself for TLS and retry failures
            status, reason, data = e.status or 0, str(e.reason), (e.body or "").encode()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise Unavailable(f"cannot reach the Kubernetes API: {e}") from e
        if not 200 <= status < 300:
            _raise_api_error(status, reason, data.decode("utf-8", "replace") if data else "", verb=verb,
                             resource=resource, name=name or subject, namespace=self.namespace)
        if raw:
            return data.decode("utf-8", "replace")
        return json.loads(data) if data else {}

    def _get(self, resource: str, name: str) -> dict:
        return self._request("GET", resource, name, verb="get")

    def _get_or_none(self, resource: str, name: str) -> Optional[dict]:
        try:
            return self._get(resource, name)
        except NotFound:
            return None

    def _list(self, resource: str, selector: str) -> list[dict]:
        return self._request("GET", resource, verb="list", query={"labelSelector": selector}).get("items") or []

    def _create(self, resource: str, body: dict) -> dict:
        created = self._request("POST", resource, verb="create", body=body, query=STRICT,
                                subject=(body.get("metadata") or {}).get("name"))
        self._note(resource, created)
        return created

    def _patch(self, resource: str, name: str, patch: dict, *, resource_version: Optional[str] = None) -> dict:
        """A merge patch; with `resource_version`, only if the object is still that version
        (the API server answers 409 otherwise, raised here as `_Stale`)."""
        if resource_version is not None:
            patch = {**patch, "metadata": {**patch.get("metadata", {}), "resourceVersion": resource_version}}
        try:
            patched = self._request("PATCH", resource, name, verb="patch", body=patch, query=STRICT,
                                    content_type="application/merge-patch+json")
            self._note(resource, patched)
            return patched
        except Conflict:
            if resource_version is None:
                raise
            raise _Stale(f"{resource}/{name}") from None

    def _read_modify_write(self, what: str, change):
        """`change()` reads, decides and writes with a resourceVersion precondition; run it again
        while another writer got in between, a bounded number of times."""
        for _ in range(WRITE_ATTEMPTS):
            try:
                return change()
            except _Stale:
                continue
        raise Conflict(f"{what} kept changing while this request tried to update it "
                       f"({WRITE_ATTEMPTS} attempts): try again")

    def _delete(self, resource: str, name: str) -> bool:
        try:
            self._request("DELETE", resource, name, verb="delete",
                          body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            self._forget(resource, name)
            return True
        except NotFound:
            return False

    # -- deploy --------------------------------------------------------------------------------
    def render(self, manifest: Manifest) -> str:
        return ko.render_yaml(manifest, self.settings)

    def deploy(self, manifest: Manifest, *, make_live: bool = True) -> VersionInfo:
        objects = ko.render_objects(manifest, self.settings)  # Invalid before any request
        manifest = ko.revalidate(manifest)
        if manifest.kind == "realtime":
            if self._get_or_none("triggers", manifest.name) is not None:
                raise Conflict(f"{manifest.name} is deployed as a batch model; remove it before "
                               "deploying it as realtime")
            info = self._deploy_realtime(manifest, objects[0], make_live=make_live)
            # a dataset for it runs as a job streamed through its Service (adapters/stream.py)
            sink, trig = ko.stream_objects(manifest, self.settings)
            self._deploy_batch(manifest, sink, trig, make_live=info.live)
            return info
        if self._get_or_none("services", manifest.name) is not None:
            raise Conflict(f"{manifest.name} is deployed as a realtime model; remove it before "
                           "deploying it as batch")
        return self._deploy_batch(manifest, objects[0], objects[1], make_live=make_live)

    def _deploy_realtime(self, manifest: Manifest, svc: dict, *, make_live: bool) -> VersionInfo:
        """A new version is a new template (Knative makes it a Revision, which keeps the version's
        manifest in its annotations from then on); the Service carries only the live version's
        manifest and the bounded split (`modelplane.dev/traffic`). Every write is conditional on
        the resourceVersion it was computed from, so none made by another replica is lost."""
        name, version = manifest.name, manifest.version
        revision = ko.object_name(manifest)

        before: list = [None]   # the live version the write replaced (read in `change`)

        def change() -> VersionInfo:
            existing = self._get_or_none("services", name)
            before[0] = None
            if existing is None:
                body = json.loads(json.dumps(svc))
                body["metadata"]["annotations"][ko.ANN_TRAFFIC] = _traffic_json(Traffic(live=version))
                try:
                    created = self._create("services", body)
                except Conflict:  # another replica created it a moment ago: add to theirs
                    raise _Stale(name) from None
                log.info("deployed %s %s: new Knative Service", name, version)
                return VersionInfo(version=version, deployed_at=created["metadata"].get("creationTimestamp") or _now(),
                                   live=True)
            history = self._history(existing)
            state = _traffic_state(existing, history)
            before[0] = state.live
            if version in history:
                self._same_or_conflict(manifest, history[version].get("manifest"))
                live = state.live == version
                return VersionInfo(version=version, deployed_at=history[version].get("deployed_at", ""), live=live)
            # The template moves on only once Knative has made the current one a Revision: a
            # template replaced before that never becomes one, and its version would be lost.
            self._await_revision(existing["spec"]["template"]["metadata"].get("name"))
            history[version] = {"revision": revision, "deployed_at": _now(), "manifest": manifest.to_dict()}
            meta: dict[str, Any] = {"annotations": {ko.ANN_VERSIONS: None, ko.ANN_TRAFFIC: None}}
            if make_live:
                state = _made_live(state, version)
                meta = _live_metadata(svc)
            meta["annotations"][ko.ANN_TRAFFIC] = _traffic_json(state)
            patch = {"metadata": meta,
                     "spec": {"template": svc["spec"]["template"], "traffic": _traffic_spec(name, history, state)}}
            self._patch("services", name, patch, resource_version=existing["metadata"]["resourceVersion"])
            log.info("deployed %s %s: new revision %s%s", name, version, revision, " (live)" if make_live else "")
            return VersionInfo(version=version, deployed_at=history[version]["deployed_at"], live=make_live)

        info = self._read_modify_write(f"Service {name}", change)
        self._await_revision(revision)
        self._endpoints.pop(name, None)
        if info.deployed_at and before[0] != version:
            self._await_ready(name, version, revision, previous=before[0] if info.live else None)
        return info

    def _await_ready(self, name: str, version: str, revision: str, *, previous: Optional[str]) -> None:
        """The deploy check on a cluster: wait (settings.deploy_check_timeout, else start_timeout)
        until Knative reports the new Revision Ready, or that it failed. Failed: the version stays
        deployed, marked failed with Knative's reason and the Revision's Warning events; the
        live version it would have replaced stays live (Knative kept routing to it: a Route
        moves to a revision only once it is Ready); 422. Neither within the time: it goes on
        starting, and the deploy answers (`GET /api/models/{name}` shows how it ends).

        Waiting also keeps a series of deploys from replacing a version while Knative is still
        activating it: an activating revision keeps its pods until it activates or its progress
        deadline passes, routed or not (serving pkg/reconciler/autoscaling/kpa/kpa.go
        `computeActiveCondition`)."""
        from control.runtime.base import DeployCheckFailed

        deadline = time.monotonic() + (self.settings.deploy_check_timeout or self.settings.start_timeout)
        rev, ready = None, {}
        while True:
            rev = self._get_or_none("revisions", revision)
            ready = _condition(rev or {}) or {}
            if ready.get("status") == "True":
                return
            # False can pass (a pod not scheduled yet, while the version it replaces frees the
            # node): it is final at once only for an image Knative cannot resolve, else when
            # it is still False when the time is up
            permanent = ready.get("status") == "False" and ready.get("reason") in PERMANENT_REVISION_FAILURES
            if permanent or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        if ready.get("status") == "False":
            entry = _revision_entry(rev) or {"failed": True, "revision": revision,
                                             "error": f"{ready.get('reason')}: {_condition_text(ready)}"}
            reason = self._explained(entry) or "Knative could not make it Ready"
            if previous is not None:
                self.rollback(name, version=previous)
            kept = f"{previous} stays live" if previous else "it takes no traffic"
            message = f"{name} {version} failed its deploy check, so {kept}: {reason}"
            log.warning("%s", message)
            raise DeployCheckFailed(message, details={"model": name, "version": version, "reason": reason,
                                                      "log_tail": "", "error_text": reason})
        log.info("%s %s: not Ready within the deploy check's time; Knative goes on starting it", name, version)

    def _await_revision(self, revision: Optional[str]) -> None:
        """Wait until Knative's Configuration controller has created `revision` (at most
        REVISION_WAIT seconds)."""
        if not revision:
            return
        deadline = time.monotonic() + REVISION_WAIT
        delay = 0.02
        while self._get_or_none("revisions", revision) is None:
            if time.monotonic() > deadline:
                raise Unavailable(f"Knative has not created Revision {revision} within {REVISION_WAIT:.0f} s: is "
                                  "Knative Serving's controller running? The version stays deployed; its "
                                  "Revision appears when the controller catches up")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _explained(self, entry: dict) -> Optional[str]:
        """A failed version's reason, with the warnings Kubernetes recorded for its Revision."""
        if not entry.get("failed"):
            return None
        warnings = self._warnings(entry.get("revision") or "")
        return entry.get("error") + (" (events: " + "; ".join(warnings) + ")" if warnings else "")

    def _warnings(self, name: str, limit: int = 5) -> list[str]:
        """The last Warning events of the object `name` (reason: message), oldest first; none when
        the events cannot be read (they explain, they are never needed)."""
        if not name:
            return []
        try:
            items = self._request("GET", "events", verb="list",
                                  query={"fieldSelector": f"involvedObject.name={name}"}).get("items") or []
        except PlaneError:
            return []
        items = [e for e in items if e.get("type") == "Warning"]
        items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or
                   (e.get("metadata") or {}).get("creationTimestamp") or "")
        return [f"{e.get('reason') or 'Warning'}: {(e.get('message') or '').strip()}"[:300] for e in items[-limit:]]

    def _history(self, svc: dict) -> dict[str, dict]:
        """Versions of a realtime model: its Revisions (each holds its version's manifest in the
        annotations Knative copies from the template), the template's version before Knative has
        made it one, and versions an older Service recorded in its own annotation."""
        name = svc["metadata"]["name"]
        out: dict[str, dict] = {}
        for rev in self._list("revisions", f"serving.knative.dev/service={name}"):
            entry = _revision_entry(rev)
            if entry is not None:
                out.setdefault(entry["manifest"]["version"], entry)
        for version, entry in _annotated_history(svc).items():
            out.setdefault(version, entry)
        return out

    def _deploy_batch(self, manifest: Manifest, sink: dict, trig: dict, *, make_live: bool) -> VersionInfo:
        """A batch version's JobSink and the model's Trigger (for a realtime version: its stream
        JobSink and `{model}-stream` Trigger)."""
        version = manifest.version
        name = trig["metadata"]["name"]
        sink_name = sink["metadata"]["name"]
        existing_sink = self._get_or_none("jobsinks", sink_name)
        new_sink = False
        if existing_sink is None:
            try:
                created = self._create("jobsinks", sink)["metadata"].get("creationTimestamp", _now())
                new_sink = True
                log.info("deployed %s %s: new JobSink %s", name, version, sink_name)
            except Conflict:  # another control replica created it a moment ago
                existing_sink = self._get("jobsinks", sink_name)
        if existing_sink is not None:
            self._same_or_conflict(manifest, (existing_sink["metadata"].get("annotations") or {}).get(ko.ANN_MANIFEST))
            created = existing_sink["metadata"].get("creationTimestamp", "")

        def change() -> bool:
            existing_trigger = self._get_or_none("triggers", name)
            if existing_trigger is None:
                try:
                    self._create("triggers", trig)
                except Conflict:
                    raise _Stale(name) from None
                return True
            if _trigger_model(existing_trigger) != manifest.name:
                raise Conflict(f"the Trigger {name} belongs to the model {_trigger_model(existing_trigger)}; "
                               f"give {manifest.name} another name", details={"model": manifest.name})
            if _trigger_sink(existing_trigger) == sink_name:
                return True
            if make_live and new_sink:
                self._point_trigger(existing_trigger, sink_name, trig)
                return True
            return False

        live = self._read_modify_write(f"Trigger {name}", change)
        return VersionInfo(version=version, deployed_at=created, live=live)

    @staticmethod
    def _same_or_conflict(manifest: Manifest, stored: Any) -> None:
        stored_json = stored if isinstance(stored, str) else json.dumps(stored or {})
        old = _parse_manifest(stored_json)
        if old is None or ko.manifest_json(old) != ko.manifest_json(manifest):
            raise Conflict(f"{manifest.name} {manifest.version} is already deployed with a different "
                           "manifest; versions are immutable: give this one a new version")

    def _point_trigger(self, existing: dict, sink_name: str, rendered: Optional[dict] = None) -> None:
        spec = dict((rendered or {}).get("spec") or {})
        spec["subscriber"] = {"ref": {"apiVersion": ko.JOBSINK_API, "kind": "JobSink", "name": sink_name}}
        patch: dict[str, Any] = {"spec": spec}
        if rendered:
            patch["metadata"] = {"labels": rendered["metadata"]["labels"]}
        else:
            sink = self._get("jobsinks", sink_name)
            patch["metadata"] = {"labels": {ko.LABEL_VERSION: sink["metadata"]["labels"].get(ko.LABEL_VERSION),
                                            "app.kubernetes.io/version":
                                                sink["metadata"]["labels"].get("app.kubernetes.io/version")}}
        self._patch("triggers", existing["metadata"]["name"], patch,
                    resource_version=existing["metadata"]["resourceVersion"])

    # -- rollback / remove ------------------------------------------------------------------
    def rollback(self, name: str, *, version: Optional[str] = None) -> VersionInfo:
        if self._get_or_none("services", name) is not None:
            def change(history: dict, state: Traffic, svc: dict) -> Traffic:
                target = version
                if target is None and state.candidate:
                    return _state(state.live, state.past, history, svc, state.pinned)   # withdraw the rollout
                if target is None:
                    # walk back through the live history, past versions that failed; the version
                    # left is forgotten, so the next rollback goes further back
                    target, past = walk_back(state.past, state.live, _usable(history, svc))
                    if target is None:
                        raise Conflict(f"{name} has no rollout to withdraw and no earlier live version to return "
                                       f"to ({state.live} is the oldest in its history that can serve); name the "
                                       f"version to make live", details={"model": name})
                    return _state(target, past, history, svc, state.pinned)
                _known(name, history, target)
                if not _usable(history, svc)(target):
                    raise Conflict(f"{name} {target} failed to become Ready, so it takes no traffic; deploy a "
                                   f"fixed version", details={"model": name, "version": target})
                return _state(target, rolled_back_to(state.past, state.live, target), history, svc, state.pinned)

            history, state = self._change_traffic(name, change)
            live = state.live
            self._stream_follows(name, live)
            log.info("rolled %s back: %s live (revision %s)", name, live, history[live]["revision"])
            return VersionInfo(version=live, deployed_at=history[live].get("deployed_at", ""), live=True)
        if self._get_or_none("triggers", name) is None:
            raise NotFound(f"no model named {name}")
        if version is None:
            raise BadRequest(f"{name} is a batch model: name the version to make live")
        target = self._version_sink(name, version)

        def change() -> None:
            trig = self._get_or_none("triggers", name)
            if trig is None:
                raise NotFound(f"no model named {name}")
            self._point_trigger(trig, target["metadata"]["name"])

        self._read_modify_write(f"Trigger {name}", change)
        log.info("rolled %s back to %s (JobSink %s)", name, version, target["metadata"]["name"])
        return VersionInfo(version=version, deployed_at=target["metadata"].get("creationTimestamp", ""), live=True)

    def rollout(self, name: str, *, version: str, percent: int = 0, shadow: int = 0) -> Traffic:
        if not (0 <= percent <= 100 and 0 <= shadow <= 100):
            raise BadRequest("percent and shadow are 0 to 100")
        if self._get_or_none("services", name) is None:
            if self._get_or_none("triggers", name) is not None:
                raise BadRequest(f"{name} is a batch model: a rollout splits requests, and it takes none")
            raise NotFound(f"no model named {name}")

        def change(history: dict, state: Traffic, svc: dict) -> Traffic:
            _known(name, history, version)
            if not _usable(history, svc)(version):
                raise Conflict(f"{name} {version} failed to become Ready, so it takes no traffic; deploy a "
                               f"fixed version", details={"model": name, "version": version})
            if version == state.live:
                raise Conflict(f"{name} {version} is the live version already; roll out another one",
                               details={"model": name, "version": version})
            return Traffic(live=state.live, candidate=version, percent=percent, shadow=shadow,
                           previous=state.previous, past=state.past, pinned=state.pinned)

        return self._change_traffic(name, change)[1]

    def promote(self, name: str) -> VersionInfo:
        def change(history: dict, state: Traffic, svc: dict) -> Traffic:
            if not state.candidate:
                raise Conflict(f"{name} has no rollout to promote; start one with "
                               f"`modelplane rollout {name} VERSION --percent P`")
            return _made_live(state, state.candidate)

        history, state = self._change_traffic(name, change)
        self._stream_follows(name, state.live)
        return VersionInfo(version=state.live, deployed_at=history[state.live].get("deployed_at", ""), live=True)

    def _stream_follows(self, name: str, live: str) -> None:
        """A realtime model's `{model}-stream` Trigger follows its live version's stream JobSink, so
        a dataset's rows are checked by the manifest of the version that scores them."""
        try:
            sink = self._version_sink(name, live)["metadata"]["name"]
        except NotFound:   # a version deployed before realtime models took datasets: no JobSink
            log.warning("%s %s has no stream JobSink: datasets still go to the one the Trigger names", name, live)
            return

        def change() -> None:
            trig = self._get_or_none("triggers", ko.stream_trigger_name(name))
            if trig is not None and _trigger_sink(trig) != sink:
                self._point_trigger(trig, sink)

        self._read_modify_write(f"Trigger {ko.stream_trigger_name(name)}", change)

    def pin(self, name: str, version: str) -> Traffic:
        """Give a deployed version a route of its own at 0 % (its tag's URL), MAX_PINS at most."""
        def change(history: dict, state: Traffic, svc: dict) -> Traffic:
            _known(name, history, version)
            if version in state.routed():
                return state
            if len(state.pinned) >= MAX_PINS:
                raise Conflict(f"{name} has {MAX_PINS} pinned versions already ({', '.join(state.pinned)}): each "
                               f"keeps its scaling.min pods and a Service of its own; unpin one first",
                               details={"model": name, "pinned": state.pinned})
            state.pinned = [*state.pinned, version]
            return state

        return self._change_traffic(name, change)[1]

    def unpin(self, name: str, version: str) -> Traffic:
        """Take a pinned version's route away (the live version and a candidate keep theirs)."""
        def change(history: dict, state: Traffic, svc: dict) -> Traffic:
            if version not in state.pinned:
                raise NotFound(f"{name} {version} is not pinned (pinned: {', '.join(state.pinned) or 'none'})")
            state.pinned = [v for v in state.pinned if v != version]
            return state

        return self._change_traffic(name, change)[1]

    def _version_sink(self, name: str, version: str) -> dict:
        """The JobSink of one version of a batch model; NotFound naming the versions there are."""
        sinks = self._list("jobsinks", f"{ko.LABEL_MODEL}={name}")
        sink = next((s for s in sinks if _sink_version(s) == version), None)
        if sink is None:
            known = _sorted({_sink_version(s) for s in sinks})
            raise NotFound(f"{name} has no version {version}; versions: {', '.join(known) or 'none'}")
        return sink

    def version_manifest(self, name: str, version: str) -> dict:
        svc = self._get_or_none("services", name)
        if svc is not None:
            history = self._history(svc)
            _known(name, history, version)
            return dict(history[version].get("manifest") or {})
        if self._get_or_none("triggers", name) is None:
            raise NotFound(f"no model named {name}")
        manifest = _parse_manifest((self._version_sink(name, version)["metadata"].get("annotations") or {})
                                   .get(ko.ANN_MANIFEST))
        return manifest.to_dict() if manifest else {}

    def traffic(self, name: str) -> Traffic:
        svc = self._get_or_none("services", name)
        if svc is None:
            return super().traffic(name)
        return _traffic_state(svc, self._history(svc))

    def _change_traffic(self, name: str, change) -> tuple[dict, Traffic]:
        """Read the Service, compute its new split with `change(history, state)`, write the
        annotation and `spec.traffic` together, conditional on what was read."""
        def attempt() -> tuple[dict, Traffic]:
            svc = self._get_or_none("services", name)
            if svc is None:
                raise NotFound(f"no realtime model named {name}")
            history = self._history(svc)
            before = _traffic_state(svc, history)
            state = change(history, before, svc)
            meta: dict[str, Any] = {"annotations": {}}
            if state.live != before.live and (history.get(state.live) or {}).get("manifest"):
                # the Service shows its live version: manifest, labels, visibility
                live = Manifest.model_validate(history[state.live]["manifest"])
                meta = _live_metadata(ko.realtime_service(live, self.settings))
            meta["annotations"][ko.ANN_TRAFFIC] = _traffic_json(state)
            meta["annotations"][ko.ANN_VERSIONS] = None
            patch = {"metadata": meta, "spec": {"traffic": _traffic_spec(name, history, state)}}
            self._patch("services", name, patch, resource_version=svc["metadata"]["resourceVersion"])
            return history, state

        result = self._read_modify_write(f"Service {name}", attempt)
        self._endpoints.pop(name, None)
        return result

    def remove(self, name: str) -> None:
        removed = self._delete("services", name)
        removed = self._delete("triggers", name) or removed
        self._delete("triggers", ko.stream_trigger_name(name))
        for sink in self._list("jobsinks", f"{ko.LABEL_MODEL}={name}"):
            removed = self._delete("jobsinks", sink["metadata"]["name"]) or removed
        self._endpoints.pop(name, None)
        if not removed:
            raise NotFound(f"no model named {name}")
        log.info("removed %s", name)

    # -- status -----------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        cache = self._cache()
        if cache is not None:   # from the watch cache: no request at all
            return self._models_from(cache)
        services = [_lean_service(s) for s in self._list("services", MANAGED)]
        triggers = [t for t in self._list("triggers", MANAGED) if not _streams(t)]
        sinks = [_lean_sink(s) for s in self._list("jobsinks", MANAGED)] if triggers else []
        pods = self._list("pods", f"{ko.LABEL_MODEL},serving.knative.dev/revision") if services else []
        jobs = self._list("jobs", f"{ko.JOBSINK_NAME_LABEL},{ko.LABEL_MODEL}") if triggers else []
        out = [self._realtime_detail(s, pods, brief=True) for s in services]
        by_name = {s["metadata"]["name"]: s for s in sinks}
        out += [self._batch_detail(t, by_name, jobs, brief=True) for t in triggers]
        return sorted(out, key=lambda m: m.name)

    def _models_from(self, cache: dict) -> list[ModelInfo]:
        """The list from the watch cache, rebuilt only for the models whose objects changed since
        the last call (the informers' change logs), so a list after one change costs one row."""
        with self._rows_lock:
            state = self._rows
            gens, touched = {}, set()
            for resource, informer in cache.items():
                since = state["gens"].get(resource, -1) if state else -1
                gens[resource], changed = informer.touched_since(since)
                if changed is None:
                    touched = None
                elif touched is not None:
                    touched |= changed
            if state is not None and touched is not None and not touched:
                return list(state["list"])
            rows: dict = {} if touched is None else state["rows"]
            names = set(cache["services"].snapshot()[1]) | set(cache["triggers"].snapshot()[1]) \
                if touched is None else touched
            reordered = touched is None
            for name in names:
                svc, trig = cache["services"].get(name), cache["triggers"].get(name)
                if trig is not None and _streams(trig):
                    trig = None   # a realtime model's `{model}-stream` Trigger: no model of its own
                existed = name in rows
                if svc is not None:
                    rows[name] = self._realtime_detail(svc, cache["pods"].by_index(name), brief=True)
                elif trig is not None:
                    sink = cache["jobsinks"].get(_trigger_sink(trig))
                    rows[name] = self._batch_detail(trig, {_trigger_sink(trig): sink} if sink else {},
                                                    cache["jobs"].by_index(name), brief=True)
                else:
                    rows.pop(name, None)
                reordered = reordered or existed != (name in rows)
            if reordered or state is None:
                order = sorted(rows)
                position = {n: i for i, n in enumerate(order)}
                listed = [rows[n] for n in order]
            else:
                order, position = state["order"], state["position"]
                listed = list(state["list"])
                for name in names:
                    if name in position:
                        listed[position[name]] = rows[name]
            self._rows = {"gens": gens, "rows": rows, "order": order, "position": position, "list": listed}
            return list(listed)

    def model(self, name: str) -> ModelDetail:
        svc = self._get_or_none("services", name)
        if svc is not None:
            pods = self._list("pods", f"{ko.LABEL_MODEL}={name},serving.knative.dev/revision")
            return self._realtime_detail(svc, pods)
        trig = self._get_or_none("triggers", name)
        if trig is None:
            raise NotFound(f"no model named {name}")
        sinks = {s["metadata"]["name"]: s for s in self._list("jobsinks", f"{ko.LABEL_MODEL}={name}")}
        jobs = self._list("jobs", f"{ko.JOBSINK_NAME_LABEL},{ko.LABEL_MODEL}={name}")
        return self._batch_detail(trig, sinks, jobs)

    def _realtime_detail(self, svc: dict, pods: list[dict], *, brief: bool = False):
        name = svc["metadata"]["name"]
        if brief:
            # A row of the list: from the Service alone (its live version and that version's
            # manifest), no request per model.
            history, state = {}, _brief_state(svc)
            manifest = _Brief.of(svc.get(_BRIEF) if _BRIEF in svc else _live_summary(svc, state.live))
            revision = f"{name}-{ko.version_slug(state.live)}" if state.live else None
        else:
            history = self._history(svc)
            state = _traffic_state(svc, history)
            entry = history.get(state.live) or {}
            revision = entry.get("revision")
            manifest = _parse_manifest(json.dumps(entry["manifest"])) if entry.get("manifest") else None
        live_version = state.live
        status_obj = svc.get("status") or {}
        replicas = sum(1 for p in pods if _pod_ready(p)
                       and (p["metadata"].get("labels") or {}).get("serving.knative.dev/revision") == revision)
        ready = _condition(svc)
        generation = svc["metadata"].get("generation", 0)
        observed = status_obj.get("observedGeneration", 0)
        error = None
        if ready is not None and ready.get("status") == "False":
            status, error = "failed", _condition_text(ready)
        elif ready is not None and ready.get("status") == "True" and observed >= generation:
            status = "ready" if replicas else "idle"
        else:
            status = "starting"
        endpoint = status_obj.get("url")
        common = dict(name=name, kind="realtime", language=manifest.language if manifest else "other",
                      version=live_version, status=status, replicas=replicas, endpoint=endpoint, error=error,
                      description=manifest.description if manifest else "",
                      owner=manifest.owner if manifest else "", labels=dict(manifest.labels) if manifest else {})
        if brief:
            return ModelInfo(**common)
        versions = [VersionInfo(version=v, deployed_at=history[v].get("deployed_at", ""), live=v == live_version,
                                failed=bool(history[v].get("failed")), error=self._explained(history[v]))
                    for v in _sorted(history)]
        cluster = {k: status_obj.get(k) for k in ("url", "latestReadyRevisionName", "latestCreatedRevisionName",
                                                   "traffic", "conditions", "observedGeneration")}
        cluster["address"] = (status_obj.get("address") or {}).get("url")
        traffic = state.to_json()
        urls = {t.get("tag"): t.get("url") for t in status_obj.get("traffic") or [] if t.get("tag")}
        for target in traffic["targets"]:
            rev = (history.get(target["version"]) or {}).get("revision")
            target["url"] = urls.get(target["tag"])
            target["replicas"] = sum(1 for p in pods if _pod_ready(p) and (p["metadata"].get("labels") or {})
                                     .get("serving.knative.dev/revision") == rev)
        return ModelDetail(**common, manifest=manifest.to_dict() if manifest else {}, versions=versions,
                           metrics={"replicas": replicas, "cluster": cluster}, traffic=traffic)

    def _batch_detail(self, trig: dict, sinks: Mapping[str, dict], jobs: list[dict], *, brief: bool = False):
        name = trig["metadata"]["name"]
        live_sink = sinks.get(_trigger_sink(trig))
        if live_sink is None:
            manifest = None
        elif brief:
            manifest = _Brief.of(live_sink.get(_BRIEF) if _BRIEF in live_sink else _summary(
                (live_sink["metadata"].get("annotations") or {}).get(ko.ANN_MANIFEST)))
        else:
            manifest = _parse_manifest((live_sink["metadata"].get("annotations") or {}).get(ko.ANN_MANIFEST))
        active = sum(1 for j in jobs if (j["metadata"].get("labels") or {}).get(ko.LABEL_MODEL) == name
                     and (j.get("status") or {}).get("active"))
        conds = [("Trigger", _condition(trig))] + ([("JobSink", _condition(live_sink))] if live_sink else [])
        error = None
        if live_sink is None:
            status, error = "failed", f"the Trigger points at JobSink {_trigger_sink(trig)!r}, which does not exist"
        elif any(c is not None and c.get("status") == "False" for _, c in conds):
            status = "failed"
            error = "; ".join(f"{k}: {_condition_text(c)}" for k, c in conds if c and c.get("status") == "False")
        elif all(c is not None and c.get("status") == "True" for _, c in conds):
            status = "ready" if active else "idle"
        else:
            status = "starting"
        endpoint = (((live_sink or {}).get("status") or {}).get("address") or {}).get("url") if live_sink else None
        common = dict(name=name, kind="batch", language=manifest.language if manifest else "other",
                      version=manifest.version if manifest else None, status=status, replicas=active,
                      endpoint=endpoint, error=error, description=manifest.description if manifest else "",
                      owner=manifest.owner if manifest else "", labels=dict(manifest.labels) if manifest else {})
        if brief:
            return ModelInfo(**common)
        by_version = {_sink_version(s): s for s in sinks.values()}
        versions = [VersionInfo(version=v, deployed_at=by_version[v]["metadata"].get("creationTimestamp", ""),
                                live=live_sink is not None and by_version[v] is live_sink)
                    for v in _sorted(by_version)]
        cluster = {"trigger": (trig.get("status") or {}).get("conditions"),
                   "jobsink": _trigger_sink(trig),
                   "jobsink_conditions": ((live_sink or {}).get("status") or {}).get("conditions")}
        return ModelDetail(**common, manifest=manifest.to_dict() if manifest else {}, versions=versions,
                           metrics={"replicas": active, "cluster": cluster})

    # -- requests ---------------------------------------------------------------------------
    def _endpoint(self, name: str) -> str:
        cached = self._endpoints.get(name)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        svc = self._get_or_none("services", name)
        if svc is None:
            if self._get_or_none("triggers", name) is not None:
                raise BadRequest(f"{name} is a batch model: submit a job (POST /api/models/{name}/jobs)")
            raise NotFound(f"no model named {name}")
        status = svc.get("status") or {}
        # Prefer the cluster-local address: the control service runs in the cluster.
        url = (status.get("address") or {}).get("url") or status.get("url")
        if not url:
            raise Unavailable(f"{name} has no URL yet: Knative has not made it routable")
        self._endpoints[name] = (url.rstrip("/"), time.monotonic() + ENDPOINT_TTL)
        self._timeouts[name] = _revision_timeout(svc, self.settings)
        return url.rstrip("/")

    def _version_host(self, name: str, version: str) -> str:
        """The host one version answers at: its traffic tag's `{tag}-{name}` in the Service's
        namespace, the Kubernetes Service Knative makes for each tag (serving
        pkg/reconciler/route/resources/service.go MakeK8sPlaceholderService, named by
        knative/networking pkg/config/config.go DefaultTagTemplate). It points at the same
        ingress as the Service's own address, which routes by this Host."""
        key = f"{name}@{version}"
        cached = self._endpoints.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        svc = self._get_or_none("services", name)
        if svc is None:
            raise NotFound(f"no realtime model named {name}")
        history = self._history(svc)
        _known(name, history, version)
        state = _traffic_state(svc, history)
        if version not in state.routed():
            raise Conflict(f"{name} {version} has no route: on a cluster only the live version, a rollout's "
                           f"candidate and pinned versions have one (routed now: {', '.join(state.routed())}). "
                           f"Give it one with `modelplane pin {name} {version}` (or roll it out), or compare it "
                           f"with `modelplane compare`, which pins it while it runs",
                           details={"model": name, "version": version, "routed": state.routed()})
        tag = version_tag(version)
        if not ko.tag_fits(name, tag):
            raise BadRequest(f"{name} {version} has no URL of its own: {tag}-{name} is longer than a Kubernetes "
                             "Service name may be")
        namespace = svc["metadata"].get("namespace") or self.settings.namespace
        address = ((svc.get("status") or {}).get("address") or {}).get("url") or ""
        marker = f"{name}.{namespace}.svc."
        domain = address.split(marker, 1)[1].split("/")[0].split(":")[0] if marker in address else "cluster.local"
        host = f"{tag}-{name}.{namespace}.svc.{domain}"
        self._endpoints[key] = (host, time.monotonic() + ENDPOINT_TTL)
        return host

    def forward(self, name: str, *, method: str, path: str, headers: Mapping[str, str],
                body: bytes, query: str = "", version: Optional[str] = None) -> ProxyResponse:
        """Over pooled connections to the Service's URL (for one `version`, with its tag's Host);
        when it is scaled to zero, Knative's activator holds the request until a replica is ready."""
        url = self._endpoint(name) + "/" + path.lstrip("/") + (f"?{query}" if query else "")
        out_headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        if version:
            out_headers["Host"] = self._version_host(name, version)
        try:
            resp = self._http.request(method, url, body=body or None, headers=out_headers, retries=False,
                                      timeout=urllib3.Timeout(connect=10.0, read=self._read_timeout(name)),
                                      preload_content=True, redirect=False)
        except urllib3.exceptions.HTTPError as e:
            self._endpoints.pop(name, None)
            raise Unavailable(f"{name} did not answer at {url}: {e}") from e
        resp_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        return ProxyResponse(status=resp.status, headers=resp_headers, body=resp.data)

    def _read_timeout(self, name: str) -> float:
        """Past the longest its routed revisions may take (their `timeoutSeconds`, after which
        Knative's queue-proxy answers 504 itself): Knative answers first."""
        return self._timeouts.get(name, float(self.settings.max_revision_timeout)) + READ_TIMEOUT_MARGIN

    # -- jobs -------------------------------------------------------------------------------
    def submit_job(self, name: str, *, dataset: str, event_key: Optional[str] = None,
                   trigger: str = "api", version: Optional[str] = None) -> tuple[Job, bool]:
        """Create a Job from the live JobSink's template (or, with `version`, that version's
        JobSink) exactly as Knative's JobSink dispatcher does for a delivered event (same name
        scheme, labels, owner, event Secret), so jobs from the API and from bucket events look the
        same and the same event never runs twice."""
        if not dataset.startswith("gs://") or "/" not in dataset[5:]:
            raise Invalid(f"the cluster runtime reads datasets from the bucket: expected gs://bucket/object, "
                          f"got {dataset!r}", details={"problems": [{"field": "dataset", "message": "not a gs:// URI"}]})
        bucket, obj = dataset[5:].split("/", 1)
        trig = self._get_or_none("triggers", name)
        if trig is None:
            if self._get_or_none("services", name) is None:
                raise NotFound(f"no model named {name}")
            trig = self._get_or_none("triggers", ko.stream_trigger_name(name))
            if trig is None:
                raise Conflict(f"{name} was deployed before realtime models took datasets: deploy it again "
                               "to give it its stream JobSink", details={"model": name})
        if version is None:
            sink = self._get("jobsinks", _trigger_sink(trig))
        else:
            sink = self._version_sink(name, version)
        # An upload's key is `{bucket}/{object}#{generation}`; its bucket event's id is
        # `{object}#{generation}` (control/events.py). Named from that id, the Job is the one the
        # JobSink would make for the event, and finds when the event arrives: it makes none
        # (cmd/jobsink/main.go `ServeHTTP` lists Jobs by their job-sink-id label first).
        if event_key and event_key.startswith(bucket + "/") and "#" in event_key:
            event_id = event_key[len(bucket) + 1:]
        else:
            event_id = event_key or uuid.uuid4().hex
        source = ko.bucket_source(bucket)
        job_name = ko.job_name(sink["metadata"]["name"], source, event_id)
        body = ko.job_for_event(sink, name=job_name, event_id=event_id, source=source, dataset=dataset,
                                event_key=event_key, trigger_label=trigger)
        try:
            created = self._create("jobs", body)
        except Conflict:
            return self._to_job(self._get("jobs", job_name)), False
        event = ko.finalized_event(bucket=bucket, obj=obj, event_id=event_id)
        secret = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
            "metadata": {
                "name": job_name,
                "labels": {ko.JOBSINK_NAME_LABEL: sink["metadata"]["name"], ko.JOBSINK_ID_LABEL: job_name,
                           ko.LABEL_MODEL: name},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                     "uid": created["metadata"]["uid"], "controller": True,
                                     "blockOwnerDeletion": False}],
            },
            "data": {"event": base64.b64encode(json.dumps(event).encode()).decode()},
        }
        try:
            self._create("secrets", secret)
        except Conflict:
            pass
        log.info("job %s: %s on %s (%s)", job_name, name, dataset, trigger)
        return self._to_job(created), True

    def job_for_upload(self, name: str, *, bucket: str, obj: str, generation: str) -> Optional[str]:
        """The bucket event reaches the JobSink dispatcher, not this service: the Job it will
        create is named from the live JobSink and the event's source and id — the id the bridge
        (`modelplane watch`) gives, `{object}#{generation}` (control/events.py). Eventarc gives
        ids of its own: then the job is found with `modelplane jobs`."""
        trig = self._get_or_none("triggers", name) or self._get_or_none("triggers", ko.stream_trigger_name(name))
        if trig is None:
            return None
        return ko.job_name(_trigger_sink(trig), ko.bucket_source(bucket), ce_event_id(obj, generation))

    def jobs(self, *, model: Optional[str] = None, limit: int = 200) -> list[Job]:
        """The Jobs in the cluster, and the jobs whose Job is gone (its TTL passed, or it was
        cancelled) from what they left in the bucket: newest first."""
        cache = self._cache()
        if cache is not None:
            items = cache["jobs"].by_index(model) if model else cache["jobs"].values()
            triggers = cache["triggers"].values()
        else:
            selector = ko.JOBSINK_NAME_LABEL + (f",{ko.LABEL_MODEL}={model}" if model else f",{ko.LABEL_MODEL}")
            items = self._list("jobs", selector)
            triggers = None if model else self._list("triggers", MANAGED)
        items = sorted(items, key=lambda j: j["metadata"].get("creationTimestamp", ""), reverse=True)
        out = [self._to_job(j) for j in items[:limit]]
        in_cluster = {j["metadata"]["name"] for j in items}
        models = [model] if model else [_trigger_model(t) for t in triggers or []]
        # a job whose files were written before the oldest Job listed here cannot be newer than it
        since = out[-1].created_at[:19] if len(items) >= limit and out else ""
        try:
            gone = self._jobs_in_bucket(models, skip=in_cluster, limit=limit, since=since)
        except PlaneError as e:  # the cluster's jobs are still worth listing
            log.warning("jobs whose Job is gone are left out: %s", e.message)
            gone = []
        out += gone
        out.sort(key=lambda j: (j.created_at, j.id), reverse=True)
        return out[:limit]

    def job(self, job_id: str) -> Job:
        obj = self._get_or_none("jobs", job_id)
        if obj is None:
            found = self._job_in_bucket(job_id)
            if found is None:
                raise NotFound(f"no job {job_id}")
            return found
        if ko.JOBSINK_NAME_LABEL not in (obj["metadata"].get("labels") or {}):
            raise NotFound(f"no job {job_id}")
        job = self._to_job(obj)
        self._add_result(job)
        if job.status == "failed" or (job.status in ("queued", "running") and not job.log_tail):
            # why it failed, or why no container runs yet (a pod not admitted, an image not pulled)
            warnings = self._warnings(job_id)
            for pod in self._job_pods(job_id):
                warnings += self._warnings(pod)
            if warnings:
                job.log_tail = (job.log_tail + "\n" if job.log_tail else "") + "Kubernetes events:\n" + \
                    "\n".join(warnings[-10:])
        return job

    def cancel_job(self, job_id: str, *, by: str) -> Job:
        """Record the cancellation in the bucket (`CANCEL_FILE` in the job's results folder, written
        only if absent), then delete the Job, Background: the Job goes at once; the garbage
        collector deletes its pod (SIGTERM to both containers: the adapter stops the model and
        records the job failed, publishing no scores) and its event Secret (owned by the Job).
        From then on the job is listed from the bucket, as cancelled."""
        job = self.job(job_id)
        if job.cancelled:
            return job
        if job.status not in ("queued", "running"):
            raise cancel_too_late(job)
        job.status, job.error, job.finished_at = "failed", CANCELLED_BY + (by or "someone"), _now()
        job.results_uri, job.eta_seconds = None, None
        doc = {**job.to_json(), "log_tail": "", "cancelled_at": job.finished_at}
        name = f"results/{job.model}/{job.id}/{self.CANCEL_FILE}"
        try:
            from google.api_core import exceptions as gexc

            blob = self._bucket().blob(name)
            try:
                blob.upload_from_string(json.dumps(doc, indent=2) + "\n", content_type="application/json",
                                        if_generation_match=0)
            except gexc.PreconditionFailed:  # cancelled before, the Job left behind (a retry): delete it
                pass
        except Exception as e:  # noqa: BLE001 - any storage failure: the job is left running
            raise _storage_error(f"cannot record the cancellation of job {job_id} in "
                                 f"gs://{self.settings.bucket_name}/{name}, so the job was left running", e) from e
        self._delete("jobs", job_id)
        self._bucket_listings.pop(job.model, None)   # listed from the bucket from now on: at once
        log.info("job %s: cancelled by %s", job_id, by)
        return job

    # -- jobs whose Job is gone: what they left in the bucket -------------------------------------
    #: in a job's results folder: the adapter's result (adapters/batch.py) and our cancellation
    RESULT_FILE, CANCEL_FILE = "result.json", "cancelled.json"
    RESULTS_CACHE = 4096  # parsed files kept (they never change: each is written once)

    def _bucket(self):
        """The plane's bucket, through a storage client made on first use (control/gcs.py)."""
        with self._lock:
            if getattr(self, "_storage_client", None) is None:
                from control.gcs import storage_client

                self._storage_client = storage_client(state_dir=self.settings.state_dir)
                self._results_cache: "OrderedDict[tuple, dict]" = OrderedDict()
            return self._storage_client.bucket(self.settings.bucket_name)

    def _read_result(self, blob) -> Optional[dict]:
        """A job's result.json or cancellation, parsed; cached by name and generation (written once)."""
        key = (blob.name, blob.generation)
        with self._lock:
            cached = self._results_cache.get(key)
            if cached is not None:
                self._results_cache.move_to_end(key)
                return cached
        from google.api_core import exceptions as gexc

        try:
            doc = json.loads(blob.download_as_bytes())
        except gexc.NotFound:
            return None
        except ValueError:
            log.warning("gs://%s/%s is not JSON: left out", self.settings.bucket_name, blob.name)
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        with self._lock:
            self._results_cache[key] = doc
            while len(self._results_cache) > self.RESULTS_CACHE:
                self._results_cache.popitem(last=False)
        return doc

    def _bucket_entries(self, model: str, job_id: Optional[str] = None) -> dict[str, dict[str, Any]]:
        """job id -> {RESULT_FILE: blob, CANCEL_FILE: blob, "time": the newest one's} under
        results/{model}/ (or one job's folder). A model's whole folder is listed at most once every
        BUCKET_LIST_TTL seconds (the jobs found there are finished and their files immutable; the
        ones still running are the cluster's, from the watch cache), not on every request."""
        if job_id is None:
            hit = self._bucket_listings.get(model)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            out = self._list_bucket_entries(model, None)
            self._bucket_listings[model] = (time.monotonic() + BUCKET_LIST_TTL, out)
            while len(self._bucket_listings) > 1024:
                self._bucket_listings.pop(next(iter(self._bucket_listings)))
            return out
        return self._list_bucket_entries(model, job_id)

    def _list_bucket_entries(self, model: str, job_id: Optional[str]) -> dict[str, dict[str, Any]]:
        prefix = f"results/{model}/" + (f"{job_id}/" if job_id else "")
        out: dict[str, dict[str, Any]] = {}
        try:
            for blob in self._bucket().list_blobs(prefix=prefix):
                parts = blob.name[len(f"results/{model}/"):].split("/")
                if len(parts) != 2 or parts[1] not in (self.RESULT_FILE, self.CANCEL_FILE):
                    continue
                entry = out.setdefault(parts[0], {"time": ""})
                entry[parts[1]] = blob
                when = blob.time_created.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace(
                    "+00:00", "Z") if blob.time_created else ""
                entry["time"] = max(entry["time"], when)
        except Exception as e:  # noqa: BLE001 - storage, auth or transport: one error for all
            raise _storage_error(f"cannot list gs://{self.settings.bucket_name}/{prefix}", e) from e
        return out

    def _jobs_in_bucket(self, models: list[str], *, skip: set[str], limit: int, since: str = "") -> list[Job]:
        """The newest `limit` jobs of `models` that left a result or a cancellation in the bucket
        (newest by the files' time, at or after `since`) and are not in `skip`; only their files are read."""
        entries = [(entry["time"], model, job_id, entry) for model in models
                   for job_id, entry in self._bucket_entries(model).items()
                   if job_id not in skip and entry["time"][:19] >= since]
        entries.sort(key=lambda e: (e[0], e[2]), reverse=True)
        out = []
        for _, model, job_id, entry in entries[:limit]:
            job = self._job_from_bucket(model, job_id, entry)
            if job is not None:
                out.append(job)
        return out

    def _job_in_bucket(self, job_id: str, models: Optional[list[str]] = None) -> Optional[Job]:
        """A job whose Job is gone, found in the folder of the batch model it belongs to (the Job's
        name starts with its JobSink's, `{model}-{version}`: those models are tried first)."""
        if models is None:
            names = [_trigger_model(t) for t in self._list("triggers", MANAGED)]
            models = sorted(names, key=lambda m: (not job_id.startswith(m + "-"), -len(m)))
        for model in models:
            entry = self._bucket_entries(model, job_id).get(job_id)
            if entry is not None:
                job = self._job_from_bucket(model, job_id, entry)
                if job is not None:
                    return job
        return None

    def _job_from_bucket(self, model: str, job_id: str, entry: Mapping[str, Any]) -> Optional[Job]:
        """The job as its files tell it: the adapter's result.json, and the cancellation this
        runtime recorded, which stands unless the result is of a later run or says the job had
        published its scores (it succeeded before it could be stopped)."""
        result = self._read_result(entry[self.RESULT_FILE]) if self.RESULT_FILE in entry else None
        cancel = self._read_result(entry[self.CANCEL_FILE]) if self.CANCEL_FILE in entry else None
        if not result and not cancel:
            return None
        job = Job(id=job_id, model=model, version="", status="failed", dataset="", created_at="", trigger="unknown")
        if cancel:
            job = Job.from_json({**cancel, "id": job_id, "model": model})
        if result:
            later = cancel and str(result.get("started_at") or "") > str(cancel.get("cancelled_at") or "")
            if not cancel or later or result.get("status") == "succeeded":
                job.status = result.get("status") if result.get("status") in ("succeeded", "failed") else "failed"
                job.error = result.get("error")
                job.results_uri = result.get("results_uri") if job.status == "succeeded" else None
                if isinstance(result.get("score_summary"), dict) and job.status == "succeeded":
                    job.score_summary = result["score_summary"]
                job.finished_at = result.get("finished_at") or job.finished_at
            job.version = job.version or str(result.get("version") or "")
            inp = result.get("input") if isinstance(result.get("input"), dict) else {}
            job.input = {**inp, **job.input}
            job.dataset = job.dataset or str(inp.get("uri") or "")
            job.started_at = job.started_at or result.get("started_at")
            job.created_at = job.created_at or str(result.get("started_at") or entry.get("time") or "")
            job.rows = result.get("rows") if isinstance(result.get("rows"), int) else job.rows
            job.problems = (result.get("problems") or [])[:100] if isinstance(result.get("problems"), list) else []
            job.invalid_values = result.get("invalid_values")
            job.log_tail = str(result.get("log_tail") or "")[-4000:]
            if job.status == "succeeded" and isinstance(job.rows, int):
                job.rows_scored = job.rows_total = job.rows
        job.created_at = job.created_at or str(entry.get("time") or "")
        return job

    def _to_job(self, obj: dict) -> Job:
        meta, status = obj["metadata"], obj.get("status") or {}
        labels_, ann = meta.get("labels") or {}, meta.get("annotations") or {}
        model = labels_.get(ko.LABEL_MODEL, "")
        complete, failed = _condition(obj, "Complete"), _condition(obj, "Failed")
        error = None
        finished = None
        if complete is not None and complete.get("status") == "True":
            state = "succeeded"
            finished = status.get("completionTime") or complete.get("lastTransitionTime")
        elif failed is not None and failed.get("status") == "True":
            state = "failed"
            finished = failed.get("lastTransitionTime")
            error = f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".rstrip(": ")
        elif status.get("active") or status.get("startTime"):
            state = "running"
        else:
            state = "queued"
        dataset = ann.get(ko.ANN_DATASET, "")
        results_uri = None
        if state == "succeeded":
            results_uri = ko.results_prefix(self.settings, model, meta["name"]) + "scores.csv"
        return Job(id=meta["name"], model=model, version=ann.get(ko.ANN_VERSION, labels_.get(ko.LABEL_VERSION, "")),
                   status=state, dataset=dataset, created_at=meta.get("creationTimestamp", ""),
                   started_at=status.get("startTime"), finished_at=finished, results_uri=results_uri,
                   error=error, trigger=labels_.get(ko.LABEL_TRIGGER, "bucket"),
                   input={"event_key": ann.get(ko.ANN_EVENT_KEY)} if ann.get(ko.ANN_EVENT_KEY) else {})

    def _job_pods(self, job_id: str) -> list[str]:
        try:
            return [p["metadata"]["name"] for p in self._list("pods", f"job-name={job_id}")]
        except PlaneError:
            return []

    def _add_result(self, job: Job) -> None:
        """The Job's adapter container prints the result JSON as its last line: read it from its log."""
        try:
            pods = self._list("pods", f"job-name={job.id}")
            if not pods:
                return
            pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
            text = self._request("GET", "pods/log", pod["metadata"]["name"], verb="get", raw=True,
                                 query={"container": "adapter", "tailLines": "40"})
        except (NotFound, Invalid):  # the container has not started yet
            return
        lines = text.strip().splitlines()
        progress = [line for line in lines if line.startswith('{"progress"')]  # adapters/batch.py ProgressLog
        if progress:
            try:
                doc = json.loads(progress[-1]).get("progress")
            except (ValueError, AttributeError):
                doc = None
            if isinstance(doc, dict):
                job.apply_progress(doc)
            text = "\n".join(line for line in lines if not line.startswith('{"progress"'))
        job.log_tail = text[-4000:]
        for line in reversed(text.strip().splitlines()):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            if isinstance(result, dict) and "model" in result:
                job.rows = result.get("rows", job.rows)
                job.results_uri = result.get("results_uri", job.results_uri)
                job.error = result.get("error", job.error)
                job.input = result.get("input", job.input) or job.input
                job.problems = (result.get("problems") or [])[:100]
                job.invalid_values = result.get("invalid_values")
                if isinstance(result.get("score_summary"), dict):
                    job.score_summary = result["score_summary"]
                if job.status == "succeeded" and isinstance(job.rows, int):
                    job.rows_scored = job.rows_total = job.rows
                break


def _storage_error(what: str, e: Exception) -> PlaneError:
    """A bucket failure as the API tells it: 403 naming the missing permission, else try again."""
    from google.api_core import exceptions as gexc

    if isinstance(e, gexc.Forbidden):
        return Forbidden(f"{what}: the control service's identity lacks that permission on the bucket "
                         f"(README: Identities and bucket access): {e}")
    return Unavailable(f"{what}: {e}")


# -- helpers over cluster objects ---------------------------------------------------------------

def _default_api_client():
    """The cluster as kubectl finds it: in-cluster service account, else KUBECONFIG."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(client_configuration=cfg)
    except config.ConfigException as e:
        raise Unavailable(f"no Kubernetes cluster configured (KUBECONFIG or in-cluster service account): {e}") from e
    return client.ApiClient(cfg)


def _annotated_history(svc: dict) -> dict[str, dict]:
    """Versions the Service itself names: its template's (the newest, perhaps not a Revision
    yet), and those a Service written before versions were read from Revisions kept in its
    `modelplane.dev/versions` annotation (dropped at its next write)."""
    ann = svc["metadata"].get("annotations") or {}
    try:
        history = json.loads(ann.get(ko.ANN_VERSIONS) or "{}")
    except ValueError:
        history = {}
    if not isinstance(history, dict):
        history = {}
    template = svc["spec"]["template"]
    manifest = _parse_manifest((template["metadata"].get("annotations") or {}).get(ko.ANN_MANIFEST))
    if manifest is not None and manifest.version not in history:
        history[manifest.version] = {"revision": template["metadata"].get("name"),
                                     "deployed_at": svc["metadata"].get("creationTimestamp", ""),
                                     "manifest": manifest.to_dict()}
    return history


def _revision_entry(rev: dict) -> Optional[dict]:
    """One version from its Revision: the manifest in its annotations, when it was made, and
    whether Knative could not make it Ready (with Knative's reason)."""
    meta = rev.get("metadata") or {}
    manifest = _parse_manifest((meta.get("annotations") or {}).get(ko.ANN_MANIFEST))
    if manifest is None:
        return None
    ready = _condition(rev) or {}
    failed = ready.get("status") == "False"
    return {"revision": meta.get("name"), "deployed_at": meta.get("creationTimestamp", ""),
            "manifest": manifest.to_dict(), "failed": failed,
            "error": f"{ready.get('reason') or 'RevisionFailed'}: {_condition_text(ready)}" if failed else None}


def _live_metadata(svc: dict) -> dict:
    """The Service metadata that follows its live version: the manifest, the labels, and the
    visibility label, removed (null in a merge patch, RFC 7386) when the version is public."""
    labels = dict(svc["metadata"]["labels"])
    labels.setdefault(ko.LABEL_VISIBILITY, None)
    return {"labels": labels, "annotations": {ko.ANN_MANIFEST: svc["metadata"]["annotations"][ko.ANN_MANIFEST]}}


def _revision_timeout(svc: dict, settings) -> float:
    """The longest `timeoutSeconds` a request to the Service may meet: its template's, and the
    live version's (from its manifest, as knative_objects renders it)."""
    seconds = [float((svc["spec"]["template"].get("spec") or {}).get("timeoutSeconds") or 0)]
    manifest = _parse_manifest((svc["metadata"].get("annotations") or {}).get(ko.ANN_MANIFEST))
    if manifest is not None:
        seconds.append(float(ko.revision_timeout(manifest)))
    return max(seconds) or float(settings.max_revision_timeout)


def _rv(obj: Mapping) -> Optional[str]:
    return (obj.get("metadata") or {}).get("resourceVersion")


_BRIEF = "_brief"   # what a cached object carries of its manifest: the fields a row of the model list shows


def _summary(text: Optional[str]) -> Optional[dict]:
    """The fields of a manifest annotation a row of the list shows, without validating it whole
    (it was validated when deployed; a hand-edited one shows what it can)."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    labels = data.get("labels") if isinstance(data.get("labels"), dict) else {}
    return {"version": str(data.get("version") or ""), "language": str(data.get("language") or "other"),
            "description": str(data.get("description") or ""), "owner": str(data.get("owner") or ""),
            "labels": {str(k): str(v) for k, v in labels.items()}}


class _Brief:
    """A manifest summary with the attributes a row reads (language, description, owner, labels)."""

    __slots__ = ("version", "language", "description", "owner", "labels")

    def __init__(self, data: dict):
        for key in self.__slots__:
            setattr(self, key, data[key])

    @classmethod
    def of(cls, data: Optional[dict]) -> Optional["_Brief"]:
        return cls(data) if data else None


def _live_summary(svc: dict, live: Optional[str]) -> Optional[dict]:
    """The live version's summary from the Service itself: its manifest annotation (the live
    version's), else the template's or an older Service's recorded versions."""
    summary = _summary((svc["metadata"].get("annotations") or {}).get(ko.ANN_MANIFEST))
    if summary is not None and summary["version"] == live:
        return summary
    entry = _annotated_history(svc).get(live) or {}
    return _summary(json.dumps(entry["manifest"])) if entry.get("manifest") else None


def _lean_service(obj: dict) -> dict:
    """A Service as the cache keeps it: what a row of the list reads, with the live version's
    manifest summarised (10,000 Services fit in a control pod whatever their manifests)."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    ann = meta.get("annotations") or {}
    template_meta = (spec.get("template") or {}).get("metadata") or {}
    out = {"metadata": {**{k: meta.get(k) for k in ("name", "namespace", "labels", "resourceVersion", "generation",
                                                    "creationTimestamp", "deletionTimestamp", "uid")},
                        "annotations": {ko.ANN_TRAFFIC: ann.get(ko.ANN_TRAFFIC)} if ann.get(ko.ANN_TRAFFIC) else {}},
           "spec": {"traffic": spec.get("traffic") or [],
                    "template": {"metadata": {"name": template_meta.get("name")}}},
           "status": {k: status.get(k) for k in ("conditions", "observedGeneration", "url", "address",
                                                 "latestReadyRevisionName", "latestCreatedRevisionName", "traffic")
                      if k in status}}
    out[_BRIEF] = _live_summary(obj, _brief_state(obj).live)
    return out


def _streams(trig: dict) -> bool:
    """A realtime model's `{model}-stream` Trigger (knative_objects.stream_objects)."""
    return ((trig.get("metadata") or {}).get("labels") or {}).get(ko.LABEL_KIND) == "realtime"


def _trigger_model(trig: dict) -> str:
    meta = trig.get("metadata") or {}
    return (meta.get("labels") or {}).get(ko.LABEL_MODEL) or meta.get("name", "")


def _lean_trigger(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    return {"metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "resourceVersion", "uid")},
            "spec": {"subscriber": (obj.get("spec") or {}).get("subscriber") or {}},
            "status": {"conditions": (obj.get("status") or {}).get("conditions")}}


def _lean_sink(obj: dict) -> dict:
    """A JobSink without its Job template (which carries the manifest twice)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    return {"metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "resourceVersion", "uid",
                                                  "creationTimestamp")},
            "status": {"conditions": status.get("conditions"), "address": status.get("address")},
            _BRIEF: _summary((meta.get("annotations") or {}).get(ko.ANN_MANIFEST))}


def _lean_job(obj: dict) -> dict:
    """A Job without its pod template (the manifest in its environment)."""
    meta = obj.get("metadata") or {}
    return {"metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "annotations", "resourceVersion",
                                                  "uid", "creationTimestamp")},
            "status": obj.get("status") or {}}


def _lean_pod(obj: dict) -> dict:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    return {"metadata": {k: meta.get(k) for k in ("name", "labels", "resourceVersion", "uid", "deletionTimestamp")},
            "status": {"phase": status.get("phase"), "conditions": [c for c in status.get("conditions") or []
                                                                     if c.get("type") == "Ready"]}}


def _brief_state(svc: dict) -> Traffic:
    """The split as the Service's annotation records it, without checking its versions against
    the Revisions (a row of the model list)."""
    try:
        data = json.loads((svc["metadata"].get("annotations") or {}).get(ko.ANN_TRAFFIC) or "{}")
    except ValueError:
        data = {}
    if isinstance(data, dict) and isinstance(data.get("live"), str):
        return Traffic(live=data["live"], candidate=data.get("candidate"), percent=int(data.get("percent") or 0),
                       shadow=int(data.get("shadow") or 0))
    return _traffic_state(svc, _annotated_history(svc))


def _live_revision(svc: dict) -> Optional[str]:
    """The live revision of a Service without a traffic annotation (applied by hand from
    `modelplane render`, or written before rollouts): its target with 100 %."""
    for target in (svc.get("spec") or {}).get("traffic") or []:
        if target.get("percent") == 100 and target.get("revisionName"):
            return target["revisionName"]
    latest = (svc.get("status") or {}).get("latestReadyRevisionName")
    return latest or svc["spec"]["template"]["metadata"].get("name")


def _traffic_state(svc: dict, history: dict) -> Traffic:
    """The split the runtime wrote (`modelplane.dev/traffic`), versions it no longer has dropped;
    without one, the live version is the revision with 100 %."""
    ann = svc["metadata"].get("annotations") or {}
    try:
        data = json.loads(ann.get(ko.ANN_TRAFFIC) or "{}")
    except ValueError:
        data = {}
    live = data.get("live") if data.get("live") in history else None
    if live is None:
        revision = _live_revision(svc)
        live = next((v for v, e in history.items() if e.get("revision") == revision), None)
        return Traffic(live=live)
    candidate = data.get("candidate") if data.get("candidate") in history and data.get("candidate") != live else None
    past = data.get("past")
    if not isinstance(past, list):   # written before the history was kept: its one step back
        past = [data["previous"]] if data.get("previous") else []
    pinned = [v for v in data.get("pinned") or [] if v in history and v not in (live, candidate)][:MAX_PINS]
    state = _state(live, past, history, svc, pinned)
    if candidate:
        state.candidate, state.percent, state.shadow = candidate, int(data.get("percent") or 0), \
            int(data.get("shadow") or 0)
    return state


def _state(live: Optional[str], past: list, history: dict, svc: dict, pinned=()) -> Traffic:
    """`live` taking every request, with its history of earlier live versions (those still
    deployed), the version a rollback would return to, and the pinned versions."""
    past = [v for v in past if v in history]
    return Traffic(live=live, past=past, previous=walk_back(past, live, _usable(history, svc))[0],
                   pinned=[v for v in pinned if v != live])


def _failed_revision(svc: dict) -> Optional[str]:
    """The Service's newest revision, when Knative could not make it Ready (it takes no traffic)."""
    status = svc.get("status") or {}
    created, ready = status.get("latestCreatedRevisionName"), status.get("latestReadyRevisionName")
    condition = _condition(svc, "ConfigurationsReady") or {}
    return created if created and created != ready and condition.get("status") == "False" else None


def _usable(history: dict, svc: dict):
    """Whether a version can take traffic: still deployed, and not a revision that failed."""
    failed = _failed_revision(svc)
    return lambda v: v in history and not history[v].get("failed") and (
        failed is None or history[v].get("revision") != failed)


def _traffic_json(state: Traffic) -> str:
    return json.dumps({"live": state.live, "candidate": state.candidate, "percent": state.percent,
                       "shadow": state.shadow, "previous": state.previous, "past": state.past,
                       "pinned": state.pinned}, sort_keys=True)


def _traffic_spec(name: str, history: dict, state: Traffic) -> list[dict]:
    return ko.traffic_list(name, {v: e["revision"] for v, e in history.items() if e.get("revision")}, state)


def _made_live(state: Traffic, version: str) -> Traffic:
    """`version` live and taking every request; a rollout in progress ends; the version it
    replaces joins the history a rollback walks back through."""
    past = made_live(state.past, state.live, version)
    return Traffic(live=version, previous=past[-1] if past else None, past=past,
                   pinned=[v for v in state.pinned if v != version])


def _known(name: str, history: dict, version: str) -> None:
    if version not in history:
        raise NotFound(f"{name} has no version {version} (deployed: {', '.join(_sorted(history)) or 'none'})")


def _trigger_sink(trig: dict) -> str:
    return ((trig.get("spec") or {}).get("subscriber") or {}).get("ref", {}).get("name", "")


def _sink_version(sink: dict) -> str:
    manifest = _parse_manifest((sink["metadata"].get("annotations") or {}).get(ko.ANN_MANIFEST))
    return manifest.version if manifest else (sink["metadata"].get("labels") or {}).get(ko.LABEL_VERSION, "")


def _pod_ready(pod: dict) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and (_condition(pod) or {}).get("status") == "True"


def _sorted(versions) -> list[str]:
    return sorted(versions, key=semver_key)


__all__ = ["KnativeRuntime", "PlaneError"]
