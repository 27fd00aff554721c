"""What every request to the control service passes before a route sees it.

- **Host:** the `Host` header must name this service (an IP literal, `localhost`, the bind
  address, or a name in `MODELPLANE_ALLOWED_HOSTS`): a DNS-rebinding page reaches the
  service under its own name, and is refused.
- **Cross-site calls:** a mutating call that a browser marks as coming from another site
  (`Origin`, `Sec-Fetch-Site`) is refused unless the origin is allowed; and each mutating
  route accepts only its real Content-Types, so a `text/plain` form post never parses.
- **Token:** every `/api` route, `/events` and `/metrics` need `Authorization: Bearer`; the
  models' routes too unless predict is opened (setting, or the model's `visibility: public`).
- **Bodies:** each route has a cap, checked against Content-Length before anything is read
  and enforced while streaming a body without one.
"""
from __future__ import annotations

import hmac
import io
import ipaddress
import re
import threading
import time
from typing import Callable, Optional
from urllib.parse import urlsplit

from flask import request

from control.errors import BadRequest, Forbidden, TooLarge, Unauthorized, UnsupportedType

CHUNK = 1 << 20


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
        return True
    except ValueError:
        return False


#: A host name in a Host header: DNS labels (underscores tolerated, as some internal names
#: carry them), an optional final dot.
_HOST_NAME = re.compile(r"^(?=.{1,253}\.?$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
                        r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$")


def _split_host(value: str) -> Optional[str]:
    """The host part of a Host header, lowercased: `name`, `name:port`, `1.2.3.4:port` or
    `[v6]:port` (the port optional, 0-65535); None when the value is none of these (a
    bracket not closed, user info, spaces, an empty or non-numeric port, a bare IPv6 address)."""
    if not value or value != value.strip() or any(c.isspace() for c in value):
        return None
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1:]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
        if not _HOST_NAME.match(host):
            return None
    if rest and not (rest[0] == ":" and 1 < len(rest) <= 6 and rest[1:].isascii() and rest[1:].isdigit()
                     and int(rest[1:]) <= 65535):
        return None
    return host


class Guard:
    def __init__(self, settings, token: str):
        self.token = token
        self.open_predict = settings.open_predict
        hosts = {h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()}
        self.any_host = "*" in hosts
        bind = (settings.host or "").strip().lower()
        if bind and bind not in ("0.0.0.0", "::"):
            hosts.add(bind)
        hosts.add("localhost")
        self.hosts = {h for h in hosts if not h.startswith(".")}
        self.host_suffixes = tuple(h for h in hosts if h.startswith("."))
        origins = {o.strip().rstrip("/").lower() for o in settings.allowed_origins.split(",") if o.strip()}
        for name in ("127.0.0.1", "localhost"):
            origins.add(f"http://{name}:{settings.console_port}")
        self.origins = origins
        self._hosts_seen: set[str] = set()

    # -- Host ---------------------------------------------------------------------------------
    def check_host(self, headers) -> None:
        raw = headers.get("Host", "")
        if raw in self._hosts_seen:
            return
        if not raw:
            raise BadRequest("the request has no Host header")
        host = _split_host(raw)
        if host is None:
            raise BadRequest(f"the Host header {raw[:100]!r} is malformed: expected name, name:port, "
                             "1.2.3.4:port or [IPv6]:port")
        if self.any_host or _is_ip(host) or host in self.hosts or host.endswith(self.host_suffixes):
            if len(self._hosts_seen) < 1000:   # the answer for a Host never changes: parsed once
                self._hosts_seen.add(raw)
            return
        raise Forbidden(f"Host {raw[:100]!r} does not name this service; if it is how clients reach it, "
                        "add it to MODELPLANE_ALLOWED_HOSTS")

    # -- cross-site ---------------------------------------------------------------------------
    def check_origin(self, headers) -> None:
        origin = headers.get("Origin")
        site = (headers.get("Sec-Fetch-Site") or "").lower()
        if origin is None and site in ("", "same-origin", "none"):
            return
        if origin is not None:
            normalized = origin.strip().rstrip("/").lower()
            if normalized in self.origins:
                return
            parts = urlsplit(normalized)
            if parts.scheme in ("http", "https") and parts.netloc == (headers.get("Host") or "").lower():
                return  # same origin (a page this service's own host serves, behind a proxy)
            raise Forbidden(f"cross-site request from {origin[:100]!r} refused; allow the origin with "
                            "MODELPLANE_ALLOWED_ORIGINS if it is yours")
        if site in ("cross-site", "same-site"):
            raise Forbidden("cross-site request refused (Sec-Fetch-Site: " + site + ")")

    @staticmethod
    def check_content_type(accepted: tuple[str, ...], given: Optional[str] = None) -> None:
        """`given`: the request's media type (Content-Type without parameters); Flask's by default."""
        given = (request.mimetype if given is None else given or "").lower()
        if given not in accepted:
            shown = given or "none"
            raise UnsupportedType(f"Content-Type {shown} is not accepted here; send {' or '.join(accepted)}")

    # -- token --------------------------------------------------------------------------------
    def token_ok(self, headers) -> Optional[str]:
        """None when the request carries this service's token, else why not."""
        header = headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return "no_token"
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode()):
            return "wrong_token"
        return None

    def require_token(self, headers, method: str, path: str) -> None:
        why = self.token_ok(headers)
        if why == "no_token":
            raise Unauthorized(f"{method} {path[:200]} needs 'Authorization: Bearer <token>': "
                               "the service's MODELPLANE_TOKEN, or the token file in its state dir")
        if why == "wrong_token":
            raise Unauthorized("the bearer token does not match the control service's token")

    def require_predict(self, headers, method: str, path: str, *, public: bool) -> None:
        """Predict needs the token unless it is opened for all or the model is public."""
        if self.open_predict or public or self.token_ok(headers) is None:
            return
        self.require_token(headers, method, path)

    # -- bodies -------------------------------------------------------------------------------
    @staticmethod
    def check_length(limit: int) -> None:
        length = request.content_length
        if length is not None and length > limit:
            raise TooLarge(f"the body is {length} bytes; this route takes at most {limit}")

    @staticmethod
    def read_body(limit: int) -> bytes:
        """The whole body, refused (413) past `limit` before it is all read."""
        buffer = io.BytesIO()
        Guard.spool_body(limit, buffer)
        return buffer.getvalue()

    @staticmethod
    def spool_body(limit: int, spool) -> int:
        """Copy the body into the file `spool`, refused (413) past `limit`; the size copied."""
        Guard.check_length(limit)
        size = 0
        stream = request.stream
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the body is over this route's limit of {limit} bytes")
            spool.write(chunk)
        return size


class TTLCache:
    """name -> value for `ttl` seconds (a model's visibility and body limit, read per request)."""

    def __init__(self, ttl: float = 2.0, size: int = 10_000):
        self.ttl, self.size = ttl, size
        self._data: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, compute: Callable[[], object]) -> object:
        now = time.monotonic()
        with self._lock:
            hit = self._data.get(key)
            if hit and hit[0] > now:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._data) >= self.size:
                self._data.clear()
            self._data[key] = (now + self.ttl, value)
        return value

    def peek(self, key: str) -> Optional[object]:
        """The cached value, or None when absent or expired."""
        with self._lock:
            hit = self._data.get(key)
        return hit[1] if hit and hit[0] > time.monotonic() else None

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
