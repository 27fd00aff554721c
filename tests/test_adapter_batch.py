"""The batch adapter as a real process: local files, the real GCS emulator, JobSink event files."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters import batch
from adapters.manifest import load_manifest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "adapter" / "batch"
ROOT = Path(__file__).resolve().parent.parent
DATA = "x,region\n1,west\n2.5,east\n-1,west\n0,east\n10,west\n"
SCORES = [2.0, 5.0, -2.0, 0.0, 20.0]


def child_env(**extra: str) -> dict:
    env = dict(os.environ, **extra)
    env["MODELPLANE_MODEL_ENV"] = "FIXTURE_MODE"   # a model gets nothing else of ours
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for key in ("DATASET_URI", "RESULTS_URI", "JOB_ID", "K_EVENT_PATH"):
        if key not in extra:
            env.pop(key, None)
    return env


def run_adapter(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "adapters", *args], cwd=ROOT, env=child_env(**env),
                          capture_output=True, text=True, timeout=90, check=False)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    return proc, json.loads(lines[-1])


def scores_in(text: str) -> list[float]:
    header, *rows = text.strip().splitlines()
    assert header == "score"
    return [float(r) for r in rows]


def test_batch_from_local_path(tmp_path):
    dataset = tmp_path / "donors.csv"
    dataset.write_text(DATA)
    proc, result = run_adapter("batch", str(FIXTURE), "--dataset", str(dataset), "--job", "j1")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "results" / "j1"
    assert result["status"] == "succeeded"
    assert result["model"] == "fixture-batch" and result["version"] == "2.0.0" and result["job"] == "j1"
    assert result["rows"] == 5
    assert result["input"] == {"uri": str(dataset), "generation": None,
                               "md5": hashlib.md5(DATA.encode()).hexdigest()}
    assert result["results_uri"] == str(folder / "scores.csv")
    assert result["started_at"] <= result["finished_at"]
    assert scores_in((folder / "scores.csv").read_text()) == SCORES
    assert json.loads((folder / "result.json").read_text()) == result
    assert "fixture batch model: mode=good" in proc.stderr  # the model's stderr passes through
    assert sorted(p.name for p in folder.iterdir()) == ["result.json", "scores.csv"]  # no temp files left


def test_batch_from_gcs_with_env_vars(gcs, gcs_client):
    blob = gcs_client.bucket("test-bucket").blob("incoming/fixture-batch/march.csv")
    blob.upload_from_string(DATA, content_type="text/csv")
    blob.reload()
    proc, result = run_adapter("batch", str(FIXTURE),
                               DATASET_URI="gs://test-bucket/incoming/fixture-batch/march.csv", JOB_ID="g1")
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "succeeded" and result["rows"] == 5
    assert result["input"]["generation"] == str(blob.generation)
    assert result["input"]["md5"] == hashlib.md5(DATA.encode()).hexdigest()
    assert result["results_uri"] == "gs://test-bucket/results/fixture-batch/g1/scores.csv"
    bucket = gcs_client.bucket("test-bucket")
    assert scores_in(bucket.blob("results/fixture-batch/g1/scores.csv").download_as_text()) == SCORES
    assert json.loads(bucket.blob("results/fixture-batch/g1/result.json").download_as_text()) == result


def finalized_event(blob, generation) -> dict:
    """Google's event as Knative's JobSink mounts it: structured JSON; size and generation are strings."""
    return {
        "specversion": "1.0", "id": "evt-1", "type": "google.cloud.storage.object.v1.finalized",
        "source": "//storage.googleapis.com/projects/_/buckets/test-bucket",
        "subject": f"objects/{blob.name}", "time": "2024-04-01T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"bucket": "test-bucket", "name": blob.name, "generation": str(generation),
                 "metageneration": "1", "size": str(blob.size), "contentType": "text/csv", "kind": "storage#object"},
    }


def test_batch_from_jobsink_event_file(gcs, gcs_client, tmp_path):
    blob = gcs_client.bucket("test-bucket").blob("incoming/fixture-batch/april.csv")
    blob.upload_from_string(DATA, content_type="text/csv")
    blob.reload()
    event = {
        "specversion": "1.0", "id": "evt-1", "type": "google.cloud.storage.object.v1.finalized",
        "source": "//storage.googleapis.com/projects/_/buckets/test-bucket",
        "subject": "objects/incoming/fixture-batch/april.csv", "time": "2024-04-01T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"bucket": "test-bucket", "name": "incoming/fixture-batch/april.csv",
                 "generation": str(blob.generation), "metageneration": "1", "size": str(len(DATA)),
                 "contentType": "text/csv", "kind": "storage#object"},
    }
    events = tmp_path / "event-dir"
    events.mkdir()
    (events / "event").write_text(json.dumps(event))
    proc, result = run_adapter("batch", str(FIXTURE), K_EVENT_PATH=str(events))
    assert proc.returncode == 0, proc.stderr
    job = f"april-{blob.generation}"
    assert result["job"] == job
    assert result["input"]["uri"] == "gs://test-bucket/incoming/fixture-batch/april.csv"
    assert result["input"]["generation"] == str(blob.generation)
    assert result["results_uri"] == f"gs://test-bucket/results/fixture-batch/{job}/scores.csv"
    assert scores_in(gcs_client.bucket("test-bucket").blob(f"results/fixture-batch/{job}/scores.csv")
                     .download_as_text()) == SCORES


@pytest.mark.parametrize("data, mode, error, log_fragment", [
    (DATA, "exit3", "the model exited with status 3", "object 'coef' not found"),
    (DATA, "wrong-count", "wrote 4 score(s) for 5 input row(s)", "mode=wrong-count"),
    (DATA, "nan", "line 3 of the results is not a finite number", "mode=nan"),
    (DATA, "slow", "batch timeout (3s", "mode=slow"),
    ("x\n1\n", "good", "required feature column 'region' is missing", ""),
    ("x,region,colour\n1,west,red\n", "good", "unknown column 'colour'", ""),
], ids=["exit-non-zero", "wrong-row-count", "non-finite-score", "timeout", "header-missing-feature",
        "header-unknown-column"])
def test_batch_failure_leaves_no_scores(tmp_path, data, mode, error, log_fragment):
    dataset = tmp_path / "d.csv"
    dataset.write_text(data)
    proc, result = run_adapter("batch", str(FIXTURE), "--dataset", str(dataset), "--job", "f1",
                               FIXTURE_MODE=mode)
    assert proc.returncode == 1
    assert result["status"] == "failed"
    assert error in result["error"], result["error"]
    assert log_fragment in result["log_tail"]
    assert result["results_uri"] is None
    folder = tmp_path / "results" / "f1"
    assert not (folder / "scores.csv").exists()
    assert [p.name for p in folder.iterdir()] == ["result.json"]
    assert json.loads((folder / "result.json").read_text()) == result


def test_event_for_an_overwritten_generation_fails_instead_of_scoring_the_new_upload(gcs, gcs_client, tmp_path):
    blob = gcs_client.bucket("test-bucket").blob("incoming/fixture-batch/may.csv")
    blob.upload_from_string(DATA)
    blob.reload()
    old_generation = blob.generation
    blob.upload_from_string(DATA + "3,west\n")
    blob.reload()
    assert blob.generation != old_generation
    (tmp_path / "event").write_text(json.dumps(finalized_event(blob, old_generation)))
    proc, result = run_adapter("batch", str(FIXTURE), K_EVENT_PATH=str(tmp_path))
    assert proc.returncode == 1
    assert str(old_generation) in result["error"]
    assert not gcs_client.bucket("test-bucket").blob(f"results/fixture-batch/may-{old_generation}/scores.csv").exists()


def test_sigterm_stops_the_model_and_fails_the_job(tmp_path):
    import re
    import signal
    import time

    dataset = tmp_path / "d.csv"
    dataset.write_text(DATA)
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "adapters", "batch", str(FIXTURE), "--dataset", str(dataset),
                                 "--job", "t1"], cwd=ROOT, env=child_env(FIXTURE_MODE="slow"),
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        for _ in range(400):
            m = re.search(r"mode=slow pid=(\d+)", err_path.read_text())
            if m:
                break
            time.sleep(0.05)
        assert m, err_path.read_text()
        from model_procs import host_pid

        pid = host_pid(int(m.group(1)), proc.pid)   # while the adapter still runs
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "failed" and "SIGTERM" in result["error"]
    assert not (tmp_path / "results" / "t1" / "scores.csv").exists()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"model {pid} still running after the job was stopped")


def test_header_failure_never_starts_the_model(tmp_path):
    dataset = tmp_path / "d.csv"
    dataset.write_text("x\n1\n")
    proc, result = run_adapter("batch", str(FIXTURE), "--dataset", str(dataset), "--job", "h1")
    assert proc.returncode == 1 and result["status"] == "failed"
    assert "fixture batch model" not in proc.stderr


def test_gcs_failure_leaves_no_scores_object(gcs, gcs_client):
    bucket = gcs_client.bucket("test-bucket")
    bucket.blob("incoming/fixture-batch/bad.csv").upload_from_string(DATA)
    proc, result = run_adapter("batch", str(FIXTURE), "--dataset", "gs://test-bucket/incoming/fixture-batch/bad.csv",
                               "--job", "gf1", FIXTURE_MODE="wrong-count")
    assert proc.returncode == 1 and result["status"] == "failed"
    assert not bucket.blob("results/fixture-batch/gf1/scores.csv").exists()
    assert json.loads(bucket.blob("results/fixture-batch/gf1/result.json").download_as_text())["status"] == "failed"


def test_missing_dataset_is_a_failed_result(tmp_path):
    proc, result = run_adapter("batch", str(FIXTURE), "--dataset", str(tmp_path / "nope.csv"), "--job", "m1")
    assert proc.returncode == 1
    assert "does not exist" in result["error"]


# -- the Knative Job layout: two main containers, adapter `job` and the model's sh wrapper ---

def start_model_container(work: Path, mode: str) -> subprocess.Popen:
    """The model container's command as the Job runs it: POSIX sh in the model folder, no Python
    of its own (the fixture model itself is Python)."""
    step = batch.score_step(load_manifest(FIXTURE), str(work))
    return subprocess.Popen(step["command"], cwd=FIXTURE, env=child_env(**step["env"], FIXTURE_MODE=mode),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def write_event(folder: Path, bucket: str, name: str, generation: object = "1") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "event").write_text(json.dumps({
        "specversion": "1.0", "id": "1", "type": "google.cloud.storage.object.v1.finalized",
        "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}", "subject": f"objects/{name}",
        "data": {"bucket": bucket, "name": name, "generation": str(generation)}}))


@pytest.mark.parametrize("mode, error", [("good", None), ("exit3", "exited with status 3"),
                                         ("slow", "batch timeout (3s")])
def test_job_containers_hand_over_through_the_work_folder(gcs, gcs_client, tmp_path, mode, error):
    bucket = gcs_client.bucket("test-bucket")
    name = f"incoming/fixture-batch/steps-{mode}.csv"
    blob = bucket.blob(name)
    blob.upload_from_string(DATA)
    work, events = tmp_path / "work", tmp_path / "event"
    write_event(events, "test-bucket", name, blob.generation)
    # Both containers start together, the model first: it must wait for the dataset.
    model = start_model_container(work, mode)
    # The adapter reads the manifest from env and the event from K_EVENT_PATH, as in the Job pod.
    manifest_json = json.dumps(load_manifest(FIXTURE).to_dict())
    proc, result = run_adapter("job", "--work", str(work), MODELPLANE_MANIFEST=manifest_json,
                               K_EVENT_PATH=str(events), JOB_ID=f"s-{mode}",
                               RESULTS_URI=f"gs://test-bucket/results/fixture-batch/s-{mode}/")
    assert model.wait(timeout=30) == 0  # always, so that the adapter reports
    assert (work / "dataset.csv").read_text() == DATA
    blob = bucket.blob(f"results/fixture-batch/s-{mode}/scores.csv")
    if error is None:
        assert proc.returncode == 0, proc.stderr
        assert result["status"] == "succeeded" and result["rows"] == 5
        assert result["input"]["uri"] == f"gs://test-bucket/{name}" and result["job"] == f"s-{mode}"
        assert scores_in(blob.download_as_text()) == SCORES
    else:
        assert proc.returncode == 1
        assert error in result["error"] and f"mode={mode}" in result["log_tail"]
        assert not blob.exists()
        stored = json.loads(bucket.blob(f"results/fixture-batch/s-{mode}/result.json").download_as_text())
        assert stored == result


@pytest.mark.parametrize("case", ["no-object", "no-event", "bad-manifest"])
def test_job_that_fails_before_the_model_never_starts_it(gcs, gcs_client, tmp_path, case):
    work, events = tmp_path / "work", tmp_path / "event"
    if case != "no-event":
        write_event(events, "test-bucket", f"incoming/fixture-batch/{case}.csv")  # never uploaded
    model = start_model_container(work, "good")
    manifest = json.dumps(load_manifest(FIXTURE).to_dict()) if case != "bad-manifest" else '{"name": "x"}'
    proc = subprocess.run([sys.executable, "-m", "adapters", "job", "--work", str(work)], cwd=ROOT,
                          env=child_env(MODELPLANE_MANIFEST=manifest, K_EVENT_PATH=str(events), JOB_ID=case),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    out, _ = model.communicate(timeout=30)
    assert model.returncode == 0 and "fixture batch model" not in out  # told not to run
    assert (work / "fetch.done").read_text() == "failed" and not (work / "model.status").exists()
    if case == "no-object":
        assert "incoming/fixture-batch/no-object.csv" in json.loads(proc.stdout.strip().splitlines()[-1])["error"]
        assert not gcs_client.bucket("test-bucket").blob("results/fixture-batch/no-object/scores.csv").exists()


def test_job_gives_up_on_a_model_container_that_never_reports(gcs, gcs_client, tmp_path, monkeypatch):
    """A model container killed from outside (eviction) writes no status: the adapter fails the job
    once the batch timeout and its grace have passed, and publishes nothing."""
    gcs_client.bucket("test-bucket").blob("incoming/fixture-batch/lost.csv").upload_from_string(DATA)
    monkeypatch.setattr(batch, "STATUS_GRACE_SECONDS", 0.0)
    monkeypatch.setattr(batch, "KILL_GRACE_SECONDS", 0.0)
    manifest = load_manifest(FIXTURE)
    spec = batch.JobSpec(dataset_uri="gs://test-bucket/incoming/fixture-batch/lost.csv", job="lost",
                         results_prefix="gs://test-bucket/results/fixture-batch/lost/")
    result, code = batch.job_step(manifest, spec, tmp_path / "work", poll=0.05)
    assert code == 1 and "recorded no exit status" in result["error"]
    assert (tmp_path / "work" / "fetch.done").read_text() == "ok"
    assert not gcs_client.bucket("test-bucket").blob("results/fixture-batch/lost/scores.csv").exists()


# -- streamed checks (unit level: the functions the runner uses) ---------------------------

def test_row_count_handles_quotes_blank_lines_and_crlf(tmp_path):
    f = tmp_path / "q.csv"
    f.write_bytes(b'x,region\r\n1,"west"\r\n\r\n2,"ea\nst"\r\n3,west')
    assert batch.scan_input(f)[1] == 3
    f.write_bytes(b"x,region\n1,west\n2,east\n")
    assert batch.scan_input(f) == (hashlib.md5(f.read_bytes()).hexdigest(), 2)


def test_results_check_finds_the_bad_line_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "CHUNK", 64)  # many chunks from a small file
    manifest = load_manifest(FIXTURE)
    f = tmp_path / "scores.csv"
    good = ["score"] + [f"{i / 7:.6f}" for i in range(100)]
    f.write_text("\n".join(good) + "\n\n")  # a trailing blank line is fine
    assert batch.check_results(f, 100, manifest) == 100
    bad = list(good)
    bad[57] = "NA"
    f.write_text("\n".join(bad) + "\n")
    with pytest.raises(batch.BatchFailure, match="line 58 of the results is not a number: 'NA'"):
        batch.check_results(f, 100, manifest)
    gap = good[:30] + [""] + good[30:]
    f.write_text("\n".join(gap) + "\n")
    with pytest.raises(batch.BatchFailure, match="line 31 of the results is empty"):
        batch.check_results(f, 100, manifest)
    f.write_text('"score"\n"0.5"\n1e999\n')
    with pytest.raises(batch.BatchFailure, match="line 3 of the results is not a finite number"):
        batch.check_results(f, 2, manifest)


def test_results_follower_checks_while_written_and_rechecks_a_rewritten_file(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "CHUNK", 16)
    monkeypatch.setattr(batch, "FOLLOW_READ", 16)
    manifest = load_manifest(FIXTURE)
    f = tmp_path / "scores.csv"
    follower = batch.ResultsFollower(f)
    assert follower.poll() is False  # not written yet
    with open(f, "w") as out:
        out.write("score\n0.1\n0.")
        out.flush()
        while follower.poll():
            pass
        out.write("2\n0.3\n")
    while follower.poll():
        pass
    assert follower.offset > 0 and follower.stream is not None
    assert batch.check_results(f, 3, manifest, follower) == 3

    follower = batch.ResultsFollower(f)
    while follower.poll():
        pass
    f.write_text("score\n0.1\nNA\n0.3\n")  # the model rewrote its results after we had read them
    with pytest.raises(batch.BatchFailure, match="line 3 of the results is not a number"):
        batch.check_results(f, 3, manifest, follower)


def test_a_bucket_that_cannot_be_reached_fails_the_job_with_a_reason(tmp_path, monkeypatch):
    """Transport failures (retries given up, connection refused) are a failed result naming the
    dataset, not a traceback: the adapter container must still report and release the model."""
    from google.api_core import exceptions as gexc

    from adapters import storage

    class Unreachable:
        def bucket(self, name):
            return self

        def get_blob(self, name, generation=None):
            raise gexc.RetryError("Timeout of 120.0s exceeded, last exception: connection refused", None)

    monkeypatch.setattr(storage, "_client", Unreachable())
    spec = batch.JobSpec(dataset_uri="gs://test-bucket/incoming/fixture-batch/x.csv", job="u1",
                         results_prefix=str(tmp_path / "results"))
    result, code = batch.job_step(load_manifest(FIXTURE), spec, tmp_path / "work")
    assert code == 1
    assert "could not download the dataset gs://test-bucket/incoming/fixture-batch/x.csv" in result["error"]
    assert "connection refused" in result["error"]
    assert (tmp_path / "work" / "fetch.done").read_text() == "failed"
    assert json.loads((tmp_path / "results" / "result.json").read_text())["status"] == "failed"


# -- every row checked against the features ----------------------------------------------------------

@pytest.mark.parametrize("model", ["churn-risk", pytest.param("member-retention", marks=pytest.mark.skipif(
    not __import__("shutil").which("Rscript"), reason="Rscript not installed"))])
def test_bad_rows_fail_the_job_naming_row_and_field_before_the_model_scores_them(tmp_path, model):
    """The README promises every row is checked: a bad cell in row 7 of 2,000 fails the job
    with the row and the field in result.json, not with "the model exited with status 1"."""
    folder = ROOT / "models" / model
    sample = (folder / "sample.csv").read_text().splitlines()
    header, rows = sample[0], sample[1:]
    body = [rows[i % len(rows)] for i in range(2000)]
    names = header.split(",")
    bad = body[6].split(",")
    bad[1] = "lots"  # a number/integer column
    body[6] = ",".join(bad)
    wrong_width = body[1500] + ",extra"
    body[1500] = wrong_width
    dataset = tmp_path / "bad.csv"
    dataset.write_text(header + "\n" + "\n".join(body) + "\n")
    proc, result = run_adapter("batch", str(folder), "--dataset", str(dataset), "--job", "bad")
    assert proc.returncode == 1
    assert result["status"] == "failed"
    assert result["invalid_values"] == 2
    assert {"row": 7, "field": names[1], "error": result["problems"][0]["error"]} == result["problems"][0]
    assert "lots" in result["problems"][0]["error"]
    assert result["problems"][1]["row"] == 1501 and f"the header has {len(names)}" in result["problems"][1]["error"]
    assert result["error"].startswith("2 value(s) in the dataset do not match the model's features (first: row 7")
    assert not (tmp_path / "results" / "bad" / "scores.csv").exists()
    stored = json.loads((tmp_path / "results" / "bad" / "result.json").read_text())
    assert stored["problems"] == result["problems"]


def test_only_the_first_hundred_problems_are_listed_but_all_are_counted(tmp_path):
    dataset = tmp_path / "many.csv"
    dataset.write_text("x,region\n" + "".join(f"{'abc' if i % 2 else i},west\n" for i in range(1000)))
    proc, result = run_adapter("batch", str(FIXTURE), "--dataset", str(dataset), "--job", "m")
    assert proc.returncode == 1
    assert result["invalid_values"] == 500 and len(result["problems"]) == 100
    assert [p["row"] for p in result["problems"][:3]] == [2, 4, 6]


@pytest.mark.parametrize("text,needle", [
    ("x,region\n1,west\n" + '"' + "9" * 140_000 + '",east\n', "line 3"),      # a cell past the csv module's limit
    ("x,region\n1,west\n2\r5,east\n3,west\n", "row"),                      # a bare CR inside a cell
    ('x,region\n1,west\n"2",ea"st\n', "row"),                               # a stray quote
])
def test_malformed_csv_fails_the_job_naming_where(tmp_path, text, needle):
    dataset = tmp_path / "odd.csv"
    dataset.write_bytes(text.encode())
    proc, result = run_adapter("batch", str(FIXTURE), "--dataset", str(dataset), "--job", "o")
    assert proc.returncode == 1 and result["status"] == "failed", result
    assert needle in result["error"], result["error"]
    # the adapter never raises on it (the model, racing the check, may fail on the row itself)
    raised_in = re.findall(r'File "([^"]+)"', proc.stderr)
    assert not [f for f in raised_in if "/adapters/" in f], proc.stderr[-2000:]


def test_the_row_check_follows_the_feature_rules_cell_by_cell(tmp_path):
    from adapters.manifest import parse_manifest
    from adapters.schema import TextRowChecker

    manifest = parse_manifest(
        "name: m\nversion: 1.0.0\nkind: batch\nlanguage: python\ncommand: [x]\nfeatures:\n"
        "  - {name: n, type: number}\n  - {name: i, type: integer, required: false}\n"
        "  - {name: b, type: boolean}\n  - {name: s, type: string, allowed: [a, b]}\n", check_files=False)
    checker = TextRowChecker(manifest, ["n", "i", "b", "s"])
    checker.check([["1.5", "2", "yes", "a"], ["1e3", "", "FALSE", "b"], ["3", "4.0", "0", "a"]], 1)
    assert checker.total == 0
    checker.check([["inf", "2", "true", "a"], ["", "2.5", "maybe", "c"], ["nan", "x", "1", ""]], 4)
    found = {(p["row"], p["field"]) for p in checker.problems}
    assert found == {(4, "n"), (5, "n"), (5, "i"), (5, "b"), (5, "s"), (6, "n"), (6, "i"), (6, "s")}
    # finite values whose sum overflows are fine, row by row; one inf among them is still found
    checker = TextRowChecker(manifest, ["n", "i", "b", "s"])
    assert checker.check_text("1e308,1,true,a\n1e308,1,true,a\n", 1) == 2 and checker.total == 0
    checker.check_text("1e308,1,true,a\n-inf,1,true,a\n", 3)
    assert [(p["row"], p["field"]) for p in checker.problems] == [(4, "n")]


# -- scores streamed to the bucket while the model writes them --------------------------------------

STREAM_MODEL = '''\
import os, sys, time
rows = sum(1 for _ in open(os.environ["DATASET"])) - 1
mode = os.environ["STREAM_MODE"]
go = os.environ["STREAM_GO"]
if mode == "forever":  # a runaway model: never stops writing
    with open(os.environ["RESULTS"], "w") as out:
        out.write("score\\n")
        while True:
            out.write("1.5\\n" * 10000)
with open(os.environ["RESULTS"], "w") as out:
    out.write("score\\n")
    first = "7.0" if mode == "rewrite" else "1.5"
    out.write("".join(f"{first}\\n" for _ in range(rows)))
    out.flush()
    open(go + ".written", "w").close()
    while not os.path.exists(go):  # held here, results written, until the test has looked
        time.sleep(0.01)
if mode == "rewrite":  # replaced after the adapter read (and streamed) the first version
    with open(os.environ["RESULTS"], "w") as out:
        out.write("score\\n" + "".join("2.5\\n" for _ in range(rows)))
sys.exit(3 if mode == "exit3" else 0)
'''


def stream_model(tmp_path: Path) -> Path:
    folder = tmp_path / "stream-model"
    folder.mkdir()
    (folder / "score.py").write_text(STREAM_MODEL)
    (folder / "model.yaml").write_text(
        "name: stream-model\nversion: 1.0.0\nkind: batch\nlanguage: python\n"
        f"command: [{json.dumps(sys.executable)}, score.py]\n"
        "features:\n  - {name: x, type: number}\nscore: {name: score, type: number}\nbatch: {timeout: 60s}\n")
    return folder


@pytest.mark.parametrize("mode", ["ok", "exit3", "rewrite"])
def test_scores_stream_to_the_bucket_while_written_and_appear_only_when_the_job_succeeds(
        gcs, gcs_client, tmp_path, monkeypatch, mode):
    """Chunks of the scores reach the bucket while the model still runs, yet no object exists until
    the model exited 0 and the checks passed; a failed model leaves none, and a model that rewrites
    its results gets the final file published, not the bytes streamed before."""
    import threading

    from adapters import storage

    monkeypatch.setattr(storage, "UPLOAD_CHUNK", 256 << 10)
    uploads = []

    class Recorded(storage.ScoresUpload):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, chunk=storage.UPLOAD_CHUNK, **kwargs)
            uploads.append(self)

    monkeypatch.setattr(storage, "ScoresUpload", Recorded)
    rows = 200_000  # 800 KB of scores: three whole chunks go out before the model exits
    bucket = gcs_client.bucket("test-bucket")
    name = f"incoming/stream-model/{mode}.csv"
    bucket.blob(name).upload_from_string("x\n" + "1\n" * rows)
    go = tmp_path / "go"
    monkeypatch.setenv("STREAM_MODE", mode)
    monkeypatch.setenv("STREAM_GO", str(go))
    monkeypatch.setenv("MODELPLANE_MODEL_ENV", "STREAM_MODE,STREAM_GO")
    monkeypatch.setenv("MODELPLANE_SANDBOX", "off")   # the test and the model meet in its tmp_path
    manifest = load_manifest(stream_model(tmp_path))
    spec = batch.JobSpec(dataset_uri=f"gs://test-bucket/{name}", job=f"stream-{mode}",
                         results_prefix=f"gs://test-bucket/results/stream-model/stream-{mode}/")
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(zip(("result", "code"), batch.run_batch(manifest, spec))))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not (uploads and uploads[0].sent >= 3 * (256 << 10)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "go.written").exists()
        assert uploads and uploads[0].sent >= 3 * (256 << 10), "nothing was streamed while the model ran"
        scores_blob = bucket.blob(f"results/stream-model/stream-{mode}/scores.csv")
        assert not scores_blob.exists()  # sent, but not an object yet
    finally:
        go.touch()
        runner.join(60)
    result, code = out["result"], out["code"]
    if mode == "exit3":
        assert code == 1 and "exited with status 3" in result["error"]
        assert not scores_blob.exists()
        stored = json.loads(bucket.blob(f"results/stream-model/stream-{mode}/result.json").download_as_text())
        assert stored["status"] == "failed"
    else:
        assert code == 0, result
        expected = "score\n" + ("2.5\n" if mode == "rewrite" else "1.5\n") * rows
        assert scores_blob.download_as_text() == expected
        assert result["rows"] == rows


def test_a_stream_that_breaks_is_published_whole(gcs, gcs_client, tmp_path, monkeypatch):
    from adapters import storage

    calls = []

    def refuse(self, body, *, final):
        calls.append(final)
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(storage.ScoresUpload, "_put", refuse)
    monkeypatch.setattr(storage, "UPLOAD_CHUNK", 256 << 10)
    bucket = gcs_client.bucket("test-bucket")
    bucket.blob("incoming/fixture-batch/broken.csv").upload_from_string(DATA)
    upload = storage.ScoresUpload("gs://test-bucket/results/fixture-batch/broken/scores.csv", chunk=256 << 10)
    upload.write(b"x" * (300 << 10))
    assert upload.broken and "connection reset" in upload.broken and calls == [False]
    with pytest.raises(storage.StorageError):
        upload.commit()
    # the whole run: the same failure, and yet the scores are published (whole) and right
    spec = batch.JobSpec(dataset_uri="gs://test-bucket/incoming/fixture-batch/broken.csv", job="broken",
                         results_prefix="gs://test-bucket/results/fixture-batch/broken/")
    result, code = batch.run_batch(load_manifest(FIXTURE), spec)
    assert code == 0, result
    assert scores_in(bucket.blob("results/fixture-batch/broken/scores.csv").download_as_text()) == SCORES


def test_scores_upload_commit_and_abort(gcs, gcs_client):
    from adapters import storage

    bucket = gcs_client.bucket("test-bucket")
    data = os.urandom(600 << 10)
    kept = storage.ScoresUpload("gs://test-bucket/results/u/kept.csv", chunk=256 << 10)
    for i in range(0, len(data), 100_000):
        kept.write(data[i:i + 100_000])
    assert kept.sent == 512 << 10 and not bucket.blob("results/u/kept.csv").exists()
    kept.commit()
    assert bucket.blob("results/u/kept.csv").download_as_bytes() == data
    dropped = storage.ScoresUpload("gs://test-bucket/results/u/dropped.csv", chunk=256 << 10)
    dropped.write(data)
    assert dropped.sent == 512 << 10
    dropped.abort()
    assert not bucket.blob("results/u/dropped.csv").exists()
    empty = storage.ScoresUpload("gs://test-bucket/results/u/empty.csv", chunk=256 << 10)
    empty.commit(b"score\n")
    assert bucket.blob("results/u/empty.csv").download_as_bytes() == b"score\n"


def test_wait_exit_returns_the_status_or_none_after_the_timeout():
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(4)"])
    try:
        assert batch.wait_exit(proc, 0.01) is None
        assert batch.wait_exit(proc, 30) == 4
        assert batch.wait_exit(proc, 0) == 4  # already reaped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_failed_job_stops_following_a_model_that_writes_without_end(gcs, gcs_client, tmp_path, monkeypatch):
    """A bad input row fails the job while the model still writes: the follower must not chase it."""
    import threading

    bucket = gcs_client.bucket("test-bucket")
    bucket.blob("incoming/stream-model/runaway.csv").upload_from_string("x\n" + "1\n" * 50_000 + "oops\n")
    monkeypatch.setenv("STREAM_MODE", "forever")
    monkeypatch.setenv("STREAM_GO", str(tmp_path / "go"))
    monkeypatch.setenv("MODELPLANE_MODEL_ENV", "STREAM_MODE,STREAM_GO")
    manifest = load_manifest(stream_model(tmp_path))
    spec = batch.JobSpec(dataset_uri="gs://test-bucket/incoming/stream-model/runaway.csv", job="runaway",
                         results_prefix="gs://test-bucket/results/stream-model/runaway/")
    out: dict = {}
    work = tmp_path / "work"
    runner = threading.Thread(target=lambda: out.update(zip(("result", "code"),
                                                            batch.run_batch(manifest, spec, work=work))), daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "the job did not end: still following a model that never stops"
    assert out["code"] == 1 and out["result"]["invalid_values"] == 1
    assert "Error" not in out["result"]["log_tail"], out["result"]["log_tail"]
    assert (work / batch.MODEL_OUT / "scores.csv").stat().st_size > 1 << 20  # it was writing, and fast, when the job failed
    assert not bucket.blob("results/stream-model/runaway/scores.csv").exists()


# -- passthrough columns: checked, never the model's, first in scores.csv ---------------------------

PT_MANIFEST = """
passthrough:
  - customer_id
  - {name: batch_no, type: integer, required: false}
"""
PT_DATA = 'customer_id,x,batch_no,region\n"Smith, J.",1,3,west\n007,2.5,,east\nC-3,-1,5,west\n'


def passthrough_fixture(tmp_path: Path) -> Path:
    """The fixture batch model with passthrough columns declared; the model refuses a column it
    does not know (so a job that succeeds proves it never saw them)."""
    folder = tmp_path / "model"
    shutil.copytree(FIXTURE, folder)
    (folder / "model.yaml").write_text((FIXTURE / "model.yaml").read_text() + PT_MANIFEST)
    return folder


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_passthrough_columns_come_first_in_scores_csv(tmp_path):
    folder = passthrough_fixture(tmp_path)
    dataset = tmp_path / "customers.csv"
    dataset.write_text(PT_DATA)
    proc, result = run_adapter("batch", str(folder), "--dataset", str(dataset), "--job", "p1")
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "succeeded" and result["rows"] == 3
    assert result["input"]["md5"] == hashlib.md5(PT_DATA.encode()).hexdigest()  # of the dataset as given
    assert read_csv((tmp_path / "results" / "p1" / "scores.csv").read_text()) == [
        ["customer_id", "batch_no", "score"], ["Smith, J.", "3", "2.0"], ["007", "", "5.0"], ["C-3", "5", "-2.0"]]
    assert "dataset_summary" not in result or result  # (another part of the result, not this test's)


def test_without_passthrough_the_model_reads_the_dataset_itself(tmp_path):
    dataset = tmp_path / "donors.csv"
    dataset.write_text(DATA)
    proc, result = run_adapter("batch", str(FIXTURE), "--dataset", str(dataset), "--job", "n1")
    assert proc.returncode == 0, proc.stderr
    assert f"dataset={dataset}" in proc.stderr  # no copy made


def test_split_dataset_streams_many_rows_and_keeps_cells_as_they_were(tmp_path, monkeypatch):
    manifest = load_manifest(passthrough_fixture(tmp_path))
    lines = [f'{"id-" + str(i) if i % 7 else chr(34) + "a,b" + str(i) + chr(34)},{i * 0.5},{i if i % 3 else ""},'
             f'{"west" if i % 2 else "east"}' for i in range(25_000)]   # past the 10,000-row blocks
    source = tmp_path / "in.csv"
    source.write_text("customer_id,x,batch_no,region\n" + "\n".join(lines) + "\n\n")
    md5, rows = batch.split_dataset(manifest, ["customer_id", "x", "batch_no", "region"], source,
                                    tmp_path / "features.csv", tmp_path / "ids.csv")
    assert rows == 25_000 and md5 == hashlib.md5(source.read_bytes()).hexdigest()
    features = read_csv((tmp_path / "features.csv").read_text())
    ids = read_csv((tmp_path / "ids.csv").read_text())
    original = read_csv(source.read_text())
    assert features == [[r[1], r[3]] for r in original if r]
    assert ids == [["customer_id", "batch_no"]] + [[r[0], r[2]] for r in original[1:] if r]
    scores = tmp_path / "scores.csv"
    scores.write_text("score\n" + "".join(f"{i}.5\n" for i in range(25_000)))
    batch.join_scores(manifest, tmp_path / "ids.csv", scores, tmp_path / "out.csv")
    joined = read_csv((tmp_path / "out.csv").read_text())
    assert joined[0] == ["customer_id", "batch_no", "score"]
    assert joined[1:] == [[r[0], r[2], f"{i}.5"] for i, r in enumerate(original[1:-1])]


def test_passthrough_values_are_checked_naming_row_and_field(tmp_path):
    folder = passthrough_fixture(tmp_path)
    dataset = tmp_path / "bad.csv"
    dataset.write_text("customer_id,x,batch_no,region\na,1,1,west\nb,2,2,west\nc,3,three,west\n")
    proc, result = run_adapter("batch", str(folder), "--dataset", str(dataset), "--job", "pb")
    assert proc.returncode == 1 and result["status"] == "failed"
    assert result["problems"] == [{"row": 3, "field": "batch_no", "error": "expected an integer; got 'three'"}]
    assert "fixture batch model" not in proc.stderr  # checked before the model starts
    dataset.write_text("x,region\n1,west\n")
    proc, result = run_adapter("batch", str(folder), "--dataset", str(dataset), "--job", "pc")
    assert result["status"] == "failed" and "required passthrough column 'customer_id' is missing" in result["error"]


def test_passthrough_in_the_job_containers_and_gcs(gcs, gcs_client, tmp_path):
    """The Knative Job's two containers: the model container reads dataset.csv, the features only;
    the adapter publishes the join."""
    folder = passthrough_fixture(tmp_path)
    bucket = gcs_client.bucket("test-bucket")
    name = "incoming/fixture-batch/pt.csv"
    blob = bucket.blob(name)
    blob.upload_from_string(PT_DATA)
    work, events = tmp_path / "work", tmp_path / "event"
    write_event(events, "test-bucket", name, blob.generation)
    step = batch.score_step(load_manifest(folder), str(work))
    model = subprocess.Popen(step["command"], cwd=folder, env=child_env(**step["env"]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc, result = run_adapter("job", "--work", str(work), MODELPLANE_MANIFEST=json.dumps(load_manifest(folder).to_dict()),
                               K_EVENT_PATH=str(events), JOB_ID="pt",
                               RESULTS_URI="gs://test-bucket/results/fixture-batch/pt/")
    assert model.wait(timeout=30) == 0
    assert proc.returncode == 0, (proc.stderr, model.stdout.read())
    assert (work / "dataset.csv").read_text() == "x,region\n1,west\n2.5,east\n-1,west\n"
    assert result["rows"] == 3 and result["input"]["md5"] == hashlib.md5(PT_DATA.encode()).hexdigest()
    assert read_csv(bucket.blob("results/fixture-batch/pt/scores.csv").download_as_text()) == [
        ["customer_id", "batch_no", "score"], ["Smith, J.", "3", "2.0"], ["007", "", "5.0"], ["C-3", "5", "-2.0"]]


def test_passthrough_to_gcs_from_run_batch(gcs, gcs_client, tmp_path):
    folder = passthrough_fixture(tmp_path)
    gcs_client.bucket("test-bucket").blob("incoming/fixture-batch/ptg.csv").upload_from_string(PT_DATA)
    proc, result = run_adapter("batch", str(folder), DATASET_URI="gs://test-bucket/incoming/fixture-batch/ptg.csv",
                               JOB_ID="ptg")
    assert proc.returncode == 0, proc.stderr
    text = gcs_client.bucket("test-bucket").blob("results/fixture-batch/ptg/scores.csv").download_as_text()
    assert read_csv(text)[0] == ["customer_id", "batch_no", "score"] and len(read_csv(text)) == 4


@pytest.mark.skipif(not __import__("shutil").which("Rscript"), reason="Rscript not installed")
def test_passthrough_with_the_r_batch_example(tmp_path):
    """member-retention (R) declares member_id: its sample scores with the ids first, row for row."""
    folder = ROOT / "models" / "member-retention"
    sample = read_csv((folder / "sample.csv").read_text())
    assert "member_id" in sample[0]
    proc, result = run_adapter("batch", str(folder), "--dataset", str(folder / "sample.csv"), "--results",
                               str(tmp_path / "out") + os.sep, "--job", "r")
    assert proc.returncode == 0, proc.stderr
    scores = read_csv((tmp_path / "out" / "scores.csv").read_text())
    assert scores[0] == ["member_id", "renewal_probability"]
    column = sample[0].index("member_id")
    assert [r[0] for r in scores[1:]] == [r[column] for r in sample[1:] if r]
    assert all(0 < float(r[1]) < 1 for r in scores[1:])


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_plain_file_is_split_as_the_csv_module_splits_it(tmp_path, monkeypatch, newline):
    """The block-at-a-time split of a plain file (no quotes) writes what the csv module's does."""
    monkeypatch.setattr(batch, "CHUNK", 4096)  # many blocks, rows cut across them
    manifest = load_manifest(passthrough_fixture(tmp_path))
    header = ["x", "region", "customer_id"]   # batch_no (optional) absent: empty cells
    source = tmp_path / "in.csv"
    source.write_bytes(newline.join(["x,region,customer_id"] + [f"{i},{'west' if i % 3 else 'east'},id-{i}"
                                                               for i in range(3000)]).encode())  # no final newline
    plain = batch.split_dataset(manifest, header, source, tmp_path / "f1.csv", tmp_path / "p1.csv")
    monkeypatch.setattr(batch, "_split_plain", lambda *a: None)
    slow = batch.split_dataset(manifest, header, source, tmp_path / "f2.csv", tmp_path / "p2.csv")
    assert plain == slow and plain[1] == 3000
    assert (tmp_path / "f1.csv").read_bytes() == (tmp_path / "f2.csv").read_bytes()
    assert (tmp_path / "p1.csv").read_bytes() == (tmp_path / "p2.csv").read_bytes()
    assert (tmp_path / "p1.csv").read_text().splitlines()[:2] == ["customer_id,batch_no", "id-0,"]
    assert (tmp_path / "f1.csv").read_text().splitlines()[:2] == ["x,region", "0,east"]


def test_a_bad_row_in_a_plain_file_is_named_and_nothing_more_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "CHUNK", 1024)
    manifest = load_manifest(passthrough_fixture(tmp_path))
    lines = [f"{i},west,id-{i},{i}" for i in range(2000)]
    lines[1499] = "1,west,id,x"          # row 1500: batch_no not an integer
    lines[1799] = "1,west"               # row 1800: two cells
    source = tmp_path / "in.csv"
    source.write_text("x,region,customer_id,batch_no\n" + "\n".join(lines) + "\n")
    with pytest.raises(batch.RowsFailure) as info:
        batch.split_dataset(manifest, ["x", "region", "customer_id", "batch_no"], source, tmp_path / "f.csv",
                            tmp_path / "p.csv")
    assert [(p["row"], p["field"]) for p in info.value.problems] == [(1500, "batch_no"), (1800, None)]
    assert len((tmp_path / "f.csv").read_text().splitlines()) < 1500
