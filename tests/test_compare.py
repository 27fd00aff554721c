"""Comparing two versions on the same rows (issue 12): the API, the CLI and the console page, against
a real control service with the local runtime, real adapters and models, and the GCS emulator.

The fixture models (tests/fixtures/compare) score `x`, plus params.json's `bump` where `flag` is 1.
Version 1.0.0 has no bump, 2.0.0 a bump of 0.1: on DATASET (x = 0.0 … 0.9, flag 1 on rows 1, 4, 7,
10) the two differ by exactly 0.1 on those four rows and nowhere else, and at threshold 0.65 only
row 7 (0.6 -> 0.7) changes its decision. 3.0.0 takes other features; 4.0.0 fails on x = 0.6 (row 7).
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from control.cli import main
from control_helpers import TOKEN, api, running, settings_for, wait_until, token_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "compare"
ROWS = [(i / 10, 1 if i % 3 == 0 else 0) for i in range(10)]
DATASET = ("x,flag\n" + "".join(f"{x},{flag}\n" for x, flag in ROWS)).encode()
BUMPED = [1, 4, 7, 10]
WAIT = 120


def version_of(tmp: Path, fixture: str, version: str, *, bump: float = 0.0, fail_at=None,
               features=None) -> Path:
    """A copy of the fixture as `version`, with its bump (and failing x, and features) set."""
    folder = tmp / f"{fixture}-{version}" / fixture
    shutil.copytree(FIXTURES / fixture, folder)
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest["version"] = version
    if features is not None:
        manifest["features"] = features
        (folder / "sample.csv").write_text(",".join(f["name"] for f in features) + "\n"
                                           + ",".join("1" for _ in features) + "\n")
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    (folder / "params.json").write_text(json.dumps({"bump": bump, "fail_at": fail_at}))
    return folder


def deploy(server, folder: Path, *, live: bool) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    r = api.post(f"{server.url}/api/models", params={"live": str(live).lower()}, data=buf.getvalue(),
                 headers={"Content-Type": "application/gzip"})
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def plane(gcs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    settings = settings_for(tmp, bucket=gcs.bucket, start_timeout=30)
    with running(settings) as server:
        for fixture in ("cmp-rt", "cmp-batch"):
            deploy(server, version_of(tmp, fixture, "1.0.0"), live=True)
            deploy(server, version_of(tmp, fixture, "2.0.0", bump=0.1), live=False)
            deploy(server, version_of(tmp, fixture, "3.0.0", features=[{"name": "x", "type": "number"},
                                                                        {"name": "z", "type": "number"}]),
                   live=False)
            deploy(server, version_of(tmp, fixture, "4.0.0", fail_at=0.6), live=False)
        yield server, settings


@pytest.fixture(scope="module")
def dataset(plane) -> str:
    server, _ = plane
    r = api.post(f"{server.url}/api/models/cmp-rt/comparisons/datasets", data=DATASET,
                 headers={"Content-Type": "text/csv"})
    assert r.status_code == 201, r.text
    return r.json()["uri"]


def start(server, name: str, **body) -> dict:
    r = api.post(f"{server.url}/api/models/{name}/comparisons", json=body)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/api/comparisons/{r.json()['id']}"
    return r.json()


def finished(server, comparison_id: str) -> dict:
    def done():
        c = api.get(f"{server.url}/api/comparisons/{comparison_id}").json()
        return c if c["status"] in ("succeeded", "failed") else None
    return wait_until(done, WAIT, interval=0.2, what=f"comparison {comparison_id}")


def check_known_report(report: dict) -> None:
    assert report["rows"] == 10
    assert report["labels"] == {"a": "1.0.0", "b": "2.0.0"}
    assert report["difference"]["identical_rows"] == 6
    assert report["difference"]["max_abs"] == pytest.approx(0.1)
    assert report["difference"]["mean"] == pytest.approx(0.04)
    largest = report["largest"]
    assert {x["row"] for x in largest[:4]} <= set(BUMPED)   # the bumped rows come first
    for x in largest:
        bump = 0.1 if x["row"] in BUMPED else 0.0
        assert x["difference"] == pytest.approx(bump)
        assert x["2.0.0"] == pytest.approx(x["1.0.0"] + bump)
        assert x["1.0.0"] == pytest.approx(ROWS[x["row"] - 1][0])
    assert report["flips"]["count"] == 1
    assert [(f["row"], f["1.0.0"], f["2.0.0"]) for f in report["flips"]["rows"]] == [(7, 0.6, pytest.approx(0.7))]
    assert report["flips"]["to_positive"] == 1 and report["flips"]["to_negative"] == 0
    qa, qb = report["quantiles"]["1.0.0"], report["quantiles"]["2.0.0"]
    assert qa["count"] == qb["count"] == 10
    assert qa["min"] == 0.0 and qa["max"] == pytest.approx(0.9) and qb["max"] == pytest.approx(1.0)
    assert report["drift"]["ks"] is not None and 0 < report["drift"]["ks"] <= 1
    assert report["drift"]["psi"] is not None
    hist = report["histogram"]
    assert sum(hist["1.0.0"]) == sum(hist["2.0.0"]) == 10 and len(hist["edges"]) == len(hist["1.0.0"]) + 1


# -- API: the happy paths --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cmp-rt", "cmp-batch"])
def test_two_versions_on_the_same_rows_give_the_known_differences(plane, dataset, name):
    server, _ = plane
    c = start(server, name, a="1.0.0", b="2.0.0", dataset=dataset, threshold=0.65, top=3)
    assert c["status"] in ("queued", "running") and c["kind"] == "comparison"
    done = finished(server, c["id"])
    assert done["status"] == "succeeded", done
    check_known_report(done["report"])
    assert len(done["report"]["largest"]) == 3
    assert done["progress"]["rows"] == 10
    if name == "cmp-batch":   # a job of each version, marked as a comparison's
        jobs = {j["version"]: j for j in api.get(f"{server.url}/api/jobs", params={"model": name}).json()
                if j["id"] in {v["job"] for v in done["progress"]["jobs"].values()}}
        assert set(jobs) == {"1.0.0", "2.0.0"}
        assert {j["trigger"] for j in jobs.values()} == {"compare"}
        assert {j["status"] for j in jobs.values()} == {"succeeded"}


def test_realtime_rows_go_in_chunks_of_the_versions_max_rows(plane, dataset):
    """max_rows is 4: 10 rows make three requests to each version (its adapter's own count)."""
    server, _ = plane
    before = _predicts(server, "2.0.0")
    done = finished(server, start(server, "cmp-rt", a="1.0.0", b="2.0.0", dataset=dataset)["id"])
    assert done["status"] == "succeeded", done
    assert _predicts(server, "2.0.0") - before == 3
    assert "flips" not in done["report"]   # no threshold given


def _predicts(server, version: str) -> int:
    """Predict requests the version's adapter answered 200 (its own /metrics; one replica at most)."""
    resp = server.plane.runtime.forward("cmp-rt", method="GET", path="/metrics", headers={}, body=b"",
                                        version=version)
    assert resp.status == 200, resp.body[:300]
    total = 0
    for line in resp.body.decode().splitlines():
        if line.startswith("modelplane_adapter_requests_total") and "predict" in line and 'status="200"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_comparisons_are_listed_newest_first_without_their_reports(plane, dataset):
    server, _ = plane
    first = finished(server, start(server, "cmp-rt", a="1.0.0", b="2.0.0", dataset=dataset, threshold=0.65)["id"])
    listed = api.get(f"{server.url}/api/models/cmp-rt/comparisons").json()
    assert listed[0]["id"] == first["id"] and "report" not in listed[0]
    assert listed[0]["summary"] == {"rows": 10, "psi": first["report"]["drift"]["psi"],
                                    "ks": first["report"]["drift"]["ks"], "flips": 1}
    assert all(c["model"] == "cmp-rt" for c in listed)
    assert api.get(f"{server.url}/api/models/nope/comparisons").status_code == 404


# -- API: what is wrong is named --------------------------------------------------------------------

@pytest.mark.parametrize("body, status, words", [
    ({"a": "1.0.0", "b": "9.9.9"}, 404, ["no version 9.9.9", "2.0.0"]),
    ({"a": "1.0.0", "b": "1.0.0"}, 400, ["both 1.0.0"]),
    ({"a": "1.0.0", "b": "2.0.0", "dataset": "gs://test-bucket/nowhere/none.csv"}, 422, ["does not exist"]),
    ({"a": "1.0.0", "b": "2.0.0", "dataset": "gs://other-bucket/x.csv"}, 403, ["other-bucket"]),
    ({"a": "1.0.0", "b": "2.0.0", "dataset": "/etc/passwd"}, 400, ["dataset"]),
    ({"a": "1.0.0", "b": "2.0.0", "threshold": "high"}, 400, ["threshold"]),
    ({"a": "1.0.0", "b": "2.0.0", "threshold": 1e301}, 400, ["threshold"]),
    ({"a": "1.0.0", "b": "2.0.0", "top": 1001}, 400, ["top"]),
    ({"a": "1.0.0", "b": "2.0.0", "extra": 1}, 400, ["extra"]),
    ({"a": "../x", "b": "2.0.0"}, 400, ["a:"]),
    ({"b": "2.0.0"}, 400, ["a:"]),
])
def test_a_bad_request_is_refused_naming_what_is_wrong(plane, dataset, body, status, words):
    server, _ = plane
    body = {"dataset": dataset, **body}
    r = api.post(f"{server.url}/api/models/cmp-rt/comparisons", json=body)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["error"], r.json()


def test_an_unknown_model_or_comparison_is_not_found(plane, dataset):
    server, _ = plane
    r = api.post(f"{server.url}/api/models/nope/comparisons", json={"a": "1.0.0", "b": "2.0.0", "dataset": dataset})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    for cid in ("cmp-0000000000000000", "..%2F..%2Ftoken", "cmp-../../x"):
        assert api.get(f"{server.url}/api/comparisons/{cid}").status_code == 404


def test_an_empty_upload_is_refused_and_an_upload_starts_no_job(plane):
    server, _ = plane
    r = api.post(f"{server.url}/api/models/cmp-batch/comparisons/datasets", data=b"",
                 headers={"Content-Type": "text/csv"})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    jobs = len(api.get(f"{server.url}/api/jobs", params={"model": "cmp-batch"}).json())
    r = api.post(f"{server.url}/api/models/cmp-batch/comparisons/datasets", data=DATASET,
                 headers={"Content-Type": "text/csv"})
    assert r.status_code == 201 and r.json()["object"].startswith("comparisons/cmp-batch/")
    events = api.get(f"{server.url}/api/events").json()
    assert not [e for e in events if e.get("action") == "started" and r.json()["object"] in json.dumps(e)]
    assert len(api.get(f"{server.url}/api/jobs", params={"model": "cmp-batch"}).json()) == jobs


@pytest.mark.parametrize("name", ["cmp-rt", "cmp-batch"])
def test_versions_with_different_features_are_reported(plane, dataset, name):
    server, _ = plane
    done = finished(server, start(server, name, a="1.0.0", b="3.0.0", dataset=dataset)["id"])
    assert done["status"] == "failed"
    assert "different features" in done["error"] and "only 1.0.0 has flag" in done["error"]
    assert "only 3.0.0 has z" in done["error"]
    assert done["features"]["only_in_a"] == ["flag"] and done["features"]["only_in_b"] == ["z"]


def test_a_realtime_version_failing_on_a_row_names_the_row_and_the_models_error(plane, dataset):
    server, _ = plane
    done = finished(server, start(server, "cmp-rt", a="1.0.0", b="4.0.0", dataset=dataset)["id"])
    assert done["status"] == "failed"
    assert "cmp-rt 4.0.0 failed on row 7" in done["error"] and "cannot score x=0.6" in done["error"]
    assert done["failed_version"] == "4.0.0" and done["failed_row"] == 7


def test_a_batch_version_failing_names_its_job_and_the_models_error(plane, dataset):
    server, _ = plane
    done = finished(server, start(server, "cmp-batch", a="1.0.0", b="4.0.0", dataset=dataset)["id"])
    assert done["status"] == "failed"
    assert "cmp-batch 4.0.0 failed" in done["error"] and done["failed_version"] == "4.0.0"
    assert done["failed_job"] in done["error"]
    assert "cannot score x=0.6" in done["log_tail"]


def test_a_row_a_version_refuses_is_named(plane):
    server, _ = plane
    bad = DATASET + b"oops,1\n"
    uri = api.post(f"{server.url}/api/models/cmp-rt/comparisons/datasets", data=bad,
                   headers={"Content-Type": "text/csv"}).json()["uri"]
    for name in ("cmp-rt", "cmp-batch"):
        done = finished(server, start(server, name, a="1.0.0", b="2.0.0", dataset=uri)["id"])
        assert done["status"] == "failed", done
        assert "row 11" in done["error"] and "x" in done["error"], done["error"]
        assert done["problems"][0]["row"] == 11


# -- persistence ------------------------------------------------------------------------------------

def test_a_finished_report_survives_a_restart_and_a_running_one_is_marked_failed(gcs, tmp_path):
    settings = settings_for(tmp_path, bucket=gcs.bucket, start_timeout=30)
    with running(settings) as server:
        deploy(server, version_of(tmp_path, "cmp-rt", "1.0.0"), live=True)
        deploy(server, version_of(tmp_path, "cmp-rt", "2.0.0", bump=0.1), live=False)
        uri = api.post(f"{server.url}/api/models/cmp-rt/comparisons/datasets", data=DATASET,
                       headers={"Content-Type": "text/csv"}).json()["uri"]
        done = finished(server, start(server, "cmp-rt", a="1.0.0", b="2.0.0", dataset=uri, threshold=0.65)["id"])
        assert done["status"] == "succeeded"
    # as if the service had stopped in the middle of another one
    stuck = dict(done, id="cmp-00000000000000aa", status="running", report=None, finished_at=None)
    (Path(settings.state_dir) / "comparisons" / f"{stuck['id']}.json").write_text(json.dumps(stuck))
    with running(settings) as server:
        again = api.get(f"{server.url}/api/comparisons/{done['id']}").json()
        assert again["status"] == "succeeded" and again["report"] == done["report"]
        failed = api.get(f"{server.url}/api/comparisons/{stuck['id']}").json()
        assert failed["status"] == "failed" and "stopped while" in failed["error"]


# -- reference from a dataset ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cmp-rt", "cmp-batch"])
def test_a_dataset_scored_by_a_version_becomes_its_reference(plane, dataset, name):
    server, _ = plane
    r = api.put(f"{server.url}/api/models/{name}/versions/2.0.0/reference", json={"dataset": dataset})
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "reference"
    done = finished(server, r.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["reference"]["count"] == 10
    assert done["reference"]["quantiles"]["max"] == pytest.approx(1.0)
    versions = server.plane.monitor.report(name, batch=False)["versions"]
    assert versions["2.0.0"]["reference"]["source"] == dataset
    assert versions["2.0.0"]["reference"]["count"] == 10


def test_a_reference_for_an_unknown_version_or_missing_dataset_is_refused(plane, dataset):
    server, _ = plane
    r = api.put(f"{server.url}/api/models/cmp-rt/versions/9.0.0/reference", json={"dataset": dataset})
    assert r.status_code == 404 and "9.0.0" in r.json()["error"]
    r = api.put(f"{server.url}/api/models/cmp-rt/versions/1.0.0/reference",
                json={"dataset": "gs://test-bucket/none/here.csv"})
    assert r.status_code == 422 and "does not exist" in r.json()["error"]


# -- CLI ------------------------------------------------------------------------------------------

def cli(server, *args) -> int:
    return main([*args, "--url", server.url, "--token-file", token_file(TOKEN)])


def test_cli_compares_a_local_file_and_prints_a_readable_report(plane, tmp_path, capsys):
    server, _ = plane
    path = tmp_path / "rows.csv"
    path.write_bytes(DATASET)
    assert cli(server, "compare", "cmp-rt", "1.0.0", "2.0.0", str(path), "--threshold", "0.65", "--top", "4") == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "uploaded" in captured.err and "comparison cmp-" in captured.err
    assert "rows compared: 10" in out
    header = next(line for line in out.splitlines() if line.startswith("QUANTILE"))
    assert header.split() == ["QUANTILE", "1.0.0", "2.0.0", "B-A"]
    p50 = next(line for line in out.splitlines() if line.startswith("p50 "))
    assert p50.split()[:3] == ["p50", "0.45", "0.45"]
    assert "PSI" in out and any(w in out for w in ("(stable)", "(moderate)", "(major)"))
    assert "decisions flipped at threshold 0.65: 1 of 10" in out
    flips = out.split("decisions flipped")[1].split("largest differences")[0]
    assert [line.split()[0] for line in flips.splitlines()[1:] if line.strip()][1:] == ["7"]
    largest = out.split("largest differences:")[1].splitlines()[1:]
    assert largest[0].split() == ["ROW", "1.0.0", "2.0.0", "DIFF"]
    assert sorted(int(line.split()[0]) for line in largest[1:] if line.strip()) == BUMPED


def test_cli_json_prints_the_report(plane, dataset, capsys):
    server, _ = plane
    assert cli(server, "compare", "cmp-batch", "1.0.0", "2.0.0", dataset, "--threshold", "0.65", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    check_known_report(report)


def test_cli_fails_with_the_error(plane, dataset, capsys):
    server, _ = plane
    assert cli(server, "compare", "cmp-rt", "1.0.0", "7.0.0", dataset) == 1
    assert "no version 7.0.0" in capsys.readouterr().err
    assert cli(server, "compare", "cmp-rt", "1.0.0", "4.0.0", dataset) == 1
    err = capsys.readouterr().err
    assert "failed" in err and "row 7" in err and "cannot score x=0.6" in err
    assert cli(server, "compare", "cmp-rt", "1.0.0", "2.0.0", "/no/such/file.csv") == 1
    assert "no such file" in capsys.readouterr().err
    assert cli(server, "compare", "cmp-rt", "1.0.0", "2.0.0", dataset, "--threshold", "nan") == 1
    assert "threshold" in capsys.readouterr().err


# -- console ----------------------------------------------------------------------------------------

@pytest.fixture
def page(plane, monkeypatch, tmp_path):
    """The console's compare page (Streamlit AppTest) against the plane, opened with `query`."""
    pytest.importorskip("streamlit")
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    server, _ = plane
    config.set_option("server.address", "127.0.0.1")   # served on loopback: no sign-in
    monkeypatch.setenv("MODELPLANE_URL", server.url)
    monkeypatch.setenv("MODELPLANE_TOKEN", TOKEN)
    monkeypatch.setenv("MODELPLANE_STATE_DIR", str(tmp_path / "no-state"))

    def open_(**query: str):
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "console" / "app.py"),
                               default_timeout=WAIT)
        at.run()
        at.switch_page("views/compare.py")
        at.query_params.update(query)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at
    return open_


def _metric(at, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, [m.label for m in at.metric]
    return found[0]


def _frame(at, column: str):
    for d in at.dataframe:
        if column in d.value.columns:
            return d.value
    raise AssertionError(f"no table with {column!r}: {[list(d.value.columns) for d in at.dataframe]}")


def test_console_shows_a_comparison_overlaid_with_its_tables(plane, dataset, page):
    server, _ = plane
    done = finished(server, start(server, "cmp-rt", a="1.0.0", b="2.0.0", dataset=dataset, threshold=0.65, top=4)["id"])
    at = page(model="cmp-rt", comparison=done["id"])
    assert _metric(at, "Rows compared") == "10"
    assert _metric(at, "Flips at 0.65") == "1"
    assert _metric(at, "Identical rows") == "6"
    charts = at.get("vega_lite_chart")
    assert charts, "no chart"
    spec = json.loads(charts[0].proto.spec)
    # A filled, B outlined on top (common.overlaid_histograms): one colour scale over both layers
    assert [layer["encoding"]["color"]["scale"]["domain"] for layer in spec["layer"]] == [["1.0.0", "2.0.0"]] * 2
    quantiles = _frame(at, "Quantile").set_index("Quantile")
    assert quantiles.loc["p50", "1.0.0"] == pytest.approx(0.45) and quantiles.loc["max", "2.0.0"] == pytest.approx(1.0)
    largest = [d.value for d in at.dataframe if list(d.value.columns) == ["Row", "1.0.0", "2.0.0", "Difference"]]
    assert largest and sorted(largest[0]["Row"]) == BUMPED
    assert list(largest[0]["Difference"]) == [pytest.approx(0.1)] * 4
    flips = [d.value for d in at.dataframe if list(d.value.columns) == ["Row", "1.0.0", "2.0.0"]]
    assert flips and list(flips[0]["Row"]) == [7]
    assert done["id"] in list(_frame(at, "Id")["Id"])


def test_console_runs_a_comparison_from_its_form(plane, dataset, page):
    server, _ = plane
    at = page(model="cmp-batch")
    at.selectbox(key="cmp-a-cmp-batch").set_value("1.0.0").run()
    at.selectbox(key="cmp-b-cmp-batch").set_value("2.0.0").run()
    at.radio(key="cmp-src-cmp-batch").set_value("A gs:// URI").run()
    at.text_input(key="cmp-uri-cmp-batch").set_value(dataset).run()
    at.number_input(key="cmp-threshold-cmp-batch").set_value(0.65).run()
    at.button(key="cmp-run-cmp-batch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    comparison_id = at.session_state["comparison"]
    finished(server, comparison_id)
    at.run()
    assert not at.exception
    assert _metric(at, "Rows compared") == "10" and _metric(at, "Flips at 0.65") == "1"


def test_console_says_why_a_comparison_failed(plane, dataset, page):
    server, _ = plane
    done = finished(server, start(server, "cmp-rt", a="1.0.0", b="4.0.0", dataset=dataset)["id"])
    at = page(model="cmp-rt", comparison=done["id"])
    errors = " ".join(e.value for e in at.error)
    assert "failed" in errors and "row 7" in errors and "cannot score x=0.6" in errors


# -- the cluster runtime: a job of a version that is not live --------------------------------------

def test_knative_runs_a_job_of_the_version_asked_for(tmp_path_factory):
    """On a real kube-apiserver (skipped without one): the Job comes from that version's JobSink."""
    import test_knative as tk

    from control.errors import NotFound as PlaneNotFound

    if tk.BINARY is None or not tk.BINARY.is_file():
        pytest.skip("no kube-apiserver binary (scripts/kube-apiserver.sh builds it)")
    import kube

    cluster = kube.Cluster(tmp_path_factory.mktemp("kube-compare"), tk.BINARY).start()
    try:
        cluster.install_crds(kube.crds_dir())
        for path, doc in kube.iter_knative_docs():
            if path.name in ("namespace.yaml", "rbac.yaml"):
                cluster.admin.apply(doc)
        runtime = tk.make_runtime(cluster, cluster.service_account_token(tk.CONTROL_NS, tk.SA))
        try:
            v1 = tk.example("churn-risk")
            runtime.deploy(v1)
            runtime.deploy(tk.bump(v1, "1.1.0"), make_live=False)
            dataset = f"gs://test-bucket/comparisons/{v1.name}/rows.csv"
            live, _ = runtime.submit_job(v1.name, dataset=dataset, trigger="compare")
            pinned, _ = runtime.submit_job(v1.name, dataset=dataset, trigger="compare", version="1.1.0")
            assert (live.version, pinned.version) == ("1.0.0", "1.1.0")
            kjob = cluster.admin.get(f"/apis/batch/v1/namespaces/{tk.NS}/jobs/{pinned.id}")
            assert kjob["metadata"]["labels"]["sinks.knative.dev/job-sink-name"] == f"{v1.name}-1-1-0"
            assert pinned.trigger == "compare"
            with pytest.raises(PlaneNotFound) as e:
                runtime.submit_job(v1.name, dataset=dataset, version="9.9.9")
            assert "9.9.9" in e.value.message and "1.0.0" in e.value.message and "1.1.0" in e.value.message
        finally:
            runtime.close()
    finally:
        cluster.stop()


def test_the_local_runtime_runs_a_job_of_the_version_asked_for(plane, dataset):
    from control.errors import NotFound as PlaneNotFound

    server, _ = plane
    runtime = server.plane.runtime
    job, created = runtime.submit_job("cmp-batch", dataset=dataset, trigger="compare", version="2.0.0")
    assert created and job.version == "2.0.0" and job.trigger == "compare"
    assert runtime.submit_job("cmp-batch", dataset=dataset)[0].version == "1.0.0"   # the live one
    with pytest.raises(PlaneNotFound) as e:
        runtime.submit_job("cmp-batch", dataset=dataset, version="9.9.9")
    assert "no version 9.9.9" in e.value.message and "2.0.0" in e.value.message
