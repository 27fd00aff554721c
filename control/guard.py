"""What every request to the control service passes before a route sees it.

- **Host:** the `Host` header must name this service (an IP literal, `localhost`, the bind
  address, or a name in `MODELPLANE_ALLOWED_HOSTS`): a DNS-rebinding page reaches the
  service under its own name, and is refused.
- **Cross-site calls:** a mutating call that a browser marks as coming from another site
  (`Origin`, `Sec-Fetch-Site`) is refused unless the origin is allowed; and each mutating
  route accepts only its real Content-Types, so a `text/plain` form post never parses.
- **Who, and may they:** every `/api` route, `/events` and `/metrics` need `Authorization:
  Bearer` with a token of a role the route allows (control/identity.py); the models' routes
  need a runner's unless predict is opened (setting, or the model's `visibility: public`). An
  owner-limited token acts only on its owner's models.
- **Bodies:** each route has a cap, checked against Content-Length before anything is read
  and enforced while streaming a body without one.
"""
from __future__ import annotations

import io
import ipaddress
import re
import threading
import time
from typing import Callable, Optional
from urllib.parse import urlsplit

from flask import request

from control.errors import BadRequest, Forbidden, TooLarge, Unauthorized, UnsupportedType
from control.identity import Identity, TokenStore

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="modelplane"'}
CHALLENGE_INVALID = {"WWW-Authenticate": 'Bearer realm="modelplane", error="invalid_token"'}

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
    def __init__(self, settings, tokens: TokenStore):
        self.tokens = tokens
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

    # -- who is calling -----------------------------------------------------------------------
    def identify(self, headers) -> Optional[Identity]:
        """The identity of the request's bearer token; None without one; 401 for a wrong one."""
        header = headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return None
        identity = self.tokens.identify(given)
        if identity is None:
            raise Unauthorized("the bearer token is not one this service knows (wrong, or revoked)",
                               headers=CHALLENGE_INVALID)
        return identity

    def authorize(self, headers, method: str, path: str, role: str) -> Identity:
        """The caller's identity, refused (401 without a token, 403 below `role`)."""
        identity = self.identify(headers)
        if identity is None:
            raise Unauthorized(f"{method} {path[:200]} needs 'Authorization: Bearer <token>': a token an admin "
                               "created for you, or the service's own (MODELPLANE_TOKEN, or the token file in "
                               "its state dir)", headers=CHALLENGE)
        self.require_role(identity, method, path, role)
        return identity

    @staticmethod
    def require_role(identity: Identity, method: str, path: str, role: str) -> None:
        if not identity.can(role):
            raise Forbidden(f"{identity.name} holds the role {identity.role}; {method} {path[:200]} needs "
                            f"{role} or above")

    def authorize_predict(self, headers, method: str, path: str, *, public: bool) -> Optional[Identity]:
        """Predict needs a runner's token unless it is opened for all or the model is public."""
        if self.open_predict or public:
            try:
                return self.identify(headers)
            except Unauthorized:
                return None
        return self.authorize(headers, method, path, "runner")

    @staticmethod
    def require_owner(identity: Optional[Identity], owner: Optional[str], name: str) -> None:
        """403 when an owner-limited identity acts on a model of another owner."""
        if identity is not None and not identity.owns(owner):
            raise Forbidden(f"{identity.name} may act only on models owned by {identity.owner!r}; "
                            f"{name[:100]} is owned by {owner or 'nobody'!r}")

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
