"""The adapter's own HTTP/1.1 server and client (adapters/http11.py) on real loopback sockets:
the parts of the protocol that clients and model servers actually use."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

from adapters.http11 import Client, Disconnected, Request, Response, Server, Unreachable


async def _echo(request: Request) -> Response:
    return Response(200, json.dumps({"method": request.method, "path": request.path, "query": request.query,
                                     "body": request.body.decode("latin-1")}).encode())


def _error_body(status: int, message: str, request) -> Response:
    return Response(status, json.dumps({"error": message}).encode())


def _serve(raw: bytes, *, max_body: int = 1000, read_until_close: bool = True) -> bytes:
    """Send `raw` bytes to a fresh server; everything it answers until it closes (or 1 s of quiet)."""
    async def run() -> bytes:
        server = Server(_echo, max_body=max_body, error_body=_error_body)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await server.start("127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            out = b""
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 1.0)
                except asyncio.TimeoutError:
                    break
                if not chunk:
                    break
                out += chunk
            writer.close()
            return out
        finally:
            await server.stop(1.0)
    return asyncio.run(run())


def _answers(raw: bytes) -> list[tuple[int, dict, bytes]]:
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        raw = rest[n:]
    return out


def test_keep_alive_pipelined_requests_are_answered_in_order():
    raw = (b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
           b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
           b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: close\r\n\r\nxy")
    answers = _answers(_serve(raw))
    assert [json.loads(b)["path"] for _, _, b in answers] == ["/a", "/b", "/c"]
    assert json.loads(answers[0][2]) == {"method": "POST", "path": "/a", "query": "x=1", "body": "abc"}
    assert json.loads(answers[2][2])["body"] == "xy" and answers[2][1]["connection"] == "close"


def test_a_chunked_body_with_extensions_and_trailers():
    raw = (b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"3;ext=1\r\nabc\r\n10\r\n" + b"d" * 16 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n")
    [(status, _, body)] = _answers(_serve(raw))
    assert status == 200 and json.loads(body)["body"] == "abc" + "d" * 16


def test_expect_100_continue_gets_its_interim_answer_before_the_body_is_sent():
    async def run() -> tuple[bytes, bytes]:
        server = Server(_echo, max_body=1000, error_body=_error_body)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await server.start("127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /p HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"ok")
            final = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return interim, final
        finally:
            await server.stop(1.0)
    interim, final = asyncio.run(run())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n") and final.endswith(b'"body": "ok"}')


@pytest.mark.parametrize("raw, status", [
    (b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n", 413),
    (b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3E9\r\n" + b"a" * 1001 + b"\r\n0\r\n\r\n", 413),
    (b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /p HTTP/2.0\r\n\r\n", 505),
    (b"GET /p HTTP/1.1\r\nHost: h\r\nbad header\r\n\r\n", 400),
    (b"GET /p HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
], ids=["length-over-max", "chunks-over-max", "both-framings", "negative-length", "two-lengths",
        "unknown-coding", "garbage", "http2", "bad-header", "huge-head"])
def test_requests_the_server_refuses_get_a_json_answer_and_a_close(raw, status):
    answers = _answers(_serve(raw))
    assert len(answers) == 1, answers
    got, headers, body = answers[0]
    assert got == status and headers["connection"] == "close" and json.loads(body)["error"]


# -- RFC 9112, exactly: what a lenient parser lets through (and a proxy in front may read otherwise) --

_POST = b"POST /p HTTP/1.1\r\nHost: h\r\n"
_CHUNKED = _POST + b"Transfer-Encoding: chunked\r\n\r\n"

STRICT = [
    # chunk-size = 1*HEXDIG, ASCII only; Python's int(x, 16) takes all of these
    ("chunk-size-0x", _CHUNKED + b"0x5\r\nabcde\r\n0\r\n\r\n", 400, "chunk size"),
    ("chunk-size-plus", _CHUNKED + b"+5\r\nabcde\r\n0\r\n\r\n", 400, "chunk size"),
    ("chunk-size-minus", _CHUNKED + b"-0\r\n\r\n", 400, "chunk size"),
    ("chunk-size-underscore", _CHUNKED + b"5_5\r\n" + b"a" * 85 + b"\r\n0\r\n\r\n", 400, "chunk size"),
    ("chunk-size-space", _CHUNKED + b" 5\r\nabcde\r\n0\r\n\r\n", 400, "chunk size"),
    ("chunk-size-unicode-digit", _CHUNKED + "\u0665".encode() + b"\r\nabcde\r\n0\r\n\r\n", 400, "chunk size"),
    ("chunk-size-empty", _CHUNKED + b"\r\nabcde\r\n0\r\n\r\n", 400, "chunk size"),
    ("chunk-size-huge", _CHUNKED + b"f" * 40 + b"\r\nab\r\n", 413, "larger than"),
    ("chunk-ext-control", _CHUNKED + b"5;a=\x01\r\nabcde\r\n0\r\n\r\n", 400, "chunk size"),
    ("chunk-bare-lf", _CHUNKED + b"5\nabcde\r\n0\r\n\r\n", 400, "chunk size"),
    ("trailer-nul", _CHUNKED + b"0\r\nX-T\x00: 1\r\n\r\n", 400, "trailer"),
    # field-name = token; field-value = VCHAR / obs-text / SP / HTAB
    ("name-nul", _POST + b"X\x00Y: 1\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("name-at", _POST + b"X@Y: 1\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("name-obs-text", _POST + b"X\xe9: 1\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("value-nul", _POST + b"X: a\x00b\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("value-control", _POST + b"X: a\x01b\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("value-del", _POST + b"X: a\x7fb\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("value-bare-lf", _POST + b"X: a\nContent-Length: 5\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("value-bare-cr", _POST + b"X: a\rb\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("obs-fold", _POST + b"X: a\r\n b\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    ("space-before-colon", _POST + b"X : a\r\nContent-Length: 0\r\n\r\n", 400, "header"),
    # Content-Length = 1*DIGIT, ASCII only; duplicates must agree
    ("length-superscript", _POST + b"Content-Length: \xb9\r\n\r\nx", 400, "Content-Length"),
    ("length-plus", _POST + b"Content-Length: +1\r\n\r\nx", 400, "Content-Length"),
    ("length-hex", _POST + b"Content-Length: 0x1\r\n\r\nx", 400, "Content-Length"),
    ("length-underscore", _POST + b"Content-Length: 1_0\r\n\r\n" + b"x" * 10, 400, "Content-Length"),
    ("length-list-differing", _POST + b"Content-Length: 1, 2\r\n\r\nxx", 400, "Content-Length"),
    ("length-5000-digits", _POST + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", 413, "body"),
    ("length-and-chunked", _POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     "Transfer-Encoding"),
    ("chunked-in-http-1.0", b"POST /p HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "HTTP/1.0"),
    # the request line: method SP request-target SP HTTP/DIGIT.DIGIT
    ("http-1.2", b"GET /p HTTP/1.2\r\nHost: h\r\n\r\n", 505, "HTTP/1.2"),
    ("http-3.0", b"GET /p HTTP/3.0\r\nHost: h\r\n\r\n", 505, "HTTP/3.0"),
    ("http-1.10", b"GET /p HTTP/1.10\r\nHost: h\r\n\r\n", 400, "request line"),
    ("http-lower", b"GET /p http/1.1\r\nHost: h\r\n\r\n", 400, "request line"),
    ("two-spaces", b"GET  /p HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request line"),
    ("tab", b"GET\t/p HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request line"),
    ("trailing-space", b"GET /p HTTP/1.1 \r\nHost: h\r\n\r\n", 400, "request line"),
    ("method-not-token", b"G(T /p HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request line"),
    ("target-control", b"GET /p\x01q HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request line"),
    ("target-non-ascii", b"GET /p\xe9 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request line"),
    ("target-relative", b"GET p HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request target"),
    ("request-line-bare-lf", b"GET /p HTTP/1.1\nHost: h\r\n\r\n", 400, "request line"),
    # Host: exactly one in an HTTP/1.1 request, and a valid one
    ("no-host", b"GET /p HTTP/1.1\r\nX: 1\r\n\r\n", 400, "Host"),
    ("host-with-space", b"GET /p HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "Host"),
]


@pytest.mark.parametrize("raw, status, fragment", [c[1:] for c in STRICT], ids=[c[0] for c in STRICT])
def test_the_parser_is_exact_to_rfc_9112(raw, status, fragment):
    """Each of these got through (or raised inside data_received, answering nothing); now one JSON
    answer saying what is wrong, then the connection closes, and nothing reaches the handler."""
    answers = _answers(_serve(raw))
    assert len(answers) == 1, answers
    got, headers, body = answers[0]
    assert (got, headers["connection"]) == (status, "close"), (got, body)
    assert fragment.lower() in json.loads(body)["error"].lower(), body


def test_what_rfc_9112_allows_is_still_served():
    raw = (_POST + b"Content-Length: 3\r\nContent-Length: 3\r\nX-Tab:\ta\tb \r\nX-Latin: caf\xe9\r\n\r\nabc"
           + _POST + b"Content-Length: 2, 2\r\n\r\nxy"
           + _POST + b"Content-Length: 007\r\n\r\n1234567"
           + _POST + b"Transfer-Encoding: Chunked\r\n\r\n"
           + b'A;name=value;q="a \\" b"\r\n0123456789\r\n0000\r\nX-Trailer: t\r\n\r\n'
           + b"\r\nGET http://localhost:8080/q?x=1 HTTP/1.1\r\nHost: other\r\n\r\n"
           + b"GET /v HTTP/1.0\r\n\r\n")
    answers = _answers(_serve(raw))
    assert [(s, json.loads(b)["body"]) for s, _, b in answers] == [
        (200, "abc"), (200, "xy"), (200, "1234567"), (200, "0123456789"), (200, ""), (200, "")]


def test_no_exception_escapes_the_parser():
    """Whatever the bytes, the server answers (a 4xx or 5xx JSON error) or waits for more: a
    random sample of broken heads, sent one connection each."""
    import random

    rng = random.Random(9112)
    base = (b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n"
            b"X-A: b\r\n\r\n2\r\nab\r\n0\r\n\r\n")
    alphabet = b"\x00\x01\t\n\r :;,0123456789aAfFxX+-_\xb9\xe9\xff"
    for _ in range(40):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.choice(alphabet)
        out = _serve(bytes(raw) + b"\r\n\r\n")
        assert out, bytes(raw)
        status = int(out.split(b" ", 2)[1])
        assert status in (200, 400, 404, 411, 413, 431, 501, 505), (bytes(raw), out[:300])


def test_absolute_form_targets_and_a_half_closed_client():
    raw = b"GET http://127.0.0.1:8080/v2/health/ready?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
    [(status, _, body)] = _answers(_serve(raw))
    assert json.loads(body)["path"] == "/v2/health/ready" and json.loads(body)["query"] == "x=1"
    raw = (b"GET HTTP://h?q=a/b HTTP/1.1\r\nHost: h\r\n\r\nGET http://h HTTP/1.1\r\nHost: h\r\n\r\n"
           b"OPTIONS * HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert [(json.loads(b)["path"], json.loads(b)["query"]) for _, _, b in _answers(_serve(raw))] == [
        ("/", "q=a/b"), ("/", ""), ("*", "")]

    async def run() -> tuple[bytes, float]:  # the client sends, half-closes, and still gets its answer
        server = Server(_echo, max_body=1000, error_body=_error_body)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await server.start("127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")
            writer.write_eof()
            t0 = asyncio.get_running_loop().time()
            answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: the server closes after answering
            return answer, asyncio.get_running_loop().time() - t0
        finally:
            await server.stop(1.0)
    answer, took = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b'"body": "ok"}') and took < 2


def test_http_1_0_closes_unless_asked_to_keep_alive():
    [(status, headers, _)] = _answers(_serve(b"GET /x HTTP/1.0\r\n\r\n"))
    assert status == 200 and headers["connection"] == "close"
    out = _answers(_serve(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /y HTTP/1.0\r\n\r\n"))
    assert [json.loads(b)["path"] for _, _, b in out] == ["/x", "/y"]


# -- the client, against small model servers that answer in each framing ------------------------

async def _model_server(answer: bytes, *, close: bool = False):
    async def handle(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
            if length:
                await reader.readexactly(length[0])
            writer.write(answer)
            await writer.drain()
            if close:
                break
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("answer, close", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"scores\":[]}", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"sco\r\n8\r\nres\":[]}\r\n0\r\n\r\n", False),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"scores\":[]}", False),
    (b"HTTP/1.0 200 OK\r\n\r\n{\"scores\":[]}", True),
], ids=["content-length", "chunked", "interim-100", "until-close"])
def test_the_client_reads_every_framing_and_reuses_kept_alive_connections(answer, close):
    async def run():
        server, port = await _model_server(answer, close=close)
        client = Client("127.0.0.1", port)
        try:
            for _ in range(3):
                status, body = await client.request("POST", "/predict", b'{"rows":[]}', 5.0)
                assert (status, body) == (200, b'{"scores":[]}')
            return len(client._idle)
        finally:
            client.close()
            server.close()
    assert asyncio.run(run()) == (0 if close else 1)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: +13\r\n\r\n{\"scores\":[]}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1_3\r\n\r\n{\"scores\":[]}",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb9\xb3\r\n\r\n{\"scores\":[]}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0xd\r\n{\"scores\":[]}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+d\r\n{\"scores\":[]}\r\n0\r\n\r\n",
], ids=["length-plus", "length-underscore", "length-superscript", "chunk-0x", "chunk-plus"])
def test_the_client_refuses_an_answer_framed_outside_the_grammar(answer):
    async def run():
        server, port = await _model_server(answer, close=True)
        try:
            with pytest.raises(Disconnected, match="Content-Length|chunk size"):
                await Client("127.0.0.1", port).request("POST", "/predict", b"{}", 5.0)
        finally:
            server.close()
    asyncio.run(run())


def test_the_client_says_unreachable_disconnected_and_times_out():
    async def run():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(Unreachable):
            await Client("127.0.0.1", port).request("GET", "/health", None, 1.0)
        server, port = await _model_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", close=True)
        with pytest.raises(Disconnected):
            await Client("127.0.0.1", port).request("GET", "/health", None, 2.0)
        server.close()
        server, port = await _model_server(b"", close=False)
        with pytest.raises(asyncio.TimeoutError):
            await Client("127.0.0.1", port).request("GET", "/health", None, 0.2)
        server.close()
    asyncio.run(run())
