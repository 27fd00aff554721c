"""`python -m loadtest.body_flood`: the control service's memory under a flood of large predict
bodies, each under the model's `limits.max_body` (40 at once of 15 MiB by default).

Starts an embedded plane (control service as a child process, local runtime, the echo-rt test
fixture with `limits: {max_body: 16Mi}`), warms the model up, then sends `--concurrency` POSTs
of `--size-mib` MiB each at once, `--rounds` times. The control service's RSS (from /proc) is
sampled every 20 ms: printed before, at its peak, and `--settle` seconds after the flood, with
how many requests got which status. Bounded: every request times out after 120 s, and the whole
run stops after `--max-seconds`. Extra settings: `--env MODELPLANE_MAX_BODIES_IN_FLIGHT=...`.
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from .measure import rss_bytes
from .plane import EmbeddedPlane

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "control" / "echo-rt"
MIB = 2**20


def _post(port: int, token: str, body: bytes, statuses: Counter, lock: threading.Lock) -> None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/models/echo-rt/predict", body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        status = conn.getresponse().status
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        status = type(e).__name__
    with lock:
        statuses[status] += 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.body_flood", description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=40)
    ap.add_argument("--size-mib", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after the flood before 'after' is read")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the control service")
    args = ap.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    work = Path(tempfile.mkdtemp(prefix="modelplane-body-flood-"))
    try:
        models = work / "models"
        folder = Path(shutil.copytree(FIXTURE, models / "echo-rt"))
        (folder / "model.yaml").write_text((folder / "model.yaml").read_text() + "limits: {max_body: 16Mi}\n")
        with EmbeddedPlane(work, models_dir=models, emulator=False, env=env) as plane:
            plane.wait_listed(["echo-rt"])
            warm = http.client.HTTPConnection("127.0.0.1", plane.port, timeout=120)
            warm.request("POST", "/models/echo-rt/predict", body=b'{"rows": [{"x": 1}]}',
                         headers={"Content-Type": "application/json", **plane.auth})
            assert warm.getresponse().status == 200, "the model did not answer its warm-up request"
            warm.close()
            size = int(args.size_mib * MIB)
            head = b'{"rows": [{"x": 1}], "padding": "'
            body = head + b"a" * (size - len(head) - 2) + b'"}'
            time.sleep(1.0)
            before = rss_bytes(plane.pid)
            samples, stop = [before], threading.Event()

            def sample():
                while not stop.is_set():
                    samples.append(rss_bytes(plane.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            statuses, lock = Counter(), threading.Lock()
            started = time.monotonic()
            for _ in range(args.rounds):
                threads = [threading.Thread(target=_post, args=(plane.port, plane.token, body, statuses, lock),
                                            daemon=True) for _ in range(args.concurrency)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(max(1.0, args.max_seconds - (time.monotonic() - started)))
            flood_s = time.monotonic() - started
            time.sleep(args.settle)
            stop.set()
            sampler.join()
            after = rss_bytes(plane.pid)
        figures = {"concurrency": args.concurrency, "body_mib": args.size_mib, "rounds": args.rounds,
                   "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
                   "flood_s": round(flood_s, 2), "rss_before_mib": round(before / MIB, 1),
                   "rss_peak_mib": round(max(samples) / MIB, 1), "rss_after_mib": round(after / MIB, 1),
                   "settle_s": args.settle, "env": env}
        print(json.dumps(figures))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
