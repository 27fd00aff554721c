"""Model archives as an attacker would send them, unpacked by control/uploads.py and through
`POST /api/models`: each is a 4xx naming the member, and nothing lands outside the folder."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from control.errors import BadRequest, Invalid, TooLarge
from control.uploads import extract_model
from control_fake_runtime import FakeRuntime
from control_helpers import FIXTURES, api, running, settings_for

GZ = {"Content-Type": "application/gzip"}


def archive(*members: tuple[str, bytes | None], fmt=tarfile.PAX_FORMAT) -> bytes:
    """A gzip tar of (name, content) members; content None makes a folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


MANIFEST = (FIXTURES / "echo-rt" / "model.yaml").read_bytes()
MODEL_PY = (FIXTURES / "echo-rt" / "model.py").read_bytes()
SAMPLE = (FIXTURES / "echo-rt" / "sample.csv").read_bytes()


def gzip_bomb(size: int) -> bytes:
    """A model folder with one file of `size` zero bytes: compresses about 1000:1."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in (("model.yaml", MANIFEST), ("model.py", MODEL_PY), ("sample.csv", SAMPLE)):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        info = tarfile.TarInfo("weights.bin")
        info.size = size

        class Zeros(io.RawIOBase):
            left = size

            def readable(self):
                return True

            def readinto(self, b):
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros()))
    return buf.getvalue()


def extract(body: bytes, dest: Path, **caps) -> Path:
    return extract_model(io.BytesIO(body), dest, **{"max_size": 1 << 20, "max_files": 50, **caps})


def test_a_good_archive_unpacks(tmp_path):
    folder = extract(archive(("m/model.yaml", MANIFEST), ("m/model.py", MODEL_PY)), tmp_path)
    assert folder == tmp_path / "m" and (folder / "model.py").read_bytes() == MODEL_PY


def test_the_unpacked_size_is_counted_not_trusted(tmp_path):
    bomb = gzip_bomb(64 * 2**20)
    assert len(bomb) < 100 * 1024  # tiny on the wire
    with pytest.raises(TooLarge, match="weights.bin"):
        extract(bomb, tmp_path, max_size=8 * 2**20)
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= 8 * 2**20 + (1 << 20)


def test_the_member_count_is_capped(tmp_path):
    members = [("model.yaml", MANIFEST)] + [(f"f{i}.txt", b"x") for i in range(100)]
    with pytest.raises(TooLarge, match="more than 50 members"):
        extract(archive(*members), tmp_path)


@pytest.mark.parametrize("members,needle", [
    ([("a", b"x"), ("a/model.yaml", MANIFEST)], "is a file in this archive"),
    ([("a/model.yaml", MANIFEST), ("a", b"x")], "both a file and a folder"),
    ([("x" * 300 + "/model.yaml", MANIFEST)], "too long"),
    ([("../model.yaml", MANIFEST)], "inside the folder"),
    ([("/etc/model.yaml", MANIFEST)], "inside the folder"),
])
def test_hostile_member_names_are_refused_by_name(tmp_path, members, needle):
    with pytest.raises(BadRequest, match=needle):
        extract(archive(*members), tmp_path / "dest")
    assert not (tmp_path / "model.yaml").exists() and not (tmp_path.parent / "model.yaml").exists()


def test_links_are_skipped_and_what_is_not_a_tar_is_400(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("model.yaml")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(Invalid):
        extract(buf.getvalue(), tmp_path / "d")
    assert not (tmp_path / "d" / "model.yaml").exists()
    with pytest.raises(BadRequest, match="gzip tar"):
        extract(b"hello", tmp_path / "e")
    with pytest.raises(BadRequest):
        extract(gzip.compress(b"not a tar at all" * 100), tmp_path / "f")


# -- through the API ---------------------------------------------------------------------------------

@pytest.fixture
def plane(tmp_path):
    settings = settings_for(tmp_path, max_model_size=4 * 2**20, max_model_files=100)
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        yield server, runtime


def test_the_api_refuses_hostile_archives_with_4xx(plane):
    server, runtime = plane
    cases = [
        (gzip_bomb(64 * 2**20), 413, "MODELPLANE_MAX_MODEL_SIZE"),
        (archive(*[("model.yaml", MANIFEST)] + [(f"f{i}", b"") for i in range(200)]), 413, "members"),
        (archive(("a", b"x"), ("a/model.yaml", MANIFEST)), 400, "is a file"),
        (archive(("n" * 300 + "/model.yaml", MANIFEST)), 400, "too long"),
        (archive(("model.yaml", MANIFEST.replace(b"description: A tiny", b"description: caf\xe9 tiny"))), 422,
         "not UTF-8"),
    ]
    for body, status, needle in cases:
        r = api.post(f"{server.url}/api/models", data=body, headers=GZ)
        assert r.status_code == status and needle in r.json()["error"], (status, r.text[:300])
        assert "/tmp" not in r.text and "Traceback" not in r.text
    assert runtime.manifests == {}
    assert list((Path(server.settings.state_dir) / "uploads").iterdir()) == []  # nothing kept


def test_the_api_answers_a_yaml_bomb_small_and_fast(plane):
    server, runtime = plane
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = MANIFEST + ("\n".join(levels) + "\n").encode()
    started = time.monotonic()
    r = api.post(f"{server.url}/api/models", data=archive(("model.yaml", bomb), ("model.py", MODEL_PY)), headers=GZ)
    took = time.monotonic() - started
    assert r.status_code == 422 and "10,000 nodes" in r.json()["error"]
    assert len(r.content) < 2000, len(r.content)
    print(f"YAML bomb refused in {took * 1000:.0f} ms")  # a figure, not an assertion
    dup = MANIFEST + b"version: 2.0.0\n"
    r = api.post(f"{server.url}/api/models", data=archive(("model.yaml", dup), ("model.py", MODEL_PY),
                                                          ("sample.csv", SAMPLE)), headers=GZ)
    assert r.status_code == 422 and "duplicate key 'version'" in r.json()["error"]
    assert r.json()["problems"][0]["file"] == "model.yaml"


# -- extended headers (pax `x`/`g`, GNU `L`/`K`): judged before tarfile parses them ------------------

def _header(name: str, typeflag: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = typeflag
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _member(name: str, content: bytes) -> bytes:
    return _header(name, tarfile.REGTYPE, len(content)) + _pad(content)


def _pax_record(key: str, value: bytes) -> bytes:
    body = f" {key}=".encode() + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _raw_archive(*blocks: bytes) -> bytes:
    return gzip.compress(b"".join(blocks) + bytes(1024), 6)


def _rss(field: str = "VmRSS") -> int:
    """This process's resident memory (the service runs in it); VmHWM: its peak since `_reset_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


@pytest.mark.parametrize("blocks,needle", [
    # 150,000 digits: the quadratic regex of CVE-2024-6232 (seconds of held GIL on an unpatched Python)
    ([_header("././@PaxHeader", b"x", 150_000), _pad(b"9" * 150_000)], "pax header"),
    ([_header("././@PaxHeader", b"g", 100_000), _pad(b"1" * 100_000)], "pax header"),
    ([_header("././@LongLink", b"L", 1 << 20), _pad(b"a" * (1 << 20))], "long-name header"),
    ([_header("././@LongLink", b"K", 200_000), _pad(b"a" * 200_000)], "long-name header"),
    # small, but not `<length> <key>=<value>\n`
    ([_header("././@PaxHeader", b"x", 20), _pad(b"9" * 20)], "malformed pax record"),
    ([_header("././@PaxHeader", b"x", 20), _pad(b"99 path=model.yaml\n")], "malformed pax record"),
    ([_header("././@PaxHeader", b"x", 3000), _pad(_pax_record("comment", b"7" * 2980))], "digits"),
])
def test_hostile_extended_headers_are_refused_before_tarfile_reads_them(tmp_path, blocks, needle):
    body = _raw_archive(*blocks, _member("model.yaml", MANIFEST))
    started = time.monotonic()
    with pytest.raises((BadRequest, TooLarge), match=needle):
        extract(body, tmp_path / "d")
    assert time.monotonic() - started < 2.0


def test_an_archive_cut_short_is_refused_even_past_its_end_marker(tmp_path):
    body = archive(("model.yaml", MANIFEST), ("model.py", MODEL_PY))
    with pytest.raises(BadRequest, match="truncated"):
        extract(body[:-6], tmp_path / "cut")   # the gzip trailer (checksum, length) never came
    with pytest.raises(BadRequest, match="damaged"):
        extract(body[:-8] + b"\0" * 8, tmp_path / "crc")


def test_legitimate_pax_and_gnu_names_still_unpack(tmp_path):
    long = "m/" + "d" * 150 + ".txt"   # over ustar's 100 bytes: a pax `path` record, or a GNU `L` header
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        dest = tmp_path / str(fmt)
        folder = extract(archive(("m/model.yaml", MANIFEST), (long, b"x"), ("m/caf\u00e9.py", MODEL_PY), fmt=fmt), dest)
        assert folder == dest / "m" and (dest / long).read_bytes() == b"x"
        assert (folder / "caf\u00e9.py").read_bytes() == MODEL_PY
    # a pax `size` record overrides the member's ustar size: the stream is still followed right
    body = _raw_archive(_header("././@PaxHeader", b"x", len(_pax_record("size", b"5"))),
                        _pad(_pax_record("size", b"5")), _header("a.txt", tarfile.REGTYPE, 0), _pad(b"hello"),
                        _member("model.yaml", MANIFEST))
    folder = extract(body, tmp_path / "size")
    assert (folder / "a.txt").read_bytes() == b"hello" and (folder / "model.yaml").read_bytes() == MANIFEST


def test_a_pax_digit_flood_never_freezes_the_service(plane):
    """CVE-2024-6232: a 300-byte upload whose pax header is 150,000 digits held the GIL for
    seconds in tarfile's regex, and every route (/healthz too) stalled behind it."""
    server, runtime = plane
    body = _raw_archive(_header("././@PaxHeader", b"x", 150_000), _pad(b"9" * 150_000),
                        _member("model.yaml", MANIFEST))
    assert len(body) < 2048
    import threading

    answer = {}

    def upload():
        answer["r"] = api.post(f"{server.url}/api/models", data=body, headers=GZ, timeout=300)

    # the client runs in the service's process: a held GIL stalls it too, so what is measured
    # is the longest gap between two /healthz answers, whoever was kept waiting
    worst = 0.0
    thread = threading.Thread(target=upload)
    thread.start()
    deadline = last = time.monotonic()
    deadline += 120
    while thread.is_alive() and time.monotonic() < deadline:
        assert api.get(f"{server.url}/healthz", timeout=60).status_code == 200
        now = time.monotonic()
        worst, last = max(worst, now - last), now
        time.sleep(0.02)
    thread.join(300)
    assert worst < 2.0, f"/healthz was not answered for {worst:.1f} s during the upload"
    r = answer["r"]
    assert r.status_code in (400, 413) and "pax header" in r.json()["error"], r.text[:300]
    assert runtime.manifests == {}


def test_a_huge_pax_record_is_refused_without_memory(plane):
    """A 512 MiB `path=` record from a ~500 KiB gzip: refused at its header, never read."""
    server, runtime = plane
    size = 512 * 2**20
    prefix = f"{size} path=".encode()
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(_header("././@PaxHeader", b"x", size)), z.compress(prefix)]
    left = size - len(prefix) - 1
    chunk = b"a" * (1 << 20)
    while left > 0:
        parts.append(z.compress(chunk[:min(left, len(chunk))]))
        left -= len(chunk)
    parts.append(z.compress(b"\n" + _member("model.yaml", MANIFEST) + bytes(1024)))
    parts.append(z.flush())
    body = b"".join(parts)
    assert len(body) < 2 * 2**20
    before = _rss()
    _reset_peak()
    r = api.post(f"{server.url}/api/models", data=body, headers=GZ, timeout=120)
    grown = _rss("VmHWM") - before
    assert grown < 64 * 2**20, f"the peak RSS grew {grown / 2**20:.0f} MiB"
    assert r.status_code in (400, 413) and "pax header" in r.json()["error"], r.text[:300]
    assert runtime.manifests == {}


# -- what interrupted uploads leave behind --------------------------------------------------------

def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_interrupted_deploys_are_cleaned_when_the_service_starts(tmp_path):
    """A SIGKILL mid-deploy leaves `state/uploads/model-*` (the folder being unpacked)."""
    from control import statelock

    settings = settings_for(tmp_path)
    uploads = Path(settings.state_dir) / "uploads"
    (uploads / "model-killed" / "m").mkdir(parents=True)
    (uploads / "model-killed" / "m" / "weights.bin").write_bytes(b"\0" * 4096)
    _age(uploads / "model-killed", 2 * 3600)
    (uploads / "tmpk1ll3d").write_bytes(b"spool")
    _age(uploads / "tmpk1ll3d", 2 * 3600)
    (uploads / "model-inflight").mkdir()          # just made: maybe another service's deploy
    with running(settings, runtime=FakeRuntime()):
        assert sorted(p.name for p in uploads.iterdir()) == ["model-inflight"]
    statelock.acquire(settings.state_dir)          # this service owns the state dir: no deploy is in flight
    try:
        with running(settings, runtime=FakeRuntime()):
            assert list(uploads.iterdir()) == []
    finally:
        statelock.release(settings.state_dir)


def test_stale_resumable_partials_expire_and_fresh_ones_survive_a_restart(tmp_path):
    """A dataset upload to the embedded bucket killed mid-way leaves a resumable session and its
    partial bytes in the emulator's data: kept while a client may resume it, gone after a day."""
    import requests as plain
    from google.cloud import storage

    from adapters.storage import emulator_credentials
    from control.emulator import Emulator

    data = tmp_path / "gcs"
    chunk = b"x" * (256 * 1024)
    key = "the-plane-s-storage-key"
    auth = {"Authorization": f"Bearer {key}"}
    emu = Emulator(data, bucket="b", key=key).start()
    try:
        client = storage.Client(project="t", credentials=emulator_credentials(key),
                                client_options={"api_endpoint": emu.endpoint})
        sessions = {}
        for name in ("old.csv", "fresh.csv"):
            url = client.bucket("b").blob(f"incoming/m/{name}").create_resumable_upload_session()
            r = plain.put(url, data=chunk, headers={**auth, "Content-Range": f"bytes 0-{len(chunk) - 1}/*"}, timeout=30)
            assert r.status_code == 308, r.text[:200]
            sessions[name] = url
    finally:
        emu.stop()
    meta = json.loads((data / ".cloudstorage" / ".meta").read_text())
    for file_id in meta["resumable"]:
        if "old.csv" in file_id:
            _age(data / ".cloudstorage" / "_resumable" / hashlib.sha256(file_id.encode()).hexdigest(), 2 * 86400)
    emu = Emulator(data, bucket="b", key=key).start()
    try:
        meta = json.loads((data / ".cloudstorage" / ".meta").read_text())
        assert [i for i in meta["resumable"] if "old.csv" in i] == []
        assert len([i for i in meta["resumable"] if "fresh.csv" in i]) == 1
        assert len(list((data / ".cloudstorage" / "_resumable").iterdir())) == 1
        # the fresh one is resumed where it stopped, on the restarted emulator
        url = sessions["fresh.csv"].replace(sessions["fresh.csv"].split("/upload/")[0], emu.endpoint)
        end = len(chunk) + 3
        r = plain.put(url, data=b"abc", headers={**auth, "Content-Range": f"bytes {len(chunk)}-{end - 1}/{end}"}, timeout=30)
        assert r.status_code in (200, 201), r.text[:200]
        client = storage.Client(project="t", credentials=emulator_credentials(key),
                                client_options={"api_endpoint": emu.endpoint})
        assert client.bucket("b").blob("incoming/m/fresh.csv").download_as_bytes() == chunk + b"abc"
    finally:
        emu.stop()
