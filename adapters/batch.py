"""The batch adapter: fetch a dataset, run the model on it (env DATASET/RESULTS), check, publish.

`run_batch` does all of it in one process. In a Knative Job pod, where the model image may
have no Python, the same steps are split between two containers sharing a work folder:
`job_step` (adapter image: fetch, then publish) and the model's command wrapped by
`score_step` (model image).

Memory stays flat whatever the dataset size: files are streamed in 1 MiB chunks, rows are
counted and scores checked chunk by chunk (a C-speed newline count and `sum(map(float, …))`
on the common path, the csv module only when the file has quotes or blank lines).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import operator
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import storage
from .manifest import Manifest
from .procs import PREEXEC, describe_exit, die_with_parent, kill_group  # noqa: F401 - re-exported (tests, control)
from .schema import RowValidator, TextRowChecker
from .inputs import Reservoir, summarize_file
from .stats import quantile
from .storage import CHUNK, StorageError

log = logging.getLogger(__name__)

FINALIZED = "google.cloud.storage.object.v1.finalized"
SCORES_FILE = "scores.csv"
DATASET_FILE = "dataset.csv"  # in the work folder: what the model reads as DATASET (when fetched or copied)
INPUT_FILE = "input.csv"  # in the work folder: a dataset with passthrough columns as fetched, before the split
PASSTHROUGH_FILE = "passthrough.csv"  # in the work folder: the passthrough columns, row for row
PUBLISHED_FILE = "published.csv"  # in the work folder: the passthrough columns joined to the model's scores
MODEL_OUT = "out"  # run_batch: the folder in the work folder where the model writes RESULTS
RESULT_FILE = "result.json"
KILL_GRACE_SECONDS = 5.0
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 8192
FOLLOW_INTERVAL = 0.05  # seconds between looks at the results file while the model runs (not after it exits)
PROGRESS_FILE = "progress.json"  # in the work folder: rows scored so far, for whoever runs the job
PROGRESS_INTERVAL = 0.25  # seconds: the progress file is rewritten at most this often
PROGRESS_LOG_INTERVAL = 5.0  # seconds: a Knative Job's adapter logs a progress line at most this often
FOLLOW_READ = 256 << 10  # the follower reads (and checks) this much at a time: it runs beside the row
                         # check, so its lists of lines stay small and the adapter's memory flat


class BatchFailure(Exception):
    """A job that cannot succeed; the message is written for the data scientist who owns the model."""


class RowsFailure(BatchFailure):
    """Rows of the dataset that do not match the features: the first problems and their count."""

    def __init__(self, checker: TextRowChecker):
        super().__init__(checker.summary())
        self.problems = list(checker.problems)
        self.total = checker.total


def check_rows(manifest: Manifest, header: list[str], dataset: Path) -> tuple[str, int]:
    """(md5, rows) of the dataset with every row checked; RowsFailure naming the bad ones."""
    checker = TextRowChecker(manifest, header)
    md5, rows = scan_input(dataset, checker)
    if checker.total:
        raise RowsFailure(checker)
    return md5, rows


def split_dataset(manifest: Manifest, header: list[str], source: Path, features: Path,
                  passthrough: Path) -> tuple[str, int]:
    """(md5, rows) of a dataset with passthrough columns, every row checked (RowsFailure naming
    the bad ones), written as two files in one streamed pass: `features`, what the model reads
    (the header and the cells of every other column, in the dataset's order, as they were), and
    `passthrough`, the passthrough columns in the manifest's order (empty cells for an optional
    one the dataset lacks), row for row. Blank lines are not rows.

    A plain file (no quotes, blank lines or bare carriage returns) is split a block at a time
    with C-level splits and joins; otherwise the csv module reads it (a second pass)."""
    names = manifest.passthrough_names
    keep = [i for i, name in enumerate(header) if name not in names]
    index = {name: i for i, name in enumerate(header)}
    given = [index.get(name) for name in names]
    checker = TextRowChecker(manifest, header)
    plain = _split_plain(source, header, names, keep, given, checker, features, passthrough)
    if plain is None:
        checker = TextRowChecker(manifest, header)  # this pass sees every row: the first one's findings go
        h = hashlib.md5()
        with open(source, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        plain = h.hexdigest(), _split_csv(source, header, names, keep, given, checker, features, passthrough)
    if checker.total:
        raise RowsFailure(checker)
    return plain


def _split_plain(source: Path, header: list[str], names: list[str], keep: list[int], given: list[int | None],
                 checker: TextRowChecker, features: Path, passthrough: Path) -> tuple[str, int] | None:
    """`split_dataset` on a plain file, or None as soon as the file needs the csv module."""
    h = hashlib.md5()
    width, rows, carry, header_seen = len(header), 0, b"", False
    with open(source, "rb") as f, open(features, "w", newline="", encoding="utf-8") as fo, \
            open(passthrough, "w", newline="", encoding="utf-8") as po:
        fo.write(",".join(header[i] for i in keep) + "\n")
        po.write(",".join(names) + "\n")
        while True:
            chunk = f.read(CHUNK)
            h.update(chunk)
            block = carry + chunk
            if chunk:
                cut = block.rfind(b"\n") + 1
                block, carry = block[:cut], block[cut:]
            elif block and not block.endswith(b"\n"):
                block += b"\n"
            if block:
                if b'"' in block or block.count(b"\r") != block.count(b"\r\n"):
                    return None
                try:
                    text = block.decode("utf-8" if header_seen else "utf-8-sig")
                except UnicodeDecodeError as e:
                    line = block[:e.start].count(b"\n") + rows + (1 if header_seen else 0) + 1
                    raise BatchFailure(f"the dataset is not UTF-8 text (line {line}); save it as UTF-8 CSV") from None
                if "\r" in text:
                    text = text.replace("\r\n", "\n")
                if not header_seen:
                    text, header_seen = text[text.index("\n") + 1:], True
                if "\n\n" in text or text.startswith("\n"):
                    return None
                n, flat = checker.check_cells(text, rows + 1)
                if n and flat is not None and not checker.total:  # a failing job writes nothing more
                    fo.write("\n".join(map(",".join, zip(*(flat[i::width] for i in keep)))) + "\n")
                    columns = [flat[i::width] if i is not None else [""] * n for i in given]
                    po.write("\n".join(map(",".join, zip(*columns))) + "\n")
                rows += n
            if not chunk:
                return h.hexdigest(), rows


def _split_csv(source: Path, header: list[str], names: list[str], keep: list[int], given: list[int | None],
               checker: TextRowChecker, features: Path, passthrough: Path) -> int:
    """`split_dataset` on any CSV, through the csv module; returns the rows."""
    if None in given:  # an optional column the dataset lacks: its cells are empty
        def pick(rec: list[str], given=given) -> tuple:
            return tuple(rec[i] if i is not None else "" for i in given)
    else:
        pick = _picker(given)
    keep_cells = _picker(keep)
    rows, first, batch = 0, 1, []
    try:
        with open(source, newline="", encoding="utf-8-sig") as src, \
                open(features, "w", newline="", encoding="utf-8") as fo, \
                open(passthrough, "w", newline="", encoding="utf-8") as po:
            reader = csv.reader(src)
            to_model, kept = csv.writer(fo, lineterminator="\n"), csv.writer(po, lineterminator="\n")
            next(reader, None)
            to_model.writerow(keep_cells(header))
            kept.writerow(names)
            for rec in reader:
                if not rec:
                    continue
                rows += 1
                batch.append(rec)
                if len(batch) >= 10_000:
                    _split_block(batch, first, checker, keep_cells, pick, to_model, kept)
                    first += len(batch)
                    batch = []
            _split_block(batch, first, checker, keep_cells, pick, to_model, kept)
    except UnicodeDecodeError:
        raise BatchFailure("the dataset is not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise BatchFailure(f"the dataset is not valid CSV at line {reader.line_num}: {e}") from None
    return rows


def _picker(indexes: list[int]):
    """A function giving a record's cells at `indexes`, as a tuple."""
    if len(indexes) == 1:
        i = indexes[0]
        return lambda rec: (rec[i],)
    if not indexes:
        return lambda rec: ()
    return operator.itemgetter(*indexes)


def _split_block(batch: list[list[str]], first: int, checker: TextRowChecker, keep, pick, to_model, kept) -> None:
    if not batch:
        return
    checker.check(batch, first)
    if checker.total:
        return  # the job fails: nothing more to write
    to_model.writerows(map(keep, batch))
    kept.writerows(map(pick, batch))


def join_scores(manifest: Manifest, passthrough: Path, results: Path, out: Path) -> None:
    """`out`: the passthrough columns, then the score column, row for row, from the passthrough
    file `split_dataset` wrote and the model's checked results (one score column, or a column
    named as the score among others). Streamed."""
    score = manifest.score.name
    with open(passthrough, newline="", encoding="utf-8") as pf, open(results, "rb") as rf, \
            open(out, "w", newline="", encoding="utf-8") as of:
        ids = csv.reader(pf)
        writer = csv.writer(of, lineterminator="\n")
        writer.writerow([*next(ids), score])
        header = _parse_results_header(rf.readline())
        if len(header) == 1:
            scores = (line.strip().strip(b'"').decode("ascii") for line in rf if line.strip())
        else:
            column = header.index(score)
            text = io.TextIOWrapper(rf, encoding="utf-8", newline="")
            scores = (rec[column].strip().strip('"') for rec in csv.reader(text) if rec and any(rec))
        for rec, value in zip(ids, scores):
            writer.writerow([*rec, value])


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- what to run --------------------------------------------------------------------------

@dataclass
class JobSpec:
    dataset_uri: str
    job: str
    results_prefix: str
    generation: str | None = None  # from the triggering event, when there is one


def read_event(path: Path) -> tuple[str, str | None]:
    """(`gs://bucket/object`, generation) from a structured `…object.v1.finalized` CloudEvent file."""
    try:
        event = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BatchFailure(f"no event file at {path} (K_EVENT_PATH is set, so a JobSink event was expected)") from None
    except (OSError, ValueError) as e:
        raise BatchFailure(f"the event file {path} is not a JSON CloudEvent: {e}") from e
    if not isinstance(event, dict):
        raise BatchFailure(f"the event file {path} is not a JSON CloudEvent object")
    etype = event.get("type")
    if etype is not None and etype != FINALIZED:
        raise BatchFailure(f"the event is of type {etype!r}; a batch job starts only on {FINALIZED}")
    data = event.get("data", event if "name" in event and "bucket" in event else None)
    if data is None and "data_base64" in event:
        import base64

        data = base64.b64decode(event["data_base64"])
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise BatchFailure(f"the event's data is not the JSON GCS object resource: {e}") from e
    if not isinstance(data, dict):
        raise BatchFailure("the event carries no GCS object resource in its data")
    bucket = data.get("bucket")
    if not bucket:
        source = event.get("source", "")
        bucket = source.rsplit("/buckets/", 1)[-1] if "/buckets/" in source else None
    name = data.get("name")
    if not name:
        subject = event.get("subject", "")
        name = subject[len("objects/"):] if subject.startswith("objects/") else None
    if not bucket or not name:
        raise BatchFailure("the event names no bucket and object (data.bucket / data.name)")
    generation = data.get("generation")
    return f"gs://{bucket}/{name}", (str(generation) if generation not in (None, "") else None)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "job"


def new_job_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def resolve_job(manifest: Manifest, *, dataset: str | None = None, results: str | None = None,
                job: str | None = None, env: Mapping[str, str] = os.environ) -> JobSpec:
    """Flags, then env (DATASET_URI, RESULTS_URI, JOB_ID), then a JobSink event at $K_EVENT_PATH/event."""
    dataset = dataset or env.get("DATASET_URI")
    generation = None
    if not dataset and env.get("K_EVENT_PATH"):
        dataset, generation = read_event(Path(env["K_EVENT_PATH"]) / "event")
    if not dataset:
        raise BatchFailure("no dataset given: pass --dataset, set DATASET_URI, or run under a JobSink (K_EVENT_PATH)")
    job = job or env.get("JOB_ID")
    if not job:
        job = f"{_slug(Path(dataset).stem)}-{generation}" if generation else new_job_id()
    results = results or env.get("RESULTS_URI")
    if not results:
        if storage.is_gcs(dataset):
            bucket, _ = storage.split_gcs(dataset)
            results = f"gs://{bucket}/results/{manifest.name}/{job}/"
        else:
            results = str(Path(dataset).resolve().parent / "results" / job)
    return JobSpec(dataset_uri=dataset, job=job, results_prefix=results, generation=generation)


# -- checking files, streamed -------------------------------------------------------------

def check_header(manifest: Manifest, path: Path) -> list[str]:
    """The dataset's header as a list; BatchFailure naming each missing or unknown column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError:
        raise BatchFailure("the dataset is not UTF-8 text (expected a CSV file)") from None
    if not header:
        raise BatchFailure("the dataset is empty: expected a CSV file whose first row names the feature columns")
    header = [h.strip() for h in header]
    problems = RowValidator(manifest).check_header(header)
    if problems:
        raise BatchFailure("the dataset's header does not match the model's features: " + "; ".join(problems))
    return header


def scan_input(path: Path, checker: TextRowChecker | None = None) -> tuple[str, int]:
    """(md5 hex, data rows) of a CSV in one streamed pass, every row checked by `checker`
    (problems collect in it). Plain files are split by lines and commas; the csv module reads
    the file (a second pass) only when quotes, blank lines or a bare carriage return need it."""
    h = hashlib.md5()
    newlines = 0
    needs_csv = False
    size = 0
    carry = b""
    row = 0  # data rows checked so far
    header_seen = False
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            newlines += chunk.count(b"\n")
            if needs_csv:
                continue
            block = carry + chunk
            cut = block.rfind(b"\n") + 1
            block, carry = block[:cut], block[cut:]
            if not block:
                continue
            if b'"' in block or b"\n\n" in block or b"\n\r\n" in block or block.count(b"\r") != block.count(b"\r\n"):
                needs_csv = True
                continue
            if checker is not None:
                row, header_seen = _check_block(block, checker, row, header_seen)
    if size == 0:
        return h.hexdigest(), 0
    if not needs_csv and carry:
        if b'"' in carry or b"\r" in carry.rstrip(b"\r"):
            needs_csv = True
        elif checker is not None:
            row, header_seen = _check_block(carry + b"\n", checker, row, header_seen)
    if needs_csv:
        if checker is not None:  # the fast pass's findings are discarded: this pass sees every row
            checker.problems.clear()
            checker.total = 0
        return h.hexdigest(), _scan_csv(path, checker)
    records = newlines + (0 if not carry else 1)
    return h.hexdigest(), max(records - 1, 0)


def _check_block(block: bytes, checker: TextRowChecker, row: int, header_seen: bool) -> tuple[int, bool]:
    try:
        text = block.decode("utf-8-sig" if not header_seen else "utf-8")
    except UnicodeDecodeError as e:
        line = block[:e.start].count(b"\n") + row + (1 if header_seen else 0) + 1
        raise BatchFailure(f"the dataset is not UTF-8 text (line {line}); save it as UTF-8 CSV") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n")  # a bare CR sent the file to the csv module already
    if not header_seen:
        text = text[text.index("\n") + 1:]
        header_seen = True
    return row + checker.check_text(text, row + 1), header_seen


def _scan_csv(path: Path, checker: TextRowChecker | None) -> int:
    """Data rows of a CSV that needs the csv module, checked; blank lines are not rows."""
    rows = 0
    batch: list[list[str]] = []
    first = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            for rec in reader:
                if not rec or not any(rec):
                    continue
                rows += 1
                if checker is not None:
                    batch.append(rec)
                    if len(batch) >= 10_000:
                        checker.check(batch, first)
                        first += len(batch)
                        batch = []
    except UnicodeDecodeError:
        raise BatchFailure("the dataset is not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise BatchFailure(f"the dataset is not valid CSV at line {reader.line_num}: {e}") from None
    if checker is not None and batch:
        checker.check(batch, first)
    return rows if header is not None else 0


def _bad_score(raw: bytes, line_no: int) -> str | None:
    """Why one score line is not a finite number, or None if it is."""
    text = raw.strip().strip(b'"').decode("utf-8", "replace")
    try:
        value = float(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:37] + "..."
        return f"line {line_no} of the results is not a number: {shown!r}"
    if not math.isfinite(value):
        return f"line {line_no} of the results is not a finite number: {text}"
    return None


def _parse_results_header(first: bytes) -> list[str]:
    return [c.strip() for c in next(csv.reader([first.decode("utf-8-sig", "replace")]))]


def check_results(path: Path, n_rows: int, manifest: Manifest, follower: ResultsFollower | None = None) -> int:
    """Rows of scores in the model's results file; BatchFailure unless one finite score per input row.

    With a `follower` that already checked a prefix while the model ran, only the rest is read,
    once the prefix is proven byte-identical (md5) to what was checked.
    """
    if not path.is_file():
        raise BatchFailure("the model exited with status 0 but wrote no results file at $RESULTS")
    count = follower.resume(path) if follower is not None else None
    if count is None:
        count = _check_results_whole(path, manifest)
    if count != n_rows:
        raise BatchFailure(
            f"the model wrote {count} score(s) for {n_rows} input row(s); "
            "the results must hold one score per input row, in the same order")
    return count


def _check_results_whole(path: Path, manifest: Manifest) -> int:
    with open(path, "rb") as f:
        first = f.readline()
        if not first.strip():
            raise BatchFailure("the model wrote an empty results file (expected a header and one score per row)")
        header = _parse_results_header(first)
        if len(header) == 1:
            stream = ScoreStream()
            while chunk := f.read(CHUNK):
                stream.feed(chunk)
            return stream.finish()
        if manifest.score.name in header:
            return _count_scores_csv(f, header.index(manifest.score.name))
        raise BatchFailure(
            f"the results have columns {', '.join(header)}; expected a single score column "
            f"(or one named {manifest.score.name!r})")


class ScoreStream:
    """Checks single-column score lines fed in arbitrary chunks: complete lines now, the rest kept."""

    def __init__(self, summary: ScoreSummary | None = None) -> None:
        self.summary = summary  # given every checked score, when set
        self.count = 0
        self.line_no = 1  # the header
        self.blank_at: int | None = None  # a blank line is an error only if a score follows it
        self.rest = b""

    def feed(self, chunk: bytes) -> None:
        block = self.rest + chunk if self.rest else chunk
        cut = block.rfind(b"\n")
        if cut < 0:
            self.rest = block
            return
        self.rest = block[cut + 1:]
        self._lines(block[:cut].split(b"\n"))

    def finish(self) -> int:
        if self.rest:
            self._lines([self.rest])
            self.rest = b""
        return self.count

    def _lines(self, lines: list[bytes]) -> None:
        if self.blank_at is None:
            try:
                values = list(map(float, lines))
                if math.isfinite(sum(values)):  # any nan/inf makes the sum non-finite
                    self.count += len(lines)
                    self.line_no += len(lines)
                    if self.summary is not None:
                        self.summary.add(values)
                    return
            except ValueError:
                pass
        good: list[float] = []
        for raw in lines:  # slow path: find and name the bad line
            self.line_no += 1
            if not raw.strip():
                if self.blank_at is None:
                    self.blank_at = self.line_no
                continue
            if self.blank_at is not None:
                raise BatchFailure(f"line {self.blank_at} of the results is empty: expected one score per input row")
            problem = _bad_score(raw, self.line_no)
            if problem:
                raise BatchFailure(problem)
            self.count += 1
            good.append(float(raw.strip().strip(b'"')))
        if self.summary is not None:
            self.summary.add(good)


class ResultsFollower:
    """Checks the results file while the model is still writing it, so little is left once it exits.

    Everything read is hashed; `resume` trusts the checked prefix only if the final file starts
    with exactly those bytes, otherwise the whole file is checked again (a model that rewrites or
    replaces its results is still checked correctly).
    """

    def __init__(self, path: Path, sink=None):
        self.path = path
        self.sink = sink  # called with every byte read, in order (a ScoresUpload's write)
        self.trusted = False  # set by `resume`: the sink was given exactly the final file
        self._f = None
        self._md5 = hashlib.md5()
        self.offset = 0
        self._head = b""
        self.stream: ScoreStream | None = None
        self.usable = True

    def poll(self) -> bool:
        """Read and check what was appended since the last call; True if more is probably waiting."""
        if not self.usable:
            return False
        if self._f is None:
            try:
                self._f = open(self.path, "rb")  # noqa: SIM115 - kept open across polls, closed in close()
            except OSError:
                return False
        data = self._f.read(FOLLOW_READ)
        if not data:
            return False
        self._md5.update(data)
        self.offset += len(data)
        if self.sink is not None:
            self.sink(data)
        more = len(data) == FOLLOW_READ
        try:
            if self.stream is not None:
                self.stream.feed(data)
                return more
            self._head += data
            nl = self._head.find(b"\n")
            if nl < 0:
                self.usable = len(self._head) < CHUNK
                return more
            first, rest = self._head[:nl + 1], self._head[nl + 1:]
            self._head = b""
            if not first.strip() or len(_parse_results_header(first)) != 1:
                self.usable = False  # the whole-file check reports it
                return False
            self.stream = ScoreStream(ScoreSummary())
            if rest:
                self.stream.feed(rest)
        except BatchFailure:
            self.usable = False  # maybe the model rewrites it; judged on the final file
            return False
        return more

    @property
    def scored(self) -> int | None:
        """Scores checked so far; None once the file cannot be followed (the final check counts them)."""
        if not self.usable:
            return None
        return self.stream.count if self.stream is not None else 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def resume(self, path: Path) -> int | None:
        """Finish the check on the final file; None if the checked prefix cannot be trusted.

        Trusted, the rest of the file also goes to the sink, which has then seen the final file."""
        self.close()
        if not self.usable or self.stream is None:
            return None
        h = hashlib.md5()
        with open(path, "rb") as f:
            remaining = self.offset
            while remaining > 0:
                data = f.read(min(CHUNK, remaining))
                if not data:
                    return None
                h.update(data)
                remaining -= len(data)
            if h.digest() != self._md5.digest():
                return None
            while chunk := f.read(CHUNK):
                self.stream.feed(chunk)
                if self.sink is not None:
                    self.sink(chunk)
        count = self.stream.finish()
        self.trusted = True
        return count


class FollowThread:
    """Runs a ResultsFollower beside the model: reads what is appended every FOLLOW_INTERVAL while
    the model runs, and everything left the moment `stop` is called (the model has exited)."""

    def __init__(self, follower: ResultsFollower, progress: Progress | None = None):
        self.follower = follower
        self.progress = progress  # told the scores checked after every read (it throttles itself)
        self._stop = threading.Event()
        self._drain = True
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="results-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                while self.follower.poll() and not self._stop.is_set():
                    self._report()
                self._report()
                if self._stop.wait(FOLLOW_INTERVAL):
                    break
            while self._drain and self.follower.poll():  # the rest, written before the model exited
                pass
            self._report()
        except BaseException as e:  # noqa: BLE001 - reported by `stop`
            self.error = e

    def _report(self) -> None:
        if self.progress is not None:
            self.progress.update(scored=self.follower.scored)

    def stop(self, *, drain: bool = True) -> None:
        """Read to the end of what is there now (unless not `drain`: the job failed, and a model
        still running may write on), then stop; re-raises what the thread hit."""
        self._drain = drain
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error


class Progress:
    """A running job's progress — rows scored so far, the dataset's rows (once they are checked),
    when scoring began — published as a small JSON file (`PROGRESS_FILE` in the work folder),
    rewritten by rename (a reader sees the old or the new document, never half of one) at most
    every `interval` seconds, and at once when the total becomes known or the job ends. With no
    path it only keeps the numbers. Any thread may call `update`; writing never fails the job.

    The document: `{"rows_scored", "rows_total", "updated_at", "first_at", "first_rows", "done"}`,
    times in seconds since the epoch; `first_at`/`first_rows` are the first moment scores were
    seen and how many, so a reader estimates the rate of scoring without the model's start-up."""

    def __init__(self, path: Path | None, *, interval: float = PROGRESS_INTERVAL):
        self.path = path
        self.interval = interval
        self.scored: int | None = 0
        self.total: int | None = None
        self.first_at: float | None = None
        self.first_rows = 0
        self.done = False
        self._next: float | None = None  # monotonic time before which nothing is written; None: write now
        self._lock = threading.Lock()

    def update(self, *, scored: int | None = None, total: int | None = None, final: bool = False) -> None:
        now = time.monotonic()
        changed = False
        if scored is not None and scored != self.scored:
            if self.first_at is None and scored > 0:
                self.first_at, self.first_rows = time.time(), scored
            self.scored, changed = scored, True
        if total is not None:
            self.total = total
        if final:
            self.done = True
        urgent = total is not None or final or self._next is None
        # unchanged, it is rewritten only now and then: `updated_at` tells a reader it is alive
        if not urgent and now < (self._next if changed else self._next + 3 * self.interval):
            return
        self._write(now)

    def document(self) -> dict:
        return {"rows_scored": self.scored, "rows_total": self.total, "updated_at": round(time.time(), 3),
                "first_at": None if self.first_at is None else round(self.first_at, 3), "first_rows": self.first_rows, "done": self.done}

    def _write(self, now: float) -> None:
        if self.path is None:
            return
        with self._lock:
            self._next = now + self.interval
            try:
                _write_atomic(self.path, json.dumps(self.document()))
            except OSError as e:  # progress is a courtesy: the job goes on without it
                log.debug("progress: %s", e)


def _count_scores_csv(f, column: int) -> int:
    count = 0
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    for line_no, rec in enumerate(csv.reader(text), start=2):
        if not rec or not any(rec):
            continue
        if column >= len(rec):
            raise BatchFailure(f"line {line_no} of the results has no score column")
        problem = _bad_score(rec[column].encode(), line_no)
        if problem:
            raise BatchFailure(problem)
        count += 1
    return count


# -- running the model --------------------------------------------------------------------

class OutputTail:
    """Passes a child's output through to our stderr and keeps its last lines for the result."""

    def __init__(self, stream, sink=None):
        self._stream = stream
        self._sink = sink if sink is not None else sys.stderr.buffer
        self._lines: deque[bytes] = deque(maxlen=LOG_TAIL_LINES)
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in iter(self._stream.readline, b""):
            self._lines.append(line[-LOG_TAIL_BYTES:])
            try:
                self._sink.write(line)
                self._sink.flush()
            except (OSError, ValueError):
                pass
        self._stream.close()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        return tail_text(b"".join(self._lines))


def tail_text(data: bytes) -> str:
    text = data[-LOG_TAIL_BYTES:].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


class JobStopped(BatchFailure):
    """SIGTERM (a deleted Job, a deadline): the model is stopped and the job fails with a result."""


def stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise JobStopped("the job was stopped (SIGTERM) before it finished")

    signal.signal(signal.SIGTERM, handler)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit status of `proc`, or None once `timeout` seconds have passed.

    Wakes the moment the process exits (a pidfd, Linux 5.3+), where `Popen.wait(timeout)` would
    sleep in steps of up to 50 ms; falls back to that elsewhere."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd here, or the process is already reaped
        try:
            return proc.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            return None
    try:
        if not select.select([fd], [], [], max(timeout, 0))[0]:
            return None
    finally:
        os.close(fd)
    return proc.wait()


def start_model(manifest: Manifest, dataset: Path, results: Path) -> subprocess.Popen:
    """The model with DATASET and RESULTS and nothing of ours (adapters/sandbox.py): sandboxed, it
    sees its folder and the dataset read-only and may write only in the results' own folder."""
    from . import sandbox

    try:
        return sandbox.start(manifest.command, manifest.folder, {"DATASET": str(dataset), "RESULTS": str(results)},
                             read=[dataset], write=[results.parent], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=PREEXEC)  # noqa: PLW1509 - only prctl, async-signal-safe
    except sandbox.SandboxError as e:
        raise BatchFailure(f"could not start the model: {e}") from None
    except FileNotFoundError:
        raise BatchFailure(f"could not start the model: command {manifest.command[0]!r} not found") from None
    except OSError as e:
        raise BatchFailure(f"could not start the model ({' '.join(manifest.command)}): {e.strerror}") from e


# -- the scores' summary (result.json `score_summary`, what score monitoring reads) ---------

SUMMARY_BINS = 32       # at most this many equal-width bins (a power of two wide) cover every score
SUMMARY_SAMPLE = 16384  # scores kept (a uniform reservoir) for the quantiles: exact up to this many
SUMMARY_SEED = 21       # the reservoir's seed: the same scores give the same summary
SUMMARY_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)  # control/stats.py's QUANTILES


class ScoreSummary:
    """Accumulates the checked scores a chunk at a time, memory flat: exact count, mean, min, max
    and histogram; quantiles from a uniform sample of SUMMARY_SAMPLE scores (exact up to that many).

    The sample is a reservoir (adapters/inputs.py `Reservoir`): every score is equally likely to be
    kept wherever it is in the file, so scores written in repeating blocks cannot line up with it
    (every k-th score would: 200,000 rows of one 20-row block gave a PSI of 3.77 against the block's
    own 2,000 rows).

    The histogram needs no range in advance: bin k holds [k*w, (k+1)*w) with w a power of two,
    doubled (pairs of bins merged, exactly) whenever the scores seen so far span more than
    SUMMARY_BINS bins. Every step is a C-speed pass over a chunk (min, max, fsum, a Counter of
    floor(v / w)), so it can run inside the results check."""

    def __init__(self, seed: int = SUMMARY_SEED) -> None:
        self.count = 0
        self._sums: list[float] = []
        self.lo, self.hi = math.inf, -math.inf
        self._inv: float | None = None   # 1 / w
        self._bins: dict[int, int] = {}
        self._reservoir = Reservoir(SUMMARY_SAMPLE, seed)
        self._sample = self._reservoir.items
        self._broken = False   # a score too large to bin: no histogram

    def add(self, values: list[float]) -> None:
        if not values:
            return
        from collections import Counter

        self._reservoir.add(values)
        self.count += len(values)
        self._sums.append(math.fsum(values))
        if len(self._sums) >= 4096:
            self._sums = [math.fsum(self._sums)]
        self.lo, self.hi = min(self.lo, min(values)), max(self.hi, max(values))
        if self._broken:
            return
        try:
            if self._inv is None:
                span = self.hi - self.lo
                scale = span / SUMMARY_BINS if span > 0 else (abs(self.lo) or 1.0) / 2 ** 20
                self._inv = 2.0 ** -math.ceil(math.log2(scale)) if scale > 0 else 1.0
            floor, inv = math.floor, self._inv
            while floor(self.hi * inv) - floor(self.lo * inv) >= SUMMARY_BINS:
                inv /= 2
                merged: dict[int, int] = {}
                for k, n in self._bins.items():
                    merged[k // 2] = merged.get(k // 2, 0) + n
                self._bins = merged
            self._inv = inv
            for k, n in Counter(map(floor, map(inv.__mul__, values))).items():
                self._bins[k] = self._bins.get(k, 0) + n
        except (OverflowError, ValueError):
            self._broken, self._bins = True, {}

    def result(self) -> dict:
        if self.count == 0:
            return {"count": 0, "sampled": 0, "quantiles": {"count": 0}, "percentiles": [],
                    "histogram": {"edges": [], "counts": []}}
        sample = sorted(self._sample)
        quantiles = {"count": self.count, "min": self.lo, "max": self.hi, "mean": math.fsum(self._sums) / self.count}
        quantiles.update({f"p{q * 100:g}": quantile(sample, q) for q in SUMMARY_QUANTILES})
        histogram: dict = {"edges": [], "counts": []}
        if self._bins:
            first, last, w = min(self._bins), max(self._bins), 1 / self._inv
            histogram = {"edges": [k * w for k in range(first, last + 2)],
                         "counts": [self._bins.get(k, 0) for k in range(first, last + 1)]}
        return {"count": self.count, "sampled": len(sample), "quantiles": quantiles,
                "percentiles": [quantile(sample, i / 100) for i in range(101)], "histogram": histogram}


def score_summary(path: Path, manifest: Manifest) -> dict:
    """The summary of a checked results file, read once (when the check did not keep one)."""
    summary = ScoreSummary()
    with open(path, "rb") as f:
        header = _parse_results_header(f.readline())
        if len(header) == 1:
            stream = ScoreStream(summary)
            while chunk := f.read(CHUNK):
                stream.feed(chunk)
            stream.finish()
        else:
            column, batch = header.index(manifest.score.name), []
            for rec in csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline="")):
                if rec and any(rec):
                    batch.append(float(rec[column].strip().strip('"')))
                    if len(batch) >= 65536:
                        summary.add(batch)
                        batch = []
            summary.add(batch)
    return summary.result()


# -- the whole job ------------------------------------------------------------------------

class Job:
    """One batch job's result document, filled in as the job goes."""

    def __init__(self, manifest: Manifest, spec: JobSpec | None):
        self.manifest = manifest
        self.spec = spec
        self.result: dict = {
            "model": manifest.name, "version": manifest.version,
            "job": spec.job if spec else None, "status": "running",
            "input": {"uri": spec.dataset_uri if spec else None,
                      "generation": spec.generation if spec else None, "md5": None},
            "results_uri": None, "rows": None, "started_at": now_iso(), "finished_at": None,
        }
        self.inputs: dict | None = None  # the dataset's input summary (score_summary.inputs)
        self._t0 = time.monotonic()
        self.timings: dict[str, float] = {}  # phase -> seconds since the job started, logged at the end

    def mark(self, phase: str) -> None:
        self.timings[phase] = round(time.monotonic() - self._t0, 3)

    def done(self) -> tuple[dict, int]:
        """The job's end, however it went: its result JSON and the exit status (0: it succeeded)."""
        self.mark("done")
        self.log_timings()
        return self.result, (0 if self.result["status"] == "succeeded" else 1)

    def log_timings(self) -> None:
        """At DEBUG (MODELPLANE_LOG_LEVEL=debug): a job's log tail is the model's, for its owner."""
        log.debug("job %s %s, seconds since start: %s", self.result["job"], self.result["status"],
                 " ".join(f"{k}={v:.3f}" for k, v in self.timings.items()))

    def succeed(self, rows: int, results_uri: str) -> dict:
        self.result.update(status="succeeded", rows=rows, results_uri=results_uri, finished_at=now_iso())
        return self.result

    def fail(self, error: str, log_tail: str = "", *, cause: BaseException | None = None) -> dict:
        self.result.update(status="failed", results_uri=None, finished_at=now_iso(), error=error, log_tail=log_tail)
        if isinstance(cause, RowsFailure):
            self.result.update(problems=cause.problems, invalid_values=cause.total)
        return self.result

    def summarize(self, results: Path, follower: ResultsFollower | None = None, *, dataset: Path | None = None) -> None:
        """`score_summary` of the checked scores into the result: the one the follower kept while it
        checked them if it checked the final file, else read from it; with it, `inputs`, the
        dataset's per-feature summary (adapters/inputs.py). A failure is logged, never the job's."""
        try:
            if follower is not None and follower.trusted and follower.stream and follower.stream.summary:
                self.result["score_summary"] = follower.stream.summary.result()
            else:
                self.result["score_summary"] = score_summary(results, self.manifest)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            log.warning("the scores' summary could not be computed: %s", e)
        if self.inputs is None and dataset is not None:
            self.inputs = summarize_file(self.manifest.features, dataset)
        if self.inputs and isinstance(self.result.get("score_summary"), dict):
            self.result["score_summary"]["inputs"] = self.inputs

    def store_result(self) -> None:
        """result.json beside scores.csv; a failure to store it is reported, not raised."""
        if not self.spec:
            return
        uri = storage.join(self.spec.results_prefix, RESULT_FILE)
        try:
            storage.put_bytes(json.dumps(self.result, indent=2).encode() + b"\n", uri)
        except StorageError as e:
            log.error("%s", e)
            if self.result["status"] == "succeeded":
                self.fail(f"the scores were published but the result could not be stored: {e}")


def run_batch(manifest: Manifest, spec: JobSpec, *, work: Path | None = None) -> tuple[dict, int]:
    """Run one job end to end; return (result JSON, exit status). Never raises for a job failure.

    While the model runs, the input rows are checked (this thread) and its scores are followed,
    checked and, for a gs:// destination, streamed to a resumable upload (another thread). The
    upload is committed only once the model exited 0 and every check passed, so a failed job
    publishes no scores; a job killed outright leaves only an unfinished session, never an object.
    """
    job = Job(manifest, spec)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix=f"modelplane-{manifest.name}-")) if own_work else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    tail: OutputTail | None = None
    upload: storage.ScoresUpload | None = None
    # rows scored so far, for the runtime that asked for this work folder (none for a temporary one)
    progress = Progress(None if own_work else work / PROGRESS_FILE)
    (work / PROGRESS_FILE).unlink(missing_ok=True)
    passthrough = bool(manifest.passthrough)
    try:
        dataset = _fetch(spec, work, job, name=INPUT_FILE if passthrough else DATASET_FILE)
        job.mark("fetched")
        header = check_header(manifest, dataset)
        model_input = dataset
        if passthrough:
            # the model reads a copy without the passthrough columns, made (and every row
            # checked) before it starts; the published scores.csv is a join, uploaded whole
            model_input = work / DATASET_FILE
            md5, n_rows = split_dataset(manifest, header, dataset, model_input, work / PASSTHROUGH_FILE)
            job.mark("rows_checked")
            job.result["input"]["md5"] = md5
            job.result["rows"] = n_rows
            progress.update(total=n_rows)
        # the model's only writable place (sandboxed): a folder of its own, not the work folder
        results = work / MODEL_OUT / SCORES_FILE
        results.parent.mkdir(exist_ok=True)
        if results.exists():
            results.unlink()
        scores_uri = storage.join(spec.results_prefix, SCORES_FILE)
        if storage.is_gcs(scores_uri) and not passthrough:
            upload = storage.ScoresUpload(scores_uri)
        proc = start_model(manifest, model_input, results)
        job.mark("model_started")
        deadline = time.monotonic() + manifest.batch.timeout_seconds
        tail = OutputTail(proc.stdout)
        follower = ResultsFollower(results, sink=upload.write if upload else None)
        following = FollowThread(follower, progress)
        try:
            # both overlap with the model's own run: count and check the input rows here (a bad
            # one stops the model), check (and upload) scores as they are written in `following`
            if not passthrough:
                md5, n_rows = check_rows(manifest, header, dataset)
                job.mark("rows_checked")
                job.result["input"]["md5"] = md5
                job.result["rows"] = n_rows
                progress.update(total=n_rows)
            job.inputs = summarize_file(manifest.features, dataset)  # still beside the model's run
            status = wait_exit(proc, deadline - time.monotonic())
            if status is None:
                raise subprocess.TimeoutExpired(manifest.command, manifest.batch.timeout_seconds)
            job.mark("model_exited")
        except subprocess.TimeoutExpired:
            _stop_following(following)
            kill_group(proc)
            tail.join()
            raise BatchFailure(
                f"the model ran longer than its batch timeout ({manifest.batch.timeout}, "
                "manifest batch.timeout) and was stopped") from None
        except BaseException:
            _stop_following(following)
            kill_group(proc)
            raise
        else:
            kill_group(proc, grace=0)  # reap anything the model left running in its group
        following.stop()
        tail.join()
        if status != 0:
            follower.close()
            raise BatchFailure(f"the model {describe_exit(status)}")
        rows = check_results(results, n_rows, manifest, follower)
        job.mark("results_checked")
        job.summarize(results, follower)
        if passthrough:
            join_scores(manifest, work / PASSTHROUGH_FILE, results, work / PUBLISHED_FILE)
            storage.put_file(work / PUBLISHED_FILE, scores_uri)
        else:
            _publish_scores(results, scores_uri, upload, streamed=follower.trusted)
        upload = None
        job.mark("scores_published")
        job.succeed(rows, scores_uri)
        progress.update(scored=rows, final=True)
        job.store_result()
    except (BatchFailure, StorageError, OSError) as e:
        job.fail(str(e), tail.text() if tail else "", cause=e)
        progress.update(final=True)  # what it reached, kept
        job.store_result()
    finally:
        if upload is not None:  # not committed: the job failed, nothing may appear
            upload.abort()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return job.done()


def _stop_following(following: FollowThread) -> None:
    try:
        following.stop(drain=False)
    except Exception as e:  # noqa: BLE001 - the job fails for another reason already
        log.debug("results follower: %s", e)


def _publish_scores(results: Path, uri: str, upload: storage.ScoresUpload | None, *, streamed: bool) -> None:
    """Commit the streamed upload if it was given exactly the final file (`streamed`: the follower
    proved it) and did not break; otherwise drop it and upload the whole file. Either way the object
    appears only complete."""
    if upload is not None and streamed and not upload.broken:
        try:
            upload.commit()
            return
        except StorageError as e:
            log.warning("%s; uploading the whole file instead", e)
    if upload is not None:
        upload.abort()
    storage.put_file(results, uri)


def _fetch(spec: JobSpec, work: Path, job: Job, *, copy_local: bool = False, name: str = DATASET_FILE) -> Path:
    """The dataset as a local file: downloaded into `work/name` for gs://, used in place (or copied) otherwise."""
    if storage.is_gcs(spec.dataset_uri):
        dest = work / name
        info = storage.fetch(spec.dataset_uri, dest, generation=spec.generation)
        job.result["input"]["generation"] = info.generation
        return dest
    path = Path(spec.dataset_uri)
    if not path.is_file():
        raise BatchFailure(f"the dataset {spec.dataset_uri} does not exist")
    if copy_local:
        dest = work / name
        shutil.copyfile(path, dest)
        return dest
    return path


# -- a Knative Job: two main containers sharing a work folder ------------------------------
#
# Knative's JobSink dispatcher gives the event file (volume `jobsink-event`, `K_EVENT_PATH`)
# to the Job's main containers only (knative/eventing cmd/jobsink/main.go), so the step that
# reads it cannot be an init container. The Job has two main containers instead:
#   adapter (adapter image)  `job`: fetch + check -> FETCH_DONE -> wait for MODEL_STATUS -> publish
#   model   (model image)    `score_step`'s POSIX sh: wait for FETCH_DONE -> run the model -> MODEL_STATUS
# The model image needs no Python; every hand-over is a file renamed into place.

JOB_STATE = "job.json"
FETCH_DONE = "fetch.done"  # "ok": the dataset is in place; "failed": the model must not run
MODEL_STATUS = "model.status"
MODEL_LOG = "model.log"
FETCH_WAIT_POLL = 0.2  # seconds between the model container's looks for FETCH_DONE
STATUS_GRACE_SECONDS = 60.0  # beyond the batch timeout (and its kill grace) before the model counts as lost


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def release_model(work: Path) -> None:
    """Tell a waiting model container not to run, unless it has been told already."""
    try:
        if not (work / FETCH_DONE).exists():
            work.mkdir(parents=True, exist_ok=True)
            _write_atomic(work / FETCH_DONE, "failed")
    except OSError as e:
        log.error("cannot release the model container through %s: %s", work / FETCH_DONE, e)


def fetch_step(manifest: Manifest, spec: JobSpec, work: Path) -> tuple[dict, int]:
    """Dataset -> work/dataset.csv, header checked, rows counted; state in work/job.json."""
    job = Job(manifest, spec)
    work.mkdir(parents=True, exist_ok=True)
    for stale in (SCORES_FILE, MODEL_STATUS, MODEL_LOG, JOB_STATE, INPUT_FILE, PASSTHROUGH_FILE, PUBLISHED_FILE):
        (work / stale).unlink(missing_ok=True)
    try:
        if manifest.passthrough:  # the model container reads dataset.csv: the features only
            dataset = _fetch(spec, work, job, copy_local=True, name=INPUT_FILE)
            header = check_header(manifest, dataset)
            md5, rows = split_dataset(manifest, header, dataset, work / DATASET_FILE, work / PASSTHROUGH_FILE)
            dataset.unlink()
        else:
            dataset = _fetch(spec, work, job, copy_local=True)
            header = check_header(manifest, dataset)
            md5, rows = check_rows(manifest, header, dataset)  # before the model container may start
        job.result["input"]["md5"] = md5
        job.result["rows"] = rows
    except (BatchFailure, StorageError) as e:
        job.fail(str(e), cause=e)
        job.store_result()
        return job.result, 1
    _write_atomic(work / JOB_STATE, json.dumps({"spec": asdict(spec), "result": job.result}))
    return job.result, 0


def job_step(manifest: Manifest, spec: JobSpec | None, work: Path, *, error: str | None = None,
             poll: float = FOLLOW_INTERVAL) -> tuple[dict, int]:
    """The adapter container of a Knative Job: fetch, hand over to the model container, wait for
    its exit status (bounded by the batch timeout), publish. `error` (or no `spec`) fails the job
    before the model runs; the model container is then told not to start."""
    work.mkdir(parents=True, exist_ok=True)
    fetched = False
    try:
        if spec is None or error:
            job = Job(manifest, spec)
            job.fail(error or "no job to run")
            job.store_result()
            return job.result, 1
        result, code = fetch_step(manifest, spec, work)
        if code != 0:
            return result, code
        fetched = True
    finally:
        _write_atomic(work / FETCH_DONE, "ok" if fetched else "failed")
    deadline = time.monotonic() + manifest.batch.timeout_seconds + KILL_GRACE_SECONDS + STATUS_GRACE_SECONDS
    progress = ProgressLog(result.get("rows"))
    follower = ResultsFollower(work / SCORES_FILE)
    try:
        while not (work / MODEL_STATUS).exists() and time.monotonic() < deadline:
            while follower.poll():
                pass
            progress.update(follower.scored)
            time.sleep(poll)
        while follower.poll():  # what the model wrote last: a failed job keeps what it reached
            pass
    finally:
        follower.close()
    result, code = publish_step(manifest, work)
    progress.update(result.get("rows") if code == 0 else follower.scored, final=True)
    return result, code


PROGRESS_LOG_KEY = "progress"


class ProgressLog:
    """A Knative Job's progress, for the control service that reads the adapter container's log:
    a line `{"progress": {...}}` (the document of `Progress`) on stderr when the count changed,
    at most every PROGRESS_LOG_INTERVAL seconds, and a last one when the job ends."""

    def __init__(self, total: int | None, *, interval: float = PROGRESS_LOG_INTERVAL, stream=None):
        self.progress = Progress(None)
        self.progress.total = total
        self.interval = interval
        self.stream = stream
        self._next = 0.0
        self._logged: int | None = None

    def update(self, scored: int | None, *, final: bool = False) -> None:
        self.progress.update(scored=scored, final=final)
        now = time.monotonic()
        if not final and (now < self._next or self.progress.scored == self._logged):
            return
        self._next, self._logged = now + self.interval, self.progress.scored
        stream = self.stream or sys.stderr
        try:
            stream.write(json.dumps({PROGRESS_LOG_KEY: self.progress.document()}) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass


def score_step(manifest: Manifest, work: str = "/work") -> dict:
    """The model container of a Knative Job (model image, POSIX sh, no Python): wait for the
    adapter's FETCH_DONE, run the model's command with its batch timeout, record its exit
    status (renamed into place once the log is complete) and log; always exits 0, so that the
    adapter reports the failure.

    Returns `{"command": [...], "env": {...}}` for a container spec.
    """
    seconds = math.ceil(manifest.batch.timeout_seconds)
    done, status = f"{work}/{FETCH_DONE}", f"{work}/{MODEL_STATUS}"
    script = (
        f"while [ ! -e {done} ]; do sleep {FETCH_WAIT_POLL}; done; "
        f'[ "$(cat {done})" = ok ] || exit 0; '
        f'{{ timeout -k {int(KILL_GRACE_SECONDS)} {seconds} "$@" 2>&1; echo $? > {status}.tmp; }}'
        f" | tee {work}/{MODEL_LOG}; mv {status}.tmp {status}; exit 0"
    )
    return {"command": ["sh", "-c", script, "sh", *manifest.command],
            "env": {"DATASET": f"{work}/{DATASET_FILE}", "RESULTS": f"{work}/{SCORES_FILE}"}}


def publish_step(manifest: Manifest, work: Path) -> tuple[dict, int]:
    """Read what the fetch and the model left in `work`, check the scores, publish them."""
    try:
        state = json.loads((work / JOB_STATE).read_text())
    except (OSError, ValueError) as e:
        job = Job(manifest, None)
        job.fail(f"the fetch step left no job state in {work} ({e}); did it run?")
        return job.result, 1
    spec = JobSpec(**state["spec"])
    job = Job(manifest, spec)
    job.result.update(state["result"])
    log_path = work / MODEL_LOG
    log_tail = tail_text(_read_tail(log_path)) if log_path.exists() else ""
    try:
        try:
            status = int((work / MODEL_STATUS).read_text().strip())
        except (OSError, ValueError):
            raise BatchFailure(
                "the model container recorded no exit status within its batch timeout "
                f"({manifest.batch.timeout}) and a grace period: it stopped or was stopped before "
                "the model finished") from None
        if status == 124:
            raise BatchFailure(
                f"the model ran longer than its batch timeout ({manifest.batch.timeout}, "
                "manifest batch.timeout) and was stopped")
        if status == 137:
            raise BatchFailure("the model was killed (SIGKILL): out of memory, or it ignored the stop "
                               "signal after its batch timeout")
        if status > 128:
            raise BatchFailure(f"the model {describe_exit(128 - status)}")
        if status != 0:
            raise BatchFailure(f"the model exited with status {status}")
        rows = check_results(work / SCORES_FILE, job.result["rows"], manifest)
        job.summarize(work / SCORES_FILE, dataset=work / "dataset.csv")
        scores_uri = storage.join(spec.results_prefix, SCORES_FILE)
        published = work / SCORES_FILE
        if manifest.passthrough:  # the passthrough columns first, then the score
            published = work / PUBLISHED_FILE
            join_scores(manifest, work / PASSTHROUGH_FILE, work / SCORES_FILE, published)
        storage.put_file(published, scores_uri)
        job.succeed(rows, scores_uri)
    except (BatchFailure, StorageError) as e:
        job.fail(str(e), log_tail)
    job.store_result()
    return job.result, (0 if job.result["status"] == "succeeded" else 1)


def _read_tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - LOG_TAIL_BYTES, 0))
        return f.read()
