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
import time
from pathlib import Path
from typing import Optional

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


# -- the parts `modelplane up` started, recorded for whoever starts next ----------------------------

def start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the
    pid, it names one process, never a later one that reused the pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def record_parts(path: Path, parts: list[dict]) -> None:
    """Write `[{"name", "pid", "start"}]` for the parts started so far (atomically)."""
    from control.durable import write_json_atomic

    write_json_atomic(path, {"parts": parts})


def reap_recorded(path: Path, *, grace: float = 5.0) -> list[str]:
    """Stop the parts a previous `up` recorded and left running (it was SIGKILLed); returns what
    was stopped. A part counts only if its pid still has the recorded start time."""
    import json

    try:
        parts = json.loads(path.read_text(encoding="utf-8")).get("parts") or []
    except (OSError, ValueError, AttributeError):
        return []
    stopped = []
    for part in parts:
        try:
            pid, start = int(part["pid"]), part.get("start")
        except (KeyError, TypeError, ValueError):
            continue
        if start is None or start_time(pid) != start:
            continue
        killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and start_time(pid) == start and not _zombie(pid):
            time.sleep(0.05)
        if start_time(pid) == start and not _zombie(pid):
            killpg(pid, signal.SIGKILL)
        stopped.append(f"{part.get('name', 'process')} (pid {pid})")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return stopped


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].split()[0] == b"Z"
    except (OSError, ValueError, IndexError):
        return True
