"""Where batch data lives: `gs://` objects and local paths, streamed down and published atomically.

The google-cloud-storage client honours `STORAGE_EMULATOR_HOST` (then with the plane's storage
key, MODELPLANE_STORAGE_KEY, as its bearer token), so the embedded emulator and real GCS are used
through the same code.
Results appear atomically: scores.csv is complete before anything names it, result.json last.
`ScoresUpload` sends scores to GCS while the model still writes them (a resumable upload that
becomes an object only when it is committed), so publishing after the model exits is one last chunk.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

CHUNK = 1 << 20  # 1 MiB: reads, hashes and downloads never hold more than this much of a file
# A streamed upload's chunks: GCS wants multiples of 256 KiB (all but the last). Small, so the
# adapter's memory stays flat (a chunk is buffered and copied once); big enough for few requests.
UPLOAD_CHUNK = 2 << 20
UPLOAD_TIMEOUT = 120.0  # seconds for one chunk of a streamed upload

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A dataset or result location that cannot be read or written; the message says which and why."""


@dataclass(frozen=True)
class InputInfo:
    """What was scored: the URI, its GCS generation (None for a local file) and md5 (hex)."""

    uri: str
    generation: str | None
    md5: str | None

    def to_json(self) -> dict:
        return {"uri": self.uri, "generation": self.generation, "md5": self.md5}


def is_gcs(uri: str) -> bool:
    return str(uri).startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """`gs://bucket/a/b.csv` -> (`bucket`, `a/b.csv`)."""
    rest = str(uri)[len("gs://"):]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise StorageError(f"not a gs:// URI with a bucket: {uri!r}")
    return bucket, name


def join(prefix: str, name: str) -> str:
    """`prefix` (a gs:// URI or a local folder) joined with a file name."""
    if is_gcs(prefix):
        return prefix.rstrip("/") + "/" + name
    return str(Path(prefix) / name)


_client = None

STORAGE_KEY_ENV = "MODELPLANE_STORAGE_KEY"


def emulator_credentials(key: str | None = None):
    """Credentials for an emulator: the plane's storage key as a bearer token (the embedded bucket
    answers nothing else; control/emulator_guard.py), or anonymous for another emulator when
    there is no key (`key` or env MODELPLANE_STORAGE_KEY)."""
    from google.auth import credentials

    key = (key if key is not None else os.environ.get(STORAGE_KEY_ENV, "")).strip()
    if not key:
        return credentials.AnonymousCredentials()

    class StorageKey(credentials.Credentials):
        """A static bearer token that never expires: google-cloud-storage sends it on every request."""

        def __init__(self) -> None:
            super().__init__()
            self.token = key

        def refresh(self, request) -> None:  # nothing to renew
            pass

    return StorageKey()


def client():
    """One google-cloud-storage client per process; with the storage key against an emulator."""
    global _client
    if _client is None:
        from google.cloud import storage

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            _client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "modelplane"),
                                     credentials=emulator_credentials())
        else:
            _client = storage.Client()
    return _client


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(uri: str, dest: Path, *, generation: str | None = None) -> InputInfo:
    """Stream the gs:// object at `uri` to `dest` (bounded memory); return its generation.

    With `generation` (from a finalized event) exactly that version is fetched, or the fetch
    fails: a job scores the upload that triggered it, never a later overwrite. The download is
    pinned to the generation read first, so a concurrent overwrite fails it instead of mixing two.
    """
    bucket_name, name = split_gcs(uri)
    try:
        bucket = client().bucket(bucket_name)
        blob = bucket.get_blob(name, generation=int(generation) if generation else None)
        if blob is None:
            raise StorageError(f"the dataset {uri} does not exist"
                               + (f" (generation {generation})" if generation else ""))
        found = str(blob.generation) if blob.generation is not None else None
        if generation and found != str(generation):
            raise StorageError(f"the dataset {uri} was replaced after the upload that started this job "
                               f"(generation {generation}; now {found})")
        generation = found
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A fresh handle pinned to that generation: its URL is built from the client's endpoint,
        # not the `mediaLink` the server returned (an emulator names itself by the address it
        # listens on, which another host or pod may not reach).
        pinned = bucket.blob(name, generation=blob.generation)
        pinned.download_to_filename(str(dest), checksum=None)
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"could not download the dataset {uri}: {e}") from e
    except Exception as e:  # google.api_core errors, retries given up, transport errors
        raise StorageError(f"could not download the dataset {uri}: {getattr(e, 'message', None) or e}") from e
    return InputInfo(uri=uri, generation=generation, md5=None)


def _local_atomic(dest: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `dest` atomically: `write` fills a temp file in dest's folder, then os.replace."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _local_put(src: Path, dest: Path) -> None:
    def copy(out: BinaryIO) -> None:
        with open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
    _local_atomic(dest, copy)


def _local_write(data: bytes, dest: Path) -> None:
    _local_atomic(dest, lambda out: out.write(data))


def put_file(src: Path, uri: str, *, content_type: str = "text/csv") -> None:
    """Upload/copy a whole file to `uri`; the object or file appears only once complete."""
    try:
        if is_gcs(uri):
            bucket_name, name = split_gcs(uri)
            blob = client().bucket(bucket_name).blob(name)
            blob.upload_from_filename(str(src), content_type=content_type)
        else:
            _local_put(Path(src), Path(uri))
    except OSError as e:
        raise StorageError(f"could not write {uri}: {e}") from e
    except Exception as e:  # google.api_core errors and transport errors
        if is_gcs(uri):
            raise StorageError(f"could not upload {uri}: {e}") from e
        raise


class ScoresUpload:
    """A gs:// object uploaded while its bytes are still being produced, visible only once committed.

    `write` buffers and sends whole UPLOAD_CHUNKs to a resumable upload session; `commit(rest)`
    sends what is left as the final chunk, and only then does the object exist. `abort` drops the
    session: nothing ever appears at `uri` (an unfinished session is never an object; one left
    behind by a killed process expires on its own). It never raises from `write`: a failure
    marks it `broken`, and the caller publishes the whole file the ordinary way instead.
    """

    def __init__(self, uri: str, *, content_type: str = "text/csv", chunk: int | None = None):
        chunk = chunk or UPLOAD_CHUNK
        if chunk % (256 << 10):
            raise ValueError("a resumable upload's chunks are multiples of 256 KiB")
        self.uri = uri
        self.content_type = content_type
        self.chunk = chunk
        self.sent = 0  # bytes the server has acknowledged
        self.broken: str | None = None
        self.done = False
        self._pending = bytearray()
        self._url: str | None = None

    def write(self, data: bytes) -> None:
        if self.broken or self.done or not data:
            return
        self._pending += data
        whole = len(self._pending) // self.chunk * self.chunk
        if not whole:
            return
        with memoryview(self._pending) as view:
            body = bytes(view[:whole])  # one copy; requests wants bytes
        try:
            self._put(body, final=False)
        except Exception as e:  # noqa: BLE001 - any failure: fall back to a whole-file upload
            self.broken = str(e) or type(e).__name__
            log.warning("streamed upload of %s stopped (%s); it will be uploaded whole", self.uri, self.broken)
            self._pending.clear()
            return
        del self._pending[:whole]

    def commit(self, rest: bytes = b"") -> None:
        """Send the last bytes and make the object appear; StorageError if that fails."""
        if self.broken:
            raise StorageError(f"could not upload {self.uri}: {self.broken}")
        try:
            self._put(bytes(self._pending) + rest, final=True)
        except StorageError:
            raise
        except Exception as e:  # google.auth / requests transport errors
            raise StorageError(f"could not upload {self.uri}: {e}") from e
        self._pending.clear()
        self.done = True

    def abort(self) -> None:
        """Drop the session (best effort): nothing appears at `uri`."""
        self._pending.clear()
        if self.done or self._url is None:
            self.done = True
            return
        self.done = True
        try:
            client()._http.delete(self._url, timeout=10)  # GCS answers 499; an emulator may not know it
        except Exception as e:  # noqa: BLE001 - the session expires anyway
            log.debug("could not cancel the upload session for %s: %s", self.uri, e)

    def _session(self) -> str:
        if self._url is None:
            bucket_name, name = split_gcs(self.uri)
            blob = client().bucket(bucket_name).blob(name)
            self._url = blob.create_resumable_upload_session(content_type=self.content_type, checksum=None,
                                                             timeout=UPLOAD_TIMEOUT)
        return self._url

    def _put(self, body: bytes, *, final: bool) -> None:
        url = self._session()
        start, end = self.sent, self.sent + len(body) - 1
        total = str(self.sent + len(body)) if final else "*"
        span = f"bytes {start}-{end}/{total}" if body else f"bytes */{total}"
        resp = client()._http.put(url, data=body, headers={"Content-Range": span}, timeout=UPLOAD_TIMEOUT)
        if final:
            if resp.status_code not in (200, 201):
                raise StorageError(f"could not upload {self.uri}: the last chunk got {resp.status_code} "
                                   f"{resp.text[:300]}")
        elif resp.status_code != 308 or resp.headers.get("Range") != f"bytes=0-{end}":
            raise StorageError(f"the upload of {self.uri} was not resumed as sent ({resp.status_code}, "
                               f"Range {resp.headers.get('Range')!r} for bytes {start}-{end})")
        self.sent += len(body)


def put_bytes(data: bytes, uri: str, *, content_type: str = "application/json") -> None:
    try:
        if is_gcs(uri):
            bucket_name, name = split_gcs(uri)
            client().bucket(bucket_name).blob(name).upload_from_string(data, content_type=content_type)
        else:
            _local_write(data, Path(uri))
    except OSError as e:
        raise StorageError(f"could not write {uri}: {e}") from e
    except Exception as e:
        if is_gcs(uri):
            raise StorageError(f"could not upload {uri}: {e}") from e
        raise


def exists(uri: str) -> bool:
    if is_gcs(uri):
        bucket_name, name = split_gcs(uri)
        return client().bucket(bucket_name).blob(name).exists()
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        bucket_name, name = split_gcs(uri)
        return client().bucket(bucket_name).blob(name).download_as_bytes()
    return Path(uri).read_bytes()
