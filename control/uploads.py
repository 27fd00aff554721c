"""Unpacking a model folder sent to `POST /api/models`: a (gzip) tar, bounded in every way.

The archive comes from anyone holding the token, so nothing in it is trusted: member names
stay inside the folder, the bytes written are counted (not the sizes the headers claim), the
member count is capped, links and devices are skipped, and a name that is both a file and a
folder is refused. Every error names the member at fault.
"""
from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from adapters.manifest import MANIFEST_FILE
from control.errors import BadRequest, Invalid, TooLarge

MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
CHUNK = 1 << 20


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
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BadRequest(f"expected a gzip tar of a model folder (what `modelplane deploy DIR` sends): {e}") from None
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
                        if written > max_size:
                            raise TooLarge(f"the model folder is over {max_size:,} bytes unpacked (at "
                                           f"{member.name[:200]!r}; MODELPLANE_MAX_MODEL_SIZE)")
                        out.write(chunk)
                target.chmod(0o755 if member.mode & 0o111 else 0o644)
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
