"""Issue 3's "done when", end to end on the embedded plane: the real LocalRuntime, the real
adapter and example models, the real GCS emulator, real events, the real server (aiohttp front door + Flask API).

The Python example models are used (R ones are covered by their own marked tests elsewhere).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from control.emulator import free_port
from control.events import finalized_event, to_binary_http
from control_helpers import api, running, settings_for, wait_until

pytest.importorskip("control.runtime.local")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
REALTIME = "donor-propensity"
BATCH = "churn-risk"


def _need(*names: str) -> None:
    for name in names:
        if not (MODELS / name / "model.yaml").is_file():
            pytest.skip(f"example model {name} not present")


def sample_rows(name: str) -> list[dict]:
    """The sample rows as JSON values typed by the manifest (empty optional cells dropped)."""
    import yaml

    features = {f["name"]: f for f in yaml.safe_load((MODELS / name / "model.yaml").read_text())["features"]}
    rows = []
    with open(MODELS / name / "sample.csv", newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, text in raw.items():
                if text == "":
                    continue
                kind = features[key]["type"] if key in features else "string"  # a passthrough id
                row[key] = (float(text) if kind == "number" else int(text) if kind == "integer"
                            else text.lower() == "true" if kind == "boolean" else text)
            rows.append(row)
    return rows


@pytest.fixture
def plane_settings(tmp_path, gcs):
    _need(REALTIME, BATCH)
    settings = settings_for(tmp_path, threads=64)
    for name in (REALTIME, BATCH):
        shutil.copytree(MODELS / name, settings.models_dir / name)
    # idle replicas go back to zero quickly, so the burst below starts from zero too
    manifest = settings.models_dir / REALTIME / "model.yaml"
    manifest.write_text(re.sub(r"idle_timeout: *\w+", "idle_timeout: 1s", manifest.read_text()))
    return settings


def test_first_request_at_zero_then_a_burst_of_50_all_succeed(plane_settings):
    rows = sample_rows(REALTIME)
    with running(plane_settings) as server:
        model = api.get(f"{server.url}/api/models/{REALTIME}").json()
        assert model["status"] == "idle" and model["replicas"] == 0

        r = api.post(f"{server.url}/models/{REALTIME}/predict", json={"rows": rows[:3]}, timeout=60)
        assert r.status_code == 200, r.text
        scores = r.json()["scores"]
        assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
        assert r.json()["model"] == REALTIME

        # back to zero before the burst: held requests must all be answered
        wait_until(lambda: api.get(f"{server.url}/api/models/{REALTIME}").json()["replicas"] == 0, 30,
                   what="the model back at zero replicas")

        def one(i: int):
            return api.post(f"{server.url}/models/{REALTIME}/predict", json={"rows": [rows[i % len(rows)]]},
                                 timeout=120)

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, range(50)))
        assert [a.status_code for a in answers] == [200] * 50, [a.text for a in answers if a.status_code != 200][:3]
        assert all(len(a.json()["scores"]) == 1 for a in answers)

        # the open inference protocol is routed too
        v2 = api.get(f"{server.url}/models/{REALTIME}/v2/models/{REALTIME}", timeout=30)
        assert v2.status_code == 200 and v2.json()["name"] == REALTIME


def _batch_csv() -> bytes:
    return (MODELS / BATCH / "sample.csv").read_bytes()


def test_upload_runs_a_job_with_results_in_the_bucket_and_a_resent_event_is_one_job(plane_settings, gcs_client):
    name = f"incoming/{BATCH}/{uuid.uuid4().hex[:8]}.csv"
    data = _batch_csv()
    expected_rows = len(data.decode().strip().splitlines()) - 1
    with running(plane_settings, watch=True) as server:
        blob = gcs_client.bucket("test-bucket").blob(name)
        blob.upload_from_string(data, content_type="text/csv")
        generation = blob.generation
        dataset = f"gs://test-bucket/{name}"

        def finished():
            jobs = api.get(f"{server.url}/api/jobs", params={"dataset": dataset}).json()
            return jobs if jobs and jobs[0]["status"] in ("succeeded", "failed") else None

        jobs = wait_until(finished, 120, interval=0.2, what="the job the upload started")
        job = jobs[0]
        assert job["status"] == "succeeded", job
        assert job["trigger"] == "event" and job["rows"] == expected_rows

        prefix = f"results/{BATCH}/{job['id']}/"
        names = {b.name for b in gcs_client.list_blobs("test-bucket", prefix=prefix)}
        assert {prefix + "scores.csv", prefix + "result.json"} <= names
        scores = gcs_client.bucket("test-bucket").blob(prefix + "scores.csv").download_as_bytes().decode()
        assert len(scores.strip().splitlines()) == expected_rows + 1
        result = json.loads(gcs_client.bucket("test-bucket").blob(prefix + "result.json").download_as_bytes())
        assert result["rows"] == expected_rows and result["input"]["uri"] == dataset

        downloaded = api.get(f"{server.url}/api/jobs/{job['id']}/results")
        assert downloaded.status_code == 200 and downloaded.text == scores

        # the same event, delivered twice more (binary and structured): still one job
        resource = next(b for b in gcs_client.list_blobs("test-bucket", prefix=name))._properties
        assert str(resource["generation"]) == str(generation)
        headers, body = to_binary_http(finalized_event(resource))
        again = api.post(f"{server.url}/events", data=body, headers=headers)
        assert again.status_code == 200 and again.json()["action"] == "duplicate"
        event = finalized_event(resource)
        structured = {**{k: v for k, v in event.get_attributes().items() if k != "time"}, "data": event.get_data()}
        again = api.post(f"{server.url}/events", data=json.dumps(structured),
                              headers={"Content-Type": "application/cloudevents+json"})
        assert again.json()["action"] == "duplicate" and again.json()["job"] == job["id"]
        assert len(api.get(f"{server.url}/api/jobs", params={"dataset": dataset}).json()) == 1


def test_a_dataset_with_bad_rows_fails_its_job_naming_them_through_the_api(plane_settings, gcs_client):
    lines = _batch_csv().decode().strip().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "lots", 1)
    with running(plane_settings) as server:
        r = api.post(f"{server.url}/api/models/{BATCH}/datasets", params={"filename": "bad.csv"},
                     data=("\n".join(lines) + "\n").encode(), headers={"Content-Type": "text/csv"})
        assert r.status_code == 201, r.text
        job = api.post(f"{server.url}/api/models/{BATCH}/jobs", json={"dataset": r.json()["uri"]}).json()

        def finished():
            j = api.get(f"{server.url}/api/jobs/{job['id']}").json()
            return j if j["status"] in ("succeeded", "failed") else None

        job = wait_until(finished, 120, interval=0.2, what="the job")
        assert job["status"] == "failed"
        assert job["invalid_values"] == 1
        assert job["problems"] == [{"row": 3, "field": "monthly_spend", "error": "expected a number; got 'lots'"}]
        assert "row 3, monthly_spend" in job["error"]
        prefix = f"results/{BATCH}/{job['id']}/"
        assert {b.name for b in gcs_client.list_blobs("test-bucket", prefix=prefix)} == {prefix + "result.json"}


def test_restart_keeps_versions_and_job_history(plane_settings, gcs_client, tmp_path):
    name = f"incoming/{BATCH}/{uuid.uuid4().hex[:8]}.csv"
    gcs_client.bucket("test-bucket").blob(name).upload_from_string(_batch_csv())
    dataset = f"gs://test-bucket/{name}"
    v2 = Path(shutil.copytree(MODELS / REALTIME, tmp_path / "v2"))
    text = (v2 / "model.yaml").read_text()
    (v2 / "model.yaml").write_text(re.sub(r"(?m)^version: .*$", "version: 9.0.0", text))
    from control.cli import _tar_folder

    with running(plane_settings) as server:
        r = api.post(f"{server.url}/api/models", data=_tar_folder(v2), headers={"Content-Type": "application/gzip"})
        assert r.status_code == 201, r.text
        r = api.post(f"{server.url}/api/models/{REALTIME}/rollback", json={"version": "1.0.0"})
        assert r.status_code == 200
        job = api.post(f"{server.url}/api/models/{BATCH}/jobs", json={"dataset": dataset}).json()
        wait_until(lambda: api.get(f"{server.url}/api/jobs/{job['id']}").json()["status"] in ("succeeded", "failed"),
                   120, interval=0.2, what="the job to finish")
        before = api.get(f"{server.url}/api/jobs/{job['id']}").json()
    assert before["status"] == "succeeded", before

    with running(plane_settings) as server:
        model = api.get(f"{server.url}/api/models/{REALTIME}").json()
        versions = {v["version"]: v["live"] for v in model["versions"]}
        assert versions == {"1.0.0": True, "9.0.0": False}  # the rollback survived the restart
        after = api.get(f"{server.url}/api/jobs/{job['id']}").json()
        assert after["status"] == "succeeded" and after["rows"] == before["rows"]
        assert after["results_uri"] == before["results_uri"]
        assert job["id"] in [j["id"] for j in api.get(f"{server.url}/api/jobs").json()]


# -- `modelplane up` as a subprocess ------------------------------------------------------------------

def _descendants(pid: int) -> set[int]:
    """Every live process whose parent chain leads to `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        parents[int(entry.name)] = int(fields[1])
    out: set[int] = set()
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in out:
                out.add(child)
                frontier.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def test_up_prints_urls_serves_a_predict_and_sigterm_leaves_no_orphans(tmp_path):
    _need(REALTIME, BATCH)
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    for name in (REALTIME, BATCH):
        shutil.copytree(MODELS / name, work / "models" / name)
    port, console_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPLANE_") and k != "STORAGE_EMULATOR_HOST"}
    env.update(MODELPLANE_PORT=str(port), MODELPLANE_CONSOLE_PORT=str(console_port), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "control.cli", "up"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    everything: set[int] = set()
    try:
        import queue
        import threading

        # a reader thread: select() on a buffered text pipe misses lines already read ahead
        pending: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [pending.put(line) for line in proc.stdout], daemon=True).start()
        while not any(line.startswith("press Ctrl-C") for line in lines):
            remaining = 10 - (time.monotonic() - started)
            assert remaining > 0, "no URLs within 10 s:\n" + "".join(lines)
            try:
                lines.append(pending.get(timeout=remaining))
            except queue.Empty:
                pass
            assert proc.poll() is None or not pending.empty(), "modelplane up exited:\n" + "".join(lines)
        output = "".join(lines)
        assert f"control  http://127.0.0.1:{port}" in output
        assert "bucket   gs://modelplane (embedded emulator at http://127.0.0.1:" in output
        assert f"models   2 registered: {BATCH}, {REALTIME}" in output
        if (ROOT / "console" / "app.py").is_file():
            assert f"console  http://127.0.0.1:{console_port}" in output
            # its port opens only through the printed link (the console acts as this plane's admin)
            link = re.search(r"(?m)^console  (http://\S+/\?key=\S+)$", output).group(1)
            assert requests.get(f"http://127.0.0.1:{console_port}/", timeout=30).status_code == 401
            browser = requests.Session()
            assert browser.get(link, timeout=30).status_code == 200       # 303 -> the page, with its cookie
            assert browser.get(f"http://127.0.0.1:{console_port}/jobs", timeout=30).status_code == 200
        # authentication is on: a token was made, printed once and stored for the CLI (0600)
        token = re.search(r"(?m)^token    (\S+)$", output).group(1)
        stored = work / ".modelplane" / "token"
        assert stored.read_text().strip() == token and stored.stat().st_mode & 0o777 == 0o600

        url = f"http://127.0.0.1:{port}"
        assert requests.post(f"{url}/models/{REALTIME}/predict", json={"rows": sample_rows(REALTIME)[:2]},
                             timeout=60).status_code == 401
        r = requests.post(f"{url}/models/{REALTIME}/predict", json={"rows": sample_rows(REALTIME)[:2]}, timeout=60,
                          headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert len(r.json()["scores"]) == 2

        # the CLI against it: a local CSV goes through the bucket, the watcher and /events
        cli = [sys.executable, "-m", "control.cli"]
        ran = subprocess.run([*cli, "run", BATCH, str(MODELS / BATCH / "sample.csv"), "--wait", "--timeout", "120"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=180)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert "uploaded gs://modelplane/incoming/churn-risk/sample.csv" in ran.stdout
        assert re.search(r"(?m)^status +succeeded$", ran.stdout), ran.stdout
        listed = subprocess.run([*cli, "ls"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and re.search(rf"(?m)^{REALTIME} +realtime +python +1\.0\.0 +ready", listed.stdout), \
            listed.stdout + listed.stderr

        everything = _descendants(proc.pid)
        assert len(everything) >= 2  # at least the emulator and the model's adapter

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        time.sleep(0.2)  # let the reader thread drain the pipe
        rest = "".join(pending.get() for _ in range(pending.qsize()))
        assert proc.returncode == 0, output + rest
        assert "stopped" in rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in everything):
        time.sleep(0.1)
    orphans = [p for p in everything if _alive(p)]
    for p in orphans:  # do not leak them into the rest of the suite
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert orphans == [], f"orphaned processes after SIGTERM: {orphans}"


R_REALTIME = "major-gift"
R_BATCH = "member-retention"


@pytest.mark.r
def test_r_models_score_at_zero_and_on_upload(tmp_path, gcs, gcs_client):
    from conftest import have_r

    if not have_r():
        pytest.skip("Rscript not installed")
    _need(R_REALTIME, R_BATCH)
    settings = settings_for(tmp_path)
    for name in (R_REALTIME, R_BATCH):
        shutil.copytree(MODELS / name, settings.models_dir / name)
    with running(settings, watch=True) as server:
        rows = sample_rows(R_REALTIME)
        r = api.post(f"{server.url}/models/{R_REALTIME}/predict", json={"rows": rows}, timeout=120)
        assert r.status_code == 200, r.text
        assert len(r.json()["scores"]) == len(rows)

        name = f"incoming/{R_BATCH}/{uuid.uuid4().hex[:8]}.csv"
        gcs_client.bucket("test-bucket").blob(name).upload_from_string((MODELS / R_BATCH / "sample.csv").read_bytes())

        def finished():
            jobs = api.get(f"{server.url}/api/jobs", params={"dataset": f"gs://test-bucket/{name}"}).json()
            return jobs if jobs and jobs[0]["status"] in ("succeeded", "failed") else None

        job = wait_until(finished, 120, interval=0.3, what="the R batch job")[0]
        assert job["status"] == "succeeded", job
        assert api.get(f"{server.url}/api/jobs/{job['id']}/results").status_code == 200
