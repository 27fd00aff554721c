"""The realtime adapter: the public face of one model (a lean HTTP/1.1 server + pooled keep-alive client).

It validates every request against the manifest before the model sees it, checks the model's
answer, enforces the manifest's limits, speaks `/predict` and the Open Inference Protocol v2,
exposes Prometheus metrics and, in supervisor mode, runs the model process itself.
"""
from __future__ import annotations

import asyncio
import bisect
import csv
import hmac
import io
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from . import SECRET_ENV, SECRET_HEADER, v2binary
from .http11 import Client, Disconnected, Request, Response, Server, Unreachable
from .schema import RowProblem, RowsInvalid, RowValidator, check_scores

if TYPE_CHECKING:  # served: an adapters.served.ServedManifest, the same attributes without pydantic
    from .manifest import Manifest

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
            try:  # UTF-8 has no encoding for a lone surrogate (orjson also refuses integers past 64 bits)
                json.dumps(doc, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("the JSON holds a lone UTF-16 surrogate escape (such as \\ud800), "
                                 "which is not text") from None
            return doc
except ImportError:  # pragma: no cover - orjson is a dependency; stay correct without it
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads

log = logging.getLogger(__name__)

V2_BINARY_HEADER = v2binary.HEADER.lower()
V2_DATATYPES = {"number": "FP64", "integer": "INT64", "string": "BYTES", "boolean": "BOOL"}
HEALTH_POLL_FIRST = 0.01  # seconds between /health polls of a starting model for its first ...
HEALTH_POLL_FIRST_FOR = 5.0  # ... seconds (a refused connection costs microseconds), then ...
HEALTH_POLL_STARTING = 0.05  # ... this, until the model is ready
HEALTH_POLL_READY = 1.0
STOP_GRACE_SECONDS = 10.0
STDERR_TAIL_LINES = 40
JSON = "application/json"
PREDICT_TYPES = (JSON, "text/csv")
INFER_TYPES = (JSON, "application/octet-stream")


class AdapterError(Exception):
    """An answer other than 200, with a JSON body `{"error": message, ...}`."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}

    def response(self) -> Response:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return Response(self.status, _dumps(self.body), JSON, headers)


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
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"model URL {url!r}: expected http://host:port")
        self.client = Client(parts.hostname, parts.port or 80)
        self.base_path = parts.path
        self.predict_path = self.base_path + "/predict"
        self.health_path = self.base_path + "/health"
        self.metrics = metrics
        self.timeout_s = manifest.limits.timeout_seconds
        self.timeout_text = manifest.limits.timeout
        self.ready = False
        self.closed = False
        self._wake = asyncio.Event()

    async def close(self) -> None:
        self.client.close()

    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            log.info("model %s is %s", self.name, "ready" if ready else "not ready")
        self.ready = ready
        self.metrics.model_up = 1 if ready else 0

    async def watch_health(self) -> None:
        """Poll the model's GET /health: fast until ready, then once a second (or when a call failed)."""
        loop = asyncio.get_running_loop()
        fast_until = loop.time() + HEALTH_POLL_FIRST_FOR
        while not self.closed:
            try:
                status, _ = await self.client.request("GET", self.health_path, None, 1.0)
                self._set_ready(status == 200)
            except asyncio.TimeoutError:
                # a single-threaded model (plumber, httpuv) busy scoring cannot answer /health at once:
                # busy is not down, so a ready model stays ready until it refuses or answers non-200
                if not self.ready:
                    self._set_ready(False)
            except (Unreachable, Disconnected):
                self._set_ready(False)
            self._wake.clear()
            if self.ready:
                wait = HEALTH_POLL_READY
            else:  # starting (or down): every 10 ms at first, so ready is known when the model is
                wait = HEALTH_POLL_FIRST if loop.time() < fast_until else HEALTH_POLL_STARTING
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
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
                status, raw = await self.client.request("POST", self.predict_path, body, self.timeout_s)
                break
            except asyncio.TimeoutError:
                raise self._fail("timeout", 504, f"model {self.name} did not answer within {self.timeout_text} "
                                                 "(manifest limits.timeout)") from None
            except Unreachable:
                self._set_ready(False)
                self._wake.set()
                raise self._fail("unreachable", 503, f"model {self.name} is not reachable (it is down or restarting)") from None
            except Disconnected:
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


def rows_from_v2(body: Any, manifest: Manifest) -> tuple[list[dict], int]:
    """Rows from a v2 inference request: one input per feature (or passthrough) column, shape
    [n] or [n, 1]; and the rank the inputs had (1 or 2), which the outputs keep."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise AdapterError(400, 'expected a v2 inference request: {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
    known = {f.name: f for f in manifest.features}
    known.update((p.name, p) for p in getattr(manifest, "passthrough", None) or [])
    columns: dict[str, list] = {}
    problems = []
    n_rows: int | None = None
    rank = 1
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
            what = "a declared feature or passthrough column" if len(known) > len(manifest.features) \
                else "a declared feature"
            problems.append(RowProblem(None, name, f"unknown input (not {what})"))
            continue
        if i == 0 or not columns:
            rank = len(shape)
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
    return rows, rank


# -- the application ----------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


class RealtimeAdapter:
    """Routes that only parse and serialize; the rules live in `score`."""

    def __init__(self, manifest: Manifest, model_url: str, secret: str | None = None):
        self.manifest = manifest
        # the plane's secret: with it, only the plane is served (see `refuse`)
        self.secret = secret.encode("latin-1") if secret is not None else None
        self._hosts_ok: set[str] = set()
        self.name = manifest.name
        self.version = manifest.version
        self.validator = RowValidator(manifest)
        self.max_rows = manifest.limits.max_rows
        self.max_body = manifest.limits.max_body_bytes
        self.metrics = Metrics(manifest.name)
        self.upstream = Upstream(manifest, model_url, self.metrics)
        self.score_name = manifest.score.name
        self.passthrough = list(getattr(manifest, "passthrough", None) or [])
        self._outputs = [self.score_name] + [p.name for p in self.passthrough]
        self._static, self._model_routes = self._routes()

    # the one place the rules are applied, whatever the protocol
    async def score(self, rows: Any, header: list[str] | None = None) -> list:
        return (await self.score_rows(rows, header))[0]

    async def score_rows(self, rows: Any, header: list[str] | None = None) -> tuple[list, dict[str, list] | None]:
        """(scores, the passthrough columns' values `{name: [per row]}` or None when the manifest
        declares none). The model gets the feature values only."""
        if isinstance(rows, list) and len(rows) > self.max_rows:
            raise AdapterError(413, f"{len(rows)} rows in one request; model {self.name} takes at most "
                                    f"{self.max_rows} (manifest limits.max_rows)")
        try:
            clean, passthrough = self.validator.split(rows, header)
        except RowsInvalid as e:
            raise AdapterError(422, **_invalid(e)) from None
        if not self.upstream.ready:
            raise AdapterError(503, f"model {self.name} is not ready (starting, or its /health does not answer 200)")
        if not clean:
            return [], passthrough  # nothing to score: no need to bother the model
        return await self.upstream.predict(clean), passthrough

    def _body(self, request: Request) -> bytes:
        """The body as sent, inflated when it has a Content-Encoding. The server refused one over
        max_body while it arrived (see error_body); inflated, it is held to the same cap."""
        coding = request.headers.get("content-encoding")
        if coding is None:
            return request.body
        return inflate(request.body, coding, self.max_body, self.name)

    def _json(self, body: bytes) -> Any:
        try:
            return _loads(body)
        except RecursionError:
            raise AdapterError(400, "request body nests JSON too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise AdapterError(400, f"request body is not valid JSON: {str(e)[:200]}") from None

    def _csv_rows(self, body: bytes) -> tuple[list[str], list[dict]]:
        """(header, rows) of a CSV body; a header that lacks a required column, or names one
        that is unknown or repeated, is refused at once: one problem per column, not per row."""
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
            problems = self.validator.header_problems(header)
            if problems:
                raise AdapterError(422, **_invalid(RowsInvalid(problems, len(problems))))
            return header, self.validator.rows_from_csv(header, (rec for rec in reader if rec))
        except csv.Error as e:
            raise AdapterError(400, f"CSV body is not valid CSV at line {reader.line_num}: {e}") from None

    # routes
    async def predict(self, request: Request) -> Response:
        body = self._body(request)
        header = None
        if request.content_type == "text/csv":
            header, rows = self._csv_rows(body)
        else:
            doc = self._json(body)
            if not isinstance(doc, dict) or "rows" not in doc:
                raise AdapterError(422, 'expected a JSON object {"rows": [{feature: value, ...}, ...]}',
                                   problems=[RowProblem(None, None, 'the body has no "rows" list')])
            rows = doc["rows"]
        scores, passthrough = await self.score_rows(rows, header)
        if "text/csv" in request.headers.get("accept", ""):
            if passthrough is None:
                text = self.score_name + "\n" + "".join(f"{s!r}\n" for s in scores)
            else:
                text = _csv_answer(passthrough, self.score_name, scores)
            return Response(200, text.encode(), "text/csv; charset=utf-8",
                            {"X-Model": self.name, "X-Model-Version": self.version})
        answer = {"model": self.name, "version": self.version, "scores": scores}
        if passthrough is not None:
            answer["passthrough"] = passthrough
        return Response(200, _dumps(answer))

    async def live(self, request: Request) -> Response:
        return Response(200, b'{"live":true}')

    async def ready(self, request: Request) -> Response:
        ok = self.upstream.ready
        return Response(200 if ok else 503, _dumps({"ready": ok}))

    def _check_name(self, request: Request) -> None:
        name = request.match["name"]
        if name != self.name:
            raise AdapterError(404, f"unknown model {name!r}; this adapter serves {self.name!r}")
        version = request.match.get("version")
        if version is not None and version != self.version:
            raise AdapterError(404, f"model {self.name} has no version {version!r} here; it serves {self.version}")

    async def v2_metadata(self, request: Request) -> Response:
        self._check_name(request)
        return Response(200, _dumps(self.v2_metadata_doc()))

    def v2_metadata_doc(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": f"modelplane/{self.manifest.language}",
            "inputs": [{"name": f.name, "datatype": V2_DATATYPES[f.type], "shape": [-1],
                        "parameters": {"required": f.required,
                                       **({"allowed": f.allowed} if f.allowed is not None else {})}}
                       for f in self.manifest.features]
                      + [{"name": p.name, "datatype": V2_DATATYPES[p.type], "shape": [-1],
                          "parameters": {"required": p.required, "passthrough": True}} for p in self.passthrough],
            "outputs": [{"name": self.score_name, "datatype": "FP64", "shape": [-1]}]
                       + [{"name": p.name, "datatype": V2_DATATYPES[p.type], "shape": [-1],
                           "parameters": {"passthrough": True}} for p in self.passthrough],
        }

    async def v2_model_ready(self, request: Request) -> Response:
        self._check_name(request)
        ok = self.upstream.ready
        return Response(200 if ok else 503, _dumps({"name": self.name, "ready": ok}))

    async def v2_infer(self, request: Request) -> Response:
        """Open Inference Protocol inference. A request the server rejects is 400 with
        `{"error": ...}` naming the input at fault (KServe's v2 REST spec, "Inference Response
        JSON Object" / error object); the binary tensor data extension is spoken both ways."""
        self._check_name(request)
        body = self._body(request)
        binary_header = request.headers.get(V2_BINARY_HEADER)
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
            wanted = self._outputs
            if outputs is not None:
                names = [o.get("name") if isinstance(o, dict) else None for o in outputs] \
                    if isinstance(outputs, list) else [None]
                unknown = [n for n in names if n not in self._outputs]
                if unknown:
                    have = (f"this model has one, {self.score_name!r}" if len(self._outputs) == 1 else
                            f"this model has {', '.join(map(repr, self._outputs))}")
                    raise AdapterError(400, f"outputs: unknown output {str(unknown[0])[:100]!r}; {have}")
                if names:
                    wanted = list(dict.fromkeys(names))
            try:
                rows, rank = rows_from_v2(doc, self.manifest)
            except RowsInvalid as e:
                raise AdapterError(400, _v2_message(e)) from None
            try:
                scores, passthrough = await self.score_rows(rows)
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
        n = len(scores)
        shape = [n] if rank == 1 else [n, 1]  # as the inputs came: [n] stays [n]
        tensors = {self.score_name: ("FP64", [float(s) for s in scores])}
        sent = {inp.get("name") for inp in doc["inputs"] if isinstance(inp, dict)}
        for p in self.passthrough:
            if passthrough is not None and p.name in sent:  # an optional one left out: no tensor
                tensors[p.name] = (V2_DATATYPES[p.type], passthrough[p.name])
        answer: dict[str, Any] = {"model_name": self.name, "model_version": self.version,
                                  "id": request_id or str(uuid.uuid4()), "parameters": {}, "outputs": []}
        binary = []
        for name in wanted:
            if name not in tensors:
                continue  # an optional passthrough column the request did not send
            datatype, values = tensors[name]
            output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
            raw = v2binary.encode(values, datatype) if v2binary.wants_binary(doc, name) else None
            if raw is None:
                output["data"] = values
            else:
                output["parameters"] = {"binary_data_size": len(raw)}
                binary.append(raw)
            answer["outputs"].append(output)
        if not binary:
            return Response(200, _dumps(answer))
        head = _dumps(answer)
        return Response(200, head + b"".join(binary), "application/octet-stream", {v2binary.HEADER: str(len(head))})

    async def metrics_route(self, request: Request) -> Response:
        return Response(200, self.metrics.render().encode(), "text/plain; charset=utf-8",
                        {"X-Prometheus-Format": "0.0.4"})

    async def v2_server_metadata(self, request: Request) -> Response:
        return Response(200, _dumps({"name": "modelplane-adapter", "version": "2",
                                     "extensions": [v2binary.EXTENSION]}))

    def _routes(self) -> tuple[dict, list]:
        """Static paths {path: {method: (route, handler)}} and the v2 model paths as
        (segments after /v2/models/, {method: (route, handler)})."""
        static = {
            "/predict": {"POST": self.predict},
            "/v2/health/live": {"GET": self.live},
            "/v2/health/ready": {"GET": self.ready},
            "/v2": {"GET": self.v2_server_metadata},
            "/metrics": {"GET": self.metrics_route},
        }
        model = [
            ("/v2/models/{name}", {"GET": self.v2_metadata}),
            ("/v2/models/{name}/ready", {"GET": self.v2_model_ready}),
            ("/v2/models/{name}/infer", {"POST": self.v2_infer}),
            ("/v2/models/{name}/versions/{version}", {"GET": self.v2_metadata}),
            ("/v2/models/{name}/versions/{version}/ready", {"GET": self.v2_model_ready}),
            ("/v2/models/{name}/versions/{version}/infer", {"POST": self.v2_infer}),
        ]
        return ({path: {m: (path, h) for m, h in methods.items()} for path, methods in static.items()},
                [(route.split("/")[3:], {m: (route, h) for m, h in methods.items()}) for route, methods in model])

    #: what each route that takes a body accepts as its Content-Type (the control service's front
    #: door accepts the same: control/api/serving.py)
    ACCEPTS = {"/predict": PREDICT_TYPES, "/v2/models/{name}/infer": INFER_TYPES,
               "/v2/models/{name}/versions/{version}/infer": INFER_TYPES}

    def refuse(self, request: Request) -> Response | None:
        """With the plane's secret, what only the plane sends, or the answer refusing the request:
        the secret itself (401); a Host that is an IP literal or localhost, as the plane's own
        calls have, and no other name (403: a page whose name was rebound to loopback); no
        browser (403: `Origin`, or `Sec-Fetch-Site` cross-site or same-site)."""
        headers = request.headers
        given = headers.get("x-modelplane-secret")
        if given is None:
            return _refusal(401, f"this adapter answers its plane only: send header {SECRET_HEADER} "
                                 f"(the plane's {SECRET_ENV})")
        if not hmac.compare_digest(given.encode("latin-1"), self.secret):
            return _refusal(401, f"{SECRET_HEADER} does not match this adapter's secret")
        host = headers.get("host")
        if host is not None and host not in self._hosts_ok:
            if not _loopback_host(host):
                return _refusal(403, f"Host {host[:100]!r} refused: this adapter answers at an IP address or "
                                     "localhost only")
            if len(self._hosts_ok) < 64:
                self._hosts_ok.add(host)
        origin = headers.get("origin")
        site = headers.get("sec-fetch-site")
        if origin is not None or (site is not None and site.lower() in ("cross-site", "same-site")):
            shown = f"Origin: {origin[:100]}" if origin is not None else f"Sec-Fetch-Site: {site[:20]}"
            return _refusal(403, f"a browser's cross-site request ({shown}) is refused: this adapter answers "
                                 "its plane only")
        return None

    def _find(self, path: str) -> tuple[dict | None, dict]:
        """The methods served on `path` and its path parameters."""
        methods = self._static.get(path)
        if methods is not None:
            return methods, {}
        if not path.startswith("/v2/models/"):
            return None, {}
        if "%" in path:
            segments = [unquote(p) for p in path.split("/")[3:]]
        else:
            segments = path.split("/")[3:]
        for pattern, methods in self._model_routes:
            if len(pattern) != len(segments):
                continue
            match = {}
            for want, got in zip(pattern, segments):
                if want[0] == "{":
                    if not got:
                        break
                    match[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return methods, match
        return None, {}

    async def handle(self, request: Request) -> Response:
        """Every request: route it, run its handler, count it; every answer is JSON, the 404s and
        405s (with Allow) included, and no exception text or path ever reaches a client."""
        if self.secret is not None:
            refused = self.refuse(request)
            if refused is not None:
                return refused
        path = request.path
        methods, match = self._find(path)
        if methods is None:
            return Response(404, _dumps({"error": f"no route for {request.method[:20]} {path[:200]}"}))
        found = methods.get(request.method)
        if found is None:
            return Response(405, _dumps({"error": f"{request.method[:20]} is not allowed on {path[:200]}"}),
                            JSON, {"Allow": ",".join(sorted(methods))})
        route, handler = found
        request.match = match
        metrics = self.metrics
        if self.secret is not None and route in self.ACCEPTS and request.content_type not in self.ACCEPTS[route]:
            accepted = self.ACCEPTS[route]
            metrics.observe(route, 415, 0.0)
            return _refusal(415, f"Content-Type {request.content_type[:60] or 'none'} is not accepted by "
                                 f"{request.method} {route}; send {' or '.join(accepted)}")
        t0 = time.perf_counter()
        metrics.in_flight += 1
        try:
            resp = await handler(request)
        except AdapterError as e:
            resp = e.response()
        except Exception:
            resp = _internal_error(request)
        finally:
            metrics.in_flight -= 1
        metrics.observe(route, resp.status, time.perf_counter() - t0)
        return resp

    def error_body(self, status: int, message: str, request: Request | None) -> Response:
        """The server's own refusals (an oversized or malformed request), worded like the adapter's
        and counted under their route when they have one. With the plane's secret, a caller that
        is not the plane learns no more than that (not the model's name or limits)."""
        if self.secret is not None and request is not None:
            refused = self.refuse(request)
            if refused is not None:
                return refused
        if status == 413:
            message = f"{message}; model {self.name} takes at most {self.max_body} (manifest limits.max_body)"
        if request is not None:
            methods, _ = self._find(request.path)
            found = methods.get(request.method) if methods else None
            if found is not None:
                self.metrics.observe(found[0], status, 0.0)
        return Response(status, _dumps({"error": message}))

    def server(self) -> Server:
        return Server(self.handle, max_body=self.max_body, error_body=self.error_body)

    async def start(self) -> None:
        self._health_task = asyncio.get_running_loop().create_task(self.upstream.watch_health())

    async def stop(self) -> None:
        # Python 3.11's wait_for can swallow a cancel that lands as its inner call completes (the
        # health loop polls every 10 ms while the model is down): the loop also stops on a flag,
        # and stopping waits a bounded time.
        self.upstream.closed = True
        self._health_task.cancel()
        await asyncio.wait([self._health_task], timeout=2.0)
        await self.upstream.close()


ENCODINGS = "gzip, deflate or identity"


def inflate(body: bytes, coding: str, cap: int, model: str) -> bytes:
    """`body` decoded by its Content-Encoding `coding` (RFC 9110 8.4.1): gzip (or x-gzip, RFC 1952,
    members one after the other), deflate (the zlib format, RFC 1950) or identity; at most `cap`
    bytes are ever inflated (413 past them), and a stream that is broken, cut short or followed by
    other bytes is a 400 naming its encoding. Anything else is a 415 naming what is accepted."""
    codings = [c for c in (c.strip(" \t").lower() for c in coding.split(",")) if c != "identity"]
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
        raise AdapterError(415, f"Content-Encoding {coding[:60]!r} is not supported; send the body as is, or "
                                f"in one of {ENCODINGS}")
    name = "deflate" if codings[0] == "deflate" else "gzip"
    wbits = 15 if name == "deflate" else 31
    out = bytearray()
    data = body
    while True:
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(data, cap + 1 - len(out))
        except zlib.error as e:
            raise AdapterError(400, f"the body is not valid {name}"
                                    f"{' (the zlib format, RFC 1950)' if name == 'deflate' else ''}: {e}") from None
        if len(out) > cap:
            raise AdapterError(413, f"the {name} body inflates past {cap} bytes; model {model} takes at most "
                                    f"{cap} (manifest limits.max_body)")
        if not d.eof:
            raise AdapterError(400, f"the {name} body is truncated: its stream ends before its end (and checksum)")
        data = d.unused_data
        if not data:
            return bytes(out)
        if name == "deflate":
            raise AdapterError(400, f"the deflate body has {len(data)} byte(s) after the end of its stream")


def _refusal(status: int, message: str) -> Response:
    return Response(status, _dumps({"error": message}))


def _loopback_host(host: str) -> bool:
    """Whether a Host is an IP literal or localhost, with an optional port: the names a page
    whose own name was rebound to this address (DNS rebinding) cannot send."""
    if host.startswith("["):
        address, sep, port = host[1:].partition("]")
        if not sep or (port and not (port[0] == ":" and (port[1:].isdigit() or not port[1:]))):
            return False
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        return True
    name, sep, port = host.partition(":")
    if sep and port and not (port.isascii() and port.isdigit()):
        return False
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def _csv_answer(passthrough: dict[str, list], score_name: str, scores: list) -> str:
    """The CSV answer of a model with passthrough columns: those columns, then the score."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*passthrough, score_name])
    columns = [[_csv_cell(v) for v in values] for values in passthrough.values()]
    writer.writerows(zip(*columns, (repr(s) for s in scores)))
    return out.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


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


def _internal_error(request: Request) -> Response:
    """A bug: the client learns a request id, the log has the traceback under it."""
    given = request.headers.get("x-request-id", "")
    rid = given if given.isascii() and given.replace("-", "").replace("_", "").replace(".", "").isalnum() \
        and len(given) <= 64 else uuid.uuid4().hex[:16]
    log.exception("%s %s failed [request id %s]", request.method, request.path[:200], rid)
    body = {"error": f"adapter error: its log has the details under request id {rid}", "request_id": rid}
    return Response(500, _dumps(body), JSON, {"X-Request-Id": rid})


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
        from . import sandbox
        from .procs import PREEXEC as preexec
        # PORT/HOST and nothing of ours (adapters/sandbox.py); sandboxed where bwrap works
        self.proc = sandbox.start(self.manifest.command, self.manifest.folder,
                                  {"PORT": str(self.port), "HOST": "127.0.0.1"},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  preexec_fn=preexec)  # noqa: PLW1509 - only prctl
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
        from .procs import kill_group

        kill_group(self.proc, grace)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def serve(manifest: Manifest, *, host: str, port: int, model_url: str | None = None,
                secret: str | None = None) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or, in supervisor mode, until the model exits (exit 1).
    `secret`: the plane's (MODELPLANE_ADAPTER_SECRET, which the entry point took out of the
    environment); with it, only requests carrying it are served."""
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
        except (OSError, RuntimeError) as e:  # RuntimeError: sandbox.SandboxError
            print(f"modelplane-adapter: could not start model {manifest.ref} "
                  f"({' '.join(manifest.command)} in {manifest.folder}): {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            return 1
        model_url = supervisor.url
    adapter = RealtimeAdapter(manifest, model_url, secret)
    server = adapter.server()
    shutdown_timeout = 5.0
    await adapter.start()
    try:
        try:
            await server.start(host, port, backlog=1024)
        except OSError as e:
            print(f"modelplane-adapter: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
            return 1
        log.info("adapter for %s on http://%s:%s, model at %s", manifest.ref, host, port, model_url)
        await stop.wait()
        if model_exit:
            # Nothing in flight can succeed without the model: no graceful wait for clients on
            # keep-alive connections to finish (they would keep sending to a dead model).
            shutdown_timeout = 0.1
    finally:
        await server.stop(shutdown_timeout)
        await adapter.stop()
        if supervisor:
            await loop.run_in_executor(None, supervisor.stop)
    if model_exit:
        from .procs import describe_exit

        tail = supervisor.tail_text()
        print(f"modelplane-adapter: model {manifest.ref} {describe_exit(model_exit[0])}"
              + (f"; its last stderr lines:\n{tail}" if tail else " (it wrote nothing to stderr)"),
              file=sys.stderr, flush=True)
        return 1
    return 0


def run(manifest: Manifest, *, host: str, port: int, model_url: str | None = None,
        secret: str | None = None) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(manifest, host=host, port=port, model_url=model_url, secret=secret))
    return uvloop.run(serve(manifest, host=host, port=port, model_url=model_url, secret=secret))
