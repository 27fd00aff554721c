"""Who is calling: named tokens, each with a role (and optionally an owner), stored as hashes.

Roles, each with everything the one before it may do:

- `viewer`: list models, status, jobs and their results, comparisons, events, the audit trail;
- `runner`: also predict and run jobs (and upload their datasets);
- `deployer`: also deploy, rollout, promote, rollback, compare, set references;
- `admin`: also remove models and create, list and revoke tokens.

A token limited to an `owner` may change (and, as a runner, call) only the models whose
manifest names that owner; it reads everything a token of its role reads.

The bootstrap token (`MODELPLANE_TOKEN`, or the state dir's `token` file: control/auth.py) is
the identity `admin` with the role `admin`. Every other token is created by an admin, shown
once, and kept only as its SHA-256 (a token is 32 random bytes: nothing to brute-force, so a
slow hash would buy nothing and cost every request). Where they are kept:

- `FileTokens`: `tokens.json` in the state dir (mode 0600), for the local runtime;
- `SecretTokens`: the Secret `modelplane-tokens` in the plane's namespace, which every control
  replica reads (cached for two seconds) and updates with optimistic concurrency.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from control.durable import write_json_atomic
from control.errors import BadRequest, Conflict, NotFound

ROLES = ("viewer", "runner", "deployer", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}
BOOTSTRAP = "admin"
TOKEN_PREFIX = "mp_"
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,99}$")
TOKENS_FILE = "tokens.json"
SECRET_NAME = "modelplane-tokens"
SECRET_KEY = "tokens.json"
MAX_TOKENS = 10_000


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    owner: Optional[str] = None

    def can(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]

    def owns(self, owner: Optional[str]) -> bool:
        """Whether this identity may act on a model whose manifest names `owner`."""
        return self.owner is None or (owner or "") == self.owner

    def to_json(self) -> dict:
        return {"name": self.name, "role": self.role, "owner": self.owner}


ADMIN = Identity(BOOTSTRAP, "admin")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_new(name: str, role: str, owner: Optional[str]) -> None:
    """Refuse (400) a token request whose name, role or owner is malformed."""
    if not NAME.match(name or ""):
        raise BadRequest(f"token name {name[:80]!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if name == BOOTSTRAP:
        raise BadRequest(f"the name {BOOTSTRAP!r} is the bootstrap token's; choose another")
    if role not in RANK:
        raise BadRequest(f"role {role[:40]!r} is not one of {', '.join(ROLES)}")
    if owner is not None:
        if not OWNER.match(owner):
            raise BadRequest(f"owner {owner[:80]!r}: 1-100 letters, digits, spaces or . _ @ -")
        if role == "admin":
            raise BadRequest("an admin token cannot be limited to an owner: it can create tokens for any")


def public(record: dict) -> dict:
    """A token's record as it is shown: never its hash."""
    return {k: record.get(k) for k in ("name", "role", "owner", "created_at", "created_by")}


class TokenStore:
    """Named tokens by hash. Subclasses load and save the whole table (small: one line each)."""

    def __init__(self, bootstrap: str):
        self._bootstrap = bootstrap.encode()
        self._lock = threading.Lock()
        self._by_hash: dict[str, Identity] = {}
        self._records: list[dict] = []

    # -- what subclasses provide --------------------------------------------------------------
    def _load(self) -> tuple[list[dict], object]:
        """The stored records and a version to save against."""
        raise NotImplementedError

    def _save(self, records: list[dict], version: object) -> bool:
        """Store `records` if the store is still at `version`; False when it moved (retry)."""
        raise NotImplementedError

    def _fresh(self) -> None:
        """Reload the table if the store changed (cheaply: a stat, or a short cache)."""
        raise NotImplementedError

    def _abandon(self) -> None:
        """A change read with `_load` is not saved after all."""

    # -- lookups --------------------------------------------------------------------------------
    def _index(self, records: list[dict]) -> None:
        by_hash = {}
        for rec in records:
            if rec.get("role") in RANK and isinstance(rec.get("hash"), str):
                by_hash[rec["hash"]] = Identity(rec["name"], rec["role"], rec.get("owner"))
        self._records, self._by_hash = records, by_hash

    def identify(self, token: str) -> Optional[Identity]:
        """The identity a bearer token stands for, or None."""
        if hmac.compare_digest(token.encode("utf-8", "replace"), self._bootstrap):
            return ADMIN
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        self._fresh()
        return self._by_hash.get(hash_token(token))

    def list(self) -> list[dict]:
        self._fresh()
        return sorted((public(r) for r in self._records), key=lambda r: r["name"])

    # -- changes ----------------------------------------------------------------------------------
    def _change(self, edit) -> object:
        for _ in range(20):
            records, version = self._load()
            try:
                records = [dict(r) for r in records]
                result = edit(records)
            except BaseException:
                self._abandon()
                raise
            if self._save(records, version):
                with self._lock:
                    self._index(records)
                return result
            time.sleep(0.05)
        raise Conflict("the token store kept changing under this request; try again")

    def create(self, name: str, role: str, owner: Optional[str], *, by: str) -> tuple[str, dict]:
        """A new token `(token, record)`: the token is returned here and never again."""
        check_new(name, role, owner)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)

        def edit(records: list[dict]) -> dict:
            if any(r.get("name") == name for r in records):
                raise Conflict(f"a token named {name!r} exists; revoke it first or choose another name")
            if len(records) >= MAX_TOKENS:
                raise Conflict(f"the plane holds {MAX_TOKENS:,} tokens already; revoke some first")
            record = {"name": name, "role": role, "owner": owner, "created_at": now_iso(), "created_by": by,
                      "hash": hash_token(token)}
            records.append(record)
            return public(record)

        return token, self._change(edit)

    def revoke(self, name: str) -> dict:
        if name == BOOTSTRAP:
            raise BadRequest("the bootstrap token cannot be revoked here: change MODELPLANE_TOKEN or the "
                             "state dir's token file and restart")

        def edit(records: list[dict]) -> dict:
            for i, r in enumerate(records):
                if r.get("name") == name:
                    return public(records.pop(i))
            raise NotFound(f"no token named {name[:80]!r}")

        return self._change(edit)


class FileTokens(TokenStore):
    """`tokens.json` in the state dir, mode 0600; re-read when its mtime or size changes."""

    def __init__(self, state_dir: Path | str, bootstrap: str):
        super().__init__(bootstrap)
        self.path = Path(state_dir) / TOKENS_FILE
        self._stamp: object = None
        self._write_lock = threading.Lock()

    def _stat(self) -> object:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise RuntimeError(f"the token store {self.path} cannot be read: {e}") from None
        return [r for r in data.get("tokens", []) if isinstance(r, dict)]

    def _fresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        with self._lock:
            records = self._read()
            self._index(records)
            self._stamp = stamp

    def _load(self) -> tuple[list[dict], object]:
        self._write_lock.acquire()   # held until _save: one change at a time in this process
        try:
            return self._read(), self._stat()
        except BaseException:
            self._write_lock.release()
            raise

    def _abandon(self) -> None:
        self._write_lock.release()

    def _save(self, records: list[dict], version: object) -> bool:
        try:
            if self._stat() != version:
                return False
            write_json_atomic(self.path, {"tokens": records})   # mkstemp's file: 0600
            self._stamp = None   # re-read on the next lookup
            return True
        finally:
            self._write_lock.release()


class SecretTokens(TokenStore):
    """The Secret `modelplane-tokens` (key `tokens.json`) in the plane's namespace.

    Every replica reads it at most every `ttl` seconds, so a token revoked on one replica is
    refused by the others within that; the replica that made a change uses it at once. Changes
    replace the Secret at the resourceVersion read, so two replicas never lose each other's.
    The Secret is created by the install (knative/rbac.yaml): the control account may only get
    and update that one Secret.
    """

    def __init__(self, core_api, namespace: str, bootstrap: str, *, ttl: float = 2.0):
        super().__init__(bootstrap)
        self.api, self.namespace, self.ttl = core_api, namespace, ttl
        self._until = 0.0

    def _get(self):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.read_namespaced_secret(SECRET_NAME, self.namespace)
        except ApiException as e:
            if e.status == 404:
                raise RuntimeError(f"the Secret {self.namespace}/{SECRET_NAME} is missing: apply knative/rbac.yaml") \
                    from None
            raise

    @staticmethod
    def _decode(secret) -> list[dict]:
        raw = (secret.data or {}).get(SECRET_KEY)
        if not raw:
            return []
        data = json.loads(base64.b64decode(raw))
        return [r for r in data.get("tokens", []) if isinstance(r, dict)]

    def _fresh(self) -> None:
        if time.monotonic() < self._until:
            return
        with self._lock:
            if time.monotonic() < self._until:
                return
            self._index(self._decode(self._get()))
            self._until = time.monotonic() + self.ttl

    def _load(self) -> tuple[list[dict], object]:
        secret = self._get()
        return self._decode(secret), secret

    def _save(self, records: list[dict], version: object) -> bool:
        from kubernetes.client.exceptions import ApiException

        secret = version
        payload = json.dumps({"tokens": records}, indent=1).encode()
        secret.data = dict(secret.data or {}, **{SECRET_KEY: base64.b64encode(payload).decode()})
        try:
            self.api.replace_namespaced_secret(SECRET_NAME, self.namespace, secret)
        except ApiException as e:
            if e.status == 409:   # another replica changed it since it was read
                return False
            raise
        self._until = time.monotonic() + self.ttl
        return True
