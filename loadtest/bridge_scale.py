"""The bucket bridge at scale (issue 20): the watcher's memory, state file and one scan's time with
N objects under `incoming/`, today's watcher (bounded state) beside the previous one (a set of
every key ever sent, `git show 9cbe97c:control/watcher.py`, the last commit that had it).

    python -m loadtest.bridge_scale --objects 100000 [--json out.json]

What it does, all on 127.0.0.1 in a temporary folder, everything stopped at the end:

1. fills the embedded emulator's bucket directly on disk, the emulator stopped (its metadata
   file is one JSON document rewritten on every API write, so N API uploads cost O(N^2); the
   fill writes the same object resources and files once), and times that; it then times a few
   uploads through the API with N objects present, which is also what a real upload costs there;
2. starts the emulator and a counting sink (answers 202, GET /count says how many events came);
3. for each watcher, in its own process so that its RSS is its own: loads a steady state (every
   object already announced; for the previous watcher, its state file listing all N keys; for
   today's, the file that state turns into after one upgrade round), reports VmRSS before and
   after loading the state, the state file's size and entries, and the median of 3 scans
   (poll_once: one listing, nothing new to send) with the peak RSS;
4. runs today's watcher's loop and measures detection latency: an upload just after a round
   ended, until its event reaches the sink (the adaptive pause shows up here).

The emulator ignores `fields` and paging (it answers one page with whole resources), so a scan's
CPU and peak memory here are what a full-resource single-page listing costs; against GCS the
listing comes in pages of 1,000 with only the fields the watcher asks for, and takes a network
round trip per page.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bridge-scale"
MODELS = 20


def vmrss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- the bucket ---------------------------------------------------------------------------

def fill(data_dir: Path, n: int, span: float) -> list[str]:
    """Write `n` objects under incoming/ into the stopped emulator's store; returns their keys
    (`name#generation`). Their stamps are spread evenly over `span` seconds, the newest a minute
    ago: a bucket that filled up over time, as a real one does."""
    from gcp_storage_emulator.storage import Storage

    storage = Storage(use_memory_fs=False, data_dir=str(data_dir))
    objects = storage.objects.setdefault(BUCKET, {})
    newest = datetime.now(timezone.utc) - timedelta(minutes=1)
    keys = []
    body = b"a,b\n1,2\n"
    for i in range(n):
        when = newest - timedelta(seconds=span * (n - 1 - i) / max(n - 1, 1))
        generation = str((when - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1) * 1000)
        name = f"incoming/model-{i % MODELS:02d}/{i:07d}.csv"
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        objects[name] = {
            "kind": "storage#object", "id": f"{BUCKET}/{name}/{generation}",
            "selfLink": f"/storage/v1/b/{BUCKET}/o/{name}", "name": name, "bucket": BUCKET,
            "generation": generation, "metageneration": "1", "contentType": "text/csv",
            "timeCreated": stamp, "updated": stamp, "storageClass": "STANDARD", "timeStorageClassUpdated": stamp,
            "size": str(len(body)), "md5Hash": "1B2M2Y8AsgTpgAmY7PhCfg==", "crc32c": "AAAAAA==",
            "etag": "1B2M2Y8AsgTpgAmY7PhCfg==", "acl": [],
            "mediaLink": f"/download/storage/v1/b/{BUCKET}/o/{name}?generation={generation}&alt=media",
        }
        storage._store.write_bytes(storage._object_path(BUCKET, name), body)
        keys.append(f"{name}#{generation}")
    storage._write_config_to_file()
    return keys


class CountingSink:
    """POST: count and answer 202. GET: the count."""

    def __init__(self):
        self.count = 0
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: bytes = b""):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    sink.count += 1
                self._answer(202)

            def do_GET(self):
                self._answer(200, str(sink.count).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# -- one watcher, in a child process ----------------------------------------------------------

#: the last commit whose watcher kept a set of every key it sent (the baseline measured beside today's)
PREVIOUS = "9cbe97c"


def previous_watcher_module():
    """The previous watcher (every key in a set), from git at PREVIOUS, or None when git cannot
    say (a checkout without that history)."""
    try:
        source = subprocess.run(["git", "show", f"{PREVIOUS}:control/watcher.py"], cwd=ROOT, capture_output=True,
                                text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "_sent" not in source:
        return None
    module = types.ModuleType("previous_watcher")
    exec(compile(source, f"{PREVIOUS}:control/watcher.py", "exec"), module.__dict__)
    return module


def child(args) -> int:
    """Measure one watcher (`args.child`: previous | upgrade | current) and print one JSON line."""
    from google.cloud import storage

    from adapters.storage import emulator_credentials

    os.environ["STORAGE_EMULATOR_HOST"] = args.endpoint
    client = storage.Client(project="bench", credentials=emulator_credentials(args.key))
    if args.child == "previous":
        module = previous_watcher_module()
        if module is None:
            print(json.dumps({"skipped": f"no previous watcher at {PREVIOUS} (a checkout without that history)"}))
            return 0
        Watcher = module.Watcher
    else:
        from control.watcher import Watcher
    client.bucket(BUCKET).reload(timeout=30)  # connection and auth set up before any figure
    state = Path(args.state)
    out: dict = {"state_file_bytes_before": state.stat().st_size if state.exists() else 0}
    rss0 = vmrss_kib()
    t0 = time.perf_counter()
    watcher = Watcher(bucket=BUCKET, sink=args.sink, client=client, state_path=state, interval=args.interval,
                      timeout=120)
    out["state_load_s"] = time.perf_counter() - t0
    out["state_rss_kib"] = vmrss_kib() - rss0
    entries = getattr(watcher, "state_entries", None)
    out["state_entries"] = entries() if entries else len(watcher._sent)
    scans = []
    rounds = 1 if args.child == "upgrade" else 3
    for _ in range(rounds):
        t0 = time.perf_counter()
        sent = watcher.poll_once()
        scans.append(time.perf_counter() - t0)
        if sent:
            out["delivered_in_scan"] = out.get("delivered_in_scan", 0) + sent
    out["scan_s"] = statistics.median(scans)
    out["scans_s"] = scans
    out["peak_rss_kib"] = vmrss_kib("VmHWM")
    out["rss_after_scans_kib"] = vmrss_kib()
    out["state_file_bytes"] = state.stat().st_size if state.exists() else 0
    if entries:
        out["state_entries_after"] = entries()
    if args.child == "current" and args.latency:
        out.update(latency(watcher, client, args))
    print(json.dumps(out))
    return 0


def latency(watcher, client, args) -> dict:
    """Run the loop; upload one object right after a round ends; time until the sink has its event."""
    import requests

    def count() -> int:
        return int(requests.get(args.sink, timeout=10).text)

    watcher.last_scan = {}
    watcher.start()
    try:
        deadline = time.monotonic() + 600
        while "pause" not in watcher.last_scan and time.monotonic() < deadline:
            time.sleep(0.01)
        round_ = dict(watcher.last_scan)  # the next round replaces it
        before = count()
        t0 = time.perf_counter()
        client.bucket(BUCKET).blob("incoming/model-00/late-arrival.csv").upload_from_string("a,b\n3,4\n")
        uploaded = time.perf_counter() - t0
        while count() == before and time.monotonic() < deadline:
            time.sleep(0.02)
        seen = time.perf_counter() - t0
        return {"latency_upload_s": uploaded, "latency_upload_to_event_s": seen,
                "pause_s": round_.get("pause"), "loop_scan_s": round_.get("seconds")}
    finally:
        watcher.stop()


def run_child(kind: str, emu, sink: CountingSink, state: Path, args, *, latency: bool = False) -> dict:
    # --key=: a key may start with "-", which argparse would take for an option
    cmd = [sys.executable, "-m", "loadtest.bridge_scale", "--child", kind, "--endpoint", emu.endpoint,
           f"--key={emu.key}", "--sink", sink.url, "--state", str(state), "--interval", str(args.interval)]
    if latency:
        cmd.append("--latency")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} watcher failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report ---------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bridge_scale", description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--span-days", type=float, default=30.0,
                    help="the objects' stamps spread over this many days (default: %(default)s)")
    ap.add_argument("--interval", type=float, default=5.0, help="the watcher's interval (bridge.yaml: 5 s)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds each watcher process may take")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", choices=("previous", "upgrade", "current"), help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--sink", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    from control.emulator import Emulator

    report: dict = {"objects": args.objects, "span_days": args.span_days}
    with tempfile.TemporaryDirectory(prefix="bridge-scale-") as tmp:
        tmp = Path(tmp)
        emu = Emulator(tmp / "gcs", bucket=BUCKET)
        emu.start()
        emu.stop()  # the bucket exists; now the objects, straight into its store
        t0 = time.perf_counter()
        keys = fill(emu.data_dir, args.objects, args.span_days * 86400)
        report["fill_s"] = time.perf_counter() - t0
        report["emulator_meta_bytes"] = (emu.data_dir / ".cloudstorage" / ".meta").stat().st_size
        sink = CountingSink()
        t0 = time.perf_counter()
        emu.start(timeout=300)
        report["emulator_start_s"] = time.perf_counter() - t0
        try:
            # the previous watcher's steady state: every key it has sent
            previous_state = tmp / "previous.json"
            previous_state.write_text(json.dumps({"bucket": BUCKET, "sent": sorted(keys)}))
            current_state = tmp / "current.json"
            current_state.write_text(previous_state.read_text())
            report["previous"] = run_child("previous", emu, sink, previous_state, args)
            report["upgrade"] = run_child("upgrade", emu, sink, current_state, args)
            report["current"] = run_child("current", emu, sink, current_state, args, latency=True)
            report["events_at_sink"] = sink.count
        finally:
            sink.close()
            emu.stop()
    print_report(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def print_report(r: dict, args) -> None:
    mib = 1024.0
    print(f"bucket: {r['objects']:,} objects under incoming/, stamped over {r['span_days']:g} days (filled in {r['fill_s']:.1f}s straight into the "
          f"emulator's store; its metadata file {r['emulator_meta_bytes'] / mib / mib:.0f} MiB, "
          f"emulator start {r['emulator_start_s']:.1f}s)")
    rows = [("previous (set of every key)", r["previous"]), ("upgrade round (v1 file read once)", r["upgrade"]),
            ("current (mark + margin)", r["current"])]
    print(f"{'watcher':36} {'entries':>9} {'state file':>11} {'state RSS':>10} {'scan':>7} {'peak RSS':>9}")
    for label, x in rows:
        if "skipped" in x:
            print(f"{label:36} skipped: {x['skipped']}")
            continue
        entries = x.get("state_entries_after", x["state_entries"])
        print(f"{label:36} {entries:>9,} {x['state_file_bytes'] / 1024:>9.0f}Ki {x['state_rss_kib'] / mib:>8.1f}Mi "
              f"{x['scan_s']:>6.2f}s {x['peak_rss_kib'] / mib:>7.0f}Mi")
    c, p = r["current"], r["previous"]
    if "latency_upload_to_event_s" in c:
        print(f"detection (current, interval {args.interval:g}s): the pause after a {c['loop_scan_s']:.2f}s round is "
              f"{c['pause_s']:.1f}s; an upload right after a round ended reached the sink after "
              f"{c['latency_upload_to_event_s']:.1f}s (the upload itself took {c['latency_upload_s']:.2f}s)")
    if "scan_s" in p:
        busy = p["scan_s"] / (p["scan_s"] + args.interval)
        print(f"previous watcher at the same interval: lists {busy:.0%} of the time (scan {p['scan_s']:.2f}s "
              f"every {args.interval:g}s); current: at most {c['scan_s'] / (c['scan_s'] + max(args.interval, c['scan_s'] * 9)):.0%}")
    print(f"events at the sink: {r['events_at_sink']} (1 expected: the detection upload; nothing resent)")


if __name__ == "__main__":
    sys.exit(main())
