"""Run the console (`python -m console.serve run console/app.py …`, what `modelplane up` and
`modelplane console` start): Streamlit, with a guard in front of every request it serves.

On this machine the console acts with the plane's own admin token, so a page from another site
must not be able to drive it:

- **Host:** only an IP literal, `localhost`, the bind address or a name in
  `MODELPLANE_ALLOWED_HOSTS` (a DNS-rebinding page reaches the console under its own name);
- **WebSocket origin:** a browser's session socket must come from a page of one of those hosts
  (a page elsewhere opening a socket to 127.0.0.1 is refused before Streamlit sees it).

Refused HTTP requests get 403; a refused socket is closed before its handshake completes.
"""
from __future__ import annotations

import ipaddress
import os
import sys
from urllib.parse import urlsplit

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

    def __init__(self, app, allowed: set[str]):
        self.app = app
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
        if ok:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return None
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(REFUSED)).encode())]})
        await send({"type": "http.response.body", "body": REFUSED})
        return None


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
    original = starlette_app.create_streamlit_middleware

    def guarded():
        return [Middleware(HostGuard, allowed=hosts), *original()]

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
