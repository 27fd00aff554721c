"""Small measuring tools: a closed-loop HTTP latency client, a model process started alone, RSS sampling via /proc."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from adapters.manifest import Manifest
from control.emulator import free_port

from .common import median, percentile

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# -- latency -----------------------------------------------------------------------------

@dataclass
class Latency:
    """Latencies (ms) of one closed-loop run: `concurrency` clients, each waiting for its answer."""

    concurrency: int
    samples_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 99)

    @property
    def rps(self) -> float:
        return len(self.samples_ms) / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "n": len(self.samples_ms), "errors": self.errors,
                "p50_ms": self.p50, "p90_ms": percentile(self.samples_ms, 90), "p99_ms": self.p99,
                "mean_ms": sum(self.samples_ms) / len(self.samples_ms) if self.samples_ms else float("nan"),
                "rps": self.rps}


def closed_loop(url: str, body: bytes, *, concurrency: int, requests: int, warmup: int = 20,
                content_type: str = "application/json", timeout: float = 60.0,
                headers: Optional[dict] = None) -> Latency:
    """POST `body` to `url` from `concurrency` threads on keep-alive connections, `requests` in all.

    The client is deliberately plain (http.client, one connection per thread) so the same cost
    is paid against every target and cancels out when two targets are compared.
    """
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": content_type, "Connection": "keep-alive", **(headers or {})}
    result = Latency(concurrency=concurrency)
    lock = threading.Lock()
    per_thread = max(1, requests // concurrency)
    barrier = threading.Barrier(concurrency)

    def worker():
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        mine, errs = [], 0
        try:
            for _ in range(warmup):
                try:
                    conn.request("POST", path, body=body, headers=headers)
                    conn.getresponse().read()
                except (OSError, http.client.HTTPException):
                    conn.close()    # warm-up failures are not counted; reconnect and go on
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
            try:
                barrier.wait(timeout)
            except threading.BrokenBarrierError:
                pass    # a stuck peer must not hang the run; this thread measures anyway
            for _ in range(per_thread):
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path, body=body, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 200
                except (OSError, http.client.HTTPException):
                    ok = False
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                dt = (time.perf_counter() - t0) * 1000.0
                if ok:
                    mine.append(dt)
                else:
                    errs += 1
        finally:
            conn.close()
            with lock:
                result.samples_ms.extend(mine)
                result.errors += errs

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - started
    return result


def post_json(url: str, payload: dict, *, timeout: float = 120.0, headers: Optional[dict] = None) -> tuple[int, dict]:
    """One POST on a fresh connection (what a client arriving at a cold model does)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, {"raw": data[:500].decode("latin-1")}
    finally:
        conn.close()


def http_ok(host: str, port: int, path: str, timeout: float = 1.0) -> bool:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


# -- a model process alone -----------------------------------------------------------------

class ModelProcess:
    """A realtime model started alone, exactly as its manifest says (the cold-start baseline)."""

    def __init__(self, manifest: Manifest, *, port: Optional[int] = None):
        self.manifest = manifest
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 60.0, poll: float = 0.005) -> float:
        """Start the process; return seconds until `GET /health` answered 200."""
        env = dict(os.environ, PORT=str(self.port), HOST="127.0.0.1")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.manifest.command, cwd=str(self.manifest.folder), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{self.manifest.name} exited with {self.proc.returncode}: {err}")
            if http_ok("127.0.0.1", self.port, "/health", timeout=1.0):
                return time.perf_counter() - t0
            time.sleep(poll)
        self.stop()
        raise TimeoutError(f"{self.manifest.name}: /health did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> "ModelProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_batch_alone(manifest: Manifest, dataset: Path, results: Path, *, timeout: float = 1800) -> float:
    """Run a batch model on a local file, as its contract says; return the seconds it took."""
    env = dict(os.environ, DATASET=str(dataset), RESULTS=str(results))
    t0 = time.perf_counter()
    proc = subprocess.run(manifest.command, cwd=str(manifest.folder), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=timeout)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{manifest.name} alone exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return dt


# -- memory ------------------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields start after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        return []


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class BatchMemorySampler:
    """Samples the RSS of every `adapters batch` process under `root_pid` (and of its subtree) until stopped.

    `peak_adapter` is the adapter process alone, the part DESIGN.md wants flat; `peak_tree`
    adds the model it runs, which is the model's business.
    """

    def __init__(self, root_pid: int, *, interval: float = 0.02):
        self.root_pid = root_pid
        self.interval = interval
        self.peak_adapter = 0
        self.peak_tree = 0
        self.samples = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kids = _children_map()
            todo, tree = [self.root_pid], []
            while todo:
                p = todo.pop()
                for c in kids.get(p, []):
                    tree.append(c)
                    todo.append(c)
            for pid in tree:
                argv = cmdline(pid)
                if "adapters" in " ".join(argv[:4]) and "batch" in argv:
                    self.seen.add(pid)
                    own = rss_bytes(pid)
                    sub, todo = own, [pid]
                    while todo:
                        p = todo.pop()
                        for c in kids.get(p, []):
                            sub += rss_bytes(c)
                            todo.append(c)
                    self.peak_adapter = max(self.peak_adapter, own)
                    self.peak_tree = max(self.peak_tree, sub)
                    self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "BatchMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict:
    """nproc, memory and CPU model of this machine (for the report)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {"nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "memory_gib": round(mem_kib / 2**20, 1),
            "cpu_model": cpu, "loadavg_at_start": [round(x, 2) for x in load]}


__all__ = ["Latency", "closed_loop", "post_json", "ModelProcess", "run_batch_alone", "BatchMemorySampler",
           "descendants", "machine", "median"]
