"""The embedded bucket answers only the plane: a real emulator (control/emulator.py) on loopback,
attacked with raw HTTP the way a web page or another user on the machine would."""
from __future__ import annotations

import http.client
import json
import stat
import uuid
from urllib.parse import quote, urlparse

import pytest

from control.emulator import Emulator


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    emu = Emulator(tmp_path_factory.mktemp("guarded-gcs"), bucket="guarded").start()
    try:
        yield emu
    finally:
        emu.stop()


def send(emu: Emulator, method: str, path: str, *, body: bytes = b"", headers: dict | None = None):
    """One raw request, Host and all headers exactly as given (no client adds or fixes any)."""
    u = urlparse(emu.endpoint)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in {"Host": f"127.0.0.1:{u.port}", **(headers or {})}.items():
            if v is not None:
                conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def upload_path(bucket: str, name: str) -> str:
    return f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(name, safe='')}"


def stored(emu: Emulator, name: str) -> bool:
    status, _ = send(emu, "GET", f"/storage/v1/b/{emu.bucket}/o/{quote(name, safe='')}",
                     headers={"Authorization": f"Bearer {getattr(emu, 'key', '')}"})
    return status == 200


def test_a_cross_site_text_plain_post_with_a_foreign_host_stores_nothing(bucket):
    """What a page on evil.example (DNS-rebound to 127.0.0.1) sends with fetch(..., {mode: 'no-cors'})."""
    name = f"incoming/churn-risk/{uuid.uuid4().hex}.csv"
    port = urlparse(bucket.endpoint).port
    status, body = send(bucket, "POST", upload_path(bucket.bucket, name), body=b"x\n1\n",
                        headers={"Host": f"evil.example:{port}", "Origin": "http://evil.example",
                                 "Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"})
    assert status == 403, body
    assert b"Host 'evil.example:" in body
    assert not stored(bucket, name)


@pytest.mark.parametrize("headers,status,says", [
    ({"Host": "rebind.example"}, 403, b"Host 'rebind.example' refused"),
    ({"Origin": "http://127.0.0.1:9"}, 403, b"Origin"),
    ({"Sec-Fetch-Site": "same-site"}, 403, b"Sec-Fetch-Site"),
    ({"Authorization": None}, 403, b"needs Authorization: Bearer <storage key>"),
    ({"Authorization": "Bearer not-the-key"}, 403, b"wrong storage key"),
    ({"Authorization": "Basic dXNlcjpwdw=="}, 403, b"needs Authorization: Bearer"),
], ids=["foreign-host", "origin", "same-site", "no-key", "wrong-key", "not-bearer"])
def test_refused_requests_say_why_and_store_nothing(bucket, headers, status, says):
    name = f"incoming/churn-risk/{uuid.uuid4().hex}.csv"
    given = {"Authorization": f"Bearer {bucket.key}", "Content-Type": "text/csv", **headers}
    got, body = send(bucket, "POST", upload_path(bucket.bucket, name), body=b"x\n1\n", headers=given)
    assert got == status, body
    assert says in body, body
    assert not stored(bucket, name)


def test_listing_and_reading_need_the_key(bucket):
    name = f"results/churn-risk/{uuid.uuid4().hex}/scores.csv"
    ok, _ = send(bucket, "POST", upload_path(bucket.bucket, name), body=b"score\n0.5\n",
                 headers={"Authorization": f"Bearer {bucket.key}", "Content-Type": "text/csv"})
    assert ok == 200
    for path in (f"/storage/v1/b/{bucket.bucket}/o?prefix=results/", "/storage/v1/b",
                 f"/download/storage/v1/b/{bucket.bucket}/o/{quote(name, safe='')}?alt=media",
                 f"/{bucket.bucket}/{name}"):
        status, body = send(bucket, "GET", path)
        assert status == 403, (path, body)
        assert b"0.5" not in body and b"scores.csv" not in body
    status, body = send(bucket, "GET", f"/storage/v1/b/{bucket.bucket}/o?prefix=results/",
                        headers={"Authorization": f"Bearer {bucket.key}"})
    assert status == 200 and name in [i["name"] for i in json.loads(body)["items"]]


def test_localhost_and_ip_literals_are_the_names_it_answers_to(bucket):
    port = urlparse(bucket.endpoint).port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}"):
        status, body = send(bucket, "GET", f"/storage/v1/b/{bucket.bucket}/o",
                            headers={"Host": host, "Authorization": f"Bearer {bucket.key}"})
        assert status == 200, (host, body)


def test_the_google_client_with_the_key_works_and_without_it_is_refused(bucket, monkeypatch):
    from google.api_core import exceptions
    from google.cloud import storage

    from adapters.storage import emulator_credentials

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", bucket.endpoint)
    keyed = storage.Client(project="test", credentials=emulator_credentials(bucket.key))
    name = f"incoming/churn-risk/{uuid.uuid4().hex}.csv"
    keyed.bucket(bucket.bucket).blob(name).upload_from_string("x\n1\n", content_type="text/csv")
    assert name in [b.name for b in keyed.list_blobs(bucket.bucket, prefix="incoming/")]
    anonymous = storage.Client(project="test", credentials=emulator_credentials(""))
    with pytest.raises(exceptions.Forbidden, match="needs Authorization: Bearer <storage key>"):
        list(anonymous.list_blobs(bucket.bucket, prefix="incoming/", retry=None))


def test_the_storage_key_is_made_once_and_kept_private(tmp_path):
    from control.gcs import key_path, storage_key

    key = storage_key(tmp_path / "state")
    assert len(key) >= 32 and storage_key(tmp_path / "state") == key
    assert stat.S_IMODE(key_path(tmp_path / "state").stat().st_mode) == 0o600


def test_the_emulators_data_is_the_owners_alone(tmp_path, monkeypatch):
    """Data left 0755/0644 by an older plane is made private at start; what it stores is 0600/0700."""
    from google.cloud import storage

    from adapters.storage import emulator_credentials

    data = tmp_path / "gcs"
    (data / "old").mkdir(parents=True, mode=0o755)
    (data / "old" / "dataset.csv").write_text("x\n1\n")
    (data / "old" / "dataset.csv").chmod(0o644)
    data.chmod(0o755)
    with Emulator(data, bucket="private") as emu:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.endpoint)
        client = storage.Client(project="test", credentials=emulator_credentials(emu.key))
        client.bucket("private").blob("incoming/m/d.csv").upload_from_string("x\n1\n")
    loose = [f"{oct(stat.S_IMODE(p.stat().st_mode))} {p}" for p in [data, *data.rglob("*")]
             if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert loose == []


def test_listing_pages_and_keeps_only_the_fields_asked_for(bucket, monkeypatch):
    """As GCS lists: pages of at most maxResults objects with nextPageToken (the client follows
    them), and `fields=items(…)` answers only those fields of each object."""
    from google.cloud import storage

    from adapters.storage import emulator_credentials

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", bucket.endpoint)
    client = storage.Client(project="test", credentials=emulator_credentials(bucket.key))
    names = sorted(f"paged/{i:03d}.csv" for i in range(25))
    for name in names:
        client.bucket(bucket.bucket).blob(name).upload_from_string("x\n1\n")
    listing = client.list_blobs(bucket.bucket, prefix="paged/", page_size=10)
    pages = [[b.name for b in page] for page in listing.pages]
    assert [len(p) for p in pages] == [10, 10, 5] and sum(pages, []) == names
    status, body = send(bucket, "GET", f"/storage/v1/b/{bucket.bucket}/o?prefix=paged/&maxResults=3"
                                       "&fields=items(name,generation),nextPageToken",
                        headers={"Authorization": f"Bearer {bucket.key}"})
    doc = json.loads(body)
    assert status == 200 and [set(i) for i in doc["items"]] == [{"name", "generation"}] * 3 and doc["nextPageToken"]
