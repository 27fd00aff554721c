"""A model's pid as this machine sees it: a sandboxed model (adapters/sandbox.py) prints the pid of
its own pid namespace (2, say); /proc/PID/status `NSpid` lists a process's pid in each namespace."""
from __future__ import annotations

import os
import time

from control.runtime.local_procs import descendants


def host_pid(printed: int, under: int, *, timeout: float = 5.0) -> int:
    """The pid below process `under` whose innermost pid is `printed` (itself when not sandboxed)."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in descendants(under):
            try:
                with open(f"/proc/{pid}/status") as f:
                    ns = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
            except OSError:
                continue
            if ns and int(ns[-1]) == printed and (len(ns) > 1 or pid == printed):
                return pid
        if printed in descendants(under) or time.monotonic() > deadline:
            return printed
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
