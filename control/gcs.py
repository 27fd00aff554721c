"""The control plane's google-cloud-storage client: the emulator when `STORAGE_EMULATOR_HOST` is set, real GCS otherwise."""
from __future__ import annotations

import os
from typing import Optional


def storage_client(project: Optional[str] = None):
    """A `google.cloud.storage.Client`.

    With `STORAGE_EMULATOR_HOST` set (the embedded emulator or any other), the client talks
    to that emulator with anonymous credentials, as google-cloud-storage defines it; without
    it, application default credentials and the real GCS.
    """
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "modelplane", credentials=AnonymousCredentials())
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
