"""A lean HTTP/1.1 client for the front door's one job: a request to a replica's adapter on
127.0.0.1, over a kept-alive connection, its whole answer back.

aiohttp's client spent more CPU per forwarded request than everything else in the control
service together (a profile of the front door at one client: its request, response and
connector objects). Talking to our own adapter needs none of that generality: the request
is written in one `write`, the answer parsed from the socket's bytes (Content-Length,
chunked, or until close), connections kept per replica and dropped when the peer closes.

Errors say whether the request can have reached the adapter: `Unsent` (the connection was
refused or timed out while connecting) may go elsewhere; `Broken` (the connection failed
after the request was written) may not, unless the caller knows the replica went away.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

MAX_HEAD = 64 * 1024
IDLE_MAX = 30.0   # an idle connection older than this is dropped, not reused (the adapter keeps them 75 s)


class Unsent(ConnectionError):
    """The request never left: connecting failed."""


class Broken(ConnectionError):
    """The connection failed after the request was written (the adapter may have it)."""


class UpstreamTimeout(TimeoutError):
    """No (complete) answer within the read timeout."""


class _Conn(asyncio.Protocol):
    def __init__(self):
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.closed = False
        self.waiter: Optional[asyncio.Future] = None
        self.idle_since = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self):
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def more(self, deadline: float) -> None:
        """Wait for bytes (or the close) until `deadline` (loop time)."""
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_at(deadline, _expire, self.waiter)
        try:
            await self.waiter
        finally:
            timer.cancel()
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout())


class Upstream:
    """Kept-alive connections to one adapter at 127.0.0.1:port."""

    def __init__(self, port: int, *, connect_timeout: float, read_timeout: float, keep: int = 64):
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keep = keep
        self._idle: list[_Conn] = []

    async def _connection(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.buf and not conn.transport.is_closing() \
                    and time.monotonic() - conn.idle_since < IDLE_MAX:
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Conn, "127.0.0.1", self.port),
                                             self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise Unsent(f"cannot connect to 127.0.0.1:{self.port}: {e or type(e).__name__}") from e
        return conn, False

    async def request(self, method: str, target: str, headers: dict, body: Optional[bytes]) \
            -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers, body) of one request."""
        conn, _ = await self._connection()
        head = [f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"]
        for key, value in headers.items():
            head.append(f"{key}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body or b'')}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        conn.transport.write(data + body if body else data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        try:
            status, out_headers, answer, keep = await _read_answer(conn, method, deadline)
        except BaseException:
            conn.close()
            raise
        if keep and not conn.closed and len(self._idle) < self.keep:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return status, out_headers, answer

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _read_answer(conn: _Conn, method: str, deadline: float):
    buf = conn.buf
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if conn.closed:
            raise Broken("the adapter closed the connection before answering")
        if len(buf) > MAX_HEAD:
            raise Broken("the adapter's answer has a head over 64 KiB")
        await conn.more(deadline)
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise Broken(f"the adapter's answer is not HTTP/1.x: {lines[0][:100]!r}")
    status = int(parts[1])
    headers, length, chunked, keep = [], None, False, parts[0] == "HTTP/1.1"
    for line in lines[1:]:
        key, _, value = line.partition(":")
        value = value.strip()
        lower = key.lower()
        if lower == "content-length":
            length = int(value)
        elif lower == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif lower == "connection":
            keep = value.lower() == "keep-alive" if parts[0] == "HTTP/1.0" else value.lower() != "close"
        headers.append((key, value))
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", keep
    if chunked:
        return status, headers, await _read_chunked(conn, deadline), keep
    if length is not None:
        while len(buf) < length:
            if conn.closed:
                raise Broken("the adapter closed the connection mid-answer")
            await conn.more(deadline)
        body = bytes(buf[:length])
        del buf[:length]
        return status, headers, body, keep
    while not conn.closed:   # neither: the body runs to the close
        await conn.more(deadline)
    body = bytes(buf)
    buf.clear()
    return status, headers, body, False


async def _read_chunked(conn: _Conn, deadline: float) -> bytes:
    buf, out = conn.buf, bytearray()
    while True:
        while (end := buf.find(b"\r\n")) < 0:
            if conn.closed:
                raise Broken("the adapter closed the connection mid-answer")
            await conn.more(deadline)
        size = int(bytes(buf[:end]).split(b";")[0], 16)
        while len(buf) < end + 2 + size + 2:
            if conn.closed:
                raise Broken("the adapter closed the connection mid-answer")
            await conn.more(deadline)
        out += buf[end + 2:end + 2 + size]
        del buf[:end + 2 + size + 2]
        if size == 0:
            return bytes(out)
