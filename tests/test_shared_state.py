"""Nothing kept in the pod: the control service's records in a state store (control/state.py) that
every replica reads — a state dir's files locally, objects in the bucket on a cluster.

The bucket is the real GCS emulator (the `gcs` fixture) through the real google-cloud-storage
client; two "replicas" are two sets of the plane's parts, each with its own BucketState (its own
replica id) on the same bucket, as two control pods are.
"""
from __future__ import annotations

import uuid

import pytest
from google.api_core import exceptions as gexc

from control.state import ABSENT, BucketState, FileState, StateConflict


def bucket_state(gcs_client, prefix: str, **kw) -> BucketState:
    return BucketState(gcs_client.bucket("test-bucket"), prefix=prefix, **kw)


@pytest.fixture
def prefix():
    """Each test its own corner of the shared bucket."""
    return f"state-{uuid.uuid4().hex[:8]}/"


# -- the emulator honours preconditions, as GCS does ---------------------------------------------

def test_the_emulator_refuses_a_write_or_delete_whose_precondition_fails(gcs_client, prefix):
    bucket = gcs_client.bucket("test-bucket")
    blob = bucket.blob(prefix + "record")
    blob.upload_from_string(b"one", if_generation_match=0)            # create-only: there is none
    first = blob.generation
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "record").upload_from_string(b"two", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "record").upload_from_string(b"two", if_generation_match=first + 1)
    with pytest.raises(gexc.PreconditionFailed):                        # a large (resumable) upload too
        bucket.blob(prefix + "record").upload_from_string(b"x" * (9 * 2**20), if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "record").delete(if_generation_match=first + 1)
    assert bucket.blob(prefix + "record").download_as_bytes() == b"one"   # nothing refused was written
    again = bucket.blob(prefix + "record")
    again.upload_from_string(b"two", if_generation_match=first)        # the generation read: swapped
    assert again.generation != first
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(prefix + "record").upload_from_string(b"three", if_generation_not_match=again.generation)
    bucket.blob(prefix + "record").delete(if_generation_match=again.generation)
    assert bucket.get_blob(prefix + "record") is None


# -- the store, both implementations ------------------------------------------------------------

@pytest.fixture(params=["file", "bucket"])
def store(request, tmp_path, prefix):
    if request.param == "file":
        return FileState(tmp_path / "state")
    return bucket_state(request.getfixturevalue("gcs_client"), prefix)


def test_put_get_list_delete_and_compare_and_swap(store):
    assert store.get("comparisons/cmp-1.json") is None
    t1 = store.put_json("comparisons/cmp-1.json", {"status": "queued"}, expect=ABSENT)
    with pytest.raises(StateConflict):
        store.put_json("comparisons/cmp-1.json", {"status": "other"}, expect=ABSENT)
    doc, token = store.get_json("comparisons/cmp-1.json")
    assert doc == {"status": "queued"} and token == t1
    t2 = store.put_json("comparisons/cmp-1.json", {"status": "running"}, expect=t1)
    assert t2 != t1
    with pytest.raises(StateConflict):          # a writer holding the old token lost the race
        store.put_json("comparisons/cmp-1.json", {"status": "failed"}, expect=t1)
    assert store.get_json("comparisons/cmp-1.json")[0] == {"status": "running"}
    store.put("shadow/m/r1/0001.jsonl", b'{"a":1}\n')
    store.put("monitor/m/1.0.0.json", b"{}")
    assert store.list("comparisons/") == {"comparisons/cmp-1.json": t2}
    assert set(store.list()) == {"comparisons/cmp-1.json", "shadow/m/r1/0001.jsonl", "monitor/m/1.0.0.json"}
    scoped = store.scoped("shadow/")
    assert scoped.list("m/") == {"m/r1/0001.jsonl": store.list("shadow/")["shadow/m/r1/0001.jsonl"]}
    assert scoped.get("m/r1/0001.jsonl")[0] == b'{"a":1}\n'
    with pytest.raises(StateConflict):
        store.delete("comparisons/cmp-1.json", expect=t1)
    assert store.delete("comparisons/cmp-1.json", expect=t2) is True
    assert store.delete("comparisons/cmp-1.json") is False
    scoped.delete_prefix("m/")
    assert store.list("shadow/") == {}
    with pytest.raises(ValueError):
        store.get("../outside")


def test_a_state_dir_keeps_the_files_where_they_always_were(tmp_path):
    store = FileState(tmp_path / "state").scoped("comparisons/")
    store.put_json("cmp-0000000000000001.json", {"id": "cmp-0000000000000001"})
    path = tmp_path / "state" / "comparisons" / "cmp-0000000000000001.json"
    assert path.is_file() and '"id"' in path.read_text()
    tmp = path.parent / ".cmp-0000000000000002.json.abc.tmp"
    tmp.write_text("{")   # a write under way is no record
    assert list(store.list()) == ["cmp-0000000000000001.json"]
    tmp.unlink()
    store.delete("cmp-0000000000000001.json")
    assert not path.parent.exists()     # no empty folder left behind
