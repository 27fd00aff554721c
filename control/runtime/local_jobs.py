"""Jobs of the local runtime: durable records, a bounded worker pool, `python -m adapters batch`.

A realtime model's job (its dataset streamed through its replicas, adapters/stream.py) takes the
same queue, records, progress and cancel; it runs in the worker thread itself (`_run_inline`),
its chunks sent through the runtime's own forwarding (local.py `_stream_call`).

Each job is one JSON file `state_dir/jobs/{id}.json`, rewritten atomically on every state
change; the adapter's stdout and stderr go to `state_dir/logs/jobs/{id}.{out,err}`.

Progress: the adapter keeps `progress.json` in the job's work folder (`--work`) up to date
while the model writes its scores (adapters/batch.py `Progress`, renamed into place a few times
a second at most). A running job's record takes it when the job is asked for — nothing is
written to the record while it runs — and the last one is kept in the record when it ends.

Restart policy (what a new runtime on the same state directory does with old records):
a job that was `queued` is queued again — nothing of it ran, so running it now is what the
submitter asked for. A job that was `running` ends `failed` with the error
"interrupted: the control service stopped while this job ran" instead of being re-run:
the adapter publishes results atomically, so an interrupted run left nothing half-written,
but the model may have side effects we cannot see, and a run that killed the service (out of
memory, say) would kill it again on every restart. The submitter can resubmit; an upload
event is deduplicated by its key, so a retry must be a new submission.

A warm spare: starting `python -m adapters batch` costs a few hundred milliseconds of imports
(google-cloud-storage above all) before a job can even fetch its dataset. When the adapter
command is this interpreter's `-m adapters`, the runner keeps one adapter process ready, its
imports done and a storage client made, blocked on its stdin; a job hands it its arguments and
log files there. A spare is only ever used with the environment it was started with, dies with
the runner (pdeathsig, `close`), and if it cannot take a job the job starts cold as before.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from adapters.batch import PROGRESS_FILE, wait_exit
from control.errors import NotFound
from control.runtime.base import CANCELLED_BY, Job, cancel_too_late
from control.runtime.local_procs import KILL_GRACE, TAIL_CHARS, Spare, stop_process, tail, with_pdeathsig
from control.durable import fsync_dir, move_aside, write_json_atomic
from control.runtime.local_store import utcnow

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the control service stopped while this job ran"
TIMEOUT_GRACE = 30.0     # seconds beyond manifest.batch.timeout before we kill the adapter ourselves


def new_job_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


KEYS_FILE = "event-keys.log"

class JobStore:
    """Job records: in memory for listing, one JSON file each on disk for durability.

    The event keys (exactly once per object generation) are also appended, fsynced, to
    `event-keys.log` before a job is recorded, so a record that is later found unreadable
    loses neither its key (a redelivered event is still a duplicate) nor its place in the
    list: it is moved aside and stands as a failed job saying so.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._keys: dict[str, str] = {}       # event_key -> job id
        self._key_of: dict[str, str] = {}     # job id -> event_key
        self.problems: list[str] = []
        #: job -> its adapter's progress file (set by the JobRunner that gives jobs work folders)
        self.progress_of: Optional[Callable[[Job], Path]] = None
        index = self._read_keys()
        for path in sorted(self.root.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                job = Job.from_json(data)
                if job.id != path.stem:
                    raise ValueError(f"it names job {job.id!r}")
            except (OSError, ValueError, TypeError, AttributeError) as e:
                job = self._unreadable(path, e, index.get(path.stem))
                data = {}
            self._jobs[job.id] = job
            key = data.get("event_key") or (index.get(job.id) or {}).get("key")
            if key:
                self._keys[key] = job.id
                self._key_of[job.id] = key
        # A key whose record never reached the disk: the submission was never answered, so the
        # sender redelivers, and that delivery must run: such keys are left out.

    def _read_keys(self) -> dict[str, dict]:
        index: dict[str, dict] = {}
        path = self.root / KEYS_FILE
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return index
        for line in lines:
            try:
                entry = json.loads(line)
                index[entry["job"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line: its job record (written after it) has the key too
        return index

    def _append_key(self, job: Job, key: str) -> None:
        line = json.dumps({"key": key, "job": job.id, "model": job.model, "dataset": job.dataset,
                           "at": job.created_at}) + "\n"
        path = self.root / KEYS_FILE
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.root)

    def _unreadable(self, path: Path, error: Exception, entry: Optional[dict]) -> Job:
        aside = move_aside(path)
        message = (f"job {path.stem}: its record was unreadable ({type(error).__name__}: {str(error)[:200]}); "
                   f"moved aside to {aside.name}")
        self.problems.append(message)
        log.error("%s", message)
        entry = entry or {}
        job = Job(id=path.stem, model=entry.get("model", "?"), version="?", status="failed",
                  dataset=entry.get("dataset", ""), created_at=entry.get("at", utcnow()),
                  error=f"this job's record was unreadable and was moved aside to {aside.name}; "
                        "its outcome is unknown", trigger="event" if entry else "api")
        write_json_atomic(path, {**job.to_json(), **({"event_key": entry["key"]} if entry.get("key") else {})})
        return job

    def save(self, job: Job) -> None:
        data = job.to_json()
        key = self._key_of.get(job.id)
        if key:
            data["event_key"] = key
        write_json_atomic(self.root / f"{job.id}.json", data)

    def add(self, job: Job, event_key: Optional[str]) -> None:
        with self.lock:
            if event_key:
                self._append_key(job, event_key)
                self._keys[event_key] = job.id
                self._key_of[job.id] = event_key
            self.save(job)
            self._jobs[job.id] = job

    def by_key(self, event_key: str) -> Optional[Job]:
        job_id = self._keys.get(event_key)
        return self._jobs.get(job_id) if job_id else None

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        self._refresh(job)
        return job

    def all(self) -> list[Job]:
        jobs = list(self._jobs.values())
        for job in jobs:
            self._refresh(job)
        return jobs

    def _refresh(self, job: Job) -> None:
        """A running job's progress, from its adapter's file (in memory only: the record on disk
        keeps the last one when the job ends)."""
        if job.status != "running" or self.progress_of is None:
            return
        doc = read_progress(self.progress_of(job))
        if doc is not None:
            with self.lock:
                if job.status == "running":
                    job.apply_progress(doc)

    def update(self, job: Job, **changes) -> None:
        with self.lock:
            for k, v in changes.items():
                setattr(job, k, v)
            self.save(job)


class JobRunner:
    """`concurrency` worker threads taking queued jobs in submission order."""

    def __init__(self, store: JobStore, *, concurrency: int, logs: Path,
                 command: Callable[[Job], tuple[list[str], float]], env: Callable[[], dict],
                 work: Optional[Callable[[Job], Path]] = None, spare_argv: Optional[list[str]] = None):
        self.store = store
        self._work_of = work  # job -> its work folder, removed when the job ends however it ends
        if work is not None:
            store.progress_of = lambda job: work(job) / PROGRESS_FILE
        self.concurrency = concurrency
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._command = command      # job -> (argv, timeout seconds)
        self._env = env
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._stops: dict[str, threading.Event] = {}   # jobs run in a worker thread (`_run_inline`)
        self._cancelled: dict[str, str] = {}
        self._running: dict[str, int] = {}
        self._closing = threading.Event()
        self._lock = threading.Lock()
        # a job takes a warm spare adapter: imports done, a storage client made (local_procs.Spare)
        self.spare = Spare(spare_argv or [], imports="adapters.batch,adapters.storage", warm="adapters.storage:client",
                           tag=("adapters", "batch", "--spare"), env=env)

    def recover(self) -> list[Job]:
        """Apply the restart policy (module docstring) to records left by a previous runtime;
        returns the jobs to queue again, oldest first."""
        requeue = []
        for job in sorted(self.store.all(), key=lambda j: (j.created_at, j.id)):
            if job.status == "running":
                self.store.update(job, status="failed", error=INTERRUPTED, finished_at=job.finished_at or utcnow())
            elif job.status == "queued":
                requeue.append(job)
        return requeue

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            for i in range(self.concurrency):
                t = threading.Thread(target=self._work, name=f"modelplane-job-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def enqueue(self, job_id: str) -> None:
        self._queue.put(job_id)

    def running(self, model: str) -> int:
        """Jobs of `model` running now."""
        return self._running.get(model, 0)

    def cancel(self, job_id: str, reason: str) -> None:
        """Fail a queued job now, or stop a running one (it is marked failed with `reason` once its
        adapter has exited: see `_run`)."""
        job = self.store.get(job_id)
        with self._lock:
            proc = self._procs.get(job_id)
            stop = self._stops.get(job_id)
            if stop is not None:
                self._cancelled[job_id] = reason
                stop.set()
                return
            if proc is None and job.status == "queued":
                # `_run` reads the status under this lock before it launches anything: never started
                self.store.update(job, status="failed", error=reason, finished_at=utcnow())
                return
            if proc is None:
                return
            self._cancelled[job_id] = reason
        stop_process(proc)

    def cancel_job(self, job_id: str, by: str, *, wait: float = KILL_GRACE + 10) -> Job:
        """`Runtime.cancel_job`: the job stopped and recorded, or Conflict if it had ended. Waits
        (up to `wait` seconds) until the worker has recorded how the stopped job ended."""
        job = self.store.get(job_id)
        with self.store.lock:
            if job.cancelled:
                return job
            if job.status not in ("queued", "running"):
                raise cancel_too_late(job)
        self.cancel(job_id, CANCELLED_BY + (by or "someone"))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._lock:
                gone = job_id not in self._procs and job_id not in self._stops
            if gone and job.status not in ("queued", "running"):
                break
            time.sleep(0.02)
        if job.status not in ("queued", "running") and not job.cancelled:
            raise cancel_too_late(job)  # it ended on its own first (a succeeded one had published its scores)
        return job

    def close(self) -> None:
        """Stop the workers; a running job's adapter is stopped and the job marked interrupted."""
        self._closing.set()
        with self._lock:
            procs = list(self._procs.items())
            for job_id, _ in procs:
                self._cancelled.setdefault(job_id, INTERRUPTED)
            for job_id, stop in self._stops.items():
                self._cancelled.setdefault(job_id, INTERRUPTED)
                stop.set()
        for _, proc in procs:
            stop_process(proc)
        self.spare.close()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=KILL_GRACE + 5)
        self._threads = []

    def _launch(self, job: Job, argv: list[str], out_path: Path, err_path: Path) -> subprocess.Popen:
        """The job's adapter process: the spare given this job, or a new process (under self._lock)."""
        proc = self.spare.take(argv, out_path, err_path)
        if proc is not None:
            return proc
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            return subprocess.Popen(with_pdeathsig(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=self._env(), start_new_session=True)

    # -- the worker ---------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._work_loop()
        finally:
            self.spare.close()   # its pdeathsig follows a worker thread

    def _work_loop(self) -> None:
        while not self._closing.is_set():
            self.spare.ensure()  # warm while idle, ready for the next job
            job_id = self._queue.get()
            if job_id is None or self._closing.is_set():
                return
            try:
                job = self.store.get(job_id)
            except NotFound:
                continue
            if job.status != "queued":
                continue
            try:
                self._run(job)
            except Exception as e:  # a bug here must not kill the worker or leave the job running
                log.exception("job %s: runner error", job.id)
                self.store.update(job, status="failed", error=f"runner error: {e}", finished_at=utcnow())

    def _run(self, job: Job) -> None:
        argv, timeout = self._command(job)
        if callable(argv):
            self._run_inline(job, argv)
            return
        out_path, err_path = self.logs / f"{job.id}.out", self.logs / f"{job.id}.err"
        with self._lock:
            if job.status != "queued" or self._closing.is_set():
                return  # cancelled while it waited (`cancel`)
            open(out_path, "wb").close()
            open(err_path, "wb").close()
            proc = self._launch(job, argv, out_path, err_path)
            self._procs[job.id] = proc
            self._running[job.model] = self._running.get(job.model, 0) + 1
        self.store.update(job, status="running", started_at=utcnow())
        log.info("job %s: running %s on %s", job.id, job.model, job.dataset)
        timed_out = False
        try:
            # wakes the moment the adapter exits (Popen.wait(timeout) would poll in 50 ms steps)
            timed_out = wait_exit(proc, timeout + TIMEOUT_GRACE) is None
        finally:
            stop_process(proc)    # also reaps anything the model left behind in the group
            progress = self._take_progress(job)
            with self._lock:
                self._procs.pop(job.id, None)
                self._running[job.model] -= 1
                cancelled = self._cancelled.pop(job.id, None)
        result = _last_json_line(out_path)
        self._finish(job, result, returncode=proc.returncode, stderr_tail=tail(err_path), progress=progress,
                     cancelled=cancelled, timed_out=timed_out, timeout=timeout)

    def _run_inline(self, job: Job, call: Callable[[Optional[Path], threading.Event], tuple[dict, int]]) -> None:
        """A job run in this worker thread (a realtime model's streamed job: local.py `_stream_call`),
        stopped by its event; recorded exactly as an adapter process's job."""
        stop = threading.Event()
        with self._lock:
            if job.status != "queued" or self._closing.is_set():
                return
            self._stops[job.id] = stop
            self._running[job.model] = self._running.get(job.model, 0) + 1
        self.store.update(job, status="running", started_at=utcnow())
        log.info("job %s: streaming %s through %s", job.id, job.dataset, job.model)
        result: Optional[dict] = None
        code, error_tail = 1, ""
        try:
            result, code = call(self._work_of(job) if self._work_of is not None else None, stop)
        except Exception as e:  # noqa: BLE001 - recorded as the job's failure
            log.exception("job %s: stream error", job.id)
            error_tail = f"{type(e).__name__}: {e}"
        finally:
            progress = self._take_progress(job)
            with self._lock:
                self._stops.pop(job.id, None)
                self._running[job.model] -= 1
                cancelled = self._cancelled.pop(job.id, None)
        if result is not None:  # as an adapter process prints it: plain JSON values only
            text = json.dumps(result)
            result = json.loads(text)
            (self.logs / f"{job.id}.out").write_text(text + "\n", encoding="utf-8")
        self._finish(job, result, returncode=code, stderr_tail=error_tail, progress=progress, cancelled=cancelled,
                     timed_out=False, timeout=0.0)

    def _take_progress(self, job: Job) -> Optional[dict]:
        """The job's last progress document; its work folder (the dataset copy, partial scores) removed."""
        if self._work_of is None:
            return None
        progress = read_progress(self._work_of(job) / PROGRESS_FILE)
        shutil.rmtree(self._work_of(job), ignore_errors=True)
        return progress

    def _finish(self, job: Job, result: Optional[dict], *, returncode: Optional[int], stderr_tail: str,
                progress: Optional[dict], cancelled: Optional[str], timed_out: bool, timeout: float) -> None:
        changes: dict = {"finished_at": utcnow(), "eta_seconds": None}
        if progress is not None:  # what it reached, kept
            done = Job(id=job.id, model=job.model, version=job.version, status="finished", dataset="", created_at="")
            done.apply_progress(progress)
            changes.update(rows_scored=done.rows_scored, rows_total=done.rows_total, progress_at=done.progress_at)
        if result:
            changes["input"] = result.get("input") or {}
            if result.get("results_uri") and result.get("status") != "failed":
                changes["results_uri"] = result["results_uri"]
            if result.get("rows") is not None:
                changes["rows"] = result["rows"]
            if result.get("problems"):
                changes["problems"] = result["problems"][:100]
                changes["invalid_values"] = result.get("invalid_values")
            if isinstance(result.get("score_summary"), dict) and result.get("status") != "failed":
                changes["score_summary"] = result["score_summary"]
        succeeded = (not timed_out and returncode == 0 and bool(result)
                     and result.get("status", "succeeded") != "failed")
        if cancelled and not succeeded:  # (a job that published its scores before the stop stays succeeded)
            changes.update(status="failed", error=cancelled, log_tail=stderr_tail, results_uri=None,
                           score_summary={})
        elif timed_out:
            changes.update(status="failed", log_tail=stderr_tail,
                           error=f"timed out: still running {timeout + TIMEOUT_GRACE:.0f}s after it started "
                                 f"(batch.timeout {timeout:.0f}s); stopped")
        elif succeeded:
            changes.update(status="succeeded", error=None,
                           log_tail=(result.get("log_tail") or stderr_tail)[-TAIL_CHARS:])
        else:
            error = (result or {}).get("error") or (
                f"the batch adapter exited with status {returncode}"
                + ("" if result else " without printing a result"))
            changes.update(status="failed", error=error,
                           log_tail=((result or {}).get("log_tail") or stderr_tail)[-TAIL_CHARS:])
        if changes["status"] == "succeeded" and changes.get("rows") is not None:
            changes.update(rows_scored=changes["rows"], rows_total=changes["rows"])  # every row, scored
        self.store.update(job, **changes)
        log.info("job %s: %s %s", job.id, changes["status"], changes.get("error") or "")


def read_progress(path: Path) -> Optional[dict]:
    """The adapter's progress document, or None (not written yet, or gone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_json_line(path: Path) -> Optional[dict]:
    """The adapter prints its result JSON as the last line of stdout."""
    text = tail(path, 1 << 16)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None
    return None
