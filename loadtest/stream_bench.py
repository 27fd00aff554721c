"""A realtime model run as a job over a big file (issue 21) against the model alone.

    python -m loadtest.stream_bench --rows 1000000 [--model-dir models/donor-propensity] [--json out.json]

Writes a CSV of `--rows` rows for the model's features (cycled from its sample.csv), then:

  plane  a local runtime (control/runtime/local.py) in a process of its own — the plane — deploys
         the model and runs it as a job on the file (adapters/stream.py through the runtime's own
         forwarding: replicas start and scale out as for live traffic), writing scores.csv and
         result.json. Timed from the job's submission to its end; the plane process's peak
         resident memory (ru_maxrss) is reported. The deploy (and its check) is not timed.
  model  the model's own process alone (its manifest's command, no adapter, no plane), sent the
         same rows in chunks of `limits.max_rows` as JSON over HTTP by `scaling.max` client
         threads on kept-alive connections, its scores written to a file. Timed from reading
         the file to the last score written.

It prints one JSON line: rows, wall seconds and rows/s of each, their ratio, the plane's peak
RSS, and the scores' agreement (the plane's scores.csv equal to the model alone's, row by row).
Bounded: `--rows` at most 10,000,000; everything it starts is stopped, its files removed.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import itertools
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "donor-propensity"
MAX_ROWS = 10_000_000


def write_dataset(model_dir: Path, rows: int, dest: Path) -> None:
    """`rows` data rows cycled from the model's sample.csv, written a block at a time."""
    with open(model_dir / "sample.csv", encoding="utf-8") as f:
        lines = f.read().splitlines()
    header, body = lines[0], [line for line in lines[1:] if line.strip()]
    with open(dest, "w", encoding="utf-8") as out:
        out.write(header + "\n")
        left = rows
        block = "\n".join(body) + "\n"
        while left >= len(body):
            out.write(block)
            left -= len(body)
        if left:
            out.write("\n".join(body[:left]) + "\n")


# -- the plane: a local runtime in a child process ----------------------------------------------

def plane_child(model_dir: str, dataset: str, state: str) -> None:
    """Deploy, run the job, print what it took (runs as `--plane-child`)."""
    sys.path.insert(0, str(ROOT))
    from adapters.manifest import load_manifest
    from control.runtime.local import LocalRuntime
    from control.settings import Settings

    rt = LocalRuntime(Settings(state_dir=Path(state), models_dir=Path(state) / "models", bucket="bench",
                               job_concurrency=1, start_timeout=60))
    try:
        rt.start()
        manifest = load_manifest(model_dir)
        rt.deploy(manifest)
        t0 = time.perf_counter()
        job, _ = rt.submit_job(manifest.name, dataset=dataset)
        max_replicas = 0
        while (j := rt.job(job.id)).status in ("queued", "running"):
            max_replicas = max(max_replicas, rt.model(manifest.name).replicas)
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        # a short job can end between two looks; the replicas that served it idle out only later
        max_replicas = max(max_replicas, rt.model(manifest.name).replicas)
        print(json.dumps({"status": j.status, "error": j.error, "rows": j.rows, "wall_s": wall,
                          "results": j.results_uri, "max_replicas": max_replicas,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    finally:
        rt.close()


def run_plane(model_dir: Path, dataset: Path, work: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "loadtest.stream_bench", "--plane-child", str(model_dir),
                           str(dataset), str(work / "state")], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"the plane run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the model alone -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_model_alone(model_dir: Path, dataset: Path, out: Path, timeout: float) -> dict:
    sys.path.insert(0, str(ROOT))
    from adapters.manifest import load_manifest

    manifest = load_manifest(model_dir)
    types = {f.name: f.type for f in manifest.features}
    port = _free_port()
    proc = subprocess.Popen(manifest.command, cwd=str(model_dir), env={**os.environ, "PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    c.close()
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the model alone did not become healthy")
            time.sleep(0.05)
        local = threading.local()

        def convert(name: str, text: str):
            if text == "":
                return None
            t = types.get(name)
            if t == "number":
                return float(text)
            if t == "integer":
                return int(text)
            if t == "boolean":
                return text.lower() == "true"
            return text

        def score(records: list[list[str]], header: list[str]) -> list[float]:
            rows = [{h: convert(h, v) for h, v in zip(header, rec)} for rec in records]
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            conn.request("POST", "/predict", body=json.dumps({"rows": rows}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise SystemExit(f"the model alone answered {resp.status}: {data[:300]!r}")
            return json.loads(data)["scores"]

        t0 = time.perf_counter()
        rows = 0
        with open(dataset, newline="", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w, \
                ThreadPoolExecutor(max_workers=manifest.scaling.max) as pool:
            reader = csv.reader(f)
            header = next(reader)
            w.write(manifest.score.name + "\n")
            pending = []
            while chunk := list(itertools.islice(reader, manifest.limits.max_rows)):
                pending.append(pool.submit(score, chunk, header))
                if len(pending) >= manifest.scaling.max:
                    scores = pending.pop(0).result()
                    rows += len(scores)
                    w.write("".join(f"{s!r}\n" for s in scores))
            for fut in pending:
                scores = fut.result()
                rows += len(scores)
                w.write("".join(f"{s!r}\n" for s in scores))
        wall = time.perf_counter() - t0
        return {"rows": rows, "wall_s": wall}
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()


def same_scores(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        next(fa), next(fb)
        for la, lb in itertools.zip_longest(fa, fb):
            if la is None or lb is None or float(la) != float(lb):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.stream_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds either run may take")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--plane-child", nargs=3, metavar=("MODEL_DIR", "DATASET", "STATE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plane_child:
        plane_child(*args.plane_child)
        return 0
    if not 1 <= args.rows <= MAX_ROWS:
        p.error(f"--rows: between 1 and {MAX_ROWS:,}")
    work = Path(tempfile.mkdtemp(prefix="modelplane-stream-bench-"))
    try:
        dataset = work / "data.csv"
        write_dataset(args.model_dir.resolve(), args.rows, dataset)
        alone_out = work / "alone.csv"
        alone = run_model_alone(args.model_dir.resolve(), dataset, alone_out, args.timeout)
        plane = run_plane(args.model_dir.resolve(), dataset, work, args.timeout)
        if plane["status"] != "succeeded":
            raise SystemExit(f"the plane's job {plane['status']}: {plane['error']}")
        figures = {
            "rows": args.rows, "model": args.model_dir.name, "dataset_mib": round(dataset.stat().st_size / 2**20, 1),
            "plane_wall_s": round(plane["wall_s"], 2), "plane_rows_per_s": round(args.rows / plane["wall_s"]),
            "model_alone_wall_s": round(alone["wall_s"], 2),
            "model_alone_rows_per_s": round(args.rows / alone["wall_s"]),
            "ratio_plane_over_alone": round(plane["wall_s"] / alone["wall_s"], 2),
            "plane_peak_rss_mib": round(plane["peak_rss_mib"], 1), "plane_max_replicas": plane["max_replicas"],
            "same_scores": same_scores(Path(plane["results"]), alone_out) and alone["rows"] == plane["rows"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    line = json.dumps(figures)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
