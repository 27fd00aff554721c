"""The realtime adapter: the public face of one model (aiohttp server + pooled keep-alive client).

It validates every request against the manifest before the model sees it, checks the model's
answer, enforces the manifest's limits, speaks `/predict` and the Open Inference Protocol v2,
exposes Prometheus metrics and, in supervisor mode, runs the model process itself.
"""
from __future__ import annotations

import asyncio
import bisect
import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from . import v2binary
from .manifest import Manifest
from .schema import RowProblem, RowsInvalid, RowValidator, check_scores

try:
    import orjson

    _dumps = orjson.dumps

    def _loads(data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            # NaN / Infinity literals: reported as values, not as bad JSON. json.loads also takes
            # what orjson refuses for good reason: lone surrogates (refused here) and nesting
            # past its recursion limit (RecursionError, which callers turn into a 400).
            doc = json.loads(data)
            try:
                orjson.dumps(doc)
            except TypeError:
                raise ValueError("the JSON holds a lone UTF-16 surrogate escape (such as \\ud800), "
                                 "which is not text") from None
            return doc
except ImportError:  # pragma: no cover - orjson is a dependency; stay correct without it
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads

log = logging.getLogger(__name__)

V2_DATATYPES = {"number": "FP64", "integer": "INT64", "string": "BYTES", "boolean": "BOOL"}
HEALTH_POLL_STARTING = 0.05  # seconds between /health polls until the model is ready
HEALTH_POLL_READY = 1.0
STOP_GRACE_SECONDS = 10.0
STDERR_TAIL_LINES = 40
JSON = "application/json"


class AdapterError(Exception):
    """An answer other than 200, with a JSON body `{"error": message, ...}`."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}

    def response(self) -> web.Response:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return web.Response(status=self.status, body=_dumps(self.body), content_type=JSON, headers=headers)


# -- metrics ------------------------------------------------------------------------------

class Metrics:
    """Prometheus text-format metrics kept in plain dicts (cheap on the hot path)."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, model: str):
        self.model = model
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # route -> [bucket counts..., +Inf count, sum]
        self.in_flight = 0
        self.model_up = 0
        self.model_errors: dict[str, int] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = [0] * (len(self.BUCKETS) + 1) + [0.0]
        h[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        h[-1] += seconds

    def model_error(self, kind: str) -> None:
        self.model_errors[kind] = self.model_errors.get(kind, 0) + 1

    def render(self) -> str:
        m = f'model="{self.model}"'
        out = [
            "# HELP modelplane_adapter_requests_total Requests answered, by route and status.",
            "# TYPE modelplane_adapter_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'modelplane_adapter_requests_total{{{m},route="{route}",status="{status}"}} {n}')
        out += ["# HELP modelplane_adapter_request_duration_seconds Time to answer a request.",
                "# TYPE modelplane_adapter_request_duration_seconds histogram"]
        for route, h in sorted(self.latency.items()):
            cumulative = 0
            for bound, n in zip(self.BUCKETS, h):
                cumulative += n
                out.append(f'modelplane_adapter_request_duration_seconds_bucket{{{m},route="{route}",le="{bound}"}} {cumulative}')
            cumulative += h[len(self.BUCKETS)]
            out.append(f'modelplane_adapter_request_duration_seconds_bucket{{{m},route="{route}",le="+Inf"}} {cumulative}')
            out.append(f'modelplane_adapter_request_duration_seconds_sum{{{m},route="{route}"}} {h[-1]:.6f}')
            out.append(f'modelplane_adapter_request_duration_seconds_count{{{m},route="{route}"}} {cumulative}')
        out += ["# HELP modelplane_adapter_in_flight_requests Requests being answered now.",
                "# TYPE modelplane_adapter_in_flight_requests gauge",
                f"modelplane_adapter_in_flight_requests{{{m}}} {self.in_flight}",
                "# HELP modelplane_adapter_model_up 1 when the model behind the adapter is ready.",
                "# TYPE modelplane_adapter_model_up gauge",
                f"modelplane_adapter_model_up{{{m}}} {self.model_up}",
                "# HELP modelplane_adapter_model_errors_total Broken, slow or unreachable model answers, by kind.",
                "# TYPE modelplane_adapter_model_errors_total counter"]
        for kind, n in sorted(self.model_errors.items()):
            out.append(f'modelplane_adapter_model_errors_total{{{m},kind="{kind}"}} {n}')
        return "\n".join(out) + "\n"


# -- the model behind the adapter ---------------------------------------------------------

class Upstream:
    """The model's HTTP server: a pooled keep-alive client, its readiness, and the checks on its answers."""

    def __init__(self, manifest: Manifest, url: str, metrics: Metrics):
        self.name = manifest.name
        self.url = url.rstrip("/")
        self.predict_url = self.url + "/predict"
        self.health_url = self.url + "/health"
        self.metrics = metrics
        self.timeout_s = manifest.limits.timeout_seconds
        self.timeout_text = manifest.limits.timeout
        self._timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        self._health_timeout = aiohttp.ClientTimeout(total=1.0)
        self.ready = False
        self.session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30, ttl_dns_cache=None)
        self.session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent", "Accept-Encoding"),
                                             auto_decompress=False)

    async def close(self) -> None:
        if self.session:
            await self.session.close()

    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            log.info("model %s is %s", self.name, "ready" if ready else "not ready")
        self.ready = ready
        self.metrics.model_up = 1 if ready else 0

    async def watch_health(self) -> None:
        """Poll the model's GET /health: fast until ready, then once a second (or when a call failed)."""
        while True:
            try:
                async with self.session.get(self.health_url, timeout=self._health_timeout) as resp:
                    await resp.read()
                    self._set_ready(resp.status == 200)
            except asyncio.TimeoutError:
                # a single-threaded model (plumber, httpuv) busy scoring cannot answer /health at once:
                # busy is not down, so a ready model stays ready until it refuses or answers non-200
                if not self.ready:
                    self._set_ready(False)
            except aiohttp.ClientError:
                self._set_ready(False)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), HEALTH_POLL_READY if self.ready else HEALTH_POLL_STARTING)
            except asyncio.TimeoutError:
                pass

    def _fail(self, kind: str, status: int, message: str) -> AdapterError:
        self.metrics.model_error(kind)
        return AdapterError(status, message)

    async def predict(self, rows: list[dict]) -> list:
        """The model's scores for validated rows, or AdapterError 502/503/504 saying what went wrong."""
        body = _dumps({"rows": rows})
        for attempt in (0, 1):
            try:
                async with self.session.post(self.predict_url, data=body, headers={"Content-Type": JSON},
                                             timeout=self._timeout) as resp:
                    raw = await resp.read()
                    status = resp.status
                break
            except asyncio.TimeoutError:
                raise self._fail("timeout", 504, f"model {self.name} did not answer within {self.timeout_text} "
                                                 "(manifest limits.timeout)") from None
            except aiohttp.ClientConnectorError:
                self._set_ready(False)
                self._wake.set()
                raise self._fail("unreachable", 503, f"model {self.name} is not reachable (it is down or restarting)") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if attempt == 0:
                    continue  # a pooled connection the model had closed: retry once on a fresh one
                self._wake.set()
                raise self._fail("disconnected", 502, f"model {self.name} closed the connection without answering") from None
        if status != 200:
            text = raw[:300].decode("utf-8", "replace").strip()
            kind = "failed" if status >= 500 else "rejected"
            raise self._fail("http_error", 502, f"model {self.name} {kind} the request with HTTP {status}: {text}")
        try:
            answer = _loads(raw)
        except (ValueError, RecursionError):
            shown = raw[:100].decode("utf-8", "replace")
            raise self._fail("not_json", 502, f"model {self.name} answered with something that is not JSON: {shown!r}") from None
        try:
            return check_scores(self.name, answer, len(rows))
        except ValueError as e:
            raise self._fail("bad_answer", 502, str(e)) from None


# -- request parsing ----------------------------------------------------------------------

def _flatten(data: Any) -> list:
    if data and isinstance(data[0], list):
        out: list = []
        for item in data:
            out.extend(_flatten(item) if isinstance(item, list) else [item])
        return out
    return data


def rows_from_v2(body: Any, manifest: Manifest) -> list[dict]:
    """Rows from a v2 inference request: one input per feature column, shape [n] or [n, 1]."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise AdapterError(400, 'expected a v2 inference request: {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
    known = {f.name: f for f in manifest.features}
    columns: dict[str, list] = {}
    problems = []
    n_rows: int | None = None
    for i, inp in enumerate(body["inputs"]):
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not isinstance(inp.get("data"), list):
            raise AdapterError(400, f"inputs[{i}]: expected an object with name, shape, datatype and data")
        name, data, shape = inp["name"], _flatten(inp["data"]), inp.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) for d in shape):
            raise AdapterError(400, f"input {name!r}: expected a shape such as [n] or [n, 1]; got {shape!r}")
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            problems.append(RowProblem(None, name, f"expected one value per row (shape [n] or [n, 1]); got shape {shape}"))
            continue
        if len(data) != shape[0]:
            raise AdapterError(400, f"input {name!r}: shape {shape} says {shape[0]} value(s) but data holds {len(data)}")
        if name not in known:
            problems.append(RowProblem(None, name, "unknown input (not a declared feature)"))
            continue
        if inp.get("datatype") == "BOOL" and known[name].type == "boolean":
            data = [bool(v) if v in (0, 1) and not isinstance(v, float) else v for v in data]
        if n_rows is None:
            n_rows = len(data)
        elif len(data) != n_rows:
            problems.append(RowProblem(None, name, f"has {len(data)} value(s); other inputs have {n_rows}"))
            continue
        columns[name] = data
    if problems:
        raise RowsInvalid(problems, len(problems))
    rows: list[dict] = [{} for _ in range(n_rows or 0)]
    for name, data in columns.items():
        for row, value in zip(rows, data):
            row[name] = value
    return rows


# -- the application ----------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RealtimeAdapter:
    """Routes that only parse and serialize; the rules live in `score`."""

    def __init__(self, manifest: Manifest, model_url: str):
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.validator = RowValidator(manifest)
        self.max_rows = manifest.limits.max_rows
        self.max_body = manifest.limits.max_body_bytes
        self.metrics = Metrics(manifest.name)
        self.upstream = Upstream(manifest, model_url, self.metrics)
        self.score_name = manifest.score.name

    # the one place the rules are applied, whatever the protocol
    async def score(self, rows: Any) -> list:
        if isinstance(rows, list) and len(rows) > self.max_rows:
            raise AdapterError(413, f"{len(rows)} rows in one request; model {self.name} takes at most "
                                    f"{self.max_rows} (manifest limits.max_rows)")
        try:
            clean = self.validator.validate(rows)
        except RowsInvalid as e:
            raise AdapterError(422, **_invalid(e)) from None
        if not self.upstream.ready:
            raise AdapterError(503, f"model {self.name} is not ready (starting, or its /health does not answer 200)")
        if not clean:
            return []  # nothing to score: no need to bother the model
        return await self.upstream.predict(clean)

    async def _body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body:
            raise AdapterError(413, f"request body of {length} bytes; model {self.name} takes at most "
                                    f"{self.max_body} (manifest limits.max_body)")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise AdapterError(413, f"request body larger than {self.max_body} bytes "
                                    "(manifest limits.max_body)") from None

    def _json(self, body: bytes) -> Any:
        try:
            return _loads(body)
        except RecursionError:
            raise AdapterError(400, "request body nests JSON too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise AdapterError(400, f"request body is not valid JSON: {str(e)[:200]}") from None

    def _csv_rows(self, body: bytes) -> list[dict]:
        try:
            text = body.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise AdapterError(400, f"CSV body is not UTF-8 text (byte {e.start})") from None
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
            if not header:
                raise AdapterError(400, "CSV body is empty: expected a header row naming the feature columns")
            header = [h.strip() for h in header]
            return self.validator.rows_from_csv(header, (rec for rec in reader if rec))
        except csv.Error as e:
            raise AdapterError(400, f"CSV body is not valid CSV at line {reader.line_num}: {e}") from None

    # routes
    async def predict(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if request.content_type == "text/csv":
            rows = self._csv_rows(body)
        else:
            doc = self._json(body)
            if not isinstance(doc, dict) or "rows" not in doc:
                raise AdapterError(422, 'expected a JSON object {"rows": [{feature: value, ...}, ...]}',
                                   problems=[RowProblem(None, None, 'the body has no "rows" list')])
            rows = doc["rows"]
        scores = await self.score(rows)
        if "text/csv" in request.headers.get("Accept", ""):
            text = self.score_name + "\n" + "".join(f"{s!r}\n" for s in scores)
            return web.Response(text=text, content_type="text/csv",
                                headers={"X-Model": self.name, "X-Model-Version": self.version})
        return web.Response(body=_dumps({"model": self.name, "version": self.version, "scores": scores}),
                            content_type=JSON)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"live":true}', content_type=JSON)

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.upstream.ready
        return web.Response(status=200 if ok else 503, body=_dumps({"ready": ok}), content_type=JSON)

    def _check_name(self, request: web.Request) -> None:
        name = request.match_info["name"]
        if name != self.name:
            raise AdapterError(404, f"unknown model {name!r}; this adapter serves {self.name!r}")
        version = request.match_info.get("version")
        if version is not None and version != self.version:
            raise AdapterError(404, f"model {self.name} has no version {version!r} here; it serves {self.version}")

    async def v2_metadata(self, request: web.Request) -> web.Response:
        self._check_name(request)
        return web.Response(body=_dumps(self.v2_metadata_doc()), content_type=JSON)

    def v2_metadata_doc(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": f"modelplane/{self.manifest.language}",
            "inputs": [{"name": f.name, "datatype": V2_DATATYPES[f.type], "shape": [-1],
                        "parameters": {"required": f.required,
                                       **({"allowed": f.allowed} if f.allowed is not None else {})}}
                       for f in self.manifest.features],
            "outputs": [{"name": self.score_name, "datatype": "FP64", "shape": [-1]}],
        }

    async def v2_model_ready(self, request: web.Request) -> web.Response:
        self._check_name(request)
        ok = self.upstream.ready
        return web.Response(status=200 if ok else 503, body=_dumps({"name": self.name, "ready": ok}),
                            content_type=JSON)

    async def v2_infer(self, request: web.Request) -> web.Response:
        """Open Inference Protocol inference. A request the server rejects is 400 with
        `{"error": ...}` naming the input at fault (KServe's v2 REST spec, "Inference Response
        JSON Object" / error object); the binary tensor data extension is spoken both ways."""
        self._check_name(request)
        body = await self._body(request)
        binary_header = request.headers.get(v2binary.HEADER)
        try:
            if binary_header is not None:
                head, binary = v2binary.split(body, binary_header)
                doc = self._json(head)
                if isinstance(doc, dict):
                    v2binary.decode_inputs(doc, binary)
            else:
                doc = self._json(body)
            if not isinstance(doc, dict):
                raise AdapterError(400, "expected a v2 inference request object")
            request_id = doc.get("id")
            if request_id is not None and not isinstance(request_id, str):
                raise AdapterError(400, f"id: expected a string; got {type(request_id).__name__}")
            outputs = doc.get("outputs")
            if outputs is not None:
                names = [o.get("name") if isinstance(o, dict) else None for o in outputs] \
                    if isinstance(outputs, list) else [None]
                unknown = [n for n in names if n != self.score_name]
                if unknown:
                    raise AdapterError(400, f"outputs: unknown output {str(unknown[0])[:100]!r}; "
                                            f"this model has one, {self.score_name!r}")
            try:
                rows = rows_from_v2(doc, self.manifest)
            except RowsInvalid as e:
                raise AdapterError(400, _v2_message(e)) from None
            try:
                scores = await self.score(rows)
            except AdapterError as e:
                if e.status == 422:  # a row check: in v2 terms, an input holds a bad value
                    raise AdapterError(400, _v2_message(e.body)) from None
                raise
        except v2binary.BinaryError as e:
            raise AdapterError(400, str(e)) from None
        except AdapterError as e:
            if e.status in (400, 422):
                e.status, e.body = 400, {"error": e.body["error"]}
            raise
        values = [float(s) for s in scores]
        output: dict[str, Any] = {"name": self.score_name, "shape": [len(values), 1], "datatype": "FP64"}
        answer: dict[str, Any] = {"model_name": self.name, "model_version": self.version,
                                  "id": request_id or str(uuid.uuid4()), "parameters": {}, "outputs": [output]}
        if not v2binary.wants_binary(doc, self.score_name):
            output["data"] = values
            return web.Response(body=_dumps(answer), content_type=JSON)
        raw = v2binary.encode_fp64(values)
        output["parameters"] = {"binary_data_size": len(raw)}
        head = _dumps(answer)
        return web.Response(body=head + raw, content_type="application/octet-stream",
                            headers={v2binary.HEADER: str(len(head))})

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    def _instrument(self, route: str, handler: Handler) -> Handler:
        metrics = self.metrics
        perf = time.perf_counter

        async def wrapped(request: web.Request) -> web.StreamResponse:
            t0 = perf()
            metrics.in_flight += 1
            try:
                resp = await handler(request)
            except AdapterError as e:
                resp = e.response()
            except web.HTTPException as e:
                metrics.observe(route, e.status, perf() - t0)
                raise
            except Exception:
                resp = _internal_error(request)
            finally:
                metrics.in_flight -= 1
            metrics.observe(route, resp.status, perf() - t0)
            return resp

        return wrapped

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[json_errors])
        routes = [
            ("POST", "/predict", self.predict),
            ("GET", "/v2/health/live", self.live),
            ("GET", "/v2/health/ready", self.ready),
            ("GET", "/v2/models/{name}", self.v2_metadata),
            ("GET", "/v2/models/{name}/ready", self.v2_model_ready),
            ("POST", "/v2/models/{name}/infer", self.v2_infer),
            ("GET", "/v2/models/{name}/versions/{version}", self.v2_metadata),
            ("GET", "/v2/models/{name}/versions/{version}/ready", self.v2_model_ready),
            ("POST", "/v2/models/{name}/versions/{version}/infer", self.v2_infer),
            ("GET", "/v2", self.v2_server_metadata),
            ("GET", "/metrics", self.metrics_route),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._instrument(path, handler))
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def v2_server_metadata(self, request: web.Request) -> web.Response:
        return web.Response(body=_dumps({"name": "modelplane-adapter", "version": "2",
                                         "extensions": [v2binary.EXTENSION]}), content_type=JSON)

    async def _on_startup(self, app: web.Application) -> None:
        await self.upstream.start()
        self._health_task = asyncio.get_running_loop().create_task(self.upstream.watch_health())

    async def _on_cleanup(self, app: web.Application) -> None:
        self._health_task.cancel()
        try:
            await self._health_task
        except asyncio.CancelledError:
            pass
        await self.upstream.close()


def _invalid(e: RowsInvalid) -> dict:
    body = e.to_json()
    return {"message": body.pop("error"), **body}


def _v2_message(invalid: RowsInvalid | dict) -> str:
    """A v2 error message naming the inputs (features) at fault and the first rows."""
    body = invalid.to_json() if isinstance(invalid, RowsInvalid) else invalid
    problems = body.get("problems") or []
    parts = []
    for p in problems[:5]:
        where = f"input {p.get('field')!r}" if p.get("field") else "request"
        row = f" row {p['row']}" if p.get("row") is not None else ""
        parts.append(f"{where}{row}: {p.get('error')}")
    more = len(problems) + int(body.get("truncated") or 0) - len(parts)
    return f"{body.get('error')}: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer is JSON, the router's own 404 and 405 included (with Allow), and no
    exception text or path ever reaches a client."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        reason = {404: f"no route for {request.method} {request.path[:200]}",
                  405: f"{request.method} is not allowed on {request.path[:200]}"}.get(e.status, e.reason)
        return web.Response(status=e.status, body=_dumps({"error": reason}), content_type=JSON, headers=headers)
    except Exception:
        return _internal_error(request)


def _internal_error(request: web.Request) -> web.Response:
    """A bug: the client learns a request id, the log has the traceback under it."""
    given = request.headers.get("X-Request-Id", "")
    rid = given if given.isascii() and given.replace("-", "").replace("_", "").replace(".", "").isalnum() \
        and len(given) <= 64 else uuid.uuid4().hex[:16]
    log.exception("%s %s failed [request id %s]", request.method, request.path[:200], rid)
    body = {"error": f"adapter error: its log has the details under request id {rid}", "request_id": rid}
    return web.Response(status=500, body=_dumps(body), content_type=JSON, headers={"X-Request-Id": rid})


# -- supervisor mode: the adapter runs the model ------------------------------------------

class Supervisor:
    """Starts `manifest.command` with PORT/HOST, passes its output through, reports its exit."""

    def __init__(self, manifest: Manifest, port: int):
        self.manifest = manifest
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.stderr_tail: deque[bytes] = deque(maxlen=STDERR_TAIL_LINES)
        self._pumps: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, on_exit: Callable[[int], None]) -> None:
        env = dict(os.environ, PORT=str(self.port), HOST="127.0.0.1")
        from .batch import PREEXEC as preexec
        self.proc = subprocess.Popen(self.manifest.command, cwd=self.manifest.folder, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=preexec)  # noqa: PLW1509 - only prctl
        log.info("started model %s (pid %s): %s", self.manifest.ref, self.proc.pid, " ".join(self.manifest.command))
        for stream, tail in ((self.proc.stdout, None), (self.proc.stderr, self.stderr_tail)):
            t = threading.Thread(target=self._pump, args=(stream, tail), daemon=True)
            t.start()
            self._pumps.append(t)

        def watch() -> None:
            status = self.proc.wait()
            if not self.stopping:
                on_exit(status)  # at once: the pumps' last lines are joined before the tail is printed
            for t in self._pumps:
                t.join(2.0)

        threading.Thread(target=watch, daemon=True).start()

    @staticmethod
    def _pump(stream, tail: deque | None) -> None:
        sink = sys.stderr.buffer
        for line in iter(stream.readline, b""):
            if tail is not None:
                tail.append(line[-2000:])
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError):
                pass
        stream.close()

    def tail_text(self) -> str:
        return b"".join(self.stderr_tail).decode("utf-8", "replace").rstrip()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the model's process group, SIGKILL it after `grace` seconds."""
        self.stopping = True
        if self.proc is None:
            return
        from .batch import kill_group

        kill_group(self.proc, grace)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def serve(manifest: Manifest, *, host: str, port: int, model_url: str | None = None) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or, in supervisor mode, until the model exits (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    model_exit: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervisor = None
    adapter: RealtimeAdapter | None = None

    def model_died() -> None:
        # Not ready from this instant (a balancer sends nothing more here), then stop.
        if adapter is not None:
            adapter.upstream._set_ready(False)
        stop.set()

    if model_url is None:
        supervisor = Supervisor(manifest, free_port())

        def on_exit(status: int) -> None:
            model_exit.append(status)
            loop.call_soon_threadsafe(model_died)

        try:
            supervisor.start(on_exit)
        except OSError as e:
            print(f"modelplane-adapter: could not start model {manifest.ref} "
                  f"({' '.join(manifest.command)} in {manifest.folder}): {e.strerror or e}", file=sys.stderr)
            return 1
        model_url = supervisor.url
    adapter = RealtimeAdapter(manifest, model_url)
    runner = web.AppRunner(adapter.app(), access_log=None, handle_signals=False, shutdown_timeout=5.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        try:
            await site.start()
        except OSError as e:
            print(f"modelplane-adapter: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
            return 1
        log.info("adapter for %s on http://%s:%s, model at %s", manifest.ref, host, port, model_url)
        await stop.wait()
        if model_exit:
            # Nothing in flight can succeed without the model: no graceful wait for clients on
            # keep-alive connections to finish (they would keep sending to a dead model).
            runner._shutdown_timeout = 0.1
    finally:
        await runner.cleanup()
        if supervisor:
            await loop.run_in_executor(None, supervisor.stop)
    if model_exit:
        from .batch import describe_exit

        tail = supervisor.tail_text()
        print(f"modelplane-adapter: model {manifest.ref} {describe_exit(model_exit[0])}"
              + (f"; its last stderr lines:\n{tail}" if tail else " (it wrote nothing to stderr)"),
              file=sys.stderr, flush=True)
        return 1
    return 0


def run(manifest: Manifest, *, host: str, port: int, model_url: str | None = None) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(manifest, host=host, port=port, model_url=model_url))
    return uvloop.run(serve(manifest, host=host, port=port, model_url=model_url))
