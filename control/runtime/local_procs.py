"""Process helpers of the local runtime: stop a process group and whatever escaped it, read log tails.

Everything the local runtime starts is the leader of its own process group
(`start_new_session=True`). Stopping one means SIGTERM to the group, SIGKILL after a grace
period, and SIGKILL to every descendant seen before the stop (a model the adapter put in a
session of its own is not in the adapter's group).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

KILL_GRACE = 5.0     # seconds between SIGTERM and SIGKILL
TAIL_CHARS = 4000
# Started under `setpriv --pdeathsig KILL`, a child dies with the thread that started it, so
# even a control service killed outright (SIGKILL, OOM) leaves no adapter behind.
SETPRIV = shutil.which("setpriv")


def with_pdeathsig(argv: list[str]) -> list[str]:
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv] if SETPRIV else list(argv)


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    """The last `chars` characters of a log file ('' if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen, *, grace: float = KILL_GRACE) -> None:
    """SIGTERM the group led by `proc`, SIGKILL it and every descendant after `grace`; reap it."""
    tree = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    killpg(proc.pid, signal.SIGKILL)    # what is left of the group, even after its leader exited
    kill_pids(tree, signal.SIGKILL)
    proc.wait()
