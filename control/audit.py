"""The audit trail: every change to the plane, who made it, and how it ended, hash-chained.

A record is `{seq, at, who, role, owner, action, model, version, target, request_id, status,
outcome, detail, prev, hash}`: `hash` is the SHA-256 of the record's other fields (sorted-key
JSON) and `prev` the previous record's hash, so removing, inserting or editing a record breaks
the chain where it happened, and `verify()` names that place.

- `FileAudit` (local runtime): `audit.log` in the state dir, one JSON line per record, mode
  0600, appended and fsynced under a file lock (two processes never fork the chain).
- `ClusterAudit` (cluster runtime): the chain's head (seq and hash) in the ConfigMap
  `modelplane-audit`, advanced with optimistic concurrency by whichever control replica
  records; each record an object `state/audit/<seq>.json` in the plane's bucket. A replica
  that dies between the two leaves a gap that `verify()` reports.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import orjson

from control.identity import now_iso

log = logging.getLogger(__name__)

GENESIS = "0" * 64
AUDIT_FILE = "audit.log"
HEAD_CONFIGMAP = "modelplane-audit"
PREFIX = "state/audit/"
MAX_SCAN = 200_000
FIELDS = ("who", "role", "owner", "action", "model", "version", "target", "request_id", "status",
          "outcome", "detail")


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    return "failed"


def seal(record: dict, prev: str, seq: int) -> dict:
    body = {**record, "seq": seq, "prev": prev}
    body["hash"] = hashlib.sha256(orjson.dumps({k: v for k, v in body.items() if k != "hash"},
                                               option=orjson.OPT_SORT_KEYS)).hexdigest()
    return body


def matches(rec: dict, *, who=None, action=None, model=None, outcome=None, since=None) -> bool:
    return ((who is None or rec.get("who") == who) and (action is None or rec.get("action") == action)
            and (model is None or rec.get("model") == model) and (outcome is None or rec.get("outcome") == outcome)
            and (since is None or (rec.get("at") or "") >= since))


class Chain:
    """Checks records in order: each one's hash, its link to the one before, no gap in seq."""

    def __init__(self):
        self.prev, self.seq, self.count = GENESIS, 0, 0
        self.problem: Optional[str] = None

    def feed(self, rec: dict) -> bool:
        if self.problem:
            return False
        if "problem" in rec:
            self.problem = f"record {rec.get('seq')}: {rec['problem']}"
            return False
        seq = rec.get("seq")
        expected = seal({k: v for k, v in rec.items() if k not in ("seq", "prev", "hash")},
                        rec.get("prev", ""), seq if isinstance(seq, int) else -1)["hash"]
        if seq != self.seq + 1:
            self.problem = f"record {seq} follows record {self.seq}: " + (
                "records are missing" if isinstance(seq, int) and seq > self.seq + 1 else "the order was changed")
        elif rec.get("prev") != self.prev:
            self.problem = f"record {seq} does not link to record {self.seq} (one of them was changed or replaced)"
        elif rec.get("hash") != expected:
            self.problem = f"record {seq} was changed after it was written (its hash does not match its fields)"
        if self.problem:
            return False
        self.prev, self.seq, self.count = rec["hash"], seq, self.count + 1
        return True

    def result(self) -> dict:
        return {"ok": self.problem is None, "records": self.count, "last": self.seq, "problem": self.problem}


class AuditLog:
    def record(self, **fields) -> Optional[dict]:
        """Append a record; never raises (a failure is logged: the change it describes happened)."""
        rec = {k: fields.get(k) for k in FIELDS}
        rec["at"] = now_iso()
        try:
            return self._append(rec)
        except Exception:  # noqa: BLE001
            log.exception("the audit trail could not record %s by %s", rec.get("action"), rec.get("who"))
            return None

    def entries(self, *, limit: int = 100, **filters) -> list[dict]:
        """Newest first, at most `limit`, those matching every filter given."""
        out = []
        for i, rec in enumerate(self._newest_first()):
            if i >= MAX_SCAN or len(out) >= limit:
                break
            if matches(rec, **filters):
                out.append(rec)
        return out

    def verify(self) -> dict:
        chain = Chain()
        for rec in self._oldest_first():
            if not chain.feed(rec):
                break
        return chain.result()

    def _append(self, rec: dict) -> dict:
        raise NotImplementedError

    def _newest_first(self) -> Iterator[dict]:
        raise NotImplementedError

    def _oldest_first(self) -> Iterator[dict]:
        raise NotImplementedError


class FileAudit(AuditLog):
    def __init__(self, state_dir: Path | str):
        self.path = Path(state_dir) / AUDIT_FILE
        self._lock = threading.Lock()

    def _append(self, rec: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                last = _last_line(fd)
                prev, seq = GENESIS, 0
                if last:
                    head = orjson.loads(last)
                    prev, seq = head["hash"], head["seq"]
                sealed = seal(rec, prev, seq + 1)
                os.write(fd, orjson.dumps(sealed) + b"\n")
                os.fsync(fd)
                return sealed
            finally:
                os.close(fd)   # closing drops the lock

    def _newest_first(self) -> Iterator[dict]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            for line in _reverse_lines(f):
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue

    def _oldest_first(self) -> Iterator[dict]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    yield {"seq": f"line {n}", "problem": "not JSON"}


def _last_line(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    block, data = 4096, b""
    pos = size
    while pos > 0:
        step = min(block, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
        lines = data.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or pos == 0:
            return lines[-1]
        block *= 2
    return data.rstrip(b"\n")


def _reverse_lines(f, block: int = 1 << 16) -> Iterator[bytes]:
    f.seek(0, os.SEEK_END)
    pos, rest = f.tell(), b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + rest
        lines = data.split(b"\n")
        rest = lines.pop(0)
        for line in reversed(lines):
            if line.strip():
                yield line
    if rest.strip():
        yield rest


class ClusterAudit(AuditLog):
    """The head in a ConfigMap (compare-and-swap on its resourceVersion), records in the bucket."""

    def __init__(self, core_api, namespace: str, bucket):
        self.api, self.namespace, self.bucket = core_api, namespace, bucket

    def _head(self):
        from kubernetes.client.exceptions import ApiException

        try:
            cm = self.api.read_namespaced_config_map(HEAD_CONFIGMAP, self.namespace)
        except ApiException as e:
            if e.status == 404:
                raise RuntimeError(f"the ConfigMap {self.namespace}/{HEAD_CONFIGMAP} is missing: apply "
                                   "knative/rbac.yaml") from None
            raise
        data = cm.data or {}
        return cm, int(data.get("seq") or 0), data.get("hash") or GENESIS

    def _append(self, rec: dict) -> dict:
        from kubernetes.client.exceptions import ApiException

        for _ in range(50):
            cm, seq, prev = self._head()
            sealed = seal(rec, prev, seq + 1)
            cm.data = {"seq": str(seq + 1), "hash": sealed["hash"]}
            try:
                self.api.replace_namespaced_config_map(HEAD_CONFIGMAP, self.namespace, cm)
            except ApiException as e:
                if e.status == 409:   # another replica recorded first: chain after its record
                    time.sleep(0.02)
                    continue
                raise
            self.bucket.blob(f"{PREFIX}{seq + 1:012d}.json").upload_from_string(
                orjson.dumps(sealed), content_type="application/json")
            return sealed
        raise RuntimeError("the audit head kept moving: too many control replicas recording at once")

    def _names(self) -> list[str]:
        return sorted(b.name for b in self.bucket.list_blobs(prefix=PREFIX)
                      if b.name.endswith(".json"))

    def _read(self, name: str) -> dict:
        return orjson.loads(self.bucket.blob(name).download_as_bytes())

    def _newest_first(self) -> Iterator[dict]:
        for name in reversed(self._names()):
            yield self._read(name)

    def _oldest_first(self) -> Iterator[dict]:
        names = self._names()
        for name in names:
            yield self._read(name)
        _, seq, _ = self._head()
        if names and int(names[-1][len(PREFIX):-5]) < seq:   # the head is past the last record
            yield {"seq": seq, "problem": "the head names a record that is missing"}
