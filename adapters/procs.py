"""Running a model's process: stop its whole group, word its exit, never orphan it.

Shared by the batch and realtime adapters; kept apart so the realtime adapter imports only this.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

KILL_GRACE_SECONDS = 5.0


def kill_group(proc: subprocess.Popen, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the model (its process group; inside a sandbox, its processes), SIGKILL the group
    after `grace` seconds (a sandbox's pid namespace goes with bwrap); leaves nothing running."""
    terminate = getattr(proc, "terminate_model", None)
    try:
        if terminate is not None:
            terminate()
        else:
            os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also whatever the model left behind in its group
    except ProcessLookupError:
        pass
    proc.wait()
    cleanup = getattr(proc, "cleanup", None)
    if cleanup is not None:
        cleanup()


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by signal {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def die_with_parent() -> None:
    """In a model's child process: SIGKILL it if the adapter dies, so a model is never orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


PREEXEC = die_with_parent if sys.platform.startswith("linux") else None


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
