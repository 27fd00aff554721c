"""Unpacking a model folder sent to `POST /api/models`: a (gzip) tar, bounded in every way.

The archive comes from anyone holding the token, so nothing in it is trusted: member names
stay inside the folder, the bytes written are counted (not the sizes the headers claim), the
member count is capped, links and devices are skipped, and a name that is both a file and a
folder is refused. Every error names the member at fault.

Extended headers (pax `x`/`g`, GNU long names `L`/`K`) are judged before `tarfile` parses them,
whatever the interpreter's patch level: `_TarGuard` reads the decompressed stream for `tarfile`,
follows the archive's 512-byte blocks and refuses an extended header over `MAX_EXTENDED` bytes,
a pax record that is not `<length> <key>=<value>\n`, a run of digits long enough to make
tarfile's regexes quadratic (CVE-2024-6232: 150,000 digits held the GIL for 24 s), sparse
members, and an unpacked stream past the model size cap (headers and padding included).
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import tarfile
import time
import zlib
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Optional

from adapters.manifest import MANIFEST_FILE
from control.errors import BadRequest, Invalid, TooLarge

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
CHUNK = 1 << 20
#: Largest extended header (a pax `x`/`g` header's records, a GNU long name or link) accepted.
MAX_EXTENDED = 64 * 2**10
#: Longest run of ASCII digits a pax header may hold (tarfile's regexes are quadratic in it).
MAX_DIGITS = 64
BLOCK = 512
_EXTENDED = {b"x": "pax header", b"g": "global pax header", b"L": "GNU long-name header",
             b"K": "GNU long-name header (link)"}
#: Types whose data blocks follow their header, as tarfile reads them (it skips the size of a
#: regular file or an unknown type; links, folders, devices and fifos have no data).
_KNOWN_NO_DATA = {b"1", b"2", b"3", b"4", b"5", b"6"}
_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_DIGITS + 1))
NOT_A_TAR = "expected a gzip tar of a model folder (what `modelplane deploy DIR` sends)"


def _number(field: bytes) -> Optional[int]:
    """A header's numeric field (octal, or GNU base-256), as tarfile reads it; None if invalid."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        return None  # negative
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def _pax_records(data: bytes, kind: str) -> dict[bytes, bytes]:
    """The records of a pax header, each `<length> <key>=<value>\n` with the length right."""
    if _DIGIT_RUN.search(data):
        raise BadRequest(f"the archive's {kind} holds a run of more than {MAX_DIGITS} digits; refused "
                         "(it would stall the unpacker)")
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 12)
        length = data[pos:space] if space > pos else b""
        n = int(length) if length.isdigit() else 0
        end = pos + n
        eq = data.find(b"=", space + 1, end)
        if not n or end > len(data) or data[end - 1:end] != b"\n" or eq <= space + 1:
            raise BadRequest(f"the archive's {kind} holds a malformed pax record at byte {pos} (each record "
                             "must be '<length> <key>=<value>\\n', its length counting the whole record)")
        records[data[space + 1:eq]] = data[eq + 1:end - 1]
        pos = end
    return records


class _TarGuard:
    """The decompressed archive as `tarfile` reads it, judged block by block on the way."""

    def __init__(self, src: BinaryIO, *, max_size: int, max_files: int):
        self.src = src
        self.cap = max_size + (max_files + 2) * 2 * BLOCK + 20 * BLOCK  # files, headers, padding
        self.max_size = max_size
        self.total = 0           # decompressed bytes read
        self.extended = 0        # bytes of extended headers (blocks), counted against max_size
        self.offset = 0          # where in the tar stream the next byte read is
        self._header = bytearray()
        self._skip = 0           # data bytes (block-padded) before the next header
        self._collect: Optional[bytearray] = None
        self._collect_left = 0
        self._kind = ""
        self._pax_size: Optional[int] = None   # a pending pax `size` for the next member
        self._pax_pending = False

    def _read(self, size: int) -> bytes:
        try:
            data = self.src.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise BadRequest(f"the archive is damaged or truncated after {self.total:,} bytes unpacked: {e}") from None
        self.total += len(data)
        if self.total > self.cap:
            raise TooLarge(f"the archive is over {self.max_size:,} bytes unpacked (MODELPLANE_MAX_MODEL_SIZE)")
        return data

    def read(self, size: int = -1) -> bytes:
        data = self._read(size if size is not None and size >= 0 else CHUNK)
        self._scan(data)
        return data

    def drain(self) -> None:
        """Read what follows the end of the archive (padding) to the end of the compressed
        stream, so that a stream cut short (its checksum and length never sent) is refused."""
        while self._read(CHUNK):
            pass

    def _scan(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                if self._collect is not None and self._collect_left:
                    keep = min(take, self._collect_left)
                    self._collect += data[pos:pos + keep]
                    self._collect_left -= keep
                pos += take
                self._skip -= take
                self.offset += take
                if not self._skip and self._collect is not None:
                    self._extended_done(bytes(self._collect))
                    self._collect = None
                continue
            take = min(BLOCK - len(self._header), n - pos)
            self._header += data[pos:pos + take]
            pos += take
            if len(self._header) == BLOCK:
                block = bytes(self._header)
                self._header.clear()
                self._block(block)
                self.offset += BLOCK

    def _block(self, block: bytes) -> None:
        if block.count(0) == BLOCK:
            return   # the end-of-archive marker (or padding after it)
        checksum = _number(block[148:156])
        if checksum is None or checksum not in (sum(block[:148]) + 256 + sum(block[156:]),
                                                sum(b - 256 if b > 127 else b for b in block[:148]) + 256
                                                + sum(b - 256 if b > 127 else b for b in block[156:])):
            if self.offset == 0:
                raise BadRequest(f"{NOT_A_TAR}: not a tar archive")
            raise BadRequest(f"the archive is damaged: the header at byte {self.offset:,} has a wrong checksum")
        kind = block[156:157]
        size = _number(block[124:136])
        if size is None:
            raise BadRequest(f"the archive is damaged: the header at byte {self.offset:,} has an invalid size")
        if kind in _EXTENDED:
            what = _EXTENDED[kind]
            if size > MAX_EXTENDED:
                raise TooLarge(f"the archive's {what} at byte {self.offset:,} is {size:,} bytes; at most "
                               f"{MAX_EXTENDED:,} are accepted")
            if kind == b"x":
                if self._pax_pending:
                    raise BadRequest(f"the archive has two pax headers for one member (at byte {self.offset:,})")
                self._pax_pending = True
            padded = -(-size // BLOCK) * BLOCK
            self.extended += BLOCK + padded
            if self.extended > self.max_size:
                raise TooLarge(f"the archive's extended headers are over {self.max_size:,} bytes "
                               "(MODELPLANE_MAX_MODEL_SIZE)")
            self._skip = padded
            if kind in (b"x", b"g"):
                self._collect, self._collect_left, self._kind = bytearray(), size, what
                if not size:
                    self._collect = None
            return
        if kind == b"S":
            raise BadRequest(f"the archive holds a sparse member (at byte {self.offset:,}); a model folder needs none")
        if self._pax_size is not None:
            size = self._pax_size
        self._pax_size, self._pax_pending = None, False
        if kind not in _KNOWN_NO_DATA:
            self._skip = -(-size // BLOCK) * BLOCK

    def _extended_done(self, data: bytes) -> None:
        records = _pax_records(data, self._kind)
        if any(key.startswith(b"GNU.sparse.") for key in records):
            raise BadRequest("the archive holds a sparse member (GNU.sparse pax records); a model folder needs none")
        if b"size" in records:
            value = records[b"size"]
            if self._kind != "pax header" or not value.isdigit() or len(value) > 20:
                raise BadRequest(f"the archive's {self._kind} has an invalid size record {value[:40]!r}")
            self._pax_size = int(value)


def _decompressed(spool: BinaryIO) -> BinaryIO:
    """The tar stream inside `spool`: gzip (what the CLI sends), bzip2, xz or a plain tar."""
    magic = spool.read(6)
    spool.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=spool, mode="rb")
    if magic[:3] == b"BZh":
        return bz2.BZ2File(spool)
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(spool)
    return spool


def _member_path(member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name
    shown = repr(name[:200])
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_NAME_BYTES or any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES
                                        for p in name.split("/")):
        raise BadRequest(f"archive member {shown}: the name is too long "
                         f"(at most {MAX_COMPONENT_BYTES} bytes per part, {MAX_NAME_BYTES} in all)")
    if "\0" in name:
        raise BadRequest(f"archive member {shown}: the name holds a NUL byte")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise BadRequest(f"refusing archive member {name[:200]!r}: paths must stay inside the folder")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"archive member {shown}: the name is not UTF-8") from None
    return path


def extract_model(fileobj: BinaryIO, dest: Path, *, max_size: int, max_files: int) -> Path:
    """Unpack a (gzip) tar of one model folder from `fileobj` into `dest`; returns the folder
    holding model.yaml (the top, or the one top-level folder).

    Raises BadRequest (not an archive, a bad member), TooLarge (over `max_size` bytes written
    or `max_files` members) or Invalid (no model.yaml). The caller removes `dest` on failure.
    """
    dest = Path(dest)
    guard = _TarGuard(_decompressed(fileobj), max_size=max_size, max_files=max_files)
    try:
        tar = tarfile.open(fileobj=guard, mode="r|")  # type: ignore[call-overload]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BadRequest(f"{NOT_A_TAR}: {e}") from None
    written = 0
    count = 0
    kinds: dict[PurePosixPath, str] = {}  # what each path in the archive is: "file" or "dir"
    try:
        with tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, OSError) as e:
                    raise BadRequest(f"the archive is damaged after {count} member(s): {e}") from None
                if member is None:
                    break
                count += 1
                if count > max_files:
                    raise TooLarge(f"the archive holds more than {max_files:,} members (MODELPLANE_MAX_MODEL_FILES)")
                path = _member_path(member)
                if path == PurePosixPath("."):
                    continue
                if not (member.isdir() or member.isfile()):
                    continue  # links, devices and fifos: a model folder needs none
                kind = "dir" if member.isdir() else "file"
                for parent in list(path.parents)[:-1]:
                    if kinds.get(parent) == "file":
                        raise BadRequest(f"archive member {member.name[:200]!r}: {str(parent)!r} is a file in this "
                                         "archive, so it cannot also be a folder")
                    kinds[parent] = "dir"
                seen = kinds.get(path)
                if seen is not None and seen != kind:
                    raise BadRequest(f"archive member {member.name[:200]!r} is both a file and a folder")
                kinds[path] = kind
                target = dest.joinpath(*path.parts)
                if kind == "dir":
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    src = tar.extractfile(member)
                except (tarfile.TarError, EOFError, OSError) as e:
                    raise BadRequest(f"archive member {member.name[:200]!r} cannot be read: {e}") from None
                with src, open(target, "wb") as out:
                    while True:
                        try:
                            chunk = src.read(CHUNK)
                        except (tarfile.TarError, EOFError, OSError) as e:
                            raise BadRequest(f"archive member {member.name[:200]!r} is truncated: {e}") from None
                        if not chunk:
                            break
                        written += len(chunk)
                        if written + guard.extended > max_size:
                            raise TooLarge(f"the model folder is over {max_size:,} bytes unpacked (at "
                                           f"{member.name[:200]!r}; MODELPLANE_MAX_MODEL_SIZE)")
                        out.write(chunk)
                target.chmod(0o755 if member.mode & 0o111 else 0o644)
        guard.drain()
    except (tarfile.TarError, EOFError) as e:  # anything the reads above did not name
        raise BadRequest(f"the archive is damaged: {e}") from None
    if (dest / MANIFEST_FILE).is_file():
        return dest
    found = sorted(p.parent for p in dest.glob(f"*/{MANIFEST_FILE}") if p.is_file())
    if len(found) == 1:
        return found[0]
    raise Invalid(f"the archive has no {MANIFEST_FILE} at its top (or in one top-level folder)",
                  details={"problems": [{"file": MANIFEST_FILE, "line": None, "field": "",
                                         "message": "no model.yaml in the archive"}]})


# -- what interrupted uploads leave behind ------------------------------------------------------

#: How old a leftover in `{state_dir}/uploads` must be before a service that does not own the
#: state directory (no state lock: another service may be unpacking there) removes it.
UPLOAD_GRACE_S = 3600.0
#: A resumable upload to the embedded bucket that has not moved for this long is dropped when
#: the emulator next starts (GCS itself keeps a session a week; a client resuming after a day
#: starts again). Younger ones are kept: their client may still resume them after a restart.
RESUMABLE_EXPIRY_S = 24 * 3600.0


def clean_stale_uploads(uploads: Path, *, everything: bool, now: Optional[float] = None) -> int:
    """Remove what interrupted deploys left in `uploads` (`model-*` folders being unpacked,
    spools): all of it when this process owns the state directory (a fresh start has no
    upload in flight), else what is older than UPLOAD_GRACE_S. Returns how many went."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(Path(uploads).iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith("model-") or entry.name.startswith("tmp")):
            continue
        try:
            if not everything and now - entry.lstat().st_mtime < UPLOAD_GRACE_S:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except OSError as e:
            log.warning("could not remove the interrupted upload %s: %s", entry, e)
    if removed:
        log.info("removed %d interrupted upload(s) from %s", removed, uploads)
    return removed


_SESSION_CREATED = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)$")


def expire_resumable(data_dir: Path, *, max_age: float = RESUMABLE_EXPIRY_S, now: Optional[float] = None) -> int:
    """Drop the embedded emulator's resumable uploads (under `data_dir`, the emulator stopped)
    that have not moved for `max_age` seconds: their partial bytes and their session. A
    session's age is its partial file's last write, else its creation. Returns how many went."""
    now = time.time() if now is None else now
    root = Path(data_dir) / os.environ.get("STORAGE_DIR", ".cloudstorage")
    meta_path, partials = root / ".meta", root / "_resumable"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        meta = None
    except (OSError, ValueError) as e:
        log.warning("cannot read the emulator's %s: %s; its resumable uploads are left alone", meta_path, e)
        return 0
    sessions = (meta or {}).get("resumable") or {}
    expired, live = [], set()
    for file_id in list(sessions):
        partial = partials / hashlib.sha256(file_id.encode("utf-8")).hexdigest()
        try:
            moved = partial.stat().st_mtime
        except OSError:
            match = _SESSION_CREATED.search(file_id)
            try:
                moved = datetime.fromisoformat(match.group(1)).timestamp() if match else now
            except ValueError:
                moved = now
        if now - moved > max_age:
            expired.append(file_id)
        else:
            live.add(partial.name)
    for file_id in expired:
        del sessions[file_id]
        (partials / hashlib.sha256(file_id.encode("utf-8")).hexdigest()).unlink(missing_ok=True)
    orphans = 0
    if partials.is_dir():   # partial bytes whose session is gone, once as old as an expired one
        for partial in partials.iterdir():
            try:
                if partial.name not in live and now - partial.stat().st_mtime > max_age:
                    partial.unlink()
                    orphans += 1
            except OSError:
                pass
    if expired:
        tmp = meta_path.with_name(".meta.modelplane-tmp")
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.replace(tmp, meta_path)
    if expired or orphans:
        log.info("dropped %d resumable upload(s) idle for over %.0f h from the embedded bucket",
                 len(expired) + orphans, max_age / 3600)
    return len(expired) + orphans
