"""What the realtime adapter costs over the model alone (issue 11), each figure beside a baseline
measured in the same run.

Starts a realistic Python model (stdlib http.server, HTTP/1.1 keep-alive; the fixture in
tests/fixtures/adapter/realtime, copied with limits that admit 100-row requests) and the adapter
in sidecar mode in front of it, then measures both paths at 1 and 8 concurrent clients (threads,
one keep-alive connection each), alternating direct/adapter blocks so background load hits both
alike. It reports, against the targets of DESIGN.md / issue 11:

  1. added p50 of a 1-row request at 1 client (<= 0.3 ms over the model alone);
  2. throughput through the adapter at 8 clients / the model alone (>= 0.6x; median of the
     per-round ratios, the rounds interleaved);
  3. added p50 of a 100-row request at 1 client (<= 0.5 ms);
  4. the adapter process's resident memory at idle right after start (VmRSS, <= 40 MiB),
     beside the model's own;
  5. start to ready: `python -m adapters serve DIR --port P` (supervisor mode: it starts the
     model too) until GET /v2/health/ready answers 200, beside the model started alone until
     its GET /health answers 200, and a bare interpreter's start (`python -c pass`); medians of
     interleaved runs.

    python -m loadtest.adapter_bench [--requests 2000] [--concurrency 1 8] [--json out.json] [--secret]
    python -m loadtest.adapter_bench --model-dir models/donor-propensity   # a real model: its
        manifest's command, rows from its sample.csv (1 row, and 100 rows cycled from it)

`--batch-rows N` also times a batch job of N rows end to end (`python -m adapters batch`) against
the fixture batch model alone on the same local file (target: <= 1.3x), alternating runs and
reporting medians.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "tests" / "fixtures" / "adapter" / "realtime"
BATCH_DIR = ROOT / "tests" / "fixtures" / "adapter" / "batch"
TARGET_BATCH_RATIO = 1.3
BODY = json.dumps({"rows": [{"x": 1.5, "n": 2, "region": "west"}]}).encode()
BODY_100 = json.dumps({"rows": [{"x": 1.5 + i, "n": i % 7, "region": ("west", "east")[i % 2]}
                                for i in range(100)]}).encode()
TARGET_ADDED_P50_MS = 0.3
TARGET_RPS_RATIO_C8 = 0.6
TARGET_ADDED_P50_100_MS = 0.5
TARGET_IDLE_RSS_MIB = 40.0
LIMITS = "limits: {timeout: 5s, max_rows: 1000, max_body: 1Mi}"
# `--secret`: the adapter runs with a plane secret, as the local runtime's replicas do, and every
# request (to the model alone too, which ignores it: the same bytes on both paths) carries it
SECRET_HEADERS: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path, headers=SECRET_HEADERS)
            if c.getresponse().status == 200:
                c.close()
                return
            c.close()
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"127.0.0.1:{port}{path} not ready after {timeout}s")


def run_block(port: int, n: int, concurrency: int, body: bytes = BODY) -> tuple[list[float], float]:
    """`n` POST /predict requests over `concurrency` keep-alive connections: (latencies in ms,
    wall seconds from the start barrier to the last answer)."""
    per_thread = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    results: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    t_start: list[float] = []
    start = threading.Barrier(concurrency, action=lambda: t_start.append(time.perf_counter()))
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **SECRET_HEADERS}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = results[i]
        perf = time.perf_counter
        start.wait()
        for _ in range(per_thread[i]):
            t0 = perf()
            conn.request("POST", "/predict", body, headers)
            resp = conn.getresponse()
            data = resp.read()
            out.append((perf() - t0) * 1000.0)
            if resp.status != 200:
                errors.append(f"{resp.status} {data[:200]!r}")
                break
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start[0]
    if errors:
        raise SystemExit(f"requests failed on port {port}: {errors[0]}")
    return [x for r in results for x in r], elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1)))]


def measure(model_port: int, adapter_port: int, n: int, concurrency: int, rounds: int = 6,
            body: bytes = BODY) -> dict:
    run_block(model_port, 200, concurrency, body)  # warm-up, both paths
    run_block(adapter_port, 200, concurrency, body)
    direct: list[float] = []
    adapter: list[float] = []
    ratios: list[float] = []  # adapter req/s / model req/s, one per round (adjacent blocks)
    rps = {model_port: [], adapter_port: []}
    for r in range(rounds):  # alternate so background load falls on both paths alike
        block = n // rounds
        first, second = ((model_port, direct), (adapter_port, adapter)) if r % 2 == 0 else \
            ((adapter_port, adapter), (model_port, direct))
        for port, sink in (first, second):
            lat, elapsed = run_block(port, block, concurrency, body)
            sink.extend(lat)
            rps[port].append(len(lat) / elapsed)
        ratios.append(rps[adapter_port][-1] / rps[model_port][-1])
    d50, d99, a50, a99 = pct(direct, 50), pct(direct, 99), pct(adapter, 50), pct(adapter, 99)
    return {
        "concurrency": concurrency, "requests": len(adapter), "rows_per_request": len(json.loads(body)["rows"]),
        "direct_rps": round(statistics.median(rps[model_port]), 1),
        "adapter_rps": round(statistics.median(rps[adapter_port]), 1),
        "rps_ratio": round(statistics.median(ratios), 3),
        "direct_p50_ms": round(d50, 3), "direct_p99_ms": round(d99, 3),
        "adapter_p50_ms": round(a50, 3), "adapter_p99_ms": round(a99, 3),
        "added_p50_ms": round(a50 - d50, 3), "added_p99_ms": round(a99 - d99, 3),
        "direct_mean_ms": round(statistics.fmean(direct), 3), "adapter_mean_ms": round(statistics.fmean(adapter), 3),
    }


def batch_bench(rows: int, runs: int, env: dict) -> dict:
    """Median wall time of the batch model alone vs the adapter running it, on one local CSV."""
    import random
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    try:
        model_dir = tmp / "model"
        shutil.copytree(BATCH_DIR, model_dir)
        manifest = model_dir / "model.yaml"
        manifest.write_text(manifest.read_text().replace("timeout: 3s", "timeout: 30m"))
        dataset = tmp / "dataset.csv"
        rnd = random.Random(1)
        with open(dataset, "w") as f:
            f.write("x,region\n")
            f.writelines(f"{rnd.random() * 100:.4f},{'west' if i % 2 else 'east'}\n" for i in range(rows))
        alone, adapter = [], []
        for i in range(runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "score.py"], cwd=model_dir, check=True, stderr=subprocess.DEVNULL,
                           env=dict(env, DATASET=str(dataset), RESULTS=str(tmp / "alone.csv")))
            alone.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "adapters", "batch", str(model_dir), "--dataset",
                                   str(dataset), "--job", f"bench-{i}"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False)
            adapter.append(time.perf_counter() - t0)
            status = json.loads(proc.stdout.strip().splitlines()[-1])["status"]
            if proc.returncode != 0 or status != "succeeded":
                raise SystemExit(f"batch job failed: {proc.stdout[-500:]}")
        a, b = statistics.median(alone), statistics.median(adapter)
        return {"rows": rows, "runs": runs, "model_alone_s": round(a, 3), "adapter_end_to_end_s": round(b, 3),
                "ratio": round(b / a, 3), "model_alone_min_s": round(min(alone), 3),
                "adapter_min_s": round(min(adapter), 3)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise SystemExit(f"no VmRSS for pid {pid}")


def poll_ready(port: int, path: str, proc: subprocess.Popen, t0: float, timeout: float = 30.0) -> float:
    """Seconds from `t0` until GET `path` answers 200, polled every 5 ms."""
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args} exited with {proc.returncode} before it was ready")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                if s.recv(64)[9:12] == b"200":
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.005)
    raise SystemExit(f"127.0.0.1:{port}{path} not ready after {timeout}s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def model_command(model_dir: Path) -> list[str]:
    """The model's own command (the manifest's), with `python`/`python3` as this interpreter."""
    from adapters.manifest import load_manifest

    command = list(load_manifest(model_dir, check_files=False).command)
    if command[0] in ("python", "python3"):
        command[0] = sys.executable
    return command


def sample_bodies(model_dir: Path) -> tuple[bytes, bytes]:
    """A 1-row and a 100-row /predict body from the model's sample.csv, as the adapter reads CSV."""
    import csv

    from adapters.manifest import load_manifest
    from adapters.schema import RowValidator

    manifest = load_manifest(model_dir)
    with open(manifest.sample_path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        validator = RowValidator(manifest)
        rows = validator.validate(validator.rows_from_csv(header, (r for r in reader if r)))
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    hundred = [rows[i % len(rows)] for i in range(100)]
    return json.dumps({"rows": rows[:1]}).encode(), json.dumps({"rows": hundred}).encode()


def start_bench(model_dir: Path, runs: int, env: dict) -> dict:
    """Medians of interleaved runs: the adapter in supervisor mode until /v2/health/ready, the model
    alone until /health, a bare interpreter's `python -c pass`."""
    adapter_s, model_s, bare_s = [], [], []
    quiet = dict(env, MODELPLANE_LOG_LEVEL="WARNING")
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
        bare_s.append(time.perf_counter() - t0)
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen(model_command(model_dir), cwd=model_dir, env=dict(env, PORT=str(port)),
                                stderr=subprocess.DEVNULL)
        try:
            model_s.append(poll_ready(port, "/health", proc, t0))
        finally:
            _stop(proc)
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "adapters", "serve", str(model_dir), "--port", str(port)],
                                cwd=ROOT, env=quiet, stderr=subprocess.DEVNULL)
        try:
            adapter_s.append(poll_ready(port, "/v2/health/ready", proc, t0))
        finally:
            _stop(proc)
    a, m, b = statistics.median(adapter_s), statistics.median(model_s), statistics.median(bare_s)
    return {"runs": runs, "adapter_start_to_ready_s": round(a, 3), "model_alone_start_to_ready_s": round(m, 3),
            "bare_interpreter_s": round(b, 3), "adapter_min_s": round(min(adapter_s), 3),
            "model_alone_min_s": round(min(model_s), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="measured requests per path and setting")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests-100", type=int, default=1000, help="measured 100-row requests per path")
    p.add_argument("--start-runs", type=int, default=7, help="start-to-ready runs (0: skip)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR,
                   help="a realtime model folder (default: the adapter tests' fixture model)")
    p.add_argument("--batch-rows", type=int, default=0, help="also time a batch job of this many rows")
    p.add_argument("--batch-runs", type=int, default=5)
    p.add_argument("--secret", action="store_true",
                   help="run the adapter with a plane secret (MODELPLANE_ADAPTER_SECRET), as the local runtime does")
    args = p.parse_args(argv)

    import shutil
    import tempfile

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    tmp = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    model_dir = Path(shutil.copytree(args.model_dir, tmp / "model"))
    manifest = model_dir / "model.yaml"
    manifest.write_text("\n".join(x for x in manifest.read_text().splitlines() if not x.startswith("limits:"))
                        + "\n" + LIMITS + "\n")
    model_port, adapter_port = free_port(), free_port()
    adapter_env: dict[str, str] = {}
    if args.secret:
        import secrets

        from adapters import SECRET_ENV, SECRET_HEADER

        adapter_env[SECRET_ENV] = secrets.token_urlsafe(32)
        SECRET_HEADERS[SECRET_HEADER] = adapter_env[SECRET_ENV]
    body_1, body_100 = (BODY, BODY_100) if args.model_dir == MODEL_DIR else sample_bodies(model_dir)
    model = subprocess.Popen(model_command(model_dir), cwd=model_dir, env=dict(env, PORT=str(model_port)),
                             stderr=subprocess.DEVNULL)
    adapter = None
    try:
        wait_ready(model_port, "/health", model)
        adapter = subprocess.Popen(
            [sys.executable, "-m", "adapters", "serve", str(model_dir), "--port", str(adapter_port),
             "--model-url", f"http://127.0.0.1:{model_port}"],
            cwd=ROOT, env=dict(env, MODELPLANE_LOG_LEVEL="WARNING", **adapter_env))
        wait_ready(adapter_port, "/v2/health/ready", adapter)
        time.sleep(1.0)  # idle: let start-up settle
        rss = {"adapter_idle_rss_mib": round(rss_mib(adapter.pid), 1), "model_idle_rss_mib": round(rss_mib(model.pid), 1)}
        rows = [measure(model_port, adapter_port, args.requests, c, body=body_1) for c in args.concurrency]
        row100 = measure(model_port, adapter_port, args.requests_100, 1, body=body_100)
        rss["adapter_rss_after_load_mib"] = round(rss_mib(adapter.pid), 1)
    finally:
        _stop(adapter)
        _stop(model)
    start = start_bench(model_dir, args.start_runs, env) if args.start_runs else None
    shutil.rmtree(tmp, ignore_errors=True)

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    print(f"{args.model_dir.name}: POST /predict, {args.requests} requests per path and setting (1 row), "
          f"cpus={os.cpu_count()}")
    print(f"{'clients':>7} {'rows':>4} {'direct p50':>11} {'direct p99':>11} {'adapter p50':>12} {'adapter p99':>12} "
          f"{'added p50':>10} {'added p99':>10} {'direct/s':>9} {'adapter/s':>9} {'ratio':>6}")
    for r in rows + [row100]:
        print(f"{r['concurrency']:>7} {r['rows_per_request']:>4} {r['direct_p50_ms']:>9.3f}ms {r['direct_p99_ms']:>9.3f}ms "
              f"{r['adapter_p50_ms']:>10.3f}ms {r['adapter_p99_ms']:>10.3f}ms "
              f"{r['added_p50_ms']:>8.3f}ms {r['added_p99_ms']:>8.3f}ms {r['direct_rps']:>9.0f} {r['adapter_rps']:>9.0f} "
              f"{r['rps_ratio']:>6.2f}")
    report: dict = {"results": rows, "rows_100": row100, "rss": rss, "start": start}
    single = next((r for r in rows if r["concurrency"] == 1), rows[0])
    ok1 = single["added_p50_ms"] <= TARGET_ADDED_P50_MS
    print(f"[1] added p50, 1 row, {single['concurrency']} client(s): {single['added_p50_ms']:.3f} ms "
          f"(model alone p50 {single['direct_p50_ms']:.3f} ms, adapter {single['adapter_p50_ms']:.3f} ms) — "
          f"{verdict(ok1)} the {TARGET_ADDED_P50_MS} ms target")
    eight = next((r for r in rows if r["concurrency"] == 8), None)
    if eight:
        ok2 = eight["rps_ratio"] >= TARGET_RPS_RATIO_C8
        print(f"[2] throughput at 8 clients, adapter / model alone: {eight['rps_ratio']:.2f}x "
              f"(model alone {eight['direct_rps']:.0f} req/s, adapter {eight['adapter_rps']:.0f} req/s) — "
              f"{verdict(ok2)} the {TARGET_RPS_RATIO_C8}x target")
    ok3 = row100["added_p50_ms"] <= TARGET_ADDED_P50_100_MS
    print(f"[3] added p50, 100 rows, 1 client: {row100['added_p50_ms']:.3f} ms "
          f"(model alone p50 {row100['direct_p50_ms']:.3f} ms, adapter {row100['adapter_p50_ms']:.3f} ms) — "
          f"{verdict(ok3)} the {TARGET_ADDED_P50_100_MS} ms target")
    ok4 = rss["adapter_idle_rss_mib"] <= TARGET_IDLE_RSS_MIB
    print(f"[4] adapter idle RSS after start: {rss['adapter_idle_rss_mib']:.1f} MiB (the model's own "
          f"{rss['model_idle_rss_mib']:.1f} MiB; the adapter after the load {rss['adapter_rss_after_load_mib']:.1f} MiB) — "
          f"{verdict(ok4)} the {TARGET_IDLE_RSS_MIB:.0f} MiB target")
    if start:
        print(f"[5] start to ready, median of {start['runs']}: adapter serving (it starts the model) "
              f"{start['adapter_start_to_ready_s']:.3f} s; the model alone {start['model_alone_start_to_ready_s']:.3f} s; "
              f"a bare interpreter {start['bare_interpreter_s']:.3f} s; adapter adds "
              f"{start['adapter_start_to_ready_s'] - start['model_alone_start_to_ready_s']:.3f} s")
    if args.batch_rows:
        b = batch_bench(args.batch_rows, args.batch_runs, env)
        report["batch"] = b
        print(f"batch, {b['rows']} rows, median of {b['runs']}: model alone {b['model_alone_s']:.2f} s, "
              f"through the adapter {b['adapter_end_to_end_s']:.2f} s = {b['ratio']:.2f}x "
              f"({'meets' if b['ratio'] <= TARGET_BATCH_RATIO else 'MISSES'} the {TARGET_BATCH_RATIO}x target)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
