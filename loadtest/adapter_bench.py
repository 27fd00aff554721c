"""How much latency the realtime adapter adds: 1-row requests direct to a model vs through the adapter.

Starts a realistic Python model (stdlib http.server, HTTP/1.1 keep-alive) and the adapter in
sidecar mode in front of it, then measures both paths at 1 and 8 concurrent clients (threads,
one keep-alive connection each), alternating direct/adapter blocks so background load hits both
alike. Target (DESIGN.md): added p50 <= 1 ms.

    python -m loadtest.adapter_bench [--requests 2000] [--concurrency 1 8] [--json out.json]

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
TARGET_ADDED_P50_MS = 1.0


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
            c.request("GET", path)
            if c.getresponse().status == 200:
                c.close()
                return
            c.close()
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"127.0.0.1:{port}{path} not ready after {timeout}s")


def run_block(port: int, n: int, concurrency: int) -> list[float]:
    """`n` POST /predict requests over `concurrency` keep-alive connections; latencies in ms."""
    per_thread = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    results: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    start = threading.Barrier(concurrency)
    headers = {"Content-Type": "application/json", "Content-Length": str(len(BODY))}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = results[i]
        perf = time.perf_counter
        start.wait()
        for _ in range(per_thread[i]):
            t0 = perf()
            conn.request("POST", "/predict", BODY, headers)
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
    if errors:
        raise SystemExit(f"requests failed on port {port}: {errors[0]}")
    return [x for r in results for x in r]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1)))]


def measure(model_port: int, adapter_port: int, n: int, concurrency: int, rounds: int = 4) -> dict:
    run_block(model_port, 200, concurrency)  # warm-up, both paths
    run_block(adapter_port, 200, concurrency)
    direct: list[float] = []
    adapter: list[float] = []
    for r in range(rounds):  # alternate so background load falls on both paths alike
        block = n // rounds
        first, second = ((model_port, direct), (adapter_port, adapter)) if r % 2 == 0 else \
            ((adapter_port, adapter), (model_port, direct))
        first[1].extend(run_block(first[0], block, concurrency))
        second[1].extend(run_block(second[0], block, concurrency))
    d50, d99, a50, a99 = pct(direct, 50), pct(direct, 99), pct(adapter, 50), pct(adapter, 99)
    return {
        "concurrency": concurrency, "requests": len(adapter),
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="measured requests per path and setting")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    p.add_argument("--batch-rows", type=int, default=0, help="also time a batch job of this many rows")
    p.add_argument("--batch-runs", type=int, default=5)
    args = p.parse_args(argv)

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    model_port, adapter_port = free_port(), free_port()
    model = subprocess.Popen([sys.executable, "model.py"], cwd=MODEL_DIR, env=dict(env, PORT=str(model_port)),
                             stderr=subprocess.DEVNULL)
    adapter = None
    try:
        wait_ready(model_port, "/health", model)
        adapter = subprocess.Popen(
            [sys.executable, "-m", "adapters", "serve", str(MODEL_DIR), "--port", str(adapter_port),
             "--model-url", f"http://127.0.0.1:{model_port}"],
            cwd=ROOT, env=dict(env, MODELPLANE_LOG_LEVEL="WARNING"))
        wait_ready(adapter_port, "/v2/health/ready", adapter)
        rows = [measure(model_port, adapter_port, args.requests, c) for c in args.concurrency]
    finally:
        for proc in (adapter, model):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    print(f"1-row POST /predict, {args.requests} requests per path and setting, cpus={os.cpu_count()}")
    print(f"{'clients':>7} {'direct p50':>11} {'direct p99':>11} {'adapter p50':>12} {'adapter p99':>12} "
          f"{'added p50':>10} {'added p99':>10}")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['direct_p50_ms']:>9.3f}ms {r['direct_p99_ms']:>9.3f}ms "
              f"{r['adapter_p50_ms']:>10.3f}ms {r['adapter_p99_ms']:>10.3f}ms "
              f"{r['added_p50_ms']:>8.3f}ms {r['added_p99_ms']:>8.3f}ms")
    single = next((r for r in rows if r["concurrency"] == 1), rows[0])
    verdict = "meets" if single["added_p50_ms"] <= TARGET_ADDED_P50_MS else "MISSES"
    print(f"added p50 at {single['concurrency']} client(s): {single['added_p50_ms']:.3f} ms — "
          f"{verdict} the {TARGET_ADDED_P50_MS:.0f} ms target")
    report = {"target_added_p50_ms": TARGET_ADDED_P50_MS, "results": rows, "meets_target": verdict == "meets"}
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
