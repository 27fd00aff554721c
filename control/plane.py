"""What the control service's parts share: settings, the runtime, the guard, the event sink,
metrics, registration failures, and each model's serving policy (who may call it, how large
a body it takes). The Flask app (control API) and the asyncio front door (the models'
traffic) both hold the one `Plane`.

Records the parts keep — comparisons, score monitoring, shadow records, the event log — are in
one state store (control/state.py): the state dir on the local runtime, the bucket
(`gs://{bucket}/state/…`) on a cluster, where the control service runs as several replicas
with nothing of their own kept in the pod (the state dir there is cache and scratch only).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import NamedTuple, Optional

from adapters.manifest import MANIFEST_FILE, ManifestError, load_manifest, parse_bytes
from control import events as ce
from control.errors import NotFound, PlaneError
from control.guard import Guard, TTLCache
from control.compare import Comparisons
from control.monitor import ScoreMonitor
from control.runtime.base import ModelInfo, Runtime
from control.settings import Settings
from control.shadow import ShadowLog
from control.state import BucketState, FileState, StateStore

log = logging.getLogger(__name__)

#: A predict body's cap when the model's manifest cannot be read (its own `limits.max_body` wins).
DEFAULT_PREDICT_LIMIT = 10 * 2**20


class Policy(NamedTuple):
    """How the front door serves a model: open to anyone, the predict body cap, and the version
    under rollout that a share of the live requests is mirrored to (its shadow percent)."""

    public: bool
    limit: int
    shadow_version: Optional[str] = None
    shadow_percent: int = 0
    owner: Optional[str] = None


class Metrics:
    """Counters the `/metrics` endpoint renders (thread-safe, in memory)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.api: dict[tuple[str, str, int], list[float]] = {}
        self.model_requests: dict[tuple[str, int], int] = {}

    def observe_api(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            entry = self.api.setdefault((route, method, status), [0, 0.0])
            entry[0] += 1
            entry[1] += seconds

    def observe_model(self, name: str, status: int) -> None:
        with self._lock:
            self.model_requests[(name, status)] = self.model_requests.get((name, status), 0) + 1

    def snapshot(self):
        with self._lock:
            return dict(self.api), dict(self.model_requests)


class Plane:
    """What the routes share: settings, the runtime, the event sink, metrics, registration failures."""

    def __init__(self, settings: Settings, runtime: Runtime, *, owns_runtime: bool, token: str = "",
                 token_created: bool = False, state: Optional[StateStore] = None):
        self.settings = settings
        self.runtime = runtime
        self.owns_runtime = owns_runtime
        self._storage = None
        self._storage_lock = threading.Lock()
        self.state = state if state is not None else _state_store(settings, runtime, self)
        self.events = ce.EventLog(store=self.state.scoped("events/"))
        self.sink = ce.EventSink(runtime, bucket=settings.bucket_name, log_=self.events)
        self.metrics = Metrics()
        self.failed: dict[str, dict] = {}  # folder name -> {"name", "error", "path"}
        self.token = token
        self.token_created = token_created
        self.tokens = _token_store(settings, runtime, token)
        self.audit = _audit_log(settings, runtime, self)
        self.guard = Guard(settings, self.tokens)
        self.policies = TTLCache(ttl=2.0)
        self.shadow = ShadowLog(runtime, self.state.scoped("shadow/"))
        self.monitor = ScoreMonitor(self.state.scoped("monitor/"), runtime=runtime,
                                    manifest_of=runtime.version_manifest)
        self.comparisons = Comparisons(self, self.state.scoped("comparisons/"))
        self.openapi: Optional[dict] = None
        self.routes: list = []

    def policy(self, name: str) -> Policy:
        """How the front door serves a model (its live version's), cached for 2 s."""
        return self.policies.get(name, lambda: _policy(self.runtime, name))  # type: ignore[return-value]

    def cached_policy(self, name: str) -> Optional[Policy]:
        """`policy` if it is cached (the front door computes a miss off its event loop)."""
        return self.policies.peek(name)  # type: ignore[return-value]

    @property
    def storage(self):
        with self._storage_lock:
            if self._storage is None:
                from control.gcs import storage_client

                self._storage = storage_client(state_dir=self.settings.state_dir)
            return self._storage

    def close(self) -> None:
        try:
            self.comparisons.close()
            self.monitor.close()
            self.shadow.close()
            self.events.close()
        finally:
            if self.owns_runtime:
                self.runtime.close()

    # -- registration of ./models ------------------------------------------------------
    def register_models(self) -> None:
        """Deploy every model folder under `models_dir`; a bad one is recorded, never fatal."""
        root = Path(self.settings.models_dir)
        if not root.is_dir():
            log.info("no models folder at %s; nothing to register", root)
            return
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            if not (folder / MANIFEST_FILE).is_file():
                continue
            self.register(folder)

    def register(self, folder: Path) -> None:
        try:
            manifest = load_manifest(folder)
            try:
                known = {v.version for v in self.runtime.model(manifest.name).versions}
            except NotFound:
                known = set()
            # A version already known keeps whatever is live (a rollback survives a restart).
            self.runtime.deploy(manifest, make_live=manifest.version not in known)
            self.failed.pop(folder.name, None)
            log.info("registered %s from %s", manifest.ref, folder)
        except ManifestError as e:
            self.failed[folder.name] = {"name": folder.name, "error": str(e), "path": str(folder)}
            log.error("model folder %s has an invalid manifest:\n%s", folder, e)
        except PlaneError as e:
            self.failed[folder.name] = {"name": folder.name, "error": e.message, "path": str(folder)}
            log.error("model folder %s could not be registered: %s", folder, e.message)
        except Exception as e:  # a runtime bug must not stop the other models
            self.failed[folder.name] = {"name": folder.name, "error": f"{type(e).__name__}: {e}", "path": str(folder)}
            log.exception("model folder %s could not be registered", folder)

    def record(self, identity, action: str, status: int, request_id: Optional[str], **what) -> None:
        """One change in the audit trail: who made it, what, and how it ended (control/audit.py)."""
        from control.audit import outcome_of

        model = what.pop("name", None) or what.pop("model", None)
        version = what.pop("version", None)
        target = what.pop("target", None)
        self.audit.record(who=identity.name, role=identity.role, owner=identity.owner, action=action,
                          model=model, version=version, target=target, request_id=request_id, status=status,
                          outcome=outcome_of(status), detail=what or None)

    def failed_info(self, entry: dict) -> dict:
        return ModelInfo(name=entry["name"], kind="unknown", language="unknown", version=None,
                         status="failed", error=entry["error"]).to_json()




def _token_store(settings: Settings, runtime: Runtime, bootstrap: str):
    """Named tokens where every replica reads them: the cluster's Secret, or the state dir."""
    from control import identity

    if runtime.name == "knative":
        return identity.SecretTokens(runtime.core_api(), settings.own_namespace, bootstrap)
    return identity.FileTokens(settings.state_dir, bootstrap)


def _state_store(settings: Settings, runtime: Runtime, plane: "Plane") -> StateStore:
    """Where the parts keep their records: the bucket when replicas share them (a cluster), else the state dir."""
    if runtime.name == "knative":
        return BucketState(_LazyBucket(plane, settings.bucket_name), prefix="state/")
    return FileState(Path(settings.state_dir))


def _audit_log(settings: Settings, runtime: Runtime, plane: "Plane"):
    from control import audit

    if runtime.name == "knative":
        return audit.ClusterAudit(runtime.core_api(), settings.own_namespace, _LazyBucket(plane, settings.bucket_name))
    return audit.FileAudit(settings.state_dir)


class _LazyBucket:
    """The plane's bucket, its storage client made on first use (not at start)."""

    def __init__(self, plane: "Plane", name: str):
        self._plane, self._name = plane, name

    def __getattr__(self, attr):
        return getattr(self._plane.storage.bucket(self._name), attr)


def _policy(runtime: Runtime, name: str) -> Policy:
    try:
        detail = runtime.model(name)
    except PlaneError:
        return Policy(False, DEFAULT_PREDICT_LIMIT, owner=None)
    manifest = detail.manifest or {}
    try:
        limit = parse_bytes((manifest.get("limits") or {}).get("max_body") or DEFAULT_PREDICT_LIMIT)
    except (TypeError, ValueError):
        limit = DEFAULT_PREDICT_LIMIT
    traffic = detail.traffic or {}
    shadow = traffic.get("shadow") or 0
    return Policy(manifest.get("visibility") == "public", limit, traffic.get("candidate") if shadow else None,
                  shadow, manifest.get("owner") or "")
