"""A small HTTP/1.1 server and keep-alive client on asyncio protocols: all the adapter needs, no more.

Why not aiohttp: a profile of the adapter at one client (py-spy, 1-row /predict) put 60 % of its
CPU in aiohttp's server and client machinery (request/response objects, middlewares, payload and
writer layers, two or three socket writes per message) and under 5 % in the adapter's own checks;
importing it was a third of the adapter's memory. Here a request is parsed from the socket's
bytes, handled, and answered in one `write`; the client writes a request in one `write` too.

Server: Content-Length and chunked request bodies (bounded by `max_body` while they stream, 413
then close), `Expect: 100-continue`, keep-alive (HTTP/1.1 by default, HTTP/1.0 on request),
pipelined requests answered in order, idle connections closed after `KEEPALIVE_S`, a head over
`MAX_HEAD` refused with 431. Client: see `Client`.

The server parses exactly what RFC 9112 allows and refuses the rest (400, or 505 for a version
other than HTTP/1.0 and 1.1), then closes: a lenient parser behind a proxy that reads the same
bytes differently is how requests get smuggled. The request line is `method SP target SP
HTTP/d.d`; field names are tokens and values VCHAR / obs-text / SP / HTAB (no NUL, no control
byte, no bare CR or LF, no obs-fold); Content-Length is ASCII digits, repeated only with one
value; a chunk size is ASCII hex digits and its extensions are `;name[=token|"quoted"]`;
Transfer-Encoding with Content-Length, or in an HTTP/1.0 request, is refused; an HTTP/1.1
request has exactly one valid Host. Whatever the bytes, nothing raises out of `data_received`.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Awaitable, Callable, Optional

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
KEEPALIVE_S = 75.0
DRAIN_S = 2.0           # after a refused body, how long its remaining bytes are read and dropped
log = logging.getLogger(__name__)

_TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
# method SP request-target SP HTTP-version (RFC 9112 3); the target is printable ASCII
_REQUEST_LINE = re.compile(rf"([{_TCHAR}]+) ([!-~]+) (HTTP/[0-9]\.[0-9])")
# field lines, each ending CRLF: token ":" then VCHAR / obs-text / SP / HTAB only (RFC 9112 5, RFC 9110 5.5)
_FIELDS = re.compile(rf"(?:[{_TCHAR}]+:[\t -~\x80-\xff]*\r\n)*")
_FIELDS_B = re.compile(_FIELDS.pattern.encode("latin-1"))
# chunk-size [chunk-ext] (RFC 9112 7.1.1): 1*HEXDIG *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )
_QUOTED = r'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rf"([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*[{_TCHAR}]+(?:[ \t]*=[ \t]*(?:[{_TCHAR}]+|{_QUOTED}))?)*".encode("latin-1"))
# Host = uri-host [ ":" port ] (RFC 9110 7.2): an IP literal or a reg-name, no userinfo
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 415: "Unsupported Media Type",
           408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large", 422: "Unprocessable Entity",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


class Request:
    """One parsed request: method, path (no query), headers (lower-case names), body bytes."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "match")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]):
        self.method = method
        self.target = target
        path, _, self.query = target.partition("?")
        self.path = path
        self.version = version
        self.headers = headers
        self.body = b""
        self.match: dict[str, str] = {}

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters (`application/json`)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: str = "application/json",
                 headers: Optional[dict[str, str]] = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class HttpError(Exception):
    """A request the server itself refuses (malformed, too large): answered, then the connection closes."""

    def __init__(self, status: int, message: str, request: Optional[Request] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.request = request  # when the head was read (a body too large): whose request it was


Handler = Callable[[Request], Awaitable[Response]]
# (status, message, request or None) -> Response: how the application words the server's own refusals
ErrorBody = Callable[[int, str, Optional[Request]], Response]


def _head(status: int, content_type: str, length: int, headers: Optional[dict], keep: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Type: {content_type}\r\n"
             f"Content-Length: {length}\r\n"]
    if headers:
        for k, v in headers.items():
            lines.append(f"{k}: {v}\r\n")
    if not keep:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def _bad_field(block: str, kind: str) -> str:
    """Which field line of `block` (lines ending CRLF) breaks the grammar, and how."""
    for i, field in enumerate(block.split("\r\n")[:-1], 1):
        if _FIELDS.fullmatch(field + "\r\n") is None:
            break
    else:  # pragma: no cover - only called when a line does not match
        i, field = 0, block
    name, sep, _ = field.partition(":")
    shown = repr(name[:40]) if sep else repr(field[:40])
    return (f"malformed {kind} line {i} ({shown}): a field name is a token (letters, digits, !#$%&'*+-.^_`|~) "
            "right before ':', a value is printable text, space or tab (no control byte, bare CR or LF, "
            "or line folding)")


class ServerProtocol(asyncio.Protocol):
    """One client connection: parse requests from the buffer, answer them one at a time, in order."""

    def __init__(self, server: "Server"):
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.busy = False          # a request is being handled
        self.closing = False
        self.draining = False      # a refused body: bytes are dropped until DRAIN_S passes
        self.idle_timer: Optional[asyncio.TimerHandle] = None
        self.paused = False
        self.eof = False           # the client has half-closed: answer what it sent, then close
        # a chunked body being read: [request, keep, body so far]; None otherwise
        self.pending: Optional[list] = None

    # -- asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.draining or self.closing:
            return
        self.buf += data
        if not self.busy:
            self._next()
        elif len(self.buf) > self.server.max_body + MAX_HEAD and not self.paused:
            self.paused = True     # a pipelining client ahead of its answers: wait for them
            self.transport.pause_reading()

    def eof_received(self):
        self.eof = True
        if not self.busy:
            self._close()
        return True  # keep the transport open to write an answer being prepared

    # -- parsing
    def _next(self) -> None:
        """Start handling the next complete request in the buffer, if there is one."""
        try:
            parsed = self._parse()
        except HttpError as e:
            self._refuse(e.status, e.message, e.request)
            return
        except Exception:  # a parser bug: still an answer, never an exception out of data_received
            log.exception("could not parse a request")
            self._refuse(400, "malformed request")
            return
        if parsed is None:
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            return
        request, keep = parsed
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.busy = True
        task = self.server.loop.create_task(self._handle(request, keep))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def _parse(self) -> Optional[tuple[Request, bool]]:
        if self.pending is not None:
            return self._chunked()
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
            if buf.startswith(b"\r\n"):  # stray line ends between requests (RFC 9112 2.2)
                del buf[:2]
            return None
        if end > MAX_HEAD:
            raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
        head = bytes(buf[:end]).decode("latin-1")   # every byte decodes: checked below, char by char
        while head.startswith("\r\n"):
            head = head[2:]
        line_end = head.find("\r\n")
        if line_end < 0:
            line, block = head, ""
        else:
            line, block = head[:line_end], head[line_end + 2:] + "\r\n"
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            raise HttpError(400, "malformed request line: expected METHOD SP /target SP HTTP/1.1, printable "
                                 "ASCII, one space apart")
        method, target, version = m.groups()
        if version != "HTTP/1.1" and version != "HTTP/1.0":
            raise HttpError(505, f"HTTP version {version} is not supported; use HTTP/1.1 or HTTP/1.0")
        authority = None
        if target[0] != "/":
            if target[:8].lower().startswith(("http://", "https://")):   # absolute-form (RFC 9112 3.2.2)
                rest = target[target.index("//") + 2:]
                cut = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0] or [len(rest)])
                authority, target = rest[:cut], rest[cut:]
                if not target.startswith("/"):
                    target = "/" + target
            elif target != "*" or method != "OPTIONS":
                raise HttpError(400, f"malformed request target {target[:100]!r}: expected a path (/...) "
                                     "or an absolute http URL")
        if block:
            if block.count("\r\n") > MAX_HEADERS:
                raise HttpError(431, f"more than {MAX_HEADERS} request headers")
            if _FIELDS.fullmatch(block) is None:
                raise HttpError(400, _bad_field(block, "header"))
        headers: dict[str, str] = {}
        for field in block.split("\r\n")[:-1]:
            name, _, value = field.partition(":")
            name = name.lower()
            value = value.strip(" \t")
            if name in headers:
                if name in ("transfer-encoding", "host"):
                    raise HttpError(400, f"repeated {name} header")
                headers[name] += ", " + value
            else:
                headers[name] = value
        if authority is not None:   # the target's authority is the host (RFC 9112 3.2.2)
            headers["host"] = authority
        host = headers.get("host")
        if host is None:
            if version == "HTTP/1.1":
                raise HttpError(400, "an HTTP/1.1 request needs a Host header")
        elif _HOST.fullmatch(host) is None:
            raise HttpError(400, f"Host header {host[:100]!r} is not host[:port]")
        del buf[:end + 4]
        request = Request(method, target, version, headers)
        connection = headers.get("connection", "").lower()
        keep = ("close" not in connection) if version == "HTTP/1.1" else ("keep-alive" in connection)
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise HttpError(400, "both Content-Length and Transfer-Encoding: a request may have one")
            if version == "HTTP/1.0":
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request: send Content-Length")
            if te.lower() != "chunked":
                raise HttpError(501, f"Transfer-Encoding {te[:40]!r} is not supported; use chunked or Content-Length")
            self._continue(headers)
            self.pending = [request, keep, bytearray()]
            return self._chunked()
        if cl is None:
            return request, keep
        if not (cl.isdigit() and cl.isascii()):
            # a list of one value repeated ("5, 5", or the header twice) is that value (RFC 9112 6.3)
            values = {v.strip(" \t") for v in cl.split(",")}
            cl = values.pop()
            if values or not (cl.isdigit() and cl.isascii()):
                raise HttpError(400, f"Content-Length {headers['content-length'][:40]!r} is not one byte "
                                     "count (ASCII digits)")
        if len(cl) > 18 and len(cl.lstrip("0")) > 18:
            raise HttpError(413, f"request body of {cl[:20]}... bytes", request)
        length = int(cl)
        if length > self.server.max_body:
            raise HttpError(413, f"request body of {length} bytes", request)
        if len(buf) < length:
            self._continue(headers)
            self.pending = [request, keep, length]
            return None
        request.body = bytes(buf[:length])
        del buf[:length]
        return request, keep

    def _continue(self, headers: dict) -> None:
        if headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            headers.pop("expect")

    def _chunked(self) -> Optional[tuple[Request, bool]]:
        request, keep, body = self.pending
        buf = self.buf
        if isinstance(body, int):  # a Content-Length body still arriving
            if len(buf) < body:
                return None
            request.body = bytes(buf[:body])
            del buf[:body]
            self.pending = None
            return request, keep
        max_body = self.server.max_body
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 1024:
                    raise HttpError(400, "malformed chunk size line")
                return None
            m = _CHUNK_LINE.fullmatch(buf, 0, end)
            if m is None:
                raise HttpError(400, "malformed chunk size line: expected hex digits (RFC 9112 7.1), then "
                                     "optional ;extensions")
            digits = m.group(1)
            if len(digits) > 15 and len(digits.lstrip(b"0")) > 15:
                raise HttpError(413, f"request body larger than {max_body} bytes", request)
            size = int(digits, 16)
            if len(body) + size > max_body:
                raise HttpError(413, f"request body larger than {max_body} bytes", request)
            if size == 0:
                # the last chunk, then optional trailer lines, then an empty line
                term = buf.find(b"\r\n\r\n", end)
                if term < 0:
                    if len(buf) > MAX_HEAD:
                        raise HttpError(431, "chunked trailers too large")
                    return None
                if term > end and _FIELDS_B.fullmatch(buf, end + 2, term + 2) is None:
                    raise HttpError(400, _bad_field(bytes(buf[end + 2:term + 2]).decode("latin-1"), "trailer"))
                del buf[:term + 4]
                request.body = bytes(body)
                self.pending = None
                return request, keep
            if len(buf) < end + 2 + size + 2:
                return None
            if buf[end + 2 + size:end + 4 + size] != b"\r\n":
                raise HttpError(400, "malformed chunk: no CRLF after its data")
            body += buf[end + 2:end + 2 + size]
            del buf[:end + 4 + size]

    # -- answering
    async def _handle(self, request: Request, keep: bool) -> None:
        try:
            response = await self.server.handler(request)
        except Exception:  # the application's own bug handler failed: still answer
            response = self.server.error_body(500, "internal error", request)
        self._write(response, keep)

    def _write(self, r: Response, keep: bool) -> None:
        self.busy = False
        if self.closing or self.transport is None or self.transport.is_closing():
            return
        keep = keep and not self.server.stopping
        self.transport.write(_head(r.status, r.content_type, len(r.body), r.headers, keep) + r.body)
        if not keep:
            self._close()
            return
        if self.buf:
            self._next()
            if not self.busy and self.eof:  # nothing complete left, and nothing more will come
                self._close()
        elif self.eof:
            self._close()
        else:
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self._arm_idle()

    def _refuse(self, status: int, message: str, request: Optional[Request] = None) -> None:
        """Answer a request the server cannot take, then drop what else the client sends and close."""
        self.pending = None
        self.buf.clear()
        r = self.server.error_body(status, message, request)
        self.transport.write(_head(r.status, r.content_type, len(r.body), r.headers, False) + r.body)
        # Closing at once with the client's body unread would reset the connection and the client
        # could lose the answer: half-close, read and drop for a little while, then close.
        self.draining = True
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except (OSError, RuntimeError):
            pass
        self.server.loop.call_later(DRAIN_S, self._close)

    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.server.loop.call_later(KEEPALIVE_S, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.idle_timer = None
        if not self.busy:
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class Server:
    """Serves `handler` on host:port. `error_body(status, message)` words the server's own refusals."""

    def __init__(self, handler: Handler, *, max_body: int, error_body: ErrorBody):
        self.handler = handler
        self.max_body = max_body
        self.error_body = error_body
        self.connections: set[ServerProtocol] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: Optional[asyncio.base_events.Server] = None

    async def start(self, host: str, port: int, backlog: int = 1024) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: ServerProtocol(self), host, port, backlog=backlog,
                                                     reuse_address=True)

    async def stop(self, timeout: float) -> None:
        """Stop listening, close idle connections, let requests in flight finish for `timeout` s."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn._close()
        if self.tasks and timeout > 0:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn._close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass


# -- the client: kept-alive connections to one HTTP server on loopback ---------------------------

class Unreachable(ConnectionError):
    """The connection could not be made: nothing was sent."""


class Disconnected(ConnectionError):
    """The connection failed after the request was written, before a whole answer came back."""


class _ClientConn(asyncio.Protocol):
    __slots__ = ("transport", "buf", "closed", "waiter", "idle_since", "loop")

    def __init__(self):
        self.loop = asyncio.get_running_loop()   # a connection is only ever used on its own loop
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.closed = False
        self.waiter: Optional[asyncio.Future] = None
        self.idle_since = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self):
        self._closed()
        return False

    def connection_lost(self, exc) -> None:
        self._closed()

    def _closed(self) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Client:
    """A keep-alive HTTP/1.1 client to one server (the model): `request` writes the whole request in
    one `write` and reads the answer (Content-Length, chunked, or until close) from the socket's bytes.
    A whole request has one deadline (`asyncio.TimeoutError` past it)."""

    IDLE_MAX = 20.0  # an idle connection older than this is dropped, not reused

    def __init__(self, host: str, port: int, keep: int = 256):
        self.host = host
        self.port = port
        self.keep = keep
        self.host_header = f"Host: {host}:{port}\r\n".encode("latin-1")
        self._idle: list[_ClientConn] = []

    async def request(self, method: str, path: str, body: Optional[bytes], timeout: float,
                      content_type: str = "application/json") -> tuple[int, bytes]:
        """(status, body). Raises Unreachable, Disconnected (`reused` tells whether the connection
        was a pooled one the server may have closed meanwhile) or asyncio.TimeoutError."""
        status, _, answer = await self.exchange(method, path, body, timeout,
                                                {"Content-Type": content_type} if body is not None else None)
        return status, answer

    async def exchange(self, method: str, path: str, body: Optional[bytes], timeout: float,
                       headers: Optional[dict] = None) -> tuple[int, list[tuple[str, str]], bytes]:
        """`request` with the caller's headers, answering (status, headers, body) (the control
        service's front door forwards both ways)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn, reused = await self._connection(loop, deadline)
        head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self.host_header
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n\r\n".encode("latin-1")
            conn.transport.write(head + body)
        else:
            conn.transport.write(head + b"\r\n")
        try:
            status, answer_headers, answer, keep = await _read_answer(conn, loop, deadline, method)
        except Disconnected as e:
            conn.close()
            e.reused = reused  # type: ignore[attr-defined]
            raise
        except BaseException:
            conn.close()
            raise
        if keep and not conn.closed and len(self._idle) < self.keep:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return status, answer_headers, answer

    async def _connection(self, loop, deadline: float) -> tuple[_ClientConn, bool]:
        idle = self._idle
        for i in range(len(idle) - 1, -1, -1):   # the most recently used first
            conn = idle[i]
            if conn.loop is not loop:   # another loop's (a blocking caller's, or one that ended)
                if conn.loop.is_closed():
                    del idle[i]
                continue
            del idle[i]
            if not conn.closed and not conn.buf and not conn.transport.is_closing() \
                    and time.monotonic() - conn.idle_since < self.IDLE_MAX:
                return conn, True
            conn.close()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_ClientConn, self.host, self.port),
                                             max(0.001, deadline - loop.time()))
        except OSError as e:
            raise Unreachable(str(e)) from None
        return conn, False

    def close(self) -> None:
        for conn in self._idle:
            if not conn.loop.is_closed():
                conn.close()
        self._idle.clear()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


async def _more(conn: _ClientConn, loop, deadline: float) -> None:
    if conn.closed:
        raise Disconnected("the server closed the connection")
    conn.waiter = fut = loop.create_future()
    timer = loop.call_at(deadline, _expire, fut)
    try:
        await fut
    finally:
        timer.cancel()
        conn.waiter = None


async def _read_answer(conn: _ClientConn, loop, deadline: float, method: str) \
        -> tuple[int, list[tuple[str, str]], bytes, bool]:
    buf = conn.buf
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEAD:
            raise Disconnected("the answer's head is larger than 64 KiB")
        await _more(conn, loop, deadline)
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise Disconnected(f"the answer is not HTTP/1.x: {lines[0][:100]!r}")
    status = int(parts[1])
    if 100 <= status < 200:  # an interim answer: the real one follows
        return await _read_answer(conn, loop, deadline, method)
    length, chunked, keep = None, False, parts[0] == "HTTP/1.1"
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
        lower = key.strip().lower()
        if lower == "content-length":
            v = value.strip(" \t")
            if not (v.isascii() and v.isdigit()) or len(v) > 18:
                raise Disconnected(f"the answer's Content-Length {v[:20]!r} is not a byte count")
            length = int(v)
        elif lower == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif lower == "connection":
            v = value.strip().lower()
            keep = ("keep-alive" in v) if parts[0] == "HTTP/1.0" else ("close" not in v)
    if method == "HEAD" or status in (204, 304):
        return status, headers, b"", keep
    if chunked:
        return status, headers, await _read_chunked(conn, loop, deadline), keep
    if length is not None:
        while len(buf) < length:
            await _more(conn, loop, deadline)
        body = bytes(buf[:length])
        del buf[:length]
        return status, headers, body, keep
    while not conn.closed:  # neither: the body runs to the close (which ends the wait, not an error)
        await _more(conn, loop, deadline)
    body = bytes(buf)
    buf.clear()
    return status, headers, body, False


async def _read_chunked(conn: _ClientConn, loop, deadline: float) -> bytes:
    buf, out = conn.buf, bytearray()
    while True:
        while (end := buf.find(b"\r\n")) < 0:
            await _more(conn, loop, deadline)
        m = _CHUNK_LINE.fullmatch(buf, 0, end)
        if m is None or len(m.group(1)) > 15:
            raise Disconnected(f"the answer's chunk size line {bytes(buf[:min(end, 40)])!r} is not hex digits")
        size = int(m.group(1), 16)
        if size == 0:  # the last chunk, optional trailer lines, then an empty line
            while (term := buf.find(b"\r\n\r\n", end)) < 0:
                await _more(conn, loop, deadline)
            del buf[:term + 4]
            return bytes(out)
        while len(buf) < end + 2 + size + 2:
            await _more(conn, loop, deadline)
        out += buf[end + 2:end + 2 + size]
        del buf[:end + 4 + size]
