"""What the model sandbox (adapters/sandbox.py, bubblewrap) adds to a model's cold start, beside
the same model started unsandboxed in the same run.

For each realtime example model (Python: models/donor-propensity; R: models/major-gift) it starts
the model's own command the way the adapter does (`sandbox.start`, scrubbed environment either
way) with MODELPLANE_SANDBOX=on and =off, alternating, and times process start -> `GET /health`
answers 200 (polled every 2 ms). It reports the median of each, the difference of the medians,
the median of the paired differences (each pair back to back; the verdict, target <= 20 ms added),
the ratio, and bwrap's own floor (`bwrap ... true` vs `true`).

    python -m loadtest.sandbox_bench [--runs 11] [--models donor-propensity major-gift] [--json out.json]

Bounded: `--runs` starts per model and mode (default 11), each with a 60 s readiness limit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_ADDED_MS = 20.0
DEFAULT_MODELS = ["donor-propensity", "major-gift"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready_after(port: int, proc, t0: float, timeout: float = 60.0) -> float:
    """Seconds from `t0` until GET /health answers 200 on 127.0.0.1:`port`."""
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the model exited with status {proc.returncode} before it was ready")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                if s.recv(64)[9:12] == b"200":
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.002)
    raise SystemExit(f"the model on port {port} was not ready after {timeout:.0f}s")


def one_start(folder: Path, command: list[str], mode: str, env: dict) -> float:
    from adapters import sandbox
    from adapters.procs import kill_group

    port = free_port()
    environ = dict(env, MODELPLANE_SANDBOX=mode)
    t0 = time.perf_counter()
    proc = sandbox.start(command, folder, {"PORT": str(port), "HOST": "127.0.0.1"}, environ=environ,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return ready_after(port, proc, t0)
    finally:
        kill_group(proc, grace=5.0)


def bwrap_floor(runs: int) -> dict:
    from adapters import sandbox

    import tempfile

    bwrap = shutil.which("bwrap")
    folder = tempfile.mkdtemp(prefix="sandbox-bench-")
    plain, boxed = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(["true"], check=True)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(sandbox.bwrap_argv(bwrap, ["true"], folder), check=True)
        boxed.append(time.perf_counter() - t0)
    os.rmdir(folder)
    return {"true_ms": round(statistics.median(plain) * 1000, 2),
            "bwrap_true_ms": round(statistics.median(boxed) * 1000, 2)}


def bench_model(name: str, runs: int, env: dict) -> dict:
    from adapters.manifest import load_manifest

    folder = ROOT / "models" / name
    manifest = load_manifest(folder, check_files=False)
    if manifest.kind != "realtime":
        raise SystemExit(f"{name} is a {manifest.kind} model; the cold start is a realtime model's")
    if not shutil.which(manifest.command[0], path=env.get("PATH")):
        return {"model": name, "skipped": f"{manifest.command[0]} is not installed"}
    one_start(folder, manifest.command, "off", env)   # warm the page cache for both
    on, off = [], []
    for i in range(runs):   # alternate, so background load hits both alike
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            (on if mode == "on" else off).append(one_start(folder, manifest.command, mode, env))
    added = statistics.median(a - b for a, b in zip(on, off))
    return {"model": name, "language": manifest.language, "runs": runs,
            "sandboxed_ms": round(statistics.median(on) * 1000, 1),
            "unsandboxed_ms": round(statistics.median(off) * 1000, 1),
            "added_ms": round((statistics.median(on) - statistics.median(off)) * 1000, 1),
            "added_paired_ms": round(added * 1000, 1),
            "ratio": round(statistics.median(on) / statistics.median(off), 3),
            "added_min_ms": round((min(on) - min(off)) * 1000, 1),   # the least disturbed start of each
            "target_added_ms": TARGET_ADDED_MS,
            # the verdict takes the paired figure: each pair ran back to back, so load that comes and
            # goes on a shared machine cancels out (the difference of medians does not: R's starts vary by 50 ms)
            "ok": added * 1000 <= TARGET_ADDED_MS,
            "on_all_ms": [round(v * 1000, 1) for v in on], "off_all_ms": [round(v * 1000, 1) for v in off]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=11, help="starts per model and mode (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    from adapters import sandbox

    reason = sandbox.probe()
    if reason:
        print(f"no sandbox to measure: {reason}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    # `python3` in a manifest: this interpreter's folder first, as the tests and a venv would have it
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    out = {"bwrap_floor": bwrap_floor(max(args.runs, 11)), "models": [bench_model(m, args.runs, env)
                                                                      for m in args.models]}
    floor = out["bwrap_floor"]
    print(f"bwrap floor: `true` {floor['true_ms']} ms, in the sandbox {floor['bwrap_true_ms']} ms (medians)")
    print(f"{'model':<20}{'lang':<8}{'runs':>5}{'off ms':>10}{'on ms':>10}{'added ms':>10}{'paired':>9}"
          f"{'min-min':>9}{'ratio':>8}  target: paired <= {TARGET_ADDED_MS:g} ms added")
    for r in out["models"]:
        if "skipped" in r:
            print(f"{r['model']:<20}skipped: {r['skipped']}")
            continue
        print(f"{r['model']:<20}{r['language']:<8}{r['runs']:>5}{r['unsandboxed_ms']:>10}{r['sandboxed_ms']:>10}"
              f"{r['added_ms']:>10}{r['added_paired_ms']:>9}{r['added_min_ms']:>9}{r['ratio']:>8}  "
              f"{'ok' if r['ok'] else 'OVER'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(r.get("ok", True) for r in out["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
