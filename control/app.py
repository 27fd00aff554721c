"""The control service: a Flask app whose routes parse, delegate to the Runtime and serialize.

Errors are `PlaneError`s mapped to `{"error": ...}` and a status in one handler. Mutating
calls (POST/PUT/PATCH/DELETE under `/api/`) need `Authorization: Bearer $MODELPLANE_TOKEN`
when a token is set. `POST /events` is open on loopback (where the embedded bucket watcher
posts from) and needs the token from anywhere else; behind a reverse proxy on the same
host every caller looks local, so put the token check in the proxy too.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Optional

import orjson
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import wrap_file

from adapters.manifest import MANIFEST_FILE, ManifestError, load_manifest, parse_manifest
from control import events as ce
from control.errors import BadRequest, Conflict, Invalid, NotFound, PlaneError, Unauthorized
from control.runtime.base import JOB_STATUSES, ModelInfo, Runtime, get_runtime
from control.settings import Settings

log = logging.getLogger(__name__)

MAX_UPLOAD = 512 * 2**20
#: Request headers passed on to a model's adapter; everything else stays here.
FORWARD_HEADERS = ("content-type", "accept", "x-request-id")
#: Response headers never copied back from an adapter (hop-by-hop, or recomputed by the server).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
              "proxy-authenticate", "trailer", "upgrade", "content-encoding"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


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


def _is_loopback(addr: Optional[str]) -> bool:
    try:
        return ipaddress.ip_address((addr or "").split("%")[0]).is_loopback
    except ValueError:
        return False


def _check_token(token: str) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(f"{request.method} {request.path} needs 'Authorization: Bearer <token>' "
                           "(the control service's MODELPLANE_TOKEN)")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("the bearer token does not match the control service's MODELPLANE_TOKEN")


def _json_body() -> dict:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadRequest("expected a JSON object body (Content-Type: application/json)")
    return data


def _extract_model(body: bytes, dest: Path) -> Path:
    """Unpack a (gzip) tar of one model folder into `dest`; the folder holding model.yaml."""
    import io

    try:
        tar = tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    except tarfile.TarError as e:
        raise BadRequest(f"expected a gzip tar of a model folder (what `modelplane deploy DIR` sends): {e}") from None
    with tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            if path.is_absolute() or ".." in path.parts:
                raise BadRequest(f"refusing archive member {member.name!r}: paths must stay inside the folder")
            if member.isdir():
                (dest / path).mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                target.chmod(0o755 if member.mode & 0o111 else 0o644)
            # links, devices and fifos are skipped: a model folder needs none
    if (dest / MANIFEST_FILE).is_file():
        return dest
    found = sorted(p.parent for p in dest.glob(f"*/{MANIFEST_FILE}"))
    if len(found) == 1:
        return found[0]
    raise Invalid(f"the archive has no {MANIFEST_FILE} at its top (or in one top-level folder)",
                  details={"problems": [{"file": MANIFEST_FILE, "line": None, "field": "",
                                         "message": "no model.yaml in the archive"}]})


def _results_location(uri: str) -> str:
    return uri if uri.lower().endswith(".csv") else uri.rstrip("/") + "/scores.csv"


def create_app(settings: Optional[Settings] = None, *, runtime: Optional[Runtime] = None,
               register: bool = True) -> Flask:
    """The control service. Without `runtime`, the one `settings.runtime` names is built and
    started (and closed by `app.extensions["modelplane"].close()`); `register` deploys every
    model folder under `settings.models_dir`."""
    settings = settings or Settings()
    owns = runtime is None
    if runtime is None:
        runtime = get_runtime(settings)
        runtime.start()
    plane = Plane(settings, runtime, owns_runtime=owns)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD
    app.json.sort_keys = False
    app.extensions["modelplane"] = plane
    if register:
        plane.register_models()

    # -- cross-cutting ---------------------------------------------------------------------
    @app.before_request
    def _before():
        g.started = time.perf_counter()
        token = settings.token
        if not token or request.method not in MUTATING:
            return None
        if request.path.startswith("/api/"):
            _check_token(token)
        elif request.path == "/events" and not _is_loopback(request.remote_addr):
            _check_token(token)
        return None

    @app.after_request
    def _after(response: Response):
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        plane.metrics.observe_api(route, request.method, response.status_code, seconds)
        log.debug("%s %s -> %s in %.1f ms", request.method, request.path, response.status_code, seconds * 1000)
        return response

    @app.errorhandler(PlaneError)
    def _plane_error(e: PlaneError):
        if e.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, e.message)
        return jsonify(e.to_json()), e.status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return jsonify({"error": f"{e.name}: {e.description}"}), e.code

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return jsonify({"error": f"internal error ({type(e).__name__}: {e}); see the control service log"}), 500

    # -- health and metrics ----------------------------------------------------------------
    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "runtime": runtime.name}

    @app.get("/metrics")
    def metrics():
        return Response(_render_metrics(plane), mimetype="text/plain; version=0.0.4")

    # -- models ------------------------------------------------------------------------------
    @app.get("/api/models")
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

    @app.post("/api/models")
    def deploy_model():
        uploads = Path(settings.state_dir) / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="model-", dir=uploads))
        try:
            folder = _extract_model(request.get_data(), dest)
            rel = folder.relative_to(dest) / MANIFEST_FILE
            try:
                manifest = parse_manifest((folder / MANIFEST_FILE).read_text(encoding="utf-8"),
                                          file=rel, folder=folder)
            except ManifestError as e:
                problems = [{"file": e.file, "line": p.line, "field": p.field, "message": p.message}
                            for p in e.problems]
                raise Invalid(str(e), details={"problems": problems}) from None
            version = runtime.deploy(manifest, make_live=True)  # the runtime keeps its own copy
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        plane.failed.pop(manifest.name, None)
        return jsonify({"name": manifest.name, **version.to_json()}), 201

    @app.get("/api/models/<name>")
    def get_model(name: str):
        try:
            return jsonify(runtime.model(name).to_json())
        except NotFound:
            entry = plane.failed.get(name)
            if entry is None:
                raise
            return jsonify(plane.failed_info(entry))

    @app.delete("/api/models/<name>")
    def remove_model(name: str):
        if name in plane.failed:
            plane.failed.pop(name)
            try:
                runtime.remove(name)
            except NotFound:
                pass
        else:
            runtime.remove(name)
        return {"name": name, "removed": True}

    @app.post("/api/models/<name>/rollback")
    def rollback(name: str):
        version = _json_body().get("version")
        if not isinstance(version, str) or not version:
            raise BadRequest('expected {"version": "1.2.0"}')
        return {"name": name, **runtime.rollback(name, version=version).to_json()}

    @app.post("/api/models/<name>/jobs")
    def submit_job(name: str):
        dataset = _json_body().get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise BadRequest('expected {"dataset": "gs://bucket/path.csv"}')
        job, _ = runtime.submit_job(name, dataset=dataset, trigger="api")
        return jsonify(job.to_json()), 202

    @app.post("/api/models/<name>/datasets")
    def upload_dataset(name: str):
        filename = request.args.get("filename", "")
        if not filename or "/" in filename or "\\" in filename or filename.startswith("."):
            raise BadRequest("expected ?filename=NAME.csv (a plain file name, no folders)")
        if not filename.lower().endswith(".csv"):
            raise BadRequest(f"{filename!r}: datasets are CSV files (.csv)")
        detail = runtime.model(name)
        if detail.kind != "batch":
            raise Conflict(f"{name!r} is a {detail.kind} model; only batch models take datasets")
        object_name = f"incoming/{name}/{filename}"
        bucket = settings.bucket_name
        with tempfile.TemporaryFile() as spool:
            size = 0
            while True:
                chunk = request.stream.read(1 << 20)
                if not chunk:
                    break
                spool.write(chunk)
                size += len(chunk)
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
    @app.get("/api/jobs")
    def list_jobs():
        model = request.args.get("model") or None
        dataset = request.args.get("dataset") or None
        status = request.args.get("status") or None
        if status and status not in JOB_STATUSES:
            raise BadRequest(f"status: expected one of {', '.join(JOB_STATUSES)}")
        try:
            limit = int(request.args.get("limit", 200))
        except ValueError:
            raise BadRequest("limit: expected a number") from None
        jobs = runtime.jobs(model=model, limit=limit if not (dataset or status) else max(limit, 10_000))
        out = [j for j in jobs if (not dataset or j.dataset == dataset) and (not status or j.status == status)]
        return jsonify([j.to_json() for j in out[:limit]])

    @app.get("/api/jobs/<job_id>")
    def get_job(job_id: str):
        return jsonify(runtime.job(job_id).to_json())

    @app.get("/api/jobs/<job_id>/results")
    def job_results(job_id: str):
        job = runtime.job(job_id)
        if job.status != "succeeded" or not job.results_uri:
            raise Conflict(f"job {job_id} is {job.status}; results exist once it has succeeded")
        location = _results_location(job.results_uri)
        headers = {"Content-Disposition": f'attachment; filename="{job.model}-{job_id}.csv"'}
        if location.startswith("gs://"):
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
        path = Path(location.removeprefix("file://"))
        if not path.is_file():
            raise NotFound(f"the results of job {job_id} are gone from {location}")
        return Response(wrap_file(request.environ, open(path, "rb")), mimetype="text/csv", headers=headers,
                        direct_passthrough=True)

    # -- events ------------------------------------------------------------------------------
    @app.post("/events")
    def receive_event():
        body = request.get_data()
        try:
            event = ce.parse(request.headers, body)
        except BadRequest as e:
            plane.sink.reject(e.message, request.headers)
            raise
        status, result = plane.sink.handle(event)
        return jsonify(result), status

    @app.get("/api/events")
    def list_events():
        try:
            limit = int(request.args.get("limit", 200))
        except ValueError:
            raise BadRequest("limit: expected a number") from None
        return jsonify(plane.events.entries(limit=limit, action=request.args.get("action") or None,
                                            key=request.args.get("key") or None,
                                            model=request.args.get("model") or None))

    # -- the models' own endpoints, routed ------------------------------------------------------
    def _forward(name: str, path: str):
        headers = {h: request.headers[h] for h in FORWARD_HEADERS if h in request.headers}
        try:
            result = runtime.forward(name, method=request.method, path=path, headers=headers,
                                     body=request.get_data(), query=request.query_string.decode("latin-1"))
        except PlaneError as e:
            plane.metrics.observe_model(name, e.status)
            raise
        plane.metrics.observe_model(name, result.status)
        out = {k: v for k, v in (result.headers or {}).items() if k.lower() not in HOP_BY_HOP}
        return Response(result.body, status=result.status, headers=out)

    @app.post("/models/<name>/predict")
    def predict(name: str):
        return _forward(name, "/predict")

    @app.route("/models/<name>/v2/<path:rest>", methods=["GET", "POST"])
    def open_inference(name: str, rest: str):
        return _forward(name, f"/v2/{rest}")

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
    by_status = {s: 0 for s in JOB_STATUSES}
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
