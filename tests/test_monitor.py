"""Score monitoring: references, rolling windows, drift, flags, batch job summaries, the console chart.

A real control service (front door + Flask API, local runtime, real adapters) and real fixture
models (tests/fixtures/monitor): `drift-rt` and `drift-batch` score logistic(x), so the drift
seen here is caused by shifting the input rows, never written into a model.
"""
from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
import requests

from adapters.batch import score_summary
from adapters.manifest import ManifestError, parse_manifest
from control import stats
from control.monitor import MIN_COUNT, ScoreMonitor, parse_scores
from control.runtime.base import ProxyResponse
from control_helpers import AUTH, api, running, settings_for, wait_until

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "monitor"
RT, BATCH = "drift-rt", "drift-batch"
N = 200  # drift-rt's monitoring.reference_size and window


def logistic(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def rows(n: int, *, shift: float = 0.0, seed: int) -> list[dict]:
    r = random.Random(seed)
    return [{"x": r.gauss(shift, 1.0)} for _ in range(n)]


#: fixtures that hold only a manifest and a sample: their program is another fixture's
PROGRAM_OF = {"drift-feat-rt": ("drift-rt", "model.py"), "drift-feat-batch": ("drift-batch", "score.py")}


def copy_model(name: str, models_dir: Path) -> None:
    shutil.copytree(FIXTURES / name, Path(models_dir) / name)
    if name in PROGRAM_OF:
        source, program = PROGRAM_OF[name]
        shutil.copy2(FIXTURES / source / program, Path(models_dir) / name / program)


def predict(server, batch: list[dict]) -> list[float]:
    r = api.post(f"{server.url}/models/{RT}/predict", json={"rows": batch}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["scores"]


def monitoring(server, name: str = RT) -> dict:
    r = api.get(f"{server.url}/api/models/{name}")
    assert r.status_code == 200, r.text
    return r.json()["monitoring"]


def version(server, name: str = RT, v: str = "1.0.0") -> dict:
    return monitoring(server, name)["versions"][v]


@pytest.fixture
def plane(tmp_path, gcs):
    settings = settings_for(tmp_path, start_timeout=30)
    copy_model(RT, settings.models_dir)
    copy_model(BATCH, settings.models_dir)
    with running(settings) as server:
        yield server


# -- the manifest ------------------------------------------------------------------------------

MANIFEST = """\
name: m
version: 1.0.0
kind: realtime
language: python
command: [python3, model.py]
features:
  - {name: x, type: number}
"""


def test_monitoring_block_has_defaults_and_bounded_fields_named_in_errors():
    m = parse_manifest(MANIFEST, check_files=False)
    assert (m.monitoring.reference_size, m.monitoring.window, m.monitoring.drift_threshold) == (1000, 1000, 0.25)
    assert m.to_dict()["monitoring"] == {"reference_size": 1000, "window": 1000, "drift_threshold": 0.25}
    m = parse_manifest(MANIFEST + "monitoring: {reference_size: 500, window: 300, drift_threshold: 0.1}\n",
                       check_files=False)
    assert (m.monitoring.reference_size, m.monitoring.window, m.monitoring.drift_threshold) == (500, 300, 0.1)
    for bad, field in (("{drift_threshold: 0}", "monitoring.drift_threshold"),
                       ("{drift_threshold: .nan}", "monitoring.drift_threshold"),
                       ("{window: 10}", "monitoring.window"),
                       ("{reference_size: 100000000}", "monitoring.reference_size"),
                       ("{windw: 500}", "monitoring.windw")):
        with pytest.raises(ManifestError) as e:
            parse_manifest(MANIFEST + f"monitoring: {bad}\n", check_files=False)
        assert [(p.field, p.line) for p in e.value.problems] == [(field, 8)], bad


# -- the monitor on its own ----------------------------------------------------------------------

def _answer(scores: list[float], version: str = "1.0.0") -> ProxyResponse:
    import json

    body = json.dumps({"model": "m", "version": version, "scores": scores}).encode()
    return ProxyResponse(200, {"Content-Type": "application/json"}, body)


def test_a_full_queue_drops_and_counts_answers_never_blocks_or_raises(tmp_path):
    monitor = ScoreMonitor(tmp_path / "monitor", queue_max=5, start=False)   # nothing drains it
    try:
        for i in range(8):
            assert monitor.observe("m", _answer([i / 10])) is None
        monitor.observe("m", ProxyResponse(200, {}, b"not json at all"))   # full: dropped, not parsed
        assert monitor.dropped == 4
        assert monitor.drain() == 5
        assert monitor.observed == 5
        monitor.observe("m", ProxyResponse(500, {}, b'{"scores": [1]}'))   # errors are not observed
        monitor.observe("m", ProxyResponse(200, {}, b"\xff\xfe garbage"))  # unparseable: ignored
        monitor.drain()
        assert monitor.observed == 5 and monitor.dropped == 4
        assert monitor.report("m")["versions"]["1.0.0"]["reference"]["count"] == 5
        big = _answer([0.5] * 1000)
        small = ScoreMonitor(tmp_path / "other", queue_max_bytes=len(big.body) * 2, start=False)
        for _ in range(3):
            small.observe("m", big)
        assert small.dropped == 1 and small.drain() == 2
        small.observe("m", big)   # drained: room again
        assert small.dropped == 1
        small.close()
    finally:
        monitor.close()


def test_scores_are_read_from_json_csv_and_v2_answers_binary_is_skipped():
    assert parse_scores({}, b'{"model":"m","version":"2.0.0","scores":[0.5,1]}') == ("2.0.0", [0.5, 1.0], False)
    assert parse_scores({"Content-Type": "text/csv; charset=utf-8", "X-Model-Version": "2.0.0"},
                        b"p\n0.25\n0.75\n") == ("2.0.0", [0.25, 0.75], False)
    v2 = (b'{"model_name":"m","model_version":"2.0.0","id":"1","parameters":{},'
          b'"outputs":[{"name":"p","datatype":"FP64","shape":[2],"data":[0.1,0.2]}]}')
    assert parse_scores({"Content-Type": "application/json"}, v2) == ("2.0.0", [0.1, 0.2], False)
    assert parse_scores({"Inference-Header-Content-Length": "120"}, b'{"outputs"...binary') == (None, None, True)
    assert parse_scores({}, b'{"name":"m","versions":["1"],"inputs":[]}') == (None, None, False)
    assert parse_scores({}, b'{"version":"1","scores":[true]}')[1] is None


def test_batch_summary_of_a_results_file_counts_every_row(tmp_path):
    manifest = parse_manifest((FIXTURES / BATCH / "model.yaml").read_text(), check_files=False)
    r = random.Random(3)
    values = [logistic(r.gauss(0, 1)) for _ in range(20_000)]
    path = tmp_path / "scores.csv"
    path.write_text("p\n" + "\n".join(map(repr, values)) + "\n")
    s = score_summary(path, manifest)
    assert s["count"] == 20_000 and sum(s["histogram"]["counts"]) == 20_000
    assert len(s["histogram"]["edges"]) == len(s["histogram"]["counts"]) + 1 <= 33
    assert s["histogram"]["edges"][0] <= min(values) and s["histogram"]["edges"][-1] > max(values)
    assert s["quantiles"]["min"] == min(values) and s["quantiles"]["max"] == max(values)
    assert abs(s["quantiles"]["p50"] - stats.quantile(sorted(values), 0.5)) < 0.01
    assert len(s["percentiles"]) == 101


# -- realtime, end to end -------------------------------------------------------------------------

def test_first_scores_are_the_reference_unshifted_traffic_stays_under_shifted_is_flagged(plane):
    server = plane
    first = predict(server, rows(N, seed=1))
    v = version(server)
    assert v["kind"] == "realtime"
    assert v["reference"]["count"] == N and v["reference"]["complete"]
    assert v["reference"]["source"] == "first scores"
    assert v["reference"]["quantiles"]["p50"] == pytest.approx(stats.quantile(sorted(first), 0.5), abs=1e-6)
    assert sum(v["reference"]["histogram"]["counts"]) == N
    assert v["recent"]["count"] == 0
    assert v["drift"]["psi"] is None and str(MIN_COUNT) in v["drift"]["reason"]
    assert v["drifted"] is False and v["threshold"] == 0.25

    # the same population, other rows: the window fills, PSI stays under the threshold
    predict(server, rows(N, seed=2))
    v = version(server)
    assert v["recent"]["count"] == N and sum(v["recent"]["histogram"]["counts"]) == N
    assert sum(v["recent"]["deciles"]["recent"]) == pytest.approx(1.0)
    assert v["drift"]["psi"] is not None and v["drift"]["psi"] < 0.25, v["drift"]
    assert v["drifted"] is False
    assert monitoring(server)["drifted"] == []
    assert server.plane.monitor.flags() == {}
    text = api.get(f"{server.url}/metrics").text
    assert f'modelplane_model_drifted{{model="{RT}",version="1.0.0"}} 0' in text
    generation = server.plane.monitor.generation

    # the input shifts: the scores shift with it, PSI passes the manifest's threshold
    shifted = predict(server, rows(N, shift=2.0, seed=3))
    v = version(server)
    assert v["recent"]["quantiles"]["p50"] == pytest.approx(stats.quantile(sorted(shifted), 0.5), abs=1e-6)
    assert v["drift"]["psi"] > 0.25 and v["drift"]["ks"] > 0.3, v["drift"]
    assert v["drifted"] is True
    assert monitoring(server)["drifted"] == ["1.0.0"]
    assert server.plane.monitor.flags() == {RT: ["1.0.0"]}
    assert server.plane.monitor.generation != generation
    text = api.get(f"{server.url}/metrics").text
    assert f'modelplane_model_drifted{{model="{RT}",version="1.0.0"}} 1' in text
    psi_line = next(line for line in text.splitlines()
                    if line.startswith(f'modelplane_model_score_psi{{model="{RT}",version="1.0.0"}}'))
    assert float(psi_line.split()[-1]) == pytest.approx(v["drift"]["psi"], abs=1e-5)
    assert f'modelplane_model_score_ks{{model="{RT}",version="1.0.0"}}' in text
    assert f'modelplane_model_scores_observed_total{{model="{RT}",version="1.0.0"}} {3 * N}' in text
    assert "# TYPE modelplane_monitor_answers_dropped_total counter" in text
    assert "modelplane_monitor_answers_dropped_total 0" in text


def test_csv_and_v2_answers_are_observed_too(plane):
    server = plane
    body = "x\n" + "\n".join(str(row["x"]) for row in rows(150, seed=4)) + "\n"
    r = api.post(f"{server.url}/models/{RT}/predict", data=body,
                 headers={"Content-Type": "text/csv", "Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    xs = [row["x"] for row in rows(60, seed=5)]
    r = api.post(f"{server.url}/models/{RT}/v2/models/{RT}/infer",
                 json={"inputs": [{"name": "x", "datatype": "FP64", "shape": [len(xs)], "data": xs}]})
    assert r.status_code == 200, r.text
    v = version(server)
    assert v["observed"] == 210
    assert v["reference"]["count"] == 200 and v["recent"]["count"] == 10


def test_set_reference_replaces_the_reference(plane):
    server = plane
    predict(server, rows(N, seed=1))
    shifted = predict(server, rows(N, shift=2.0, seed=3))
    assert version(server)["drifted"] is True
    # what another route does with the scores of a dataset the user names
    dataset = [logistic(row["x"]) for row in rows(500, shift=2.0, seed=9)]
    server.plane.monitor.set_reference(RT, "1.0.0", dataset, source="dataset gs://test-bucket/shifted.csv")
    v = version(server)
    assert v["reference"]["source"] == "dataset gs://test-bucket/shifted.csv"
    assert v["reference"]["count"] == 500
    assert v["reference"]["quantiles"]["p50"] == pytest.approx(stats.quantile(sorted(dataset), 0.5), abs=1e-6)
    assert v["recent"]["quantiles"]["p50"] == pytest.approx(stats.quantile(sorted(shifted), 0.5), abs=1e-6)
    assert v["drift"]["psi"] < 0.25 and v["drifted"] is False
    assert server.plane.monitor.flags() == {}
    # a removed model takes its monitoring with it
    assert (Path(server.plane.settings.state_dir) / "monitor" / RT).is_dir()
    assert api.delete(f"{server.url}/api/models/{RT}").status_code == 200
    assert server.plane.monitor.report(RT)["versions"] == {}
    assert not (Path(server.plane.settings.state_dir) / "monitor" / RT).exists()


def test_the_reference_survives_a_restart(tmp_path, gcs):
    settings = settings_for(tmp_path, start_timeout=30)
    copy_model(RT, settings.models_dir)
    with running(settings) as server:
        first = predict(server, rows(N, seed=1))
        predict(server, rows(50, shift=2.0, seed=3))
        before = version(server)
    assert (tmp_path / "state" / "monitor" / RT / "1.0.0.json").is_file()
    with running(settings) as server:
        after = version(server)
        assert after["reference"] == before["reference"]
        assert after["reference"]["count"] == N
        assert after["reference"]["quantiles"]["p50"] == pytest.approx(stats.quantile(sorted(first), 0.5), abs=1e-6)
        assert after["recent"]["count"] == 50 and after["observed"] == N + 50
        # the window fills on from where it was: shifted traffic is flagged against the old reference
        predict(server, rows(150, shift=2.0, seed=4))
        assert version(server)["drifted"] is True


# -- batch, end to end ----------------------------------------------------------------------------

def _job(server, gcs_client, name: str, xs: list[float]) -> dict:
    gcs_client.bucket("test-bucket").blob(f"data/{name}").upload_from_string(
        "x\n" + "\n".join(map(repr, xs)) + "\n", content_type="text/csv")
    r = api.post(f"{server.url}/api/models/{BATCH}/jobs", json={"dataset": f"gs://test-bucket/data/{name}"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = wait_until(lambda: (j := api.get(f"{server.url}/api/jobs/{job_id}").json())["status"]
                     in ("succeeded", "failed") and j, 60, what=f"job {job_id}")
    assert job["status"] == "succeeded", job
    return job


def test_batch_jobs_carry_a_score_summary_and_a_shifted_job_is_flagged(plane, gcs_client):
    server = plane
    r = random.Random(7)
    xs = [r.gauss(0, 1) for _ in range(500)]
    job = _job(server, gcs_client, "base.csv", xs)
    summary = job["score_summary"]
    assert job["rows"] == 500 and summary["count"] == 500
    assert sum(summary["histogram"]["counts"]) == 500
    scores = sorted(logistic(x) for x in xs)
    assert summary["quantiles"]["p50"] == pytest.approx(stats.quantile(scores, 0.5), abs=1e-9)
    v = version(server, BATCH)
    assert v["kind"] == "batch" and v["reference"]["source"] == f"job {job['id']}"
    assert v["reference"]["count"] == 500 and v["recent"]["job"] == job["id"]
    assert v["drift"]["psi"] == 0 and v["drifted"] is False

    same = _job(server, gcs_client, "same.csv", [r.gauss(0, 1) for _ in range(400)])
    v = version(server, BATCH)
    assert v["recent"]["job"] == same["id"] and v["recent"]["count"] == 400
    assert v["drift"]["psi"] < 0.25 and v["drifted"] is False

    shifted = _job(server, gcs_client, "shifted.csv", [r.gauss(2, 1) for _ in range(300)])
    v = version(server, BATCH)
    assert v["recent"]["job"] == shifted["id"] and sum(v["recent"]["histogram"]["counts"]) == 300
    assert v["drift"]["psi"] > 0.25 and v["drifted"] is True
    assert [j["job"] for j in v["jobs"]] == [shifted["id"], same["id"], job["id"]]
    assert server.plane.monitor.flags() == {BATCH: ["1.0.0"]}
    text = api.get(f"{server.url}/metrics").text
    assert f'modelplane_model_drifted{{model="{BATCH}",version="1.0.0"}} 1' in text


# -- the console ------------------------------------------------------------------------------------

def test_console_model_page_charts_reference_and_recent_and_warns_of_drift(plane, monkeypatch, tmp_path):
    pytest.importorskip("streamlit")
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    server = plane
    predict(server, rows(N, seed=1))
    predict(server, rows(N, shift=2.0, seed=3))
    monkeypatch.setenv("MODELPLANE_URL", server.url)
    monkeypatch.setenv("MODELPLANE_TOKEN", AUTH["Authorization"].split()[-1])
    monkeypatch.setenv("MODELPLANE_STATE_DIR", str(tmp_path / "no-state"))
    config.set_option("server.address", "127.0.0.1")   # on loopback: the token comes from the environment
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "console" / "app.py"), default_timeout=90)
    at.run()
    at.switch_page("views/model.py")
    at.query_params.update({"model": RT})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    warnings = [w.value for w in at.warning]
    assert any("drifted" in w and "1.0.0" in w for w in warnings), warnings
    charts = [c for c in at.get("vega_lite_chart") if "reference" in c.proto.spec]
    assert charts, "no reference/recent histogram"
    metrics = {m.label: m.value for m in at.metric}
    assert "PSI" in metrics and float(metrics["PSI"]) > 0.25, metrics

    # an undrifted model shows its chart and no warning
    requests.post(f"{server.url}/models/{RT}/predict", json={"rows": rows(N, seed=2)}, headers=AUTH, timeout=60)
    at.run()
    assert not [w for w in at.warning if "drifted" in w.value]


def test_past_its_sample_rate_a_model_s_answers_are_left_out_and_counted(tmp_path, monkeypatch):
    import control.monitor as cm
    from control.runtime.base import ProxyResponse

    now = [1000.0]
    monkeypatch.setattr(cm, "SAMPLE_RATE", 5)
    monkeypatch.setattr(cm, "_clock", lambda: now[0])
    monitor = ScoreMonitor(tmp_path / "monitor", start=False)
    answer = ProxyResponse(status=200, headers={}, body=b'{"model":"m","version":"1.0.0","scores":[0.5]}')
    for _ in range(8):
        monitor.observe("m", answer)
        monitor.observe("other", answer)      # each model has its own rate
    assert monitor.sampled_out == 6 and len(monitor._queue) == 10
    now[0] += 5.0                             # a later second takes answers again
    monitor.observe("m", answer)
    assert monitor.sampled_out == 6 and len(monitor._queue) == 11


def test_past_its_sample_rate_answers_are_sampled_over_the_whole_second_not_its_first(tmp_path, monkeypatch):
    """Traffic sent in a repeating order each second (100 answers of 0.1, then 900 of 0.9): the
    sample holds both as they are sent, not only what comes first in each second."""
    import control.monitor as cm

    now = [1000.0]
    monkeypatch.setattr(cm, "_clock", lambda: now[0])
    monitor = ScoreMonitor(tmp_path / "monitor", start=False, queue_max=100_000,
                           manifest_of=lambda n, v: {"monitoring": {"reference_size": 100, "window": 1000}})
    low = ProxyResponse(status=200, headers={}, body=b'{"model":"m","version":"1.0.0","scores":[0.1]}')
    high = ProxyResponse(status=200, headers={}, body=b'{"model":"m","version":"1.0.0","scores":[0.9]}')
    for _ in range(20):
        for answer in [low] * 100 + [high] * 900:
            monitor.observe("m", answer)
        now[0] += 1.0
    monitor.drain()
    window = list(monitor._versions[("m", "1.0.0")].window)
    assert len(window) == 1000
    share = window.count(0.9) / len(window)
    assert 0.8 < share < 0.97, share   # 0.9 of what was sent; the first answers of each second alone: 0


def test_each_version_is_watched_with_its_own_manifest_settings_live_or_not(tmp_path):
    from control.runtime.base import ProxyResponse

    thresholds = {"1.0.0": 0.25, "2.0.0": 0.9}
    monitor = ScoreMonitor(tmp_path / "monitor", start=False, manifest_of=lambda name, version: {
        "version": version, "monitoring": {"drift_threshold": thresholds[version]}})
    for version in thresholds:
        body = ('{"model":"m","version":"%s","scores":[0.5]}' % version).encode()
        monitor.observe("m", ProxyResponse(status=200, headers={}, body=body))
    monitor.drain()
    report = monitor.report("m", batch=False)["versions"]
    assert {v: report[v]["threshold"] for v in report} == thresholds


# -- input drift, per feature; a reference's stated minimum ------------------------------------------

FEAT_RT, FEAT_BATCH = "drift-feat-rt", "drift-feat-batch"


def feature_rows(n: int, *, seed: int, y_shift: float = 0.0, south: float = 0.3) -> list[dict]:
    """Rows of four features; only x moves the score. `y_shift` moves y, `south` the share of
    region "south" (the rest "north"); member is true for about half."""
    r = random.Random(seed)
    return [{"x": r.gauss(0, 1), "y": r.gauss(y_shift, 1), "region": "south" if r.random() < south else "north",
             "member": r.random() < 0.5} for _ in range(n)]


@pytest.fixture
def feat_plane(tmp_path, gcs):
    settings = settings_for(tmp_path, start_timeout=30)
    for name in (FEAT_RT, FEAT_BATCH, BATCH):
        copy_model(name, settings.models_dir)
    with running(settings) as server:
        yield server


def test_realtime_a_single_shifted_feature_is_named_json_and_csv_through_the_front_door(feat_plane):
    server = feat_plane
    url = f"{server.url}/models/{FEAT_RT}/predict"
    r = api.post(url, json={"rows": feature_rows(N, seed=1)}, timeout=60)   # the reference's rows
    assert r.status_code == 200, r.text
    r = api.post(url, json={"rows": feature_rows(N, seed=2)}, timeout=60)   # the same population
    assert r.status_code == 200, r.text
    v = version(server, FEAT_RT)
    assert set(v["inputs"]["features"]) == {"x", "y", "region", "member"}
    assert v["inputs"]["drifted"] == [] and v["drifted"] is False
    calm = {f: d["psi"] for f, d in v["inputs"]["features"].items()}
    assert all(p is not None and p < 0.25 for p in calm.values()), calm

    # y alone moves, sent as CSV: the scores (logistic(x)) do not, and y is the one feature named
    shifted = feature_rows(N, seed=3, y_shift=2.0)
    body = "x,y,region,member\n" + "\n".join(
        f"{row['x']},{row['y']},{row['region']},{str(row['member']).lower()}" for row in shifted) + "\n"
    r = api.post(url, data=body, headers={"Content-Type": "text/csv"}, timeout=60)
    assert r.status_code == 200, r.text
    v = version(server, FEAT_RT)
    assert v["inputs"]["drifted"] == ["y"], v["inputs"]
    y = v["inputs"]["features"]["y"]
    assert y["type"] == "number" and y["psi"] > 0.25 and y["drifted"] is True
    assert len(y["bins"]["reference"]) == len(y["bins"]["edges"]) + 1
    assert v["drifted"] is False   # the scores' drift is the scores' alone
    assert v["inputs"]["features"]["member"]["type"] == "category"
    assert set(v["inputs"]["features"]["member"]["recent"]["shares"]) == {"true", "false"}
    text = api.get(f"{server.url}/metrics").text
    assert f'modelplane_model_feature_drifted{{model="{FEAT_RT}",version="1.0.0",feature="y"}} 1' in text
    assert f'modelplane_model_feature_drifted{{model="{FEAT_RT}",version="1.0.0",feature="x"}} 0' in text
    assert f'modelplane_model_feature_psi{{model="{FEAT_RT}",version="1.0.0",feature="y"}} ' in text


def _feat_job(server, gcs_client, name: str, rows: list[dict]) -> dict:
    gcs_client.bucket("test-bucket").blob(f"data/{name}").upload_from_string(
        "x,y,region,member\n" + "\n".join(f"{r['x']!r},{r['y']!r},{r['region']},{str(r['member']).lower()}"
                                          for r in rows) + "\n", content_type="text/csv")
    got = api.post(f"{server.url}/api/models/{FEAT_BATCH}/jobs", json={"dataset": f"gs://test-bucket/data/{name}"})
    assert got.status_code == 202, got.text
    job_id = got.json()["id"]
    job = wait_until(lambda: (j := api.get(f"{server.url}/api/jobs/{job_id}").json())["status"]
                     in ("succeeded", "failed") and j, 60, what=f"job {job_id}")
    assert job["status"] == "succeeded", job
    return job


def test_batch_a_single_shifted_category_is_named_from_real_jobs(feat_plane, gcs_client):
    server = feat_plane
    base = _feat_job(server, gcs_client, "base.csv", feature_rows(600, seed=1))
    inputs = base["score_summary"]["inputs"]
    assert inputs["rows"] == 600 and inputs["sampled"] == 600
    assert inputs["features"]["region"]["type"] == "category"
    assert set(inputs["features"]["region"]["shares"]) == {"north", "south"}
    assert len(inputs["features"]["y"]["percentiles"]) == 101

    _feat_job(server, gcs_client, "same.csv", feature_rows(600, seed=2))
    v = version(server, FEAT_BATCH)
    assert v["reference"]["complete"] and v["inputs"]["drifted"] == [], v["inputs"]

    _feat_job(server, gcs_client, "south.csv", feature_rows(600, seed=3, south=0.8))
    v = version(server, FEAT_BATCH)
    assert v["inputs"]["drifted"] == ["region"], v["inputs"]
    region = v["inputs"]["features"]["region"]
    assert region["psi"] > 0.25 and region["recent"]["shares"]["south"] > 0.7
    assert region["reference"]["shares"]["south"] < 0.4
    assert v["drifted"] is False
    text = api.get(f"{server.url}/metrics").text
    assert f'modelplane_model_feature_drifted{{model="{FEAT_BATCH}",version="1.0.0",feature="region"}} 1' in text


def test_a_small_first_job_does_not_become_the_reference_and_the_api_says_what_is_needed(feat_plane, gcs_client):
    server = feat_plane
    r = random.Random(5)
    small = _job(server, gcs_client, "small.csv", [r.gauss(0, 1) for _ in range(20)])
    v = version(server, BATCH)
    ref = v["reference"]
    assert (ref["count"], ref["needed"], ref["missing"], ref["complete"]) == (20, 500, 480, False)
    assert ref["source"] == f"job {small['id']}" and ref["jobs"] == [small["id"]]
    assert "20 of 500 scores" in v["drift"]["reason"] and v["drift"]["psi"] is None

    big = _job(server, gcs_client, "big.csv", [r.gauss(0, 1) for _ in range(600)])
    v = version(server, BATCH)
    ref = v["reference"]
    assert (ref["count"], ref["missing"], ref["complete"]) == (620, 0, True)
    assert ref["jobs"] == [small["id"], big["id"]] and ref["source"] == f"jobs {small['id']}, {big['id']}"
    assert v["drift"]["psi"] is not None and v["drift"]["psi"] < 0.25 and v["drifted"] is False

    later = _job(server, gcs_client, "later.csv", [r.gauss(0, 1) for _ in range(20)])   # complete: stays
    v = version(server, BATCH)
    assert v["reference"]["count"] == 620 and later["id"] not in v["reference"]["jobs"]


def test_console_names_the_drifted_feature_with_a_table_and_a_chart_each(feat_plane, monkeypatch, tmp_path):
    pytest.importorskip("streamlit")
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    server = feat_plane
    url = f"{server.url}/models/{FEAT_RT}/predict"
    for batch in (feature_rows(N, seed=1), feature_rows(N, seed=3, y_shift=2.0)):
        assert api.post(url, json={"rows": batch}, timeout=60).status_code == 200
    monkeypatch.setenv("MODELPLANE_URL", server.url)
    monkeypatch.setenv("MODELPLANE_TOKEN", AUTH["Authorization"].split()[-1])
    monkeypatch.setenv("MODELPLANE_STATE_DIR", str(tmp_path / "no-state"))
    config.set_option("server.address", "127.0.0.1")
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "console" / "app.py"), default_timeout=90)
    at.run()
    at.switch_page("views/model.py")
    at.query_params.update({"model": FEAT_RT})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    warnings = [w.value for w in at.warning]
    assert any("inputs have drifted" in w and "y (PSI" in w for w in warnings), warnings
    assert not any("inputs have drifted" in w and ("x (PSI" in w or "region" in w) for w in warnings), warnings
    table = next(d.value for d in at.dataframe if "feature" in d.value.columns)
    assert list(table["feature"])[0] == "y" and list(table["drifted"]) == ["yes", "no", "no", "no"]
    titles = [c.proto.spec for c in at.get("vega_lite_chart")]
    assert sum(": reference vs recent" in t and "score" not in t.split("reference vs recent")[1][:10]
               for t in titles) >= 4, "a chart per feature"


# -- input drift: shared across replicas, and bounded against hostile bodies --------------------------

FEATURES = [{"name": "x", "type": "number"}, {"name": "y", "type": "number"},
            {"name": "region", "type": "string"}, {"name": "member", "type": "boolean"}]


def _answer_with_rows(version: str, batch: list[dict]) -> tuple[ProxyResponse, tuple[str, bytes]]:
    import json as _json
    body = _json.dumps({"model": "m", "version": version, "scores": [logistic(r["x"]) for r in batch]}).encode()
    return ProxyResponse(status=200, headers={}, body=body), ("application/json", _json.dumps({"rows": batch}).encode())


def test_input_drift_is_shared_by_replicas_reference_once_windows_merged(gcs_client):
    import uuid

    from control.state import BucketState

    prefix = f"state-{uuid.uuid4().hex[:8]}/"
    manifest = {"features": FEATURES, "monitoring": {"reference_size": 200, "window": 400, "drift_threshold": 0.25}}
    a, b = (ScoreMonitor(BucketState(gcs_client.bucket("test-bucket"), prefix=prefix, replica=f"replica-{n}")
                         .scoped("monitor/"), start=False, manifest_of=lambda name, version: manifest) for n in "ab")
    try:
        a.observe("m", *_answer_with_rows("1.0.0", feature_rows(200, seed=1)))   # A's rows are the reference
        a.drain()
        b.observe("m", *_answer_with_rows("1.0.0", feature_rows(200, seed=9, south=0.9)))   # B only saw others
        b.drain()
        a.observe("m", *_answer_with_rows("1.0.0", feature_rows(100, seed=2)))
        b.observe("m", *_answer_with_rows("1.0.0", feature_rows(150, seed=3, y_shift=2.0)))
        a.flush()
        b.flush()
        ra, rb = a.report("m")["versions"]["1.0.0"], b.report("m")["versions"]["1.0.0"]
        assert ra["inputs"] == rb["inputs"]   # one reference, one merged window of 250 rows
        assert ra["inputs"]["features"]["y"]["recent"]["count"] == 250
        assert ra["inputs"]["features"]["region"]["reference"]["shares"]["south"] < 0.5   # A's, not B's
        assert ra["inputs"]["drifted"] == ["y"], ra["inputs"]
        # what is stored is bounded: the reference as its summary, not its rows
        shared, _ = a.store.get_json("m/1.0.0.json")
        assert "in_reference" not in shared and set(shared["in_reference_summary"]) == {"x", "y", "region", "member"}
    finally:
        a.close()
        b.close()


def test_hostile_request_bodies_are_left_out_counted_and_never_stop_the_scores(tmp_path):
    import control.monitor as cm

    monitor = ScoreMonitor(tmp_path / "monitor", start=False, manifest_of=lambda n, v: {
        "features": FEATURES, "monitoring": {"reference_size": 100, "window": 100}})
    answer, _ = _answer_with_rows("1.0.0", feature_rows(2, seed=1))
    bodies = [("application/json", b"x" * (cm.MAX_REQUEST_BYTES + 1)),        # too large: not even queued
              ("application/json", b'{"rows": [1, 2]}'),                      # rows that are not objects
              ("application/json", b'{"rows": [{"x": 1}]}'),                  # one row for two scores
              ("text/csv", b"\xff\xfe not utf-8"),
              ("application/json", b'{"rows": [{"x": "NaN", "region": {"a": 1}}, {"y": "1e999"}]}')]
    for body in bodies:
        monitor.observe("m", answer, body)
    monitor.drain()
    assert monitor.inputs_skipped == 4 and monitor.observed == 10   # every answer's scores still taken
    v = monitor._versions[("m", "1.0.0")]
    assert len(v.in_reference) == 2 and v.in_reference[0]["x"] is None and v.in_reference[1]["y"] is None
    assert v.in_reference[0]["region"].startswith("{")   # an object read as a (short) category value


def test_csv_answers_with_passthrough_columns_read_the_score_column():
    headers = {"Content-Type": "text/csv", "X-Model-Version": "1.0.0"}
    assert parse_scores(headers, b"customer_id,p\nc1,0.25\n\"c,2\",0.75\n") == ("1.0.0", [0.25, 0.75], False)


def test_input_drift_survives_a_restart(tmp_path):
    manifest = {"features": FEATURES, "monitoring": {"reference_size": 200, "window": 200}}
    first = ScoreMonitor(tmp_path / "monitor", start=False, manifest_of=lambda n, v: manifest)
    first.observe("m", *_answer_with_rows("1.0.0", feature_rows(200, seed=1)))
    first.observe("m", *_answer_with_rows("1.0.0", feature_rows(200, seed=3, y_shift=2.0)))
    before = first.report("m", batch=False)["versions"]["1.0.0"]["inputs"]
    first.close()
    assert before["drifted"] == ["y"]
    again = ScoreMonitor(tmp_path / "monitor", start=False, manifest_of=lambda n, v: manifest)
    assert again.report("m", batch=False)["versions"]["1.0.0"]["inputs"] == before
    again.observe("m", *_answer_with_rows("1.0.0", feature_rows(200, seed=4)))   # still read after it
    assert again.report("m", batch=False)["versions"]["1.0.0"]["inputs"]["drifted"] == []


def test_a_dataset_run_through_a_realtime_version_does_not_turn_its_monitoring_into_a_batch_one(tmp_path):
    from types import SimpleNamespace

    summary = {"count": 500, "percentiles": [i / 100 for i in range(101)]}
    jobs = [SimpleNamespace(id=f"j{k}", model=k, version="1.0.0", status="succeeded", trigger="api",
                            score_summary=summary, finished_at=None) for k in ("rt", "batch")]
    runtime = SimpleNamespace(jobs=lambda model=None, limit=200: [j for j in jobs if model in (None, j.model)])
    monitor = ScoreMonitor(tmp_path / "monitor", start=False, runtime=runtime,
                           manifest_of=lambda n, v: {"kind": "realtime" if n == "rt" else "batch"})
    monitor.sync_jobs()
    assert ("rt", "1.0.0") not in monitor._versions
    assert monitor._versions[("batch", "1.0.0")].kind == "batch"


def test_realtime_v2_requests_inputs_are_read_too(feat_plane):
    server = feat_plane
    r = api.post(f"{server.url}/models/{FEAT_RT}/predict", json={"rows": feature_rows(N, seed=1)}, timeout=60)
    assert r.status_code == 200, r.text
    batch = feature_rows(N, seed=4, south=0.9)
    body = {"inputs": [{"name": "x", "shape": [N], "datatype": "FP64", "data": [b["x"] for b in batch]},
                       {"name": "y", "shape": [N, 1], "datatype": "FP64", "data": [[b["y"]] for b in batch]},
                       {"name": "region", "shape": [N], "datatype": "BYTES", "data": [b["region"] for b in batch]},
                       {"name": "member", "shape": [N], "datatype": "BOOL", "data": [b["member"] for b in batch]}]}
    r = api.post(f"{server.url}/models/{FEAT_RT}/v2/models/{FEAT_RT}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    v = version(server, FEAT_RT)
    assert v["inputs"]["drifted"] == ["region"], v["inputs"]
    assert v["inputs"]["features"]["y"]["recent"]["count"] == N
