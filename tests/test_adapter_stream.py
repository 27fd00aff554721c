"""adapters/stream.py: a dataset streamed through a realtime model, chunk by chunk.

`run_stream` is given a sender standing in for the replicas (what it answers is what each test
is about); the last test runs `python -m adapters stream` for real, over HTTP, against a real
adapter in front of the fixture model tests/fixtures/local/echo.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from adapters import stream
from adapters.batch import JobSpec
from adapters.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "tests" / "fixtures" / "local" / "echo"


@pytest.fixture
def manifest(tmp_path):
    def make(**changes):
        folder = tmp_path / f"echo-{len(list(tmp_path.glob('echo-*')))}"
        folder.mkdir()
        for f in ECHO.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        data = yaml.safe_load((folder / "model.yaml").read_text())
        data.update(changes)
        (folder / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return load_manifest(folder)
    return make


def echo_sender(factor=2.0, *, header="y", delay=None):
    """Answers as the adapter does for `Accept: text/csv`: the header, one score per row."""
    calls = []

    def send(body: bytes):
        lines = body.decode().splitlines()
        calls.append(len(lines) - 1)
        if delay:
            time.sleep(delay())
        xs = [float(line.split(",")[0]) for line in lines[1:]]
        return 200, {}, (header + "\n" + "".join(f"{x * factor!r}\n" for x in xs)).encode()
    send.calls = calls
    return send


def dataset(tmp_path, n, *, name="in.csv", header="x,delay,crash", row=lambda i: f"{i},,"):
    path = tmp_path / name
    path.write_text(header + "\n" + "".join(row(i) + "\n" for i in range(1, n + 1)))
    return path


def run(m, data, send, tmp_path, **kw):
    spec = JobSpec(dataset_uri=str(data), job="j1", results_prefix=str(tmp_path / "out") + os.sep)
    return stream.run_stream(m, spec, send, **kw)


def test_chunks_of_max_rows_joined_in_order_whatever_order_they_come_back(manifest, tmp_path):
    m = manifest(limits={"max_rows": 7})
    send = echo_sender(delay=lambda: random.random() / 100)   # answers come back out of order
    result, code = run(m, dataset(tmp_path, 100), send, tmp_path, concurrency=4)
    assert code == 0 and result["status"] == "succeeded" and result["rows"] == 100, result
    assert sorted(send.calls) == [2] + [7] * 14
    lines = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert lines == ["y", *[repr(i * 2.0) for i in range(1, 101)]]
    summary = result["score_summary"]
    assert summary["count"] == 100 and summary["quantiles"]["min"] == 2.0 and summary["quantiles"]["max"] == 200.0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "succeeded"


def test_at_most_scaling_max_chunks_are_in_flight(manifest, tmp_path):
    m = manifest(limits={"max_rows": 5}, scaling={"min": 0, "max": 3, "target_concurrency": 1})
    inner = echo_sender()
    now, most, lock = [0], [0], threading.Lock()

    def send(body):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.01)
        try:
            return inner(body)
        finally:
            with lock:
                now[0] -= 1
    result, _ = run(m, dataset(tmp_path, 60), send, tmp_path)
    assert result["status"] == "succeeded"
    assert most[0] == 3


def test_a_chunk_answered_503_or_unreachable_is_sent_again_and_a_lasting_one_fails_naming_its_rows(
        manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "BACKOFF_FIRST", 0.001)
    m = manifest(limits={"max_rows": 10})
    inner = echo_sender()
    tries = {"n": 0}

    def flaky(body):
        tries["n"] += 1
        if tries["n"] == 1:
            raise ConnectionResetError("reset")
        if tries["n"] in (2, 3):
            return 503, {"Retry-After": "0"}, b'{"error": "not ready"}'
        return inner(body)
    result, _ = run(m, dataset(tmp_path, 10), flaky, tmp_path, concurrency=1)
    assert result["status"] == "succeeded" and tries["n"] == 4
    import shutil

    shutil.rmtree(tmp_path / "out")

    def down(body):
        return 429, {}, b'{"error": "too many requests"}'
    result, code = run(m, dataset(tmp_path, 25), down, tmp_path, concurrency=1, retries=2)
    assert code == 1 and result["status"] == "failed" and result["results_uri"] is None
    assert "rows 1–10" in result["error"] and "after 3 tries" in result["error"] and "HTTP 429" in result["error"]
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_another_answer_fails_at_once_naming_the_rows(manifest, tmp_path):
    m = manifest(limits={"max_rows": 10})
    inner = echo_sender()
    n = {"calls": 0}

    def crash_on_third(body):
        n["calls"] += 1
        if b"\n25," in body:
            return 502, {}, b'{"error": "model echo closed the connection without answering"}'
        return inner(body)
    result, _ = run(m, dataset(tmp_path, 40), crash_on_third, tmp_path, concurrency=1)
    assert result["status"] == "failed"
    assert result["error"] == ("the model could not score rows 21–30: HTTP 502: model echo closed the connection "
                               "without answering (again when they were sent alone)")
    assert n["calls"] == 4   # sent again alone once; nothing after it was sent

    def refused(body):
        return 422, {}, b'{"error": "rows refused"}'
    result, _ = run(m, dataset(tmp_path, 5), refused, tmp_path)
    assert result["error"] == "the model could not score rows 1–5: HTTP 422: rows refused"


def test_a_crash_is_blamed_on_the_rows_that_cause_it_not_on_the_chunks_in_flight_with_them(manifest, tmp_path):
    """Every chunk in flight when the model dies is answered 502; sent again alone, only the
    chunk that kills it fails again."""
    m = manifest(limits={"max_rows": 5})
    inner = echo_sender()
    lock = threading.Lock()
    state = {"in_flight": 0, "dying": False}

    def send(body):
        with lock:
            state["in_flight"] += 1
        try:
            if b"\n23," in body:   # this chunk crashes the model, and with it every request it was serving
                with lock:
                    state["dying"] = True
                time.sleep(0.02)
                with lock:
                    state["dying"] = False
                return 502, {}, b'{"error": "model echo closed the connection without answering"}'
            time.sleep(0.01)
            with lock:
                if state["dying"]:
                    return 502, {}, b'{"error": "model echo closed the connection without answering"}'
            return inner(body)
        finally:
            with lock:
                state["in_flight"] -= 1
    for _ in range(5):
        result, _ = run(m, dataset(tmp_path, 60), send, tmp_path, concurrency=4)
        assert result["status"] == "failed"
        assert result["error"].startswith("the model could not score rows 21–25: HTTP 502"), result["error"]
    assert not (tmp_path / "out" / "scores.csv").exists()


@pytest.mark.parametrize("answer,needle", [
    (b"y\n1.0\n", "answered 1 score(s) for rows 1–3 (3 row(s))"),
    (b"y\n1.0\nnan\n2.0\n", "score for row 2 is not a finite number"),
    (b"y\n1.0\nabc\n2.0\n", "score for row 2 is not a finite number: 'abc'"),
    (b"a,b\n1,2\n1,2\n1,2\n", "has columns a, b; expected its score column 'y'"),
])
def test_a_wrong_answer_fails_the_job_saying_what_is_wrong(manifest, tmp_path, answer, needle):
    m = manifest(limits={"max_rows": 3})
    result, _ = run(m, dataset(tmp_path, 3), lambda body: (200, {}, answer), tmp_path)
    assert result["status"] == "failed" and needle in result["error"], result["error"]


def test_bad_rows_are_all_named_by_their_row_in_the_whole_file_and_nothing_is_sent_after(manifest, tmp_path):
    m = manifest(limits={"max_rows": 10})
    send = echo_sender()
    data = dataset(tmp_path, 50, row=lambda i: ("abc" if i in (23, 41) else str(i)) + ",,")
    result, code = run(m, data, send, tmp_path, concurrency=1)
    assert code == 1 and result["status"] == "failed"
    assert [(p["row"], p["field"]) for p in result["problems"]] == [(23, "x"), (41, "x")]
    assert result["invalid_values"] == 2
    assert sum(send.calls) <= 20    # the chunks before the bad one at most
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_a_cluster_job_logs_its_progress_for_the_runtime_that_reads_its_log(manifest, tmp_path, capsys):
    result, _ = run(manifest(limits={"max_rows": 4}), dataset(tmp_path, 10), echo_sender(), tmp_path,
                    log_progress=True)
    assert result["status"] == "succeeded"
    lines = [json.loads(line)["progress"] for line in capsys.readouterr().err.splitlines() if "progress" in line]
    assert lines[0]["rows_total"] == 10 and lines[-1]["rows_scored"] == 10 and lines[-1]["done"] is True


def test_a_dataset_of_no_rows_succeeds_with_a_header_alone(manifest, tmp_path):
    send = echo_sender()
    result, _ = run(manifest(), dataset(tmp_path, 0), send, tmp_path)
    assert result["status"] == "succeeded" and result["rows"] == 0 and send.calls == []
    assert (tmp_path / "out" / "scores.csv").read_text() == "y\n"


def test_a_missing_column_is_one_error_naming_it(manifest, tmp_path):
    m = manifest()
    result, _ = run(m, dataset(tmp_path, 5, header="delay,crash", row=lambda i: ","), echo_sender(), tmp_path)
    assert result["status"] == "failed" and "x" in result["error"] and "problems" not in result


def test_quoted_cells_crlf_and_blank_lines_go_through_the_csv_module(manifest, tmp_path):
    m = manifest(limits={"max_rows": 2})
    data = tmp_path / "q.csv"
    data.write_bytes(b'x,delay,crash\r\n"1",,\r\n\r\n2,"",\r\n3,,\r\n')
    result, _ = run(m, data, echo_sender(), tmp_path)
    assert result["status"] == "succeeded" and result["rows"] == 3, result
    assert (tmp_path / "out" / "scores.csv").read_text().split() == ["y", "2.0", "4.0", "6.0"]


def test_passthrough_columns_in_the_answers_are_kept_and_the_score_column_summarised(manifest, tmp_path):
    m = manifest(limits={"max_rows": 4})

    def send(body):
        lines = body.decode().splitlines()[1:]
        return 200, {}, ("id,y\n" + "".join(f"c{line.split(',')[0]},{float(line.split(',')[0])}\n"
                                            for line in lines)).encode()
    result, _ = run(m, dataset(tmp_path, 6), send, tmp_path)
    assert result["status"] == "succeeded"
    assert (tmp_path / "out" / "scores.csv").read_text().splitlines() == \
        ["id,y", *[f"c{i},{float(i)}" for i in range(1, 7)]]
    assert result["score_summary"]["quantiles"]["max"] == 6.0


def test_a_chunk_stays_under_max_body(manifest, tmp_path):
    m = manifest(limits={"max_rows": 1000, "max_body": "2Ki"})
    send = echo_sender()
    result, _ = run(m, dataset(tmp_path, 500, row=lambda i: f"{i}.{'0' * 20},,"), send, tmp_path)
    assert result["status"] == "succeeded" and sum(send.calls) == 500 and max(send.calls) < 100


def test_a_stop_ends_the_job_and_publishes_nothing(manifest, tmp_path):
    m = manifest(limits={"max_rows": 5})
    stop = threading.Event()
    inner = echo_sender()

    def send(body):
        stop.set()   # stopped while its first chunk is out
        return inner(body)
    result, code = run(m, dataset(tmp_path, 50), send, tmp_path, concurrency=1, stop=stop)
    assert code == 1 and result["status"] == "failed" and result["error"] == "stopped"
    assert not (tmp_path / "out" / "scores.csv").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_stream_command_runs_over_http_against_a_real_adapter(manifest, tmp_path):
    m = manifest(limits={"max_rows": 9})
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MODELPLANE_ADAPTER_SECRET", None)
    serve = subprocess.Popen([sys.executable, "-m", "adapters", "serve", str(m.folder), "--port", str(port)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        import http.client

        deadline = time.monotonic() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and serve.poll() is None, "the adapter did not become ready"
            time.sleep(0.05)
        data = dataset(tmp_path, 40)
        out = subprocess.run([sys.executable, "-m", "adapters", "stream", str(m.folder), "--url",
                              f"http://127.0.0.1:{port}/predict", "--dataset", str(data), "--results",
                              str(tmp_path / "res") + os.sep, "--job", "cli"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["status"] == "succeeded" and result["rows"] == 40 and result["job"] == "cli"
        assert (tmp_path / "res" / "scores.csv").read_text().split() == ["y", *[str(float(i)) for i in range(1, 41)]]
        # a batch model is refused by name
        bad = subprocess.run([sys.executable, "-m", "adapters", "stream", str(ROOT / "models" / "churn-risk"),
                              "--url", "http://127.0.0.1:1/predict", "--dataset", str(data)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "is a batch model; `stream` is for realtime models" in bad.stderr
    finally:
        os.killpg(serve.pid, 9)
        serve.wait()
