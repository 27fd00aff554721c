"""The control plane's google-cloud-storage client: the emulator when `STORAGE_EMULATOR_HOST` is set, real GCS otherwise."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional


KEY_FILE = "storage-key"


def key_path(state_dir) -> Path:
    return Path(state_dir) / KEY_FILE


def storage_key(state_dir) -> str:
    """The embedded bucket's key, `{state_dir}/storage-key` (0600): read, or made on first use."""
    path = key_path(state_dir)
    try:
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
    return key


def storage_client(project: Optional[str] = None, *, key: Optional[str] = None, state_dir=None):
    """A `google.cloud.storage.Client`.

    With `STORAGE_EMULATOR_HOST` set (the embedded emulator or any other), the client talks to
    that emulator with the plane's storage key as its bearer token (`key`, else env
    MODELPLANE_STORAGE_KEY, else `state_dir`'s storage-key file; anonymous when there is none,
    as google-cloud-storage defines it); without it, application default credentials and the real GCS.
    """
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from adapters.storage import STORAGE_KEY_ENV, emulator_credentials

        if not key and not os.environ.get(STORAGE_KEY_ENV) and state_dir is not None:
            try:
                key = key_path(state_dir).read_text(encoding="utf-8").strip() or None
            except OSError:
                key = None
        return storage.Client(project=project or "modelplane", credentials=emulator_credentials(key))
    return storage.Client(project=project)


def split_gs_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/a/b.csv` -> (`bucket`, `a/b.csv`)."""
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, name = uri[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, name


def ensure_bucket(client, name: str) -> None:
    """Create `name` if it does not exist (the emulator starts with only its default bucket)."""
    from google.api_core import exceptions

    try:
        client.get_bucket(name)
    except exceptions.NotFound:
        try:
            client.create_bucket(name)
        except exceptions.Conflict:
            pass
