"""Runs the locust scenarios of `locustfile.py` headless, as bounded subprocesses, and reads their CSV stats.

Locust is never imported here: its gevent monkey-patching would break the caller (pytest,
the benchmark), so every run is `python -m locust … --headless -t …` with a wall-clock bound.

    python -m loadtest.scenarios steady --host http://127.0.0.1:8080 -u 8 -t 20s
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"

# scenario -> the user classes of locustfile.py it runs
SCENARIOS = {
    "steady": ["SteadyUser"],
    "burst": ["BurstUser"],
    "mix": ["SteadyUser", "BatchUploader"],
}


@dataclass
class RequestStats:
    """One row of locust's `{prefix}_stats.csv` (times in ms)."""

    type: str
    name: str
    requests: int
    failures: int
    median_ms: float
    average_ms: float
    min_ms: float
    max_ms: float
    rps: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float


@dataclass
class ScenarioResult:
    scenario: str
    users: int
    spawn_rate: float
    duration: str
    returncode: int
    wall_s: float
    total: Optional[RequestStats]
    rows: list[RequestStats] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    csv_prefix: str = ""
    stderr_tail: str = ""

    @property
    def requests(self) -> int:
        return self.total.requests if self.total else 0

    @property
    def failed(self) -> int:
        return self.total.failures if self.total else 0

    def to_json(self) -> dict:
        return asdict(self)


def _num(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def parse_stats(path: Path) -> tuple[Optional[RequestStats], list[RequestStats]]:
    """(the Aggregated row, the per-request rows) of a locust `_stats.csv`."""
    total, rows = None, []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            row = RequestStats(
                type=rec.get("Type", ""), name=rec.get("Name", ""),
                requests=int(_num(rec.get("Request Count", "0"))), failures=int(_num(rec.get("Failure Count", "0"))),
                median_ms=_num(rec.get("Median Response Time")), average_ms=_num(rec.get("Average Response Time")),
                min_ms=_num(rec.get("Min Response Time")), max_ms=_num(rec.get("Max Response Time")),
                rps=_num(rec.get("Requests/s")), p50_ms=_num(rec.get("50%")), p90_ms=_num(rec.get("90%")),
                p95_ms=_num(rec.get("95%")), p99_ms=_num(rec.get("99%")),
            )
            if row.name == "Aggregated":
                total = row
            else:
                rows.append(row)
    return total, rows


def parse_failures(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [dict(rec) for rec in csv.DictReader(f)]


def run_scenario(scenario: str, *, host: str, out_dir: Path, users: int = 8, spawn_rate: float = 8,
                 duration: str = "10s", env: Optional[dict] = None, stop_timeout: int = 30,
                 timeout: Optional[float] = None) -> ScenarioResult:
    """Run one scenario headless against `host`; raise if locust hangs past its bound or writes no stats."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"locust_{scenario}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "-u", str(users), "-r", str(spawn_rate), "-t", duration, "--host", host,
           "--csv", str(prefix), "--stop-timeout", str(stop_timeout), "--loglevel", "WARNING",
           "--exit-code-on-error", "0", *SCENARIOS[scenario]]
    run_env = dict(os.environ, **(env or {}))
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    seconds = _seconds(duration)
    bound = timeout if timeout is not None else seconds + stop_timeout + 90
    started = time.monotonic()
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=bound,
                          cwd=str(Path(__file__).resolve().parent.parent))
    wall = time.monotonic() - started
    stats = Path(f"{prefix}_stats.csv")
    if not stats.exists():
        raise RuntimeError(f"locust {scenario} wrote no stats (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    total, rows = parse_stats(stats)
    return ScenarioResult(scenario=scenario, users=users, spawn_rate=spawn_rate, duration=duration,
                          returncode=proc.returncode, wall_s=wall, total=total, rows=rows,
                          failures=parse_failures(Path(f"{prefix}_failures.csv")), csv_prefix=str(prefix),
                          stderr_tail=proc.stderr[-3000:])


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    total, num = 0.0, ""
    for ch in duration.strip():
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
    return total + (float(num) if num else 0.0)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.scenarios", description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--host", required=True, help="the control service, e.g. http://127.0.0.1:8080")
    ap.add_argument("-u", "--users", type=int, default=8)
    ap.add_argument("-r", "--spawn-rate", type=float, default=None, help="default: all users in the first second")
    ap.add_argument("-t", "--duration", default="20s")
    ap.add_argument("--out", type=Path, default=Path("artifacts/locust"))
    ap.add_argument("--models", help="realtime models to call (comma-separated; default: every realtime model)")
    ap.add_argument("--batch-model", help="batch model for the mix scenario (default: the first batch model)")
    args = ap.parse_args(argv)
    env = {}
    if args.models:
        env["LOADTEST_MODELS"] = args.models
    if args.batch_model:
        env["LOADTEST_BATCH_MODEL"] = args.batch_model
    result = run_scenario(args.scenario, host=args.host, out_dir=args.out, users=args.users,
                          spawn_rate=args.spawn_rate or args.users, duration=args.duration, env=env)
    print(json.dumps({"scenario": result.scenario, "requests": result.requests, "failures": result.failed,
                      "p50_ms": result.total.p50_ms if result.total else None,
                      "p99_ms": result.total.p99_ms if result.total else None,
                      "rps": result.total.rps if result.total else None, "csv": result.csv_prefix}, indent=1))
    for row in result.rows:
        print(f"  {row.type:6} {row.name:50} n={row.requests:<6} fail={row.failures:<4} p50={row.p50_ms:g} p99={row.p99_ms:g} ms")
    return 0 if result.requests and not result.failed else 1


if __name__ == "__main__":
    sys.exit(main())
