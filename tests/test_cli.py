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
