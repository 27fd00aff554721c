"""Writing state so that a crash (of the process or of the machine) leaves the old or the new
version of a file, never a mix and never nothing: write a temp file, fsync it, rename it into
place, fsync the directory."""
from __future__ import annotations

import json
import os
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new file) in `path` survive a crash of the machine, not just of us."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON: readers see the old file or the new one, never a mix;
    the file and then its directory are fsynced, so the new one is what a crash leaves."""
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, as `write_json_atomic` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def move_aside(path: Path) -> Path:
    """Rename an unreadable record to `{name}.corrupt-{time}` beside it (kept for a person to look at)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (a tree about to be renamed into place)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


PRIVATE_UMASK = 0o077


def make_private(root: Path) -> None:
    """Keep `root` the owner's alone: the process umask becomes 0o077 (what it and its children
    create is 0600/0700), and what already exists below `root` loses its group and other bits
    (folders 0700; files keep their owner bits, so a model's script stays executable).
    Symlinks are left alone; a path that vanishes meanwhile is skipped."""
    os.umask(PRIVATE_UMASK)
    private_tree(root)


def private_tree(root: Path) -> None:
    """Group and other bits off everything at and below `root` (folders 0700, files owner bits only)."""
    root = Path(root)
    for path in [root, *_walk(root)]:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_IMODE(st.st_mode) & 0o077:
            continue
        try:
            os.chmod(path, 0o700 if stat.S_ISDIR(st.st_mode) else stat.S_IMODE(st.st_mode) & 0o700)
        except OSError:
            pass


def _walk(root: Path):
    for folder, dirs, files in os.walk(root, onerror=lambda e: None):
        for name in (*dirs, *files):
            yield os.path.join(folder, name)
