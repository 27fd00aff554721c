"""The control service's bearer token: where it comes from, and who may run without one.

Authentication is on by default. The token is, in order: `MODELPLANE_TOKEN` (or `--token`),
else the `token` file in the state dir, which `modelplane up` / `serve` create (mode 0600) on
first start and the CLI and console on the same machine read. An empty `MODELPLANE_TOKEN`
counts as unset: it never turns authentication off. A service bound beyond loopback must be
given its token explicitly, so that whoever deploys it also decides who holds it.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Optional

TOKEN_FILE = "token"


class TokenError(Exception):
    """The token cannot be read or created, or the service may not start without one."""


def token_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / TOKEN_FILE


def read_token(state_dir: Path | str) -> Optional[str]:
    """The token stored in the state dir, or None when there is none (or it cannot be read)."""
    try:
        text = token_path(state_dir).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def ensure_token(state_dir: Path | str) -> tuple[str, bool]:
    """The state dir's token, created when missing: `(token, created)`.

    Created with O_EXCL at mode 0600, so two starts racing agree on one token and no other
    user of the machine can read it.
    """
    path = token_path(state_dir)
    existing = read_token(state_dir)
    if existing:
        return existing, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # an empty or racing file: read what the winner wrote
        existing = read_token(state_dir)
        if existing:
            return existing, False
        try:
            path.unlink()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise TokenError(f"cannot create the token file {path}: {e.strerror or e}") from None
    except OSError as e:
        raise TokenError(f"cannot create the token file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, True


def is_loopback_host(host: str) -> bool:
    """Whether a bind address (or host name) only accepts connections from this machine."""
    host = (host or "").strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def service_token(settings, *, create: bool = True) -> tuple[str, bool]:
    """The token the control service enforces: `(token, created)`.

    Refuses (TokenError) to go without one beyond loopback: there the token must come from
    the environment or the command line, never be made up where nobody can see it.
    """
    if settings.token:
        return settings.token, False
    if not is_loopback_host(settings.host):
        raise TokenError(
            f"refusing to listen on {settings.host} without a token: anyone who reaches it could deploy "
            "code. Set MODELPLANE_TOKEN (or --token) to a secret, or bind 127.0.0.1.")
    if not create:
        token = read_token(settings.state_dir)
        if token is None:
            raise TokenError(f"no token: set MODELPLANE_TOKEN or create {token_path(settings.state_dir)}")
        return token, False
    try:
        return ensure_token(settings.state_dir)
    except TokenError:
        raise


def client_token(settings) -> Optional[str]:
    """The token a client on this machine sends: `MODELPLANE_TOKEN`, else the state dir's."""
    return settings.token or read_token(settings.state_dir)
