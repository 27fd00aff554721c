"""Uploads a dataset straight into the bucket with google-cloud-storage, as a producer outside the plane would."""
from __future__ import annotations

import os

from control.gcs import ensure_bucket, storage_client

_client = None


def upload(model: str, filename: str, data: bytes, *, bucket: str | None = None) -> str:
    """Write `data` to `gs://{bucket}/incoming/{model}/{filename}`; the bucket event starts the job."""
    global _client
    if _client is None:
        _client = storage_client()
    bucket = bucket or os.environ.get("MODELPLANE_BUCKET") or "modelplane"
    ensure_bucket(_client, bucket)
    blob = _client.bucket(bucket).blob(f"incoming/{model}/{filename}")
    blob.upload_from_string(data, content_type="text/csv")
    return f"gs://{bucket}/{blob.name}"
