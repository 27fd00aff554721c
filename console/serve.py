"""Run the console (`python -m console.serve run console/app.py …`, what `modelplane up` and
`modelplane console` start): Streamlit, with a guard in front of every request it serves.

On this machine the console acts with the plane's own admin token, so a page from another site
must not be able to drive it:

- **Host:** only an IP literal, `localhost`, the bind address or a name in
  `MODELPLANE_ALLOWED_HOSTS` (a DNS-rebinding page reaches the console under its own name);
- **WebSocket origin:** a browser's session socket must come from a page of one of those hosts
  (a page elsewhere opening a socket to 127.0.0.1 is refused before Streamlit sees it).

- **Key:** with `MODELPLANE_CONSOLE_KEY` set (what `modelplane up` and `modelplane console` do:
  a new key per start), a browser gets in only through the link they print, `/?key=<key>`: that
  answer sets a cookie holding the key (HttpOnly, SameSite=Strict) and every later request and
  the session socket must carry it. Another user of the machine, who can reach 127.0.0.1 but not
  read the link, gets 401. Only `/_stcore/health` answers without it.

Refused HTTP requests get 401 or 403; a refused socket is closed before its handshake completes.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import sys
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlencode, urlsplit

KEY_ENV = "MODELPLANE_CONSOLE_KEY"
COOKIE = "modelplane-console"
OPEN_PATHS = ("/_stcore/health",)
NO_KEY = b"this console opens only through the link `modelplane up` (or `modelplane console`) printed: " \
         b"it carries the console's key\n"
REFUSED = b"refused: the Host (or the page's origin) does not name this console; add the name to " \
          b"MODELPLANE_ALLOWED_HOSTS if it is how people reach it\n"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
        return True
    except ValueError:
        return False


def _split_host(value: str) -> str:
    """The host part of a Host header (`name:port`, `[::1]:8080`), lowercased; "" when malformed."""
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1:] and not (value[end + 1] == ":" and value[end + 2:].isdigit()):
            return ""
        return value[: end + 1]
    name, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if sep and not port.isdigit():
        return ""
    return name


class HostGuard:
    """ASGI middleware: refuses requests whose Host, or a socket whose Origin, is foreign."""

    def __init__(self, app, allowed: set[str], key: str = ""):
        self.app = app
        self.key = key.encode()
        self.any = "*" in allowed
        self.names = {h for h in allowed if not h.startswith(".")}
        self.suffixes = tuple(h for h in allowed if h.startswith("."))

    def allowed(self, host: str) -> bool:
        name = _split_host(host)
        if not name or name != name.strip() or any(c in name for c in "@/\\ "):
            return False
        return self.any or _is_ip(name) or name in self.names or name.endswith(self.suffixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        ok = self.allowed(headers.get("host", ""))
        if ok and scope["type"] == "websocket" and "origin" in headers:
            origin = urlsplit(headers["origin"])
            ok = origin.scheme in ("http", "https") and self.allowed(origin.netloc)
        if not ok:
            return await self._refuse(scope, send, 403, REFUSED)
        if not self.key or scope.get("path") in OPEN_PATHS or self._has_cookie(headers.get("cookie", "")):
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            given = [v for k, v in query if k == "key"]
            if given and hmac.compare_digest(given[0].encode(), self.key):
                rest = urlencode([(k, v) for k, v in query if k != "key"])
                location = (scope.get("path") or "/") + (f"?{rest}" if rest else "")
                await send({"type": "http.response.start", "status": 303, "headers": [
                    (b"location", location.encode("latin-1")), (b"content-length", b"0"),
                    (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"),
                    (b"set-cookie", f"{COOKIE}={self.key.decode()}; Path=/; HttpOnly; SameSite=Strict".encode())]})
                await send({"type": "http.response.body", "body": b""})
                return None
        return await self._refuse(scope, send, 401, NO_KEY)

    def _has_cookie(self, header: str) -> bool:
        try:
            jar = SimpleCookie(header)
        except CookieError:
            return False
        morsel = jar.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self.key)

    @staticmethod
    async def _refuse(scope, send, status: int, text: bytes) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(text)).encode())]})
        await send({"type": "http.response.body", "body": text})


def allowed_hosts(bind: str) -> set[str]:
    hosts = {h.strip().lower() for h in os.environ.get("MODELPLANE_ALLOWED_HOSTS", "").split(",") if h.strip()}
    hosts.add("localhost")
    bind = (bind or "").strip().lower()
    if bind and bind not in ("0.0.0.0", "::"):
        hosts.add(bind)
    return hosts


def install(bind: str) -> None:
    """Put HostGuard first in the middleware of the Starlette app Streamlit builds."""
    from starlette.middleware import Middleware
    from streamlit.web.server.starlette import starlette_app

    hosts = allowed_hosts(bind)
    key = os.environ.pop(KEY_ENV, "")   # the pages never need it: only this guard
    original = starlette_app.create_streamlit_middleware

    def guarded():
        return [Middleware(HostGuard, allowed=hosts, key=key), *original()]

    starlette_app.create_streamlit_middleware = guarded


def main(argv: list[str]) -> int:
    bind = ""
    for i, arg in enumerate(argv):
        if arg == "--server.address" and i + 1 < len(argv):
            bind = argv[i + 1]
        elif arg.startswith("--server.address="):
            bind = arg.split("=", 1)[1]
    install(bind)
    from streamlit.web import cli

    sys.argv = ["streamlit", *argv]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
