"""The benchmark and the locust scenarios, run for real: `python -m loadtest --quick` and each scenario
briefly, as bounded subprocesses (locust is never imported here), against real planes.

No wall-clock pass/fail: the benchmark's report must hold every figure with a measured
baseline; the scenarios must make requests and see none fail.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, have_r

from loadtest.common import bench_copy, examples
from loadtest.plane import EmbeddedPlane, copy_models
from loadtest.scenarios import parse_stats, run_scenario

pytestmark = pytest.mark.slow

# every figure the quick report must hold (R's only when Rscript is installed)
EXPECTED = ["adapter_overhead_p50_c1", "adapter_overhead_p50_c8", "adapter_overhead_p50_c32",
            "adapter_overhead_p99_c1", "control_overhead_p50_c1", "control_overhead_p50_c8",
            "control_overhead_p50_c32", "control_overhead_p99_c32", "cold_start_python", "burst_failures",
            "batch_e2e_python", "batch_e2e_ratio_python", "batch_adapter_rss_python", "list_models_ms",
            # issue 11's targets, each against its same-run baseline
            "adapter_rps_ratio_c8", "adapter_overhead_p50_100rows", "adapter_idle_rss", "control_vs_adapter_p50_c1",
            "control_vs_adapter_p50_c8", "control_vs_adapter_p50_c32", "control_vs_adapter_rps_c8",
            "read_growth_page_of_100", "read_growth_one_model", "read_growth_jobs", "read_growth_list_etag",
            # issue 12: the catalog's filtered list, and what a rollout costs the live traffic
            "list_models_filtered_ms", "rollout_split_p50_ratio_c1", "rollout_split_p50_ratio_c8",
            "rollout_shadow_p50_ratio_c1", "rollout_shadow_p50_ratio_c8"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "loadtest", "--quick", "--out", str(out)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out, json.loads((out / "report.json").read_text()), proc.stdout


def test_quick_bench_reports_every_figure_with_a_measured_baseline(quick_report):
    out, report, stdout = quick_report
    figures = {f["id"]: f for f in report["figures"]}
    expected = EXPECTED + (["cold_start_r"] if have_r() else [])
    missing = [f for f in expected if f not in figures]
    assert not missing, f"report lacks {missing}; has {sorted(figures)}"
    for f in figures.values():
        assert finite(f["value"]), f
        assert finite(f["baseline"]), f
        assert f["baseline_label"] or f["id"].startswith("locust_"), f
        assert f["samples"] > 0, f
        if f["target"] is not None:
            assert f["passed"] in (True, False), f
    # baselines that are times were really measured (not a zero placeholder)
    for key in ("adapter_overhead_p50_c1", "cold_start_python", "batch_e2e_python", "list_models_ms"):
        assert figures[key]["baseline"] > 0, figures[key]
    assert figures["list_models_ms"]["extra"]["models"] >= 1000
    assert figures["burst_failures"]["value"] == 0, figures["burst_failures"]   # 0 -> N drops nothing
    assert report["meta"]["errors"] == {}
    assert report["meta"]["machine"]["nproc"] >= 1
    # the printed table names every figure
    for f in figures.values():
        assert f["title"] in stdout


def test_quick_bench_writes_charts(quick_report):
    out, report, _ = quick_report
    for name in ("latency_vs_concurrency.png", "cold_start.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "table.md").read_text().startswith("| figure")


def test_batch_through_the_plane_left_results_in_the_bucket(quick_report):
    _, report, _ = quick_report
    runs = report["details"]["batch"]["churn-risk"]["plane"]
    assert runs and all(r["results_bytes"] > 0 and r["results_uri"].startswith("gs://") for r in runs)
    assert all(r["rows"] == report["details"]["batch"]["churn-risk"]["rows"] for r in runs)


# -- locust scenarios against a real plane -------------------------------------------------

@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    ex = examples()
    tmp = tmp_path_factory.mktemp("scenarios")
    models = tmp / "models"
    copy_models([ex[("realtime", "python")], ex[("batch", "python")]], models)
    idle = bench_copy(ex[("realtime", "python")], models, suffix="idle", scaling={"idle_timeout": "1s"}).name
    at_target = bench_copy(ex[("realtime", "python")], models, suffix="at-target",
                           scaling={"min": 0, "max": 4, "target_concurrency": 4, "idle_timeout": "60s"}).name
    p = EmbeddedPlane(tmp / "plane", models_dir=models, env={"MODELPLANE_WATCH_INTERVAL": "0.2"}).start(
        expect=[ex[("realtime", "python")].name, ex[("batch", "python")].name, idle, at_target])
    p.idle_model = idle
    p.at_target = at_target
    p.realtime = ex[("realtime", "python")].name
    p.batch = ex[("batch", "python")].name
    try:
        yield p
    finally:
        p.stop()


@pytest.mark.parametrize("scenario,upload", [("steady", None), ("burst", None), ("mix", "api"), ("mix", "gcs")])
def test_locust_scenario_makes_requests_and_none_fail(plane, tmp_path, scenario, upload):
    env = {"LOADTEST_MODELS": plane.idle_model if scenario == "burst" else plane.realtime,
           "LOADTEST_BATCH_MODEL": plane.batch, "LOADTEST_BATCH_ROWS": "500", "LOADTEST_JOB_TIMEOUT": "90", "LOADTEST_IDLE_WAIT": "30",
           "MODELPLANE_TOKEN": plane.token}
    if upload == "gcs":
        env.update(LOADTEST_UPLOAD="gcs", STORAGE_EMULATOR_HOST=plane.emulator.endpoint,
                   MODELPLANE_STORAGE_KEY=plane.emulator.key, MODELPLANE_BUCKET=plane.bucket)
    result = run_scenario(scenario, host=plane.url, out_dir=tmp_path, users=8, spawn_rate=8, duration="4s", env=env,
                          stop_timeout=60, timeout=180)
    detail = f"{[(r.type, r.name, r.requests, r.failures) for r in result.rows]}\n{result.failures}\n{result.stderr_tail}"
    assert result.requests > 0, detail
    assert result.failed == 0, detail
    predicts = [r for r in result.rows if r.name.endswith("/predict")]
    assert predicts and sum(r.requests for r in predicts) > 0, detail
    if scenario == "mix":
        jobs = [r for r in result.rows if r.type == "JOB"]
        assert jobs and jobs[0].requests >= 1 and jobs[0].failures == 0, detail
        uploads = [r for r in result.rows if r.type == ("GCS" if upload == "gcs" else "POST") and "predict" not in r.name]
        assert uploads and uploads[0].requests >= 1, detail


def test_load_at_exactly_target_concurrency_keeps_one_replica_and_one_cold_start(plane, tmp_path):
    """Locust users with no pause, as many as the model's target_concurrency (4): the first
    request starts one replica, and the load never asks for a second or loses the first."""
    name = plane.at_target
    samples, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            samples.append(plane.model(name)["replicas"])
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_scenario("steady", host=plane.url, out_dir=tmp_path, users=4, spawn_rate=4, duration="8s",
                              env={"LOADTEST_MODELS": name, "LOADTEST_WAIT": "0", "MODELPLANE_TOKEN": plane.token},
                              stop_timeout=30, timeout=120)
    finally:
        stop.set()
        watcher.join()
    detail = f"{[(r.name, r.requests, r.failures) for r in result.rows]}\n{result.stderr_tail}"
    assert result.requests > 200 and result.failed == 0, detail
    metrics = plane.model(name)["metrics"]
    assert metrics["cold_starts"] == 1, metrics
    assert max(samples) == 1, samples                    # never a second replica
    first_ready = samples.index(1)
    assert min(samples[first_ready:]) == 1, samples      # never back to zero under load


def test_parse_stats_reads_locust_csv(tmp_path):
    path = tmp_path / "x_stats.csv"
    path.write_text(
        "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
        "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
        "99.99%,100%\n"
        "POST,/models/a/predict,10,1,5,6.5,2,30,60,9.5,0.9,5,6,7,8,9,12,20,30,30,30,30\n"
        ",Aggregated,10,1,5,6.5,2,30,60,9.5,0.9,5,6,7,8,9,12,20,30,30,30,30\n")
    total, rows = parse_stats(path)
    assert total.requests == 10 and total.failures == 1 and total.p99_ms == 30
    assert [r.name for r in rows] == ["/models/a/predict"]


def test_body_flood_prints_its_figures_and_the_budget_turns_the_excess_away():
    """`python -m loadtest.body_flood`, small and bounded: the control service's RSS before, at
    its peak and after, and each status; a 5 MiB budget takes two 2 MiB bodies at once."""
    out = subprocess.run([sys.executable, "-m", "loadtest.body_flood", "--concurrency", "8", "--size-mib", "2",
                          "--settle", "0.5", "--max-seconds", "60", "--env", "MODELPLANE_MAX_BODIES_IN_FLIGHT=5242880"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert sum(figures["statuses"].values()) == 8 and set(figures["statuses"]) <= {"200", "503"}
    assert figures["statuses"].get("200", 0) >= 2
    assert all(finite(figures[k]) and figures[k] > 0 for k in ("rss_before_mib", "rss_peak_mib", "rss_after_mib"))


def test_stream_bench_runs_a_realtime_model_as_a_job_beside_the_model_alone():
    """`python -m loadtest.stream_bench`, small: both runs scored every row alike, each figure measured."""
    out = subprocess.run([sys.executable, "-m", "loadtest.stream_bench", "--rows", "3000", "--timeout", "120"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["rows"] == 3000 and figures["same_scores"] is True
    for key in ("plane_wall_s", "plane_rows_per_s", "model_alone_wall_s", "model_alone_rows_per_s",
                "ratio_plane_over_alone", "plane_peak_rss_mib"):
        assert finite(figures[key]) and figures[key] > 0, (key, figures)
    assert figures["plane_max_replicas"] >= 1


def test_cluster_scale_measures_the_list_with_and_without_the_watch_cache(tmp_path):
    """`python -m loadtest.cluster_scale`, small: a real API server with 60 Services; the list
    answered per request from the API server (before) and from the watch cache (after), with
    each figure the full run reports."""
    import kube

    if kube.apiserver_binary() is None or not kube.apiserver_binary().is_file():
        pytest.skip("no kube-apiserver binary (scripts/cluster-build.sh)")
    out = subprocess.run([sys.executable, "-m", "loadtest.cluster_scale", "--services", "60", "--samples", "3",
                          "--workdir", str(tmp_path / "api")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by_mode = {r.get("mode"): r for r in rows if "mode" in r}
    assert by_mode["listing"]["models_total"] == by_mode["runtime"]["models_total"] == 60
    runtime = by_mode["runtime"]
    for key in ("ready_s", "cache_rss_mib", "after_a_change_all_p50_ms", "after_a_change_filtered_p50_ms",
                "unchanged_filtered_p50_ms"):
        assert finite(runtime[key]) and runtime[key] >= 0, key
    assert finite(by_mode["listing"]["every_request_p50_ms"])


def test_bridge_scale_measures_the_previous_and_the_current_watcher(tmp_path):
    """`python -m loadtest.bridge_scale`, small: both watchers over the same bucket, each figure."""
    out = subprocess.run([sys.executable, "-m", "loadtest.bridge_scale", "--objects", "300", "--interval", "0.2",
                          "--timeout", "120", "--json", str(tmp_path / "figures.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["objects"] == 300 and figures["events_at_sink"] == 1   # nothing resent, the upload announced
    current = figures["current"]
    assert finite(current["scan_s"]) and current["peak_rss_kib"] > 0 and current["state_entries_after"] <= 2
    if "skipped" not in figures["previous"]:   # the baseline comes from git history (absent in a shallow clone)
        assert figures["previous"]["state_entries"] == 300 and finite(figures["previous"]["scan_s"])
