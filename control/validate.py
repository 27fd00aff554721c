"""`modelplane validate DIR…`: the manifest check and a live contract test, what CI runs on a pull request.

For each model folder: the manifest is loaded strictly (every problem named by file, line
and field), the sample's header is checked against the features, then the model is run
for real behind the adapter exactly as it will be served: a realtime model is started
with `python -m adapters serve` and sent its sample through `POST /predict` (CSV) and the
Open Inference Protocol; a batch model is run with `python -m adapters batch` on its sample.
Each step prints ✓ or ✗ and how long it took; any ✗ makes the exit status non-zero.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import adapters
from adapters.manifest import MANIFEST_FILE, Manifest, ManifestError, load_manifest
from control.runtime.local_procs import descendants
from adapters.schema import RowValidator

DEFAULT_TIMEOUT = 60.0
STOP_GRACE_SECONDS = 5.0
TAIL_LINES = 15
_DATATYPES = {"number": "FP64", "integer": "INT64", "boolean": "BOOL", "string": "BYTES"}


class CheckFailed(Exception):
    """One check failed; the message is for the data scientist who owns the model."""


class Report:
    """Prints one line per check as it finishes, so a slow step is visible while it runs."""

    #: (what, detail) of every failed check, for a caller that reports them elsewhere
    failures: list

    def __init__(self, stream: TextIO):
        self.stream = stream
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            "✓✗→".encode(encoding)
            self.ok, self.bad = "✓", "✗"
        except (UnicodeEncodeError, LookupError):
            self.ok, self.bad = "ok  ", "FAIL"
        self.failed = False
        self.failures = []

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def check(self, passed: bool, what: str, seconds: Optional[float], detail: str = "") -> None:
        took = f"  {seconds:.2f}s" if seconds is not None else ""
        self.line(f"  {self.ok if passed else self.bad} {what}{took}")
        if detail:
            for text in detail.rstrip("\n").splitlines():
                self.line(f"      {text}")
        if not passed:
            self.failed = True
            self.failures.append((what, detail))


# -- helpers ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines a process wrote, or a note that it wrote nothing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no output)"
    kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(kept) if kept else "(no output)"


def read_sample(manifest: Manifest) -> tuple[bytes, list[str], list[list[str]]]:
    """The sample file's bytes, header and records; CheckFailed when it cannot be used."""
    path = manifest.sample_path
    if path is None:
        raise CheckFailed(f"no sample rows to test with: add `sample: sample.csv` to {MANIFEST_FILE} "
                          "(a header and a few real rows)")
    data = path.read_bytes()
    try:
        reader = csv.reader(data.decode("utf-8-sig").splitlines())
        header = next(reader, None)
        records = [rec for rec in reader if rec]
    except (UnicodeDecodeError, csv.Error) as e:
        raise CheckFailed(f"{path}: not a readable UTF-8 CSV file ({e})") from None
    if not header:
        raise CheckFailed(f"{path} is empty: expected a header row and a few rows")
    problems = RowValidator(manifest).check_header(header)
    if problems:
        raise CheckFailed(f"{path}: " + "; ".join(problems))
    if not records:
        raise CheckFailed(f"{path} has a header but no rows: add a few real rows")
    return data, header, records


def check_scores(scores: Any, n_rows: int, where: str) -> None:
    if not isinstance(scores, list):
        raise CheckFailed(f"{where}: expected a list of scores; got {str(scores)[:200]}")
    if len(scores) != n_rows:
        raise CheckFailed(f"{where}: {len(scores)} score(s) for {n_rows} row(s)")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise CheckFailed(f"{where}: row {i + 1} got {s!r}, expected a finite number")  # rows from 1


def check_passthrough(manifest: Manifest, carried: Any, n_rows: int, where: str) -> None:
    """The passthrough columns (the sample's ids) come back beside the scores, one value per row."""
    names = manifest.passthrough_names
    if not names:
        return
    if not isinstance(carried, dict) or any(not isinstance(carried.get(p.name), list) for p in manifest.passthrough
                                            if p.required):
        raise CheckFailed(f"{where}: the passthrough columns {', '.join(names)} did not come back beside the scores")
    for name, values in carried.items():
        if isinstance(values, list) and len(values) != n_rows:
            raise CheckFailed(f"{where}: {len(values)} value(s) of passthrough column {name} for {n_rows} row(s)")


def _adapter_env() -> dict[str, str]:
    """The environment for `python -m adapters`: this checkout's packages importable from anywhere."""
    env = dict(os.environ)
    root = str(Path(adapters.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"    # a zombie is already dead
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


def stop(proc: subprocess.Popen) -> list[int]:
    """SIGTERM the process group, SIGKILL whatever is left after a grace period: no orphans.

    Returns the pids still alive afterwards (none, unless something is badly wrong)."""
    below = descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # anything the adapter left behind in its group
    except (ProcessLookupError, PermissionError):
        pass
    for pid in below:          # the model, if it was started in a session of its own
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 1.0
    left = [pid for pid in below if _alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [pid for pid in left if _alive(pid)]
    return left


def request(port: int, method: str, path: str, body: Optional[bytes] = None, *,
            content_type: str = "application/json", timeout: float) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, raw.decode("utf-8", "replace")


def _answer_error(status: int, answer: Any) -> str:
    if isinstance(answer, dict) and "error" in answer:
        text = str(answer["error"])
        for p in (answer.get("problems") or [])[:5]:
            text += f"\n  row {p.get('row')}, {p.get('field')}: {p.get('error')}"
        return f"answered {status}: {text}"
    return f"answered {status}: {str(answer)[:300]}"


# -- the live tests ---------------------------------------------------------------------

def test_realtime(manifest: Manifest, sample: bytes, header: list[str], records: list[list[str]],
                  report: Report, *, timeout: float) -> None:
    n = len(records)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="modelplane-validate-") as tmp:
        log_path = Path(tmp) / "adapter.log"
        t0 = time.monotonic()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "adapters", "serve", str(manifest.folder), "--port", str(port)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=_adapter_env(), start_new_session=True)
        try:
            _wait_ready(proc, port, log_path, report, timeout=timeout, t0=t0)
            if report.failed:
                return
            t = time.monotonic()
            try:
                status, answer = request(port, "POST", "/predict", sample, content_type="text/csv", timeout=timeout)
                if status != 200:
                    raise CheckFailed(f"POST /predict {_answer_error(status, answer)}")
                check_scores(answer.get("scores") if isinstance(answer, dict) else answer, n, "POST /predict")
                check_passthrough(manifest, answer.get("passthrough"), n, "POST /predict")
                report.check(True, f"POST /predict (sample.csv as CSV): {n} rows → {n} finite scores", time.monotonic() - t)
            except (CheckFailed, OSError) as e:
                report.check(False, "POST /predict (sample.csv as CSV)", time.monotonic() - t, _explain(e, log_path))

            path = f"/v2/models/{manifest.name}/infer"
            t = time.monotonic()
            try:
                status, answer = request(port, "POST", path, json.dumps(infer_body(manifest, header, records)).encode(),
                                         timeout=timeout)
                if status != 200:
                    raise CheckFailed(f"POST {path} {_answer_error(status, answer)}")
                outputs = answer.get("outputs") if isinstance(answer, dict) else None
                if not outputs or not isinstance(outputs[0], dict):
                    raise CheckFailed(f"POST {path}: no outputs in the answer: {str(answer)[:300]}")
                check_scores(outputs[0].get("data"), n, f"POST {path}")
                check_passthrough(manifest, {o.get("name"): o.get("data") for o in outputs[1:] if isinstance(o, dict)},
                                  n, f"POST {path}")
                report.check(True, f"POST {path} (Open Inference Protocol): {n} finite scores", time.monotonic() - t)
            except (CheckFailed, OSError) as e:
                report.check(False, f"POST {path} (Open Inference Protocol)", time.monotonic() - t, _explain(e, log_path))
        finally:
            t = time.monotonic()
            left = stop(proc)
            report.check(not left, "stopped the adapter and the model", time.monotonic() - t,
                         f"process(es) {', '.join(map(str, left))} still running after SIGKILL" if left else "")


def _explain(e: Exception, log_path: Path) -> str:
    if isinstance(e, CheckFailed):
        return str(e)
    return f"no answer ({e}); the adapter's output ends with:\n{tail(log_path)}"


def _wait_ready(proc: subprocess.Popen, port: int, log_path: Path, report: Report, *, timeout: float, t0: float) -> None:
    deadline = t0 + timeout
    last = "no connection yet"
    while True:
        status = proc.poll()
        if status is not None:
            how = f"status {status}" if status >= 0 else f"signal {-status}"
            report.check(False, f"failed to start: the model exited ({how}) before it was ready",
                         time.monotonic() - t0, f"its output ends with:\n{tail(log_path)}")
            return
        try:
            code, _ = request(port, "GET", "/v2/health/ready", timeout=1.0)
            if code == 200:
                report.check(True, "started; ready (its GET /health answers 200)", time.monotonic() - t0)
                return
            last = f"GET /v2/health/ready answered {code}"
        except OSError as e:
            last = f"GET /v2/health/ready: {e.strerror or e}"
        if time.monotonic() >= deadline:
            report.check(False, f"never became healthy within {timeout:g} s: the model's GET /health never "
                               f"answered 200 (last: {last})",
                         time.monotonic() - t0, f"its output ends with:\n{tail(log_path)}")
            return
        time.sleep(0.05)


def infer_body(manifest: Manifest, header: list[str], records: list[list[str]]) -> dict:
    """The sample as an Open Inference Protocol request: one input per feature (and passthrough)
    column, null where empty."""
    rows = RowValidator(manifest).rows_from_csv(header, records)
    inputs = []
    for f in [*manifest.features, *manifest.passthrough]:
        if f.name not in header:
            continue
        data = [row.get(f.name) for row in rows]
        inputs.append({"name": f.name, "shape": [len(rows)], "datatype": _DATATYPES[f.type], "data": data})
    return {"inputs": inputs}


def test_batch(manifest: Manifest, n_rows: int, report: Report, *, timeout: float,
               adapter: Optional[list[str]] = None, env: Optional[dict] = None, job: str = "validate") -> None:
    """Run the sample through `python -m adapters batch` (or `adapter` + `batch`: the local
    runtime's own command and environment, when it checks a version at deploy)."""
    with tempfile.TemporaryDirectory(prefix="modelplane-validate-") as tmp:
        results = Path(tmp) / "results"
        log_path = Path(tmp) / "adapter.log"
        t0 = time.monotonic()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [*(adapter or [sys.executable, "-m", "adapters"]), "batch", str(manifest.folder),
                 "--dataset", str(manifest.sample_path), "--results", str(results) + os.sep, "--job", job],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
                env=env if env is not None else _adapter_env(), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            report.check(False, f"batch run did not finish within {timeout:g} s on {n_rows} sample rows",
                         time.monotonic() - t0, f"its output ends with:\n{tail(log_path)}")
            return
        finally:
            stop(proc)
        took = time.monotonic() - t0
        lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln.strip()]
        try:
            result = json.loads(lines[-1]) if lines else None
        except ValueError:
            result = None
        if not isinstance(result, dict):
            report.check(False, f"batch run printed no result JSON (exit status {proc.returncode})", took,
                         f"its output ends with:\n{tail(log_path)}")
            return
        if result.get("status") != "succeeded" or proc.returncode != 0:
            detail = str(result.get("error") or "no error message")
            if result.get("log_tail"):
                detail += "\nthe model's output ends with:\n" + "\n".join(str(result["log_tail"]).splitlines()[-TAIL_LINES:])
            report.check(False, f"batch run failed (status {result.get('status')}, exit {proc.returncode})", took, detail)
            return
        if result.get("rows") != n_rows:
            report.check(False, "batch run", took, f"the result says {result.get('rows')} row(s); sample.csv has {n_rows}")
            return
        report.check(True, f"batch run on sample.csv: status succeeded, {n_rows} rows", took)

        t = time.monotonic()
        scores_path = results / "scores.csv"
        try:
            with open(scores_path, newline="", encoding="utf-8") as f:
                recs = [r for r in csv.reader(f) if r]
            values = [float(r[-1]) for r in recs[1:]]
            check_scores(values, n_rows, "scores.csv")
            names = manifest.passthrough_names
            if names and recs[0][:len(names)] != names:
                raise CheckFailed(f"expected the passthrough columns {', '.join(names)} first; the header is "
                                  f"{','.join(recs[0])}")
            report.check(True, f"scores.csv: a header and {n_rows} finite scores", time.monotonic() - t)
        except (OSError, ValueError, IndexError, CheckFailed) as e:
            report.check(False, "scores.csv", time.monotonic() - t, f"{scores_path}: {e}")


# -- entry points ---------------------------------------------------------------------------

def model_dirs(dirs: list[str | Path]) -> list[Path]:
    """Each DIR is a model folder, or a folder of model folders (e.g. `models/`).

    Plain files other than a manifest are left out, so `modelplane validate models/*`
    checks the model folders beside a README or a training script.
    """
    out = []
    for d in map(Path, dirs):
        if d.is_file() and d.suffix not in (".yaml", ".yml"):
            continue
        if d.is_dir() and not (d / MANIFEST_FILE).exists():
            subs = sorted(p for p in d.iterdir() if (p / MANIFEST_FILE).is_file())
            if subs:
                out.extend(subs)
                continue
        out.append(d)
    return out


def validate_one(folder: Path, report: Report, *, timeout: float) -> bool:
    report.failed = False
    report.line(f"{folder}")
    t = time.monotonic()
    try:
        manifest = load_manifest(folder)
    except ManifestError as e:
        report.check(False, f"manifest ({len(e.problems)} problem(s))", time.monotonic() - t, e.describe())
        return False
    report.check(True, f"manifest: {manifest.name} {manifest.version}, {manifest.kind}, {manifest.language}, "
                       f"{len(manifest.features)} features", time.monotonic() - t)
    t = time.monotonic()
    try:
        data, header, records = read_sample(manifest)
    except (CheckFailed, OSError) as e:
        report.check(False, "sample", time.monotonic() - t, str(e))
        return False
    report.check(True, f"sample: {len(records)} rows, header matches the features", time.monotonic() - t)
    if manifest.kind == "realtime":
        test_realtime(manifest, data, header, records, report, timeout=timeout)
    else:
        test_batch(manifest, len(records), report, timeout=timeout)
    return not report.failed


def run(dirs: list[str | Path], *, timeout: float = DEFAULT_TIMEOUT, stream: Optional[TextIO] = None) -> int:
    """Validate each model folder; print what was checked; return the exit status (0 = all valid)."""
    report = Report(stream if stream is not None else sys.stdout)
    folders = model_dirs(dirs)
    if not folders:
        report.line("no model folders given")
        return 2
    t0 = time.monotonic()
    bad = []
    for i, folder in enumerate(folders):
        if i:
            report.line()
        if not validate_one(folder, report, timeout=timeout):
            bad.append(folder)
    took = time.monotonic() - t0
    report.line()
    if bad:
        report.line(f"{report.bad} {len(bad)} of {len(folders)} model(s) failed: {', '.join(map(str, bad))}  ({took:.1f}s)")
        return 1
    report.line(f"{report.ok} {len(folders)} model(s) valid  ({took:.1f}s)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="modelplane validate", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="a model folder (with model.yaml), or a folder of them")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                    help=f"seconds a model may take to become ready or to finish its batch run (default {DEFAULT_TIMEOUT:g})")
    args = ap.parse_args(argv)
    return run(args.dirs, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
