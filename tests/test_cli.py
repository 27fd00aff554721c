"""`modelplane` subcommands against a real control service (the real server in a thread, in-memory runtime)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control.cli import main, table
from control.emulator import free_port
from control_fake_runtime import FakeRuntime
from control_helpers import FIXTURES, copy_fixture, running, settings_for, token_file

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cli-token"


@pytest.fixture
def plane(tmp_path, monkeypatch):
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path, token=TOKEN)
    for name in ("echo-rt", "sum-batch", "broken"):
        copy_fixture(name, settings.models_dir)
    runtime = FakeRuntime()
    with running(settings, runtime=runtime) as server:
        yield server, runtime


def cli(server, *args, token=TOKEN):
    flags = ["--url", server.url] + (["--token-file", token_file(token)] if token else [])
    return main([*args, *flags])


def test_table_aligns_columns():
    text = table([["a", 1, None], ["long-name", 22, "x"]], ["NAME", "N", "NOTE"])
    lines = text.splitlines()
    assert lines[0] == "NAME       N   NOTE"
    assert lines[1] == "a          1   -"
    assert lines[2] == "long-name  22  x"


def test_ls_shows_every_model_and_the_failed_one(plane, capsys):
    server, _ = plane
    assert cli(server, "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "LANGUAGE", "VERSION", "STATUS", "REPLICAS", "ENDPOINT", "/", "ERROR"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["echo-rt"][:6] == ["echo-rt", "realtime", "python", "1.0.0", "idle", "0"]
    assert rows["broken"][4] == "failed" and "featurez" not in rows["broken"][0]
    # columns line up: every row starts its STATUS column at the same offset
    offset = lines[0].index("STATUS")
    assert all(line[offset:].split()[0] in ("idle", "failed") for line in lines[1:])


def test_global_flags_work_before_and_after_the_command(plane, capsys):
    server, _ = plane
    assert main(["--url", server.url, "--token-file", token_file(TOKEN), "ls"]) == 0
    assert "echo-rt" in capsys.readouterr().out


def test_status_prints_fields_features_and_versions(plane, capsys):
    server, _ = plane
    assert cli(server, "status", "echo-rt") == 0
    out = capsys.readouterr().out
    assert "status    idle" in out and "version   1.0.0" in out
    assert "features" in out and "x     number" in out
    assert "1.0.0" in out.split("versions")[1] and "live" in out.split("versions")[1]


def test_status_prints_the_owner_labels_and_drift_the_readme_promises(tmp_path, monkeypatch, capsys):
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path, token=TOKEN)
    folder = copy_fixture("echo-rt", settings.models_dir)
    manifest = folder / "model.yaml"
    manifest.write_text(manifest.read_text() + "owner: risk-team\nlabels: {customer: acme, tier: gold}\n")
    with running(settings) as server:   # the local runtime: the manifest's owner and labels as deployed
        assert cli(server, "status", "echo-rt") == 0
    out = capsys.readouterr().out
    assert "owner     risk-team" in out
    assert "labels    customer=acme, tier=gold" in out
    assert "drift     not measured yet" in out
    assert "STATE" in out.split("versions")[1]


def test_deploy_rollback_remove(plane, capsys, tmp_path):
    server, runtime = plane
    import shutil

    folder = Path(shutil.copytree(FIXTURES / "echo-rt", tmp_path / "echo"))
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    (folder / "model.yaml").write_text((folder / "model.yaml").read_text().replace("1.0.0", "2.0.0"))
    assert cli(server, "deploy", str(folder)) == 0
    assert "deployed echo-rt 2.0.0 (live)" in capsys.readouterr().out
    assert runtime.live["echo-rt"] == "2.0.0"
    assert cli(server, "rollback", "echo-rt", "1.0.0") == 0
    assert "echo-rt 1.0.0 is live" in capsys.readouterr().out
    assert runtime.live["echo-rt"] == "1.0.0"
    assert cli(server, "remove", "echo-rt", "--yes") == 0   # no terminal here: --yes, or it asks
    assert "echo-rt" not in runtime.manifests


def test_deploy_invalid_manifest_lists_problems(plane, capsys):
    server, _ = plane
    assert cli(server, "deploy", str(FIXTURES / "broken")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid manifest (422)")
    assert "model.yaml:6: featurez: unknown key" in err
    assert "Traceback" not in err


def test_without_token_fails_in_one_line(plane, capsys):
    server, _ = plane
    for args in (("rollback", "echo-rt", "1.0.0"), ("ls",)):
        assert cli(server, *args, token=None) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "(401)" in err


def test_the_cli_reads_the_token_a_local_service_stored(tmp_path, monkeypatch, capsys):
    """No MODELPLANE_TOKEN anywhere: the service makes one in its state dir (0600), the CLI on
    the same machine reads it from there, and never sends it to a service elsewhere."""
    from control.auth import token_path
    from control.cli import client_for, build_parser

    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path, token=None)
    copy_fixture("echo-rt", settings.models_dir)
    with running(settings, runtime=FakeRuntime()) as server:
        path = token_path(settings.state_dir)
        assert path.stat().st_mode & 0o777 == 0o600
        assert main(["ls", "--url", server.url, "--state-dir", str(settings.state_dir)]) == 0
        assert "echo-rt" in capsys.readouterr().out
        assert main(["ls", "--url", server.url, "--state-dir", str(tmp_path / "elsewhere")]) == 1
        assert "(401)" in capsys.readouterr().err
    args = build_parser().parse_args(["ls", "--url", "http://models.example.com:8080",
                                      "--state-dir", str(settings.state_dir)])
    assert "Authorization" not in client_for(args).session.headers


def test_predict_csv_json_and_stdin(plane, capsys, tmp_path, monkeypatch):
    server, runtime = plane
    data = tmp_path / "rows.csv"
    data.write_text("x\n1\n")
    assert cli(server, "predict", "echo-rt", "--csv", str(data)) == 0
    assert capsys.readouterr().out.strip() == "0.5"
    assert runtime.forwarded[-1]["headers"]["content-type"] == "text/csv"

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"x": 1}, {"x": 2}]))
    assert cli(server, "predict", "echo-rt", "--json", str(rows)) == 0
    assert json.loads(runtime.forwarded[-1]["body"]) == {"rows": [{"x": 1}, {"x": 2}]}

    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"x": 3}')))
    assert cli(server, "predict", "echo-rt", "-") == 0
    assert json.loads(runtime.forwarded[-1]["body"]) == {"rows": [{"x": 3}]}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"x": "bad"}]}))
    capsys.readouterr()
    assert cli(server, "predict", "echo-rt", "--json", str(bad)) == 1
    err = capsys.readouterr().err
    assert "(422)" in err and "row 0: x: bad" in err
    assert cli(server, "predict", "echo-rt", "--csv", str(tmp_path / "missing.csv")) == 1
    assert "cannot read the input" in capsys.readouterr().err


def test_run_gs_uri_and_jobs_table(plane, capsys):
    server, runtime = plane
    assert cli(server, "run", "sum-batch", "gs://test-bucket/some.csv") == 0
    out = capsys.readouterr().out
    job_id = runtime.jobs()[0].id
    assert f"job {job_id} queued" in out
    assert cli(server, "jobs") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "MODEL", "VERSION", "STATUS", "ROWS", "TRIGGER", "CREATED", "DATASET"]
    assert lines[1].split()[:4] == [job_id, "sum-batch", "1.0.0", "queued"]
    assert cli(server, "jobs", "--model", "echo-rt") == 0
    assert capsys.readouterr().out.strip() == "no jobs"


def test_run_local_file_goes_through_the_bucket_event(gcs, gcs_client, tmp_path, monkeypatch, capsys):
    """`run NAME FILE --wait`: upload -> watcher -> /events -> job; the CLI finds the job and waits."""
    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path, token=TOKEN)
    copy_fixture("sum-batch", settings.models_dir)
    runtime = FakeRuntime()
    data = tmp_path / "scores-in.csv"
    data.write_text("a,b\n1,2\n")

    import threading

    def finish_jobs(stop):
        while not stop.wait(0.1):
            for job in runtime.jobs():
                if job.status == "queued":
                    runtime.finish(job.id, results_uri=f"gs://test-bucket/results/sum-batch/{job.id}/", rows=1)

    with running(settings, runtime=runtime, watch=True) as server:
        stop = threading.Event()
        worker = threading.Thread(target=finish_jobs, args=(stop,), daemon=True)
        worker.start()
        try:
            code = main(["run", "sum-batch", str(data), "--wait", "--timeout", "20", "--url", server.url,
                         "--token-file", token_file(TOKEN)])
        finally:
            stop.set()
            worker.join()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "uploaded gs://test-bucket/incoming/sum-batch/scores-in.csv" in out
    assert "status       succeeded" in out and "rows         1" in out
    # one job for the upload (the bucket may hold other tests' datasets, which get their own)
    jobs = [j for j in runtime.jobs() if j.dataset == "gs://test-bucket/incoming/sum-batch/scores-in.csv"]
    assert len(jobs) == 1 and jobs[0].trigger == "event"
    # --wait ends saying where the scores are and how to get them
    assert f"scores: gs://test-bucket/results/sum-batch/{jobs[0].id}/" in out
    assert f"get them: modelplane job {jobs[0].id} --results > scores.csv" in out
    assert f"/api/jobs/{jobs[0].id}/results" in out


def test_unreachable_service_is_one_line_and_exit_1(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["ls", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err == f"error: cannot reach the control service at {url} — is `modelplane up` running?\n"


def test_console_script_errors_without_traceback(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, MODELPLANE_URL=url)
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "modelplane"), "status", "x"], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: cannot reach the control service at " + url)
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "modelplane"), "frobnicate"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_render_is_offline(capsys, tmp_path, monkeypatch):
    pytest.importorskip("control.runtime.knative_objects")
    monkeypatch.setenv("MODELPLANE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert main(["render", str(FIXTURES / "echo-rt")]) == 0
    out = capsys.readouterr().out
    assert "serving.knative.dev/v1" in out and "echo-rt" in out
    models = tmp_path / "models"
    copy_fixture("sum-batch", models)
    assert main(["render", "sum-batch", "--models-dir", str(models)]) == 0
    assert "sum-batch" in capsys.readouterr().out
    assert main(["render", "nope", "--models-dir", str(models)]) == 1
    assert "neither a model folder" in capsys.readouterr().err


def test_validate_delegates_to_control_validate(capsys):
    pytest.importorskip("control.validate")
    code = main(["validate", str(FIXTURES / "broken")])
    assert code != 0
    assert "featurez" in capsys.readouterr().out


def test_bench_without_the_bench_extra_says_what_to_install(tmp_path):
    """`modelplane bench` with locust missing: one line naming the extra, no traceback, exit 2."""
    code = ("import sys; sys.modules['locust'] = None\n"
            "from control.cli import main\n"
            "sys.exit(main(['bench', '--quick', '--out', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: the benchmark needs the [bench] extra (locust not installed): "
                     "pip install 'modelplane[bench]'"], done.stderr
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_cancel_a_running_job_over_http_with_the_local_runtime(gcs, gcs_client, tmp_path, monkeypatch, capsys):
    """`modelplane cancel JOB` against a real service running the local runtime: the job's processes
    stop, it reads failed ('cancelled by' the token's name); again: the same answer; the owner
    of another team's token may not; an unknown job is 404; the audit trail has it."""
    import shutil

    import requests

    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path, token=TOKEN, job_concurrency=1)
    shutil.copytree(ROOT / "tests" / "fixtures" / "local" / "scorer", settings.models_dir / "scorer")
    gcs_client.bucket("test-bucket").blob("incoming/scorer/cli-slow.csv").upload_from_string(
        "x,sleep\n1,120\n", content_type="text/csv")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running(settings) as server:
        def api(method, path, headers=auth, **kw):
            return requests.request(method, server.url + path, headers=headers, timeout=60, **kw)

        r = api("POST", "/api/models/scorer/jobs", json={"dataset": "gs://test-bucket/incoming/scorer/cli-slow.csv"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 30
        while api("GET", f"/api/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.05)
        r = api("POST", "/api/tokens", json={"name": "other-team", "role": "runner", "owner": "team-b"})
        other = {"Authorization": f"Bearer {r.json()['token']}"}
        r = api("DELETE", f"/api/jobs/{job_id}", headers=other)
        assert r.status_code == 403 and "team-b" in r.json()["error"]
        assert api("GET", f"/api/jobs/{job_id}").json()["status"] == "running"

        assert cli(server, "cancel", job_id) == 0
        assert capsys.readouterr().out.strip() == f"job {job_id} (scorer) is failed: cancelled by admin"
        job = api("GET", f"/api/jobs/{job_id}").json()
        assert (job["status"], job["error"], job["results_uri"]) == ("failed", "cancelled by admin", None)
        again = api("DELETE", f"/api/jobs/{job_id}")
        assert again.status_code == 200 and again.json() == job
        assert api("GET", "/api/jobs?status=failed").json()[0]["id"] == job_id
        assert api("DELETE", "/api/jobs/no-such-job").status_code == 404
        assert cli(server, "cancel", "no-such-job") == 1
        assert "(404)" in capsys.readouterr().err
        entries = api("GET", "/api/audit?action=job.cancel").json()
        assert [(e["who"], e["outcome"], e["model"]) for e in entries if (e.get("detail") or {}).get("job") == job_id] \
            == [("admin", "ok", "scorer"), ("admin", "ok", "scorer"), ("other-team", "denied", "scorer")]
        assert [e["status"] for e in entries][:2] == [404, 404]


def test_every_commands_help_renders(capsys):
    """argparse formats each help text with %: a bare % in one breaks `modelplane --help`."""
    from control.cli import build_parser

    parser = build_parser()
    parser.format_help()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            assert sub.format_help(), name


# -- predict: a file over the model's max_rows, split into parallel requests -------------------

SPLIT_MAX_ROWS = 50


@pytest.fixture
def split_plane(tmp_path, monkeypatch):
    """A real control service with the local runtime, serving `echo` (score = x) with
    limits.max_rows 50 and up to 3 replicas."""
    import shutil

    import yaml

    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path, token=TOKEN)
    folder = Path(shutil.copytree(ROOT / "tests" / "fixtures" / "local" / "echo", settings.models_dir / "echo"))
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest["limits"] = {"max_rows": SPLIT_MAX_ROWS}
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with running(settings) as server:
        yield server


def _by_hand(server, body_rows: list[str], header: str = "x", *, accept: str = "application/json"):
    """The answers of the file's rows sent max_rows at a time, one request after the other."""
    import requests

    answers = []
    for start in range(0, len(body_rows), SPLIT_MAX_ROWS):
        body = header + "\n" + "".join(r + "\n" for r in body_rows[start:start + SPLIT_MAX_ROWS])
        r = requests.post(f"{server.url}/models/echo/predict", data=body.encode(), timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/csv", "Accept": accept})
        assert r.status_code == 200, r.text
        answers.append(r)
    return answers


def test_predict_splits_a_csv_over_max_rows_and_joins_the_scores_in_order(split_plane, tmp_path, capsys):
    """3.2 × max_rows: one request would be refused (413); the CLI sends four, in parallel, and
    prints every score in input order, as the chunks scored one by one answer."""
    server = split_plane
    values = [f"{(i * 7919) % 1000 / 8}" for i in range(3 * SPLIT_MAX_ROWS + 10)]
    data = tmp_path / "big.csv"
    data.write_text("x\n" + "".join(v + "\n" for v in values))
    assert cli(server, "predict", "echo", "--csv", str(data)) == 0
    captured = capsys.readouterr()
    expected = [s for r in _by_hand(server, values) for s in r.json()["scores"]]
    assert captured.out.splitlines() == [str(s) for s in expected]
    assert [float(s) for s in captured.out.splitlines()] == [float(v) for v in values]
    # not a terminal: no bar, one plain line at the end
    assert captured.err == f"scored {len(values)} rows in 4 requests (3 at once) in " + \
        captured.err.split(" in ")[-1]
    assert "\r" not in captured.err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_predict_out_file_is_the_single_answer_joined(split_plane, tmp_path, capsys):
    """--out F.csv holds exactly what one request's CSV answer would (its header once);
    --out F.json the JSON answer with every score; --progress draws the bar."""
    server = split_plane
    values = [str(i) for i in range(1, 2 * SPLIT_MAX_ROWS + 2)]
    data = tmp_path / "rows.csv"
    data.write_text("x\r\n" + "".join(v + "\r\n" for v in values) + "\r\n")  # CRLF and a blank last line
    out_csv = tmp_path / "scores.csv"
    assert cli(server, "predict", "echo", "--csv", str(data), "--out", str(out_csv), "--progress") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {len(values)} scores to {out_csv}"
    assert "\r[" in captured.err and f"{len(values)}/{len(values)} rows 100%" in captured.err
    answers = _by_hand(server, values, accept="text/csv")
    header = answers[0].text.splitlines()[0]
    assert out_csv.read_text() == header + "\n" + "".join(a.text.split("\n", 1)[1] for a in answers)
    assert out_csv.read_text().splitlines()[1:] == [f"{float(v)!r}" for v in values]
    assert out_csv.stat().st_mode & 0o777 == 0o666 & ~_umask()

    out_json = tmp_path / "scores.json"
    assert cli(server, "predict", "echo", "--csv", str(data), "--out", str(out_json)) == 0
    joined = json.loads(out_json.read_text())
    assert joined == {"model": "echo", "version": "1.0.0", "scores": [float(v) for v in values]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "rows.csv", "scores.csv", "scores.json", "state"]


def test_predict_splits_json_rows(split_plane, tmp_path, capsys):
    """JSON input (a list, or {"rows": [...]}) is split the same way; --raw prints the whole answer."""
    server = split_plane
    rows = [{"x": i / 4, **({"delay": 0} if i % 3 else {})} for i in range(SPLIT_MAX_ROWS * 3 + 1)]
    for doc in (rows, {"note": "ignored", "rows": rows}):
        data = tmp_path / "rows.json"
        data.write_text(json.dumps(doc, indent=1))
        assert cli(server, "predict", "echo", "--json", str(data), "--raw") == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer == {"model": "echo", "version": "1.0.0", "scores": [r["x"] for r in rows]}


def test_predict_failure_names_the_row_in_the_whole_file_and_writes_nothing(split_plane, tmp_path, capsys):
    """A bad value in the third request: the error names the row as numbered in the whole file;
    --out is neither created nor left half-written, and no temporary file stays behind."""
    server = split_plane
    values = [str(i) for i in range(4 * SPLIT_MAX_ROWS)]
    bad_at = 2 * SPLIT_MAX_ROWS + 17           # 0-based index in the file: in the third request
    values[bad_at] = "lots"
    data = tmp_path / "rows.csv"
    data.write_text("x\n" + "".join(v + "\n" for v in values))
    # what the adapter names for that row when it is sent alone in its chunk
    import requests

    chunk = "x\n" + "".join(v + "\n" for v in values[2 * SPLIT_MAX_ROWS:3 * SPLIT_MAX_ROWS])
    r = requests.post(f"{server.url}/models/echo/predict", data=chunk.encode(), timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/csv"})
    assert r.status_code == 422
    row_in_chunk = r.json()["problems"][0]["row"]
    out_file = tmp_path / "scores.csv"
    out_file.write_text("earlier results\n")
    assert cli(server, "predict", "echo", "--csv", str(data), "--out", str(out_file)) == 1
    err = capsys.readouterr().err
    assert f"error: rows {2 * SPLIT_MAX_ROWS + 1}–{3 * SPLIT_MAX_ROWS} of the file (request 3): " in err
    assert "(422)" in err
    assert f"  row {row_in_chunk + 2 * SPLIT_MAX_ROWS}: x: expected a number; got 'lots'" in err
    assert out_file.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "rows.csv", "scores.csv", "state"]
    new_file = tmp_path / "new.csv"
    assert cli(server, "predict", "echo", "--csv", str(data), "--out", str(new_file)) == 1
    assert not new_file.exists()


def test_predict_raw_dash_reads_the_body_from_stdin(split_plane, tmp_path, capsys, monkeypatch):
    """`predict NAME --raw -` (and `--version V -`) read the rows from stdin, CSV or JSON."""
    import io

    server = split_plane
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'\xef\xbb\xbf {"rows": [{"x": 2}, {"x": 3}]}')))
    assert cli(server, "predict", "echo", "--raw", "-") == 0
    assert json.loads(capsys.readouterr().out) == {"model": "echo", "version": "1.0.0", "scores": [2.0, 3.0]}
    big = "x\n" + "".join(f"{i}\n" for i in range(SPLIT_MAX_ROWS + 5))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(big.encode())))
    assert cli(server, "predict", "echo", "--version", "1.0.0", "-") == 0
    assert capsys.readouterr().out.splitlines() == [str(float(i)) for i in range(SPLIT_MAX_ROWS + 5)]
    raw_file = tmp_path / "rows.txt"
    raw_file.write_text("x\n4\n")
    assert cli(server, "predict", "echo", "--raw", str(raw_file)) == 0
    assert json.loads(capsys.readouterr().out)["scores"] == [4.0]
    assert cli(server, "predict", "echo", "--raw", str(raw_file), "--csv", str(raw_file)) == 1
    assert "give the rows once" in capsys.readouterr().err


def test_csv_chunks_keep_quoted_newlines_and_bound_each_body():
    """Records split on their quotes, not on lines; blank lines skipped as the adapter skips
    them; no body over max_body or max_rows; every chunk carries the header; a row larger than
    max_body alone is refused naming it."""
    import csv
    import io

    from control.cli import CLIError, _csv_chunks, _Input

    rows = [[f"id-{i}", f'line one\nline "two" of {i}' if i % 3 == 0 else str(i)] for i in range(40)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["id", "note"], *rows[:20]])
    text = buf.getvalue() + "\n\n"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows[20:])
    data = (text + buf.getvalue()).encode()
    for max_rows, max_body in ((7, 10_000), (100, 200), (1, 64)):
        chunks = list(_csv_chunks(_Input(io.BytesIO(data)), max_rows, max_body))
        got = []
        for i, c in enumerate(chunks):
            assert c.index == i and c.offset == len(got)
            assert len(c.body) <= max_body and 1 <= c.rows <= max_rows
            parsed = list(csv.reader(io.StringIO(c.body.decode())))
            assert parsed[0] == ["id", "note"] and len(parsed) - 1 == c.rows
            got += parsed[1:]
        assert got == rows
    with pytest.raises(CLIError, match=r"row 4 alone is larger than the model's max_body \(40 bytes\)"):
        list(_csv_chunks(_Input(io.BytesIO(b"id,note\n1,a\n2,b\n3,c\n4," + b"x" * 40 + b"\n")), 10, 40))
    # only a header: one chunk of no rows (the adapter answers it as one request would)
    [only] = _csv_chunks(_Input(io.BytesIO(b"x\n")), 10, 100)
    assert (only.rows, only.body) == (0, b"x\n")


@pytest.mark.parametrize("doc", [
    [{"x": 1.5, "s": "a ] } , \" \\u00e9 é"}, {"x": 12345678901234567890}, {"x": -0.5e-3, "n": None}, {}],
    {"meta": {"rows": [9]}, "rows": [{"x": 1}, {"x": 2}], "after": [1, 2]},
    {"x": 123456789, "s": "one row"},
    [],
])
def test_json_rows_are_read_a_block_at_a_time(doc, monkeypatch):
    """The rows of any accepted JSON shape, read in blocks cut anywhere (7 bytes here),
    come out as the JSON parser reads the whole document."""
    import io

    from control import cli

    monkeypatch.setattr(cli, "JSON_READ_BLOCK", 7)
    data = json.dumps(doc, ensure_ascii=False, indent=2).encode()
    rows = [json.loads(t) for t in cli._JSONRows(cli._Input(io.BytesIO(data)), 10_000).rows()]
    expected = doc if isinstance(doc, list) else doc["rows"] if "rows" in doc else [doc]
    assert rows == expected
    chunks = list(cli._json_chunks(cli._Input(io.BytesIO(data)), 2, 10_000))
    assert [r for c in chunks for r in json.loads(c.body)["rows"]] == expected


@pytest.mark.parametrize("data, message", [
    (b'[{"x": 1}, {"x": 2]', "not JSON: Expecting ',' delimiter in row 2"),
    (b'[{"x": 1} {"x": 2}]', "expected ',' or ']' after row 1; found '{'"),
    (b'[{"x": 1}] [', "more after the end of the document"),
    (b'"rows"', "expected {\"rows\": [...]}"),
])
def test_json_rows_errors_say_where(data, message, monkeypatch):
    import io

    from control import cli

    monkeypatch.setattr(cli, "JSON_READ_BLOCK", 5)
    with pytest.raises(cli.CLIError) as e:
        list(cli._JSONRows(cli._Input(io.BytesIO(data)), 10_000).rows())
    assert message in e.value.message


def test_join_keeps_whatever_columns_the_answers_carry():
    """Passthrough columns (COMMON decision 1) are joined column by column beside the scores."""
    from control.cli import _join_json

    a = {"model": "m", "version": "1", "scores": [0.1, 0.2], "passthrough": {"id": ["a", "b"], "n": [1, 2]}}
    b = {"model": "m", "version": "1", "scores": [0.3], "passthrough": {"id": ["c"], "n": [3]}}
    joined = _join_json(_join_json(None, a), b)
    assert joined == {"model": "m", "version": "1", "scores": [0.1, 0.2, 0.3],
                      "passthrough": {"id": ["a", "b", "c"], "n": [1, 2, 3]}}
    assert a["scores"] == [0.1, 0.2]  # the first answer is not changed under the caller


def test_predict_tries_a_chunk_again_when_the_front_door_answers_503(tmp_path, monkeypatch, capsys, caplog):
    """The front door holds at most MAX_BODIES_IN_FLIGHT bytes of bodies and answers 503 with
    Retry-After past them: three slow requests of ~700 bytes against a budget of 1,024 are
    refused in part, tried again, and every score still comes back in order."""
    import logging
    import shutil

    import yaml

    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path, token=TOKEN, max_bodies_in_flight=1024)
    folder = Path(shutil.copytree(ROOT / "tests" / "fixtures" / "local" / "echo", settings.models_dir / "echo"))
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest["limits"] = {"max_rows": SPLIT_MAX_ROWS}
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    values = [f"{100000 + i}.125" for i in range(3 * SPLIT_MAX_ROWS)]
    data = tmp_path / "slow.csv"
    data.write_text("x,delay\n" + "".join(f"{v},{0.4 if i % SPLIT_MAX_ROWS == 0 else ''}\n"
                                          for i, v in enumerate(values)))
    caplog.set_level(logging.DEBUG, logger="modelplane")
    with running(settings) as server:
        assert cli(server, "predict", "echo", "--csv", str(data)) == 0
    assert capsys.readouterr().out.splitlines() == [str(float(v)) for v in values]
    assert any("answered 503; trying again" in r.getMessage() for r in caplog.records)


def test_predict_sends_a_split_file_to_one_version_during_a_rollout(split_plane, tmp_path, capsys):
    """With 50 % of requests going to 2.0.0 (score = 2x), every request of a file goes to the
    version the first one reached: never scores of two versions in one result."""
    import shutil

    import yaml

    server = split_plane
    folder = Path(shutil.copytree(ROOT / "tests" / "fixtures" / "local" / "echo", tmp_path / "echo2"))
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest.update(version="2.0.0", limits={"max_rows": SPLIT_MAX_ROWS})
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    (folder / "params.json").write_text(json.dumps({"factor": 2}))
    assert cli(server, "deploy", str(folder), "--no-live") == 0
    assert cli(server, "rollout", "echo", "2.0.0", "--percent", "50") == 0
    capsys.readouterr()
    values = list(range(1, 4 * SPLIT_MAX_ROWS + 1))
    data = tmp_path / "rows.csv"
    data.write_text("x\n" + "".join(f"{v}\n" for v in values))
    for _ in range(6):   # split at random, four requests would reach both versions almost every time
        out_file = tmp_path / "answer.json"
        assert cli(server, "predict", "echo", "--csv", str(data), "--out", str(out_file)) == 0
        answer = json.loads(out_file.read_text())
        factor = {"1.0.0": 1, "2.0.0": 2}[answer["version"]]
        assert answer["scores"] == [float(v * factor) for v in values]
    capsys.readouterr()


def test_predict_without_a_token_on_an_open_plane_splits_by_the_manifests_defaults(tmp_path, monkeypatch, capsys):
    """MODELPLANE_OPEN_PREDICT: scoring needs no token, reading the model does (401): the CLI
    falls back on the manifest's defaults (max_rows 10,000, one request at a time) and scores."""
    import shutil

    for var in ("MODELPLANE_URL", "MODELPLANE_TOKEN", "MODELPLANE_PORT"):
        monkeypatch.delenv(var, raising=False)
    settings = settings_for(tmp_path, token=TOKEN, open_predict=True)
    shutil.copytree(ROOT / "tests" / "fixtures" / "local" / "echo", settings.models_dir / "echo")
    data = tmp_path / "rows.csv"
    data.write_text("x\n" + "".join(f"{i}\n" for i in range(10_005)))
    with running(settings) as server:
        code = main(["predict", "echo", "--csv", str(data), "--url", server.url,
                     "--state-dir", str(tmp_path / "no-token-here")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines() == [str(float(i)) for i in range(10_005)]
    assert captured.err.startswith("scored 10,005 rows in 2 requests (1 at once)")


def test_a_problem_of_a_whole_column_is_printed_as_the_column_not_as_row_none():
    from control.cli import problem_line

    assert problem_line({"row": None, "field": "region", "error": "required column is missing"}) == \
        "  column region: required column is missing"
    assert problem_line({"row": 3, "field": "x", "error": "bad"}) == "  row 3: x: bad"
    assert problem_line({"row": 3, "field": "x", "error": "bad"}, offset=10_000) == "  row 10,003: x: bad"
    assert "None" not in problem_line({"row": None, "field": None, "error": "expected rows"})
