"""The control service's front door: one asyncio (aiohttp) server on the service's address.

- **The models' traffic** (`/models/{name}/…`: predict and the Open Inference Protocol; and the
  protocol's `/v2/models/{name}/…` at the root, where KServe and Triton clients look, the same
  request as `/models/{name}/v2/models/{name}/…`) is served here, in the event loop: the same
  checks as the API (Host, the token unless the model is public or predict is opened, cross-site
  calls, the body's type), the body read from the socket within the model's `limits.max_body`
  (decoded if it came gzip or deflate, and within the service's budget of bodies in flight:
  control/bodies.py), then the runtime's `aforward`. For the local runtime that is the replica
  manager itself: it holds a request while a replica starts (a future, not a thread), balances
  over ready replicas and forwards on pooled connections. Each request is forwarded once, from
  here; Flask never sees it.
- **Everything else** is the Flask control API (control/app.py), run on a thread pool through
  a small WSGI bridge that streams the request body from the socket only as the route reads
  it (so each route's own cap applies before anything is spooled) and streams the answer back.
- **Connections** are bounded (`_Connection`): a request's head must arrive whole within
  MODELPLANE_HEAD_TIMEOUT of its first byte (a slowloris client trickling header lines is sent
  a 408 and closed), a connection that sends nothing is closed after MODELPLANE_KEEPALIVE_TIMEOUT,
  and past MODELPLANE_MAX_CONNECTIONS open at once a new connection is answered 503 with
  Retry-After and closed at once (rather than left unaccepted, where its client would wait
  unanswered and the kernel's backlog would fill): the client learns why, and a fresh connection
  gets in as soon as another closes.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional
from urllib.parse import unquote_to_bytes

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from control.api import serving
from control.app import MUTATING, request_id
from control.bodies import BodyBudget, Busy, Decoder, body_encoding, trim_memory
from control.errors import NotFound, PlaneError, TooLarge, UpstreamError

log = logging.getLogger(__name__)

#: Request headers passed on to a model's adapter; everything else stays here.
FORWARD_HEADERS = ("content-type", "accept", "x-request-id", "inference-header-content-length")
#: Response headers never copied back from an adapter (hop-by-hop, or set by this server).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
              "proxy-authenticate", "trailer", "upgrade", "content-encoding"}
CHUNK = 1 << 20


#: File descriptors kept for everything but client connections (replicas, files, the bucket).
RESERVED_FDS = 256
#: How long a refused connection (over the cap) is read and dropped before it is closed, so its
#: client reads the 503 instead of a reset (at most MAX_LINGERING at once: past that, closed at once).
REFUSED_LINGER_S = 1.0
MAX_LINGERING = RESERVED_FDS // 2


class MethodNotAllowed(PlaneError):
    status = 405


def _raw_answer(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = orjson.dumps({"error": message})
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode("latin-1") + body


def connection_cap(setting: int) -> int:
    """The connection cap in force: the setting, within the process's file descriptor limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return setting
    return max(16, min(setting, soft - RESERVED_FDS))


class _Connection(RequestHandler):
    """aiohttp's connection handler, with a head timeout and the service's connection cap."""

    def __init__(self, manager, *, door: "FrontDoor", **kwargs):
        super().__init__(manager, **kwargs)
        self._door = door
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._refused: Optional[asyncio.Transport] = None

    def connection_made(self, transport) -> None:
        door = self._door
        if door.connections >= door.max_connections:
            self._refuse(transport)
            return
        door.connections += 1
        super().connection_made(transport)

    def _refuse(self, transport) -> None:
        self._refused = transport
        self._door.refused += 1
        self._door.lingering += 1
        transport.write(_raw_answer(503, "Service Unavailable",
                                    f"the control service has {self._door.max_connections:,} connections open, its "
                                    "most (MODELPLANE_MAX_CONNECTIONS): retry shortly", "Retry-After: 1\r\n"))
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            pass
        if self._door.lingering > MAX_LINGERING:
            transport.close()
        else:
            self._loop.call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return   # read and dropped: the answer is already sent
        if self._head_timer is None and not self._request_in_progress and not self._messages:
            # the first bytes of a request's head: all of it must arrive within the head timeout
            self._head_timer = self._loop.call_later(self._door.head_timeout, self._head_expired)
        super().data_received(data)
        if self._head_timer is not None and (self._messages or self._request_in_progress):
            self._head_timer.cancel()
            self._head_timer = None

    def eof_received(self) -> None:
        if self._refused is not None:
            self._refused.close()
            return
        super().eof_received()

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        self._door.head_timeouts += 1
        self.transport.write(_raw_answer(408, "Request Timeout",
                                         f"the request's head did not arrive within {self._door.head_timeout:g} s "
                                         "(MODELPLANE_HEAD_TIMEOUT)"))
        self.force_close()

    def connection_lost(self, exc) -> None:
        if self._refused is not None:
            self._refused = None
            self._door.lingering -= 1
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._door.connections -= 1
        super().connection_lost(exc)


class _Server(web.Server):
    """aiohttp's low-level server, its connections handled by `_Connection`."""

    def __init__(self, handler, *, door: "FrontDoor", **kwargs):
        super().__init__(handler, **kwargs)
        self._door = door

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, door=self._door, **self._kwargs)


def _json(data, status: int, headers: Optional[dict] = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def _continue(request: web.BaseRequest) -> None:
    """`Expect: 100-continue` (curl sends it for bodies over 1 KiB): the client may send the
    body now, once the checks passed; a refused request never had it sent."""
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue" \
            and not getattr(request, "_modelplane_continued", False):
        request._modelplane_continued = True  # type: ignore[attr-defined]
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def _read_capped(content: aiohttp.StreamReader, limit: int, *, encoding: Optional[str] = None,
                       budget: Optional[BodyBudget] = None, held: Optional[list] = None) -> bytes:
    """The whole body (decoded when `encoding` is gzip or deflate), refused (413) as soon as it
    passes `limit` and (503) as soon as holding it would pass the `budget` of bodies in flight:
    never more is held. `held[0]` counts the bytes taken from the budget (the caller gives them
    back)."""
    parts, size = [], 0
    decoder = Decoder(encoding) if encoding else None
    held = held if held is not None else [0]
    while True:
        if decoder is None:
            chunk = await content.read(CHUNK)
            if not chunk:
                break
        else:
            if decoder.need_input:
                wire = await content.read(CHUNK)
                if not wire:
                    decoder.finish()
                    break
                decoder.push(wire)
            chunk = decoder.pull(CHUNK)
            if not chunk:
                continue
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over this model's limit of {limit} bytes (its limits.max_body"
                           f"{', decoded' if encoding else ''})")
        if budget is not None and size > held[0]:
            budget.take(size - held[0], whole=size)
            held[0] = size
        parts.append(chunk)
    body = b"".join(parts)
    parts.clear()
    return body


class FrontDoor:
    """The aiohttp application: the models' routes here, the rest to the Flask `app`."""

    def __init__(self, app, plane, *, threads: int):
        self.app = app
        self.plane = plane
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="modelplane-api")
        settings = plane.settings
        self.budget = BodyBudget(settings.max_bodies_in_flight)
        self.head_timeout = settings.head_timeout
        self.keepalive_timeout = settings.keepalive_timeout
        self.max_connections = connection_cap(settings.max_connections)
        if self.max_connections < settings.max_connections:
            log.warning("at most %d connections (MODELPLANE_MAX_CONNECTIONS is %d, but the process may open only "
                        "%d files)", self.max_connections, settings.max_connections,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.connections = 0      # open client connections (counted on the event loop)
        self.refused = 0          # connections answered 503 over the cap
        self.lingering = 0        # of those, still open (their client reading the answer)
        self.head_timeouts = 0    # connections closed for a head that did not arrive in time

    def server(self) -> web.Server:
        """The low-level aiohttp server: every request to `dispatch`, no router or middleware."""
        return _Server(self.dispatch, door=self, access_log=None, auto_decompress=False,
                       keepalive_timeout=self.keepalive_timeout)

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = request.raw_path
        if "://" in raw.split("?", 1)[0]:  # absolute-form request target
            raw = "/" + raw.split("://", 1)[1].split("/", 1)[-1]
        path, _, query = raw.partition("?")
        if path.startswith("/models/"):
            return await self.model_route(request, path, query)
        if path.startswith("/v2/models/"):   # the Open Inference Protocol at the root, as KServe serves it
            return await self.model_route(request, path, query, root=True)
        return await self.wsgi(request, path, query)

    # -- the models' routes ------------------------------------------------------------------
    async def model_route(self, request: web.BaseRequest, path: str, query: str, *,
                          root: bool = False) -> web.StreamResponse:
        """A model's route: `/models/{name}/…`, or (`root`) the Open Inference Protocol's
        `/v2/models/{name}/…`, which is the same request as `/models/{name}/v2/models/{name}/…`:
        one code path, its checks, hand-offs and answers."""
        t0 = time.perf_counter()
        plane, guard = self.plane, self.plane.guard
        rid = request_id(request.headers.get("X-Request-Id", ""))
        rule, name, routes = "unmatched", None, None
        held = [0]   # bytes of this request's body taken from the budget of bodies in flight
        try:
            guard.check_host(request.headers)
            if root:
                segments = path[1:].split("/")   # v2, models, the name, …: the adapter's own path
                name = segments[2]
                after = segments
            else:
                segments = path[len("/models/"):].split("/")
                name = segments[0]
                after = segments[1:]
            # a percent-encoded name is never decoded and re-targeted: route only what was sent
            if name and "%" not in name:
                routes = serving.match_root(after) if root else serving.match(after)
            if routes is None:
                raise NotFound(f"Not Found: no route for {path[:200]!r}")
            method = "GET" if request.method == "HEAD" else request.method
            if method not in routes:
                raise MethodNotAllowed(f"Method Not Allowed: {request.method} is not allowed here "
                                       f"({', '.join(sorted(routes))})")
            rule, types = routes[method]
            policy = plane.cached_policy(name)
            if policy is None:
                policy = await asyncio.get_running_loop().run_in_executor(self.pool, plane.policy, name)
            public, limit = policy.public, policy.limit
            identity = guard.authorize_predict(request.headers, request.method, path, public=public)
            if not (public or guard.open_predict):
                guard.require_owner(identity, policy.owner, name)
            body = b""
            if method in MUTATING:
                guard.check_origin(request.headers)
                given = serving.body_type(types, request.headers)
                guard.check_content_type(types, given=given)
                encoding = body_encoding(request.headers.getall("Content-Encoding", []))
                if request.content_length is not None and request.content_length > limit:
                    raise TooLarge(f"the body is {request.content_length} bytes; {name} takes at most {limit} "
                                   "(its limits.max_body)")
                if request.content_length:
                    self.budget.take(request.content_length, whole=request.content_length)   # before a byte is read
                    held[0] = request.content_length
                await _continue(request)
                body = await _read_capped(request.content, limit, encoding=encoding, budget=self.budget, held=held)
            headers = {h: request.headers[h] for h in FORWARD_HEADERS if h in request.headers}
            headers["x-request-id"] = rid   # one id in the caller's answer, this log and the adapter's
            if method in MUTATING and "content-type" not in headers:
                headers["content-type"] = given   # an inference request sent without one: what it is
            version, rest = serving.pinned(after)
            adapter_path = "/" + "/".join(rest)
            t1 = time.perf_counter()
            try:
                result = await plane.runtime.aforward(name, method=request.method, path=adapter_path,
                                                      headers=headers, body=body, query=query, version=version)
                if result.status == 401:
                    # an adapter checks only the plane's own secret: the caller's token was right, and
                    # a 401 would tell them to send another (every 401 of this service is its own)
                    raise UpstreamError(f"{name}'s adapter refused the control service's secret "
                                        "(MODELPLANE_ADAPTER_SECRET): the plane is misconfigured, not your token")
            except PlaneError as e:
                plane.metrics.observe_model(name, e.status)
                raise
            plane.metrics.observe_model(name, result.status)
            plane.monitor.observe(name, result, (request.content_type, body)
                                  if rest == ["predict"] or rest[-1:] == ["infer"] else None)
            if policy.shadow_percent and version is None and rest == ["predict"]:
                plane.shadow.mirror(name, policy.shadow_version, policy.shadow_percent, method=request.method,
                                    path=adapter_path, headers=headers, body=body, query=query, live=result,
                                    live_ms=(time.perf_counter() - t1) * 1000)
            out = {k: v for k, v in (result.headers or {}).items() if k.lower() not in HOP_BY_HOP}
            response = web.Response(body=result.body, status=result.status, headers=out)
        except PlaneError as e:
            if e.status >= 500:
                log.warning("%s %s [%s]: %s", request.method, path[:200], rid, e.message)
            response = _json(e.to_json(), e.status, e.headers or None)
            if isinstance(e, Busy):
                response.headers["Retry-After"] = str(e.retry_after)
            if isinstance(e, MethodNotAllowed):
                response.headers["Allow"] = ", ".join(sorted(routes or ()))
        except Exception as e:  # noqa: BLE001 — a bug answers a request id, never a traceback
            log.error("%s %s failed [request id %s]", request.method, path[:200], rid, exc_info=e)
            response = _json({"error": f"internal error: the control service's log has the details under "
                                       f"request id {rid}", "request_id": rid}, 500)
        finally:
            if held[0] and self.budget.give_back(held[0]):
                asyncio.get_running_loop().run_in_executor(self.pool, trim_memory)
        response.headers["X-Request-Id"] = rid
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        plane.metrics.observe_api(rule, request.method, response.status, time.perf_counter() - t0)
        return response

    # -- the control API, through WSGI ---------------------------------------------------------
    async def wsgi(self, request: web.BaseRequest, path: str, query: str) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        response = web.StreamResponse()
        try:
            await loop.run_in_executor(self.pool, self._run_wsgi, request, response, path, query, loop)
        except ConnectionError:
            # the client hung up before the answer was all written (tritonclient reads a health
            # check's status and drops the connection): nothing is left to answer, nor a bug to log
            return response
        await response.write_eof()
        return response

    def _run_wsgi(self, request: web.BaseRequest, response: web.StreamResponse, path: str, query: str,
                  loop: asyncio.AbstractEventLoop) -> None:
        """In a worker thread: run the Flask app, writing its answer through the event loop."""
        def call(coro):
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        started: list = []

        def start_response(status: str, headers, exc_info=None):
            if exc_info and response.prepared:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return lambda data: send(data)

        def begin() -> None:
            status, headers = started
            code, _, reason = status.partition(" ")
            response.set_status(int(code), reason or None)
            for key, value in headers:
                response.headers.add(key, value)
            call(response.prepare(request))

        def send(data: bytes) -> None:
            if not response.prepared:
                begin()
            if data and request.method != "HEAD":
                call(response.write(data))

        try:
            encoding, refused = body_encoding(request.headers.getall("Content-Encoding", [])), None
        except PlaneError as e:   # answered by the route, once its own checks passed, if it reads a body
            encoding, refused = None, e
        body = _Body(request.content, call, lambda: _continue(request), encoding=encoding, refused=refused)
        result = self.app(_environ(request, path, query, body), start_response)
        try:
            for chunk in result:
                send(chunk)
            if not response.prepared:
                begin()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


class _Body:
    """`wsgi.input`: reads the request body from the socket as the app asks for it, decoded
    (gzip, deflate) in the route's thread when it came encoded; the route's cap counts decoded
    bytes, and an encoding that is refused, or a stream that does not decode, is the route's
    error (400/415) raised from its first read."""

    def __init__(self, content: aiohttp.StreamReader, call, first_read, *, encoding: Optional[str] = None,
                 refused: Optional[PlaneError] = None):
        self._content, self._call, self._first_read = content, call, first_read
        self._decoder = Decoder(encoding) if encoding else None
        self._refused = refused
        self._buf = b""     # decoded bytes not handed out yet

    def _begin(self) -> None:
        if self._refused is not None:
            raise self._refused
        if self._first_read is not None:   # the route reads the body: its checks passed
            self._call(self._first_read())
            self._first_read = None

    def _more(self) -> bytes:
        """The next piece of the body (b"" at its end)."""
        if self._buf:
            out, self._buf = self._buf, b""
            return out
        decoder = self._decoder
        if decoder is None:
            return self._call(self._content.read(CHUNK))
        while True:
            if decoder.need_input:
                wire = self._call(self._content.read(CHUNK))
                if not wire:
                    decoder.finish()
                    return b""
                decoder.push(wire)
            out = decoder.pull(CHUNK)
            if out:
                return out

    def read(self, size: int = -1) -> bytes:
        self._begin()
        if size is None or size < 0:
            parts = []
            while chunk := self._more():
                parts.append(chunk)
            return b"".join(parts)
        if not size:
            return b""
        if self._decoder is None and not self._buf:
            return self._call(self._content.read(size))
        piece = self._more()
        out, self._buf = piece[:size], piece[size:]
        return out

    def readline(self, size: int = -1) -> bytes:
        self._begin()
        if self._decoder is None and not self._buf:
            return self._call(self._content.readline())
        buf = self._buf
        while b"\n" not in buf and (piece := self._more()):
            buf += piece
        end = buf.find(b"\n") + 1 or len(buf)
        out, self._buf = buf[:end], buf[end:]
        return out

    def __iter__(self):
        while line := self.readline():
            yield line


def _environ(request: web.BaseRequest, path: str, query: str, body: _Body) -> dict:
    host, port = (request.transport.get_extra_info("sockname") or ("127.0.0.1", 0))[:2] \
        if request.transport is not None else ("127.0.0.1", 0)
    environ = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        # PEP 3333: the path percent-decoded, its bytes as latin-1
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query,
        "RAW_URI": request.raw_path,
        "REQUEST_URI": request.raw_path,
        "SERVER_NAME": str(host),
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": f"HTTP/{request.version.major}.{request.version.minor}",
        "REMOTE_ADDR": request.remote or "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": body,
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for key, value in request.headers.items():
        upper = key.upper()
        if "_" in key:   # X_Token would become HTTP_X_TOKEN, the same as X-Token: dropped
            continue
        if upper == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
        elif upper == "CONTENT-LENGTH":
            environ["CONTENT_LENGTH"] = value
        else:
            wsgi_key = "HTTP_" + upper.replace("-", "_")
            environ[wsgi_key] = f"{environ[wsgi_key]},{value}" if wsgi_key in environ else value
    return environ
