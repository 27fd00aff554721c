"""The control service: a Flask app whose routes parse, delegate to the Runtime and serialize.

Every route is declared with its request and answer models (control/api_schema.py): the
declarations validate requests and are served as `GET /openapi.json`. Before a route runs,
control/guard.py checks the Host, cross-site calls, the token and the body's type and size.
Errors are `PlaneError`s mapped to `{"error": ...}` and a status in one handler; anything
else is a 500 that names a request id and keeps the details in the log.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import orjson
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import wrap_file

from adapters.manifest import (MANIFEST_FILE, ManifestError, load_manifest, parse_bytes, parse_manifest,
                               read_manifest_text)
from control import api_schema as s
from control import events as ce
from control.auth import service_token
from control.errors import BadRequest, Conflict, Forbidden, Invalid, NotFound, PlaneError
from control.guard import Guard, TTLCache
from control.uploads import extract_model
from control.runtime.base import JOB_STATUSES, ModelInfo, Runtime, get_runtime
from control.settings import Settings, modelplane_version

log = logging.getLogger(__name__)

#: Request headers passed on to a model's adapter; everything else stays here.
FORWARD_HEADERS = ("content-type", "accept", "x-request-id", "inference-header-content-length")
#: Response headers never copied back from an adapter (hop-by-hop, or recomputed by the server).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
              "proxy-authenticate", "trailer", "upgrade", "content-encoding"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
#: Caps of the small bodies: a JSON call and a CloudEvent.
MAX_JSON = 64 * 2**10
MAX_EVENT = 1 * 2**20
#: A predict body's cap when the model's manifest cannot be read (its own `limits.max_body` wins).
DEFAULT_PREDICT_LIMIT = 10 * 2**20
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MODEL_ARCHIVE_TYPES = ("application/gzip", "application/x-gzip", "application/x-tar", "application/octet-stream")
DATASET_TYPES = ("text/csv", "application/octet-stream")
#: A structured CloudEvent's types; binary mode (`ce-specversion` header) may carry any data type.
EVENT_TYPES = ("application/cloudevents+json", "application/cloudevents-batch+json", "application/json")
PREDICT_TYPES = ("application/json", "text/csv")
INFER_TYPES = ("application/json", "application/octet-stream")


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

    def __init__(self, settings: Settings, runtime: Runtime, *, owns_runtime: bool):
        self.settings = settings
        self.runtime = runtime
        self.owns_runtime = owns_runtime
        self.events = ce.EventLog()
        self.sink = ce.EventSink(runtime, bucket=settings.bucket_name, log_=self.events)
        self.metrics = Metrics()
        self.failed: dict[str, dict] = {}  # folder name -> {"name", "error", "path"}
        self._storage = None
        self._storage_lock = threading.Lock()
        self.token = ""
        self.token_created = False
        self.openapi: Optional[dict] = None
        self.routes: list = []

    @property
    def storage(self):
        with self._storage_lock:
            if self._storage is None:
                from control.gcs import storage_client

                self._storage = storage_client()
            return self._storage

    def close(self) -> None:
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

    def failed_info(self, entry: dict) -> dict:
        return ModelInfo(name=entry["name"], kind="unknown", language="unknown", version=None,
                         status="failed", error=entry["error"]).to_json()


def _results_location(uri: str) -> str:
    return uri if uri.lower().endswith(".csv") else uri.rstrip("/") + "/scores.csv"


def _policy(runtime: Runtime, name: str) -> tuple[bool, int]:
    """(open to anyone, predict body cap) of a model's live version, from its manifest."""
    try:
        manifest = runtime.model(name).manifest or {}
    except PlaneError:
        return False, DEFAULT_PREDICT_LIMIT
    try:
        limit = parse_bytes((manifest.get("limits") or {}).get("max_body") or DEFAULT_PREDICT_LIMIT)
    except (TypeError, ValueError):
        limit = DEFAULT_PREDICT_LIMIT
    return manifest.get("visibility") == "public", limit


def _raw_path() -> str:
    """The path as the client sent it (still percent-encoded), never decoded and re-targeted."""
    raw = request.environ.get("REQUEST_URI") or request.environ.get("RAW_URI")
    if not raw:
        return request.full_path.split("?", 1)[0]
    if "://" in raw.split("?", 1)[0]:  # absolute-form request target
        raw = "/" + raw.split("://", 1)[1].split("/", 1)[-1]
    return raw.split("?", 1)[0]


def create_app(settings: Optional[Settings] = None, *, runtime: Optional[Runtime] = None,
               register: bool = True) -> Flask:
    """The control service. Without `runtime`, the one `settings.runtime` names is built and
    started (and closed by `app.extensions["modelplane"].close()`); `register` deploys every
    model folder under `settings.models_dir`. Raises `control.auth.TokenError` when the
    service may not start without a token (bound beyond loopback with none set)."""
    settings = settings or Settings()
    token, created = service_token(settings)
    owns = runtime is None
    if runtime is None:
        runtime = get_runtime(settings)
        runtime.start()
    plane = Plane(settings, runtime, owns_runtime=owns)
    plane.token, plane.token_created = token, created
    policies = TTLCache(ttl=2.0)

    def policy(name: str) -> tuple[bool, int]:
        return policies.get(name, lambda: _policy(runtime, name))  # type: ignore[return-value]

    guard = Guard(settings, token, is_public=lambda name: policy(name)[0])
    app = Flask(__name__)
    app.json.sort_keys = False
    app.url_map.strict_slashes = False
    app.extensions["modelplane"] = plane
    if register:
        plane.register_models()

    specs: dict[tuple[str, str], s.RouteSpec] = {}
    routes: list[s.RouteSpec] = []

    def route(spec: s.RouteSpec):
        def decorate(view):
            app.add_url_rule(spec.rule, endpoint=f"{spec.method} {spec.rule}", view_func=view,
                             methods=[spec.method])
            specs[(spec.rule, spec.method)] = spec
            routes.append(spec)
            return view
        return decorate

    def body_json(spec: s.RouteSpec):
        raw = guard.read_body(spec.body_limit or MAX_JSON)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"the body is not JSON: {str(e)[:200]}") from None
        return s.validate(spec.body, data, where="body")

    def query(spec: s.RouteSpec):
        return s.validate(spec.query, request.args.to_dict(), where="query")

    def current_spec() -> Optional[s.RouteSpec]:
        rule = request.url_rule
        if rule is None:
            return None
        method = "GET" if request.method == "HEAD" else request.method
        return specs.get((rule.rule, method))

    # -- cross-cutting ---------------------------------------------------------------------
    @app.before_request
    def _before():
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        guard.check_host()
        spec = current_spec()
        if spec is None:
            return None  # an unknown route or method: Flask answers 404/405
        if spec.auth == "token":
            guard.require_token()
        elif spec.auth == "predict":
            guard.require_predict(request.view_args.get("name", ""))
        if request.method in MUTATING:
            guard.check_origin()
            if spec.body is not None:
                guard.check_content_type(("application/json",))
            elif spec.body_types and not (spec.rule == "/events" and "ce-specversion" in request.headers):
                guard.check_content_type(spec.body_types)
            if spec.body_limit is not None:
                guard.check_length(spec.body_limit)
        return None

    @app.after_request
    def _after(response: Response):
        route_name = request.url_rule.rule if request.url_rule is not None else "unmatched"
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        plane.metrics.observe_api(route_name, request.method, response.status_code, seconds)
        response.headers["X-Request-Id"] = g.get("request_id", "")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        log.debug("%s %s -> %s in %.1f ms", request.method, request.path, response.status_code, seconds * 1000)
        return response

    @app.errorhandler(PlaneError)
    def _plane_error(e: PlaneError):
        if e.status >= 500:
            log.warning("%s %s [%s]: %s", request.method, request.path, g.get("request_id"), e.message)
        return jsonify(e.to_json()), e.status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        response = jsonify({"error": f"{e.name}: {e.description}"})
        response.status_code = e.code or 500
        for key, value in e.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        rid = g.get("request_id") or uuid.uuid4().hex[:16]
        log.error("%s %s failed [request id %s]", request.method, request.path, rid, exc_info=e)
        return jsonify({"error": f"internal error: the control service's log has the details under request id {rid}",
                        "request_id": rid}), 500

    # -- health, metrics, the API's own description --------------------------------------------
    @route(s.RouteSpec("GET", "/healthz", "Is the service up", [s.Answer(200, s.Health)], auth="none", tag="service"))
    def healthz():
        problems = list(getattr(runtime, "problems", lambda: [])())
        return {"status": "degraded" if problems else "ok", "runtime": runtime.name, "problems": problems}

    @route(s.RouteSpec("GET", "/metrics", "Prometheus metrics",
                       [s.Answer(200, None, "text/plain", "the Prometheus text format")], tag="service"))
    def metrics():
        return Response(_render_metrics(plane), mimetype="text/plain; version=0.0.4")

    @route(s.RouteSpec("GET", "/openapi.json", "This API's OpenAPI document",
                       [s.Answer(200, None, "application/json", "OpenAPI 3.1")], auth="none", tag="service"))
    def openapi():
        return jsonify(openapi_doc())

    # -- models ------------------------------------------------------------------------------
    @route(s.RouteSpec("GET", "/api/models", "List the models", [s.Answer(200, list[s.ModelSummary])], tag="models"))
    def list_models():
        infos = [m.to_json() for m in runtime.models()]
        known = {m["name"]: m for m in infos}
        for entry in plane.failed.values():
            if entry["name"] in known:
                known[entry["name"]]["error"] = entry["error"]
            else:
                infos.append(plane.failed_info(entry))
        infos.sort(key=lambda m: m["name"])
        # orjson: the list is the one large answer (10,000 models), and the stdlib encoder was
        # a quarter of its time.
        return Response(orjson.dumps(infos), mimetype="application/json")

    @route(s.RouteSpec("POST", "/api/models", "Deploy a model folder (a gzip tar)",
                       [s.Answer(201, s.Deployed)], body_types=MODEL_ARCHIVE_TYPES,
                       body_limit=settings.max_model_upload, errors=(409, 422, 503), tag="models"))
    def deploy_model():
        uploads = Path(settings.state_dir) / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="model-", dir=uploads))
        try:
            with tempfile.TemporaryFile(dir=uploads) as spool:
                if guard.spool_body(settings.max_model_upload, spool) == 0:
                    raise BadRequest("the body is empty: send a gzip tar of the model folder")
                spool.seek(0)
                folder = extract_model(spool, dest, max_size=settings.max_model_size,
                                       max_files=settings.max_model_files)
            rel = folder.relative_to(dest) / MANIFEST_FILE
            try:
                text = read_manifest_text(folder / MANIFEST_FILE)
                manifest = parse_manifest(text, file=rel, folder=folder)
            except ManifestError as e:
                problems = [{"file": str(rel), "line": p.line, "field": p.field, "message": p.message}
                            for p in e.problems]
                message = "\n".join(f"{rel}:{p.line}: {p.field + ': ' if p.field else ''}{p.message}" if p.line
                                    else f"{rel}: {p.field + ': ' if p.field else ''}{p.message}" for p in e.problems)
                raise Invalid(message, details={"problems": problems}) from None
            version = runtime.deploy(manifest, make_live=True)  # the runtime keeps its own copy
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        plane.failed.pop(manifest.name, None)
        policies.clear()
        return jsonify({"name": manifest.name, **version.to_json()}), 201

    @route(s.RouteSpec("GET", "/api/models/<name>", "One model: manifest, versions, metrics",
                       [s.Answer(200, s.ModelDetail)], errors=(404,), tag="models"))
    def get_model(name: str):
        try:
            return jsonify(runtime.model(name).to_json())
        except NotFound:
            entry = plane.failed.get(name)
            if entry is None:
                raise
            detail = plane.failed_info(entry)
            return jsonify({**detail, "manifest": {}, "versions": [], "metrics": {}})

    @route(s.RouteSpec("DELETE", "/api/models/<name>", "Remove a model and all its versions",
                       [s.Answer(200, s.Removed)], errors=(404, 409), tag="models"))
    def remove_model(name: str):
        if name in plane.failed:
            plane.failed.pop(name)
            try:
                runtime.remove(name)
            except NotFound:
                pass
        else:
            runtime.remove(name)
        policies.clear()
        return {"name": name, "removed": True}

    rollback_spec = s.RouteSpec("POST", "/api/models/<name>/rollback", "Make an earlier version live",
                                [s.Answer(200, s.Deployed)], body=s.RollbackRequest, errors=(404, 409, 422, 503),
                                tag="models")

    @route(rollback_spec)
    def rollback(name: str):
        version = body_json(rollback_spec).version
        answer = {"name": name, **runtime.rollback(name, version=version).to_json()}
        policies.clear()
        return answer

    job_spec = s.RouteSpec("POST", "/api/models/<name>/jobs", "Run a batch model on a dataset in a bucket",
                           [s.Answer(202, s.JobAnswer)], body=s.JobRequest, errors=(404, 409, 422, 503),
                           tag="jobs")
    allowed_buckets = {settings.bucket_name} | {b.strip() for b in settings.dataset_buckets.split(",") if b.strip()}

    @route(job_spec)
    def submit_job(name: str):
        dataset = body_json(job_spec).dataset
        bucket = dataset[len("gs://"):].split("/", 1)[0]
        if bucket not in allowed_buckets:
            raise Forbidden(f"dataset bucket {bucket!r} is not one jobs may read from "
                            f"({', '.join(sorted(allowed_buckets))}; MODELPLANE_DATASET_BUCKETS adds more)")
        job, _ = runtime.submit_job(name, dataset=dataset, trigger="api")
        return jsonify(job.to_json()), 202

    dataset_spec = s.RouteSpec("POST", "/api/models/<name>/datasets",
                               "Upload a CSV to incoming/{name}/ (its bucket event starts a job)",
                               [s.Answer(201, s.DatasetUploaded)], query=s.DatasetQuery, body_types=DATASET_TYPES,
                               body_limit=settings.max_dataset_upload, errors=(404, 409, 503), tag="jobs")

    @route(dataset_spec)
    def upload_dataset(name: str):
        filename = query(dataset_spec).filename
        detail = runtime.model(name)
        if detail.kind != "batch":
            raise Conflict(f"{name!r} is a {detail.kind} model; only batch models take datasets")
        object_name = f"incoming/{name}/{filename}"
        bucket = settings.bucket_name
        with tempfile.TemporaryFile() as spool:
            size = guard.spool_body(settings.max_dataset_upload, spool)
            if size == 0:
                raise BadRequest("the dataset is empty: send the CSV as the request body")
            spool.seek(0)
            blob = plane.storage.bucket(bucket).blob(object_name)
            blob.upload_from_file(spool, size=size, content_type="text/csv")
        generation = str(blob.generation) if blob.generation is not None else None
        uri = f"gs://{bucket}/{object_name}"
        answer = {"uri": uri, "bucket": bucket, "object": object_name, "generation": generation,
                  "size": size, "key": ce.event_key(bucket, object_name, generation or "")}
        job = runtime.job_for_upload(name, bucket=bucket, obj=object_name, generation=generation or "")
        if job:
            answer["job"] = job  # the job the bucket event will start (it may not exist yet)
        return jsonify(answer), 201

    # -- jobs --------------------------------------------------------------------------------
    jobs_spec = s.RouteSpec("GET", "/api/jobs", "List jobs, newest first", [s.Answer(200, list[s.JobAnswer])],
                            query=s.JobsQuery, tag="jobs")

    @route(jobs_spec)
    def list_jobs():
        q = query(jobs_spec)
        jobs = runtime.jobs(model=q.model, limit=q.limit if not (q.dataset or q.status) else max(q.limit, 10_000))
        out = [j for j in jobs if (not q.dataset or j.dataset == q.dataset) and (not q.status or j.status == q.status)]
        return jsonify([j.to_json() for j in out[:q.limit]])

    job_path = {"job_id": s.JOB_ID_PATTERN}

    @route(s.RouteSpec("GET", "/api/jobs/<job_id>", "One job", [s.Answer(200, s.JobAnswer)], errors=(404,),
                       path_patterns=job_path, tag="jobs"))
    def get_job(job_id: str):
        return jsonify(runtime.job(job_id).to_json())

    @route(s.RouteSpec("GET", "/api/jobs/<job_id>/results", "A succeeded job's scores (CSV)",
                       [s.Answer(200, None, "text/csv", "the scores, one row per input row")], errors=(404, 409),
                       path_patterns=job_path, tag="jobs"))
    def job_results(job_id: str):
        job = runtime.job(job_id)
        if job.status != "succeeded" or not job.results_uri:
            raise Conflict(f"job {job_id} is {job.status}; results exist once it has succeeded")
        location = _results_location(job.results_uri)
        headers = {"Content-Disposition": f'attachment; filename="{job.model}-{job_id}.csv"'}
        if not location.startswith("gs://"):
            raise NotFound(f"the results of job {job_id} are not in a bucket; the API serves results from buckets only")
        from google.api_core import exceptions as gexc

        from control.gcs import split_gs_uri

        bucket, name = split_gs_uri(location)
        spool = tempfile.TemporaryFile()
        try:
            plane.storage.bucket(bucket).blob(name).download_to_file(spool)
        except gexc.NotFound:
            spool.close()
            raise NotFound(f"the results of job {job_id} are gone from {location}") from None
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return Response(wrap_file(request.environ, spool), mimetype="text/csv", headers=headers,
                        direct_passthrough=True)

    # -- events ------------------------------------------------------------------------------
    @route(s.RouteSpec("POST", "/events", "A CloudEvent (GCS object finalized) from the bucket watcher or a broker",
                       [s.Answer(200, s.EventEntry, description="ignored, or a duplicate of one already run"),
                        s.Answer(202, s.EventEntry, description="a job was started")],
                       body_types=EVENT_TYPES, body_limit=MAX_EVENT, errors=(404, 409, 503), tag="events"))
    def receive_event():
        body = guard.read_body(MAX_EVENT)
        try:
            event = ce.parse(request.headers, body)
        except BadRequest as e:
            plane.sink.reject(e.message, request.headers)
            raise
        try:
            status, result = plane.sink.handle(event)
        except BadRequest as e:
            plane.sink.reject(e.message, request.headers)
            raise
        return jsonify(result), status

    events_spec = s.RouteSpec("GET", "/api/events", "What recent events did, newest first",
                              [s.Answer(200, list[s.EventEntry])], query=s.EventsQuery, tag="events")

    @route(events_spec)
    def list_events():
        q = query(events_spec)
        return jsonify(plane.events.entries(limit=q.limit, action=q.action, key=q.key, model=q.model))

    # -- the models' own endpoints, routed ------------------------------------------------------
    def forward(name: str):
        _, limit = policy(name)
        raw = _raw_path()
        prefix = f"/models/{name}/"
        if not raw.startswith(prefix):  # the name was percent-encoded: route only what was sent
            raise NotFound(f"no route for {raw[:200]!r}")
        path = raw[len(prefix) - 1:]
        body = guard.read_body(limit) if request.method in MUTATING else b""
        headers = {h: request.headers[h] for h in FORWARD_HEADERS if h in request.headers}
        try:
            result = runtime.forward(name, method=request.method, path=path, headers=headers, body=body,
                                     query=request.query_string.decode("latin-1"))
        except PlaneError as e:
            plane.metrics.observe_model(name, e.status)
            raise
        plane.metrics.observe_model(name, result.status)
        out = {k: v for k, v in (result.headers or {}).items() if k.lower() not in HOP_BY_HOP}
        return Response(result.body, status=result.status, headers=out)

    model_errors = (404, 409, 413, 422, 502, 503, 504)
    versioned = {"model": s.NAME_PATTERN, "version": s.SEMVER_PATTERN}
    forwarded = [
        ("POST", "/models/<name>/predict", "Score rows (JSON {rows: [...]} or CSV)", PREDICT_TYPES),
        ("GET", "/models/<name>/v2", "Open Inference Protocol: server metadata", ()),
        ("GET", "/models/<name>/v2/health/live", "Open Inference Protocol: live", ()),
        ("GET", "/models/<name>/v2/health/ready", "Open Inference Protocol: ready", ()),
        ("GET", "/models/<name>/v2/models/<model>", "Open Inference Protocol: model metadata", ()),
        ("GET", "/models/<name>/v2/models/<model>/ready", "Open Inference Protocol: model ready", ()),
        ("POST", "/models/<name>/v2/models/<model>/infer", "Open Inference Protocol: inference", INFER_TYPES),
        ("GET", "/models/<name>/v2/models/<model>/versions/<version>", "Open Inference Protocol: version metadata", ()),
        ("GET", "/models/<name>/v2/models/<model>/versions/<version>/ready", "Open Inference Protocol: version ready", ()),
        ("POST", "/models/<name>/v2/models/<model>/versions/<version>/infer", "Open Inference Protocol: inference", INFER_TYPES),
    ]
    for method, rule, summary, types in forwarded:
        spec = s.RouteSpec(method, rule, summary, [s.Answer(200, s.ModelAnswer)], auth="predict",
                           body_types=types, body_limit=None, errors=model_errors, path_patterns=versioned,
                           tag="serving")
        route(spec)(lambda name, **_: forward(name))

    def openapi_doc() -> dict:
        if plane.openapi is None:
            plane.openapi = s.openapi_document(
                routes, version=modelplane_version(),
                security_note="Every route but /healthz and /openapi.json needs `Authorization: Bearer <token>`; "
                              "the models' routes too unless predict is opened.")
        return plane.openapi

    plane.routes = routes
    return app


# -- /metrics ----------------------------------------------------------------------------------

def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_metrics(plane: Plane) -> str:
    lines: list[str] = []
    api, model_requests = plane.metrics.snapshot()

    lines += ["# HELP modelplane_api_requests_total Control API requests by route, method and status.",
              "# TYPE modelplane_api_requests_total counter"]
    for (route, method, status), (count, _) in sorted(api.items()):
        lines.append(f'modelplane_api_requests_total{{route="{_label(route)}",method="{method}",status="{status}"}} {count}')
    lines += ["# HELP modelplane_api_request_seconds_sum Time spent answering control API requests.",
              "# TYPE modelplane_api_request_seconds_sum counter"]
    for (route, method, status), (_, seconds) in sorted(api.items()):
        lines.append(f'modelplane_api_request_seconds_sum{{route="{_label(route)}",method="{method}",status="{status}"}} {seconds:.6f}')

    lines += ["# HELP modelplane_events_total CloudEvents received by what they did.",
              "# TYPE modelplane_events_total counter"]
    for action, count in sorted(plane.events.counts().items()):
        lines.append(f'modelplane_events_total{{action="{action}"}} {count}')

    try:
        jobs = plane.runtime.jobs(limit=1_000_000)
    except Exception:  # metrics must render even when the runtime is unwell
        log.exception("metrics: listing jobs failed")
        jobs = []
    by_status = {status: 0 for status in JOB_STATUSES}
    for job in jobs:
        by_status[job.status] = by_status.get(job.status, 0) + 1
    lines += ["# HELP modelplane_jobs Batch jobs by status.", "# TYPE modelplane_jobs gauge"]
    for status, count in by_status.items():
        lines.append(f'modelplane_jobs{{status="{status}"}} {count}')

    try:
        models = plane.runtime.models()
    except Exception:
        log.exception("metrics: listing models failed")
        models = []
    lines += ["# HELP modelplane_model_replicas Running replicas of each model.",
              "# TYPE modelplane_model_replicas gauge"]
    for m in models:
        lines.append(f'modelplane_model_replicas{{model="{_label(m.name)}",status="{m.status}"}} {m.replicas}')
    lines += ["# HELP modelplane_model_requests_total Requests routed to each model, by status.",
              "# TYPE modelplane_model_requests_total counter"]
    for (name, status), count in sorted(model_requests.items()):
        lines.append(f'modelplane_model_requests_total{{model="{_label(name)}",status="{status}"}} {count}')
    lines += ["# HELP modelplane_models_failed Model folders that could not be registered.",
              "# TYPE modelplane_models_failed gauge", f"modelplane_models_failed {len(plane.failed)}"]
    return "\n".join(lines) + "\n"
