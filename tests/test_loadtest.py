"""The benchmark and the locust scenarios, run as subprocesses (locust never imports into pytest).

These check that every figure is measured with its baseline and that the scenarios drive real
traffic without failures; whether a figure meets its target is the benchmark's report, not a
test assertion (this machine is shared and noisy).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, requires_r

from loadtest.common import bench_copy, examples
from loadtest.plane import EmbeddedPlane, copy_models

pytestmark = pytest.mark.slow

EXPECTED_FIGURES = {
    "adapter_overhead_p50_c1", "adapter_overhead_p50_c8", "adapter_overhead_p50_c32",
    "control_overhead_p50_c1", "control_overhead_p50_c8", "control_overhead_p50_c32",
}


@requires_r
def test_quick_bench_reports_every_figure_with_its_baseline(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "loadtest", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # non-zero: a section broke
    report = json.loads((out / "report.json").read_text())
    figures = {f["id"]: f for f in report["figures"]}
    assert not report["meta"].get("errors"), report["meta"]["errors"]
    assert EXPECTED_FIGURES <= set(figures), sorted(figures)
    titles = " | ".join(f["title"] for f in figures.values())
    for words in ("cold start", "python", "major-gift", "burst", "batch", "peak RSS", "GET /api/models"):
        assert words in titles, f"no figure about {words!r}: {titles}"
    for f in figures.values():
        assert isinstance(f["value"], (int, float)) and math.isfinite(f["value"]), f
        assert f["baseline"] is not None and math.isfinite(f["baseline"]), f
        assert f["samples"] >= 1, f
    burst = next(f for f in figures.values() if "burst" in f["title"])
    assert burst["value"] == 0, burst  # requests failed while scaling 0 -> N
    for chart in ("latency_vs_concurrency.png", "cold_start.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figure" in proc.stdout and "target" in proc.stdout  # the printed table


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("locust")
    ex = examples()
    models = tmp / "models"
    copy_models([ex[("realtime", "python")], ex[("batch", "python")]], models)
    burst = bench_copy(ex[("realtime", "python")], models, suffix="burst", scaling={"idle_timeout": "1s"})
    p = EmbeddedPlane(tmp / "plane", models_dir=models, env={"MODELPLANE_WATCH_INTERVAL": "0.2"}).start()
    try:
        yield p, burst.name, ex
    finally:
        p.stop()


@pytest.mark.parametrize("scenario", ["steady", "burst", "mix"])
def test_locust_scenario_drives_real_traffic_without_failures(plane, scenario, tmp_path):
    p, burst_model, ex = plane
    env = {"LOADTEST_MODELS": burst_model if scenario == "burst" else ex[("realtime", "python")].name,
           "LOADTEST_BATCH_MODEL": ex[("batch", "python")].name, "LOADTEST_BATCH_ROWS": "500",
           "LOADTEST_IDLE_WAIT": "30"}
    code = ("import json, sys; from loadtest.scenarios import run_scenario; "
            f"r = run_scenario({scenario!r}, host={p.url!r}, out_dir={str(tmp_path)!r}, users=6, spawn_rate=6, "
            f"duration='6s', env={env!r}); "
            "print(json.dumps({'requests': r.requests, 'failed': r.failed, 'rows': [x.__dict__ for x in r.rows], "
            "'failures': r.failures, 'stderr': r.stderr_tail}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["requests"] > 0, result
    assert result["failed"] == 0, result["failures"]
    if scenario == "mix":
        assert any(row["type"] == "JOB" and row["requests"] > 0 for row in result["rows"]), result["rows"]
