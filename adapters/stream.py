"""A realtime model run as a job: a dataset streamed through the model's replicas.

`run_stream` reads the dataset once, in chunks of at most `limits.max_rows` rows (and a body
under `limits.max_body`), checks each chunk's rows against the features exactly as a batch job
checks its dataset (adapters/schema.py `TextRowChecker`, rows numbered from 1 over the whole
file), and sends it as CSV (`Accept: text/csv`) with `send`, at most `concurrency` chunks in
flight (the model's `scaling.max`: a job scales out as live traffic does). Answers are joined in
row order into `scores.csv` (the answers' lines under one header: the passthrough columns, if
any, then the score), checked (one finite score per row) and summarised with the batch job's
`ScoreSummary`; `result.json` is the batch job's document (adapters/batch.py `Job`).

A chunk answered 503 or 429, or whose connection failed, is sent again, up to `RETRIES` times
with a growing pause; one answered 502 (the model broke off: it crashed, say) is sent again
alone, with no other chunk in flight (`Gate`), so a crash is blamed on the rows that cause it;
any other answer but 200 fails the job naming the chunk's rows. A failed
job publishes no scores: a gs:// destination is a resumable upload committed only at the end,
a local one a file renamed into place at the end.

Memory is bounded by `concurrency` chunks in flight and one being read: the dataset is read
from disk (a gs:// dataset is downloaded first, as a batch job does), never held whole.

`send(body) -> (status, headers, body)` is the only way to the model: the local runtime gives
its own forwarding (control/runtime/local_jobs.py), `python -m adapters stream --url URL` an
HTTP client (`http_sender`), which a Knative Job uses against the model's Service.
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import logging
import math
import shutil
import tempfile
import threading
import urllib.parse
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from . import storage
from .batch import (PROGRESS_FILE, SCORES_FILE, BatchFailure, Job, JobSpec, JobStopped, Progress, ProgressLog,
                    RowsFailure, _fetch, _publish_scores, check_header)
from .batch import ScoreSummary
from .manifest import Manifest
from .schema import TextRowChecker
from .storage import CHUNK, StorageError

log = logging.getLogger(__name__)

RETRIES = 8               # a chunk answered 503/429 or unreachable is sent again at most this many times
RETRY_STATUSES = (429, 503)
BACKOFF_FIRST = 0.2       # seconds before the first retry, doubled each time up to BACKOFF_MAX
BACKOFF_MAX = 5.0
BODY_SHARE = 0.9          # a chunk's body stays under this share of limits.max_body

Sender = Callable[[bytes], "tuple[int, Mapping[str, str], bytes]"]


class StreamFailure(BatchFailure):
    """The job cannot go on; the message names the rows."""

    def __init__(self, message: str, *, broke_off: Optional[tuple[int, int, str]] = None):
        super().__init__(message)
        self.broke_off = broke_off   # (first row, rows, the answer) when the model broke off on the chunk


def _rows(first: int, n: int) -> str:
    return f"row {first}" if n == 1 else f"rows {first}–{first + n - 1}"


def _answer_error(status: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
        text = doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        text = None
    if not text:
        text = body.decode("utf-8", "replace").strip()[:300] or "(no body)"
    return f"HTTP {status}: {str(text)[:1000]}"


# -- the dataset, a chunk at a time ---------------------------------------------------------

def _survey(path: Path) -> tuple[str, bool]:
    """(md5, plain): whether the file can be split by lines and commas (no quote, no CR, no blank line)."""
    h = hashlib.md5()
    plain = True
    last = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if plain and (b'"' in chunk or b"\r" in chunk or b"\n\n" in chunk
                          or (last == b"\n" and chunk[:1] == b"\n")):
                plain = False
            last = chunk[-1:]
    return h.hexdigest(), plain


class Chunk:
    __slots__ = ("first", "n", "body")

    def __init__(self, first: int, n: int, body: bytes):
        self.first, self.n, self.body = first, n, body


def read_chunks(path: Path, header_line: bytes, plain: bool, checker: TextRowChecker, *, max_rows: int,
                max_bytes: int) -> Iterator[Chunk]:
    """The dataset's data rows as CSV bodies (its header first), each row checked by `checker`."""
    if plain:
        yield from _plain_chunks(path, header_line, checker, max_rows=max_rows, max_bytes=max_bytes)
    else:
        yield from _csv_chunks(path, checker, max_rows=max_rows, max_bytes=max_bytes)


def _plain_chunks(path: Path, header_line: bytes, checker: TextRowChecker, *, max_rows: int,
                  max_bytes: int) -> Iterator[Chunk]:
    head = header_line + b"\n"
    first = 1
    lines: list[bytes] = []
    size = len(head)

    def flush() -> Chunk:
        nonlocal first, lines, size
        data = b"\n".join(lines) + b"\n"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            row = first + data[:e.start].count(b"\n")
            raise BatchFailure(f"the dataset is not UTF-8 text (row {row}); save it as UTF-8 CSV") from None
        checker.check_text(text, first)
        chunk = Chunk(first, len(lines), head + data)
        first += len(lines)
        lines, size = [], len(head)
        return chunk

    with open(path, "rb") as f:
        f.readline()  # the header
        carry = b""
        while block := f.read(CHUNK):
            block = carry + block
            cut = block.rfind(b"\n")
            if cut < 0:
                carry = block
                continue
            carry = block[cut + 1:]
            for line in block[:cut].split(b"\n"):
                lines.append(line)
                size += len(line) + 1
                if len(lines) >= max_rows or size >= max_bytes:
                    yield flush()
        if carry:
            lines.append(carry)
    if lines:
        yield flush()


def _csv_chunks(path: Path, checker: TextRowChecker, *, max_rows: int, max_bytes: int) -> Iterator[Chunk]:
    """The csv module's way, for files with quotes, CRs or blank lines (blank lines are not rows)."""
    first = 1
    records: list[list[str]] = []
    size = 0
    header: list[str] = []

    def flush() -> Chunk:
        nonlocal first, records, size
        checker.check(records, first)
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(header)
        w.writerows(records)
        chunk = Chunk(first, len(records), out.getvalue().encode("utf-8"))
        first += len(records)
        records, size = [], 0
        return chunk

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            for rec in reader:
                if not rec or not any(rec):
                    continue
                records.append(rec)
                size += sum(map(len, rec)) + len(rec) + 2
                if len(records) >= max_rows or size >= max_bytes:
                    yield flush()
    except UnicodeDecodeError:
        raise BatchFailure("the dataset is not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise BatchFailure(f"the dataset is not valid CSV at line {reader.line_num}: {e}") from None
    if records:
        yield flush()


# -- answers, joined in order ---------------------------------------------------------------

class Joiner:
    """The answers' CSV lines under one header, checked: one finite score per row, in order."""

    def __init__(self, manifest: Manifest, out, upload: Optional[storage.ScoresUpload], summary: ScoreSummary):
        self.score_name = manifest.score.name
        self.out, self.upload, self.summary = out, upload, summary
        self.header: Optional[bytes] = None
        self.column = 0
        self.rows = 0

    def take(self, chunk: Chunk, answer: bytes) -> None:
        where = _rows(chunk.first, chunk.n)
        if b"\r" in answer:
            answer = answer.replace(b"\r\n", b"\n")
        head, _, rest = answer.partition(b"\n")
        head = head.strip()
        if self.header is None:
            names = [c.strip() for c in next(csv.reader([head.decode("utf-8", "replace")]), [])]
            if self.score_name in names:
                self.column = names.index(self.score_name)
            elif len(names) == 1:
                self.column = 0
            else:
                raise StreamFailure(f"the model's answer for {where} has columns {', '.join(names) or '(none)'}; "
                                    f"expected its score column {self.score_name!r}")
            self.header = head
            self._write(head + b"\n")
        elif head != self.header:
            raise StreamFailure(f"the model's answer for {where} has the header {head[:200].decode('utf-8', 'replace')!r}, "
                                f"not {self.header[:200].decode('utf-8', 'replace')!r} as before")
        lines = rest.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if len(lines) != chunk.n:
            raise StreamFailure(f"the model answered {len(lines)} score(s) for {where} ({chunk.n} row(s)); "
                                "expected one score per row")
        values = self._scores(lines, chunk.first)
        self.summary.add(values)
        self.rows += chunk.n
        self._write(b"\n".join(lines) + b"\n")

    def _scores(self, lines: list[bytes], first: int) -> list[float]:
        try:
            if self.column == 0 and b"," not in self.header:
                values = list(map(float, lines))
            else:
                values = [float(rec[self.column]) for rec in csv.reader(io.StringIO(
                    b"\n".join(lines).decode("utf-8", "replace")))]
            if math.isfinite(math.fsum(values)) and len(values) == len(lines):
                return values
        except (ValueError, IndexError, OverflowError):
            pass
        for i, line in enumerate(lines):  # name the first bad one
            try:
                rec = next(csv.reader([line.decode("utf-8", "replace")]))
                v = float(rec[self.column])
                if math.isfinite(v):
                    continue
            except (ValueError, IndexError, StopIteration):
                pass
            shown = line[:60].decode("utf-8", "replace")
            raise StreamFailure(f"the model's score for row {first + i} is not a finite number: {shown!r}")
        raise StreamFailure(f"the model's scores for {_rows(first, len(lines))} could not be read")

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        if self.upload is not None:
            self.upload.write(data)


# -- sending ---------------------------------------------------------------------------------

class Gate:
    """Chunks go out side by side (shared); a chunk whose model broke off goes out again alone
    (exclusive: once the chunks in flight are answered, and none beside it), so a model that
    crashes on some rows is blamed on those rows, not on the chunks that were in flight with them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0

    def shared(self) -> "_Hold":
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            self._shared += 1
        return _Hold(self, alone=False)

    def alone(self) -> "_Hold":
        with self._cond:
            self._waiting += 1
            while self._alone or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._alone = True
        return _Hold(self, alone=True)

    def _release(self, alone: bool) -> None:
        with self._cond:
            if alone:
                self._alone = False
            else:
                self._shared -= 1
            self._cond.notify_all()


class _Hold:
    def __init__(self, gate: Gate, *, alone: bool):
        self.gate, self.alone = gate, alone

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        self.gate._release(self.alone)


BROKE_OFF = (502,)   # the model broke off (crashed, closed the connection): sent again alone, once


def send_chunk(send: Sender, chunk: Chunk, stop: threading.Event, *, retries: int = RETRIES,
               gate: Optional[Gate] = None, alone: bool = True) -> bytes:
    """The model's answer to one chunk (200), sent again on 503/429/connection errors, and once
    alone on a 502 (`Gate`; not with `alone=False`); StreamFailure else, naming the chunk's rows."""
    where = _rows(chunk.first, chunk.n)
    gate = gate or Gate()
    last = ""
    solo = False
    for attempt in range(retries + 1):
        if stop.is_set():
            raise JobStopped("stopped")
        broke = False
        try:
            with gate.alone() if solo else gate.shared():
                status, headers, data = send(chunk.body)
        except (OSError, http.client.HTTPException) as e:
            last = f"the connection failed ({type(e).__name__}: {e})"
            pause, broke = None, True
        else:
            if status == 200:
                return data
            if status in BROKE_OFF:
                if solo or not alone:
                    raise StreamFailure(f"the model could not score {where}: {_answer_error(status, data)}"
                                        + (" (again when they were sent alone)" if solo else ""),
                                        broke_off=(chunk.first, chunk.n, _answer_error(status, data)))
                last, pause, broke = _answer_error(status, data), None, True
            elif status not in RETRY_STATUSES:
                raise StreamFailure(f"the model could not score {where}: {_answer_error(status, data)}")
            else:
                last = _answer_error(status, data)
                pause = _retry_after(headers)
        solo = solo or (broke and alone)
        if attempt == retries:
            break
        wait = pause if pause is not None else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** attempt)
        log.info("%s: %s; sending them again in %.1fs", where, last, wait)
        if stop.wait(wait):
            raise JobStopped("stopped")
    raise StreamFailure(f"the model could not score {where} after {retries + 1} tries: {last}")


def _retry_after(headers: Mapping[str, str]) -> Optional[float]:
    for k, v in (headers or {}).items():
        if k.lower() == "retry-after":
            try:
                return min(BACKOFF_MAX, max(0.0, float(v)))
            except ValueError:
                return None
    return None


def http_sender(url: str, *, timeout: float, headers: Optional[Mapping[str, str]] = None) -> Sender:
    """POST a chunk to `url` (…/predict) as CSV asking for CSV, one kept-alive connection per thread."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BatchFailure(f"--url {url!r}: expected http(s)://host[:port]/path")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    base = {"Content-Type": "text/csv", "Accept": "text/csv", **(headers or {})}
    local = threading.local()

    def send(body: bytes):
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = cls(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers=base)
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            conn.close()
            local.conn = None
            raise
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            local.conn = None
        return resp.status, dict(resp.getheaders()), data

    return send


def _broke_off(first: StreamFailure, pending, stop: threading.Event) -> StreamFailure:
    """The model broke off on a chunk: the chunks in flight with it are waited for, and every one it
    broke off on is named (whichever of them made it crash, it is among them)."""
    ranges = [first.broke_off]
    for future, _ in list(pending):
        while not wait([future], timeout=0.1).done:
            if stop.is_set():
                return first
        error = future.exception()
        if isinstance(error, StreamFailure) and error.broke_off is not None:
            ranges.append(error.broke_off)
    if len(ranges) == 1:
        return first
    ranges.sort()
    names = ", ".join(_rows(a, n).removeprefix("rows ").removeprefix("row ") for a, n, _ in ranges)
    return StreamFailure(f"the model broke off while scoring rows {names} (one of them made it fail): "
                         f"{ranges[0][2]}", broke_off=ranges[0])


# -- the whole job ---------------------------------------------------------------------------

def run_stream(manifest: Manifest, spec: JobSpec, send: Sender, *, concurrency: Optional[int] = None,
               work: Optional[Path] = None, stop: Optional[threading.Event] = None,
               retries: int = RETRIES, alone: bool = True, log_progress: bool = False) -> tuple[dict, int]:
    """Run one job end to end; (result JSON, exit status). Never raises for a job failure.

    `alone=False`: a chunk the model broke off on (502) is not sent again alone, for a `send` that
    already sends a broken-off request once more elsewhere (the local runtime's forwarding: one
    more try would crash one more replica, and enough crashes stop the model for live traffic
    too). The job then fails naming every chunk in flight the model broke off on.

    `log_progress`: progress lines on stderr as well (adapters/batch.py `ProgressLog`), which the
    cluster runtime reads from a Job's log."""
    if manifest.kind != "realtime":
        raise ValueError(f"{manifest.ref} is a {manifest.kind} model; streaming is for realtime models")
    stop = stop or threading.Event()
    concurrency = max(1, concurrency or manifest.scaling.max)
    max_rows = manifest.limits.max_rows
    max_bytes = max(1024, int(manifest.limits.max_body_bytes * BODY_SHARE))
    job = Job(manifest, spec)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix=f"modelplane-{manifest.name}-")) if own_work else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    progress = Progress(None if own_work else work / PROGRESS_FILE)
    (work / PROGRESS_FILE).unlink(missing_ok=True)
    upload: Optional[storage.ScoresUpload] = None
    pool: Optional[ThreadPoolExecutor] = None
    progress_log: Optional[ProgressLog] = None
    try:
        dataset = _fetch(spec, work, job)
        job.mark("fetched")
        header = check_header(manifest, dataset)
        md5, plain = _survey(dataset)
        job.result["input"]["md5"] = md5
        from .batch import scan_input

        _, total = scan_input(dataset)  # C-speed for a plain file: the total, for progress and ETA
        job.result["rows"] = total
        progress.update(total=total)
        if log_progress:
            progress_log = ProgressLog(total)
            progress_log.update(0)
        with open(dataset, "rb") as f:
            header_line = f.readline().rstrip(b"\r\n").removeprefix(b"\xef\xbb\xbf")
        scores_uri = storage.join(spec.results_prefix, SCORES_FILE)
        if storage.is_gcs(scores_uri):
            upload = storage.ScoresUpload(scores_uri)
        out_path = work / "out" / SCORES_FILE
        out_path.parent.mkdir(parents=True, exist_ok=True)
        summary = ScoreSummary()
        checker = TextRowChecker(manifest, header)
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"stream-{manifest.name}")
        gate = Gate()
        pending: deque[tuple[Future, Chunk]] = deque()
        with open(out_path, "wb") as out:
            joiner = Joiner(manifest, out, upload, summary)

            def take_oldest() -> None:
                future, chunk = pending[0]
                while not wait([future], timeout=0.1).done:  # a stop does not wait for slow answers
                    if stop.is_set():
                        raise JobStopped("stopped")
                pending.popleft()
                try:
                    answer = future.result()
                except StreamFailure as e:
                    if e.broke_off is None:
                        raise
                    raise _broke_off(e, pending, stop) from None
                joiner.take(chunk, answer)
                progress.update(scored=joiner.rows)
                if progress_log is not None:
                    progress_log.update(joiner.rows)

            for chunk in read_chunks(dataset, header_line, plain, checker, max_rows=max_rows, max_bytes=max_bytes):
                if stop.is_set():
                    raise JobStopped("stopped")
                if checker.total:
                    continue  # a bad row: nothing more is sent, every row is still checked (all named)
                pending.append((pool.submit(send_chunk, send, chunk, stop, retries=retries, gate=gate,
                                            alone=alone), chunk))
                while pending and (len(pending) >= concurrency or pending[0][0].done()):
                    take_oldest()
            if checker.total:
                raise RowsFailure(checker)
            while pending:
                take_oldest()
            if joiner.header is None:   # a dataset of no rows: its scores, a header alone
                joiner._write(manifest.score.name.encode() + b"\n")
        job.mark("scored")
        if joiner.rows != total:
            raise StreamFailure(f"{joiner.rows} row(s) were scored of the dataset's {total}")
        job.result["score_summary"] = summary.result()
        _publish_scores(out_path, scores_uri, upload, streamed=True)
        upload = None
        job.succeed(joiner.rows, scores_uri)
        progress.update(scored=joiner.rows, final=True)
        if progress_log is not None:
            progress_log.update(joiner.rows, final=True)
        job.store_result()
    except (BatchFailure, StorageError, OSError) as e:
        stop.set()  # chunks still waiting to be sent are not
        job.fail(str(e), "", cause=e)
        progress.update(final=True)
        if progress_log is not None:
            progress_log.update(progress.scored, final=True)
        job.store_result()
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if upload is not None:
            upload.abort()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return job.done()
