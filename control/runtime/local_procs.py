"""Process helpers of the local runtime: stop a process group and whatever escaped it, read log tails.

Everything the local runtime starts is the leader of its own process group
(`start_new_session=True`). Stopping one means SIGTERM to the group, SIGKILL after a grace
period, and SIGKILL to every descendant seen before the stop (a model the adapter put in a
session of its own is not in the adapter's group).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from adapters.procs import descendants  # noqa: F401 (the runtime, its replicas and the tests use it from here)

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


#: a loopback address, with its scheme, port and path when it has them: the ports a replica or
#: its model listened on, which mean nothing to whoever reads a crash (and are not reachable)
LOOPBACK = re.compile(r"(?:https?://)?(?:127(?:\.\d{1,3}){3}|localhost|\[::1\]|0\.0\.0\.0)(?::\d{1,5})?(?:/[^\s,;)'\"]*)?",
                      re.IGNORECASE)
INTERNAL = "(internal address)"


def scrub_addresses(text: str) -> str:
    """`text` with every loopback URL or host:port replaced by `(internal address)`: crash output
    shown in the API and the console names no internal port."""
    return LOOPBACK.sub(INTERNAL, text or "")


#: how the adapter ends its log when its model exits: it repeats the model's last stderr lines,
#: which the log already holds (the model's stderr is the adapter's)
REPEATED = "; its last stderr lines:\n"


def crash_output(text: str) -> str:
    """A replica's log tail as a crash shows it: the model's stderr once (the adapter's closing
    repetition of it dropped where the tail already has those lines) and no internal address."""
    text = text or ""
    at = text.rfind(REPEATED)
    if at >= 0:
        before, repeated = text[:at], text[at + len(REPEATED):]
        lines = [line for line in repeated.splitlines() if line.strip()]
        if lines and all(line in before for line in lines):
            text = before + "." + ("\n" if repeated.endswith("\n") else "")
    return scrub_addresses(text)


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


# -- a warm spare adapter ---------------------------------------------------------------------------

# The spare: imports what the adapter's command will need (argv[1], comma-separated modules),
# calls argv[2] (`module:function`, optional) to warm what it can (a storage client, say), then
# waits for one line on stdin, {"argv": [...], "out": path, "err": path}; points stdout and
# stderr at those files and runs `python -m adapters` with that argv. EOF instead (the runtime
# closing, or dropping a spare it can no longer use) exits quietly. Once the run is over its
# answer is out: the interpreter's teardown (~0.1 s) is skipped.
SPARE_CODE = """\
import importlib, json, os, sys
try:
    for name in filter(None, sys.argv[1].split(",")):
        importlib.import_module(name)
    import adapters.__main__ as entry
    if sys.argv[2]:
        module, _, function = sys.argv[2].partition(":")
        try:
            getattr(importlib.import_module(module), function)()
        except Exception:
            pass  # the run makes its own and reports why it cannot
except Exception:
    entry = None
line = sys.stdin.readline()
if not line.strip():
    sys.exit(0)
run = json.loads(line)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
for fd, path in ((1, run["out"]), (2, run["err"])):
    f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(f, fd)
    os.close(f)
if entry is None:
    import adapters.__main__ as entry  # the import error, into the run's log
sys.argv = ["adapters", *run["argv"]]
try:
    code = entry.main(run["argv"])
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
        print(e.code, file=sys.stderr)
except BaseException:
    import traceback
    traceback.print_exc()
    code = 1
import logging
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


class Spare:
    """One `python -m adapters` process started ahead of need, its interpreter up and its imports
    done, blocked on stdin until it is given the arguments of the one run it will do: a cold
    start or a job then skips the interpreter's start and the adapter's imports. Each spare
    serves one run and exits with it, so models stay in processes of their own.

    `ensure` starts one when there is none, from a thread that lives as long as the runtime
    (the spare runs under `setpriv --pdeathsig`, which follows the thread that started it).
    `take` hands the spare a run, if it is alive and was started with the environment the run
    would get now; None: start the run cold. `tag`: words that name the spare's use on its
    command line (`ps`, the benchmark's memory sampler).
    """

    def __init__(self, sample_argv: list[str], *, imports: str, env, warm: str = "", tag: tuple[str, ...] = (),
                 cwd: Optional[Path] = None):
        self.sample_argv = list(sample_argv)
        self.imports, self.warm, self.tag = imports, warm, tag
        self.cwd = cwd
        self._env = env
        self._lock = threading.Lock()
        self._proc: Optional[tuple[subprocess.Popen, dict]] = None
        self._closed = False
        self.started = 0
        self.used = 0

    @property
    def waiting(self) -> Optional[subprocess.Popen]:
        """The spare now waiting for a run, if any."""
        spare = self._proc
        return spare[0] if spare else None

    @staticmethod
    def applies(argv: list[str]) -> Optional[list[str]]:
        """The adapter's arguments if `argv` runs this interpreter's `-m adapters`, else None."""
        if len(argv) > 3 and argv[0] == sys.executable and argv[1:3] == ["-m", "adapters"]:
            return argv[3:]
        return None

    def ensure(self) -> None:
        with self._lock:
            if self._proc is not None or self._closed or self.applies(self.sample_argv) is None:
                return
            env = self._env()
            try:
                proc = subprocess.Popen(
                    with_pdeathsig([sys.executable, "-c", SPARE_CODE, self.imports, self.warm, *self.tag]),
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                    cwd=self.cwd, start_new_session=True)
            except OSError:
                return
            self._proc = (proc, env)
            self.started += 1

    def take(self, argv: list[str], out: Path, err: Path) -> Optional[subprocess.Popen]:
        args = self.applies(argv)
        if args is None:
            return None
        with self._lock:
            spare, self._proc = self._proc, None
        if spare is None:
            return None
        proc, env = spare
        if proc.poll() is not None or env != self._env():
            _release(proc)
            return None
        try:
            proc.stdin.write((json.dumps({"argv": args, "out": str(out), "err": str(err)}) + "\n").encode())
            proc.stdin.close()
        except OSError:   # it died meanwhile
            _release(proc)
            return None
        self.used += 1
        return proc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spare, self._proc = self._proc, None
        if spare is not None:
            _release(spare[0])


def _release(proc: subprocess.Popen) -> None:
    """Stop an unused spare (idle, it exits at EOF or dies of SIGTERM at once) and reap it."""
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    stop_process(proc, grace=1.0)
