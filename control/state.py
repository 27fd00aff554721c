"""Where the control service keeps its records, so that no replica holds anything another needs.

A `StateStore` is a small key → bytes store with compare-and-swap:

- `get(key)` → `(bytes, token)` or None; `get_json(key)` the same with the JSON decoded;
- `put(key, data, expect=…)` → the new token; `expect` is None (write whatever is there),
  `ABSENT` (create only: fail if the key exists) or a token from an earlier `get`/`put`/`list`
  (write only if the record is unchanged since then). A precondition that does not hold raises
  `StateConflict`: someone else wrote first; read again and decide;
- `list(prefix)` → `{key: token}`; `delete(key, expect=…)`; `delete_prefix(prefix)`;
- `scoped(prefix)` → a view with every key under `prefix` (what each part of the plane is given).

Two implementations:

- `FileState(state_dir)` — the local runtime: one file per key under the state dir (the same
  files as before, e.g. `comparisons/{id}.json`), written atomically (temp file, fsync, rename:
  control/durable.py). Exactly one control service uses a state dir (control/statelock.py), so
  compare-and-swap is a lock in this process; the token is the file's inode, mtime and size.
- `BucketState(bucket)` — a cluster: objects at `gs://{bucket}/state/{key}` through the
  google-cloud-storage client; the token is the object's generation and the preconditions are
  GCS's own (`if_generation_match`, 0 for create-only), so every replica of the control service
  reads and writes the same records and a lost race is a 412, never a lost update.

`shared` tells the parts whether other replicas may be writing beside them (True only for the
bucket); `replica` names this process as a writer: `local` in a state dir (one service), and on
a cluster the host name, the pid and a random part (a restarted pod is a new replica).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from control.durable import write_bytes_atomic, write_json_atomic
from control.errors import Unavailable

#: `put(…, expect=ABSENT)`: create only
ABSENT = "absent"


class StateConflict(Exception):
    """A put's or delete's precondition did not hold: the record changed (or exists) meanwhile."""


class StateUnavailable(Unavailable):
    """The store cannot be read or written now (the bucket is unreachable, the disk is full)."""


def replica_id() -> str:
    """A name for this process among the control service's replicas: host, pid, a random part."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


def check_key(key: str) -> str:
    """A key is a relative POSIX path without `.`/`..` parts or a leading dot in any part."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"bad state key {key!r}")
    for part in PurePosixPath(key).parts:
        if part in (".", "..") or part.startswith("."):
            raise ValueError(f"bad state key {key!r}")
    return key


class StateStore:
    """The interface (see the module's docstring)."""

    shared = False
    replica = "local"

    def get(self, key: str) -> Optional[tuple[bytes, str]]:
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, expect: Optional[str] = None) -> str:
        raise NotImplementedError

    def list(self, prefix: str = "") -> dict[str, str]:
        raise NotImplementedError

    def delete(self, key: str, *, expect: Optional[str] = None) -> bool:
        raise NotImplementedError

    # -- built on the above ---------------------------------------------------------------------
    def get_json(self, key: str) -> Optional[tuple[Any, str]]:
        """(the decoded record, its token), None if there is none; ValueError if it is not JSON."""
        got = self.get(key)
        if got is None:
            return None
        data, token = got
        return json.loads(data), token

    def put_json(self, key: str, value: Any, *, expect: Optional[str] = None) -> str:
        return self.put(key, json.dumps(value, separators=(",", ":"), sort_keys=True).encode(), expect=expect)

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def scoped(self, prefix: str) -> "StateStore":
        return Scoped(self, prefix)


class Scoped(StateStore):
    """A view of a store with every key under `prefix` (which ends with `/`)."""

    def __init__(self, inner: StateStore, prefix: str):
        self.inner = inner
        self.prefix = check_key(prefix.rstrip("/")) + "/"
        self.shared = inner.shared
        self.replica = inner.replica

    def get(self, key):
        return self.inner.get(self.prefix + check_key(key))

    def get_json(self, key):
        return self.inner.get_json(self.prefix + check_key(key))

    def put(self, key, data, *, expect=None):
        return self.inner.put(self.prefix + check_key(key), data, expect=expect)

    def put_json(self, key, value, *, expect=None):
        return self.inner.put_json(self.prefix + check_key(key), value, expect=expect)

    def list(self, prefix=""):
        n = len(self.prefix)
        return {k[n:]: t for k, t in self.inner.list(self.prefix + prefix).items()}

    def delete(self, key, *, expect=None):
        return self.inner.delete(self.prefix + check_key(key), expect=expect)

    def delete_prefix(self, prefix):
        self.inner.delete_prefix(self.prefix + prefix)

    def scoped(self, prefix):
        return Scoped(self.inner, self.prefix + prefix)


# -- a state directory ------------------------------------------------------------------------------

_FILE_LOCKS: dict[str, threading.RLock] = {}
_FILE_LOCKS_LOCK = threading.Lock()


def _lock_for(root: Path) -> threading.RLock:
    with _FILE_LOCKS_LOCK:
        return _FILE_LOCKS.setdefault(str(root), threading.RLock())


def _token(st: os.stat_result) -> str:
    return f"{st.st_ino}.{st.st_mtime_ns}.{st.st_size}"


class FileState(StateStore):
    """Records as files under a state dir (see the module's docstring)."""

    shared = False
    replica = "local"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._lock = _lock_for(self.root)   # one per directory in this process: CAS is check-then-write under it

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key):
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(), _token(st)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise StateUnavailable(f"cannot read {path}: {e}") from e

    def _current(self, path: Path) -> Optional[str]:
        try:
            return _token(os.stat(path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _check(self, key: str, path: Path, expect: Optional[str]) -> None:
        if expect is None:
            return
        current = self._current(path)
        if (expect == ABSENT and current is not None) or (expect != ABSENT and current != expect):
            raise StateConflict(f"{key} changed meanwhile" if current else f"{key} does not exist")

    def put(self, key, data, *, expect=None):
        path = self.path(key)
        with self._lock:
            self._check(key, path, expect)
            try:
                write_bytes_atomic(path, data)
                return _token(os.stat(path))
            except OSError as e:
                raise StateUnavailable(f"cannot write {path}: {e}") from e

    def put_json(self, key, value, *, expect=None):
        path = self.path(key)
        with self._lock:
            self._check(key, path, expect)
            try:
                write_json_atomic(path, value)   # indented, as these files always were: a person reads them
                return _token(os.stat(path))
            except OSError as e:
                raise StateUnavailable(f"cannot write {path}: {e}") from e

    def list(self, prefix=""):
        if prefix:
            check_key(prefix.rstrip("/"))
        base = self.root / (prefix if prefix.endswith("/") else os.path.dirname(prefix))
        out = {}
        for folder, dirs, files in os.walk(base, onerror=lambda e: None):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith(".") or ".corrupt-" in name:
                    continue   # temp files being written; records moved aside for a person
                full = os.path.join(folder, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if not key.startswith(prefix):
                    continue
                try:
                    out[key] = _token(os.stat(full))
                except OSError:
                    continue
        return out

    def delete(self, key, *, expect=None):
        path = self.path(key)
        with self._lock:
            self._check(key, path, expect)
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except OSError as e:
                raise StateUnavailable(f"cannot delete {path}: {e}") from e
            self._prune_dirs(path.parent)
            return True

    def _prune_dirs(self, folder: Path) -> None:
        """Remove folders left empty up to the root (a forgotten model leaves no folder behind)."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


# -- a bucket ---------------------------------------------------------------------------------------

class BucketState(StateStore):
    """Records as objects at `gs://{bucket}/{prefix}{key}` (see the module's docstring).

    `bucket` is a google-cloud-storage Bucket, or anything that gives one's attributes on
    demand (the plane's lazy bucket, whose client is made on first use)."""

    shared = True

    def __init__(self, bucket, prefix: str = "state/", *, replica: Optional[str] = None):
        self.bucket = bucket
        self.prefix = check_key(prefix.rstrip("/")) + "/"
        self.replica = replica or replica_id()

    def _where(self, key: str) -> str:
        try:
            bucket = self.bucket.name
        except Exception:  # noqa: BLE001 — a lazy bucket whose client cannot be made
            bucket = "?"
        return f"gs://{bucket}/{self.prefix}{key}"

    def _failed(self, what: str, key: str, e: Exception) -> StateUnavailable:
        return StateUnavailable(f"cannot {what} {self._where(key)}: {type(e).__name__}: {str(e)[:200]}")

    def get(self, key):
        from google.api_core import exceptions as gexc

        # The generation first, then the bytes of that generation only (412 if it changed in
        # between: read again). So the token never claims more than the bytes hold: a CAS write
        # based on them fails rather than overwriting a newer record.
        name = self.prefix + check_key(key)
        for _ in range(5):
            try:
                blob = self.bucket.get_blob(name)
                if blob is None:
                    return None
                generation = blob.generation
                return blob.download_as_bytes(if_generation_match=generation), str(generation)
            except (gexc.NotFound, gexc.PreconditionFailed):
                continue
            except Exception as e:  # noqa: BLE001 — the client's errors are many; say what failed
                raise self._failed("read", key, e) from e
        raise StateUnavailable(f"{self._where(key)} kept changing while it was read")

    def put(self, key, data, *, expect=None):
        from google.api_core import exceptions as gexc

        name = self.prefix + check_key(key)
        match = None if expect is None else 0 if expect == ABSENT else int(expect)
        try:
            blob = self.bucket.blob(name)   # in the try: a lazy bucket makes its client here
            blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=match)
        except gexc.PreconditionFailed:
            raise StateConflict(f"{key} {'exists' if match == 0 else 'changed meanwhile'}") from None
        except Exception as e:  # noqa: BLE001
            raise self._failed("write", key, e) from e
        return str(blob.generation)

    def put_json(self, key, value, *, expect=None):
        return self.put(key, json.dumps(value, separators=(",", ":"), sort_keys=True).encode(), expect=expect)

    def list(self, prefix=""):
        try:
            return {b.name[len(self.prefix):]: str(b.generation)
                    for b in self.bucket.list_blobs(prefix=self.prefix + prefix)}
        except Exception as e:  # noqa: BLE001
            raise self._failed("list", prefix, e) from e

    def delete(self, key, *, expect=None):
        from google.api_core import exceptions as gexc

        name = self.prefix + check_key(key)
        match = None if expect is None else 0 if expect == ABSENT else int(expect)
        try:
            self.bucket.blob(name).delete(if_generation_match=match)
        except gexc.NotFound:
            return False
        except gexc.PreconditionFailed:
            raise StateConflict(f"{key} changed meanwhile") from None
        except Exception as e:  # noqa: BLE001
            raise self._failed("delete", key, e) from e
        return True


class Every:
    """Calls `fn` every `seconds` in a daemon thread until `stop` (which waits for a call under way)."""

    def __init__(self, seconds: float, fn, name: str):
        self.seconds, self.fn = seconds, fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Every":
        self._thread.start()
        return self

    def _run(self) -> None:
        import logging

        while not self._stop.wait(self.seconds):
            try:
                self.fn()
            except Exception:  # noqa: BLE001 — the next tick tries again
                logging.getLogger(__name__).exception("%s", self._thread.name)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
