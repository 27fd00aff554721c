"""One plane per state directory: an exclusive `flock` on `{state_dir}/lock`.

Taken before anything in the state directory is read or run (by `modelplane up` before its
emulator starts, by the local runtime before it loads a record), so a second service on the
same directory stops at once with one line naming the holder, instead of losing version
records and marking the first one's running jobs interrupted. The kernel drops the lock when
the holder dies, however it dies, so a SIGKILLed plane never leaves a stale lock behind.

Taking the lock also makes the directory private (control/durable.py `make_private`): umask
0o077 for the process and its children, group and other bits off what is already there.

Within one process the lock is re-entrant (`up` holds it, then its runtime takes it again).
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = "lock"

_held: dict[Path, list] = {}  # resolved state dir -> [fd, count]
_guard = threading.Lock()


class StateLocked(Exception):
    """Another process holds the state directory; the message names it."""


def _describe(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} ({holder['command'][:120]}), since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire(state_dir: Path | str) -> Path:
    """Take the state directory's lock (or count one more hold in this process)."""
    root = Path(state_dir).resolve()
    with _guard:
        if root in _held:
            _held[root][1] += 1
            return root
        root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(f"the state directory {root} is in use by {_describe(path)}; stop that plane "
                              "first, or give this one another --state-dir") from None
        holder = json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv) or sys.executable,
                             "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)
        _held[root] = [fd, 1]
        # Its holder keeps it private: tokens, keys, datasets, results and logs are the owner's alone.
        from control.durable import make_private

        make_private(root)
        return root


def held(state_dir: Path | str) -> bool:
    """Whether this process holds the state directory's lock."""
    with _guard:
        return Path(state_dir).resolve() in _held


def release(state_dir: Path | str) -> None:
    root = Path(state_dir).resolve()
    with _guard:
        entry = _held.get(root)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[root]
        try:
            os.ftruncate(entry[0], 0)
        except OSError:
            pass
        os.close(entry[0])  # closing the descriptor drops the flock
